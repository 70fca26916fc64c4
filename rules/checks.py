"""The table's checks: the rules that drop what must not pass, and what each
counted rule counts.

* ``reverse_path`` (:func:`reverse_path_rules`): sources not routed back
  through their interface, on the reverse-path interfaces and towards
  workloads anywhere; a bound workload's address from another interface.
* ``forward`` after the fail-closed rules (:func:`forward_checks`): ct
  invalid, workload TCP that was not DNAT-ed (chain ``undiverted_tcp``, or by
  the BPF classifier's mark), AH, and the way into chain ``non_tcp``.
* chain ``non_tcp``'s first rules (:func:`non_tcp_chain_rules`) and the jump
  there for local workloads (:func:`output_filter_rule`).

:func:`counted_rule` reads a rule back from the kernel by its chain and
comment, so the comments here are part of the interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from egress_agent.policy.model import Policy
from egress_agent.rules.identity import Identities
from egress_agent.rules.nft import (
    PROTO,
    Json,
    ct,
    marked,
    match,
    meta,
    payload,
    rule,
    suffix,
)

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

# Expressions are built afresh for every rule: the document is plain data
# its users may change.


def _count_drop() -> list[Json]:
    return [{"counter": None}, {"drop": None}]


def _misrouted() -> Json:
    return match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False)


def _tcp(op: str = "==") -> Json:
    return match(meta("l4proto"), "tcp", op=op)


def _undiverted() -> list[tuple[list[Json], str, str]]:
    """The conntrack states in which workload TCP has not been diverted: the
    original direction of an entry without NAT, a SYN (no ACK) in the reply
    direction of one, and no entry at all (a notrack rule: no NAT either).
    Each with what the nftables selection's rule and the BPF one's say."""
    return [
        (
            [match({"&": [ct("status"), "dnat"]}, 0), match(ct("direction"), "original")],
            "workload TCP without NAT",
            "TCP marked by the BPF classifier: not diverted",
        ),
        (
            [
                match({"&": [ct("status"), "dnat"]}, 0),
                match(ct("direction"), "reply"),
                match({"&": [payload("tcp", "flags"), {"|": ["syn", "ack"]}]}, "syn"),
            ],
            "workload TCP SYN in a reply direction",
            "TCP SYN marked by the BPF classifier in a reply direction",
        ),
        (
            [match(ct("state"), "untracked", op="in")],
            "untracked workload TCP",
            "TCP marked by the BPF classifier: untracked",
        ),
    ]


def _workloads(fam: str, field: str) -> Json:
    """The packet's ``field`` address is an intercepted workload's."""
    return match(payload(fam, field), f"@{WORKLOADS_SET[fam]}")


def _per_family(chain: str, field: str, tail: list[Json], comment: str) -> list[Json]:
    """One rule per address family for packets from (``saddr``) or to
    (``daddr``) intercepted workloads."""
    return [
        rule(chain, [_workloads(fam, field), *tail], f"{comment} ({proto})")
        for fam, proto in PROTO.items()
    ]


def reverse_path_rules(
    policy: Policy,
    identities: Identities,
    *,
    by_interface: bool,
    checked: bool,
    spoofed_sources: bool,
) -> list[Json]:
    """Chain ``reverse_path``: the interfaces' check, bound workloads'
    addresses from elsewhere (``spoofed_sources``), packets towards workloads."""
    rules: list[Json] = []
    if by_interface:
        rules.append(
            rule(
                REVERSE_PATH_CHAIN,
                [match(meta("iifname"), f"@{REVERSE_PATH_SET}"), _misrouted(), *_count_drop()],
                REVERSE_PATH_COMMENT,
            )
        )
    if spoofed_sources:
        # A bound workload's address from another interface has no identity
        # (policy.decide.identify): it is dropped, not forwarded undiverted.
        # (The BPF classifier drops it at tc ingress on every interface.)
        for w_index, workload in enumerate(policy.workloads):
            if not workload.interfaces or workload.name not in identities:
                continue
            for fam, nets in zip(("ip", "ip6"), identities[workload.name], strict=True):
                if not nets:
                    continue
                rules.append(
                    rule(
                        REVERSE_PATH_CHAIN,
                        [
                            match(meta("iifname"), {"set": list(workload.interfaces)}, op="!="),
                            match(payload(fam, "saddr"), f"@wl{w_index}_{suffix(fam)}"),
                            *_count_drop(),
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
        rules += _per_family(
            REVERSE_PATH_CHAIN,
            "daddr",
            [_misrouted(), *_count_drop()],
            REVERSE_PATH_TO_WORKLOADS_COMMENT,
        )
    return rules


def forward_checks(
    policy: Policy,
    *,
    bpf: bool,
    checked: bool,
    undiverted: bool,
    non_tcp: bool,
    bpf_non_tcp: bool,
) -> list[Json]:
    """The ``forward`` rules after the fail-closed ones: ct invalid, TCP that
    was not DNAT-ed, AH, and the way into chain ``non_tcp``."""
    rules: list[Json] = []
    if checked:
        rules += _per_family(
            "forward",
            "saddr",
            [match(ct("state"), "invalid", op="in"), *_count_drop()],
            "invalid conntrack state from workloads",
        )
    if undiverted:
        jump = {"jump": {"target": UNDIVERTED_TCP_CHAIN}}
        for fam, proto in PROTO.items():
            for conditions, comment, _ in _undiverted():
                rules.append(
                    rule(
                        "forward",
                        [_workloads(fam, "saddr"), _tcp(), *conditions, jump],
                        f"{comment} ({proto})",
                    )
                )
    if bpf and checked:
        by_mark = marked(policy.proxy.divert_mark)
        for conditions, _, comment in _undiverted():
            rules.append(rule("forward", [by_mark, _tcp(), *conditions, *_count_drop()], comment))
    if checked:
        rules += _per_family(
            "forward", "saddr", [match(meta("l4proto"), "ah"), *_count_drop()], "AH from workloads"
        )
    if non_tcp:
        rules += _per_family(
            "forward",
            "saddr",
            [_tcp("!="), {"jump": {"target": NON_TCP_CHAIN}}],
            "non-TCP from workloads",
        )
    if bpf_non_tcp:
        rules.append(
            rule(
                "forward",
                [
                    marked(policy.proxy.divert_mark),
                    _tcp("!="),
                    {"jump": {"target": NON_TCP_CHAIN}},
                ],
                BPF_NON_TCP_COMMENT,
            )
        )
    return rules


def non_tcp_chain_rules(policy: Policy, *, bpf_non_tcp: bool) -> list[Json]:
    """Chain ``non_tcp`` before the drop rules' own: related ICMP errors and
    replies pass; what the BPF classifier marked is dropped."""
    rules = [
        rule(NON_TCP_CHAIN, [match(ct("state"), "related", op="in"), {"accept": None}],
             NON_TCP_RELATED_COMMENT),
        rule(
            NON_TCP_CHAIN,
            [
                match(ct("direction"), "reply"),
                match(ct("state"), "established", op="in"),
                {"accept": None},
            ],
            NON_TCP_REPLY_COMMENT,
        ),
    ]  # fmt: skip
    if bpf_non_tcp:
        rules.append(
            rule(NON_TCP_CHAIN, [marked(policy.proxy.divert_mark), *_count_drop()],
                 BPF_NON_TCP_COMMENT)
        )  # fmt: skip
    return rules


def output_filter_rule() -> Json:
    """Chain ``output_filter``: local workloads' non-TCP into chain ``non_tcp``."""
    return rule(
        OUTPUT_FILTER_CHAIN,
        [
            _tcp("!="),
            # The node's own neighbour discovery is untracked.
            match(ct("state"), "untracked", op="!="),
            {"jump": {"target": NON_TCP_CHAIN}},
        ],
        "non-TCP of local workloads",
    )


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
