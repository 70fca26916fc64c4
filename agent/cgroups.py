"""Cgroup workloads as the agent drives them: the socket marker's lifecycle.

Workloads given by ``cgroups`` are node processes (or hostNetwork pods):
their sockets get the workload's mark from a BPF program attached to their
cgroups (``bpf.cgroup``), and the output chain diverts by that mark. This
runs with either datapath. When the marker cannot load (no BPF, no bcc, no
cgroup2), the cgroup workloads are refused with the reason, logged and shown
in ``status``; everything else runs: their traffic then goes direct, as it
would with no agent (the output rules match a mark nobody sets).

Blocking calls (bcc child, bpf(2)): the agent runs them in a worker thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from egress_agent.agent.podcgroups import scan
from egress_agent.bpf.cgroup import (
    PROGRAM,
    CgroupMarkConfig,
    CgroupMarker,
    attached_programs,
    default_root,
    detach_stale,
)
from egress_agent.bpf.libbpf import BpfError
from egress_agent.policy.model import Policy, by_cgroup

log = logging.getLogger(__name__)


def marks_by_path(policy: Policy) -> dict[str, int]:
    """Cgroup path -> the mark of the workload that names it."""
    marks = policy.cgroup_marks()
    out: dict[str, int] = {}
    for w in policy.workloads:
        for path in w.cgroups:
            out.setdefault(path, marks[w.name])
    return out


def workload_of_path(policy: Policy) -> dict[str, str]:
    return {path: w.name for w in policy.workloads for path in w.cgroups}


class CgroupWorkloads:
    """The marker, loaded when the first policy with cgroup workloads needs it."""

    def __init__(
        self, *, root: str | None, bpf_pin_dir: str, bpf_cache_dir: str | None = None
    ) -> None:
        self.root_option = root
        self.cache_dir = bpf_cache_dir
        # A folder of its own next to the classifier's: the classifier's start
        # removes its own folder whole.
        self.pin_dir = str(Path(bpf_pin_dir).with_name(Path(bpf_pin_dir).name + "-cgroup"))
        self.marker: CgroupMarker | None = None
        self.refused: str | None = None
        self.missing: list[str] = []
        self._cleaned: set[str] = set()

    def _root(self) -> str:
        root = self.root_option or default_root()
        if root is None:
            raise BpfError(
                "cgroup root",
                "no cgroup2 mount in /proc/self/mountinfo: cgroup workloads need cgroup v2"
                " (give its mount point with --cgroup-root)",
            )
        return root

    def sync(self, policy: Policy) -> None:
        """Load if needed, then attach where the policy's cgroups exist now.
        Called at start, after each reload and on every drift round."""
        paths = marks_by_path(policy)
        if not paths and self.marker is None:
            return
        if self.marker is None:
            if self.refused is not None:
                return
            try:
                root = self._root()
                # Compile and load first (a second or two), then swap a
                # previous run's attachments for ours (below).
                self.marker = CgroupMarker(
                    CgroupMarkConfig(
                        mark_mask=policy.proxy.cgroup_mark_mask,
                        pin_dir=self.pin_dir,
                        cache_dir=self.cache_dir,
                    ),
                    root,
                )
                fresh = list(paths)
            except (BpfError, OSError) as exc:
                names = sorted({w.name for w in policy.workloads if by_cgroup(w)})
                self.refused = str(exc)
                log.error(
                    "cgroup workloads %s refused: %s; their traffic is not diverted"
                    " (everything else is)",
                    ", ".join(names),
                    exc,
                )
                return
        else:
            fresh = [p for p in paths if p not in self.marker.attached]
        # A previous run's programs (a crash, a stop that kept them) are
        # noted before ours attach and detached after: with both attached
        # (BPF_F_ALLOW_MULTI) no socket is ever created unmarked.
        stale = self._stale(self.marker.root, fresh)
        owners = workload_of_path(policy)
        result = self.marker.sync(paths)
        self._clean(self.marker.root, fresh, stale)
        for path in result.attached:
            log.info("cgroup %s (workload %s): socket marker attached", path, owners.get(path))
        for path in result.missing:
            log.info(
                "cgroup %s (workload %s) does not exist (yet) under %s: attached once it appears",
                path,
                owners.get(path),
                self.marker.root,
            )
        for path in result.detached:
            log.info("cgroup %s: socket marker detached (no longer in the policy)", path)
        self.missing = sorted(p for p in paths if p not in self.marker.attached)

    def _stale(self, root: str, paths: list[str]) -> set[int]:
        """Ids of the marker programs on cgroups seen for the first time:
        a previous run's, as ours is not attached there yet."""
        ids: set[int] = set()
        for path in paths:
            if path in self._cleaned:
                continue
            try:
                ids.update(i for i, name in attached_programs(root, path) if name == PROGRAM)
            except OSError:
                continue  # not there (yet)
        return ids

    def _clean(self, root: str, paths: list[str], stale: set[int]) -> None:
        """A previous run's attachments on cgroups seen for the first time."""
        fresh = [p for p in paths if p not in self._cleaned]
        if not fresh:
            return
        removed = detach_stale(root, fresh, only=stale) if stale else []
        if removed:
            log.info("removed a previous run's socket marker from %s", ", ".join(removed))
        # Only cgroups that exist count as checked: one made later may
        # still carry nothing of ours, but checking again is cheap.
        self._cleaned.update(p for p in fresh if Path(root, p).is_dir())

    def scan_pods(self, policy: Policy) -> dict[str, str]:
        """hostNetwork pods' cgroups (uid -> path), when a selector wants them."""
        if not any(w.pods is not None and w.pods.host_network for w in policy.workloads):
            return {}
        try:
            root = self._root()
        except BpfError:
            return {}  # sync() reports the missing cgroup2 mount
        return scan(root)

    def stop(self) -> None:
        if self.marker is not None:
            self.marker.close()
            self.marker = None

    def status(self) -> dict[str, Any] | None:
        if self.marker is None:
            return {"refused": self.refused} if self.refused else None
        return {**self.marker.status(), "root": self.marker.root, "missing": self.missing}
