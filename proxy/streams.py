"""Byte streams the HTTP relay reads and writes: one interface over a plain
TCP connection and over the client's TLS terminated in memory.

The HTTP exchange (:mod:`.httprelay`) and the body framing
(:mod:`.httpbody`) see only :class:`Stream`: ``read`` (``b""`` at the end),
``write`` with back-pressure, and three ways to end. Every wait is bounded by
the proxy's idle timeout and counts as activity for its idle sweep.

:func:`take_over` turns a transport that the byte relay accepted (and may
have paused while peeking) into a stream. :class:`TlsServerStream` terminates
the client's TLS through memory BIOs, so that the ClientHello the proxy has
already read while peeking is fed in first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Protocol

READ_SIZE = 64 * 1024
# After the proxy's last response on a connection, how long (and how many
# bytes) it keeps reading what the client still sends before closing: closing
# a socket with unread input sends a reset, which can destroy the response
# before the client reads it (RFC 9112 section 9.6, "tear-down").
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


class Stream(Protocol):
    async def read(self) -> bytes: ...  # b"" at end of stream

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    async def linger_close(self) -> None: ...

    def abort(self) -> None: ...


class TcpStream:
    """A transport with stream reader/writer; every wait is bounded by ``idle``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        idle: float,
        touch: Callable[[], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.idle = idle
        self.touch = touch

    async def read(self) -> bytes:
        async with asyncio.timeout(self.idle):
            data = await self.reader.read(READ_SIZE)
        self.touch()
        return data

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.idle):
            await self.writer.drain()
        self.touch()

    def close(self) -> None:
        self.writer.close()

    async def read_untimed(self) -> bytes:
        """Read without the idle bound (a switched connection: one direction
        may stay quiet while the other talks; the proxy's idle sweep still
        ends a connection quiet both ways)."""
        return await self.reader.read(READ_SIZE)

    async def write_untimed(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def at_eof(self) -> bool:
        """Whether the peer has closed (a kept-alive upstream connection that
        the server dropped while idle)."""
        return self.reader.at_eof() or self.writer.transport.is_closing()

    async def linger_close(self) -> None:
        """Send FIN, discard what the client still sends (bounded), then close."""
        if self.writer.transport.is_closing():
            self.writer.close()
            return
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            left = LINGER_BYTES
            async with asyncio.timeout(LINGER_SECONDS):
                while left > 0:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        break
                    left -= len(data)
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            pass
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


class TlsServerStream:
    """The client's TLS terminated through memory BIOs, so that the bytes the
    proxy already read while peeking (the ClientHello) are fed in first."""

    def __init__(self, raw: TcpStream, ctx: ssl.SSLContext, initial: bytes) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.incoming.write(initial)
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            await self.raw.write(pending)

    async def _fill(self) -> bool:
        data = await self.raw.read()
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("client closed during the TLS handshake") from None
        await self._flush()

    async def read(self) -> bytes:
        while True:
            try:
                data = self.obj.read(READ_SIZE)
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    continue  # the next read raises EOF
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
        # One SSLObject.read returns one TLS record (at most 16 KiB): take the
        # records already received too, so a body moves in large pieces.
        parts = [data]
        total = len(data)
        while total < READ_SIZE and (self.incoming.pending or self.obj.pending()):
            try:
                more = self.obj.read(READ_SIZE - total)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break  # the next read() sees it again
            if not more:
                break
            parts.append(more)
            total += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    async def write(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        pending = self.outgoing.read()
        if pending:
            self.raw.writer.write(pending)
        self.raw.close()

    async def linger_close(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        pending = self.outgoing.read()
        if pending:
            self.raw.writer.write(pending)
        await self.raw.linger_close()

    def abort(self) -> None:
        self.raw.abort()


def take_over(transport: asyncio.Transport, *, idle: float, touch: Callable[[], None]) -> TcpStream:
    """The client's transport as a stream: the relay's protocol is replaced
    by a stream reader, and reading resumes (the peek may have paused it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    transport.resume_reading()
    return TcpStream(reader, writer, idle=idle, touch=touch)


async def splice(
    client: TcpStream,
    client_buf: bytearray,
    server: TcpStream,
    server_buf: bytearray,
    *,
    moved: Callable[[bool, int], None],
    failed: Callable[[BaseException], None],
) -> None:
    """Relay bytes both ways unchanged (a connection that switched
    protocols), each side's end of stream passed on, until both have ended.

    Each buffer holds bytes read already from its side (behind the request
    or response head); they go first. ``moved(up, count)`` counts the bytes
    (``up``: client to server). A side that fails is reported to ``failed``
    and the relay stops. Reads and writes are not bounded by the idle
    timeout: one direction may stay quiet while the other talks (the proxy's
    idle sweep still ends a connection quiet both ways)."""

    async def pipe(src: TcpStream, buf: bytearray, dst: TcpStream, *, up: bool) -> None:
        data = bytes(buf)
        buf.clear()
        while True:
            if data:
                moved(up, len(data))
                await dst.write_untimed(data)
            data = await src.read_untimed()
            if not data:
                break
            src.touch()
        if dst.writer.can_write_eof() and not dst.writer.transport.is_closing():
            dst.writer.write_eof()

    loop = asyncio.get_running_loop()
    ups = loop.create_task(pipe(client, client_buf, server, up=True), name="websocket-up")
    downs = loop.create_task(pipe(server, server_buf, client, up=False), name="websocket-down")
    try:
        done, _ = await asyncio.wait({ups, downs}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                failed(exc)
    finally:
        for task in (ups, downs):
            task.cancel()
        await asyncio.gather(ups, downs, return_exceptions=True)


def failure_reason(exc: BaseException) -> str:
    """A stream's failure in a few words, for error pages and audit records."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
