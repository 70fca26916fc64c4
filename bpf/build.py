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
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_agent.bpf import pins
from egress_agent.bpf.libbpf import BpfError, RawMap, fdinfo, libbpf, obj_get, obj_pin

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


def load(program: Program, pin_dir: Path, *, keep_pins: bool) -> Loaded:
    """Build ``program`` in a child, then open what it pinned under
    ``pin_dir`` (emptied first: a crashed run's pins go). With ``keep_pins``
    the pins stay until the caller removes them (``pins.remove_pins``);
    otherwise they go at once and the descriptors keep the objects alive.
    Raises :class:`BpfError` naming the program, a map or the pin folder."""
    libbpf()
    check_kernel_headers(program)
    pins.ensure_bpffs(pin_dir)
    pins.remove_pins(pin_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "egress_agent.bpf.build", json.dumps(_spec(program, pin_dir))],
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
    try:
        if proc.returncode != 0 or "error" in answer or not answer:
            reason = answer.get("error") or f"the loader exited with {proc.returncode}"
            raise BpfError(answer.get("about") or program.about, reason)
        loaded = _open(program, pin_dir)
    except BaseException:
        pins.remove_pins(pin_dir)
        raise
    if not keep_pins:
        pins.remove_pins(pin_dir)
    return loaded


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


def compile_load_pin(program: Program, pin_dir: Path) -> dict[str, Any]:
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
    pin_dir.mkdir(mode=0o700, exist_ok=True)
    objects = [(program.name, fn.fd)] + [(n, bpf.get_table(n).map_fd) for n in program.maps]
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
    return {"maps": list(program.maps)}


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
    answer = compile_load_pin(program, pin_dir)
    print(json.dumps(answer), flush=True)
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
