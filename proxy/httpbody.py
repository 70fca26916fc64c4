"""Moving HTTP/1.1 messages between the client and the upstream server, with
the framing checked as the bytes pass: a request's head and body on the way
up (:func:`send_request`), the responses on the way down
(:func:`relay_response`).

A head is read into a buffer until :mod:`.httpmessage` can parse it; a body
is copied as it is framed -- ``Content-Length`` bytes, chunks (re-emitted
with normalised chunk lines, or bare for an HTTP/1.0 client), or until the
sender closes -- without ever holding a whole body. Each buffer holds the
bytes read from its stream and not yet used, so pipelined requests and the
bytes after a ``101`` stay where the next reader finds them.

A parse problem is ``ValueError`` (a malformed message); a stream that ends
in the middle of a message is :class:`Broken`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from egress_agent.proxy.httpmessage import (
    RequestHead,
    ResponseHead,
    parse_chunk_line,
    parse_response,
    parse_trailers,
    serialize_response,
)
from egress_agent.proxy.streams import Stream, failure_reason

T = TypeVar("T")


class Broken(Exception):
    """A connection that cannot go on; nothing more can be sent to the client."""


async def read_head(
    stream: Stream,
    buf: bytearray,
    parse: Callable[[bytes], tuple[T, int] | None],
) -> tuple[T, int] | None:
    """Parse a head from ``buf``, reading more as needed; None when the
    stream ends before its first byte."""
    while True:
        if buf:
            got = parse(bytes(buf))
            if got is not None:
                return got
        data = await stream.read()
        if not data:
            if not buf:
                return None
            raise ValueError("connection closed inside a message head")
        buf += data


async def fill_until(
    stream: Stream,
    buf: bytearray,
    parse: Callable[[bytes], T | None],
    *,
    upstream: bool,
) -> T:
    """Read into ``buf`` until ``parse`` finds what it needs at its start;
    ``Broken`` when the stream ends first (``upstream``: which side it is)."""
    while True:
        got = parse(bytes(buf))
        if got is not None:
            return got
        data = await stream.read()
        if not data:
            raise Broken(
                ("upstream" if upstream else "client") + " closed in the middle of a message"
            )
        buf += data


async def copy_length(
    src: Stream, buf: bytearray, dst: Stream, length: int, counter: Counter
) -> None:
    """Copy ``length`` body bytes, the ones in ``buf`` first."""
    remaining = length
    while remaining:
        if not buf:
            data = await src.read()
            if not data:
                raise Broken(f"closed with {remaining} body bytes still to come")
            buf += data
        piece = bytes(buf[:remaining])
        del buf[: len(piece)]
        remaining -= len(piece)
        counter.bytes += len(piece)
        await dst.write(piece)


async def copy_until_close(src: Stream, buf: bytearray, dst: Stream, counter: Counter) -> None:
    """Copy a body delimited by the end of ``src`` (responses only)."""
    if buf:
        counter.bytes += len(buf)
        await dst.write(bytes(buf))
        buf.clear()
    while data := await src.read():
        counter.bytes += len(data)
        await dst.write(data)


async def copy_chunked(
    src: Stream,
    buf: bytearray,
    dst: Stream,
    counter: Counter,
    *,
    upstream: bool,
    reframe: bool = True,
) -> None:
    """Copy a chunked body, checking its framing. With ``reframe`` the
    chunks are re-emitted with normalised lines (extensions dropped);
    without, only the data goes out. ``upstream`` says which side ``src``
    is, for the error when it closes mid-body."""
    while True:
        size, used = await fill_until(src, buf, parse_chunk_line, upstream=upstream)
        counter.bytes += used
        del buf[:used]
        if size == 0:
            trailers, used = await fill_until(src, buf, parse_trailers, upstream=upstream)
            counter.bytes += used
            del buf[:used]
            if reframe:
                fields = b"".join(n + b": " + v + b"\r\n" for n, v in trailers)
                await dst.write(b"0\r\n" + fields + b"\r\n")
            return
        if reframe:
            await dst.write(f"{size:x}\r\n".encode("ascii"))
        await copy_length(src, buf, dst, size, counter)
        await fill_until(src, buf, lambda b: _crlf(b), upstream=upstream)
        del buf[:2]
        counter.bytes += 2
        if reframe:
            await dst.write(b"\r\n")


async def send_request(
    client: Stream,
    buf: bytearray,
    upstream: Stream,
    forward: bytes,
    head: RequestHead,
    counter: Counter,
    *,
    sent: Callable[[], None],
) -> str | None:
    """Send the request head ``forward`` upstream, then stream the client's
    body after it (``sent`` is called once the head is written); the reason
    it stopped early, or None."""
    try:
        await upstream.write(forward)
        sent()
        framing = head.framing
        if framing.chunked:
            await copy_chunked(client, buf, upstream, counter, upstream=False)
        elif framing.length:
            await copy_length(client, buf, upstream, framing.length, counter)
    except ValueError as exc:
        # A malformed chunk mid-body: cut the upstream connection so the
        # server never takes a truncated body for a complete one.
        upstream.abort()
        return f"client: malformed request body: {exc}"
    except Broken as exc:
        upstream.abort()
        return f"client: {exc}"
    except (TimeoutError, ConnectionError, OSError) as exc:
        return f"upstream: {failure_reason(exc)}"
    return None


async def relay_response(
    upstream: Stream,
    buf: bytearray,
    client: Stream,
    head: RequestHead,
    *,
    upgrade: bool,
    starting: Callable[[], None],
) -> tuple[ResponseHead, int, bool]:
    """Relay the interim responses to ``head`` and the final one; returns
    the final head, the bytes sent to the client, and whether the client
    connection must close after it. ``upgrade``: the relay can follow a
    switch of protocols, so ``101`` is a valid answer (the caller then
    relays bytes). ``starting`` is called before a response's first byte
    goes to the client."""
    down = 0

    def parse(data: bytes) -> tuple[ResponseHead, int] | None:
        return parse_response(data, request_method=head.method, upgrade=upgrade)

    while True:
        parsed = await read_head(upstream, buf, parse)
        if parsed is None:
            raise Broken("upstream closed before a response")
        response, used = parsed
        del buf[:used]
        # An HTTP/1.0 client cannot read chunked framing (RFC 9112
        # section 7.1): it gets the bare body, delimited by the close.
        dechunk = response.framing.chunked and head.version == "HTTP/1.0"
        close = not head.keep_alive or response.framing.until_close or dechunk
        out = serialize_response(response, close=close, dechunk=dechunk)
        starting()
        await client.write(out)
        down += len(out)
        if response.status == 101:
            return response, down, True  # the caller switches to a byte relay
        if response.interim:
            continue
        counter = Counter()
        framing = response.framing
        if framing.chunked:
            await copy_chunked(upstream, buf, client, counter, upstream=True, reframe=not dechunk)
        elif framing.until_close:
            await copy_until_close(upstream, buf, client, counter)
        elif framing.length:
            await copy_length(upstream, buf, client, framing.length, counter)
        return response, down + counter.bytes, close


@dataclass
class Counter:
    """Body bytes moved so far, framing included (kept when a copy fails midway)."""

    bytes: int = 0


def _crlf(buf: bytes) -> bool | None:
    if len(buf) < 2:
        if buf and buf != b"\r":
            raise ValueError("chunk data not followed by CRLF")
        return None
    if buf[:2] != b"\r\n":
        raise ValueError("chunk data not followed by CRLF")
    return True
