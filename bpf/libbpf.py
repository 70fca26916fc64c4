"""The bpf(2) calls the agent makes, through libbpf, and the error they share.

The agent never loads bcc itself (see ``build``): it works on pinned
objects with plain bpf(2) calls through Debian's libbpf1 (a dependency of
python3-bpfcc). Map access goes through :class:`RawMap`, a small wrapper
over keys and values as bytes (the layouts are the callers' business) that
tolerates entries vanishing while it iterates and raises ``OSError`` with
the errno.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class BpfError(Exception):
    """A BPF object could not be built, loaded, pinned or opened.

    ``about`` names the object (a program and its source, a map, the pin
    folder); ``reason`` says what went wrong and what to do, in words a user
    can act on."""

    def __init__(self, about: str, reason: str) -> None:
        super().__init__(f"{about}: {reason}")
        self.about = about
        self.reason = reason


class MapCreateOpts(ct.Structure):
    """The head of libbpf's ``struct bpf_map_create_opts``, up to
    ``map_flags``; ``sz`` tells libbpf how much of it the caller knows."""

    _fields_ = [  # noqa: RUF012
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
    ]


class ProgLoadOpts(ct.Structure):
    """The head of libbpf's ``struct bpf_prog_load_opts``, up to
    ``expected_attach_type``."""

    _fields_ = [  # noqa: RUF012
        ("sz", ct.c_size_t),
        ("attempts", ct.c_int),
        ("expected_attach_type", ct.c_uint32),
    ]


_SIGNATURES: tuple[tuple[str, list[Any]], ...] = (
    (
        "bpf_map_create",
        [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.POINTER(MapCreateOpts)],
    ),
    (
        "bpf_prog_load",
        [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t, ct.POINTER(ProgLoadOpts)],
    ),
    ("bpf_map_update_elem", [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]),
    ("bpf_map_lookup_elem", [ct.c_int, ct.c_void_p, ct.c_void_p]),
    ("bpf_map_delete_elem", [ct.c_int, ct.c_void_p]),
    ("bpf_map_get_next_key", [ct.c_int, ct.c_void_p, ct.c_void_p]),
    ("bpf_obj_get", [ct.c_char_p]),
    ("bpf_obj_pin", [ct.c_int, ct.c_char_p]),
    ("bpf_prog_attach", [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]),
    ("bpf_prog_detach2", [ct.c_int, ct.c_int, ct.c_int]),
    (
        "bpf_prog_query",
        [
            ct.c_int,
            ct.c_int,
            ct.c_uint32,
            ct.POINTER(ct.c_uint32),
            ct.POINTER(ct.c_uint32),
            ct.POINTER(ct.c_uint32),
        ],
    ),
    ("bpf_prog_get_fd_by_id", [ct.c_uint32]),
    ("bpf_obj_get_info_by_fd", [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]),
)


@functools.cache
def libbpf() -> Any:
    """libbpf.so.1 with the argument and result types of the calls used here."""
    try:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:  # pragma: no cover - depends on the machine
        raise BpfError(
            "libbpf.so.1",
            f"cannot load it ({exc}): install Debian's libbpf1 (python3-bpfcc brings it)",
        ) from exc
    for name, args in _SIGNATURES:
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ct.c_int
    return lib


def errno_of(rc: int) -> int:
    # libbpf 1.x returns -errno; older builds return -1 and set errno.
    return -rc if rc < -1 else ct.get_errno()


def obj_get(path: Path) -> int:
    """A descriptor for the object pinned at ``path``; ``OSError`` if none."""
    fd: int = libbpf().bpf_obj_get(str(path).encode())
    if fd < 0:
        err = errno_of(fd)
        raise OSError(err, os.strerror(err), str(path))
    return fd


def obj_pin(fd: int, path: Path) -> None:
    rc = libbpf().bpf_obj_pin(fd, str(path).encode())
    if rc < 0:
        err = errno_of(rc)
        raise OSError(err, os.strerror(err), str(path))


def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def fdinfo(fd: int) -> dict[str, str]:
    """``/proc/self/fdinfo`` of a BPF object: prog_id, map_id, key_size, ..."""
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


class RawMap:
    """One BPF map by fd, keys and values as bytes."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self._lib = libbpf()
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    @classmethod
    def open(cls, name: str, fd: int) -> RawMap:
        """The map behind ``fd``, its key and value sizes from the kernel."""
        info = fdinfo(fd)
        return cls(name, fd, int(info["key_size"]), int(info["value_size"]))

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            err = errno_of(rc)
            raise OSError(err, f"{what} {self.name}: {os.strerror(err)}")

    def update(self, key: bytes, value: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(value, self.value_size)
        self._check(self._lib.bpf_map_update_elem(self.fd, k, v, 0), "update")

    def delete(self, key: bytes) -> None:
        k = ct.create_string_buffer(key, self.key_size)
        rc = self._lib.bpf_map_delete_elem(self.fd, k)
        if rc < 0 and errno_of(rc) != errno.ENOENT:  # gone already: what we wanted
            self._check(rc, "delete from")

    def lookup(self, key: bytes) -> bytes | None:
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(self.value_size)
        if self._lib.bpf_map_lookup_elem(self.fd, k, v) < 0:
            return None
        return v.raw

    def lookup_per_cpu(self, key: bytes, width: int, cpus: int) -> list[bytes] | None:
        """A per-CPU map's value: ``width`` bytes from each CPU's 8-aligned slot."""
        slot = (width + 7) // 8 * 8
        k = ct.create_string_buffer(key, self.key_size)
        v = ct.create_string_buffer(slot * cpus)
        if self._lib.bpf_map_lookup_elem(self.fd, k, v) < 0:
            return None
        return [v.raw[i * slot : i * slot + width] for i in range(cpus)]

    def zero_per_cpu(self, key: bytes, width: int, cpus: int) -> None:
        """Set a per-CPU map's value to zero on every CPU."""
        slot = (width + 7) // 8 * 8
        k = ct.create_string_buffer(key, self.key_size)
        zeros = ct.create_string_buffer(slot * cpus)
        self._check(self._lib.bpf_map_update_elem(self.fd, k, zeros, 0), "update")

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
