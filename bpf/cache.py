"""A cache of compiled BPF programs, so that a start skips the compiler.

bcc compiles a program's C source with LLVM every time it loads it: seconds
on an idle machine, tens of seconds on a busy one, and while an agent
restarts under ``fail: closed`` its workloads' new connections are refused
for that long. What bcc hands the kernel is only bytecode plus the maps it
refers to, and both depend on nothing but the source, its ``-D`` flags, the
headers and the compiler. So after a compile the child (``build``) writes
an *entry*: the program's instructions, its type, licence and attach type,
and each map's type, sizes, flags and the descriptor number the bytecode
used for it. A later load with the same key creates fresh maps with plain
bpf(2) calls, puts their descriptors where the old numbers were (the
``ld_imm64`` map references), and loads the instructions: the kernel
computes the same program tag as for the compiled load, since it hashes
the instructions with map references blanked.

The key covers everything the bytecode depends on: the source and every
header beside it, the flags, the kernel's release and build, and the
installed bcc. An entry that fails to load is removed and the program
compiled again, so a stale entry costs one compile, never a start.

A cache entry is code the agent hands the kernel, so it is trusted only as
far as its folder: the folder and the entry must belong to the agent's
user and be writable by nobody else, and entries are never followed
through symbolic links; anything else is ignored (with a warning) and the
program compiled.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import hashlib
import importlib.util
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from egress_agent.bpf.libbpf import MapCreateOpts, ProgLoadOpts, errno_of, fdinfo, libbpf

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/egress-agent/bpf"
CACHE_ENV = "EGRESS_AGENT_BPF_CACHE_DIR"
FORMAT = 1
KEEP_ENTRIES = 16  # per program; the oldest go when a new one is written

_INSN = struct.Struct("<BBhi")  # code, dst:4|src:4, offset, immediate
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_PSEUDO_MAP_VALUE = 2


class CacheUnusable(Exception):
    """An entry that cannot be written or loaded; the caller compiles."""


def cache_dir_from(value: str | None) -> Path | None:
    """The folder from ``--bpf-cache-dir`` (or its environment default);
    ``None`` when caching is off (``""`` or ``none``)."""
    if value is None:
        value = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
    if value.strip().lower() in ("", "none", "off"):
        return None
    return Path(value)


@dataclass(frozen=True, kw_only=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    fd: int  # the descriptor number the cached instructions refer to


@dataclass(frozen=True, kw_only=True)
class Entry:
    name: str
    prog_type: int
    attach_type: int
    license: str
    insns: bytes
    maps: tuple[MapSpec, ...]


# -- the key ------------------------------------------------------------------


def cache_key(
    *, name: str, source: Path, cflags: tuple[str, ...], prog_type: str, attach_type: str | None
) -> str:
    """A digest of everything the compiled bytecode depends on."""
    digest = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    part("format", str(FORMAT).encode())
    part("program", f"{name}|{prog_type}|{attach_type}".encode())
    part("source", source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        part(f"header {header.name}", header.read_bytes())
    part("cflags", "\0".join(cflags).encode())
    uname = os.uname()
    part("kernel", f"{uname.release}|{uname.version}|{uname.machine}".encode())
    part("bcc", _bcc_identity().encode())
    return digest.hexdigest()


def _bcc_identity() -> str:
    """Which bcc would compile: its Python package and the libbcc it loads,
    by path, size and modification time (an upgrade changes them)."""
    parts = []
    spec = importlib.util.find_spec("bcc")
    if spec is not None and spec.origin:
        parts.append(_file_identity(Path(spec.origin)))
    folders = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
    for folder in folders:
        lib = Path(folder) / "libbcc.so.0"
        if lib.exists():
            parts.append(_file_identity(lib.resolve()))
            break
    return "|".join(parts)


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def entry_path(folder: Path, name: str, key: str) -> Path:
    return folder / f"{name}-{key[:32]}.json"


# -- trusting the folder --------------------------------------------------------


def _trusted(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` must not be trusted, or ``None`` if it may be."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if folder != stat.S_ISDIR(st.st_mode):
        return "is not a folder" if folder else "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to the agent's uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def prepare_folder(folder: Path) -> bool:
    """Create the cache folder (mode 0700) if missing; whether it may be used."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.warning(
            "BPF compile cache %s cannot be created (%s): compiling every time;"
            " give --bpf-cache-dir a folder the agent may write, or 'none'",
            folder,
            exc.strerror,
        )
        return False
    why = _trusted(folder, folder=True)
    if why is not None:
        log.warning(
            "BPF compile cache %s %s: not using it (an entry is code the kernel runs);"
            " fix its owner and mode (chmod 700) or give --bpf-cache-dir another folder",
            folder,
            why,
        )
        return False
    return True


# -- reading and writing entries -------------------------------------------------


def read(path: Path) -> Entry | None:
    """The entry at ``path`` if there is one that may be trusted."""
    why = _trusted(path, folder=False)
    if why == "missing":
        return None
    if why is not None:
        log.warning("BPF compile cache entry %s %s: ignoring it and compiling", path, why)
        return None
    try:
        raw = json.loads(path.read_text())
        return Entry(
            name=str(raw["name"]),
            prog_type=int(raw["prog_type"]),
            attach_type=int(raw["attach_type"]),
            license=str(raw["license"]),
            insns=bytes.fromhex(raw["insns"]),
            maps=tuple(MapSpec(**m) for m in raw["maps"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("BPF compile cache entry %s is unreadable (%s): compiling", path, exc)
        discard(path)
        return None


def write(path: Path, entry: Entry) -> None:
    """Write ``entry`` atomically (a reader sees the old entry, the new one or
    none), then drop the program's oldest entries beyond ``KEEP_ENTRIES``."""
    referenced = set(map_references(entry.insns))
    known = {m.fd for m in entry.maps}
    if not referenced <= known:
        raise CacheUnusable(
            f"the bytecode refers to maps {sorted(referenced - known)} that are not kept"
        )
    text = json.dumps(
        {
            "format": FORMAT,
            "name": entry.name,
            "prog_type": entry.prog_type,
            "attach_type": entry.attach_type,
            "license": entry.license,
            "insns": entry.insns.hex(),
            "maps": [m.__dict__ for m in entry.maps],
        }
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _prune(path.parent, entry.name)


def _prune(folder: Path, name: str) -> None:
    entries = sorted(folder.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in entries[:-KEEP_ENTRIES]:
        discard(old)


def discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def map_spec(name: str, fd: int) -> MapSpec:
    """A map's creation parameters, read back from the kernel."""
    info = fdinfo(fd)
    return MapSpec(
        name=name,
        map_type=int(info["map_type"], 0),
        key_size=int(info["key_size"], 0),
        value_size=int(info["value_size"], 0),
        max_entries=int(info["max_entries"], 0),
        flags=int(info["map_flags"], 0),
        fd=fd,
    )


# -- the bytecode -------------------------------------------------------------


def map_references(insns: bytes) -> list[int]:
    """The map descriptor numbers the ``ld_imm64`` map references hold."""
    return [imm for _, imm in _map_reference_slots(insns)]


def _map_reference_slots(insns: bytes) -> list[tuple[int, int]]:
    if len(insns) % _INSN.size:
        raise CacheUnusable(f"{len(insns)} bytes of instructions is not a whole number")
    slots = []
    i = 0
    while i < len(insns):
        code, regs, _, imm = _INSN.unpack_from(insns, i)
        if code == _LD_IMM64:
            if (regs >> 4) in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                slots.append((i, imm))
            elif regs >> 4:
                raise CacheUnusable(f"an ld_imm64 of kind {regs >> 4} this cache does not relocate")
            i += 2 * _INSN.size
            continue
        i += _INSN.size
    return slots


def relocate(insns: bytes, fds: dict[int, int]) -> bytes:
    """``insns`` with each map reference's old descriptor number replaced."""
    out = bytearray(insns)
    for offset, old in _map_reference_slots(insns):
        code, regs, off, _ = _INSN.unpack_from(insns, offset)
        _INSN.pack_into(out, offset, code, regs, off, fds[old])
    return bytes(out)


# -- loading an entry ---------------------------------------------------------------


def load(entry: Entry) -> tuple[int, dict[str, int]]:
    """Create the entry's maps and load its program: the program's
    descriptor and the maps' by name. Raises ``CacheUnusable`` (with the
    errno) when the kernel refuses either; nothing is left open then."""
    lib = libbpf()
    created: dict[str, int] = {}
    try:
        for spec in entry.maps:
            opts = MapCreateOpts(sz=ct.sizeof(MapCreateOpts), map_flags=spec.flags)
            fd = lib.bpf_map_create(
                spec.map_type,
                spec.name.encode(),
                spec.key_size,
                spec.value_size,
                spec.max_entries,
                ct.byref(opts),
            )
            if fd < 0:
                err = errno_of(fd)
                raise CacheUnusable(f"creating map {spec.name}: {os.strerror(err)}")
            created[spec.name] = fd
        by_old = {spec.fd: created[spec.name] for spec in entry.maps}
        insns = relocate(entry.insns, by_old)
        buf = ct.create_string_buffer(insns, len(insns))
        popts = ProgLoadOpts(sz=ct.sizeof(ProgLoadOpts), expected_attach_type=entry.attach_type)
        prog_fd = lib.bpf_prog_load(
            entry.prog_type,
            entry.name.encode(),
            entry.license.encode(),
            buf,
            len(insns) // _INSN.size,
            ct.byref(popts),
        )
        if prog_fd < 0:
            err = errno_of(prog_fd)
            raise CacheUnusable(f"loading program {entry.name}: {os.strerror(err)}")
    except BaseException:
        for fd in created.values():
            os.close(fd)
        raise
    return prog_fd, created
