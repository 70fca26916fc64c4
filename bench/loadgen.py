"""The benchmark's clients, run inside the pod (uvloop, asyncio protocols).

    python -m bench.loadgen rate HOST PORT --seconds S --workers N [--tls-name NAME]
    python -m bench.loadgen hold HOST PORT --count N

``rate``: ``--workers`` loops, each opening a connection, sending ``ping``,
reading ``pong`` and the server's close, then closing, until ``--seconds``
have passed. Prints one JSON object: attempts, successes, failures by kind,
connections per second and latency percentiles. Latency is measured from
the start of ``connect()`` to the server's FIN after the reply (the whole
life of a short connection as the client sees it). With ``--tls-name`` each
connection sends a TLS ClientHello naming NAME (SNI) instead of ``ping``: the
TLS-by-name scenario, where the proxy decides by the name it peeks.

``hold``: opens ``--count`` connections (``--concurrency`` at a time), each
sending ``hold`` and waiting for ``held`` -- so the path is established end
to end -- and prints ``{"phase": "held", ...}``. Then it waits (at most
``--max-hold`` seconds) for a line on stdin, half-closes every connection,
waits for the server's FIN on each (a clean end both ways) and prints
``{"phase": "closed", ...}``.

Every wait is bounded by ``--timeout``; every failure is counted by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import uvloop

FAILURES_ERRORS = (OSError, TimeoutError, ConnectionError, EOFError)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def client_hello(name: str) -> bytes:
    """A TLS 1.3-shaped ClientHello record with ``name`` as its SNI: what a
    proxy reads to decide by name (the sink answers it, no handshake follows)."""

    def u16(n: int) -> bytes:
        return n.to_bytes(2, "big")

    host = name.encode("ascii")
    sni = b"\x00" + u16(len(host)) + host  # host_name(0)
    sni_ext = u16(0) + u16(len(sni) + 2) + u16(len(sni)) + sni
    versions = u16(43) + u16(3) + b"\x02\x03\x04"  # supported_versions: TLS 1.3
    groups = u16(10) + u16(4) + u16(2) + u16(0x001D)  # supported_groups: x25519
    share = u16(0x001D) + u16(32) + bytes(32)
    key_share = u16(51) + u16(len(share) + 2) + u16(len(share)) + share
    extensions = sni_ext + versions + groups + key_share
    body = (
        b"\x03\x03"  # legacy_version TLS 1.2
        + bytes(range(32))  # random
        + b"\x20" + bytes(32)  # legacy_session_id
        + u16(6) + u16(0x1301) + u16(0x1302) + u16(0x1303)  # cipher suites
        + b"\x01\x00"  # compression: null
        + u16(len(extensions)) + extensions
    )  # fmt: skip
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + u16(len(handshake)) + handshake


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty ascending list (``q`` in 0..100)."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100), at least 1
    return sorted_values[int(rank) - 1]


class Probe(asyncio.Protocol):
    """One short connection: collects the reply until the server's FIN."""

    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.done = done
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(bytes(self.buf))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or EOFError("closed before the server's FIN"))


async def rate(
    host: str, port: int, *, seconds: float, workers: int, timeout: float, tls_name: str | None
) -> Any:
    loop = asyncio.get_running_loop()
    request = client_hello(tls_name) if tls_name else b"ping\n"
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    attempts = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal attempts
        while time.monotonic() < end:
            attempts += 1
            started = time.perf_counter()
            done: asyncio.Future[bytes] = loop.create_future()
            transport: asyncio.BaseTransport | None = None
            try:
                async with asyncio.timeout(timeout):
                    transport, _ = await loop.create_connection(partial(Probe, done), host, port)
                    transport.write(request)
                    reply = await done
            except FAILURES_ERRORS as exc:
                failures[describe(exc)] += 1
                continue
            finally:
                if transport is not None:
                    transport.close()
            if reply == b"pong\n":
                latencies.append(time.perf_counter() - started)
            else:
                failures[f"unexpected reply {reply[:16]!r}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "attempts": attempts,
        "ok": len(latencies),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "workers": workers,
        "tls_name": tls_name,
        "latency_ms": (
            {
                "p50": percentile(latencies, 50) * 1000,
                "p99": percentile(latencies, 99) * 1000,
                "max": latencies[-1] * 1000,
            }
            if latencies
            else None
        ),
    }


class Holder(asyncio.Protocol):
    """One idle connection: ``ready`` once ``held`` arrived, ``ended`` at the server's FIN."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf == b"held\n" and not self.ready.done():
            self.ready.set_result(None)

    def eof_received(self) -> bool:
        if not self.ready.done():
            self.ready.set_exception(EOFError("closed before 'held'"))
        if not self.ended.done():
            self.ended.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = exc or EOFError("closed without the server's FIN")
        for fut in (self.ready, self.ended):
            if not fut.done():
                fut.set_exception(lost)
                fut.exception()  # retrieved: not every future is awaited


async def hold(
    host: str, port: int, *, count: int, concurrency: int, timeout: float, max_hold: float
) -> None:
    loop = asyncio.get_running_loop()
    held: list[Holder] = []
    failures: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)

    async def open_one() -> None:
        async with gate:
            proto = Holder(loop)
            try:
                async with asyncio.timeout(timeout):
                    await loop.create_connection(lambda: proto, host, port)
                    assert proto.transport is not None
                    proto.transport.write(b"hold\n")
                    await proto.ready
            except FAILURES_ERRORS as exc:
                failures[describe(exc)] += 1
                if proto.transport is not None:
                    proto.transport.abort()
                return
            held.append(proto)

    started = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(count)))
    print(
        json.dumps(
            {
                "phase": "held",
                "attempts": count,
                "held": len(held),
                "failed": sum(failures.values()),
                "failures": dict(failures),
                "seconds": time.perf_counter() - started,
            }
        ),
        flush=True,
    )

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async with asyncio.timeout(max_hold):
            await reader.readline()
    except TimeoutError:
        pass

    close_failures: Counter[str] = Counter()
    for proto in held:
        assert proto.transport is not None
        proto.transport.write_eof()
    clean = 0
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(p.ended for p in held), return_exceptions=True)
    except TimeoutError:
        pass
    for proto in held:
        if proto.ended.done() and proto.ended.exception() is None:
            clean += 1
        elif proto.ended.done():
            close_failures[describe(cast(BaseException, proto.ended.exception()))] += 1
        else:
            close_failures["timeout waiting for the server's FIN"] += 1
        assert proto.transport is not None
        proto.transport.close()
    await asyncio.sleep(0)
    print(
        json.dumps(
            {
                "phase": "closed",
                "clean": clean,
                "failed": sum(close_failures.values()),
                "failures": dict(close_failures),
            }
        ),
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen")
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rate")
    h = sub.add_parser("hold")
    for sp in (r, h):
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        sp.add_argument("--timeout", type=float, default=5.0)
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--tls-name", help="send a ClientHello with this SNI instead of ping")
    h.add_argument("--count", type=int, default=1000)
    h.add_argument("--concurrency", type=int, default=100)
    h.add_argument("--max-hold", type=float, default=60.0)
    args = p.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "rate":
        result = uvloop.run(
            rate(
                args.host,
                args.port,
                seconds=args.seconds,
                workers=args.workers,
                timeout=args.timeout,
                tls_name=args.tls_name,
            )
        )
        print(json.dumps(result), flush=True)
    else:
        uvloop.run(
            hold(
                args.host,
                args.port,
                count=args.count,
                concurrency=args.concurrency,
                timeout=args.timeout,
                max_hold=args.max_hold,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
