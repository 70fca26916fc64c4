"""Render a policy into one nftables JSON document for ``table inet egress_agent``.

A pure function: the same policy always gives the same document (golden-tested).
The document replaces the table whole in one transaction: add (so that the
delete also works on the first run), delete, add again with everything in it.

What the ruleset does (``nft list table inet egress_agent`` shows the same):

* ``prerouting`` (nat, before kube-proxy's dstnat) diverts forwarded traffic
  of workloads; ``output`` (nat) does the same for locally generated traffic.
  Diverting is a DNAT to the proxy's own address and port, not ``redirect``:
  redirect rewrites to the ingress interface's primary address and drops the
  packet when that interface has none (pod-facing veths often have none).
* Traffic already addressed to the proxy and the proxy's own upstream
  connections (they carry ``upstream_mark``) are never diverted: no loops.
* ``input`` refuses connections to the proxy port that were not diverted
  (``ct status dnat`` unset), so nobody can use the proxy directly.
* ``forward`` refuses anything DNAT-ed to the proxy that would leave the node,
  should the proxy's address be missing: diverted traffic fails closed.
* With a CONNECT listener (``connect.port``), ``input`` accepts connections
  to that port on the proxy's addresses from workloads only (with their
  interfaces, when bound) and resets everyone else's: identity on the explicit
  path is by source address too.

Identity follows :func:`egress_agent.policy.decide.identify`: longest prefix
wins. nftables interval sets cannot hold overlapping elements, and a rule for a
broad workload would otherwise also catch a more specific workload's
addresses, so each workload's set holds its CIDRs minus the more specific CIDRs
of other workloads (:func:`identity_networks`).
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from egress_agent.policy.model import InterceptRule, IPNetwork, Policy, PortRange, Workload

TABLE = "egress_agent"
_SET_REF = re.compile(r'"@([A-Za-z0-9_]+)"')
FAMILY = "inet"
# Before the usual dstnat priority (-100) so the original destination is seen
# before other NAT (kube-proxy, Docker) rewrites it.
NAT_PRIORITY = -110
FILTER_PRIORITY = 0

Json = dict[str, Any]
Selection = Literal["nft", "bpf"]


def render_ruleset(policy: Policy, *, selection: Selection = "nft") -> Json:
    """The whole nftables document that makes the kernel divert as ``policy`` says.

    ``selection="bpf"``: the tc classifier has already chosen forwarded
    packets and marked them with ``proxy.divert_mark``; prerouting only
    matches that mark and DNATs. Locally generated traffic keeps its
    nftables selection in ``output``: no BPF hook runs before nat OUTPUT with
    the source address chosen (tc egress and cgroup_skb egress run after
    POSTROUTING, cgroup connect before the source address is picked), so only
    the sets those output rules use are rendered. Workloads given by ``pods``
    get no output rules there: a pod's traffic always arrives through its
    veth (host-network pods never match a workload).
    """
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    table = {"family": FAMILY, "name": TABLE}
    cmds += [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]

    sets: list[Json] = []
    nat_rules: list[tuple[Json, bool]] = []  # (rule, applies to locally generated traffic)
    cgroup_nat_rules: list[tuple[Json, str]] = []  # (rule, chain): output only
    if selection == "bpf":
        local_names = {w.name for w in policy.workloads if not w.interfaces and w.pods is None}
        wanted = local_names & {name for rule in policy.intercept for name in rule.sources}
        identities = identity_networks(policy, only=wanted)
    else:
        identities = identity_networks(policy)
    # The CONNECT listener's input rules admit every workload by set, in
    # either mode.
    set_identities = identity_networks(policy) if policy.connect is not None else identities
    for w_index, workload in enumerate(policy.workloads):
        if workload.name not in set_identities:
            continue
        v4, v6 = set_identities[workload.name]
        sets.append(_set(f"wl{w_index}_v4", "ipv4_addr", _prefix_elems(v4)))
        sets.append(_set(f"wl{w_index}_v6", "ipv6_addr", _prefix_elems(v6)))

    w_index_by_name = {w.name: i for i, w in enumerate(policy.workloads)}
    by_name = {w.name: w for w in policy.workloads}
    cgroup_marks = policy.cgroup_marks()
    for rule in policy.intercept:
        if not any(source in identities or source in cgroup_marks for source in rule.sources):
            continue  # BPF mode, no local source: nothing of this rule is rendered
        i = rule.index
        to4, to6 = _split(rule.to_cidrs)
        ex4, ex6 = _split(rule.except_cidrs)
        if rule.ports:
            sets.append(_set(f"ic{i}_ports", "inet_service", _port_elems(rule.ports)))
        for fam, to, ex in (("ip", to4, ex4), ("ip6", to6, ex6)):
            suffix = "v4" if fam == "ip" else "v6"
            if rule.to_cidrs and not to:
                continue  # destinations restricted to the other family only
            if to:
                sets.append(_set(f"ic{i}_to_{suffix}", _addr_type(fam), _prefix_elems(to)))
            if ex:
                sets.append(_set(f"ic{i}_except_{suffix}", _addr_type(fam), _prefix_elems(ex)))
            for source in rule.sources:
                workload = by_name[source]
                w = w_index_by_name[source]
                if source not in identities or not identities[source][0 if fam == "ip" else 1]:
                    continue
                exprs: list[Json] = []
                if workload.interfaces:
                    exprs.append(_match(_meta("iifname"), {"set": list(workload.interfaces)}))
                exprs.append(_match(_payload(fam, "saddr"), f"@wl{w}_{suffix}"))
                if to:
                    exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_to_{suffix}"))
                if ex:
                    exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_except_{suffix}", op="!="))
                if rule.ports:
                    exprs.append(_match(_payload("tcp", "dport"), f"@ic{i}_ports"))
                else:
                    exprs.append(_match(_meta("l4proto"), "tcp"))
                exprs.append({"counter": None})
                exprs.append(_divert(policy, fam))
                comment = f"intercept[{i}] from {source}"
                nat_rules.append((_rule_body(exprs, comment), not workload.interfaces))
            cgroup_rules = _cgroup_rules(policy, rule, cgroup_marks, fam, to, ex)
            cgroup_nat_rules += [(body, "output") for body in cgroup_rules]

    chains = [
        _chain("prerouting", "nat", "prerouting", NAT_PRIORITY),
        _chain("output", "nat", "output", NAT_PRIORITY),
        _chain("input", "filter", "input", FILTER_PRIORITY),
        _chain("forward", "filter", "forward", FILTER_PRIORITY),
    ]
    cmds += [{"add": {"chain": c}} for c in chains]

    rules: list[Json] = []
    # Never divert what is already addressed to the proxy (a loop), in either hook.
    for chain in ("prerouting", "output"):
        for fam in ("ip", "ip6"):
            rules.append(
                _rule(
                    chain,
                    [_match(_payload(fam, "daddr"), _proxy_addr(policy, fam)), {"return": None}],
                    "traffic to the proxy itself",
                )
            )
    # The proxy's own upstream connections carry the mark: they leave as they are.
    mark = policy.proxy.upstream_mark
    rules.append(
        _rule(
            "output",
            [_match({"&": [_meta("mark"), mark]}, mark), {"return": None}],
            "proxy upstream connections",
        )
    )
    if selection == "bpf":
        dmark = policy.proxy.divert_mark
        for fam, proto in (("ip", "ipv4"), ("ip6", "ipv6")):
            rules.append(
                _rule(
                    "prerouting",
                    [
                        _match({"&": [_meta("mark"), dmark]}, dmark),
                        _match(_meta("nfproto"), proto),
                        _match(_meta("l4proto"), "tcp"),
                        {"counter": None},
                        _divert(policy, fam),
                    ],
                    f"marked by the BPF classifier ({proto})",
                )
            )
    for body, local in nat_rules:
        if selection == "nft":
            rules.append({"chain": "prerouting", **body})
        if local:
            # Locally generated traffic has no ingress interface, so workloads
            # bound to interfaces are matched for forwarded traffic only.
            rules.append({"chain": "output", **body})
    rules += [{"chain": chain, **body} for body, chain in cgroup_nat_rules]

    port = policy.proxy.port
    for fam in ("ip", "ip6"):
        to_proxy = [
            _match(_payload(fam, "daddr"), _proxy_addr(policy, fam)),
            _match(_payload("tcp", "dport"), port),
        ]
        rules.append(
            _rule(
                "input",
                [*to_proxy, _match({"ct": {"key": "status"}}, "dnat", op="in"), {"accept": None}],
                "diverted connections reach the proxy",
            )
        )
        rules.append(
            _rule(
                "input",
                [*to_proxy, {"counter": None}, {"reject": {"type": "tcp reset"}}],
                "direct connections to the proxy port are refused",
            )
        )
        rules.append(
            _rule(
                "forward",
                [*to_proxy, {"counter": None}, {"reject": {"type": "tcp reset"}}],
                "diverted traffic never leaves the node (fail closed)",
            )
        )
    rules += _connect_rules(policy, set_identities)
    if selection == "bpf":
        # Only the output chain (local traffic) and the CONNECT listener's
        # input rules still select by set; the classifier does the rest.
        referencing = [r for r in rules if r["chain"] in ("output", "input")]
        used = set(_SET_REF.findall(json.dumps(referencing)))
        sets = [s for s in sets if s["name"] in used]
    cmds[4:4] = [{"add": {"set": s}} for s in sets]
    cmds += [{"add": {"rule": _in_table(r)}} for r in rules]
    return {"nftables": cmds}


def _connect_rules(
    policy: Policy,
    identities: dict[str, tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]],
) -> list[Json]:
    """``input`` rules for the explicit CONNECT listener: workloads in, the rest reset."""
    if policy.connect is None:
        return []
    rules: list[Json] = []
    for fam in ("ip", "ip6"):
        suffix = "v4" if fam == "ip" else "v6"
        to_listener = [
            _match(_payload(fam, "daddr"), _proxy_addr(policy, fam)),
            _match(_payload("tcp", "dport"), policy.connect.port),
        ]
        for w_index, workload in enumerate(policy.workloads):
            if not identities[workload.name][0 if fam == "ip" else 1]:
                continue
            exprs: list[Json] = []
            if workload.interfaces:
                exprs.append(_match(_meta("iifname"), {"set": list(workload.interfaces)}))
            exprs += [*to_listener, _match(_payload(fam, "saddr"), f"@wl{w_index}_{suffix}")]
            exprs.append({"accept": None})
            rules.append(_rule("input", exprs, f"CONNECT listener from {workload.name}"))
        rules.append(
            _rule(
                "input",
                [*to_listener, {"counter": None}, {"reject": {"type": "tcp reset"}}],
                "CONNECT listener refuses sources that are no workload",
            )
        )
    return rules


def _cgroup_rules(
    policy: Policy,
    rule: InterceptRule,
    marks: dict[str, int],
    fam: str,
    to: Sequence[IPNetwork],
    ex: Sequence[IPNetwork],
) -> list[Json]:
    """Output-chain rules for the rule's cgroup workloads: their sockets carry
    the workload's mark (set at socket creation by bpf/cgroup_mark.bpf.c), so
    the mark under ``cgroup_mark_mask`` is the identity; the rest is the
    rule's destinations and ports as for address workloads."""
    suffix = "v4" if fam == "ip" else "v6"
    mask = policy.proxy.cgroup_mark_mask
    i = rule.index
    out = []
    for source in rule.sources:
        if source not in marks:
            continue
        exprs: list[Json] = [
            _match({"&": [_meta("mark"), mask]}, marks[source]),
            _match(_meta("nfproto"), "ipv4" if fam == "ip" else "ipv6"),
        ]
        if to:
            exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_to_{suffix}"))
        if ex:
            exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_except_{suffix}", op="!="))
        if rule.ports:
            exprs.append(_match(_payload("tcp", "dport"), f"@ic{i}_ports"))
        else:
            exprs.append(_match(_meta("l4proto"), "tcp"))
        exprs.append({"counter": None})
        exprs.append(_divert(policy, fam))
        out.append(_rule_body(exprs, f"intercept[{i}] from {source} (cgroup mark)"))
    return out


def render_teardown() -> Json:
    """Remove the agent's table, and only it; succeeds whether or not it exists."""
    table = {"family": FAMILY, "name": TABLE}
    return {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"add": {"table": table}},
            {"delete": {"table": table}},
        ]
    }


def identity_networks(
    policy: Policy, *, only: set[str] | None = None
) -> dict[str, tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]]:
    """Each workload's addresses under longest-prefix identity, as disjoint,
    collapsed IPv4 and IPv6 network lists (for the workloads in ``only``, or all).

    The more specific CIDRs of other workloads inside a CIDR are found by a
    binary search over all CIDRs sorted by address (they lie in its address
    range), so 10,000 workloads cost n log n, not n squared."""
    if only is not None and not only:
        return {}
    owned = sorted(
        ((net.version, int(net.network_address), net.prefixlen, net, w.name)
         for w in policy.workloads for net in w.cidrs),
        key=lambda item: item[:3],
    )  # fmt: skip
    keys = [(version, start) for version, start, _, _, _ in owned]
    result: dict[str, tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]] = {}
    for workload in policy.workloads:
        if only is not None and workload.name not in only:
            continue
        pieces: list[IPNetwork] = []
        for net in workload.cidrs:
            first = int(net.network_address)
            last = int(net.broadcast_address)
            lo = bisect.bisect_left(keys, (net.version, first))
            hi = bisect.bisect_right(keys, (net.version, last))
            carved = [
                other
                for _, _, plen, other, owner in owned[lo:hi]
                if owner != workload.name and plen > net.prefixlen
            ]
            pieces.extend(_exclude(net, carved) if carved else [net])
        v4 = [n for n in pieces if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in pieces if isinstance(n, ipaddress.IPv6Network)]
        result[workload.name] = (
            list(ipaddress.collapse_addresses(v4)),
            list(ipaddress.collapse_addresses(v6)),
        )
    return result


def _exclude(net: IPNetwork, holes: Sequence[IPNetwork]) -> list[IPNetwork]:
    remaining: list[IPNetwork] = [net]
    for hole in holes:
        next_remaining: list[IPNetwork] = []
        for piece in remaining:
            if hole.subnet_of(piece):  # type: ignore[arg-type]
                next_remaining.extend(piece.address_exclude(hole))  # type: ignore[arg-type]
            elif piece.subnet_of(hole):  # type: ignore[arg-type]
                continue
            else:
                next_remaining.append(piece)
        remaining = next_remaining
    return remaining


def _split(
    nets: Iterable[IPNetwork],
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


def _prefix_elems(nets: Iterable[IPNetwork]) -> list[Any]:
    elems: list[Any] = []
    for n in nets:
        if n.prefixlen == n.max_prefixlen:
            elems.append(str(n.network_address))
        else:
            elems.append({"prefix": {"addr": str(n.network_address), "len": n.prefixlen}})
    return elems


def _port_elems(ports: Iterable[PortRange]) -> list[Any]:
    merged: list[PortRange] = []
    for r in sorted(ports):
        if merged and r.first <= merged[-1].last + 1:
            last = merged[-1]
            merged[-1] = PortRange(first=last.first, last=max(last.last, r.last))
        else:
            merged.append(r)
    return [r.first if r.first == r.last else {"range": [r.first, r.last]} for r in merged]


def _set(name: str, type_: str, elems: list[Any]) -> Json:
    s: Json = {"family": FAMILY, "table": TABLE, "name": name, "type": type_, "flags": ["interval"]}
    if elems:
        s["elem"] = elems
    return s


def _chain(name: str, type_: str, hook: str, prio: int) -> Json:
    return {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": type_,
        "hook": hook,
        "prio": prio,
        "policy": "accept",
    }


def _rule(chain: str, exprs: list[Json], comment: str) -> Json:
    return {"chain": chain, **_rule_body(exprs, comment)}


def _rule_body(exprs: list[Json], comment: str) -> Json:
    return {"expr": exprs, "comment": comment}


def _in_table(rule: Json) -> Json:
    return {"family": FAMILY, "table": TABLE, **rule}


def _match(left: Json, right: Any, *, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _addr_type(fam: str) -> str:
    return "ipv4_addr" if fam == "ip" else "ipv6_addr"


def _proxy_addr(policy: Policy, fam: str) -> str:
    return str(policy.proxy.address_v4 if fam == "ip" else policy.proxy.address_v6)


def _divert(policy: Policy, fam: str) -> Json:
    return {"dnat": {"family": fam, "addr": _proxy_addr(policy, fam), "port": policy.proxy.port}}


def workload_sets(policy: Policy) -> dict[str, Workload]:
    """Set name prefix -> workload, for people reading ``nft list`` output."""
    return {f"wl{i}": w for i, w in enumerate(policy.workloads)}
