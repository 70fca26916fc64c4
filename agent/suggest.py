"""``egress-agent suggest``: a policy that allows what the audit log saw and
nothing else.

Input: the audit log and its rotated files beside it (``audit.jsonl.1``,
``audit.jsonl.2.gz``, ``audit.jsonl-20261207.gz``; gzip is recognised by its
first bytes). Connections that were allowed count as seen; connections that
were denied are listed at the end as comments, not allowed (a policy
suggested from traffic must not wave through what someone already refused).

Rules are per workload (``from: [workload]``), by name (TLS SNI or HTTP Host)
and port. Names under one parent domain with the same ports share a rule
(``--wildcards``: one ``*.parent`` entry instead, when at least two were
seen). A destination is allowed by address (``cidrs``: the single address)
only when no name was seen for it: a flow without a name to an address that
a listed name was seen at is already allowed by that name (a literal host
matches nameless flows to its own addresses). Each rule carries a comment
with how many connections it covers and when the last was seen.

With ``--policy CURRENT`` the output keeps everything of that policy but its
egress rules and default (workloads, intercept, proxy and DNS settings ...);
without it, each workload is written with the source addresses it was seen
from and intercepted on every TCP port. The text is validated with the
policy loader before it is printed.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from egress_agent.policy.load import PolicyError, load_policy, parse_policy

# Rotated files beside the log: NAME.1, NAME.2.gz, NAME-20261207, NAME-20261207.gz
_ROTATED = r"(\.\d+|-\d{8}(\d{2})?)(\.gz)?"
_RULE_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


class SuggestError(Exception):
    """Input the command cannot use; the message says which and why."""


@dataclass
class Seen:
    """Connections of one kind: how many, and the last one's start."""

    count: int = 0
    last: str = ""

    def add(self, when: str) -> None:
        self.count += 1
        self.last = max(self.last, when)

    def merge(self, other: Seen) -> None:
        self.count += other.count
        self.last = max(self.last, other.last)


@dataclass
class Traffic:
    """What one workload was seen doing."""

    sources: set[str] = field(default_factory=set)
    by_name: dict[tuple[str, int], Seen] = field(default_factory=dict)  # (host, port)
    name_addresses: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    by_address: dict[tuple[str, int], Seen] = field(default_factory=dict)  # (ip, port)


@dataclass
class Observed:
    workloads: dict[str, Traffic] = field(default_factory=dict)
    denied: dict[tuple[str, str, int], Seen] = field(default_factory=dict)  # workload, dst, port
    without_workload: int = 0
    unreadable: list[str] = field(default_factory=list)  # "file:line: why"
    records: int = 0


def audit_files(path: str) -> list[Path]:
    """The log and its rotated files, oldest first (a missing log with
    rotated files is fine: the agent may have been stopped after a rotation)."""
    log = Path(path)
    folder = log.parent if str(log.parent) else Path(".")
    if not folder.is_dir():
        raise SuggestError(f"{path}: no such folder {folder}")
    pattern = re.compile(re.escape(log.name) + _ROTATED)
    rotated = [p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file()]

    def age(p: Path) -> tuple[int, str]:
        suffix = p.name[len(log.name) :].removesuffix(".gz")
        if suffix.startswith("."):
            return (-int(suffix[1:]), "")  # .1 is newer than .2
        return (0, suffix)  # -YYYYMMDD: later dates are newer

    files = sorted(rotated, key=age)
    if log.is_file():
        files.append(log)
    if not files:
        raise SuggestError(
            f"{path}: no audit log there and no rotated files beside it"
            " (give the agent's --audit-log file)"
        )
    return files


def _open(path: Path) -> IO[str]:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_records(files: Iterable[Path], observed: Observed) -> Iterator[dict[str, Any]]:
    """Connection records (request records are skipped); lines that are not
    records are noted in ``observed.unreadable``."""
    for path in files:
        try:
            stream = _open(path)
        except OSError as exc:
            raise SuggestError(f"{path}: cannot read: {exc.strerror}") from exc
        with stream:
            try:
                for number, line in enumerate(stream, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        observed.unreadable.append(f"{path}:{number}: not JSON")
                        continue
                    if not isinstance(record, dict) or "event" not in record:
                        observed.unreadable.append(f"{path}:{number}: not an audit record")
                        continue
                    if record["event"] != "request":
                        yield record
            except (OSError, EOFError) as exc:  # a truncated gzip file
                observed.unreadable.append(f"{path}: cannot read further: {exc}")


def _split_dst(dst: str) -> tuple[str, int] | None:
    host, sep, port = dst.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]"))), int(port)
    except ValueError:
        return None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def observe(records: Iterable[dict[str, Any]], observed: Observed) -> Observed:
    for record in records:
        observed.records += 1
        workload = record.get("workload")
        dst = _split_dst(str(record.get("dst", "")))
        if dst is None:
            continue
        ip, port = dst
        when = str(record.get("time", ""))
        if record.get("verdict") == "deny":
            key = (workload or "-", record.get("server_name") or ip, port)
            observed.denied.setdefault(key, Seen()).add(when)
            continue
        if record.get("verdict") not in ("allow", "audit-deny"):
            continue  # no decision was reached (bad bytes, no destination)
        if not workload:
            observed.without_workload += 1
            continue
        traffic = observed.workloads.setdefault(workload, Traffic())
        src = _split_dst(str(record.get("src", "")))
        if src is not None:
            traffic.sources.add(src[0])
        name = record.get("server_name")
        if name and not _is_address(name):
            name = str(name).lower().rstrip(".")
            traffic.by_name.setdefault((name, port), Seen()).add(when)
            traffic.name_addresses.setdefault((name, port), set()).add(ip)
        else:
            traffic.by_address.setdefault((ip, port), Seen()).add(when)
    return observed


@dataclass
class Rule:
    name: str
    workload: str
    hosts: list[str]
    cidrs: list[str]
    ports: list[int]
    seen: Seen
    note: str = ""


def _parent(host: str) -> str | None:
    """The domain a sibling group shares: ``a.blob.example.com`` ->
    ``blob.example.com``; none for a name of two labels or fewer."""
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else None


def rules_for(workload: str, traffic: Traffic, *, wildcards: bool) -> list[Rule]:
    rules: list[Rule] = []
    # Names: ports per name, then names grouped by parent and equal ports.
    ports_of: dict[str, set[int]] = {}
    for host, port in traffic.by_name:
        ports_of.setdefault(host, set()).add(port)
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for host, ports in ports_of.items():
        key = (_parent(host) or host, tuple(sorted(ports)))
        groups.setdefault(key, []).append(host)
    literal: dict[tuple[str, int], Rule] = {}  # (address, port) a literal name was seen at
    for (label, group_ports), hosts in sorted(groups.items()):
        seen = Seen()
        for host in hosts:
            for port in group_ports:
                seen.merge(traffic.by_name[(host, port)])
        wild = wildcards and len(hosts) >= 2 and "." in label and label not in hosts
        rule = Rule(
            name=f"{workload}-{label if wild or len(hosts) > 1 else hosts[0]}",
            workload=workload,
            hosts=[f"*.{label}"] if wild else sorted(hosts),
            cidrs=[],
            ports=list(group_ports),
            seen=seen,
            note=f" ({len(hosts)} names seen)" if wild else "",
        )
        rules.append(rule)
        if not wild:  # only a literal name matches nameless flows to its addresses
            for host in hosts:
                for port in group_ports:
                    for ip in traffic.name_addresses[(host, port)]:
                        literal.setdefault((ip, port), rule)
    # Addresses without a name, unless a literal name was seen at them.
    ports_at: dict[str, set[int]] = {}
    nameless: dict[int, int] = {}  # id(rule) -> connections it covers without a name
    for (ip, port), seen in traffic.by_address.items():
        covering = literal.get((ip, port))
        if covering is not None:
            covering.seen.merge(seen)
            nameless[id(covering)] = nameless.get(id(covering), 0) + seen.count
            continue
        ports_at.setdefault(ip, set()).add(port)
    for rule in rules:
        if id(rule) in nameless:
            rule.note += f" ({nameless[id(rule)]} of them without a name, to its addresses)"
    by_ports: dict[tuple[int, ...], list[str]] = {}
    for ip, ports in ports_at.items():
        by_ports.setdefault(tuple(sorted(ports)), []).append(ip)
    for address_ports, ips in sorted(by_ports.items()):
        seen = Seen()
        for ip in ips:
            for port in address_ports:
                seen.merge(traffic.by_address[(ip, port)])
        rules.append(
            Rule(
                name=f"{workload}-addresses",
                workload=workload,
                hosts=[],
                cidrs=[_single(ip) for ip in sorted(ips, key=ipaddress.ip_address)],
                ports=list(address_ports),
                seen=seen,
                note=" (no name was seen)",
            )
        )
    return rules


def _single(ip: str) -> str:
    """The CIDR of one address."""
    return str(ipaddress.ip_network(ip))


def _unique_names(rules: list[Rule]) -> None:
    used: set[str] = set()
    for rule in rules:
        base = _RULE_NAME_OK.sub("-", rule.name).strip("-._")[:60] or "rule"
        base = base if base[0].isalnum() else f"r{base}"
        name, n = base, 2
        while name in used:
            name, n = f"{base[:57]}-{n}", n + 1
        used.add(name)
        rule.name = name


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]*")


def _flow(value: object) -> str:
    """A YAML flow value: plain where that reads the same, else quoted (JSON
    is YAML)."""
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and _PLAIN.fullmatch(value) and not _is_yaml_special(value):
        return value
    return json.dumps(value)


def _is_yaml_special(text: str) -> bool:
    """Whether YAML would read the plain text as something else than that
    string (a number, a boolean, null)."""
    return not isinstance(yaml.safe_load(text), str)


def _when(rfc3339: str) -> str:
    """A record's time to the second."""
    return re.sub(r"\.\d+Z$", "Z", rfc3339)


def render(
    observed: Observed,
    *,
    current: dict[str, Any] | None,
    current_path: str | None,
    wildcards: bool,
    source: str,
) -> str:
    known = set((current or {}).get("workloads") or {}) if current is not None else None
    rules: list[Rule] = []
    skipped: dict[str, int] = {}
    for workload in sorted(observed.workloads):
        traffic = observed.workloads[workload]
        if known is not None and workload not in known:
            skipped[workload] = sum(s.count for s in traffic.by_name.values()) + sum(
                s.count for s in traffic.by_address.values()
            )
            continue
        rules += rules_for(workload, traffic, wildcards=wildcards)
    _unique_names(rules)
    out = [
        f"# Suggested by egress-agent suggest from {source}:",
        f"# {observed.records} connection records; allows what was seen and nothing else.",
    ]
    if current is not None:
        out.append(f"# Workloads and settings from {current_path}; its egress rules are replaced.")
        out.append("")
        for key, value in current.items():
            if key in ("egress", "default"):
                continue
            out.append(yaml.safe_dump({key: value}, sort_keys=False, width=100).rstrip())
    else:
        out += [
            "# Workloads are the source addresses each was seen from; replace them with",
            "# the real definitions (pods, cgroups, CIDRs). Intercepted: every TCP port.",
            "",
            "version: 1",
            "workloads:",
        ]
        for workload in sorted(observed.workloads):
            sources = observed.workloads[workload].sources
            cidrs = [_single(ip) for ip in sorted(sources, key=ipaddress.ip_address)]
            out.append(f"  {_flow(workload)}: {{cidrs: {_flow(cidrs)}}}")
        if observed.workloads:
            out += ["intercept:", f"  - from: {_flow(sorted(observed.workloads))}"]
    out.append("egress:" if rules else "egress: []")
    for rule in rules:
        to: dict[str, object] = {}
        if rule.hosts:
            to["hosts"] = rule.hosts
        if rule.cidrs:
            to["cidrs"] = rule.cidrs
        to["ports"] = rule.ports
        to_text = ", ".join(f"{k}: {_flow(v)}" for k, v in to.items())
        connections = f"{rule.seen.count} connection" + ("s" if rule.seen.count != 1 else "")
        out += [
            f"  # {connections}, last seen {_when(rule.seen.last)}{rule.note}",
            f"  - name: {rule.name}",
            f"    from: [{_flow(rule.workload)}]",
            f"    to: {{{to_text}}}",
            "    action: allow",
        ]
    out.append("default: deny")
    notes = []
    for workload, skipped_count in sorted(skipped.items()):
        notes.append(
            f"#   workload {workload} is not in {current_path}: {skipped_count} connections"
        )
    if observed.without_workload:
        notes.append(f"#   {observed.without_workload} connections from no workload")
    for (workload, dst, port), seen in sorted(observed.denied.items()):
        times = "once" if seen.count == 1 else f"{seen.count} times"
        notes.append(f"#   denied: {workload} -> {dst}:{port}, {times}, last {_when(seen.last)}")
    for problem in observed.unreadable[:20]:
        notes.append(f"#   unreadable: {problem}")
    if len(observed.unreadable) > 20:
        notes.append(f"#   ... and {len(observed.unreadable) - 20} more unreadable lines")
    if notes:
        out += ["", "# Seen but not allowed:", *notes]
    return "\n".join(out) + "\n"


def suggest(audit_log: str, *, policy: str | None, wildcards: bool) -> str:
    """The suggested policy's text; raises SuggestError or PolicyError (of
    CURRENT)."""
    current: dict[str, Any] | None = None
    if policy is not None:
        load_policy(policy)  # says exactly what is wrong with it
        current = yaml.safe_load(Path(policy).read_text(encoding="utf-8"))
    files = audit_files(audit_log)
    observed = Observed()
    observe(read_records(files, observed), observed)
    text = render(
        observed,
        current=current,
        current_path=policy,
        wildcards=wildcards,
        source=", ".join(os.fspath(f) for f in files),
    )
    try:
        parse_policy(text, source_name="<suggested>")
    except PolicyError as exc:  # a bug here, not the user's
        raise AssertionError(f"the suggested policy is not valid:\n{exc}\n{text}") from exc
    return text


def run_suggest(audit_log: str, *, policy: str | None, wildcards: bool) -> int:
    """The command: print the policy; exit 2 on input it cannot use."""
    try:
        text = suggest(audit_log, policy=policy, wildcards=wildcards)
    except SuggestError as exc:
        print(f"egress-agent suggest: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
