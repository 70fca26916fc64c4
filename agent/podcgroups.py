"""hostNetwork pods' cgroups: where the kubelet puts a pod, found by its uid.

A hostNetwork pod's addresses are the node's, so a ``pods:`` selector with
``hostNetwork: true`` names its pods by cgroup instead (see
``agent.cgroups``). The kubelet makes one cgroup per pod below its
``kubepods`` cgroup, named after the pod's uid:

* systemd cgroup driver: ``kubepods.slice/kubepods-<qos>.slice/
  kubepods-<qos>-pod<uid with '_' for '-'>.slice`` (Guaranteed pods sit
  directly in ``kubepods.slice`` as ``kubepods-pod<uid_>.slice``);
* cgroupfs driver: ``kubepods/<qos>/pod<uid>`` (Guaranteed: ``kubepods/pod<uid>``).

:func:`pod_uid` reads a directory name; :func:`scan` walks the few levels
below the kubepods cgroups (the only I/O here).
"""

from __future__ import annotations

import os
import re

# Pod uids are RFC 4122 UUIDs: 8-4-4-4-12 hex digits.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_SYSTEMD = re.compile(rf"kubepods(?:-[a-z]+)?-pod({_UID})\.slice")
_CGROUPFS = re.compile(rf"pod({_UID})")
TOPS = ("kubepods.slice", "kubepods")
MAX_DEPTH = 3


def pod_uid(dirname: str) -> str | None:
    """The pod uid a kubelet cgroup directory is named after, or None."""
    m = _SYSTEMD.fullmatch(dirname) or _CGROUPFS.fullmatch(dirname)
    return m.group(1).replace("_", "-") if m else None


def pod_cgroups(paths: list[str]) -> dict[str, str]:
    """Pod uid -> its cgroup path, from relative directory paths (the
    shortest path wins if one uid appears twice, e.g. a nested container
    cgroup that repeats the name)."""
    out: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: (p.count("/"), p)):
        uid = pod_uid(path.rsplit("/", 1)[-1])
        if uid is not None:
            out.setdefault(uid, path)
    return out


def scan(root: str) -> dict[str, str]:
    """Pod uid -> cgroup path relative to ``root``, for every pod cgroup found
    within MAX_DEPTH levels of the kubepods cgroups."""
    found: list[str] = []
    for top in TOPS:
        start = os.path.join(root, top)
        if not os.path.isdir(start):
            continue
        pending = [(top, 1)]
        while pending:
            rel, depth = pending.pop()
            try:
                entries = list(os.scandir(os.path.join(root, rel)))
            except OSError:
                continue  # removed while we walked
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                child = f"{rel}/{entry.name}"
                if pod_uid(entry.name) is not None:
                    found.append(child)
                elif depth < MAX_DEPTH:
                    pending.append((child, depth + 1))
    return pod_cgroups(found)
