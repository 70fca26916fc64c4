"""What the BPF maps must hold for a policy: a pure function, and a diff.

``desired_maps(policy, ids=..., ifindexes=...)`` gives every config map's
entries as raw key/value bytes; ``diff`` turns "what the kernel holds" and
"what it must hold" into the upserts and deletes that get from one to the
other. The agent applies only those: a workload or CIDR change touches a few
entries, never the program or the nftables table.

``classify`` is the classifier's decision re-done in Python over the same
map contents, so unit tests can check the maps against
``policy.decide.should_divert`` without a kernel.

How the decision maps to lookups (see ``classifier.bpf.c``):

* identity: the source LPM tries hold every workload CIDR; the kernel's
  longest-prefix match is ``identify``'s longest prefix (the nftables
  renderer has to carve overlapping CIDRs apart; a trie does not).
* binding: a workload with ``interfaces`` has the BOUND flag and one
  ``egress_bind`` entry per (workload id, ifindex) of those interfaces that
  exist now. A packet from another interface gets no identity at all.
* intercept rules are bits (rule position in the policy, at most 64). A
  destination LPM entry holds the union of the to/except bits of every
  configured prefix containing it, so the longest match alone gives "which
  rules' to_cidrs and except_cidrs contain this address".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from egress_agent.bpf import layout
from egress_agent.policy.model import IPAddress, IPNetwork, Policy

MapContents = dict[str, dict[bytes, bytes]]


class UnsupportedPolicy(ValueError):
    """The policy cannot be expressed in the BPF maps (the nftables datapath can)."""


@dataclass(frozen=True, kw_only=True)
class MapDiff:
    upserts: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    deletes: dict[str, list[bytes]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(map(len, self.upserts.values())) + sum(map(len, self.deletes.values()))


def assign_ids(policy: Policy, previous: Mapping[str, int]) -> dict[str, int]:
    """Workload name -> id; names seen before keep their id so a change of one
    workload is a change of its entries only. New names take the lowest free
    ids (from 1: 0 is never a workload)."""
    names = [w.name for w in policy.workloads]
    ids = {name: previous[name] for name in names if name in previous}
    used = set(ids.values())
    next_id = 1
    for name in names:
        if name in ids:
            continue
        while next_id in used:
            next_id += 1
        ids[name] = next_id
        used.add(next_id)
    return ids


def desired_maps(
    policy: Policy, *, ids: Mapping[str, int], ifindexes: Mapping[str, int]
) -> MapContents:
    """Every config map's entries for ``policy``. ``ifindexes``: the node's
    interfaces by name now (a bound workload's missing interface has no entry,
    so nobody can claim that identity through it)."""
    if len(policy.intercept) > layout.MAX_RULES:
        raise UnsupportedPolicy(
            f"{len(policy.intercept)} intercept rules: the BPF datapath holds at most "
            f"{layout.MAX_RULES} (merge rules, or use --datapath nft)"
        )
    maps: MapContents = {name: {} for name in layout.CONFIG_MAPS}

    rules_of: dict[str, int] = {w.name: 0 for w in policy.workloads}
    any_dst = any_port = 0
    dst_bits: dict[IPNetwork, list[int]] = {}  # prefix -> [to, except]
    for bit, rule in enumerate(policy.intercept):
        mask = 1 << bit
        for source in rule.sources:
            rules_of[source] |= mask
        if not rule.to_cidrs:
            any_dst |= mask
        if not rule.ports:
            any_port |= mask
        for net in rule.to_cidrs:
            dst_bits.setdefault(net, [0, 0])[0] |= mask
        for net in rule.except_cidrs:
            dst_bits.setdefault(net, [0, 0])[1] |= mask
        for ports in rule.ports:
            for port in range(ports.first, ports.last + 1):
                key = layout.u16(port)
                old = maps[layout.PORTS].get(key)
                maps[layout.PORTS][key] = layout.u64(mask | (layout.unpack_u64(old) if old else 0))
    maps[layout.SETTINGS][layout.u32(0)] = layout.masks_value(any_dst, any_port)

    for net, (to, except_) in _with_ancestors(dst_bits).items():
        target = layout.DST_V4 if net.version == 4 else layout.DST_V6
        maps[target][layout.lpm_key(net)] = layout.masks_value(to, except_)

    for w in policy.workloads:
        wid = ids[w.name]
        flags = layout.WORKLOAD_BOUND if w.interfaces else 0
        maps[layout.WORKLOADS][layout.u32(wid)] = layout.workload_value(
            rules=rules_of[w.name], flags=flags
        )
        for ifname in w.interfaces:
            if ifname in ifindexes:
                key = layout.bind_key(workload=wid, ifindex=ifindexes[ifname])
                maps[layout.BIND][key] = layout.u32(1)
        for net in w.cidrs:
            target = layout.SRC_V4 if net.version == 4 else layout.SRC_V6
            # Equal prefixes in two workloads: the first listed keeps it, as in
            # identify() (the loader refuses them in a file; discovery may not).
            maps[target].setdefault(layout.lpm_key(net), layout.u32(wid))
    return maps


def _with_ancestors(bits: Mapping[IPNetwork, list[int]]) -> dict[IPNetwork, tuple[int, int]]:
    """Each prefix's (to, except) OR-ed with those of every configured prefix
    that contains it. Only the prefix lengths in use are walked, on integers
    (ipaddress' supernet() is far too slow for 10,000 prefixes)."""
    result: dict[IPNetwork, tuple[int, int]] = {}
    for version, width in ((4, 32), (6, 128)):
        table: dict[tuple[int, int], tuple[int, int]] = {}
        for net, (to, ex) in bits.items():
            if net.version == version:
                table[(net.prefixlen, int(net.network_address))] = (to, ex)
        lengths = sorted({plen for plen, _ in table})
        for (plen, addr), (to, ex) in table.items():
            for shorter in lengths:
                if shorter >= plen:
                    break
                mask = ((1 << shorter) - 1) << (width - shorter)
                above = table.get((shorter, addr & mask))
                if above is not None:
                    to |= above[0]
                    ex |= above[1]
            prefix: IPNetwork
            if version == 4:
                prefix = ipaddress.IPv4Network((addr, plen))
            else:
                prefix = ipaddress.IPv6Network((addr, plen))
            result[prefix] = (to, ex)
    return result


def diff(current: Mapping[str, Mapping[bytes, bytes]], desired: MapContents) -> MapDiff:
    """Upserts and deletes that turn ``current`` into ``desired``, per map.
    ``egress_settings`` is an array: it is only ever overwritten."""
    upserts: dict[str, dict[bytes, bytes]] = {}
    deletes: dict[str, list[bytes]] = {}
    for name in layout.CONFIG_MAPS:
        have = current.get(name, {})
        want = desired.get(name, {})
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        if changed:
            upserts[name] = changed
        if name != layout.SETTINGS:
            gone = [k for k in have if k not in want]
            if gone:
                deletes[name] = gone
    return MapDiff(upserts=upserts, deletes=deletes)


def classify(
    maps: Mapping[str, Mapping[bytes, bytes]],
    *,
    src: IPAddress,
    dst: IPAddress,
    dst_port: int,
    ifindex: int,
) -> tuple[layout.Verdict, layout.Reason, int | None]:
    """The classifier's decision over ``maps`` for one TCP packet:
    (verdict, reason, workload id)."""
    src_map, dst_map = (
        (layout.SRC_V4, layout.DST_V4) if src.version == 4 else (layout.SRC_V6, layout.DST_V6)
    )
    found = _longest(maps.get(src_map, {}), src)
    if found is None:
        return layout.Verdict.BYPASS, layout.Reason.NO_IDENTITY, None
    wid = layout.unpack_u32(found)
    raw = maps.get(layout.WORKLOADS, {}).get(layout.u32(wid))
    if raw is None:
        return layout.Verdict.BYPASS, layout.Reason.NO_IDENTITY, None
    rules, flags = layout.unpack_workload(raw)
    bound = flags & layout.WORKLOAD_BOUND
    if bound and layout.bind_key(workload=wid, ifindex=ifindex) not in maps.get(layout.BIND, {}):
        return layout.Verdict.BYPASS, layout.Reason.WRONG_INTERFACE, None
    any_dst, any_port = layout.unpack_masks(maps[layout.SETTINGS][layout.u32(0)])
    port_raw = maps.get(layout.PORTS, {}).get(layout.u16(dst_port))
    rules &= (layout.unpack_u64(port_raw) if port_raw else 0) | any_port
    dst_raw = _longest(maps.get(dst_map, {}), dst) if dst.version == src.version else None
    to, except_ = layout.unpack_masks(dst_raw) if dst_raw else (0, 0)
    rules &= (to | any_dst) & ~except_
    if rules:
        return layout.Verdict.DIVERT, layout.Reason.DIVERTED, wid
    return layout.Verdict.BYPASS, layout.Reason.NO_RULE, wid


def _longest(trie: Mapping[bytes, bytes], addr: IPAddress) -> bytes | None:
    width = addr.max_prefixlen
    make = ipaddress.IPv4Network if addr.version == 4 else ipaddress.IPv6Network
    for plen in range(width, -1, -1):
        net = make((int(addr) >> (width - plen) << (width - plen), plen))
        hit = trie.get(layout.lpm_key(net))
        if hit is not None:
            return hit
    return None


def networks(keys: Iterable[bytes]) -> list[IPNetwork]:
    """The prefixes of LPM keys, for people reading a dump."""
    return [layout.lpm_network(k) for k in keys]
