"""Build a BPF program from its ``.bpf.c`` source and load it: one way for
every program the agent has (the classifier, the cgroup socket marker).

bcc compiles with LLVM inside the calling process, and what that leaves
behind is far bigger than the agent (about 175 MiB of resident memory,
never returned). So :func:`load` runs a short-lived child process
(``python -m egress_agent.bpf.build``) that compiles, loads and pins the
program and its maps under a pin folder; the agent then opens the pins
with plain bpf(2) calls (``libbpf``). The child's compiler and verifier
messages go to the agent's stderr; its last stdout line says what happened.

Configuration reaches a C source only through ``-D`` flags (each program's
``cflags``); sources are read from the installed package, never from the
working directory.

A compile is also written to the compile cache (``cache``), and a later
load of the same program with the same flags skips the child: it creates
the maps and loads the cached bytecode with plain bpf(2) calls (tens of
milliseconds instead of seconds), then pins them exactly as the child would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_agent.bpf import cache, pins
from egress_agent.bpf.libbpf import BpfError, RawMap, fdinfo, libbpf, obj_get, obj_pin

log = logging.getLogger(__name__)

COMPILE_TIMEOUT = 120.0


@dataclass(frozen=True, kw_only=True)
class Program:
    """One program to build: its source and flags, its bcc program type
    (``bcc.BPF`` attribute name, with a ``bcc.BPFAttachType`` name where the
    type needs one), the maps to keep, and the kernel features it needs (for
    the message when the kernel refuses it)."""

    name: str
    source: Path
    cflags: tuple[str, ...]
    prog_type: str
    attach_type: str | None = None
    maps: tuple[str, ...]
    features: str

    @property
    def about(self) -> str:
        """How errors name the program."""
        return f"BPF program {self.name} ({self.source.name})"


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """A loaded program's descriptor and id, and its maps."""

    prog_fd: int
    prog_id: int
    maps: dict[str, RawMap]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        with contextlib.suppress(OSError):
            os.close(self.prog_fd)


def check_kernel_headers(program: Program) -> None:
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not build.exists():
        raise BpfError(
            program.about,
            f"no kernel headers at {build}: bcc compiles against them"
            " (./run setup links Debian's linux-headers there)",
        )


def load(
    program: Program, pin_dir: Path, *, keep_pins: bool, cache_dir: Path | None = None
) -> Loaded:
    """Build ``program`` (from the compile cache in ``cache_dir`` when it
    holds this build, else in a child that also fills the cache), then open
    what was pinned under ``pin_dir`` (emptied first: a crashed run's pins
    go). With ``keep_pins`` the pins stay until the caller removes them
    (``pins.remove_pins``); otherwise they go at once and the descriptors
    keep the objects alive. Raises :class:`BpfError` naming the program, a
    map or the pin folder."""
    libbpf()
    pins.ensure_bpffs(pin_dir)
    pins.remove_pins(pin_dir)
    entry_file = _cache_entry_file(program, cache_dir)
    if entry_file is not None and _load_cached(program, pin_dir, entry_file):
        return _opened(program, pin_dir, keep_pins=keep_pins)
    check_kernel_headers(program)
    started = time.monotonic()
    spec = _spec(program, pin_dir) | {"cache_file": str(entry_file) if entry_file else None}
    proc = subprocess.run(
        [sys.executable, "-m", "egress_agent.bpf.build", json.dumps(spec)],
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
        pins.remove_pins(pin_dir)
        reason = answer.get("error") or f"the loader exited with {proc.returncode}"
        raise BpfError(answer.get("about") or program.about, reason)
    log.info(
        "%s compiled in %.1f s%s",
        program.about,
        time.monotonic() - started,
        f"; cached in {entry_file.parent}" if entry_file and answer.get("cached") else "",
    )
    return _opened(program, pin_dir, keep_pins=keep_pins)


def _opened(program: Program, pin_dir: Path, *, keep_pins: bool) -> Loaded:
    try:
        loaded = _open(program, pin_dir)
    except BaseException:
        pins.remove_pins(pin_dir)
        raise
    if not keep_pins:
        pins.remove_pins(pin_dir)
    return loaded


def _cache_entry_file(program: Program, cache_dir: Path | None) -> Path | None:
    if cache_dir is None or not cache.prepare_folder(cache_dir):
        return None
    try:
        key = cache.cache_key(
            name=program.name,
            source=program.source,
            cflags=program.cflags,
            prog_type=program.prog_type,
            attach_type=program.attach_type,
        )
    except OSError as exc:
        log.warning("%s: no compile cache (%s)", program.about, exc)
        return None
    return cache.entry_path(cache_dir, program.name, key)


def _load_cached(program: Program, pin_dir: Path, entry_file: Path) -> bool:
    """Load and pin the cached build; ``False`` (the entry removed) when
    there is none or the kernel refuses it, and the caller compiles."""
    entry = cache.read(entry_file)
    if entry is None:
        return False
    started = time.monotonic()
    try:
        prog_fd, map_fds = cache.load(entry)
    except cache.CacheUnusable as exc:
        log.warning("%s: the cached build did not load (%s); compiling", program.about, exc)
        cache.discard(entry_file)
        return False
    try:
        failure = _pin_all([(program.name, prog_fd), *map_fds.items()], pin_dir)
    finally:
        for fd in (prog_fd, *map_fds.values()):
            os.close(fd)
    if failure is not None:
        pins.remove_pins(pin_dir)
        raise BpfError(failure["about"], failure["error"])
    log.info(
        "%s loaded from the compile cache in %.0f ms",
        program.about,
        (time.monotonic() - started) * 1000,
    )
    return True


def _pin_all(objects: list[tuple[str, int]], pin_dir: Path) -> dict[str, str] | None:
    """Pin each object under ``pin_dir``; the error answer if one fails."""
    pin_dir.mkdir(mode=0o700, exist_ok=True)
    for name, fd in objects:
        path = pin_dir / name
        try:
            obj_pin(fd, path)
        except OSError as exc:
            return {
                "about": pins.about(pin_dir),
                "error": f"cannot pin {name} at {path}: {exc.strerror} (the folder must be on"
                " bpffs and writable by the agent: check --bpf-pin-dir)",
            }
    return None


def _open(program: Program, pin_dir: Path) -> Loaded:
    opened: list[int] = []

    def get(kind: str, name: str) -> int:
        path = pin_dir / name
        try:
            fd = obj_get(path)
        except OSError as exc:
            for done in opened:
                os.close(done)
            raise BpfError(
                f"BPF {kind} {name}",
                f"cannot open its pin {path}: {exc.strerror} (pinned a moment ago: does"
                " another agent use the same pin folder? give each its own --bpf-pin-dir)",
            ) from exc
        opened.append(fd)
        return fd

    prog_fd = get("program", program.name)
    fds = {name: get("map", name) for name in program.maps}
    return Loaded(
        prog_fd=prog_fd,
        prog_id=int(fdinfo(prog_fd).get("prog_id", "0")),
        maps={name: RawMap.open(name, fd) for name, fd in fds.items()},
    )


def _spec(program: Program, pin_dir: Path) -> dict[str, Any]:
    return {
        "name": program.name,
        "source": str(program.source),
        "cflags": list(program.cflags),
        "prog_type": program.prog_type,
        "attach_type": program.attach_type,
        "maps": list(program.maps),
        "features": program.features,
        "pin_dir": str(pin_dir),
    }


# -- in the child -------------------------------------------------------------


def compile_load_pin(
    program: Program, pin_dir: Path, cache_file: Path | None = None
) -> dict[str, Any]:
    """Compile the source with bcc, load the program, pin it and its maps
    under ``pin_dir``. Returns ``{"maps": [...]}``, or ``{"error": ...}``
    (with ``"about"`` when the error is not about the program itself); bcc
    prints the compiler's messages and the verifier log to stderr itself."""
    try:
        import bcc
    except ImportError:
        return {
            "error": "the bcc Python bindings are missing: install Debian's python3-bpfcc and"
            " use a virtualenv made with --system-site-packages (./run setup does both)"
        }
    try:
        bpf = bcc.BPF(src_file=str(program.source).encode(), cflags=list(program.cflags))
    except Exception as exc:
        return {"error": f"compilation failed ({exc}); the compiler's messages are above"}
    try:
        kind = getattr(bcc.BPF, program.prog_type)
        if program.attach_type is None:
            fn = bpf.load_func(program.name.encode(), kind)
        else:
            fn = bpf.load_func(
                program.name.encode(),
                kind,
                attach_type=getattr(bcc.BPFAttachType, program.attach_type),
            )
    except Exception as exc:
        return {
            "error": f"the kernel refused the program ({exc}): verifier rejection or a"
            f" missing kernel feature ({program.features}); the verifier log is above"
        }
    map_fds = {n: bpf.get_table(n).map_fd for n in program.maps}
    failure = _pin_all([(program.name, fn.fd), *map_fds.items()], pin_dir)
    if failure is not None:
        return failure
    answer: dict[str, Any] = {"maps": list(program.maps)}
    if cache_file is not None:
        try:
            cache.write(
                cache_file,
                cache.Entry(
                    name=program.name,
                    prog_type=int(kind),
                    attach_type=(
                        int(getattr(bcc.BPFAttachType, program.attach_type))
                        if program.attach_type
                        else 0
                    ),
                    license=bcc.lib.bpf_module_license(bpf.module).decode(),
                    insns=bpf.dump_func(program.name.encode()),
                    maps=tuple(cache.map_spec(n, fd) for n, fd in map_fds.items()),
                ),
            )
            answer["cached"] = True
        except (OSError, cache.CacheUnusable) as exc:
            print(f"not cached: {exc}", file=sys.stderr)
    return answer


def _main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    pin_dir = Path(raw.pop("pin_dir"))
    program = Program(
        name=raw["name"],
        source=Path(raw["source"]),
        cflags=tuple(raw["cflags"]),
        prog_type=raw["prog_type"],
        attach_type=raw["attach_type"],
        maps=tuple(raw["maps"]),
        features=raw["features"],
    )
    cache_file = raw.pop("cache_file", None)
    answer = compile_load_pin(program, pin_dir, Path(cache_file) if cache_file else None)
    print(json.dumps(answer), flush=True)
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
