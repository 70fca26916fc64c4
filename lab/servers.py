"""A test server that says who it is and whom it saw, and logs every connection.

Run inside a lab host (``lab.popen`` or ``start_server`` below)::

    python -m egress_agent.lab.servers --listen ADDR:PORT [--listen [ADDR6]:PORT ...]
        [--tls CERT KEY] --name NAME --log FILE

Per connection it reads the client's first message -- one line, an HTTP
request head (up to the blank line), or whatever arrived within 2 s -- and
answers one line ``NAME <local ip:port> saw <peer ip:port>``. An HTTP request
gets that line as the body of an ``HTTP/1.1 200 OK`` (``Connection: close``);
anything else then gets every further byte echoed until the client
half-closes. The peer address is the point: a test tells from it whether a
flow came from the pod itself or through the proxy.

Each connection appends one JSON line to ``--log`` *before* the server closes
its side, so a client that has seen the end finds the record::

    {"server": NAME, "local": "ip:port", "peer": "ip:port", "tls": bool,
     "sni": str|null, "bytes_in": n, "bytes_out": n, "first": str, "error": str|null}

``bytes_in``/``bytes_out`` count TCP payload as it crossed the socket (TLS
records included), so they compare with what a relay in the middle counted.
``first`` is the first message as text (e.g. the HTTP head, to check a header
the proxy injected). ``READY`` is printed once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

FIRST_MESSAGE_MAX = 64 * 1024
READ_SIZE = 64 * 1024
DRAIN_AFTER_RESPONSE = 5.0  # how long an HTTP client gets to close after the response
HTTP_METHODS = tuple(
    m.encode() + b" "
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE")
)


def parse_listen(text: str) -> tuple[str, int]:
    """``"198.18.1.2:443"`` or ``"[fd00:18:1::2]:443"`` -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r}: expected IPV4:PORT or [IPV6]:PORT")
    ip_address(host)
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, number


def format_addr(sockaddr: Any) -> str:
    """A socket address as ``ip:port``, IPv6 in brackets (like the audit log)."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def message_end(buf: bytes) -> int | None:
    """Where the first message ends: after the HTTP head's blank line or the first newline."""
    if buf.startswith(HTTP_METHODS):
        end = buf.find(b"\r\n\r\n")
        return end + 4 if end >= 0 else None
    end = buf.find(b"\n")
    return end + 1 if end >= 0 else None


class Stream(Protocol):
    async def read(self) -> bytes: ...  # b"" at end of stream

    async def write(self, data: bytes) -> None: ...


class RawStream:
    """The TCP connection, counting payload bytes; every wait is bounded by ``idle``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.idle = idle
        self.bytes_in = 0
        self.bytes_out = 0

    async def read(self) -> bytes:
        async with asyncio.timeout(self.idle):
            data = await self.reader.read(READ_SIZE)
        self.bytes_in += len(data)
        return data

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.bytes_out += len(data)
        async with asyncio.timeout(self.idle):
            await self.writer.drain()


class TlsStream:
    """TLS over a RawStream through memory BIOs, so the raw bytes stay countable."""

    # SSLObject -> stream, while handshaking: the SNI callback only gets the object.
    handshaking: ClassVar[dict[int, TlsStream]] = {}

    def __init__(self, raw: RawStream, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.sni: str | None = None

    @staticmethod
    def sni_callback(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        stream = TlsStream.handshaking.get(id(obj))
        if stream is not None:
            stream.sni = name

    async def _flush(self) -> None:
        if self.outgoing.pending:
            await self.raw.write(self.outgoing.read())

    async def _fill(self) -> bool:
        data = await self.raw.read()
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    async def handshake(self) -> None:
        TlsStream.handshaking[id(self.obj)] = self
        try:
            while True:
                try:
                    self.obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise ConnectionError("client closed during the TLS handshake") from None
            await self._flush()  # Finished, and TLS 1.3 session tickets
        finally:
            TlsStream.handshaking.pop(id(self.obj), None)

    async def read(self) -> bytes:
        while True:
            try:
                data = self.obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or the TCP connection simply ended
            await self._flush()
            return data

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        await self._flush()


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str
    listen: Sequence[tuple[str, int]]
    tls: tuple[str, str] | None
    log: Path
    max_connections: int = 256
    idle_timeout: float = 60.0
    first_wait: float = 2.0


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.active = 0
        self.log_fd = os.open(cfg.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.tls_ctx: ssl.SSLContext | None = None
        if cfg.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cfg.tls[0], cfg.tls[1])
            ctx.set_alpn_protocols(["http/1.1"])
            ctx.sni_callback = TlsStream.sni_callback
            self.tls_ctx = ctx

    def write_record(self, record: dict[str, Any]) -> None:
        # One write() with O_APPEND: lines from several servers sharing a log
        # file never interleave.
        os.write(self.log_fd, (json.dumps(record) + "\n").encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = RawStream(reader, writer, self.cfg.idle_timeout)
        local = format_addr(writer.get_extra_info("sockname"))
        record: dict[str, Any] = {
            "server": self.cfg.name,
            "local": local,
            "peer": format_addr(writer.get_extra_info("peername")),
            "tls": self.tls_ctx is not None,
            "sni": None,
            "bytes_in": 0,
            "bytes_out": 0,
            "first": "",
            "error": None,
        }
        logged = False

        def finish(error: str | None = None) -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            record.update(bytes_in=raw.bytes_in, bytes_out=raw.bytes_out)
            if error is not None:
                record["error"] = error
            self.write_record(record)

        if self.active >= self.cfg.max_connections:
            finish(f"refused: {self.cfg.max_connections} connections open")
            writer.close()
            return
        self.active += 1
        try:
            stream: Stream = raw
            tls: TlsStream | None = None
            if self.tls_ctx is not None:
                tls = TlsStream(raw, self.tls_ctx)
                try:
                    await tls.handshake()
                finally:
                    record["sni"] = tls.sni
                stream = tls
            first, rest = await self.read_first(stream)
            record["first"] = first.decode("latin-1")[:4096]
            answer = f"{self.cfg.name} {local} saw {record['peer']}\n".encode()
            if first.startswith(HTTP_METHODS) and first.endswith(b"\r\n\r\n"):
                await self.http(raw, stream, tls, first, rest, answer, finish)
            else:
                await stream.write(answer)
                if rest:
                    await stream.write(rest)
                while data := await stream.read():
                    await stream.write(data)
                finish()
        except asyncio.CancelledError:
            finish("server stopped")
            raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, ValueError) as exc:
            finish(f"{type(exc).__name__}: {exc}")
        finally:
            self.active -= 1
            finish()
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def read_first(self, stream: Stream) -> tuple[bytes, bytes]:
        """The first message and what came after it in the same reads."""
        buf = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cfg.first_wait):
                while True:
                    end = message_end(buf)
                    if end is not None:
                        return buf[:end], buf[end:]
                    if len(buf) >= FIRST_MESSAGE_MAX:
                        break
                    data = await stream.read()
                    if not data:
                        break
                    buf += data
        return buf, b""

    async def http(
        self,
        raw: RawStream,
        stream: Stream,
        tls: TlsStream | None,
        head: bytes,
        rest: bytes,
        answer: bytes,
        finish: Callable[[], None],
    ) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method = lines[0].split(" ", 1)[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or "0")
        remaining = length - len(rest)
        if remaining > 0 and headers.get("expect", "").lower() == "100-continue":
            await stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while remaining > 0:
            data = await stream.read()
            if not data:
                break
            remaining -= len(data)
        response = (
            f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(answer)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        await stream.write(response if method == "HEAD" else response + answer)
        finish()
        # Close our side gracefully and let the client close too: closing with
        # unread bytes in the receive queue would send it a reset instead.
        if tls is not None:
            await tls.close_notify()
        elif raw.writer.can_write_eof():
            raw.writer.write_eof()
        with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
            async with asyncio.timeout(DRAIN_AFTER_RESPONSE):
                while await stream.read():
                    pass

    async def serve(self) -> int:
        servers = []
        for host, port in self.cfg.listen:
            try:
                srv = await asyncio.start_server(
                    self.handle, host, port, reuse_address=True, backlog=1024
                )
            except OSError as exc:
                print(f"FAILED: {exc}", flush=True)
                return 1
            servers.append(srv)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("READY", flush=True)
        await stop.wait()
        for srv in servers:
            srv.close()
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="egress_agent.lab.servers", description=__doc__.split("\n")[0])
    p.add_argument("--listen", action="append", required=True, metavar="ADDR:PORT")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--name", required=True)
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--first-wait", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        listen = [parse_listen(text) for text in args.listen]
    except ValueError as exc:
        p.error(str(exc))
    cfg = Config(
        name=args.name,
        listen=listen,
        tls=(args.tls[0], args.tls[1]) if args.tls else None,
        log=args.log,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        first_wait=args.first_wait,
    )
    try:
        server = Server(cfg)
    except (OSError, ssl.SSLError) as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    return asyncio.run(server.serve())


# -- for callers --------------------------------------------------------------

StrPath = str | os.PathLike[str]


def wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Wait until ``proc`` prints its first line, which must be ``READY``; a
    process that says anything else (why it cannot start) is reaped and the
    reason raised."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc.kill()
            raise RuntimeError(f"{what}: not ready after {timeout}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    line = out.decode(errors="replace").strip()
    if line != "READY":
        try:
            proc.wait(2.0)  # it exits by itself after saying why
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise RuntimeError(f"{what} did not start (exit {proc.returncode}): {line or 'no output'}")


def start_server(
    lab: Lab,
    host: str,
    *,
    name: str,
    listen: Sequence[str],
    tls: tuple[StrPath, StrPath] | None,
    log: Path,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start a server in lab host ``host`` and return once it listens.

    The lab stops it at teardown; stopping it earlier is ``proc.terminate()``.
    """
    argv = [sys.executable, "-m", "egress_agent.lab.servers", "--name", name, "--log", str(log)]
    for item in listen:
        parse_listen(item)  # fail here, with the caller's stack, on a typo
        argv += ["--listen", item]
    if tls is not None:
        argv += ["--tls", os.fspath(tls[0]), os.fspath(tls[1])]
    proc: subprocess.Popen[bytes] = lab.popen(host, argv, stdout=subprocess.PIPE)
    wait_ready(proc, f"server {name} in {host}", timeout)
    return proc


def read_log(path: Path, *, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records in a server log (none if it does not exist yet).

    With ``at_least``, wait up to ``timeout`` for that many records: a server
    writes its record when the client's side has ended, which a TLS client that
    just drops the connection may not wait for.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        # A line still being appended has no newline yet: leave it for next time.
        records = [json.loads(line) for line in text.split("\n")[:-1] if line]
        if len(records) >= at_least or time.monotonic() >= deadline:
            return records
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
