"""A UDP server for the lab: it logs every datagram it receives and can echo it.

The target's side of non-TCP tests: one JSON line per datagram (which
address sent it, to which of our addresses and ports, how many bytes), so
a test can say "the external host never received anything from the pod".
``--echo`` sends each datagram back to its sender, for replies and DNS-like
round trips.

    python tests/lab/udp.py --listen 198.18.1.2:5353 --log udp.jsonl [--echo]

It prints ``READY`` once every socket is bound (see ``servers.wait_ready``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from egress_agent.lab.servers import format_addr, parse_listen, wait_ready

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab


def serve(listen: Sequence[tuple[str, int]], log: Path, *, echo: bool) -> int:
    sel = selectors.DefaultSelector()
    socks = []
    for host, port in listen:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            print(f"FAILED: {exc}", flush=True)
            return 1
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("READY", flush=True)
    with open(log, "a", buffering=1) as out:
        while not stop:
            for key, _ in sel.select(timeout=0.2):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data, peer = ready.recvfrom(65535)
                except OSError:
                    continue  # an ICMP error about an earlier echo
                record = {
                    "peer": format_addr(peer),
                    "local": format_addr(ready.getsockname()),
                    "bytes": len(data),
                    "data": data[:64].decode(errors="replace"),
                    "time": time.time(),
                }
                out.write(json.dumps(record) + "\n")
                if echo:
                    with contextlib.suppress(OSError):
                        ready.sendto(data, peer)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="udp.py", description=__doc__.split("\n")[0])
    p.add_argument("--listen", action="append", required=True, metavar="ADDR:PORT")
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--echo", action="store_true")
    args = p.parse_args(argv)
    try:
        listen = [parse_listen(text) for text in args.listen]
    except ValueError as exc:
        p.error(str(exc))
    return serve(listen, args.log, echo=args.echo)


def start_udp_server(
    lab: Lab,
    host: str,
    *,
    listen: Sequence[str],
    log: Path,
    echo: bool = False,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start a UDP server in lab host ``host``; the lab stops it at teardown."""
    argv = [sys.executable, __file__, "--log", str(log)]
    for item in listen:
        parse_listen(item)
        argv += ["--listen", item]
    if echo:
        argv.append("--echo")
    proc: subprocess.Popen[bytes] = lab.popen(host, argv, stdout=subprocess.PIPE)
    wait_ready(proc, f"UDP server in {host}", timeout)
    return proc


if __name__ == "__main__":
    sys.exit(main())
