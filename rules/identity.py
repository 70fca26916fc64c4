"""Which addresses are whose: each workload's CIDRs under longest-prefix
identity, as disjoint networks nftables interval sets can hold.

Identity follows :func:`egress_agent.policy.decide.identify`: longest prefix
wins. nftables interval sets cannot hold overlapping elements, and a rule for a
broad workload would otherwise also catch a more specific workload's
addresses, so each workload's set holds its CIDRs minus the more specific CIDRs
of other workloads (:func:`identity_networks`).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Sequence

from egress_agent.policy.model import IPNetwork, Policy, Workload

# Workload name -> (IPv4 networks, IPv6 networks).
Identities = dict[str, tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]]


def identity_networks(policy: Policy, *, only: set[str] | None = None) -> Identities:
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
    result: Identities = {}
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


def workload_sets(policy: Policy) -> dict[str, Workload]:
    """Set name prefix -> workload, for people reading ``nft list`` output."""
    return {f"wl{i}": w for i, w in enumerate(policy.workloads)}
