"""What the BPF maps must hold for a policy: a pure function, and a diff.

``desired_maps(policy, ids=..., ifindexes=...)`` gives every config map's
entries as raw key/value bytes; ``diff`` turns "what the kernel holds" and
"what it must hold" into the upserts and deletes that get from one to the
other. The agent applies only those: a workload or CIDR change touches a few
entries, never the program or the nftables table.

``classify`` and ``classify_non_tcp`` are the classifier's decisions re-done
in Python over the same map contents, so unit tests can check the maps
against ``policy.decide.should_divert`` and ``non_tcp_drop`` without a
kernel (packets it cannot parse are the netns tests' business).

How the decision maps to lookups (see ``classifier.bpf.c``):

* identity: the source LPM tries hold every workload CIDR; the kernel's
  longest-prefix match is ``identify``'s longest prefix (the nftables
  renderer has to carve overlapping CIDRs apart; a trie does not).
* binding: a workload with ``interfaces`` has the BOUND flag and one
  ``egress_bind`` entry per (workload id, ifindex) of those interfaces that
  exist now. A packet from another interface gets no identity at all.
* intercept rules are bits (rule position in the policy, at most 64);
  ``egress_settings`` says which have no ``to_cidrs``, no ports, and
  ``non_tcp: drop``. A
  destination LPM entry holds the union of the to/except bits of every
  configured prefix containing it, so the longest match alone gives "which
  rules' to_cidrs and except_cidrs contain this address".
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from egress_agent.bpf import layout
from egress_agent.policy.model import IPAddress, IPNetwork, NonTcp, Policy, Workload

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
    shared, rules_of = _shared_part(policy)
    maps: MapContents = {name: {} for name in layout.CONFIG_MAPS}
    maps.update(shared)
    for w in policy.workloads:
        part = _workload_part(w, ids[w.name], rules_of.get(w.name, 0), ifindexes)
        for name, entries in part.items():
            for key, value in entries.items():
                # Equal prefixes in two workloads: the first listed keeps it, as
                # in identify() (the loader refuses them in a file; discovery may not).
                maps[name].setdefault(key, value)
    return maps


# More changed destination prefixes than this recompute all unions at once.
INCREMENTAL_DESTINATIONS = 256
SHARED_MAPS = (layout.SETTINGS, layout.PORTS, layout.DST_V4, layout.DST_V6)
WORKLOAD_MAPS = (layout.BIND, layout.WORKLOADS, layout.SRC_V4, layout.SRC_V6)
_SOURCE_MAPS = (layout.SRC_V4, layout.SRC_V6)


class IncrementalMaps:
    """The same contents as :func:`desired_maps`, kept by part so that a
    change costs what it touches: the maps the intercept rules give are
    recomputed only when the rules change (and then, for a few changed
    destination prefixes, only those and the prefixes inside them, whose
    unions include theirs), a workload's entries only when that workload (its
    CIDRs, interfaces' ifindexes, id or rule bits) does. ``update`` returns
    the diff from the previous policy to the new one.

    Should a changed workload share a source prefix with an unchanged one
    (possible for pod addresses; "first listed keeps it" then depends on
    every workload), the diff is computed from the whole contents instead.

    ``apply_delta`` is the path for a few workloads changing among many (a
    pod started or gone): it is told which workloads changed, so it touches
    only those, with no pass over the others (see there).
    """

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self._intercept: tuple[object, ...] | None = None
        self._shared: MapContents = {name: {} for name in SHARED_MAPS}
        self._rules_of: dict[str, int] = {}
        self._parts: dict[str, tuple[object, Workload, MapContents]] = {}
        # Source prefix -> the workloads whose CIDRs hold it (usually one).
        self._claims: dict[tuple[str, bytes], set[str]] = {}
        # Entries of each source map (prefixes claimed by some workload).
        self.source_entries: dict[str, int] = {name: 0 for name in _SOURCE_MAPS}
        # Workload -> its place in the policy's order (gaps after removals).
        self._pos: dict[str, int] = {}
        self._next_pos = 0
        self._order: tuple[str, ...] | None = ()
        # Ids free below ``_next_id`` (a heap: the lowest is taken first).
        self._free_ids: list[int] = []
        self._next_id = 1
        self._workloads: tuple[Workload, ...] | None = None
        self._ifx: dict[str, int] = {}
        self._dst_bits: dict[DstKey, tuple[int, int]] | None = None
        self._dst_union: dict[DstKey, tuple[int, int]] = {}
        self._by_len: dict[tuple[int, int], list[int]] = {}  # (version, plen) -> addrs

    @property
    def size(self) -> int:
        """Entries the maps hold (about; shared source prefixes count twice)."""
        return sum(map(len, self._shared.values())) + sum(
            sum(map(len, part[2].values())) for part in self._parts.values()
        )

    def _current_order(self) -> tuple[str, ...]:
        if self._order is None:
            self._order = tuple(sorted(self._parts, key=self._pos.__getitem__))
        return self._order

    def contents(self) -> MapContents:
        """Everything as one mapping (what the kernel should hold)."""
        out: MapContents = {name: dict(entries) for name, entries in self._shared.items()}
        for name in WORKLOAD_MAPS:
            out[name] = {}
        for wname in self._current_order():
            for name, entries in self._parts[wname][2].items():
                target = out[name]
                for k, v in entries.items():
                    target.setdefault(k, v)  # first listed keeps a shared prefix
        return out

    def update(self, policy: Policy, ifindexes: Mapping[str, int]) -> MapDiff:
        before_full: MapContents | None = None
        upserts: dict[str, dict[bytes, bytes]] = {}
        deletes: dict[str, list[bytes]] = {}
        if policy.intercept != self._intercept:
            bits = _rule_bits(policy)
            for name, want in (
                (layout.SETTINGS, {layout.u32(0): bits.settings}),
                (layout.PORTS, bits.ports),
            ):
                change = diff({name: self._shared[name]}, {name: want})
                upserts.update(change.upserts)
                deletes.update(change.deletes)
                self._shared[name] = want
            dst_change = self._update_destinations(bits.dst)
            upserts.update(dst_change.upserts)
            deletes.update(dst_change.deletes)
            rules_changed = bits.rules_of != self._rules_of
            self._rules_of = bits.rules_of
            self._intercept = policy.intercept
        else:
            rules_changed = False
        ifx_now = dict(ifindexes)
        if policy.workloads is self._workloads and not rules_changed and ifx_now == self._ifx:
            # The same workload objects, bits and interfaces: nothing of theirs changed.
            return MapDiff(upserts=upserts, deletes=deletes)
        self._workloads, self._ifx = policy.workloads, ifx_now
        order = tuple(w.name for w in policy.workloads)
        same_order = order == self._current_order()
        ids = self.ids if same_order else assign_ids(policy, self.ids)
        new_parts: dict[str, tuple[object, Workload, MapContents]] = {}
        touched: list[str] = []
        rules_of, old_parts = self._rules_of, self._parts
        for w in policy.workloads:
            name = w.name
            rules = rules_of.get(name, 0)
            ifx = tuple(ifindexes.get(i) for i in w.interfaces) if w.interfaces else ()
            key = (ids[name], rules, ifx)
            old = old_parts.get(name)
            # Identity first: unchanged workloads are usually the same objects.
            if old is not None and old[0] == key and (old[1] is w or old[1] == w):
                new_parts[name] = old
                continue
            new_parts[name] = (key, w, _workload_part(w, ids[name], rules, ifindexes))
            touched.append(name)
        touched += [n for n in self._parts if n not in new_parts]
        old_side: MapContents = {name: {} for name in WORKLOAD_MAPS}
        new_side: MapContents = {name: {} for name in WORKLOAD_MAPS}
        for wname in touched:
            for side, parts in ((old_side, self._parts), (new_side, new_parts)):
                if wname in parts:
                    for name, entries in parts[wname][2].items():
                        side[name].update(entries)
        if self._shares_sources(touched, new_parts) or (
            not same_order and self._any_shared_source()
        ):
            before_full = self.contents()
        # Bookkeeping: claims of source prefixes by workloads.
        for wname in touched:
            self._unclaim(wname, self._parts)
            self._claim(wname, new_parts)
        self._parts, self.ids, self._order = new_parts, ids, order
        if not same_order:
            self._pos = {name: at for at, name in enumerate(order)}
            self._next_pos = len(order)
            self._next_id = max(ids.values(), default=0) + 1
            self._free_ids = sorted(set(range(1, self._next_id)) - set(ids.values()))
        if before_full is not None:
            whole = diff(before_full, self.contents())
            for name in WORKLOAD_MAPS:
                if name in whole.upserts:
                    upserts[name] = whole.upserts[name]
                if name in whole.deletes:
                    deletes[name] = whole.deletes[name]
            return MapDiff(upserts=upserts, deletes=deletes)
        change = diff(old_side, new_side)
        upserts.update(change.upserts)
        deletes.update(change.deletes)
        return MapDiff(upserts=upserts, deletes=deletes)

    def _claim(self, wname: str, parts: Mapping[str, tuple[object, Workload, MapContents]]) -> None:
        if wname in parts:
            for name in _SOURCE_MAPS:
                for k in parts[wname][2][name]:
                    holders = self._claims.get((name, k))
                    if holders is None:
                        holders = self._claims[(name, k)] = set()
                        self.source_entries[name] += 1
                    holders.add(wname)

    def _unclaim(
        self, wname: str, parts: Mapping[str, tuple[object, Workload, MapContents]]
    ) -> None:
        if wname in parts:
            for name in _SOURCE_MAPS:
                for k in parts[wname][2][name]:
                    holders = self._claims.get((name, k))
                    if holders is not None:
                        holders.discard(wname)
                        if not holders:
                            del self._claims[(name, k)]
                            self.source_entries[name] -= 1

    def _holder_value(self, key: tuple[str, bytes]) -> bytes | None:
        """What a source prefix maps to: the id of the first listed workload
        holding it (as in ``desired_maps``), or None when none does."""
        holders = self._claims.get(key)
        if not holders:
            return None
        first = min(holders, key=self._pos.__getitem__)
        return self._parts[first][2][key[0]][key[1]]

    def apply_delta(
        self,
        *,
        upserts: Sequence[Workload] = (),
        removals: Sequence[str] = (),
        ifindexes: Mapping[str, int],
    ) -> MapDiff:
        """The diff for a few workloads changing, costing what they touch.

        The result is the state ``update`` would reach for the policy whose
        workloads are the previous ones with each of ``upserts`` put in
        place of the workload of its name (a new name goes last) and the
        workloads named in ``removals`` left out; the intercept rules stay.
        Nothing here walks the other workloads: ids come from a free list,
        a shared source prefix goes to its first listed holder by position.
        """
        if self._intercept is None:
            raise ValueError("apply_delta needs a first update() with the whole policy")
        names = [w.name for w in upserts] + list(removals)
        if len(set(names)) != len(names):
            raise ValueError(f"a workload is named twice in one delta: {sorted(names)}")
        upserts_diff: dict[str, dict[bytes, bytes]] = {}
        deletes_diff: dict[str, list[bytes]] = {}
        # Source prefixes whose holder may change: read them before and after.
        affected: set[tuple[str, bytes]] = set()
        for wname in names:
            if wname in self._parts:
                for name in _SOURCE_MAPS:
                    affected.update((name, k) for k in self._parts[wname][2][name])
        new_parts: dict[str, tuple[object, Workload, MapContents]] = {}
        new_ids: dict[str, int] = {}
        for w in upserts:
            wid = self.ids.get(w.name)
            if wid is None:
                wid = heapq.heappop(self._free_ids) if self._free_ids else self._next_id
                self._next_id = max(self._next_id, wid + 1)
            rules = self._rules_of.get(w.name, 0)
            ifx = tuple(ifindexes.get(i) for i in w.interfaces) if w.interfaces else ()
            part = _workload_part(w, wid, rules, ifindexes)
            new_parts[w.name] = ((wid, rules, ifx), w, part)
            new_ids[w.name] = wid
            for name in _SOURCE_MAPS:
                affected.update((name, k) for k in part[name])
        before = {key: self._holder_value(key) for key in affected}
        old_side: MapContents = {name: {} for name in (layout.WORKLOADS, layout.BIND)}
        new_side: MapContents = {name: {} for name in (layout.WORKLOADS, layout.BIND)}
        for wname in names:
            old = self._parts.get(wname)
            if old is not None:
                for name in old_side:
                    old_side[name].update(old[2][name])
            self._unclaim(wname, self._parts)
            if wname in new_parts:
                for name in new_side:
                    new_side[name].update(new_parts[wname][2][name])
                if wname not in self._pos:
                    self._pos[wname] = self._next_pos
                    self._next_pos += 1
                    self._order = None
                self._parts[wname] = new_parts[wname]
                self.ids[wname] = new_ids[wname]
                self._claim(wname, self._parts)
            elif old is not None:
                del self._parts[wname]
                del self._pos[wname]
                wid = self.ids.pop(wname)
                heapq.heappush(self._free_ids, wid)
                self._order = None
        self._workloads = None  # the next update() compares workload by workload
        for (name, k), was in before.items():
            now = self._holder_value((name, k))
            if now is None:
                if was is not None:
                    deletes_diff.setdefault(name, []).append(k)
            elif now != was:
                upserts_diff.setdefault(name, {})[k] = now
        change = diff(old_side, new_side)
        for name, entries in change.upserts.items():
            upserts_diff.setdefault(name, {}).update(entries)
        for name, keys in change.deletes.items():
            deletes_diff.setdefault(name, []).extend(keys)
        return MapDiff(upserts=upserts_diff, deletes=deletes_diff)

    def _shares_sources(
        self, touched: list[str], new_parts: Mapping[str, tuple[object, Workload, MapContents]]
    ) -> bool:
        mine: dict[tuple[str, bytes], int] = {}
        for wname in touched:
            for parts, step in ((self._parts, 1), (new_parts, 0)):
                if wname in parts:
                    for name in _SOURCE_MAPS:
                        for k in parts[wname][2][name]:
                            mine[(name, k)] = mine.get((name, k), 0) + step
        for key, own_old_claims in mine.items():
            others = len(self._claims.get(key, ())) - own_old_claims
            if others > 0:
                return True
        # Two touched workloads claiming one prefix between them, before or
        # after: which of them holds it depends on both.
        for parts in (self._parts, new_parts):
            seen: set[tuple[str, bytes]] = set()
            for wname in touched:
                if wname in parts:
                    for name in _SOURCE_MAPS:
                        for k in parts[wname][2][name]:
                            if (name, k) in seen:
                                return True
                            seen.add((name, k))
        return False

    def _update_destinations(self, bits: dict[DstKey, tuple[int, int]]) -> MapDiff:
        """The destination tries' diff. A few changed prefixes recompute only
        themselves and the prefixes inside them (whose unions include theirs);
        many changes, or the first call, recompute everything."""
        old = self._dst_bits
        changed: list[DstKey] | None = None
        if old is not None:
            changed = [k for k, v in bits.items() if old.get(k) != v]
            changed += [k for k in old if k not in bits]
        self._dst_bits = bits
        if changed is None or len(changed) > INCREMENTAL_DESTINATIONS:
            union = _with_ancestors(bits)
            want: MapContents = {layout.DST_V4: {}, layout.DST_V6: {}}
            for key, value in union.items():
                target, raw, packed = _dst_entry(key, value)
                want[target][raw] = packed
            have = {name: self._shared[name] for name in want}
            self._shared.update(want)
            self._dst_union = union
            self._by_len = {}
            for version, plen, addr in sorted(bits):
                self._by_len.setdefault((version, plen), []).append(addr)
            return diff(have, want)
        for key in changed:
            version, plen, addr = key
            addrs = self._by_len.setdefault((version, plen), [])
            at = bisect.bisect_left(addrs, addr)
            present = at < len(addrs) and addrs[at] == addr
            if key in bits and not present:
                addrs.insert(at, addr)
            elif key not in bits and present:
                del addrs[at]
        lengths: dict[int, list[int]] = {4: [], 6: []}
        for (version, plen), addrs in sorted(self._by_len.items()):
            if addrs:
                lengths[version].append(plen)
        affected = set(changed)
        for version, plen, addr in changed:
            width = 32 if version == 4 else 128
            last = addr | ((1 << (width - plen)) - 1)
            for longer in lengths[version]:
                if longer <= plen:
                    continue
                addrs = self._by_len[(version, longer)]
                lo = bisect.bisect_left(addrs, addr)
                hi = bisect.bisect_right(addrs, last)
                affected.update((version, longer, a) for a in addrs[lo:hi])
        upserts: dict[str, dict[bytes, bytes]] = {}
        deletes: dict[str, list[bytes]] = {}
        for key in affected:
            if key in bits:
                value = _union(bits, lengths, key)
                if self._dst_union.get(key) == value:
                    continue
                self._dst_union[key] = value
                target, raw, packed = _dst_entry(key, value)
                upserts.setdefault(target, {})[raw] = packed
                self._shared[target][raw] = packed
            elif key in self._dst_union:
                target, raw, _ = _dst_entry(key, self._dst_union.pop(key))
                deletes.setdefault(target, []).append(raw)
                del self._shared[target][raw]
        return MapDiff(upserts=upserts, deletes=deletes)

    def _any_shared_source(self) -> bool:
        return any(len(holders) > 1 for holders in self._claims.values())


DstKey = tuple[int, int, int]  # (IP version, prefix length, address as int)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RuleBits:
    rules_of: dict[str, int]
    settings: bytes
    ports: dict[bytes, bytes]
    dst: dict[DstKey, tuple[int, int]]  # each prefix's own (to, except) bits


def _rule_bits(policy: Policy) -> _RuleBits:
    """What the intercept rules say, before destination unions."""
    if len(policy.intercept) > layout.MAX_RULES:
        raise UnsupportedPolicy(
            f"{len(policy.intercept)} intercept rules: the BPF datapath holds at most "
            f"{layout.MAX_RULES} (merge rules, or use --datapath nft)"
        )
    rules_of: dict[str, int] = {}
    any_dst = any_port = non_tcp = 0
    dst: dict[DstKey, tuple[int, int]] = {}
    port_bits: dict[int, int] = {}
    for bit, rule in enumerate(policy.intercept):
        mask = 1 << bit
        for source in rule.sources:
            rules_of[source] = rules_of.get(source, 0) | mask
        if not rule.to_cidrs:
            any_dst |= mask
        if not rule.ports:
            any_port |= mask
        if rule.non_tcp is NonTcp.DROP:
            non_tcp |= mask
        for nets, which in ((rule.to_cidrs, 0), (rule.except_cidrs, 1)):
            for net in nets:
                key = (net.version, net.prefixlen, int(net.network_address))
                to, ex = dst.get(key, (0, 0))
                dst[key] = (to | mask, ex) if which == 0 else (to, ex | mask)
        for ports in rule.ports:
            for port in range(ports.first, ports.last + 1):
                port_bits[port] = port_bits.get(port, 0) | mask
    return _RuleBits(
        rules_of=rules_of,
        settings=layout.settings_value(any_dst=any_dst, any_port=any_port, non_tcp=non_tcp),
        ports={layout.u16(p): layout.u64(m) for p, m in port_bits.items()},
        dst=dst,
    )


def _dst_entry(key: DstKey, value: tuple[int, int]) -> tuple[str, bytes, bytes]:
    version, plen, addr = key
    target = layout.DST_V4 if version == 4 else layout.DST_V6
    raw = layout.lpm_key_raw(plen, addr.to_bytes(4 if version == 4 else 16, "big"))
    return target, raw, layout.masks_value(*value)


def _shared_part(policy: Policy) -> tuple[MapContents, dict[str, int]]:
    """The maps the intercept rules give (settings, ports, destinations), and
    each source workload's rule bits."""
    bits = _rule_bits(policy)
    maps: MapContents = {name: {} for name in SHARED_MAPS}
    maps[layout.SETTINGS][layout.u32(0)] = bits.settings
    maps[layout.PORTS] = dict(bits.ports)
    for key, value in _with_ancestors(bits.dst).items():
        target, raw, packed = _dst_entry(key, value)
        maps[target][raw] = packed
    return maps, bits.rules_of


def _workload_part(w: Workload, wid: int, rules: int, ifindexes: Mapping[str, int]) -> MapContents:
    part: MapContents = {name: {} for name in WORKLOAD_MAPS}
    flags = layout.WORKLOAD_BOUND if w.interfaces else 0
    part[layout.WORKLOADS][layout.u32(wid)] = layout.workload_value(rules=rules, flags=flags)
    for ifname in w.interfaces:
        if ifname in ifindexes:
            part[layout.BIND][layout.bind_key(workload=wid, ifindex=ifindexes[ifname])] = (
                layout.u32(1)
            )
    for net in w.cidrs:
        target = layout.SRC_V4 if net.version == 4 else layout.SRC_V6
        part[target].setdefault(layout.lpm_key(net), layout.u32(wid))
    return part


def _with_ancestors(bits: Mapping[DstKey, tuple[int, int]]) -> dict[DstKey, tuple[int, int]]:
    """Each prefix's (to, except) OR-ed with those of every configured prefix
    that contains it. Only the prefix lengths in use are walked, on integers
    (ipaddress objects are far too slow for 10,000 prefixes)."""
    lengths = _lengths(bits)
    return {key: _union(bits, lengths, key) for key in bits}


def _lengths(bits: Iterable[DstKey]) -> dict[int, list[int]]:
    found: dict[int, set[int]] = {4: set(), 6: set()}
    for version, plen, _ in bits:
        found[version].add(plen)
    return {version: sorted(plens) for version, plens in found.items()}


def _union(
    bits: Mapping[DstKey, tuple[int, int]], lengths: Mapping[int, list[int]], key: DstKey
) -> tuple[int, int]:
    version, plen, addr = key
    width = 32 if version == 4 else 128
    to, ex = bits[key]
    for shorter in lengths[version]:
        if shorter >= plen:
            break
        above = bits.get((version, shorter, addr >> (width - shorter) << (width - shorter)))
        if above is not None:
            to |= above[0]
            ex |= above[1]
    return to, ex


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
    """The classifier's decision over ``maps`` for one TCP packet it can
    parse: (verdict, reason, workload id)."""
    found = _workload(maps, src=src, ifindex=ifindex)
    if isinstance(found, layout.Reason):
        return layout.REASON_VERDICT[found], found, None
    wid, rules = found
    any_dst, any_port, _ = layout.unpack_settings(maps[layout.SETTINGS][layout.u32(0)])
    port_raw = maps.get(layout.PORTS, {}).get(layout.u16(dst_port))
    rules &= (layout.unpack_u64(port_raw) if port_raw else 0) | any_port
    to, except_ = _dst_bits(maps, src=src, dst=dst)
    rules &= (to | any_dst) & ~except_
    if rules:
        return layout.Verdict.MARK, layout.Reason.MARKED, wid
    return layout.Verdict.PASS, layout.Reason.NO_RULE, wid


def classify_non_tcp(
    maps: Mapping[str, Mapping[bytes, bytes]],
    *,
    src: IPAddress,
    dst: IPAddress,
    ifindex: int,
) -> tuple[layout.Verdict, layout.Reason, int | None]:
    """The classifier's decision over ``maps`` for one non-TCP packet it can
    parse: (verdict, reason, the rule bit it is counted for or None)."""
    found = _workload(maps, src=src, ifindex=ifindex)
    if isinstance(found, layout.Reason):
        return layout.REASON_VERDICT[found], found, None
    _, rules = found
    any_dst, _, non_tcp = layout.unpack_settings(maps[layout.SETTINGS][layout.u32(0)])
    to, except_ = _dst_bits(maps, src=src, dst=dst)
    rules &= non_tcp & (to | any_dst) & ~except_
    if rules:
        first = (rules & -rules).bit_length() - 1
        return layout.Verdict.MARK, layout.Reason.NON_TCP_MARKED, first
    return layout.Verdict.PASS, layout.Reason.NOT_TCP, None


def _workload(
    maps: Mapping[str, Mapping[bytes, bytes]], *, src: IPAddress, ifindex: int
) -> tuple[int, int] | layout.Reason:
    """(workload id, its rule bits), or the reason the source has none."""
    src_map = layout.SRC_V4 if src.version == 4 else layout.SRC_V6
    found = _longest(maps.get(src_map, {}), src)
    if found is None:
        return layout.Reason.NO_IDENTITY
    wid = layout.unpack_u32(found)
    raw = maps.get(layout.WORKLOADS, {}).get(layout.u32(wid))
    if raw is None:
        return layout.Reason.NO_IDENTITY
    rules, flags = layout.unpack_workload(raw)
    bound = flags & layout.WORKLOAD_BOUND
    if bound and layout.bind_key(workload=wid, ifindex=ifindex) not in maps.get(layout.BIND, {}):
        return layout.Reason.WRONG_INTERFACE
    return wid, rules


def _dst_bits(
    maps: Mapping[str, Mapping[bytes, bytes]], *, src: IPAddress, dst: IPAddress
) -> tuple[int, int]:
    dst_map = layout.DST_V4 if src.version == 4 else layout.DST_V6
    dst_raw = _longest(maps.get(dst_map, {}), dst) if dst.version == src.version else None
    return layout.unpack_masks(dst_raw) if dst_raw else (0, 0)


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
