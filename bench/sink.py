"""The benchmark's server, run inside the external host (uvloop, one process).

    python -m bench.sink --listen 198.18.1.2:9000 [--max-seconds 600]

It answers one line per connection and counts what it saw, so the benchmark
can check from the far end that every connection arrived:

* ``ping\\n`` -> ``pong\\n``, then the server closes (it closes first, so the
  TIME_WAIT state stays here and the client's ephemeral ports are free again
  at once -- otherwise a few seconds at 10k connections/s exhaust them);
* ``hold\\n`` -> ``held\\n``, then the connection stays open until the client
  closes it (for the idle-connection memory measurement);
* a TLS record (a ClientHello, as ``bench.loadgen rate --tls-name`` sends)
  -> ``pong\\n`` once the whole record arrived, then the server closes, like
  ``ping`` (the TLS-by-name scenario: the proxy decides by the SNI).

``--also-port`` listens on more ports of the same address (the TLS-by-name
scenario's port), with the same answers and counters.

``READY`` is printed once it listens. On SIGTERM/SIGINT (or after
``--max-seconds``, so it never outlives a broken run) it prints one JSON line
of counters and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import uvloop

MAX_LINE = 64
TLS_HANDSHAKE = 0x16  # a TLS record's content type for handshake messages
MAX_RECORD = 16384 + 5


@dataclass
class Counters:
    accepted: int = 0
    pings: int = 0
    holds: int = 0
    hellos: int = 0
    bad_requests: int = 0
    resets: int = 0  # connections that ended with an error instead of a FIN


class Sink(asyncio.Protocol):
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.counters.accepted += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if self.buf[0] == TLS_HANDSHAKE:
            self._hello()
            return
        if b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                self.counters.bad_requests += 1
                self.transport.close()
            return
        line = self.buf.partition(b"\n")[0]
        self.buf = b""
        if line == b"ping":
            self.counters.pings += 1
            self.transport.write(b"pong\n")
            self.transport.close()  # after the write is flushed: FIN from here
        elif line == b"hold":
            self.counters.holds += 1
            self.transport.write(b"held\n")
        else:
            self.counters.bad_requests += 1
            self.transport.close()

    def _hello(self) -> None:
        assert self.transport is not None
        if len(self.buf) < 5:
            return
        size = 5 + int.from_bytes(self.buf[3:5], "big")
        if size > MAX_RECORD:
            self.counters.bad_requests += 1
            self.transport.close()
        elif len(self.buf) >= size:
            self.counters.hellos += 1
            self.transport.write(b"pong\n")
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the transport closes our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.counters.resets += 1


async def serve(host: str, ports: Sequence[int], max_seconds: float) -> Counters:
    counters = Counters()
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(
            lambda: Sink(counters), host, port, reuse_address=True, backlog=4096
        )
        for port in ports
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    for server in servers:
        server.close()
    return counters


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sink")
    p.add_argument("--listen", required=True, metavar="IPV4:PORT")
    p.add_argument("--also-port", type=int, action="append", default=[])
    p.add_argument("--max-seconds", type=float, default=600.0)
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counters = uvloop.run(serve(host, [int(port), *args.also_port], args.max_seconds))
    print(json.dumps(asdict(counters)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
