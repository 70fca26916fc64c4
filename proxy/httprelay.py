"""The HTTP exchange of rules with ``http:``: serve one diverted connection
as an HTTP/1.1 intermediary that injects credentials.

:mod:`egress_agent.proxy.handoff` hands a connection here once an allow rule
with ``http:`` decided it. From then on this module owns the connection: it
optionally terminates the client's TLS (``client_tls``), reads requests one
after another (pipelined requests are served in order), and writes one
``request`` audit record per request. The connection's own record is still
written by ``connection``, once, with the number of requests.

Each request is one exchange, carried by an :class:`_Exchange` record in
three steps: *prepare* decides its Host by the policy, rewrites the head
(:mod:`.credentials`) and connects upstream when needed (to the original
destination's address, or the name's own, through :mod:`.upstream`, with
TLS verification when ``upstream.tls``); *transfer* streams the request
body up while the response comes down (:mod:`.httpbody`, over the adapters
of :mod:`.streams`); *conclude* settles the outcome, writes the record and
decides whether the connection goes on -- or switches to a byte relay after
``101``.

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

from egress_agent.policy.model import HttpRule, IPAddress
from egress_agent.proxy import controls, credentials, httpmessage
from egress_agent.proxy.audit import AuditLog, RequestRecord, rfc3339
from egress_agent.proxy.httpbody import (
    Broken,
    Counter,
    fill_until,
    read_head,
    relay_response,
    send_request,
)
from egress_agent.proxy.original_dst import Endpoint
from egress_agent.proxy.secretfiles import SecretError, Secrets, TlsContexts
from egress_agent.proxy.streams import (
    READ_SIZE,
    Stream,
    TcpStream,
    TlsServerStream,
    failure_reason,
    splice,
    take_over,
)
from egress_agent.proxy.traffic import Refusal, Ticket
from egress_agent.proxy.upstream import connect_marked, upstream_socket

log = logging.getLogger(__name__)

# When the response is complete but the request body is still being sent,
# how long to wait for the body to finish (its last bytes may merely be
# waiting for the upstream write buffer to drain) before giving up on it.
BODY_AFTER_RESPONSE = 2.0


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
    # The rule's limits.requests and breaker (see ``controls``).
    traffic: controls.RuleTraffic | None = None
    # Results.
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    denied: bool = False  # upstream certificate verification refused
    forwarded: int = 0  # requests whose head reached the upstream server
    upstream_addr: str | None = field(default=None)


@dataclass(kw_only=True)
class _Exchange:
    """One request and its response as they go: what the request's audit
    record says, and what decides whether the connection goes on."""

    head: httpmessage.RequestHead
    started: float = field(default_factory=time.time)  # wall clock, for the record
    clock: float = field(default_factory=time.monotonic)  # for the duration
    up: int  # bytes from the client: the head, then the body sent on
    down: int = 0  # bytes to the client
    status: int | None = None
    error: str | None = None
    response: httpmessage.ResponseHead | None = None  # the final response relayed
    response_started: bool = False  # some of a response reached the client
    must_close: bool = False  # the client connection ends after this response
    body_error: str | None = None  # why the request body stopped early
    refusal: Refusal | None = None  # a traffic control refused it (429, 503)
    keep: bool = False  # refused, the connection still serves the next request

    def response_starts(self) -> None:
        self.response_started = True


class _Limited(Exception):
    """A request the rule's traffic controls refuse (see ``controls``)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class _Refused(Exception):
    """A request the proxy answers itself with ``status`` and ``message``."""

    def __init__(self, status: int, message: str, *, deny: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.deny = deny


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
            conn.error = f"client TLS handshake failed: {failure_reason(exc)}"
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
        self.ticket: Ticket | None = None  # the breaker let the request through

    # -- the request loop -------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                parsed = await read_head(self.client, self.buf, httpmessage.parse_request)
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
        self.conn.requests += 1
        self.conn.bytes_up += head_bytes
        ex = _Exchange(head=head, up=head_bytes)
        try:
            forward = await self._prepare(ex)
            if forward is None:
                self._record_exchange(ex)
                return ex.keep
            await self._transfer(ex, forward)
            return await self._conclude(ex)
        finally:
            self._breaker_result(None)  # ended before it said anything of the upstream

    async def _prepare(self, ex: _Exchange) -> bytes | None:
        """Decide the request's Host, rewrite its head, check the start of a
        chunked body and connect upstream: the head to forward, or None when
        the exchange ends here (the proxy answered it, or the client failed)."""
        conn = self.conn
        head = ex.head
        try:
            await self._check_host(head)
            forward = self._rewrite(head)
            self._check_traffic(head)
            if head.framing.chunked and not head.expect_continue:
                # Check the first chunk line before anything goes upstream, so
                # a malformed body start never reaches the server.
                await fill_until(
                    self.client, self.buf, httpmessage.parse_chunk_line, upstream=False
                )
            await self._ensure_upstream(head)
        except _Limited as exc:
            ex.refusal = exc.refusal
            ex.error = exc.refusal.message
            # Nothing of a body has been read: the connection can only go on
            # without one (RFC 9112 section 9.3).
            ex.keep = head.keep_alive and not head.framing.has_body
            ex.status, body = controls.refusal_response(exc.refusal, close=not ex.keep)
            await self._send_own(body)
            ex.down += len(body)
        except _Refused as exc:
            ex.status = exc.status
            ex.error = exc.message
            if exc.deny:
                conn.denied = True
            conn.error = conn.error or ex.error
            await self._answer(ex, exc.status, exc.message)
        except ValueError as exc:
            ex.status = 400
            ex.error = f"malformed HTTP request: {exc}"
            conn.error = ex.error
            await self._answer(ex, 400, ex.error)
        except Broken as exc:
            ex.error = f"client: {exc}"
            conn.error = ex.error
        except (TimeoutError, ConnectionError, OSError) as exc:
            ex.error = f"client: {failure_reason(exc)}"
            conn.error = ex.error
        else:
            return forward
        return None

    async def _answer(self, ex: _Exchange, status: int, message: str) -> None:
        """Answer the request with the proxy's own error response."""
        body = httpmessage.error_response(status, message)
        await self._send_own(body)
        ex.down += len(body)

    async def _transfer(self, ex: _Exchange, forward: bytes) -> None:
        """Send the head and stream the request body upstream while the
        response is relayed to the client; what happened goes into ``ex``."""
        assert self.upstream is not None
        counter = Counter()
        upstream = self.upstream

        def sent() -> None:
            self.conn.forwarded += 1

        pump = asyncio.get_running_loop().create_task(
            send_request(self.client, self.buf, upstream, forward, ex.head, counter, sent=sent),
            name="http-request-body",
        )
        try:
            ex.response, ex.down, ex.must_close = await relay_response(
                upstream,
                self.ubuf,
                self.client,
                ex.head,
                upgrade=self.conn.pass_through and ex.head.upgrade is not None,
                starting=ex.response_starts,
            )
            ex.status = ex.response.status
            if not pump.done():
                await asyncio.wait({pump}, timeout=BODY_AFTER_RESPONSE)
        except asyncio.CancelledError:
            pump.cancel()
            raise
        except Broken as exc:
            ex.error = str(exc)
        except ValueError as exc:
            ex.error = f"malformed response from upstream: {exc}"
        except (TimeoutError, ConnectionError, OSError) as exc:
            ex.error = f"upstream: {failure_reason(exc)}"
        if pump.done():
            ex.body_error = pump.result()
        else:
            # The server answered before the whole body arrived (an early 4xx),
            # or failed: the rest of the body cannot be told from the next request.
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            ex.body_error = "response ended before the request body was sent"
        ex.up += counter.bytes
        self.conn.bytes_up += counter.bytes
        self.conn.bytes_down += ex.down

    async def _conclude(self, ex: _Exchange) -> bool:
        """Settle the exchange's outcome, write its record, and say whether
        the connection goes on (switching to a byte relay after a 101)."""
        conn = self.conn
        body_error = ex.body_error
        if ex.response is not None:
            # A 5xx is the server failing, for an http: rule's breaker.
            http = conn.traffic is not None and conn.traffic.http
            self._breaker_result(not (http and ex.response.status >= 500))
        elif not ex.response_started and not (ex.error or "").startswith("client"):
            self._breaker_result(False)
        if ex.response is None:
            if body_error is not None and body_error.startswith("client"):
                ex.error = body_error  # the client's failure is what broke the exchange
            ex.error = ex.error or body_error
            if not ex.response_started:
                ex.status = 502
                await self._answer(ex, 502, f"rule {conn.rule}: upstream failed: {ex.error}")
            else:
                self.abort_client = True
            conn.error = conn.error or ex.error
            self._record_exchange(ex)
            return False
        if body_error is not None and ex.error is None and body_error.startswith("client"):
            ex.error = body_error
            conn.error = conn.error or ex.error
        self._record_exchange(ex)
        if ex.response.status == 101 and body_error is None:
            await self._switched()
            return False
        upstream_reusable = ex.response.keep_alive and body_error is None
        if not upstream_reusable:
            self.close_upstream()
        return ex.head.keep_alive and not ex.must_close and body_error is None and ex.error is None

    async def _switched(self) -> None:
        """After ``101 Switching Protocols`` (WebSocket): the connection is no
        longer HTTP; bytes go both ways unchanged, each side's end of stream
        passed on, until both have ended. Counted in the connection's record."""
        assert self.upstream is not None
        client, upstream = self.client, self.upstream
        if not isinstance(client, TcpStream):
            return  # only a plain client is passed through
        conn = self.conn

        def moved(up: bool, count: int) -> None:
            if up:
                conn.bytes_up += count
            else:
                conn.bytes_down += count

        def failed(exc: BaseException) -> None:
            conn.error = conn.error or f"after the upgrade: {failure_reason(exc)}"
            self.abort_client = True
            upstream.abort()

        await splice(client, self.buf, upstream, self.ubuf, moved=moved, failed=failed)

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
            self._breaker_result(False)
            raise _Refused(
                502,
                f"rule {conn.rule}: upstream {conn.upstream_addr} certificate verification"
                f" failed for {server_name}: {exc.verify_message}",
                deny=True,
            ) from None
        except TimeoutError:
            sock.close()
            self._breaker_result(False)
            raise _Refused(
                502,
                f"rule {conn.rule}: upstream {conn.upstream_addr} connect timed out after"
                f" {conn.connect_timeout:g}s",
            ) from None
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self._breaker_result(False)
            raise _Refused(
                502, f"rule {conn.rule}: upstream {conn.upstream_addr}: {failure_reason(exc)}"
            ) from None
        self.upstream = TcpStream(reader, writer, idle=conn.idle_timeout, touch=conn.touch)
        self.upstream_name = server_name
        self.upstream_address = self.target
        self.ubuf.clear()

    def _check_traffic(self, head: httpmessage.RequestHead) -> None:
        """Take a token of the rule's ``limits.requests`` and ask its breaker
        for the request's destination; raise :class:`_Limited` when refused."""
        traffic = self.conn.traffic
        if traffic is None:
            return
        refusal = traffic.request()
        if refusal is None:
            port = self.conn.http.upstream.port or self.conn.dst.port
            got = traffic.enter(head.host, self.target, port)
            if isinstance(got, Ticket):
                self.ticket = got
            refusal = got if isinstance(got, Refusal) else None
        if refusal is not None:
            raise _Limited(refusal)

    def _breaker_result(self, ok: bool | None) -> None:
        """Tell the breaker how the request it let through went (None: it
        ended before reaching the upstream or failing there)."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None and self.conn.traffic is not None:
            self.conn.traffic.report(ticket, ok)

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _record_exchange(self, ex: _Exchange) -> None:
        head = ex.head
        self._record(
            started=ex.started, method=head.method, host=head.host, path=head.path,
            status=ex.status, up=ex.up, down=ex.down, error=ex.error,
            duration_ms=round((time.monotonic() - ex.clock) * 1000, 3), refusal=ex.refusal,
        )  # fmt: skip

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
        refusal: Refusal | None = None,
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
                limit=refusal.limit if refusal else None,
                limit_value=refusal.value if refusal else None,
            )
        )
