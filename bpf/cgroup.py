"""Mark the sockets of cgroup workloads: load the socket marker, attach it to
the workloads' cgroups, keep its map equal to the policy.

Node processes (and hostNetwork pods) send with the node's own addresses, so
address identity cannot tell them apart; their cgroup can. The marker
(``cgroup_mark.bpf.c``) runs at socket creation in the cgroups it is attached
to and writes the workload's mark into the socket; nftables' output chain
matches the mark. It is independent of the tc classifier and works with
either datapath.

* A cgroup is identified by its id: the inode number of its directory on the
  cgroup2 mount. A cgroup that does not exist yet is retried on every
  :meth:`CgroupMarker.sync` (the agent's drift round); one that was removed
  and created again (a restarted systemd service) has a new id and is
  attached again.
* Only the workloads' own cgroups get the program (``BPF_F_ALLOW_MULTI``, so
  other programs there stay), never the root cgroup.
* It is built and loaded as the classifier is (``build.load``: bcc in a
  short-lived child), pinned in a folder of its own on bpffs; the agent
  opens the pins and removes the folder at once: the attachments and the
  agent's descriptors keep the objects alive. The map is a ``RawMap``.
* A killed run's attachments stay on their cgroups (an attachment without a
  link outlives its loader). The next start asks each configured cgroup
  which programs it holds (``BPF_PROG_QUERY``) and detaches those with the
  marker's name before attaching its own.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egress_agent.bpf.build import Program, load
from egress_agent.bpf.libbpf import BpfError, errno_of, libbpf

log = logging.getLogger(__name__)

PROGRAM = "egress_cg_mark"  # also its kernel name (at most 15 characters)
MAP = "egress_cgroup_marks"
SOURCE = Path(__file__).resolve().parent / "cgroup_mark.bpf.c"
HEADER = Path(__file__).resolve().parent / "cgroup_mark.h"
BPF_CGROUP_INET_SOCK_CREATE = 2  # enum bpf_attach_type
BPF_F_ALLOW_MULTI = 2
_INFO_SIZE = 256  # >= struct bpf_prog_info; the kernel wants the tail zeroed
_INFO_NAME = slice(64, 80)  # bpf_prog_info.name (char[16])
_VALUE = struct.Struct("=II")  # struct egress_cgroup_mark_value
_KEY = struct.Struct("=Q")


@dataclass(frozen=True, kw_only=True)
class CgroupMarkConfig:
    mark_mask: int
    pin_dir: str  # a folder of its own on bpffs, removed after loading
    cache_dir: str | None = None  # the compile cache (bpf.cache); None: always compile
    max_cgroups: int = 4096


def cflags(config: CgroupMarkConfig) -> list[str]:
    return [
        f"-I{SOURCE.parent}",
        f"-DMARK_MASK={config.mark_mask:#x}",
        f"-DMAX_CGROUPS={config.max_cgroups}",
    ]


def program(config: CgroupMarkConfig) -> Program:
    return Program(
        name=PROGRAM,
        source=SOURCE,
        cflags=tuple(cflags(config)),
        prog_type="CGROUP_SOCK",
        attach_type="CGROUP_INET_SOCK_CREATE",
        maps=(MAP,),
        features="cgroup sock BPF, CAP_BPF",
    )


# -- pure helpers -----------------------------------------------------------


def cgroup2_mount(mountinfo: str) -> str | None:
    """Where cgroup v2 is mounted, from /proc/self/mountinfo text: the first
    ``cgroup2`` mount whose root is the hierarchy's root (``/``)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and rest and rest[0] == "cgroup2" and fields[3] == "/":
            return _unescape(fields[4])
    return None


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and i + 4 <= len(text):
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def desired_marks(paths: dict[str, int], ids: dict[str, int | None]) -> dict[int, int]:
    """Cgroup id -> mark for the paths that exist now (``ids`` from
    :func:`cgroup_id`; None: missing). Two paths naming one cgroup (a bind
    mount, a symlink) keep the first one's mark."""
    out: dict[int, int] = {}
    for path, mark in paths.items():
        ident = ids.get(path)
        if ident is not None:
            out.setdefault(ident, mark)
    return out


def encode_entry(cgroup: int, mark: int) -> tuple[bytes, bytes]:
    return _KEY.pack(cgroup), _VALUE.pack(mark, 0)


def decode_entry(key: bytes, value: bytes) -> tuple[int, int]:
    return _KEY.unpack(key)[0], _VALUE.unpack(value)[0]


# -- kernel side ------------------------------------------------------------


def default_root() -> str | None:
    try:
        return cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None


def cgroup_id(root: str, path: str) -> int | None:
    try:
        st = os.stat(os.path.join(root, path))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    return st.st_ino


def _open_cgroup(root: str, path: str) -> int:
    return os.open(os.path.join(root, path), os.O_RDONLY | os.O_DIRECTORY)


def attached_programs(root: str, path: str) -> list[tuple[int, str]]:
    """(program id, name) of the sock_create programs attached to one cgroup
    itself (not inherited): what ``bpftool cgroup show`` would list."""
    lib = libbpf()
    fd = _open_cgroup(root, path)
    try:
        flags = ct.c_uint32(0)
        ids = (ct.c_uint32 * 64)()
        count = ct.c_uint32(64)
        rc = lib.bpf_prog_query(
            fd, BPF_CGROUP_INET_SOCK_CREATE, 0, ct.byref(flags), ids, ct.byref(count)
        )
        if rc < 0:
            err = errno_of(rc)
            raise OSError(err, f"BPF_PROG_QUERY on cgroup {path}: {os.strerror(err)}")
        out = []
        for prog_id in ids[: count.value]:
            out.append((int(prog_id), _program_name(lib, int(prog_id))))
        return out
    finally:
        os.close(fd)


def _program_name(lib: Any, prog_id: int) -> str:
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return ""
    try:
        buf = ct.create_string_buffer(_INFO_SIZE)
        size = ct.c_uint32(_INFO_SIZE)
        if lib.bpf_obj_get_info_by_fd(fd, buf, ct.byref(size)) < 0:
            return ""
        return buf.raw[_INFO_NAME].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def detach_stale(root: str, paths: list[str], *, only: Collection[int] | None = None) -> list[str]:
    """Detach every program named like the marker from these cgroups (what a
    killed run left), or only those with the ids in ``only``; returns "path
    (id N)" for each one removed."""
    lib = libbpf()
    removed = []
    for path in paths:
        try:
            found = attached_programs(root, path)
        except OSError:
            continue  # missing cgroup: nothing attached there
        for prog_id, name in found:
            if name != PROGRAM or (only is not None and prog_id not in only):
                continue
            prog_fd = lib.bpf_prog_get_fd_by_id(prog_id)
            if prog_fd < 0:
                continue
            try:
                cg = _open_cgroup(root, path)
                try:
                    if lib.bpf_prog_detach2(prog_fd, cg, BPF_CGROUP_INET_SOCK_CREATE) == 0:
                        removed.append(f"{path} (id {prog_id})")
                finally:
                    os.close(cg)
            finally:
                os.close(prog_fd)
    return removed


@dataclass
class _Attached:
    cgroup: int  # the id it had when attached
    mark: int


@dataclass
class SyncResult:
    attached: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)


class CgroupMarker:
    """The loaded marker: program and map descriptors, and where it is attached."""

    def __init__(self, config: CgroupMarkConfig, root: str) -> None:
        self.config = config
        self.root = root
        self._lib = libbpf()
        if not Path(root, "cgroup.controllers").exists():
            raise BpfError(
                "cgroup root",
                f"{root} is not a cgroup v2 mount (no cgroup.controllers there): give the"
                " cgroup2 mount point with --cgroup-root",
            )
        loaded = load(
            program(config),
            Path(config.pin_dir),
            keep_pins=False,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        )
        self.prog_fd = loaded.prog_fd
        self.map = loaded.maps[MAP]
        self.attached: dict[str, _Attached] = {}
        self.marks: dict[int, int] = {}  # what the map holds
        self._reported_missing: set[str] = set()

    def map_items(self) -> dict[int, int]:
        """Cgroup id -> mark as the kernel's map holds them."""
        return dict(decode_entry(key, value) for key, value in self.map.items().items())

    def sync(self, paths: dict[str, int]) -> SyncResult:
        """Make map and attachments match ``paths`` (cgroup path -> mark)."""
        result = SyncResult()
        ids = {path: cgroup_id(self.root, path) for path in paths}
        want = desired_marks(paths, ids)
        # Map first: a socket created right after attaching finds its entry.
        for cgroup, mark in want.items():
            if self.marks.get(cgroup) != mark:
                self.map.update(*encode_entry(cgroup, mark))
        for cgroup in set(self.marks) - set(want):
            self.map.delete(encode_entry(cgroup, 0)[0])
        self.marks = want
        for path in list(self.attached):
            now = ids.get(path)
            if path not in paths:
                self._detach(path)
                result.detached.append(path)
            elif now != self.attached[path].cgroup:
                # Removed (its attachment went with it), or removed and made
                # again: the new cgroup has no program yet.
                del self.attached[path]
        for path, mark in paths.items():
            ident = ids[path]
            if ident is None:
                if path not in self._reported_missing:
                    result.missing.append(path)
                    self._reported_missing.add(path)
                continue
            self._reported_missing.discard(path)
            if path in self.attached:
                self.attached[path].mark = mark
                continue
            fd = _open_cgroup(self.root, path)
            try:
                rc = self._lib.bpf_prog_attach(
                    self.prog_fd, fd, BPF_CGROUP_INET_SOCK_CREATE, BPF_F_ALLOW_MULTI
                )
            finally:
                os.close(fd)
            if rc < 0:
                err = errno_of(rc)
                raise OSError(err, f"attach {PROGRAM} to cgroup {path}: {os.strerror(err)}")
            self.attached[path] = _Attached(cgroup=ident, mark=mark)
            result.attached.append(path)
        return result

    def _detach(self, path: str) -> None:
        entry = self.attached.pop(path)
        if cgroup_id(self.root, path) != entry.cgroup:
            return  # the cgroup is gone, and its attachment with it
        with contextlib.suppress(OSError):
            fd = _open_cgroup(self.root, path)
            try:
                self._lib.bpf_prog_detach2(self.prog_fd, fd, BPF_CGROUP_INET_SOCK_CREATE)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Detach everywhere and release the program and map."""
        for path in list(self.attached):
            self._detach(path)
        self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.prog_fd)

    def status(self) -> dict[str, Any]:
        return {
            "program": PROGRAM,
            "attached": sorted(self.attached),
            "cgroup_ids": {p: a.cgroup for p, a in sorted(self.attached.items())},
        }
