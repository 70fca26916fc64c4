"""Render a policy into one nftables JSON document for ``table inet egress_agent``.

A pure function: the same policy always gives the same document (golden-tested).
The document replaces the table whole in one transaction: add (so that the
delete also works on the first run), delete, add again with everything in it.

What the ruleset does (``nft list table inet egress_agent`` shows the same):

* ``reverse_path`` (filter, prerouting, priority -300: after conntrack's
  defragmentation at -400, before conntrack itself at -200) drops packets
  whose source address is not routed back through the interface they
  arrived on (``fib saddr . iif oif missing``, IPv4 and IPv6): all packets
  on a workload's interface (or one ``reverse_path`` names), and packets
  towards a workload on any interface. A spoofed packet never reaches
  conntrack, so it cannot leave an entry that a later connection of the
  workload would inherit without NAT.
* ``prerouting`` (nat, before kube-proxy's dstnat) diverts forwarded traffic
  of workloads; ``output`` (nat) does the same for locally generated traffic.
  Diverting is a DNAT to the proxy's own address and port, not ``redirect``:
  redirect rewrites to the ingress interface's primary address and drops the
  packet when that interface has none (pod-facing veths often have none).
* Traffic already addressed to the proxy and the proxy's own upstream
  connections (they carry ``upstream_mark``) are never diverted: no loops.
* ``input`` refuses connections to the proxy port that were not diverted
  (``ct status dnat`` unset), so nobody can use the proxy directly.
* ``forward`` (filter) refuses anything DNAT-ed to the proxy that would leave
  the node, should the proxy's address be missing: diverted traffic fails
  closed. Then, for packets from workloads: ``ct state invalid`` is dropped;
  workload TCP that the prerouting selection diverts but whose conntrack
  entry was not DNAT-ed is dropped (chain ``undiverted_tcp``; NAT is decided
  once per entry, so an entry made by a crafted first packet would
  otherwise carry the workload's real connection past the proxy); AH is
  dropped (nftables' ``meta l4proto`` and ``tcp`` stop at an AH header,
  conntrack tracks the TCP behind it); and non-TCP traffic under an
  intercept rule with ``non_tcp: drop`` goes to chain ``non_tcp``.
* ``non_tcp`` lets ICMP errors about allowed flows (``ct state related``)
  and replies to flows opened from elsewhere (``ct direction reply``,
  established) pass, and drops the rest of what a drop rule names, with a
  counter per rule. ``output_filter`` sends local workloads' non-TCP there.
* With a CONNECT listener (``connect.port``), ``input`` accepts connections
  to that port on the proxy's addresses from workloads only (with their
  interfaces, when bound) and resets everyone else's: identity on the explicit
  path is by source address too.

Which TCP packets the forward check looks at: a workload's packets in the
original direction of an entry without NAT, TCP SYNs (no ACK) in the reply
direction, and untracked ones (a notrack rule: no NAT without conntrack).
Matching is by packet headers (interface, source, destination, port), as
prerouting selects, so a connection on an entry pre-seeded in the reply
direction (a SYN claiming to come from the server) is caught too; other
reply-direction packets are the workload's answers to connections opened
from outside and pass. An entry can only be pre-seeded in the reply
direction by a packet towards the workload with the server's address,
which the reverse-path check drops wherever it arrives.

Non-TCP drop rules match the entry's original destination (what the
workload addressed, before kube-proxy's DNAT), and, for untracked packets
(conntrack leaves IPv6 neighbour discovery alone), the headers' one.

Identity follows :func:`egress_agent.policy.decide.identify`: each
workload's set holds its addresses under longest-prefix identity
(``identity.identity_networks``).

This module writes the sets, the chains and the diverting rules; the
checks (reverse path, forward, non-TCP) are in ``checks``, the JSON
vocabulary in ``nft``. Rule comments are the names users see in ``nft
list`` and in the agent's counters; ``checks.counted_rule`` says what each
counted rule counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from egress_agent.policy.model import (
    InterceptRule,
    IPNetwork,
    NonTcp,
    Policy,
    Workload,
    by_cgroup,
)
from egress_agent.rules import checks
from egress_agent.rules.checks import (
    NON_TCP_CHAIN,
    OUTPUT_FILTER_CHAIN,
    REVERSE_PATH_CHAIN,
    REVERSE_PATH_SET,
    UNDIVERTED_TCP_CHAIN,
    WORKLOADS_SET,
)
from egress_agent.rules.identity import Identities, identity_networks
from egress_agent.rules.nft import (
    FAMILY,
    PROTO,
    TABLE,
    Json,
    addr_type,
    base_chain,
    ct,
    divert,
    in_table,
    interface_elems,
    marked,
    match,
    meta,
    nft_set,
    payload,
    port_elems,
    prefix_elems,
    proxy_addr,
    regular_chain,
    rule,
    rule_body,
    split_families,
    suffix,
)

_SET_REF = re.compile(r'"@([A-Za-z0-9_]+)"')
# Before the usual dstnat priority (-100) so the original destination is seen
# before other NAT (kube-proxy, Docker) rewrites it.
NAT_PRIORITY = -110
FILTER_PRIORITY = 0
# NF_IP_PRI_RAW: after defragmentation (NF_IP_PRI_CONNTRACK_DEFRAG, -400) and
# before conntrack (NF_IP_PRI_CONNTRACK, -200), include/uapi/linux/netfilter_ipv4.h.
RAW_PRIORITY = -300

Selection = Literal["nft", "bpf"]


def render_ruleset(policy: Policy, *, selection: Selection = "nft") -> Json:
    """The whole nftables document that makes the kernel divert as ``policy`` says.

    ``selection="bpf"``: the tc classifier has already chosen forwarded
    packets and marked them with ``proxy.divert_mark`` (TCP to divert, and
    non-TCP that a ``non_tcp: drop`` rule names); prerouting only matches
    that mark and DNATs, and ``forward`` drops by the mark. Locally generated
    traffic keeps its nftables selection in ``output``: no BPF hook runs
    before nat OUTPUT with the source address chosen (tc egress and
    cgroup_skb egress run after POSTROUTING, cgroup connect before the source
    address is picked), so only the sets those output rules use are
    rendered. Workloads given by ``pods`` get no output rules there: a pod's
    traffic always arrives through its veth (host-network pods never match a
    workload).
    """
    cmds: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    table = {"family": FAMILY, "name": TABLE}
    cmds += [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]

    bpf = selection == "bpf"
    if bpf:
        local_names = {w.name for w in policy.workloads if not w.interfaces and w.pods is None}
        wanted = local_names & {name for r in policy.intercept for name in r.sources}
        identities = identity_networks(policy, only=wanted)
    else:
        identities = identity_networks(policy)
    # The CONNECT listener's input rules admit every workload by set, in
    # either mode.
    set_identities = identity_networks(policy) if policy.connect is not None else identities
    sets: list[Json] = []
    for w_index, workload in enumerate(policy.workloads):
        if workload.name not in set_identities:
            continue
        v4, v6 = set_identities[workload.name]
        sets.append(nft_set(f"wl{w_index}_v4", "ipv4_addr", prefix_elems(v4)))
        sets.append(nft_set(f"wl{w_index}_v6", "ipv6_addr", prefix_elems(v6)))
    checked = _workloads_sets(policy, sets)
    sel = _intercept(policy, identities, bpf=bpf)
    sets += sel.sets
    bpf_non_tcp = bpf and any(r.non_tcp is NonTcp.DROP for r in policy.intercept)
    by_interface = bool(policy.reverse_path_interfaces()) or any(
        w.pods is not None for w in policy.workloads
    )
    if by_interface:
        sets.append(
            nft_set(REVERSE_PATH_SET, "ifname", interface_elems(policy.reverse_path_interfaces()))
        )

    chains = []
    if by_interface or checked:
        chains.append(base_chain(REVERSE_PATH_CHAIN, "filter", "prerouting", RAW_PRIORITY))
    chains += [
        base_chain("prerouting", "nat", "prerouting", NAT_PRIORITY),
        base_chain("output", "nat", "output", NAT_PRIORITY),
        base_chain("input", "filter", "input", FILTER_PRIORITY),
        base_chain("forward", "filter", "forward", FILTER_PRIORITY),
    ]
    if sel.non_tcp_local:
        chains.append(base_chain(OUTPUT_FILTER_CHAIN, "filter", "output", FILTER_PRIORITY))
    if sel.undiverted:
        chains.append(regular_chain(UNDIVERTED_TCP_CHAIN))
    if sel.non_tcp or bpf_non_tcp:
        chains.append(regular_chain(NON_TCP_CHAIN))
    cmds += [{"add": {"chain": c}} for c in chains]

    rules = checks.reverse_path_rules(
        policy, identities, by_interface=by_interface, checked=checked, spoofed_sources=not bpf
    )
    rules += _nat_rules(policy, sel, bpf=bpf)
    rules += _proxy_port_rules(policy)
    rules += checks.forward_checks(
        policy,
        bpf=bpf,
        checked=checked,
        undiverted=bool(sel.undiverted),
        non_tcp=bool(sel.non_tcp) and not bpf,
        bpf_non_tcp=bpf_non_tcp,
    )
    rules += [{"chain": UNDIVERTED_TCP_CHAIN, **body} for body in sel.undiverted]
    if sel.non_tcp or bpf_non_tcp:
        rules += checks.non_tcp_chain_rules(policy, bpf_non_tcp=bpf_non_tcp)
        rules += [{"chain": NON_TCP_CHAIN, **body} for body in sel.non_tcp]
    if sel.non_tcp_local:
        rules.append(checks.output_filter_rule())
    rules += _connect_rules(policy, set_identities)
    if bpf:
        # Prerouting selects nothing by set any more: the classifier does.
        used = set(_SET_REF.findall(json.dumps(rules)))
        sets = [s for s in sets if s["name"] in used]
    cmds[4:4] = [{"add": {"set": s}} for s in sets]
    cmds += [{"add": {"rule": in_table(r)}} for r in rules]
    return {"nftables": cmds}


def _workloads_sets(policy: Policy, sets: list[Json]) -> bool:
    """Add every intercepted workload's addresses, for the checks; whether
    there are any."""
    intercepted = {
        w.name
        for w in policy.workloads
        if not by_cgroup(w) and any(w.name in r.sources for r in policy.intercept)
    }
    if not intercepted:
        return False
    union = identity_networks(policy, only=intercepted).values()
    nets: list[IPNetwork] = [n for v4, _ in union for n in v4]
    nets += [n for _, v6 in union for n in v6]
    all4, all6 = split_families(nets)
    sets.append(nft_set(WORKLOADS_SET["ip"], "ipv4_addr", prefix_elems(all4)))
    sets.append(nft_set(WORKLOADS_SET["ip6"], "ipv6_addr", prefix_elems(all6)))
    return True


@dataclass
class _Selection:
    """What the intercept rules render to, before it is put in order."""

    sets: list[Json] = field(default_factory=list)
    nat: list[tuple[Json, bool]] = field(default_factory=list)  # (rule, locally generated too)
    cgroup_nat: list[Json] = field(default_factory=list)  # chain output only
    undiverted: list[Json] = field(default_factory=list)  # chain undiverted_tcp (nft selection)
    non_tcp: list[Json] = field(default_factory=list)  # chain non_tcp: the drop rules' own
    non_tcp_local: bool = False  # some of them select locally generated traffic


def _intercept(policy: Policy, identities: Identities, *, bpf: bool) -> _Selection:
    sel = _Selection()
    cgroup_marks = policy.cgroup_marks()
    by_name = {w.name: (w_index, w) for w_index, w in enumerate(policy.workloads)}
    for rule_ in policy.intercept:
        if not any(source in identities or source in cgroup_marks for source in rule_.sources):
            continue  # BPF mode, no local source: nothing of this rule is rendered
        i = rule_.index
        to4, to6 = split_families(rule_.to_cidrs)
        ex4, ex6 = split_families(rule_.except_cidrs)
        if rule_.ports:
            sel.sets.append(nft_set(f"ic{i}_ports", "inet_service", port_elems(rule_.ports)))
        for fam, to, ex in (("ip", to4, ex4), ("ip6", to6, ex6)):
            if rule_.to_cidrs and not to:
                continue  # destinations restricted to the other family only
            if to:
                sel.sets.append(
                    nft_set(f"ic{i}_to_{suffix(fam)}", addr_type(fam), prefix_elems(to))
                )
            if ex:
                sel.sets.append(
                    nft_set(f"ic{i}_except_{suffix(fam)}", addr_type(fam), prefix_elems(ex))
                )
            _address_rules(policy, rule_, identities, by_name, sel, fam, to, ex, bpf=bpf)
            _cgroup_rules(policy, rule_, cgroup_marks, sel, fam, to, ex)
    return sel


def _address_rules(
    policy: Policy,
    rule_: InterceptRule,
    identities: Identities,
    by_name: dict[str, tuple[int, Workload]],
    sel: _Selection,
    fam: str,
    to: Sequence[IPNetwork],
    ex: Sequence[IPNetwork],
    *,
    bpf: bool,
) -> None:
    """The rule's address workloads: diverting, the undiverted check, non-TCP drops."""
    i = rule_.index
    for source in rule_.sources:
        w_index, workload = by_name[source]
        if source not in identities or not identities[source][0 if fam == "ip" else 1]:
            continue
        local = not workload.interfaces
        origin: list[Json] = []
        if workload.interfaces:
            origin.append(match(meta("iifname"), {"set": list(workload.interfaces)}))
        origin.append(match(payload(fam, "saddr"), f"@wl{w_index}_{suffix(fam)}"))
        daddr = _destinations(lambda: payload(fam, "daddr"), fam, i, to, ex)
        exprs = [*origin, *daddr, _ports(rule_)]
        comment = f"intercept[{i}] from {source}"
        sel.nat.append(
            (rule_body([*exprs, {"counter": None}, divert(policy, fam)], comment), local)
        )
        if not bpf:
            sel.undiverted.append(
                rule_body(
                    [*exprs, {"counter": None}, {"drop": None}], f"{comment}: TCP not diverted"
                )
            )
        if rule_.non_tcp is not NonTcp.DROP:
            continue
        dest = _destinations(lambda: _original_daddr(fam), fam, i, to, ex)
        sel.non_tcp.append(
            rule_body([*origin, *dest, {"counter": None}, {"drop": None}], f"{comment} non_tcp")
        )
        if not bpf:
            # Untracked packets (conntrack leaves neighbour discovery alone,
            # for one) have no entry to read the destination from: their
            # headers say it.
            untracked = [
                match(ct("state"), "untracked", op="in"),
                *_destinations(lambda: payload(fam, "daddr"), fam, i, to, ex),
            ]
            sel.non_tcp.append(
                rule_body(
                    [*origin, *untracked, {"counter": None}, {"drop": None}], f"{comment} non_tcp"
                )
            )
        sel.non_tcp_local = sel.non_tcp_local or local


def _cgroup_rules(
    policy: Policy,
    rule_: InterceptRule,
    marks: dict[str, int],
    sel: _Selection,
    fam: str,
    to: Sequence[IPNetwork],
    ex: Sequence[IPNetwork],
) -> None:
    """The rule's cgroup workloads: their sockets carry the workload's mark
    (set at socket creation by bpf/cgroup_mark.bpf.c), so the mark under
    ``cgroup_mark_mask`` is the identity; the rest is the rule's
    destinations and ports as for address workloads. Output-chain rules
    divert; a drop rule's non-TCP drops go to chain ``non_tcp``."""
    mask = policy.proxy.cgroup_mark_mask
    i = rule_.index
    drops: list[Json] = []
    for source in rule_.sources:
        if source not in marks:
            continue
        comment = f"intercept[{i}] from {source}"

        def identity(source: str = source) -> list[Json]:
            return [
                match({"&": [meta("mark"), mask]}, marks[source]),
                match(meta("nfproto"), PROTO[fam]),
            ]

        daddr = _destinations(lambda: payload(fam, "daddr"), fam, i, to, ex)
        exprs = [*identity(), *daddr, _ports(rule_), {"counter": None}, divert(policy, fam)]
        sel.cgroup_nat.append(rule_body(exprs, f"{comment} (cgroup mark)"))
        if rule_.non_tcp is NonTcp.DROP:
            dest = _destinations(lambda: _original_daddr(fam), fam, i, to, ex)
            exprs = [*identity(), *dest, {"counter": None}, {"drop": None}]
            drops.append(rule_body(exprs, f"{comment} non_tcp (cgroup mark)"))
    sel.non_tcp += drops
    sel.non_tcp_local = sel.non_tcp_local or bool(drops)


def _destinations(
    left: Callable[[], Json], fam: str, index: int, to: Sequence[IPNetwork], ex: Sequence[IPNetwork]
) -> list[Json]:
    """A rule's destinations (its to and except sets) matched on ``left``."""
    exprs: list[Json] = []
    if to:
        exprs.append(match(left(), f"@ic{index}_to_{suffix(fam)}"))
    if ex:
        exprs.append(match(left(), f"@ic{index}_except_{suffix(fam)}", op="!="))
    return exprs


def _original_daddr(fam: str) -> Json:
    """The conntrack entry's original destination: what the workload
    addressed, before any DNAT (kube-proxy's for a Service address, say),
    as the policy and the BPF classifier see it."""
    return {"ct": {"key": f"{fam} daddr", "dir": "original"}}


def _ports(rule_: InterceptRule) -> Json:
    if rule_.ports:
        return match(payload("tcp", "dport"), f"@ic{rule_.index}_ports")
    return match(meta("l4proto"), "tcp")


def _nat_rules(policy: Policy, sel: _Selection, *, bpf: bool) -> list[Json]:
    """Chains ``prerouting`` and ``output``: what is never diverted, then what is."""
    rules: list[Json] = []
    # Never divert what is already addressed to the proxy (a loop), in either hook.
    for chain in ("prerouting", "output"):
        for fam in ("ip", "ip6"):
            rules.append(
                rule(
                    chain,
                    [match(payload(fam, "daddr"), proxy_addr(policy, fam)), {"return": None}],
                    "traffic to the proxy itself",
                )
            )
    # The proxy's own upstream connections carry the mark: they leave as they are.
    rules.append(
        rule("output", [marked(policy.proxy.upstream_mark), {"return": None}],
             "proxy upstream connections")
    )  # fmt: skip
    if bpf:
        for fam, proto in PROTO.items():
            rules.append(
                rule(
                    "prerouting",
                    [
                        marked(policy.proxy.divert_mark),
                        match(meta("nfproto"), proto),
                        match(meta("l4proto"), "tcp"),
                        {"counter": None},
                        divert(policy, fam),
                    ],
                    f"marked by the BPF classifier ({proto})",
                )
            )
    for body, local in sel.nat:
        if not bpf:
            rules.append({"chain": "prerouting", **body})
        if local:
            # Locally generated traffic has no ingress interface, so workloads
            # bound to interfaces are matched for forwarded traffic only.
            rules.append({"chain": "output", **body})
    rules += [{"chain": "output", **body} for body in sel.cgroup_nat]
    return rules


def _proxy_port_rules(policy: Policy) -> list[Json]:
    """Only diverted connections reach the proxy port; none leaves the node."""
    rules: list[Json] = []
    for fam in ("ip", "ip6"):

        def to_proxy(fam: str = fam) -> list[Json]:
            return [
                match(payload(fam, "daddr"), proxy_addr(policy, fam)),
                match(payload("tcp", "dport"), policy.proxy.port),
            ]

        accept: list[Json] = [match(ct("status"), "dnat", op="in"), {"accept": None}]
        rules.append(rule("input", [*to_proxy(), *accept], "diverted connections reach the proxy"))
        for chain, comment in (
            ("input", "direct connections to the proxy port are refused"),
            ("forward", "diverted traffic never leaves the node (fail closed)"),
        ):
            refuse: list[Json] = [{"counter": None}, {"reject": {"type": "tcp reset"}}]
            rules.append(rule(chain, [*to_proxy(), *refuse], comment))
    return rules


def _connect_rules(policy: Policy, identities: Identities) -> list[Json]:
    """``input`` rules for the explicit CONNECT listener: workloads in, the rest reset."""
    if policy.connect is None:
        return []
    rules: list[Json] = []
    for fam in ("ip", "ip6"):
        to_listener = [
            match(payload(fam, "daddr"), proxy_addr(policy, fam)),
            match(payload("tcp", "dport"), policy.connect.port),
        ]
        for w_index, workload in enumerate(policy.workloads):
            if not identities[workload.name][0 if fam == "ip" else 1]:
                continue
            exprs: list[Json] = []
            if workload.interfaces:
                exprs.append(match(meta("iifname"), {"set": list(workload.interfaces)}))
            exprs += [*to_listener, match(payload(fam, "saddr"), f"@wl{w_index}_{suffix(fam)}")]
            exprs.append({"accept": None})
            rules.append(rule("input", exprs, f"CONNECT listener from {workload.name}"))
        rules.append(
            rule(
                "input",
                [*to_listener, {"counter": None}, {"reject": {"type": "tcp reset"}}],
                "CONNECT listener refuses sources that are no workload",
            )
        )
    return rules


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
