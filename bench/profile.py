"""py-spy flame graphs of the proxy during a load, and their top frames.

``start`` runs ``py-spy record`` against a PID (non-blocking sampling: the
proxy is not paused, so the profile costs it little) into an SVG flame graph;
``summary`` reads the SVG back and names the functions that cost the most,
by their own time (``self``: samples where the function itself was running)
and by the time under them (``total``), in percent of all samples. Frames
are counted per function (py-spy's frames carry line numbers; those are
folded together).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

SAMPLE_RATE = 250  # per second
TOP = 12

_FRAME = re.compile(
    r'<title>(?P<title>[^<]*)</title><rect [^>]*?y="(?P<y>\d+)"[^>]*?'
    r'fg:x="(?P<x>\d+)" fg:w="(?P<w>\d+)"'
)
_NAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\) \([\d,]+ samples, [\d.]+%\)$")


def py_spy() -> str:
    """The py-spy next to this Python (the development install has it), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: pip install py-spy (./run setup installs it)")
    return found


def start(pid: int, out: Path, *, seconds: float) -> subprocess.Popen[bytes]:
    argv = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(SAMPLE_RATE),
        "--nonblocking",
        "--format",
        "flamegraph",
        "--output",
        str(out),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)


def summary(svg: Path, top: int = TOP) -> dict[str, Any]:
    """The ``top`` functions by self and by total time, in percent of samples."""
    if not svg.exists():
        return {"error": f"{svg} was not written (py-spy failed?)"}
    frames: list[tuple[str, int, int, int]] = []  # (function, depth y, x, width)
    total = 0
    for m in _FRAME.finditer(svg.read_text()):
        title = html.unescape(m["title"])
        x, y, w = int(m["x"]), int(m["y"]), int(m["w"])
        if title.startswith("all ("):
            total = w
            continue
        name = _NAME.match(title)
        func = f"{name['func']} ({name['file']})" if name else title
        frames.append((func, y, x, w))
    if not total:
        return {"error": f"{svg}: no samples"}
    # Children sit one row further from the root (y grows with depth here).
    rows: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for _, y, x, w in frames:
        rows[y].append((x, w))
    heights = sorted(rows)
    step = min((b - a for a, b in pairwise(heights)), default=16)
    own: dict[str, int] = defaultdict(int)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for func, y, x, w in frames:
        below = sum(cw for cx, cw in rows.get(y + step, ()) if x <= cx < x + w)
        own[func] += w - below
        spans[func].append((x, x + w))

    def covered(intervals: list[tuple[int, int]]) -> int:
        length, end = 0, -1
        for a, b in sorted(intervals):
            if b <= end:
                continue
            length += b - max(a, end)
            end = b
        return length

    def pct(n: int) -> float:
        return round(100 * n / total, 1)

    by_total = sorted(((covered(s), f) for f, s in spans.items()), reverse=True)
    by_self = sorted(((n, f) for f, n in own.items()), reverse=True)
    return {
        "samples": total,
        "self": [{"frame": f, "percent": pct(n)} for n, f in by_self[:top]],
        "total": [{"frame": f, "percent": pct(n)} for n, f in by_total[:top]],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(summary(Path(sys.argv[1])), indent=2))
