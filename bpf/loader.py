"""Compile, load and pin the classifier, and update its maps.

Configuration reaches the C source only through ``-D`` flags (:func:`cflags`);
the source is read from the installed package, never from the working
directory. ``dump`` prints what would be loaded. bcc compiles and loads in a
short-lived child process (``python -m egress_agent.bpf.loader``, see
:class:`Classifier`); the agent itself works on the pinned objects through
libbpf. Map access goes through :class:`RawMap`, a small wrapper over the
bpf(2) calls on raw key/value bytes (the layouts are in ``layout``) that
tolerates entries vanishing while it iterates and raises ``OSError`` with
the errno.

Objects are pinned under one bpffs folder of the agent's own (``pin_dir``):
the program and every map, so operators can find them and a later start can
remove what a crashed run left. bpffs is mounted there first if needed: each
``ip netns exec`` gets a mount namespace (and /sys) of its own, so the
agent makes sure the folder really is on bpffs in its own view.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
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
        f"// pinned  {config.pin_dir}/{{{PROGRAM},"
        f"{','.join((*layout.CONFIG_MAPS, *layout.COUNTER_MAPS))}}}",
        "",
        SOURCE.read_text(),
    ]
    return "\n".join(lines)


def _libbpf() -> Any:
    """libbpf (Debian libbpf1, a dependency of python3-bpfcc) for map and pin
    calls: the agent never loads bcc itself (see :class:`Classifier`)."""
    try:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:  # pragma: no cover - depends on the machine
        raise BpfError(
            "libbpf.so.1 is missing: install Debian's libbpf1 (python3-bpfcc brings it)"
        ) from exc
    for name, args in (
        ("bpf_map_update_elem", [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]),
        ("bpf_map_lookup_elem", [ct.c_int, ct.c_void_p, ct.c_void_p]),
        ("bpf_map_delete_elem", [ct.c_int, ct.c_void_p]),
        ("bpf_map_get_next_key", [ct.c_int, ct.c_void_p, ct.c_void_p]),
        ("bpf_obj_get", [ct.c_char_p]),
        ("bpf_obj_pin", [ct.c_int, ct.c_char_p]),
    ):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ct.c_int
    return lib


def _errno(rc: int) -> int:
    # libbpf 1.x returns -errno; older builds return -1 and set errno.
    return -rc if rc < -1 else ct.get_errno()


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


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
            err = _errno(rc)
            raise OSError(err, f"{what} {self.name}: {os.strerror(err)}")

    def update(self, key: bytes, value: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(value, self.value_size)
        self._check(self._lib.bpf_map_update_elem(self.fd, k, v, 0), "update")

    def delete(self, key: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        rc = self._lib.bpf_map_delete_elem(self.fd, k)
        if rc < 0 and _errno(rc) != errno.ENOENT:  # gone already: what we wanted
            err = _errno(rc)
            raise OSError(err, f"delete from {self.name}: {os.strerror(err)}")

    def lookup(self, key: bytes) -> bytes | None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(self.value_size)
        if self._lib.bpf_map_lookup_elem(self.fd, k, v) < 0:
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
            rc = self._lib.bpf_map_get_next_key(self.fd, None if first else cur, nxt)
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

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def fdinfo(fd: int) -> dict[str, str]:
    """``/proc/self/fdinfo`` of a BPF object: prog_id, map_id, key_size, ..."""
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


class Classifier:
    """The loaded classifier: program fd, maps, pins.

    bcc compiles with LLVM inside the calling process, and what that leaves
    behind is far bigger than the agent (about 175 MiB of resident memory,
    never returned). So a short-lived child process compiles, loads and pins
    (``python -m egress_agent.bpf.loader``), and the agent opens the pins with
    plain bpf(2) calls through libbpf. The child's compiler and verifier
    messages go to the agent's stderr; its last stdout line says what
    happened.
    """

    def __init__(self, config: BpfConfig) -> None:
        self.config = config
        self._lib = _libbpf()
        pin_dir = Path(config.pin_dir)
        if not Path(f"/lib/modules/{os.uname().release}/build").exists():
            raise BpfError(
                f"no kernel headers at /lib/modules/{os.uname().release}/build: bcc compiles"
                " against them (./run setup links Debian's linux-headers there)"
            )
        ensure_bpffs(pin_dir)
        remove_pins(pin_dir)
        proc = subprocess.run(
            [sys.executable, "-m", "egress_agent.bpf.loader", json.dumps(_config_json(config))],
            stdout=subprocess.PIPE,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            answer = {}
        if proc.returncode != 0 or "error" in answer or not answer:
            remove_pins(pin_dir)
            reason = answer.get("error") or f"the loader exited with {proc.returncode}"
            raise BpfError(reason)
        self.pinned = [pin_dir / name for name in (PROGRAM, *answer["maps"])]
        self.prog_fd = self._open(pin_dir / PROGRAM)
        self.prog_id = int(fdinfo(self.prog_fd).get("prog_id", "0"))
        self.maps: dict[str, RawMap] = {}
        for name in answer["maps"]:
            fd = self._open(pin_dir / name)
            info = fdinfo(fd)
            self.maps[name] = RawMap(
                self._lib, name, fd, int(info["key_size"]), int(info["value_size"])
            )
        self._cpus = possible_cpus()

    def _open(self, path: Path) -> int:
        fd: int = self._lib.bpf_obj_get(str(path).encode())
        if fd < 0:
            err = _errno(fd)
            raise BpfError(f"cannot open the pinned {path.name} at {path}: {os.strerror(err)}")
        return fd

    def map_ids(self) -> dict[str, int]:
        return {name: int(fdinfo(m.fd).get("map_id", "0")) for name, m in self.maps.items()}

    def close(self) -> None:
        """Unpin and release; the program stays alive only while a tc filter holds it."""
        remove_pins(Path(self.config.pin_dir))
        self.pinned.clear()
        for m in self.maps.values():
            m.close()
        with contextlib.suppress(OSError):
            os.close(self.prog_fd)

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

    def _per_cpu(self, m: RawMap, key: bytes, width: int) -> list[bytes] | None:
        slot = (width + 7) // 8 * 8
        k = ct.create_string_buffer(key, m.key_size)
        v = ct.create_string_buffer(slot * self._cpus)
        if self._lib.bpf_map_lookup_elem(m.fd, k, v) < 0:
            return None
        return [v.raw[i * slot : i * slot + width] for i in range(self._cpus)]

    def _sum_per_cpu(self, m: RawMap, key: bytes, layout_: Any) -> tuple[int, ...] | None:
        """A per-CPU value's fields (a ``struct.Struct`` of u64s), summed over CPUs."""
        values = self._per_cpu(m, key, layout_.size)
        if values is None:
            return None
        sums = [0] * len(layout_.unpack(values[0]))
        for raw in values:
            for i, n in enumerate(layout_.unpack(raw)):
                sums[i] += n
        return tuple(sums)

    def counters(self) -> dict[int, tuple[int, ...]]:
        """Workload id -> (marked packets, bytes, passed packets, bytes,
        dropped packets, bytes), all CPUs."""
        m = self.maps[layout.COUNTERS]
        out = {}
        for key in list(m.keys()):
            sums = self._sum_per_cpu(m, key, layout.COUNTER)
            if sums is not None:
                out[layout.unpack_u32(key)] = sums
        return out

    def reasons(self) -> dict[layout.Reason, int]:
        """Packets by reason, all CPUs."""
        m = self.maps[layout.REASONS]
        out = {}
        for reason in layout.Reason:
            values = self._per_cpu(m, layout.u32(reason.value), 8)
            out[reason] = sum(map(layout.unpack_u64, values or []))
        return out

    def non_tcp(self) -> dict[int, tuple[int, int]]:
        """Rule bit -> (packets, bytes) of non-TCP marked for it, all CPUs;
        only rules that counted any."""
        m = self.maps[layout.NON_TCP]
        out = {}
        for bit in range(layout.MAX_RULES):
            sums = self._sum_per_cpu(m, layout.u32(bit), layout.RULE_COUNTER)
            if sums is not None and sums[0]:
                out[bit] = (sums[0], sums[1])
        return out

    def reset_non_tcp(self, bits: Iterable[int]) -> None:
        """Zero the non-TCP counters of these rule bits on every CPU."""
        m = self.maps[layout.NON_TCP]
        slot = (layout.RULE_COUNTER.size + 7) // 8 * 8
        zeros = ct.create_string_buffer(slot * self._cpus)
        for bit in bits:
            k = ct.create_string_buffer(layout.u32(bit), m.key_size)
            rc = self._lib.bpf_map_update_elem(m.fd, k, zeros, 0)
            if rc < 0:
                err = _errno(rc)
                raise OSError(err, f"update {m.name}: {os.strerror(err)}")

    def forget_workloads(self, ids: Mapping[str, int]) -> None:
        """Drop counters of workload ids no longer in use."""
        live = set(ids.values())
        m = self.maps[layout.COUNTERS]
        for key in list(m.keys()):
            if layout.unpack_u32(key) not in live:
                m.delete(key)


COMPILE_TIMEOUT = 120.0


def _config_json(config: BpfConfig) -> dict[str, Any]:
    raw = dataclasses.asdict(config)
    raw["proxy_v4"], raw["proxy_v6"] = str(config.proxy_v4), str(config.proxy_v6)
    return raw


def _compile_and_pin(config: BpfConfig) -> dict[str, Any]:
    """In the loader child: compile with bcc, load, pin everything."""
    names = [*layout.CONFIG_MAPS, *layout.COUNTER_MAPS]
    return compile_load_pin(
        source=SOURCE,
        cflags=cflags(config),
        program=PROGRAM,
        prog_type="SCHED_CLS",
        maps=names,
        pin_dir=Path(config.pin_dir),
        features="tc BPF, LPM tries, CAP_BPF",
    )


def compile_load_pin(
    *,
    source: Path,
    cflags: list[str],
    program: str,
    prog_type: str,
    maps: list[str],
    pin_dir: Path,
    features: str,
    attach_type: str | None = None,
) -> dict[str, Any]:
    """In a loader child: compile ``source`` with bcc, load ``program`` (a
    ``bcc.BPF`` program type name, optionally with a ``bcc.BPFAttachType``
    name), pin it and ``maps`` under ``pin_dir``. Returns ``{"maps": [...]}``,
    or ``{"error": ...}`` naming what failed; bcc prints the compiler's
    messages and the verifier log to stderr itself."""
    try:
        import bcc
    except ImportError:
        return {
            "error": "the bcc Python bindings are missing: install Debian's python3-bpfcc and"
            " use a virtualenv made with --system-site-packages (./run setup does both)"
        }
    try:
        bpf = bcc.BPF(src_file=str(source).encode(), cflags=cflags)
    except Exception as exc:
        return {"error": f"compilation failed ({exc}); the compiler's messages are above"}
    try:
        kind = getattr(bcc.BPF, prog_type)
        if attach_type is None:
            fn = bpf.load_func(program.encode(), kind)
        else:
            fn = bpf.load_func(
                program.encode(), kind, attach_type=getattr(bcc.BPFAttachType, attach_type)
            )
    except Exception as exc:
        return {
            "error": f"the kernel refused the program ({exc}): verifier rejection or a"
            f" missing kernel feature ({features}); the verifier log is above"
        }
    lib = _libbpf()
    pin_dir.mkdir(mode=0o700, exist_ok=True)
    objects = [(program, fn.fd)] + [(n, bpf.get_table(n).map_fd) for n in maps]
    for name, fd in objects:
        path = pin_dir / name
        rc = lib.bpf_obj_pin(fd, str(path).encode())
        if rc < 0:
            return {"error": f"cannot pin {name} at {path}: {os.strerror(_errno(rc))}"}
    return {"maps": maps}


def _loader_main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    raw["proxy_v4"] = ipaddress.IPv4Address(raw["proxy_v4"])
    raw["proxy_v6"] = ipaddress.IPv6Address(raw["proxy_v6"])
    answer = _compile_and_pin(BpfConfig(**raw))
    print(json.dumps(answer), flush=True)
    return 1 if "error" in answer else 0


def ensure_bpffs(pin_dir: Path) -> None:
    """Mount bpffs on the pin folder's parent when that is not bpffs yet:
    only on a folder that is empty (as /sys/fs/bpf is before bpffs is
    mounted there) or that does not exist yet, never over one with contents,
    which the mount would hide."""
    parent = pin_dir.parent
    if _is_bpffs(parent):
        return
    try:
        occupied = parent.is_dir() and any(parent.iterdir())
    except OSError as exc:
        raise BpfError(f"cannot use {parent} for BPF pins: {exc}") from exc
    if occupied:
        raise BpfError(
            f"the BPF pin folder {pin_dir} is not on bpffs and its parent {parent} is a"
            " folder with contents, which mounting bpffs there would hide: choose a pin"
            " folder on bpffs (--bpf-pin-dir under /sys/fs/bpf)"
        )
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


if __name__ == "__main__":
    sys.exit(_loader_main(sys.argv[1:]))
