"""Compile, load, pin and update the classifier with bcc.

The one module that talks to bcc. Configuration reaches the C source only
through ``-D`` flags (:func:`cflags`); the source is read from the installed
package, never from the working directory. ``dump`` prints what would be
loaded. Map access goes through :class:`RawMap`, a small wrapper over the
bpf(2) calls in libbcc that works on raw key/value bytes (the layouts are in
``layout``), tolerates entries vanishing while it iterates, and raises
``OSError`` with the errno.

Objects are pinned under one bpffs folder of the agent's own (``pin_dir``):
the program and every map, so operators can find them and a later start can
remove what a crashed run left. bpffs is mounted there first if needed: each
``ip netns exec`` gets a mount namespace (and /sys) of its own, so the
agent makes sure the folder really is on bpffs in its own view.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import ipaddress
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_agent.bpf import layout
from egress_agent.bpf.maps import MapContents, MapDiff

log = logging.getLogger(__name__)

PROGRAM = "egress_classify"
SOURCE = Path(__file__).resolve().parent / "classifier.bpf.c"
HEADER = Path(__file__).resolve().parent / "egress.h"
DEFAULT_PIN_DIR = "/sys/fs/bpf/egress_agent"
BPF_FS_MAGIC = 0xCAFE4A11  # include/uapi/linux/magic.h


class BpfError(Exception):
    """The classifier could not be compiled, verified, loaded or pinned.
    ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"BPF program {PROGRAM} ({SOURCE.name}): {reason}")
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class BpfConfig:
    divert_mark: int
    upstream_mark: int
    proxy_v4: ipaddress.IPv4Address
    proxy_v6: ipaddress.IPv6Address
    pin_dir: str = DEFAULT_PIN_DIR
    max_sources: int = 65536
    max_destinations: int = 65536
    max_workloads: int = 16384
    max_bindings: int = 16384


def cflags(config: BpfConfig) -> list[str]:
    v6 = int(config.proxy_v6)
    words = [(v6 >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
    return [
        f"-I{SOURCE.parent}",
        f"-DDIVERT_MARK={config.divert_mark:#x}",
        f"-DUPSTREAM_MARK={config.upstream_mark:#x}",
        f"-DPROXY_V4={int(config.proxy_v4):#x}",
        *(f"-DPROXY_V6_{i}={w:#x}" for i, w in enumerate(words)),
        f"-DMAX_SOURCES={config.max_sources}",
        f"-DMAX_DESTINATIONS={config.max_destinations}",
        f"-DMAX_WORKLOADS={config.max_workloads}",
        f"-DMAX_BINDINGS={config.max_bindings}",
    ]


def dump(config: BpfConfig) -> str:
    """What would be loaded: the source, the flags, the pin folder."""
    lines = [
        f"// program {PROGRAM} (tc clsact ingress, direct action)",
        f"// source  {SOURCE}",
        f"// header  {HEADER}",
        f"// cflags  {' '.join(cflags(config))}",
        f"// pinned  {config.pin_dir}/{{{PROGRAM},{','.join(layout.CONFIG_MAPS)},"
        f"{layout.COUNTERS},{layout.REASONS}}}",
        "",
        SOURCE.read_text(),
    ]
    return "\n".join(lines)


def _bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BpfError(
            "the bcc Python bindings are missing: install Debian's python3-bpfcc and use a "
            "virtualenv made with --system-site-packages (./run setup does both)"
        ) from exc
    return bcc


class RawMap:
    """One BPF map by fd, keys and values as bytes."""

    def __init__(self, lib: Any, name: str, fd: int, key_size: int, value_size: int) -> None:
        self._lib = lib
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            err = ct.get_errno()
            raise OSError(err, f"{what} {self.name}: {os.strerror(err)}")

    def update(self, key: bytes, value: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(value, self.value_size)
        self._check(self._lib.bpf_update_elem(self.fd, k, v, 0), "update")

    def delete(self, key: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        if self._lib.bpf_delete_elem(self.fd, k) < 0:
            err = ct.get_errno()
            if err != errno.ENOENT:  # gone already: that is what we wanted
                raise OSError(err, f"delete from {self.name}: {os.strerror(err)}")

    def lookup(self, key: bytes) -> bytes | None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(self.value_size)
        if self._lib.bpf_lookup_elem(self.fd, k, v) < 0:
            return None
        return v.raw

    def keys(self) -> Iterator[bytes]:
        # An entry deleted between two calls makes get_next_key restart from
        # the first key for hash maps; a seen-set keeps that from looping.
        cur = ct.create_string_buffer(self.key_size)
        nxt = ct.create_string_buffer(self.key_size)
        seen: set[bytes] = set()
        first = True
        while True:
            rc = self._lib.bpf_get_next_key(self.fd, None if first else cur, nxt)
            if rc < 0:
                return
            first = False
            key = nxt.raw
            if key in seen:
                return
            seen.add(key)
            yield key
            ct.memmove(cur, nxt, self.key_size)

    def items(self) -> dict[bytes, bytes]:
        out = {}
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out[key] = value
        return out


def fdinfo(fd: int) -> dict[str, str]:
    """``/proc/self/fdinfo`` of a BPF object: prog_id, map_id, ..."""
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


class Classifier:
    """The loaded classifier: program fd, maps, pins."""

    def __init__(self, config: BpfConfig) -> None:
        self.config = config
        bcc = _bcc()
        self._lib = bcc.libbcc.lib
        if not Path(f"/lib/modules/{os.uname().release}/build").exists():
            raise BpfError(
                f"no kernel headers at /lib/modules/{os.uname().release}/build: bcc compiles"
                " against them (./run setup links Debian's linux-headers there)"
            )
        try:
            self._bpf = bcc.BPF(src_file=str(SOURCE).encode(), cflags=cflags(config))
        except Exception as exc:
            raise BpfError(
                f"compilation failed ({exc}); the compiler's messages are above"
            ) from exc
        try:
            self._fn = self._bpf.load_func(PROGRAM.encode(), bcc.BPF.SCHED_CLS)
        except Exception as exc:
            self._bpf.cleanup()
            raise BpfError(
                f"the kernel refused the program ({exc}): verifier rejection or a missing"
                " kernel feature (tc BPF, LPM tries, CAP_BPF); the verifier log is above"
            ) from exc
        self.prog_fd: int = self._fn.fd
        self.prog_id = int(fdinfo(self.prog_fd).get("prog_id", "0"))
        self.maps: dict[str, RawMap] = {}
        for name in (*layout.CONFIG_MAPS, layout.COUNTERS, layout.REASONS):
            table = self._bpf.get_table(name)
            self.maps[name] = RawMap(
                self._lib, name, table.map_fd, ct.sizeof(table.Key), ct.sizeof(table.Leaf)
            )
        self._tables = {
            name: self._bpf.get_table(name) for name in (layout.COUNTERS, layout.REASONS)
        }
        self.pinned: list[Path] = []

    def map_ids(self) -> dict[str, int]:
        return {name: int(fdinfo(m.fd).get("map_id", "0")) for name, m in self.maps.items()}

    # -- pins ---------------------------------------------------------------

    def pin(self) -> None:
        pin_dir = Path(self.config.pin_dir)
        ensure_bpffs(pin_dir)
        remove_pins(pin_dir)
        pin_dir.mkdir(mode=0o700, exist_ok=True)
        pin = self._lib_bpf().bpf_obj_pin
        objects = [(PROGRAM, self.prog_fd)] + [(n, m.fd) for n, m in self.maps.items()]
        for name, fd in objects:
            path = pin_dir / name
            if pin(fd, str(path).encode()) < 0:
                err = ct.get_errno()
                raise BpfError(f"cannot pin {name} at {path}: {os.strerror(err)}")
            self.pinned.append(path)

    def _lib_bpf(self) -> Any:
        lib = self._lib
        lib.bpf_obj_pin.restype = ct.c_int
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        return lib

    def close(self) -> None:
        """Unpin and release; the program stays alive only while a tc filter holds it."""
        remove_pins(Path(self.config.pin_dir))
        self.pinned.clear()
        self._bpf.cleanup()

    # -- maps ---------------------------------------------------------------

    def read(self) -> MapContents:
        """What the config maps hold now."""
        return {name: self.maps[name].items() for name in layout.CONFIG_MAPS}

    def apply(self, change: MapDiff) -> None:
        """Upserts in dependency order (see layout.CONFIG_MAPS), then deletes in
        the reverse order: sources go before the workloads they point at."""
        for name in layout.CONFIG_MAPS:
            target = self.maps[name]
            for key, value in change.upserts.get(name, {}).items():
                target.update(key, value)
        for name in reversed(layout.CONFIG_MAPS):
            target = self.maps[name]
            for key in change.deletes.get(name, ()):
                target.delete(key)

    def counters(self) -> dict[int, tuple[int, int, int, int]]:
        """Workload id -> (diverted packets, bytes, bypassed packets, bytes), all CPUs."""
        out = {}
        table = self._tables[layout.COUNTERS]
        for key, per_cpu in list(table.items()):
            sums = [0, 0, 0, 0]
            for value in per_cpu:
                sums[0] += value.diverted_packets
                sums[1] += value.diverted_bytes
                sums[2] += value.bypassed_packets
                sums[3] += value.bypassed_bytes
            out[int(key.value)] = (sums[0], sums[1], sums[2], sums[3])
        return out

    def reasons(self) -> dict[str, int]:
        table = self._tables[layout.REASONS]
        out = {}
        for reason in layout.Reason:
            with contextlib.suppress(KeyError):
                out[reason.name.lower()] = int(sum(table[table.Key(reason.value)]))
        return out

    def forget_workloads(self, ids: Mapping[str, int]) -> None:
        """Drop counters of workload ids no longer in use."""
        live = set(ids.values())
        table = self._tables[layout.COUNTERS]
        for key in list(table.keys()):
            if int(key.value) not in live:
                with contextlib.suppress(KeyError):
                    del table[key]


def ensure_bpffs(pin_dir: Path) -> None:
    """Mount bpffs on the pin folder's parent when that is not bpffs yet."""
    parent = pin_dir.parent
    if _is_bpffs(parent):
        return
    parent.mkdir(parents=True, exist_ok=True)
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(parent).encode(), b"bpf", 0, None) != 0:
        err = ct.get_errno()
        raise BpfError(
            f"cannot mount bpffs on {parent}: {os.strerror(err)} (needs CAP_SYS_ADMIN, or"
            " mount it beforehand: mount -t bpf bpf /sys/fs/bpf)"
        )


def _is_bpffs(path: Path) -> bool:
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
    if not pin_dir.is_dir() or not _is_bpffs(pin_dir):
        return []
    removed = sorted(p.name for p in pin_dir.iterdir())
    shutil.rmtree(pin_dir, ignore_errors=True)
    return removed
