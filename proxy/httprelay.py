"""The I/O side of HTTP rules: serve one diverted connection as an HTTP/1.1
intermediary that injects credentials.

:mod:`egress_agent.proxy.server` hands a connection here once an allow rule
with ``http:`` decided it. From then on this module owns the connection: it
optionally terminates the client's TLS (``client_tls``), reads requests one
after another (pipelined requests are served in order), rewrites each head
with :mod:`egress_agent.proxy.httpmessage`, connects upstream on the first request
(to the original destination's address, with TLS verification when
``upstream.tls``), streams bodies both ways with back-pressure, and writes one
``request`` audit record per request. The connection's own record is still
written by the server, once, with the number of requests.

Every failure a client can see has a generic body that names the rule and, for
a secret, the file path -- never a secret's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from egress_agent.policy.model import (
    HttpRule,
    IPAddress,
)
from egress_agent.proxy import credentials, httpmessage
from egress_agent.proxy.audit import AuditLog, RequestRecord, rfc3339
from egress_agent.proxy.original_dst import Endpoint
from egress_agent.proxy.secretfiles import SecretError, Secrets, TlsContexts
from egress_agent.proxy.streams import READ_SIZE, Stream, TcpStream, TlsServerStream, take_over
from egress_agent.proxy.upstream import connect_marked, upstream_socket

log = logging.getLogger(__name__)

# When the response is complete but the request body is still being sent,
# how long to wait for the body to finish (its last bytes may merely be
# waiting for the upstream write buffer to drain) before giving up on it.
BODY_AFTER_RESPONSE = 2.0
T = TypeVar("T")


class HttpResources:
    """What all HTTP connections share: secrets and TLS contexts, each
    re-read when its files change."""

    def __init__(self) -> None:
        self.secrets = Secrets()
        self.tls = TlsContexts()


@dataclass(frozen=True, kw_only=True)
class HostDecision:
    """How the policy decides a request naming a Host on this connection:
    the allowing rule (None: denied), the address to send it to (None: the
    original destination's) and why a rule naming the host did not match."""

    rule: str | None
    address: IPAddress | None = None
    reason: str | None = None


@dataclass(kw_only=True)
class HttpConnection:
    """What the server knows about the connection, and what this module
    reports back for its audit record."""

    conn_id: str
    src: Endpoint
    dst: Endpoint
    workload: str | None
    rule: str
    http: HttpRule
    tls: bool  # the client speaks TLS (terminated with client_tls)
    # Decides this connection again for a request naming this Host (names
    # resolved and bound to addresses); a request whose Host another rule
    # (or none) allows is refused with 421.
    decide_host: Callable[[str | None], Awaitable[HostDecision]]
    # Plain HTTP a rule's hosts allowed, relayed without rewriting: only
    # every request's Host is checked, and Upgrade (WebSocket) is passed on.
    pass_through: bool = False
    connect_timeout: float
    idle_timeout: float
    upstream_mark: int
    audit: AuditLog
    resources: HttpResources
    touch: Callable[[], None]
    # Results.
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    denied: bool = False  # upstream certificate verification refused
    forwarded: int = 0  # requests whose head reached the upstream server
    upstream_addr: str | None = field(default=None)


class _Refused(Exception):
    """A request the proxy answers itself with ``status`` and ``message``."""

    def __init__(self, status: int, message: str, *, deny: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.deny = deny


class _Broken(Exception):
    """A connection that cannot go on; nothing more can be sent to the client."""


async def refuse(transport: asyncio.Transport, response: bytes, *, idle: float) -> None:
    """Send the proxy's own ``response`` on a connection it will not serve, then close."""
    stream = take_over(transport, idle=idle, touch=lambda: None)
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await stream.write(response)
    await stream.linger_close()


async def serve(
    conn: HttpConnection,
    transport: asyncio.Transport,
    initial: bytes,
    *,
    upstream: TcpStream | None = None,
) -> None:
    """Serve HTTP on the client's ``transport`` until either side ends;
    ``upstream`` is a plain connection to the original destination made
    already (used for the first request that goes there)."""
    raw = take_over(transport, idle=conn.idle_timeout, touch=conn.touch)
    client: Stream = raw
    pending = initial
    if conn.tls:
        assert conn.http.client_tls is not None
        try:
            ctx = conn.resources.tls.server_context(conn.http.client_tls)
        except SecretError as exc:
            conn.error = f"rule {conn.rule}: client_tls {exc}"
            log.error("%s", conn.error)
            raw.abort()
            return
        tls = TlsServerStream(raw, ctx, initial)
        try:
            await tls.handshake()
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            conn.error = f"client TLS handshake failed: {_reason(exc)}"
            raw.abort()
            return
        client = tls
        pending = b""
    session = _Session(conn, client, bytearray(pending))
    if upstream is not None:
        session.upstream = upstream
        session.upstream_address = conn.dst.address
        conn.upstream_addr = str(conn.dst)
    try:
        await session.run()
    finally:
        session.close_upstream()
        if session.abort_client:
            client.abort()
        else:
            await client.linger_close()


class _Session:
    def __init__(self, conn: HttpConnection, client: Stream, buf: bytearray) -> None:
        self.conn = conn
        self.client = client
        self.buf = buf  # client bytes read but not used yet
        self.upstream: TcpStream | None = None
        self.upstream_name: str | None = None  # the SNI it was opened (and verified) with
        self.upstream_address: IPAddress | None = None  # where it goes
        self.target: IPAddress = conn.dst.address  # where the current request goes
        self.ubuf = bytearray()
        self.abort_client = False

    # -- the request loop -------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                parsed = await self._read_head(self.client, self.buf, httpmessage.parse_request)
            except ValueError as exc:
                await self._answer_malformed(exc)
                return
            except (TimeoutError, ConnectionError, OSError):
                return
            if parsed is None:
                return  # the client closed between requests
            head, used = parsed
            del self.buf[:used]
            keep = await self._exchange(head, used)
            if not keep:
                return

    async def _answer_malformed(self, exc: ValueError) -> None:
        conn = self.conn
        conn.requests += 1
        conn.error = f"malformed HTTP request: {exc}"
        body = httpmessage.error_response(400, f"malformed HTTP request: {exc}")
        await self._send_own(body)
        self._record(
            started=time.time(), method=None, host=None, path=None, status=400,
            up=0, down=len(body), error=conn.error,
        )  # fmt: skip

    async def _send_own(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await self.client.write(data)
        self.conn.bytes_down += len(data)

    async def _exchange(self, head: httpmessage.RequestHead, head_bytes: int) -> bool:
        """One request and its response; whether the connection goes on."""
        conn = self.conn
        conn.requests += 1
        conn.bytes_up += head_bytes
        started = time.time()
        mono = time.monotonic()
        up = head_bytes
        down = 0
        status: int | None = None
        error: str | None = None

        def record() -> None:
            self._record(
                started=started, method=head.method, host=head.host, path=head.path,
                status=status, up=up, down=down, error=error,
                duration_ms=round((time.monotonic() - mono) * 1000, 3),
            )  # fmt: skip

        try:
            await self._check_host(head)
            forward = self._rewrite(head)
            if head.framing.chunked and not head.expect_continue:
                # Check the first chunk line before anything goes upstream, so
                # a malformed body start never reaches the server.
                await self._fill_until(
                    self.client, self.buf, httpmessage.parse_chunk_line, upstream=False
                )
            await self._ensure_upstream(head)
        except _Refused as exc:
            status = exc.status
            error = exc.message
            if exc.deny:
                conn.denied = True
            conn.error = conn.error or error
            body = httpmessage.error_response(exc.status, exc.message)
            await self._send_own(body)
            down = len(body)
            record()
            return False
        except ValueError as exc:
            status = 400
            error = f"malformed HTTP request: {exc}"
            conn.error = error
            body = httpmessage.error_response(400, error)
            await self._send_own(body)
            down = len(body)
            record()
            return False
        except _Broken as exc:
            error = f"client: {exc}"
            conn.error = error
            record()
            return False
        except (TimeoutError, ConnectionError, OSError) as exc:
            error = f"client: {_reason(exc)}"
            conn.error = error
            record()
            return False

        assert self.upstream is not None
        upstream = self.upstream
        counter = _Counter()
        pump = asyncio.get_running_loop().create_task(
            self._send_request(forward, head, upstream, counter), name="http-request-body"
        )
        response: httpmessage.ResponseHead | None = None
        response_started = [False]
        must_close = False
        try:
            response, down, must_close = await self._relay_response(head, response_started)
            status = response.status
            if not pump.done():
                await asyncio.wait({pump}, timeout=BODY_AFTER_RESPONSE)
        except asyncio.CancelledError:
            pump.cancel()
            raise
        except _Broken as exc:
            error = str(exc)
        except ValueError as exc:
            error = f"malformed response from upstream: {exc}"
        except (TimeoutError, ConnectionError, OSError) as exc:
            error = f"upstream: {_reason(exc)}"
        pump_error: str | None = None
        if pump.done():
            pump_error = pump.result()
        else:
            # The server answered before the whole body arrived (an early 4xx),
            # or failed: the rest of the body cannot be told from the next request.
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            pump_error = "response ended before the request body was sent"
        up += counter.bytes
        conn.bytes_up += counter.bytes
        conn.bytes_down += down
        if response is None:
            if pump_error is not None and pump_error.startswith("client"):
                error = pump_error  # the client's failure is what broke the exchange
            error = error or pump_error
            if not response_started[0]:
                status = 502
                body = httpmessage.error_response(
                    502, f"rule {conn.rule}: upstream failed: {error}"
                )
                await self._send_own(body)
                down += len(body)
            else:
                self.abort_client = True
            conn.error = conn.error or error
            record()
            return False
        if pump_error is not None and error is None and pump_error.startswith("client"):
            error = pump_error
            conn.error = conn.error or error
        record()
        if response.status == 101 and pump_error is None:
            await self._switched()
            return False
        upstream_reusable = response.keep_alive and pump_error is None
        if not upstream_reusable:
            self.close_upstream()
        return head.keep_alive and not must_close and pump_error is None and error is None

    async def _switched(self) -> None:
        """After ``101 Switching Protocols`` (WebSocket): the connection is no
        longer HTTP; bytes go both ways unchanged, each side's end of stream
        passed on, until both have ended. Counted in the connection's record."""
        assert self.upstream is not None
        client, upstream = self.client, self.upstream
        if not isinstance(client, TcpStream):
            return  # only a plain client is passed through
        conn = self.conn

        async def pipe(src: TcpStream, buf: bytearray, dst: TcpStream, *, up: bool) -> None:
            data = bytes(buf)  # read already, behind the request or response head
            buf.clear()
            while True:
                if data:
                    if up:
                        conn.bytes_up += len(data)
                    else:
                        conn.bytes_down += len(data)
                    await dst.write_untimed(data)
                data = await src.read_untimed()
                if not data:
                    break
                conn.touch()
            if dst.writer.can_write_eof() and not dst.writer.transport.is_closing():
                dst.writer.write_eof()

        ups = asyncio.get_running_loop().create_task(
            pipe(client, self.buf, upstream, up=True), name="websocket-up"
        )
        downs = asyncio.get_running_loop().create_task(
            pipe(upstream, self.ubuf, client, up=False), name="websocket-down"
        )
        try:
            done, _ = await asyncio.wait({ups, downs}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    conn.error = conn.error or f"after the upgrade: {_reason(exc)}"
                    self.abort_client = True
                    upstream.abort()
        finally:
            for task in (ups, downs):
                task.cancel()
            await asyncio.gather(ups, downs, return_exceptions=True)

    # -- request side ---------------------------------------------------------

    async def _check_host(self, head: httpmessage.RequestHead) -> None:
        """Decide the request's Host as the connection was decided: by the
        same rule, and (names bound to addresses) at an address of its own."""
        conn = self.conn
        decided = await conn.decide_host(head.host)
        if decided.rule != conn.rule:
            why = f" ({decided.reason})" if decided.reason else ""
            raise _Refused(
                421,
                f"Host {head.host or '(none)'} is not served by rule {conn.rule} on this"
                f" connection{why}",
            )
        self.target = decided.address or conn.dst.address

    def _rewrite(self, head: httpmessage.RequestHead) -> bytes:
        conn = self.conn
        if conn.pass_through:
            headers = httpmessage.build_request_head(head, set_headers=(), remove_headers=())
            if head.upgrade is not None:
                # Passed on, so the server may switch (101) to WebSocket.
                headers += [(b"Connection", b"Upgrade"), (b"Upgrade", head.upgrade)]
            return httpmessage.serialize_request(
                head.method, httpmessage.origin_form(head.target), headers, close=False
            )
        try:
            return credentials.forward_head(
                head, conn.http, secret=conn.resources.secrets.text, now=time.time()
            )
        except SecretError as exc:
            log.error("rule %s: secret %s", conn.rule, exc)
            raise _Refused(502, f"rule {conn.rule}: secret file {exc}") from None

    async def _send_request(
        self, forward: bytes, head: httpmessage.RequestHead, upstream: Stream, counter: _Counter
    ) -> str | None:
        """Send the head and stream the body; the reason it stopped early, or None."""
        try:
            await upstream.write(forward)
            self.conn.forwarded += 1
            framing = head.framing
            if framing.chunked:
                await self._copy_chunked(self.client, self.buf, upstream, counter)
            elif framing.length:
                await self._copy_length(self.client, self.buf, upstream, framing.length, counter)
        except ValueError as exc:
            # A malformed chunk mid-body: cut the upstream connection so the
            # server never takes a truncated body for a complete one.
            upstream.abort()
            return f"client: malformed request body: {exc}"
        except _Broken as exc:
            upstream.abort()
            return f"client: {exc}"
        except (TimeoutError, ConnectionError, OSError) as exc:
            return f"upstream: {_reason(exc)}"
        return None

    # -- upstream -----------------------------------------------------------------

    async def _ensure_upstream(self, head: httpmessage.RequestHead) -> None:
        conn = self.conn
        up = conn.http.upstream
        server_name = up.server_name or head.host
        if self.upstream is not None and (
            self.upstream.at_eof()
            or (up.tls and server_name != self.upstream_name)
            or self.upstream_address != self.target
        ):
            # Dropped by the server while idle, verified for another name
            # than this request's Host (a wildcard rule allows several), or
            # this Host lives at another address (resolve: connect).
            self.close_upstream()
        if self.upstream is not None:
            return
        port = up.port or conn.dst.port
        ctx: ssl.SSLContext | None = None
        if up.tls:
            if server_name is None:
                raise _Refused(400, "the request has no Host: cannot verify the upstream server")
            try:
                ctx = conn.resources.tls.client_context(up.ca_file)
            except SecretError as exc:
                log.error("rule %s: %s", conn.rule, exc)
                raise _Refused(502, f"rule {conn.rule}: upstream ca_file {exc}") from None
        endpoint = Endpoint(address=self.target, port=port)
        conn.upstream_addr = str(endpoint)
        sock = upstream_socket(endpoint)
        try:
            async with asyncio.timeout(conn.connect_timeout):
                await connect_marked(sock, endpoint, mark=conn.upstream_mark)
                reader, writer = await asyncio.open_connection(
                    sock=sock,
                    ssl=ctx,
                    server_hostname=server_name if ctx is not None else None,
                    limit=READ_SIZE,
                )
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise _Refused(
                502,
                f"rule {conn.rule}: upstream {conn.upstream_addr} certificate verification"
                f" failed for {server_name}: {exc.verify_message}",
                deny=True,
            ) from None
        except TimeoutError:
            sock.close()
            raise _Refused(
                502,
                f"rule {conn.rule}: upstream {conn.upstream_addr} connect timed out after"
                f" {conn.connect_timeout:g}s",
            ) from None
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise _Refused(
                502, f"rule {conn.rule}: upstream {conn.upstream_addr}: {_reason(exc)}"
            ) from None
        self.upstream = TcpStream(reader, writer, idle=conn.idle_timeout, touch=conn.touch)
        self.upstream_name = server_name
        self.upstream_address = self.target
        self.ubuf.clear()

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def _relay_response(
        self, head: httpmessage.RequestHead, started: list[bool]
    ) -> tuple[httpmessage.ResponseHead, int, bool]:
        """Relay interim responses and the final one; returns the final head,
        the bytes sent to the client, and whether the client connection must
        close after it."""
        assert self.upstream is not None
        upstream = self.upstream
        down = 0

        upgrade = self.conn.pass_through and head.upgrade is not None

        def parse(buf: bytes) -> tuple[httpmessage.ResponseHead, int] | None:
            return httpmessage.parse_response(buf, request_method=head.method, upgrade=upgrade)

        while True:
            parsed = await self._read_head(upstream, self.ubuf, parse)
            if parsed is None:
                raise _Broken("upstream closed before a response")
            response, used = parsed
            del self.ubuf[:used]
            # An HTTP/1.0 client cannot read chunked framing (RFC 9112
            # section 7.1): it gets the bare body, delimited by the close.
            dechunk = response.framing.chunked and head.version == "HTTP/1.0"
            close = not head.keep_alive or response.framing.until_close or dechunk
            out = httpmessage.serialize_response(response, close=close, dechunk=dechunk)
            started[0] = True
            await self.client.write(out)
            down += len(out)
            if response.status == 101:
                return response, down, True  # the caller switches to a byte relay
            if response.interim:
                continue
            counter = _Counter()
            framing = response.framing
            if framing.chunked:
                await self._copy_chunked(
                    upstream, self.ubuf, self.client, counter, reframe=not dechunk
                )
            elif framing.until_close:
                await self._copy_until_close(upstream, self.ubuf, self.client, counter)
            elif framing.length:
                await self._copy_length(upstream, self.ubuf, self.client, framing.length, counter)
            return response, down + counter.bytes, close

    # -- framing helpers --------------------------------------------------------

    async def _read_head(
        self,
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

    async def _fill_until(
        self,
        stream: Stream,
        buf: bytearray,
        parse: Callable[[bytes], T | None],
        *,
        upstream: bool,
    ) -> T:
        while True:
            got = parse(bytes(buf))
            if got is not None:
                return got
            data = await stream.read()
            if not data:
                raise _Broken(
                    ("upstream" if upstream else "client") + " closed in the middle of a message"
                )
            buf += data

    async def _copy_length(
        self, src: Stream, buf: bytearray, dst: Stream, length: int, counter: _Counter
    ) -> None:
        remaining = length
        while remaining:
            if not buf:
                data = await src.read()
                if not data:
                    raise _Broken(f"closed with {remaining} body bytes still to come")
                buf += data
            piece = bytes(buf[:remaining])
            del buf[: len(piece)]
            remaining -= len(piece)
            counter.bytes += len(piece)
            await dst.write(piece)

    async def _copy_until_close(
        self, src: Stream, buf: bytearray, dst: Stream, counter: _Counter
    ) -> None:
        if buf:
            counter.bytes += len(buf)
            await dst.write(bytes(buf))
            buf.clear()
        while data := await src.read():
            counter.bytes += len(data)
            await dst.write(data)

    async def _copy_chunked(
        self, src: Stream, buf: bytearray, dst: Stream, counter: _Counter, *, reframe: bool = True
    ) -> None:
        """Copy a chunked body, checking its framing. With ``reframe`` the
        chunks are re-emitted with normalised lines (extensions dropped);
        without, only the data goes out."""
        upstream = src is self.upstream
        while True:
            size, used = await self._fill_until(
                src, buf, httpmessage.parse_chunk_line, upstream=upstream
            )
            counter.bytes += used
            del buf[:used]
            if size == 0:
                trailers, used = await self._fill_until(
                    src, buf, httpmessage.parse_trailers, upstream=upstream
                )
                counter.bytes += used
                del buf[:used]
                if reframe:
                    fields = b"".join(n + b": " + v + b"\r\n" for n, v in trailers)
                    await dst.write(b"0\r\n" + fields + b"\r\n")
                return
            if reframe:
                await dst.write(f"{size:x}\r\n".encode("ascii"))
            await self._copy_length(src, buf, dst, size, counter)
            await self._fill_until(src, buf, lambda b: _crlf(b), upstream=upstream)
            del buf[:2]
            counter.bytes += 2
            if reframe:
                await dst.write(b"\r\n")

    def _record(
        self,
        *,
        started: float,
        method: str | None,
        host: str | None,
        path: str | None,
        status: int | None,
        up: int,
        down: int,
        error: str | None,
        duration_ms: float = 0.0,
    ) -> None:
        conn = self.conn
        conn.audit.write_request(
            RequestRecord(
                time=rfc3339(started),
                connection=conn.conn_id,
                src=str(conn.src),
                workload=conn.workload,
                dst=str(conn.dst),
                upstream=conn.upstream_addr,
                rule=conn.rule,
                method=method,
                host=host,
                path=path,
                status=status,
                bytes_up=up,
                bytes_down=down,
                duration_ms=duration_ms,
                error=error,
            )
        )


@dataclass
class _Counter:
    bytes: int = 0


def _crlf(buf: bytes) -> bool | None:
    if len(buf) < 2:
        if buf and buf != b"\r":
            raise ValueError("chunk data not followed by CRLF")
        return None
    if buf[:2] != b"\r\n":
        raise ValueError("chunk data not followed by CRLF")
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
