"""The BPF datapath as the agent drives it: load, keep maps and attachments
equal to the policy, repair drift, tear down.

Blocking calls (bcc, netlink): the agent runs them in a worker thread.

* ``start`` removes a crashed run's leftovers (our tc filters everywhere,
  the pin folder), loads and pins the classifier, writes the maps, attaches.
* ``update`` changes maps by diff against what the kernel holds: the program
  and the tc filters stay; new connections see the change at once.
* ``update_workloads`` does the same for a few workloads that changed (a pod
  started or gone), touching only them: no pass over the other workloads.
* ``sync_links`` attaches to interfaces that appeared (a new pod veth) and
  refreshes interface bindings (ifindexes change when a veth is re-made).
* ``verify``/``repair`` find and fix a removed filter or edited map entries.
* ``stop`` detaches everywhere, removes pins, releases the program.
* ``counters`` reads what the classifier counted (:class:`ClassifierCounters`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from egress_agent.bpf import attach, layout
from egress_agent.bpf.classifier import BpfConfig, Classifier, program_error
from egress_agent.bpf.maps import IncrementalMaps, MapContents, UnsupportedPolicy, diff
from egress_agent.policy.model import Policy, Workload

log = logging.getLogger(__name__)


# Map contents are read back on every verification below this many entries,
# else on every MAP_CHECK_EVERY-th (every 10 s with the agent's 2 s rounds).
SMALL_MAPS = 2000
MAP_CHECK_EVERY = 5


@dataclass(frozen=True, kw_only=True)
class Traffic:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class WorkloadCounters:
    """One workload's packets by the classifier's verdict (only packets from
    its addresses on interfaces it may use; spoofs of it are in
    ``ClassifierCounters.reasons[Reason.WRONG_INTERFACE]``)."""

    marked: Traffic  # TCP marked for the proxy, non-TCP marked for a non_tcp: drop rule
    passed: Traffic
    dropped: Traffic  # fragments of TCP, AH, too many extension headers, truncated


@dataclass(frozen=True, kw_only=True)
class ClassifierCounters:
    """What the classifier counted since it was loaded, summed over CPUs.

    ``reasons``: packets by reason, every reason present (``layout.REASON_VERDICT``
    says whether a reason passes, marks or drops; :meth:`dropped` picks the
    drops). "Marked" is the classifier's count: what nftables DNAT-ed to the
    proxy is its own rule counters' business. ``workloads``: by workload
    name. ``non_tcp``: by intercept rule index (``InterceptRule.index``), the
    non-TCP packets marked because that rule, the first with ``non_tcp: drop``
    covering them, says so, since the rule at that position last changed;
    only rules that counted any.
    """

    reasons: Mapping[layout.Reason, int]
    workloads: Mapping[str, WorkloadCounters]
    non_tcp: Mapping[int, Traffic]

    def dropped(self) -> dict[layout.Reason, int]:
        """Packets dropped, by reason (every dropping reason present)."""
        return {
            r: n for r, n in self.reasons.items() if layout.REASON_VERDICT[r] is layout.Verdict.DROP
        }


@dataclass(kw_only=True)
class UpdateResult:
    changed_entries: int
    seconds: float


@dataclass(kw_only=True)
class BpfDatapath:
    config: BpfConfig
    exclude_interfaces: tuple[str, ...] = ()
    classifier: Classifier | None = None
    policy: Policy | None = None
    attached: dict[str, int] = field(default_factory=dict)  # name -> ifindex
    last_problems: list[str] = field(default_factory=list)
    # What the agent last wrote, by part: a change is diffed against this
    # (reading 20,000 entries back costs far more than the change itself);
    # ``verify`` compares with the kernel.
    planner: IncrementalMaps = field(default_factory=IncrementalMaps)
    _verifications: int = 0
    ifindexes: dict[str, int] = field(default_factory=dict)

    def start(self, policy: Policy) -> None:
        self.ifindexes = attach.all_links()
        if self.config.divert_mark & self.config.upstream_mark:
            raise program_error(
                f"proxy.divert_mark {self.config.divert_mark:#x} shares bits with"
                f" proxy.upstream_mark {self.config.upstream_mark:#x}: give each its own bits"
            )
        # Load and fill the new program before touching a previous run's
        # filters (a crashed run's, or the predecessor's in a handover): each
        # attach replaces the old filter on its link, so classification never
        # stops (compiling takes seconds; an unmarked packet would go direct).
        self.classifier = Classifier(self.config)
        try:
            self.update(policy)
            self.sync_links()
        except BaseException:
            self.stop()
            raise
        leftovers = [
            name
            for name, index in attach.all_links().items()
            if name not in self.attached and attach.detach(index)
        ]
        if leftovers:
            log.warning("removed a previous run's BPF filters from %s", ", ".join(leftovers))

    def _check_capacity(self, policy: Policy) -> None:
        """Refuse what the maps cannot hold before writing anything."""
        c = self.config
        sources = {4: 0, 6: 0}
        for w in policy.workloads:
            for net in w.cidrs:
                sources[net.version] += 1
        destinations = {4: 0, 6: 0}
        for rule in policy.intercept:
            for net in (*rule.to_cidrs, *rule.except_cidrs):
                destinations[net.version] += 1
        problems = []
        if len(policy.workloads) > c.max_workloads:
            problems.append(f"{len(policy.workloads)} workloads (at most {c.max_workloads})")
        for version in (4, 6):
            if sources[version] > c.max_sources:
                problems.append(
                    f"{sources[version]} IPv{version} workload CIDRs (at most {c.max_sources})"
                )
            if destinations[version] > c.max_destinations:
                problems.append(
                    f"{destinations[version]} IPv{version} to/except CIDRs"
                    f" (at most {c.max_destinations})"
                )
        if problems:
            raise UnsupportedPolicy(
                "the BPF maps cannot hold " + ", ".join(problems) + " (use --datapath nft)"
            )

    @property
    def ids(self) -> dict[str, int]:
        return self.planner.ids

    def update(self, policy: Policy) -> UpdateResult:
        """Make the maps hold ``policy`` (a diff against the kernel's entries)."""
        assert self.classifier is not None
        started = time.perf_counter()
        self._check_capacity(policy)
        change = self.planner.update(policy, self.ifindexes)
        self.classifier.apply(change)
        if self.policy is not None:
            # A rule's non-TCP count is that rule's: a position whose rule
            # changed starts again from zero (as nftables' counters do).
            old, new = self.policy.intercept, policy.intercept
            changed = [
                i
                for i in range(min(max(len(old), len(new)), layout.MAX_RULES))
                if i >= len(old) or i >= len(new) or old[i] != new[i]
            ]
            self.classifier.reset_non_tcp(changed)
        self.policy = policy
        if change.deletes.get(layout.WORKLOADS):
            self.classifier.forget_workloads(self.ids)
        return UpdateResult(changed_entries=change.size, seconds=time.perf_counter() - started)

    def update_workloads(
        self, policy: Policy, *, upserts: Sequence[Workload] = (), removals: Sequence[str] = ()
    ) -> UpdateResult:
        """Make the maps hold ``policy``, which differs from the policy in
        force only in the workloads ``upserts`` (in place, or new and last)
        and ``removals`` (see ``IncrementalMaps.apply_delta``): the cost is
        that of the entries they touch, whatever the number of workloads."""
        assert self.classifier is not None and self.policy is not None
        started = time.perf_counter()
        c = self.config
        added = sum(1 for w in upserts if w.name not in self.planner.ids)
        problems = []
        if len(self.planner.ids) + added > c.max_workloads:
            problems.append(
                f"{len(self.planner.ids) + added} workloads (at most {c.max_workloads})"
            )
        # At most: a new CIDR another workload holds already takes no entry.
        for version, name in ((4, layout.SRC_V4), (6, layout.SRC_V6)):
            more = sum(1 for w in upserts for net in w.cidrs if net.version == version)
            if self.planner.source_entries[name] + more > c.max_sources:
                problems.append(
                    f"{self.planner.source_entries[name] + more} IPv{version} workload CIDRs"
                    f" (at most {c.max_sources})"
                )
        if problems:
            raise UnsupportedPolicy(
                "the BPF maps cannot hold " + ", ".join(problems) + " (use --datapath nft)"
            )
        gone = [self.planner.ids[n] for n in removals if n in self.planner.ids]
        change = self.planner.apply_delta(
            upserts=upserts, removals=removals, ifindexes=self.ifindexes
        )
        self.classifier.apply(change)
        self.classifier.forget_ids(gone)
        self.policy = policy
        return UpdateResult(changed_entries=change.size, seconds=time.perf_counter() - started)

    def sync_links(self) -> list[str]:
        """Attach where missing; forget links that are gone. Returns new attachments."""
        assert self.classifier is not None
        links = attach.candidate_links(self.exclude_interfaces)
        self.ifindexes = attach.all_links()
        added = []
        for name, index in links.items():
            if self.attached.get(name) != index or not attach.attached(index):
                attach.attach(index, self.classifier.prog_fd)
                added.append(name)
        self.attached = dict(links)
        if added and self.policy is not None:
            self.update(self.policy)  # interface bindings follow ifindexes
        return added

    def verify(self, *, full: bool = False) -> list[str]:
        """What differs from the desired state (empty when in sync).

        Attachments are checked every time (cheap, and a removed filter
        must come back within seconds). Reading every map entry back costs
        about 0.2 s at 10,000 workloads and CIDRs, so large maps are compared
        on every ``MAP_CHECK_EVERY``-th call only (or when ``full``).
        """
        assert self.classifier is not None and self.policy is not None
        problems = []
        links = attach.candidate_links(self.exclude_interfaces)
        for name, index in links.items():
            if not attach.attached(index):
                problems.append(f"BPF classifier not attached to {name}")
        self._verifications += 1
        if full or self.planner.size < SMALL_MAPS or self._verifications % MAP_CHECK_EVERY == 0:
            change = diff(self.classifier.read(), self.planner.contents())
            if change.size:
                problems.append(f"BPF maps differ from the policy in {change.size} entries")
        self.last_problems = problems
        return problems

    def repair(self) -> None:
        assert self.classifier is not None and self.policy is not None
        self.attached.clear()
        self.sync_links()
        self.classifier.apply(diff(self.classifier.read(), self.planner.contents()))

    def stop(self) -> None:
        for step, action in (
            ("detach tc filters", attach.detach_everywhere),
            ("remove pins", self._close),
        ):
            try:
                action()
            except Exception as exc:
                log.error("BPF teardown: could not %s: %s", step, exc)
        self.attached.clear()

    def _close(self) -> None:
        if self.classifier is not None:
            self.classifier.close()
            self.classifier = None

    def status(self) -> dict[str, Any]:
        c = self.classifier
        return {
            "program_id": c.prog_id if c else None,
            "map_ids": c.map_ids() if c else {},
            "pin_dir": self.config.pin_dir,
            "attached": sorted(self.attached),
            "reasons": {r.name.lower(): n for r, n in c.reasons().items()} if c else {},
        }

    def counters(self) -> ClassifierCounters:
        """Everything the classifier counted (empty before start and after stop)."""
        c = self.classifier
        if c is None:
            return ClassifierCounters(
                reasons={r: 0 for r in layout.Reason}, workloads={}, non_tcp={}
            )
        by_id = {wid: name for name, wid in self.ids.items()}
        workloads = {
            by_id[wid]: WorkloadCounters(
                marked=Traffic(packets=v[0], bytes=v[1]),
                passed=Traffic(packets=v[2], bytes=v[3]),
                dropped=Traffic(packets=v[4], bytes=v[5]),
            )
            for wid, v in c.counters().items()
            if wid in by_id
        }
        rules = self.policy.intercept if self.policy is not None else ()
        non_tcp = {
            rules[bit].index: Traffic(packets=packets, bytes=size)
            for bit, (packets, size) in c.non_tcp().items()
            if bit < len(rules)
        }
        return ClassifierCounters(reasons=c.reasons(), workloads=workloads, non_tcp=non_tcp)

    def workload_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """Workload name -> (marked packets, bytes, passed packets, bytes):
        the older shape of ``counters().workloads``."""
        return {
            name: (w.marked.packets, w.marked.bytes, w.passed.packets, w.passed.bytes)
            for name, w in self.counters().workloads.items()
        }


def entry_counts(
    contents: MapContents, names: Iterable[str] = layout.CONFIG_MAPS
) -> dict[str, int]:
    return {name: len(contents.get(name, {})) for name in names}
