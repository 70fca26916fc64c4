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

Identity follows :func:`egress_agent.policy.decide.identify`: longest prefix
wins. nftables interval sets cannot hold overlapping elements, and a rule for a
broad workload would otherwise also catch a more specific workload's
addresses, so each workload's set holds its CIDRs minus the more specific CIDRs
of other workloads (:func:`identity_networks`).

Rule comments are the names users see in ``nft list`` and in the agent's
counters; :func:`counted_rule` says what each counted rule counts.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from egress_agent.policy.model import (
    InterceptRule,
    IPNetwork,
    NonTcp,
    Policy,
    PortRange,
    Workload,
    by_cgroup,
)

TABLE = "egress_agent"
_SET_REF = re.compile(r'"@([A-Za-z0-9_]+)"')
FAMILY = "inet"
# Before the usual dstnat priority (-100) so the original destination is seen
# before other NAT (kube-proxy, Docker) rewrites it.
NAT_PRIORITY = -110
FILTER_PRIORITY = 0
# NF_IP_PRI_RAW: after defragmentation (NF_IP_PRI_CONNTRACK_DEFRAG, -400) and
# before conntrack (NF_IP_PRI_CONNTRACK, -200), include/uapi/linux/netfilter_ipv4.h.
RAW_PRIORITY = -300

# Chains (names users see in `nft list`).
REVERSE_PATH_CHAIN = "reverse_path"
OUTPUT_FILTER_CHAIN = "output_filter"
UNDIVERTED_TCP_CHAIN = "undiverted_tcp"
NON_TCP_CHAIN = "non_tcp"
# Sets: intercepted workloads' addresses, and the reverse-path interfaces.
WORKLOADS_SET = {"ip": "workloads_v4", "ip6": "workloads_v6"}
REVERSE_PATH_SET = "rp_interfaces"

# Rule comments that counters are read by.
REVERSE_PATH_COMMENT = "reverse-path check: source not routed back through its interface"
REVERSE_PATH_TO_WORKLOADS_COMMENT = "reverse-path check towards workloads"
SPOOFED_SOURCE_COMMENT = "spoofed source: an address of {} from another interface"
NON_TCP_RELATED_COMMENT = "non-TCP: ICMP errors about allowed flows pass"
NON_TCP_REPLY_COMMENT = "non-TCP: replies to flows opened from elsewhere pass"
BPF_NON_TCP_COMMENT = "non-TCP marked by the BPF classifier"

Json = dict[str, Any]
Selection = Literal["nft", "bpf"]

_PROTO = {"ip": "ipv4", "ip6": "ipv6"}


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

    sets: list[Json] = []
    nat_rules: list[tuple[Json, bool]] = []  # (rule, applies to locally generated traffic)
    cgroup_nat_rules: list[tuple[Json, str]] = []  # (rule, chain): output only
    undiverted: list[Json] = []  # chain undiverted_tcp (nft selection)
    non_tcp: list[Json] = []  # chain non_tcp: the drop rules' selections
    non_tcp_local = False  # some of them select locally generated traffic
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

    # Every intercepted workload's addresses, for the forward checks.
    intercepted = {
        w.name
        for w in policy.workloads
        if not by_cgroup(w) and any(w.name in rule.sources for rule in policy.intercept)
    }
    checked = bool(intercepted)
    if checked:
        union = identity_networks(policy, only=intercepted).values()
        all4 = ipaddress.collapse_addresses(n for v4, _ in union for n in v4)
        all6 = ipaddress.collapse_addresses(n for _, v6 in union for n in v6)
        sets.append(_set(WORKLOADS_SET["ip"], "ipv4_addr", _prefix_elems(all4)))
        sets.append(_set(WORKLOADS_SET["ip6"], "ipv6_addr", _prefix_elems(all6)))

    w_index_by_name = {w.name: i for i, w in enumerate(policy.workloads)}
    by_name = {w.name: w for w in policy.workloads}
    cgroup_marks = policy.cgroup_marks()
    for rule in policy.intercept:
        if not any(source in identities or source in cgroup_marks for source in rule.sources):
            continue  # BPF mode, no local source: nothing of this rule is rendered
        i = rule.index
        drops = rule.non_tcp is NonTcp.DROP
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
                local = not workload.interfaces
                origin: list[Json] = []
                if workload.interfaces:
                    origin.append(_match(_meta("iifname"), {"set": list(workload.interfaces)}))
                origin.append(_match(_payload(fam, "saddr"), f"@wl{w}_{suffix}"))
                exprs = list(origin)
                if to:
                    exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_to_{suffix}"))
                if ex:
                    exprs.append(_match(_payload(fam, "daddr"), f"@ic{i}_except_{suffix}", op="!="))
                if rule.ports:
                    exprs.append(_match(_payload("tcp", "dport"), f"@ic{i}_ports"))
                else:
                    exprs.append(_match(_meta("l4proto"), "tcp"))
                comment = f"intercept[{i}] from {source}"
                nat_rules.append(
                    (_rule_body([*exprs, {"counter": None}, _divert(policy, fam)], comment), local)
                )
                if selection == "nft":
                    undiverted.append(
                        _rule_body(
                            [*exprs, {"counter": None}, {"drop": None}],
                            f"{comment}: TCP not diverted",
                        )
                    )
                if drops:
                    dest = _original_destination(fam, i, to, ex)
                    non_tcp.append(
                        _rule_body(
                            [*origin, *dest, {"counter": None}, {"drop": None}],
                            f"{comment} non_tcp",
                        )
                    )
                    if selection == "nft":
                        # Untracked packets (conntrack leaves neighbour
                        # discovery alone, for one) have no entry to read
                        # the destination from: their headers say it.
                        untracked = [_match(_ct("state"), "untracked", op="in")]
                        if to:
                            untracked.append(_match(_payload(fam, "daddr"), f"@ic{i}_to_{suffix}"))
                        if ex:
                            untracked.append(
                                _match(_payload(fam, "daddr"), f"@ic{i}_except_{suffix}", op="!=")
                            )
                        non_tcp.append(
                            _rule_body(
                                [*origin, *untracked, {"counter": None}, {"drop": None}],
                                f"{comment} non_tcp",
                            )
                        )
                    non_tcp_local = non_tcp_local or local
            cgroup_rules = _cgroup_rules(policy, rule, cgroup_marks, fam, to, ex)
            cgroup_nat_rules += [(body, "output") for body in cgroup_rules]
            if drops:
                cgroup_drops = _cgroup_non_tcp_rules(policy, rule, cgroup_marks, fam, to, ex)
                non_tcp += cgroup_drops
                non_tcp_local = non_tcp_local or bool(cgroup_drops)

    bpf_non_tcp = selection == "bpf" and any(r.non_tcp is NonTcp.DROP for r in policy.intercept)
    by_interface = bool(policy.reverse_path_interfaces()) or any(
        w.pods is not None for w in policy.workloads
    )
    if by_interface:
        sets.append(
            _set(REVERSE_PATH_SET, "ifname", _interface_elems(policy.reverse_path_interfaces()))
        )

    chains = []
    if by_interface or checked:
        chains.append(_chain(REVERSE_PATH_CHAIN, "filter", "prerouting", RAW_PRIORITY))
    chains += [
        _chain("prerouting", "nat", "prerouting", NAT_PRIORITY),
        _chain("output", "nat", "output", NAT_PRIORITY),
        _chain("input", "filter", "input", FILTER_PRIORITY),
        _chain("forward", "filter", "forward", FILTER_PRIORITY),
    ]
    if non_tcp_local:
        chains.append(_chain(OUTPUT_FILTER_CHAIN, "filter", "output", FILTER_PRIORITY))
    if undiverted:
        chains.append(_regular_chain(UNDIVERTED_TCP_CHAIN))
    if non_tcp or bpf_non_tcp:
        chains.append(_regular_chain(NON_TCP_CHAIN))
    cmds += [{"add": {"chain": c}} for c in chains]

    rules: list[Json] = []
    misrouted = _match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False)
    if by_interface:
        rules.append(
            _rule(
                REVERSE_PATH_CHAIN,
                [
                    _match(_meta("iifname"), f"@{REVERSE_PATH_SET}"),
                    misrouted,
                    {"counter": None},
                    {"drop": None},
                ],
                REVERSE_PATH_COMMENT,
            )
        )
    if selection == "nft":
        # A bound workload's address from another interface has no identity
        # (policy.decide.identify): it is dropped, not forwarded undiverted.
        # (The BPF classifier drops it at tc ingress on every interface.)
        for w_index, workload in enumerate(policy.workloads):
            if not workload.interfaces or workload.name not in identities:
                continue
            for fam, nets in zip(("ip", "ip6"), identities[workload.name], strict=True):
                if not nets:
                    continue
                suffix = "v4" if fam == "ip" else "v6"
                rules.append(
                    _rule(
                        REVERSE_PATH_CHAIN,
                        [
                            _match(_meta("iifname"), {"set": list(workload.interfaces)}, op="!="),
                            _match(_payload(fam, "saddr"), f"@wl{w_index}_{suffix}"),
                            {"counter": None},
                            {"drop": None},
                        ],
                        SPOOFED_SOURCE_COMMENT.format(workload.name),
                    )
                )
    if checked:
        # Whatever the interface: a packet towards a workload whose source
        # is not routed back through where it came from. A first packet
        # claiming to come from a server (a neighbour pod's, or the
        # workload's own) would otherwise open an entry whose reply
        # direction is the workload's connection to that server.
        for fam, proto in _PROTO.items():
            rules.append(
                _rule(
                    REVERSE_PATH_CHAIN,
                    [
                        _match(_payload(fam, "daddr"), f"@{WORKLOADS_SET[fam]}"),
                        misrouted,
                        {"counter": None},
                        {"drop": None},
                    ],
                    f"{REVERSE_PATH_TO_WORKLOADS_COMMENT} ({proto})",
                )
            )
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
    dmark = policy.proxy.divert_mark
    marked = _match({"&": [_meta("mark"), dmark]}, dmark)
    if selection == "bpf":
        for fam, proto in _PROTO.items():
            rules.append(
                _rule(
                    "prerouting",
                    [
                        marked,
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
    rules += _forward_checks(
        policy,
        selection=selection,
        checked=checked,
        undiverted=bool(undiverted),
        non_tcp=bool(non_tcp) and selection == "nft",
        bpf_non_tcp=bpf_non_tcp,
    )
    rules += [{"chain": UNDIVERTED_TCP_CHAIN, **body} for body in undiverted]
    if non_tcp or bpf_non_tcp:
        rules.append(
            _rule(
                NON_TCP_CHAIN,
                [_match(_ct("state"), "related", op="in"), {"accept": None}],
                NON_TCP_RELATED_COMMENT,
            )
        )
        rules.append(
            _rule(
                NON_TCP_CHAIN,
                [
                    _match(_ct("direction"), "reply"),
                    _match(_ct("state"), "established", op="in"),
                    {"accept": None},
                ],
                NON_TCP_REPLY_COMMENT,
            )
        )
        if bpf_non_tcp:
            rules.append(
                _rule(
                    NON_TCP_CHAIN,
                    [marked, {"counter": None}, {"drop": None}],
                    BPF_NON_TCP_COMMENT,
                )
            )
        rules += [{"chain": NON_TCP_CHAIN, **body} for body in non_tcp]
    if non_tcp_local:
        rules.append(
            _rule(
                OUTPUT_FILTER_CHAIN,
                [
                    _match(_meta("l4proto"), "tcp", op="!="),
                    # The node's own neighbour discovery is untracked.
                    _match(_ct("state"), "untracked", op="!="),
                    {"jump": {"target": NON_TCP_CHAIN}},
                ],
                "non-TCP of local workloads",
            )
        )
    rules += _connect_rules(policy, set_identities)
    if selection == "bpf":
        # Prerouting selects nothing by set any more: the classifier does.
        used = set(_SET_REF.findall(json.dumps(rules)))
        sets = [s for s in sets if s["name"] in used]
    cmds[4:4] = [{"add": {"set": s}} for s in sets]
    cmds += [{"add": {"rule": _in_table(r)}} for r in rules]
    return {"nftables": cmds}


def _forward_checks(
    policy: Policy,
    *,
    selection: Selection,
    checked: bool,
    undiverted: bool,
    non_tcp: bool,
    bpf_non_tcp: bool,
) -> list[Json]:
    """The ``forward`` rules after the fail-closed ones: ct invalid, TCP that
    was not DNAT-ed, AH, and the way into chain ``non_tcp``."""
    rules: list[Json] = []
    not_dnat = _match({"&": [_ct("status"), "dnat"]}, 0)
    original = _match(_ct("direction"), "original")
    # Without conntrack (a notrack rule) there is no NAT either.
    untracked = _match(_ct("state"), "untracked", op="in")
    reply_syn = [
        _match(_ct("direction"), "reply"),
        _match({"&": [_payload("tcp", "flags"), {"|": ["syn", "ack"]}]}, "syn"),
    ]
    if checked:
        for fam, proto in _PROTO.items():
            rules.append(
                _rule(
                    "forward",
                    [
                        _match(_payload(fam, "saddr"), f"@{WORKLOADS_SET[fam]}"),
                        _match(_ct("state"), "invalid", op="in"),
                        {"counter": None},
                        {"drop": None},
                    ],
                    f"invalid conntrack state from workloads ({proto})",
                )
            )
    if undiverted:
        for fam, proto in _PROTO.items():
            source = _match(_payload(fam, "saddr"), f"@{WORKLOADS_SET[fam]}")
            jump = {"jump": {"target": UNDIVERTED_TCP_CHAIN}}
            rules.append(
                _rule(
                    "forward",
                    [source, _match(_meta("l4proto"), "tcp"), not_dnat, original, jump],
                    f"workload TCP without NAT ({proto})",
                )
            )
            rules.append(
                _rule(
                    "forward",
                    [source, _match(_meta("l4proto"), "tcp"), not_dnat, *reply_syn, jump],
                    f"workload TCP SYN in a reply direction ({proto})",
                )
            )
            rules.append(
                _rule(
                    "forward",
                    [source, _match(_meta("l4proto"), "tcp"), untracked, jump],
                    f"untracked workload TCP ({proto})",
                )
            )
    if selection == "bpf" and checked:
        dmark = policy.proxy.divert_mark
        marked_tcp = [
            _match({"&": [_meta("mark"), dmark]}, dmark),
            _match(_meta("l4proto"), "tcp"),
            not_dnat,
        ]
        rules.append(
            _rule(
                "forward",
                [*marked_tcp, original, {"counter": None}, {"drop": None}],
                "TCP marked by the BPF classifier: not diverted",
            )
        )
        rules.append(
            _rule(
                "forward",
                [*marked_tcp, *reply_syn, {"counter": None}, {"drop": None}],
                "TCP SYN marked by the BPF classifier in a reply direction",
            )
        )
        rules.append(
            _rule(
                "forward",
                [*marked_tcp[:2], untracked, {"counter": None}, {"drop": None}],
                "TCP marked by the BPF classifier: untracked",
            )
        )
    if checked:
        for fam, proto in _PROTO.items():
            rules.append(
                _rule(
                    "forward",
                    [
                        _match(_payload(fam, "saddr"), f"@{WORKLOADS_SET[fam]}"),
                        _match(_meta("l4proto"), "ah"),
                        {"counter": None},
                        {"drop": None},
                    ],
                    f"AH from workloads ({proto})",
                )
            )
    if non_tcp:
        for fam, proto in _PROTO.items():
            rules.append(
                _rule(
                    "forward",
                    [
                        _match(_payload(fam, "saddr"), f"@{WORKLOADS_SET[fam]}"),
                        _match(_meta("l4proto"), "tcp", op="!="),
                        {"jump": {"target": NON_TCP_CHAIN}},
                    ],
                    f"non-TCP from workloads ({proto})",
                )
            )
    if bpf_non_tcp:
        dmark = policy.proxy.divert_mark
        rules.append(
            _rule(
                "forward",
                [
                    _match({"&": [_meta("mark"), dmark]}, dmark),
                    _match(_meta("l4proto"), "tcp", op="!="),
                    {"jump": {"target": NON_TCP_CHAIN}},
                ],
                BPF_NON_TCP_COMMENT,
            )
        )
    return rules


def _original_destination(
    fam: str, index: int, to: Sequence[IPNetwork], ex: Sequence[IPNetwork]
) -> list[Json]:
    """A drop rule's destinations matched on the conntrack entry's original
    destination: what the workload addressed, before any DNAT (kube-proxy's
    for a Service address, say), as the policy and the BPF classifier see it."""
    suffix = "v4" if fam == "ip" else "v6"
    dst = {"ct": {"key": f"{fam} daddr", "dir": "original"}}
    exprs: list[Json] = []
    if to:
        exprs.append(_match(dst, f"@ic{index}_to_{suffix}"))
    if ex:
        exprs.append(_match(dst, f"@ic{index}_except_{suffix}", op="!="))
    return exprs


@dataclass(frozen=True, kw_only=True)
class CountedRule:
    """What a counted rule of the table counts: ``kind`` is ``diverted`` (a
    DNAT to the proxy) or ``dropped`` (a drop or reject), ``reason`` says why."""

    kind: Literal["diverted", "dropped"]
    reason: str


def counted_rule(chain: str, comment: str, exprs: Sequence[Json]) -> CountedRule | None:
    """Classify one rule of the kernel's table (as ``nft -j list`` shows it),
    or None for rules without a counter or verdict worth counting."""
    verdicts = {key for e in exprs for key in e}
    if "counter" not in verdicts:
        return None
    if "dnat" in verdicts:
        return CountedRule(kind="diverted", reason=chain)
    if not verdicts & {"drop", "reject"}:
        return None
    if chain == REVERSE_PATH_CHAIN and comment.startswith("spoofed source"):
        reason = "spoofed_source"
    elif chain == REVERSE_PATH_CHAIN:
        reason = "reverse_path"
    elif chain == UNDIVERTED_TCP_CHAIN or comment.startswith("TCP "):
        reason = "tcp_not_diverted"
    elif chain == NON_TCP_CHAIN:
        reason = "non_tcp"
    elif comment.startswith("invalid conntrack state"):
        reason = "ct_invalid"
    elif comment.startswith("AH from"):
        reason = "ah"
    elif comment.startswith("direct connections to the proxy port"):
        reason = "proxy_port_direct"
    elif comment.startswith("diverted traffic never leaves"):
        reason = "fail_closed"
    elif comment.startswith("CONNECT listener refuses"):
        reason = "connect_not_workload"
    else:
        reason = "other"
    return CountedRule(kind="dropped", reason=reason)


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


def _cgroup_non_tcp_rules(
    policy: Policy,
    rule: InterceptRule,
    marks: dict[str, int],
    fam: str,
    to: Sequence[IPNetwork],
    ex: Sequence[IPNetwork],
) -> list[Json]:
    """Chain ``non_tcp`` rules for a drop rule's cgroup workloads (locally
    generated traffic, identified by the socket mark)."""
    mask = policy.proxy.cgroup_mark_mask
    out = []
    for source in rule.sources:
        if source not in marks:
            continue
        exprs: list[Json] = [
            _match({"&": [_meta("mark"), mask]}, marks[source]),
            _match(_meta("nfproto"), _PROTO[fam]),
            *_original_destination(fam, rule.index, to, ex),
            {"counter": None},
            {"drop": None},
        ]
        out.append(
            _rule_body(exprs, f"intercept[{rule.index}] from {source} non_tcp (cgroup mark)")
        )
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


def _interface_elems(names: Iterable[str]) -> list[str]:
    """Interface names and ``prefix*`` patterns for an interval set: one a
    pattern covers is left out (the set would refuse it as an overlapping
    interval: ``pod*`` holds ``pod1-pa``), and so is a pattern a shorter one
    covers."""
    names = list(dict.fromkeys(names))
    prefixes = [n[:-1] for n in names if n.endswith("*")]

    def covered(name: str) -> bool:
        own = name[:-1] if name.endswith("*") else None
        return any(name.startswith(p) and p != own for p in prefixes)

    return [n for n in names if not covered(n)]


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


def _regular_chain(name: str) -> Json:
    """A chain without a hook: only reached by ``jump`` from the base chains."""
    return {"family": FAMILY, "table": TABLE, "name": name}


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


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


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
