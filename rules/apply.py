"""Apply a rendered ruleset to the kernel through libnftables, and read it back.

The one module in ``rules`` with a side effect. Every change is one
``json_cmd`` transaction, so the kernel holds either the old table or the new
one, never a mix. Only ``table inet egress_agent`` is ever touched.

One libnftables context serves the whole process (:func:`context`), made
once at start-up and kept: libnftables opens its netlink socket when a
context is made and calls ``exit()`` when it cannot (nftables 1.0.6,
``netlink_init_error``), so a context made later -- with the process's file
descriptors exhausted by idle connections, say -- would end the agent.
A kept context talks over its open socket, and a failure to talk to the
kernel comes back as a return code, raised here as :class:`NftablesError`.
The other path to ``exit()`` is libnftables' interface-name cache (its own
rtnetlink socket), used by ``meta iif``/``oif`` with names: the rendered
rules match names with ``iifname`` only, which needs no lookup.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from egress_agent.rules.checks import NON_TCP_CHAIN, counted_rule
from egress_agent.rules.nft import FAMILY, TABLE, Json
from egress_agent.rules.render import render_teardown


class NftablesError(Exception):
    """libnftables refused a command, or could not be reached; carries what it said."""


@dataclass(frozen=True, kw_only=True)
class TableSummary:
    """What the kernel holds for the agent's table, in comparable form."""

    chains: tuple[str, ...]
    sets: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]  # (chain, comment) in kernel order


class Nft:
    """A libnftables context with its flags set per call, one caller at a time.

    libnftables keeps output flags and the dry-run switch in the context, so
    calls from different threads (the agent runs some in worker threads) are
    serialised by a lock.
    """

    def __init__(self) -> None:
        try:
            import nftables  # Debian's python3-nftables; seen through --system-site-packages
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise NftablesError(
                "the nftables Python bindings are missing: install Debian's python3-nftables "
                "and use a virtualenv made with --system-site-packages (./run setup does both)"
            ) from exc
        self._nft = nftables.Nftables()
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def cmd(self, command: str, *, json_output: bool = False) -> tuple[int, str, str]:
        """Run a command in nft's own syntax: (rc, output, error)."""
        with self._lock:
            try:
                self._nft.set_json_output(json_output)
                rc, output, error = self._nft.cmd(command)
            except Exception as exc:  # the bindings' own failures (ctypes, decoding)
                raise NftablesError(f"libnftables failed on {command!r}: {exc}") from exc
            finally:
                self._nft.set_json_output(False)
        return int(rc), str(output or ""), str(error or "")

    def json_cmd(self, doc: Json, *, dry_run: bool = False) -> tuple[int, Any, str]:
        """Run a JSON document as one transaction: (rc, output, error)."""
        with self._lock:
            try:
                self._nft.set_dry_run(dry_run)
                rc, output, error = self._nft.json_cmd(doc)
            except Exception as exc:
                raise NftablesError(f"libnftables failed: {exc}") from exc
            finally:
                self._nft.set_dry_run(False)
        return int(rc), output, str(error or "")


_context: Nft | None = None
_context_lock = threading.Lock()


def context() -> Nft:
    """The process's libnftables context, made on first use.

    The agent calls this at start-up, while file descriptors are plentiful,
    so that no later call has to make one."""
    global _context
    with _context_lock:
        if _context is None:
            _context = Nft()
        return _context


def _run(doc: Json, *, dry_run: bool = False) -> str:
    rc, output, error = context().json_cmd(doc, dry_run=dry_run)
    if rc != 0:
        hint = ""
        if "Operation not permitted" in error:
            hint = " (nftables needs CAP_NET_ADMIN: run as root)"
        raise NftablesError(f"nftables refused the change (rc={rc}): {error.strip()}{hint}")
    if isinstance(output, str):
        return output
    return json.dumps(output)


def apply_ruleset(doc: Json) -> None:
    """Replace the agent's table with ``doc`` in one transaction."""
    _run(doc)


class Table:
    """Writes the agent's table, in one of the two failure modes a policy picks.

    Fail closed (the default): a plain table, which outlives the agent, so a
    crashed or killed agent leaves diverted traffic DNAT-ed to a proxy that is
    not listening: it is refused, never sent direct.

    Fail open: the table carries the ``owner`` flag (Linux 5.12, nftables
    1.0.1): the kernel binds it to this process's netlink socket and deletes
    it when the process ends, however it ends, and no other process may change
    or delete it meanwhile. Without the table nothing is diverted: traffic goes
    direct. Established flows keep their conntrack NAT binding either way.
    libnftables 1.0.6 ignores table flags in JSON input, so the owned table is
    created with a one-line text command; later changes keep the table and
    replace its contents (flush, delete the chains and sets, add the new ones)
    in one JSON transaction on the same netlink socket.
    """

    def __init__(self, *, owned: bool) -> None:
        self.owned = owned
        self._nft: Nft | None = context() if owned else None
        self._created = False

    def apply(self, doc: Json) -> None:
        if not self.owned:
            _run(doc)
            return
        assert self._nft is not None
        if not self._created:
            # Replace a plain table a fail-closed run left behind; refused if
            # another process owns the table.
            rc, _, error = self._nft.cmd(
                f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
                f"add table {FAMILY} {TABLE} {{ flags owner; }}"
            )
            if rc != 0:
                raise NftablesError(
                    f"cannot create table {FAMILY} {TABLE} owned by this process: "
                    f"{error.strip()} (is another egress-agent running on this host?)"
                )
            self._created = True
        table = {"family": FAMILY, "name": TABLE}
        body = doc.get("nftables", [])
        cmds: list[Json] = [c for c in body if "metainfo" in c]
        cmds.append({"flush": {"table": table}})
        listing = read_table()
        for item in listing["nftables"] if listing else []:
            for kind in ("chain", "set"):
                if kind in item:
                    cmds.append({"delete": {kind: {**table, "name": item[kind]["name"]}}})
        for cmd in body:
            if "metainfo" in cmd or "delete" in cmd or ("add" in cmd and "table" in cmd["add"]):
                continue  # the table itself stays
            cmds.append(cmd)
        rc, _, error = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftablesError(f"nftables refused the change (rc={rc}): {error.strip()}")

    def change(self, doc: Json) -> None:
        """Run a transaction that edits the table in place (it must not add or
        delete the table itself), on the socket that owns it if owned."""
        if not self.owned:
            _run(doc)
            return
        assert self._nft is not None
        rc, _, error = self._nft.json_cmd(doc)
        if rc != 0:
            raise NftablesError(f"nftables refused the change (rc={rc}): {error.strip()}")

    def remove(self) -> None:
        if not self.owned:
            remove_table()
            return
        if self._created and self._nft is not None:
            rc, _, error = self._nft.cmd(f"delete table {FAMILY} {TABLE}")
            if rc != 0 and "No such file" not in error:
                raise NftablesError(f"cannot delete table {FAMILY} {TABLE}: {error.strip()}")
            self._created = False


def check_ruleset(doc: Json) -> None:
    """Ask libnftables whether ``doc`` would apply (dry run; changes nothing)."""
    _run(doc, dry_run=True)


def remove_table() -> None:
    """Delete the agent's table if present; nothing else."""
    _run(render_teardown())


def read_table() -> Json | None:
    """The kernel's view of the agent's table as libnftables JSON (its chains,
    sets and rules), or None if absent.

    Read object by object, never with ``list table`` or ``list ruleset``:
    libnftables 1.0.6 prints broken JSON for a table with the ``owner`` flag
    (see :class:`Table`), and only the table object itself carries flags.
    """
    nft = context()
    rc, output, error = nft.cmd(f"list tables {FAMILY}")
    if rc != 0:
        raise NftablesError(f"cannot list the nftables tables: {error.strip()}")
    if f"table {FAMILY} {TABLE}" not in output.splitlines():
        return None
    items: list[Json] = []
    try:
        for kind in ("chains", "sets"):
            for item in _list(nft, f"list {kind} {FAMILY}"):
                obj = next(iter(item.values()))
                if item.keys() & {"chain", "set"} and obj.get("table") == TABLE:
                    items.append(item)
        for chain in [i["chain"]["name"] for i in items if "chain" in i]:
            items += [i for i in _list(nft, f"list chain {FAMILY} {TABLE} {chain}") if "rule" in i]
    except FileNotFoundError:
        return None  # removed while we read
    return {"nftables": items}


def _list(nft: Nft, command: str) -> list[Json]:
    rc, output, error = nft.cmd(command, json_output=True)
    if rc != 0:
        if "No such file or directory" in (error or ""):
            raise FileNotFoundError(command)
        raise NftablesError(f"cannot read table {FAMILY} {TABLE} ({command}): {error.strip()}")
    items: list[Json] = json.loads(output).get("nftables", []) if output.strip() else []
    return items


@dataclass(frozen=True, kw_only=True)
class RuleCounter:
    """The counter of one counted rule of the agent's table, as the kernel
    holds it: ``kind`` is ``diverted`` or ``dropped``, ``reason`` says why
    (see :func:`egress_agent.rules.checks.counted_rule`)."""

    chain: str
    rule: str  # the rule's comment, as `nft list` shows it
    kind: str
    reason: str
    packets: int
    bytes: int


def read_counters(chains: Iterable[str]) -> list[RuleCounter]:
    """The counters of the counted rules in ``chains`` of the agent's table,
    in kernel order (empty when the table is absent). Rules that share a
    comment (one per address family) are reported separately."""
    nft = context()
    out: list[RuleCounter] = []
    for chain in chains:
        try:
            items = _list(nft, f"list chain {FAMILY} {TABLE} {chain}")
        except FileNotFoundError:
            continue
        for item in items:
            rule = item.get("rule")
            if rule is None:
                continue
            exprs = rule.get("expr", [])
            counted = counted_rule(chain, rule.get("comment", ""), exprs)
            if counted is None:
                continue
            counter: Json = next((e["counter"] for e in exprs if "counter" in e), {})
            out.append(
                RuleCounter(
                    chain=chain,
                    rule=rule.get("comment", ""),
                    kind=counted.kind,
                    reason=counted.reason,
                    packets=int(counter.get("packets", 0)),
                    bytes=int(counter.get("bytes", 0)),
                )
            )
    return out


def summarize_table(listing: Json) -> TableSummary:
    """Chains, sets and rule comments of a ``list table`` answer, in order."""
    return _summarize(item for item in listing.get("nftables", []))


def summarize_document(doc: Json) -> TableSummary:
    """The same summary for a rendered document, to compare with the kernel."""
    return _summarize(cmd["add"] for cmd in doc.get("nftables", []) if "add" in cmd)


def _summarize(objects: Iterable[Json]) -> TableSummary:
    chains: list[str] = []
    sets: list[str] = []
    rules: list[tuple[str, str]] = []
    for obj in objects:
        if "chain" in obj:
            chains.append(obj["chain"]["name"])
        elif "set" in obj:
            sets.append(obj["set"]["name"])
        elif "rule" in obj:
            rules.append((obj["rule"]["chain"], obj["rule"].get("comment", "")))
    return TableSummary(chains=tuple(chains), sets=tuple(sorted(sets)), rules=tuple(rules))


def verify_applied(doc: Json) -> list[str]:
    """Differences between the rendered document and what the kernel holds
    (empty when they agree)."""
    listing = read_table()
    if listing is None:
        return [f"table {FAMILY} {TABLE} is missing"]
    want = summarize_document(doc)
    have = summarize_table(listing)
    problems = []
    if set(want.chains) != set(have.chains):
        problems.append(
            f"chains differ: want {sorted(want.chains)}, kernel has {sorted(have.chains)}"
        )
    if want.sets != have.sets:
        problems.append(f"sets differ: want {list(want.sets)}, kernel has {list(have.sets)}")
    for chain in want.chains:
        w = [c for ch, c in want.rules if ch == chain]
        h = [c for ch, c in have.rules if ch == chain]
        if w != h:
            problems.append(f"chain {chain}: want rules {w}, kernel has {h}")
    return problems


# Chains whose rules a workload change can alter in a BPF-mode document (the
# selection of locally generated traffic, and its non-TCP drops).
IN_PLACE_CHAINS = ("output", NON_TCP_CHAIN)


def render_output_update(old: Json, new: Json) -> Json | None:
    """A transaction that turns the table of ``old`` into that of ``new`` when
    they differ only in the rules of ``IN_PLACE_CHAINS`` and in sets (what a
    workload change does to a BPF-mode document), without replacing the
    table: it keeps its handle and the other chains are untouched. None when
    anything else differs (then replace the table whole)."""

    def parts(doc: Json) -> tuple[list[Json], dict[str, Json], dict[str, list[Json]]]:
        other: list[Json] = []
        sets: dict[str, Json] = {}
        chains: dict[str, list[Json]] = {name: [] for name in IN_PLACE_CHAINS}
        for cmd in doc.get("nftables", []):
            add = cmd.get("add", {})
            if "set" in add:
                sets[add["set"]["name"]] = add["set"]
            elif "rule" in add and add["rule"]["chain"] in chains:
                chains[add["rule"]["chain"]].append(add["rule"])
            else:
                other.append(cmd)
        return other, sets, chains

    old_other, old_sets, old_chains = parts(old)
    new_other, new_sets, new_chains = parts(new)
    if old_other != new_other:
        return None
    table = {"family": FAMILY, "table": TABLE}
    changed = [name for name in IN_PLACE_CHAINS if old_chains[name] != new_chains[name]]
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    cmds += [{"flush": {"chain": {**table, "name": name}}} for name in changed]
    for name, s in old_sets.items():
        if name not in new_sets or new_sets[name]["type"] != s["type"]:
            cmds.append({"delete": {"set": {**table, "name": name}}})
    for name, s in new_sets.items():
        old_set = old_sets.get(name)
        if old_set is not None and old_set["type"] == s["type"]:
            if old_set == s:
                continue
            cmds.append({"flush": {"set": {**table, "name": name}}})
            if s.get("elem"):
                cmds.append({"add": {"element": {**table, "name": name, "elem": s["elem"]}}})
        else:
            cmds.append({"add": {"set": s}})
    for name in changed:
        cmds += [{"add": {"rule": r}} for r in new_chains[name]]
    return {"nftables": cmds}
