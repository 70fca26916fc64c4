"""The agent's pin folders on bpffs.

Objects are pinned under a bpffs folder of the agent's own, so operators can
find them and a later start can remove what a crashed run left. bpffs is
mounted there first if needed: each ``ip netns exec`` gets a mount namespace
(and /sys) of its own, so the agent makes sure the folder really is on bpffs
in its own view.
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
from pathlib import Path

from egress_agent.bpf.libbpf import BpfError

BPF_FS_MAGIC = 0xCAFE4A11  # include/uapi/linux/magic.h


def about(pin_dir: Path) -> str:
    """How errors name a pin folder."""
    return f"BPF pin folder {pin_dir}"


def ensure_bpffs(pin_dir: Path) -> None:
    """Mount bpffs on the pin folder's parent when that is not bpffs yet:
    only on a folder that is empty (as /sys/fs/bpf is before bpffs is
    mounted there) or that does not exist yet, never over one with contents,
    which the mount would hide."""
    parent = pin_dir.parent
    if is_bpffs(parent):
        return
    try:
        occupied = parent.is_dir() and any(parent.iterdir())
    except OSError as exc:
        raise BpfError(
            about(pin_dir),
            f"cannot read its parent {parent} ({exc}): choose a pin folder on bpffs"
            " (--bpf-pin-dir under /sys/fs/bpf)",
        ) from exc
    if occupied:
        raise BpfError(
            about(pin_dir),
            f"not on bpffs and its parent {parent} is a folder with contents, which"
            " mounting bpffs there would hide: choose a pin folder on bpffs"
            " (--bpf-pin-dir under /sys/fs/bpf)",
        )
    parent.mkdir(parents=True, exist_ok=True)
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(parent).encode(), b"bpf", 0, None) != 0:
        err = ct.get_errno()
        raise BpfError(
            about(pin_dir),
            f"cannot mount bpffs on its parent {parent}: {os.strerror(err)} (needs"
            " CAP_SYS_ADMIN, or mount it beforehand: mount -t bpf bpf /sys/fs/bpf)",
        )


def is_bpffs(path: Path) -> bool:
    class Statfs(ct.Structure):
        # ctypes reads this class attribute; it is never mutated.
        _fields_ = [("f_type", ct.c_long), ("rest", ct.c_byte * 112)]  # noqa: RUF012

    libc = ct.CDLL(None, use_errno=True)
    buf = Statfs()
    if libc.statfs(str(path).encode(), ct.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


def remove_pins(pin_dir: Path) -> list[str]:
    """Remove the agent's pin folder and what is in it (a crashed run's too)."""
    if not pin_dir.is_dir() or not is_bpffs(pin_dir):
        return []
    removed = sorted(p.name for p in pin_dir.iterdir())
    shutil.rmtree(pin_dir, ignore_errors=True)
    return removed
