"""Apply a rendered ruleset to the kernel through libnftables, and read it back.

The one module in ``rules`` with a side effect. Every change is one
``json_cmd`` transaction, so the kernel holds either the old table or the new
one, never a mix. Only ``table inet egress_agent`` is ever touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from egress_agent.rules.render import FAMILY, TABLE, Json, render_teardown


class NftablesError(Exception):
    """libnftables refused a command; carries what it said."""


@dataclass(frozen=True, kw_only=True)
class TableSummary:
    """What the kernel holds for the agent's table, in comparable form."""

    chains: tuple[str, ...]
    sets: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]  # (chain, comment) in kernel order


def _nft(*, dry_run: bool = False, json_output: bool = False) -> Any:
    try:
        import nftables  # Debian's python3-nftables; seen through --system-site-packages
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise NftablesError(
            "the nftables Python bindings are missing: install Debian's python3-nftables "
            "and use a virtualenv made with --system-site-packages (./run setup does both)"
        ) from exc
    nft = nftables.Nftables()
    nft.set_json_output(json_output)
    nft.set_handle_output(False)
    if dry_run:
        nft.set_dry_run(True)
    return nft


def _run(doc: Json, *, dry_run: bool = False, json_output: bool = False) -> str:
    nft = _nft(dry_run=dry_run, json_output=json_output)
    rc, output, error = nft.json_cmd(doc)
    if rc != 0:
        hint = ""
        if "Operation not permitted" in (error or ""):
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
        self._nft: Any = _nft() if owned else None
        self._created = False

    def apply(self, doc: Json) -> None:
        if not self.owned:
            _run(doc)
            return
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
        rc, _, error = self._nft.json_cmd(doc)
        if rc != 0:
            raise NftablesError(f"nftables refused the change (rc={rc}): {error.strip()}")

    def remove(self) -> None:
        if not self.owned:
            remove_table()
            return
        if self._created:
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
    text = _nft()
    rc, output, error = text.cmd(f"list tables {FAMILY}")
    if rc != 0:
        raise NftablesError(f"cannot list the nftables tables: {error.strip()}")
    if f"table {FAMILY} {TABLE}" not in output.splitlines():
        return None
    nft = _nft(json_output=True)
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


def _list(nft: Any, command: str) -> list[Json]:
    rc, output, error = nft.cmd(command)
    if rc != 0:
        if "No such file or directory" in (error or ""):
            raise FileNotFoundError(command)
        raise NftablesError(f"cannot read table {FAMILY} {TABLE} ({command}): {error.strip()}")
    items: list[Json] = json.loads(output).get("nftables", []) if output.strip() else []
    return items


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


def render_output_update(old: Json, new: Json) -> Json | None:
    """A transaction that turns the table of ``old`` into that of ``new`` when
    they differ only in the ``output`` chain's rules and in sets (what a
    workload change does to a BPF-mode document), without replacing the
    table: it keeps its handle and the other chains are untouched. None when
    anything else differs (then replace the table whole)."""

    def parts(doc: Json) -> tuple[list[Json], dict[str, Json], list[Json]]:
        other, sets, output = [], {}, []
        for cmd in doc.get("nftables", []):
            add = cmd.get("add", {})
            if "set" in add:
                sets[add["set"]["name"]] = add["set"]
            elif "rule" in add and add["rule"]["chain"] == "output":
                output.append(add["rule"])
            else:
                other.append(cmd)
        return other, sets, output

    old_other, old_sets, _ = parts(old)
    new_other, new_sets, new_output = parts(new)
    if old_other != new_other:
        return None
    table = {"family": FAMILY, "table": TABLE}
    cmds: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        {"flush": {"chain": {**table, "name": "output"}}},
    ]
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
    cmds += [{"add": {"rule": r}} for r in new_output]
    return {"nftables": cmds}
