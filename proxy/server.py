"""The transparent proxy: accept, decide, connect, relay.

For each diverted connection: read the original destination, identify the
workload, peek at the first bytes when the verdict depends on the server name
(TLS SNI or HTTP Host; capped in bytes and time), decide, connect upstream
with a socket mark the rules never divert (``upstream``), and relay both ways
with proper half-close -- or hand the connection to the HTTP relay
(``httprelay``) when an ``http`` rule decided it. Each connection ends in
exactly one audit record (see ``audit``).

The relay uses asyncio protocols rather than streams: bytes go from one
transport's ``data_received`` straight into the other's ``write`` with
``pause_reading``/``resume_reading`` as back-pressure, which is several times
cheaper per chunk than stream readers and writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import gc
import ipaddress
import itertools
import logging
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

from egress_agent.policy.decide import (
    candidate_rule,
    decide,
    identify,
    names_to_keep_warm,
    names_to_resolve,
    needs_server_name,
)
from egress_agent.policy.model import Action, HttpRule, IPAddress, Policy, Verdict
from egress_agent.proxy import httpmessage, httprelay
from egress_agent.proxy.audit import AuditLog, AuditRecord, Event, RequestRecord, rfc3339
from egress_agent.proxy.conntrack import Conntrack
from egress_agent.proxy.original_dst import (
    Endpoint,
    NotDiverted,
    endpoint_of,
    original_dst,
)
from egress_agent.proxy.peek import HTTP_METHODS, Peeked, Protocol, Sniffer
from egress_agent.proxy.resolver import Resolver
from egress_agent.proxy.sockdiag import socket_mark
from egress_agent.proxy.streams import TcpStream, take_over
from egress_agent.proxy.tasks import TaskSet
from egress_agent.proxy.upstream import connect_marked, upstream_socket

log = logging.getLogger(__name__)

_HTTP_STARTS = tuple(m.encode("ascii") + b" " for m in HTTP_METHODS)
IP_FREEBIND = 15
IPV6_FREEBIND = 78
# Write-buffer high-water mark per direction before the other side is paused.
WRITE_HIGH_WATER = 256 * 1024
SWEEP_INTERVAL = 1.0
# Plain HTTP allowed by a rule's hosts is served by the HTTP relay without
# rewriting anything, so that every request's Host is checked.
PASS_THROUGH = HttpRule()
# A relayed connection holds two file descriptors (client and upstream); the
# agent's own (listeners, netlink and BPF map descriptors, the audit log, the
# status server) and short-lived ones (sock_diag, resolver) fit in a reserve.
FDS_PER_CONNECTION = 2
FD_RESERVE = 256
# Audit and metrics name the cap that refused a connection by its setting.
CAP_TOTAL = "proxy.max_connections"
CAP_WORKLOAD = "proxy.max_connections_per_workload"
CAP_WARNING_INTERVAL = 10.0


# Give freed memory back to the system once this many connections have
# ended since the peak (and at least half of those open then).
TRIM_AFTER_DROP = 1000


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3), or None where the C library has none (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def descriptor_room() -> int:
    """How many descriptors connections may hold: this process's soft
    RLIMIT_NOFILE (the agent raises it to the hard one at start) less a
    reserve for the agent's own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(FDS_PER_CONNECTION, soft - FD_RESERVE)


class _Half(asyncio.Protocol):
    """One side of a relayed connection; forwards what it reads to its peer.

    Until the relay is wired (``peer`` set), nothing is forwarded: the client
    side's bytes are kept for the peek and replayed upstream, and the upstream
    side's bytes, end of stream and loss are kept for the client. A server that
    speaks first (SMTP's greeting, SSH's banner) may send them before the
    proxy has finished connecting; they must reach the client, never go back
    upstream. :meth:`Connection._start_relay` replays what was kept, in order.
    """

    def __init__(self, conn: Connection, *, upstream: bool) -> None:
        self.conn = conn
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False
        self.lost = False
        self.reset = False  # lost by an error (a reset), not an orderly close
        # Upstream side only: what arrived before the relay was wired.
        self.early = bytearray()
        self.paused_early = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.upstream:
            self.conn.accepted(self.transport)

    def data_received(self, data: bytes) -> None:
        self.conn.last_activity = self.conn.loop.time()
        peer = self.peer
        if peer is None or peer.transport is None:
            if self.upstream:
                self._keep_early(data)
            else:
                # Still deciding: keep the bytes for the peek and for replay upstream.
                self.conn.buffer_client_bytes(data)
            return
        if self.upstream:
            self.conn.bytes_down += len(data)
        else:
            self.conn.bytes_up += len(data)
            if self.conn.sniff_buf is not None:
                self.conn.sniff_more(data)
        peer.transport.write(data)

    def _keep_early(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= WRITE_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.paused_early = True

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            if not self.upstream:
                self.conn.client_eof_while_deciding()
            return True  # replayed when the relay is wired
        self.pass_eof()
        return True  # keep our sending side open: half-close

    def pass_eof(self) -> None:
        """Our end of stream, to the peer: half-close its sending side."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.transport.can_write_eof() and not peer.transport.is_closing():
            peer.transport.write_eof()
        if peer.eof and not self.conn.holding:
            # Both ways are done; not while the client's bytes are still held.
            self.conn.close_both()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reset = exc is not None
        if self.upstream:
            self.conn.server.upstreams -= 1
        if exc is not None and self.conn.error is None:
            side = "upstream" if self.upstream else "client"
            self.conn.error = f"{side}: {_describe(exc)}"
        peer = self.peer
        if peer is not None and peer.transport is not None:
            self.pass_loss()
        self.conn.half_lost()

    def pass_loss(self) -> None:
        """We are gone: close the peer (after what it still has to send), or
        reset it if we were reset."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.lost:
            return
        if self.reset:
            peer.transport.abort()  # pass a reset on
        else:
            peer.transport.close()

    def _source(self) -> _Half | None:
        """The side whose bytes we are writing: our peer, or, while the
        client's bytes are held and only the server's flow, the upstream."""
        if self.peer is not None:
            return self.peer
        return self.conn.upstream if not self.upstream else None

    def pause_writing(self) -> None:
        source = self._source()
        if source is not None and source.transport is not None:
            source.transport.pause_reading()

    def resume_writing(self) -> None:
        source = self._source()
        if source is not None and source.transport is not None:
            source.transport.resume_reading()


class Connection:
    """State of one diverted connection from accept to its audit record."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        # The policy in force when the connection arrived decides it, even if
        # a reload swaps the server's policy while this one is being peeked.
        self.policy = server.policy
        self.generation = server.generation
        self.policy_hash = server.policy_hash
        self.started = time.time()
        self.id = f"{server.id_prefix}-{next(server.ids)}"
        self.requests: int | None = None  # set when an http rule serves it
        self.started_mono = self.loop.time()
        self.last_activity = self.started_mono
        self.client = _Half(self, upstream=False)
        self.upstream: _Half | None = None
        self.src: Endpoint | None = None
        self.dst: Endpoint | None = None
        self.workload: str | None = None
        self.socket_mark: int | None = None  # read by sock_diag for cgroup workloads
        self.peeked: Peeked | None = None
        self.verdict: Verdict | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.error: str | None = None
        self.event: Event = "failed"
        self.deciding = False
        self.buffer = bytearray()
        self.sniff_buf: bytearray | None = None
        # Fed the client's first bytes as they arrive (see peek.Sniffer):
        # a trickle costs work in proportion to its bytes.
        self.sniffer = Sniffer()
        self.sniffed = 0  # bytes fed to it
        self._data_event = asyncio.Event()
        self.client_eof = False
        self.finished = False
        # Connected early (allowed without a name): the server's bytes reach
        # the client, the client's are held until its first message is checked.
        self.holding = False
        self.downstream_wired = False
        self.upstream_address: IPAddress | None = None  # when not the original destination
        self.admitted = False  # counted against the connection caps
        self.counted_as: str | None = None  # the workload it was counted for

    # -- client side, before relaying -------------------------------------------------

    def accepted(self, transport: asyncio.Transport) -> None:
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        try:
            self.src = endpoint_of(transport.get_extra_info("peername"))
            self.dst = original_dst(sock)
        except (NotDiverted, OSError, ValueError) as exc:
            self.fail(f"no original destination: {exc}")
            return
        self.src = self._original_source(sock, self.src)
        self.workload = identify(self.policy, self.src.address)
        if self.workload is None and any(w.cgroups for w in self.policy.workloads):
            self.workload = self._cgroup_workload(self.policy)
        if not self.admit():
            return
        self.deciding = True
        self.server.tasks.spawn(self.run(), name="connection")

    def _original_source(self, sock: socket.socket, seen: Endpoint) -> Endpoint:
        """The client's own address and port: conntrack may have moved the
        source port on the way in (see ``proxy.conntrack``); ``seen`` when it
        cannot say."""
        try:
            local = endpoint_of(sock.getsockname())
            address, port = self.server.conntrack.original_source(
                local=local.address, local_port=local.port, peer=seen.address, peer_port=seen.port
            )
        except (OSError, ValueError) as exc:
            log.debug("no conntrack entry for %s: %s", seen, exc)
            return seen
        if port == seen.port and address == seen.address:
            return seen
        return Endpoint(address=address, port=port)

    def admit(self) -> bool:
        """Count the connection against the caps on open connections, or
        refuse it (a reset, and an audit record naming the cap)."""
        refused = self.server.admit(self)
        if refused is None:
            self.admitted = True
            return True
        cap, reason = refused
        self.event = "denied"
        self.verdict = Verdict(action=Action.DENY, rule=cap, workload=self.workload)
        self.error = reason
        self.reset_client()
        return False

    def buffer_client_bytes(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= self.policy.proxy.peek_bytes and self.client.transport:
            self.client.transport.pause_reading()
        self._data_event.set()

    def client_eof_while_deciding(self) -> None:
        self.client_eof = True
        self._data_event.set()

    def sniff_more(self, data: bytes) -> None:
        # Relaying already (the verdict did not need the server name): learn
        # protocol and name for the audit record from the first bytes only.
        # sniff_buf holds what the sniffer has not been fed yet.
        assert self.sniff_buf is not None
        self.sniff_buf += data
        cap = self.policy.proxy.peek_bytes
        chunk = bytes(self.sniff_buf[: cap - self.sniffed])
        self.sniff_buf.clear()
        self.sniffed += len(chunk)
        try:
            peeked = self.sniffer.feed(chunk)
        except ValueError:
            peeked = Peeked(protocol=Protocol.TCP, server_name=None)
        if peeked is not None or self.sniffed >= cap:
            self.peeked = peeked
            self.sniff_buf = None

    async def run(self) -> None:
        try:
            await self._decide_and_connect()
        finally:
            self.deciding = False
            self.half_lost()

    async def _decide_and_connect(self) -> None:
        assert self.src is not None and self.dst is not None
        policy = self.policy
        settings = policy.proxy
        if self.server.is_own_endpoint(self.dst):
            self.fail("original destination is the proxy itself (loop refused)")
            return
        if needs_server_name(
            policy, workload=self.workload, dst=self.dst.address, dst_port=self.dst.port
        ):
            nameless = await self._decide(None)
            if nameless.action is Action.ALLOW and nameless.http is None:
                # Allowed even without a name (the destination is a literal
                # host's address, or a later rule allows it): connect now, so
                # a server that speaks first is not kept waiting; the client's
                # bytes wait until its first message has been looked at.
                await self._connect_then_check(nameless)
                return
            try:
                self.peeked = await self._peek(settings.peek_bytes, settings.peek_timeout)
            except ValueError as exc:
                if not await self._refuse_malformed_http(exc):
                    self.fail(f"malformed first bytes: {exc}")
                return
            except TimeoutError:
                self.fail(
                    f"first bytes incomplete after {settings.peek_timeout:g}s "
                    f"({len(self.buffer)} bytes received)"
                )
                return
        else:
            self.sniff_buf = bytearray(self.buffer)
        name = self.peeked.server_name if self.peeked else None
        self.verdict = await self._decide(name)
        if self.verdict.action is Action.DENY:
            self.event = "denied"
            self.error = self.verdict.reason
            self.reset_client()
            return
        if self.verdict.http is not None:
            await self._serve_http(self.verdict.http)
            return
        if self._check_every_request():
            await self._serve_http(PASS_THROUGH)
            return
        self.upstream_address = self.verdict.upstream
        failure = await self.dial(address=self.verdict.upstream)
        if failure is not None:
            self.fail(failure)
            return
        if self.client_left():
            return
        self.event = "closed"
        self._start_relay()

    async def _decide(self, server_name: str | None) -> Verdict:
        """The verdict for this flow with ``server_name``."""
        assert self.dst is not None
        return await self.decide_at(self.dst.address, self.dst.port, server_name)

    async def decide_at(self, address: IPAddress, port: int, server_name: str | None) -> Verdict:
        """The verdict for this client to ``address``:``port`` with
        ``server_name``, after resolving the names the policy binds for it
        through the proxy's cache (see ``policy.decide``), so that a name is
        allowed at its own addresses."""
        names = names_to_resolve(
            self.policy, workload=self.workload, dst=address, dst_port=port, server_name=server_name
        )
        resolved = await self.server.resolver.resolve_many(names) if names else None
        return decide(
            self.policy,
            workload=self.workload,
            dst=address,
            dst_port=port,
            server_name=server_name,
            resolved=resolved,
        )

    def _check_every_request(self) -> bool:
        """Plain HTTP allowed by a rule's hosts: one connection can carry
        requests for several hosts served at one address, so each request's
        Host must be decided, not only the first one's."""
        verdict, peeked = self.verdict, self.peeked
        return (
            verdict is not None
            and verdict.by_name
            and peeked is not None
            and peeked.protocol is Protocol.HTTP
        )

    async def _connect_then_check(self, nameless: Verdict) -> None:
        """Connect upstream at once, let the server's bytes reach the client,
        and hold the client's until its first message is known: a flow
        without a name stays allowed; one whose message names a server is
        decided again with that name, and refused (both sides reset) unless
        the name is allowed *at this destination*."""
        assert self.dst is not None
        settings = self.policy.proxy
        self.verdict = nameless
        self.holding = True
        failure = await self.dial()
        if failure is not None:
            self.fail(failure)
            return
        if self.client_left():
            return
        assert self.upstream is not None
        self._wire_downstream()
        try:
            peeked = await self._first_message(settings.peek_bytes, settings.peek_timeout)
        except ValueError as exc:
            self._refuse_held(f"malformed first bytes: {exc}", event="failed")
            return
        except TimeoutError:
            self._refuse_held(
                f"first message incomplete after {settings.peek_timeout:g}s"
                f" ({len(self.buffer)} bytes received)",
                event="failed",
            )
            return
        self.peeked = peeked
        if peeked is not None and peeked.server_name is not None:
            named = await self._decide(peeked.server_name)
            refusal = self._named_refusal(nameless, named, peeked)
            if refusal is not None:
                self.verdict = (
                    named
                    if named.action is Action.DENY
                    else Verdict(action=Action.DENY, rule=named.rule, workload=self.workload)
                )
                self._refuse_held(refusal, event="denied")
                return
            self.verdict = named
        if self.upstream.lost or self.client.lost:
            # The server said its piece and closed, the client left, or the
            # idle timeout ended it (the error says which).
            self.holding = False
            self.event = "closed"
            self.close_both()
            return
        if peeked is not None and peeked.protocol is Protocol.HTTP and self.verdict.by_name:
            if self.bytes_down:
                self._refuse_held(
                    "an HTTP request on a connection whose server spoke first: the requests"
                    " cannot be checked one by one",
                    event="denied",
                )
                return
            upstream, self.upstream = self.upstream, None
            self.holding = False
            await self._serve_http(PASS_THROUGH, upstream=upstream)
            return
        self.holding = False
        self.event = "closed"
        self._start_relay()

    def _named_refusal(self, nameless: Verdict, named: Verdict, peeked: Peeked) -> str | None:
        """Why a connection made early (allowed without a name) cannot go on
        once its first message names a server, or None if it can."""
        assert self.dst is not None
        what = "SNI" if peeked.protocol is Protocol.TLS else "Host"
        name = peeked.server_name
        if named.action is Action.DENY:
            why = f": {named.reason}" if named.reason else ""
            return f"{what} {name} is denied by rule {named.rule}{why}"
        if named.upstream is not None and named.upstream != self.dst.address:
            return (
                f"{what} {name} is allowed by rule {named.rule} only at its own addresses,"
                f" and {self.dst.address} is not one of them (the connection was made as a"
                f" flow without a name, allowed by rule {nameless.rule})"
            )
        if named.http is not None:
            return (
                f"{what} {name} is served by rule {named.rule} (http:), but the connection"
                f" was made as a flow without a name (rule {nameless.rule})"
            )
        return None

    def _wire_downstream(self) -> None:
        """From now on the server's bytes go straight to the client (also
        what it sent, and its end, while the connection was being made);
        the client's bytes stay held until :meth:`_start_relay`."""
        upstream, client = self.upstream, self.client
        assert upstream is not None and upstream.transport is not None
        assert client.transport is not None
        upstream.peer = client
        self.downstream_wired = True
        if upstream.early:
            self._replay_early(upstream, client)
        if upstream.eof:
            upstream.pass_eof()
        if upstream.lost:
            upstream.pass_loss()
            return
        if upstream.paused_early:
            upstream.paused_early = False
            if client.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                upstream.transport.resume_reading()

    def _replay_early(self, upstream: _Half, client: _Half) -> None:
        """Send the client what the server sent before the relay was wired."""
        assert client.transport is not None
        data = bytes(upstream.early)
        upstream.early.clear()
        self.bytes_down += len(data)
        client.transport.write(data)

    def _refuse_held(self, reason: str, *, event: Event) -> None:
        """Refuse a connection whose client bytes were held: none went up;
        reset both sides."""
        self.holding = False
        self.event = event
        self.error = reason
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()
        self.reset_client()

    async def _first_message(self, cap: int, timeout: float) -> Peeked | None:
        """What the client's first bytes are; None if it ends without sending any.

        There is no deadline before the first byte: the client's bytes are
        held until they have been looked at however long it waits (the
        server's bytes reach it meanwhile, so server-speaks-first protocols
        just work, and the idle timeout ends a connection where nobody
        speaks). A message that has started must be complete within
        ``timeout``.
        """
        deadline: float | None = None
        while True:
            peeked = self._sniff_buffered(cap)
            if peeked is not None:
                return peeked
            if self.buffer and deadline is None:
                deadline = self.loop.time() + timeout
            if self.client_eof or self.client.lost:
                return None
            self._data_event.clear()
            if deadline is None:
                await self._data_event.wait()
                continue
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._data_event.wait(), remaining)

    def _sniff_buffered(self, cap: int) -> Peeked | None:
        """Feed the sniffer what arrived since it was last fed (so a trickle
        costs work in proportion to its bytes): the first message once it is
        complete, else None; ValueError when ``cap`` bytes hold none."""
        if len(self.buffer) > self.sniffed:
            chunk = bytes(self.buffer[self.sniffed : cap])
            self.sniffed += len(chunk)
            peeked = self.sniffer.feed(chunk)
            if peeked is not None:
                return peeked
            if len(self.buffer) >= cap:
                raise ValueError(f"no complete TLS ClientHello or HTTP head in {cap} bytes")
        return None

    def _cgroup_workload(self, policy: Policy) -> str | None:
        """A node process's connection: its socket's mark names the cgroup
        workload (see proxy.sockdiag). No socket found (the client is in
        another namespace, or already gone): no workload."""
        assert self.src is not None and self.dst is not None
        try:
            self.socket_mark = socket_mark(
                self.src.address, self.src.port, self.dst.address, self.dst.port
            )
        except (OSError, ValueError) as exc:
            log.debug("no client socket mark for %s -> %s: %s", self.src, self.dst, exc)
            return None
        return None if self.socket_mark is None else policy.workload_for_mark(self.socket_mark)

    async def _refuse_malformed_http(self, exc: ValueError) -> bool:
        """Answer a malformed HTTP request head with 400 when an http rule
        would have served the connection; False when that is not the case."""
        assert self.src is not None and self.dst is not None
        rule = candidate_rule(
            self.policy, workload=self.workload, dst=self.dst.address, dst_port=self.dst.port
        )
        transport = self.client.transport
        if (
            rule is None
            or rule.http is None
            or rule.action is not Action.ALLOW
            or transport is None
            or not bytes(self.buffer[:16]).startswith(_HTTP_STARTS)
        ):
            return False
        self.event = "failed"
        self.error = f"malformed HTTP request: {exc}"
        self.requests = 1
        self.bytes_up = len(self.buffer)
        body = httpmessage.error_response(400, self.error)
        self.bytes_down += len(body)
        self.server.audit.write_request(
            RequestRecord(
                time=rfc3339(time.time()), connection=self.id, src=str(self.src),
                workload=self.workload, dst=str(self.dst), upstream=None, rule=rule.name,
                method=None, host=None, path=None, status=400, bytes_up=len(self.buffer),
                bytes_down=len(body), duration_ms=0.0, error=self.error,
            )
        )  # fmt: skip
        try:
            await httprelay.refuse(transport, body, idle=self.policy.proxy.idle_timeout)
        finally:
            self.client.lost = True  # the relay took the transport over and closed it
        return True

    async def _serve_http(self, rule: HttpRule, *, upstream: _Half | None = None) -> None:
        """Hand the connection to the HTTP relay (see ``httprelay``);
        ``upstream`` is a connection already made to the destination."""
        assert self.src is not None and self.dst is not None and self.verdict is not None
        peeked = self.peeked
        tls = peeked is not None and peeked.protocol is Protocol.TLS
        transport = self.client.transport
        if tls and rule.client_tls is None:
            self.event = "denied"
            self.error = "http rule needs plaintext HTTP or client_tls (the client speaks TLS)"
            self.reset_client()
            return
        if peeked is not None and peeked.protocol is Protocol.TCP:
            self.event = "denied"
            self.error = (
                "http rule needs HTTP (or TLS with client_tls); the client sent other bytes"
            )
            self.reset_client()
            return
        assert transport is not None
        verdict = self.verdict

        async def decide_host(host: str | None) -> httprelay.HostDecision:
            decided = await self._decide(host)
            return httprelay.HostDecision(
                rule=decided.rule if decided.action is Action.ALLOW else None,
                address=decided.upstream,
                reason=decided.reason,
            )

        settings = self.policy.proxy
        conn = httprelay.HttpConnection(
            conn_id=self.id,
            src=self.src,
            dst=self.dst,
            workload=self.workload,
            rule=verdict.rule,
            http=rule,
            pass_through=rule is PASS_THROUGH,
            tls=tls,
            decide_host=decide_host,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            upstream_mark=settings.upstream_mark,
            audit=self.server.audit,
            resources=self.server.http,
            touch=self._touch,
        )
        self.event = "closed"
        self.requests = 0
        initial = bytes(self.buffer)
        self.buffer.clear()
        early: TcpStream | None = None
        if upstream is not None and upstream.transport is not None:
            early = take_over(upstream.transport, idle=settings.idle_timeout, touch=self._touch)
            if upstream.eof:
                early.reader.feed_eof()  # it closed already: the relay connects anew
        try:
            await httprelay.serve(conn, transport, initial, upstream=early)
        finally:
            # The relay owned the client transport and has closed it.
            self.client.lost = True
            self.requests = conn.requests
            self.bytes_up += conn.bytes_up
            self.bytes_down += conn.bytes_down
            self.error = self.error or conn.error
            if conn.denied:
                self.event = "denied"
            elif conn.forwarded == 0 and conn.error is not None:
                self.event = "failed"  # no request ever reached the server

    def _touch(self) -> None:
        self.last_activity = self.loop.time()

    async def _peek(self, cap: int, timeout: float) -> Peeked | None:
        """The sniffed first bytes; None when the client sent nothing in time
        (server-speaks-first protocols) or closed before sending."""
        deadline = self.loop.time() + timeout
        while True:
            peeked = self._sniff_buffered(cap)
            if peeked is not None:
                return peeked
            if self.client_eof or self.client.lost:
                return None
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                if not self.buffer:
                    return None
                raise TimeoutError
            self._data_event.clear()
            try:
                await asyncio.wait_for(self._data_event.wait(), remaining)
            except TimeoutError:
                if not self.buffer:
                    return None
                raise

    async def dial(self, *, address: IPAddress | None = None) -> str | None:
        """Connect upstream with the policy's mark and timeout (see
        ``_connect_upstream``); why it failed, or None."""
        settings = self.policy.proxy
        try:
            await self._connect_upstream(
                settings.upstream_mark, settings.connect_timeout, address=address
            )
        except TimeoutError:
            return f"upstream connect timed out after {settings.connect_timeout:g}s"
        except OSError as exc:
            return f"upstream connect failed: {_describe(exc)}"
        return None

    def client_left(self) -> bool:
        """Whether the client went away while the upstream connection was
        being made; if so, that connection is closed and the failure noted."""
        assert self.upstream is not None and self.upstream.transport is not None
        if not self.client.lost:
            return False
        self.upstream.transport.close()
        self.event = "failed"
        self.error = self.error or "client went away before the upstream connection was ready"
        return True

    async def _connect_upstream(
        self, mark: int, timeout: float, *, address: IPAddress | None = None
    ) -> None:
        """Connect to the original destination, or to ``address`` on its
        port (a name's own address, ``resolve: connect``)."""
        assert self.dst is not None
        dst = self.dst if address is None else Endpoint(address=address, port=self.dst.port)
        sock = upstream_socket(dst)
        self.server.upstreams += 1  # until the upstream half is lost
        half: _Half | None = None
        try:
            async with asyncio.timeout(timeout):  # no extra Task, unlike wait_for
                await connect_marked(sock, dst, mark=mark)
            half = _Half(self, upstream=True)
            await self.loop.create_connection(lambda: half, sock=sock)
        except BaseException:
            sock.close()
            if half is None or half.transport is None:
                self.server.upstreams -= 1
            raise
        self.upstream = half

    def _start_relay(self) -> None:
        """Wire the two sides together and replay what each side sent while
        the connection was decided: data first (both ways), then ends of
        stream, then a loss. A server that spoke first (a greeting) and even
        closed already still gets its bytes to the client."""
        client, upstream = self.client, self.upstream
        assert upstream is not None and upstream.transport is not None
        assert client.transport is not None
        client.peer, upstream.peer = upstream, client
        if self.buffer and not upstream.lost:
            data = bytes(self.buffer)  # already in sniff_buf, if sniffing
            self.bytes_up += len(data)
            upstream.transport.write(data)
        self.buffer.clear()
        # Connected early, the server's side was wired already (its bytes,
        # end and loss passed on): see _wire_downstream.
        wired = self.downstream_wired
        if upstream.early and not wired:
            self._replay_early(upstream, client)
        if self.client_eof:
            client.pass_eof()
        if upstream.eof and not wired:
            upstream.pass_eof()
        if upstream.lost:
            if not wired:
                upstream.pass_loss()
            return
        if upstream.paused_early and not wired:
            upstream.paused_early = False
            if client.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                upstream.transport.resume_reading()
            # else: the client side's resume_writing resumes it once drained
        if not self.client_eof and upstream.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            client.transport.resume_reading()
        # else: the replay filled the upstream write buffer (its pause_writing
        # paused the client already); the upstream side's resume_writing
        # resumes the client once it drains. Resuming here would let the
        # client fill it without bound: the transport reports crossing the
        # high-water mark only once.

    # -- ending --------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        self.event = "failed"
        self.error = reason
        self.reset_client()

    def reset_client(self) -> None:
        transport = self.client.transport
        if transport is None:
            self.finish()
            return
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            # SO_LINGER {on, 0}: close() sends RST instead of FIN (socket(7)).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close_both(self) -> None:
        for half in (self.client, self.upstream):
            if half is not None and half.transport is not None and not half.transport.is_closing():
                half.transport.close()

    def abort_both(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        for half in (self.client, self.upstream):
            if half is not None and half.transport is not None:
                half.transport.abort()

    def half_lost(self) -> None:
        """Called whenever a side is gone; the record is written once both are
        and no decision is still under way."""
        self._data_event.set()  # wake a wait for the client's bytes
        if self.deciding or not self.client.lost:
            return
        if self.upstream is None or self.upstream.lost:
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.server.connections.discard(self)
        if self.admitted:
            self.server.release(self)
        self.server.audit.write(self.record())

    def record(self) -> AuditRecord:
        peeked = self.peeked
        verdict = self.verdict
        return AuditRecord(
            time=rfc3339(self.started),
            event=self.event,
            src=str(self.src) if self.src else "?",
            workload=self.workload,
            dst=str(self.dst) if self.dst else "?",
            server_name=peeked.server_name if peeked else None,
            protocol=(peeked.protocol.value if peeked else Protocol.TCP.value),
            rule=verdict.rule if verdict else None,
            verdict=verdict.action.value if verdict else None,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration_ms=round((self.loop.time() - self.started_mono) * 1000, 3),
            error=self.error,
            policy_generation=self.generation,
            policy_hash=self.policy_hash,
            id=self.id,
            requests=self.requests,
            upstream=_show(self.upstream_address, self.dst.port) if self.dst else None,
        )


class Listener:
    """One listening socket served by the event loop, and our own duplicate of it.

    uvloop closes a listening handle for good when accept reports an error
    that libuv does not absorb itself (libuv meets EMFILE and ENFILE by
    closing a reserved descriptor, accepting and closing what is queued and
    taking the reserve back; if that last step fails too, or for ENOBUFS and
    ENOMEM, the error reaches uvloop, which closes the server without a word).
    The duplicate keeps the socket listening, so connections queue instead of
    being refused, and :meth:`check` notices a queue that nobody drains and
    serves the socket again. Nothing spins meanwhile: the queue just waits.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        factory: Callable[[], asyncio.Protocol], backlog: int,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.sock = sock  # ours: the loop's server gets a duplicate
        self.name = _sockname(sock)
        self._factory = factory
        self._backlog = backlog
        self.server: asyncio.Server | None = None
        self.accepts = 0
        self._seen = 0
        self._stalled = False
        self.closed = False
        self.restarts = 0
        self.owner: object = None  # the ProxyServer or ConnectListener it serves

    def _counting_factory(self) -> asyncio.Protocol:
        self.accepts += 1
        return self._factory()

    async def serve(self) -> None:
        dup = self.sock.dup()
        try:
            self.server = await self.loop.create_server(
                self._counting_factory, sock=dup, backlog=self._backlog
            )
        except BaseException:
            dup.close()
            raise

    async def check(self) -> None:
        """Called every sweep: a queue with connections waiting while nothing
        was accepted for two sweeps in a row means the loop no longer serves
        this socket."""
        if self.closed:
            return
        try:
            queued = _accept_queue(self.sock)
        except OSError:
            return
        stalled = queued > 0 and self.accepts == self._seen
        self._seen = self.accepts
        if not (stalled and self._stalled):
            self._stalled = stalled
            return
        self._stalled = False
        log.error(
            "listener %s: %d connections wait and none was accepted for %gs (the event loop"
            " stopped serving it after an accept error): listening again",
            self.name,
            queued,
            2 * SWEEP_INTERVAL,
        )
        old = self.server
        try:
            await self.serve()
        except OSError as exc:
            log.error("listener %s: cannot listen again yet: %s", self.name, _describe(exc))
            return
        self.restarts += 1
        if old is not None:
            old.close()

    def duplicate(self) -> socket.socket:
        return socket.socket(fileno=os.dup(self.sock.fileno()))

    def close(self) -> None:
        """Stop accepting here (a successor may hold the socket too)."""
        if self.closed:
            return
        self.closed = True
        if self.server is not None:
            self.server.close()
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


def _accept_queue(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue: for a
    listener, TCP_INFO's tcpi_unacked is the queue length (tcp_get_info in
    net/ipv4/tcp.c)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    queued: int = struct.unpack_from("I", info, 24)[0]
    return queued


def _sockname(sock: socket.socket) -> str:
    try:
        return str(endpoint_of(sock.getsockname()))
    except (OSError, ValueError):
        return f"fd {sock.fileno()}"


class ProxyServer:
    """Listens on the proxy's addresses and serves diverted connections."""

    def __init__(
        self,
        *,
        policy: Policy,
        audit: AuditLog,
        generation: int = 1,
        policy_hash: str = "",
        resolver: Resolver | None = None,
    ) -> None:
        self.policy = policy
        # Names are bound to addresses with the proxy's own lookups.
        self.resolver = resolver if resolver is not None else Resolver(policy.dns)
        self.generation = generation
        self.policy_hash = policy_hash
        self.audit = audit
        self.loop = asyncio.get_running_loop()
        self.tasks = TaskSet()
        self.connections: set[Connection] = set()
        # Connection ids: unique within this process, and across restarts by
        # the start time.
        self.id_prefix = f"{int(time.time()):x}"
        self.ids = itertools.count(1)
        self.http = httprelay.HttpResources()
        self.conntrack = Conntrack()
        self._listeners: list[Listener] = []  # ours first, then the CONNECT listener's
        self._own: set[tuple[str, int]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.listening = False
        # Connection caps: open connections counted against them, in total
        # and by workload (None: no workload identified); refusals by
        # (cap, workload) for the metrics.
        self.fd_room = descriptor_room()
        self.admitted = 0
        self.upstreams = 0  # upstream sockets open (the other descriptor of a relay)
        self.open_by_workload: dict[str | None, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self._cap_warned = 0.0
        self._peak_open = 0  # most connections open since memory was last given back

    async def start(self, inherited: Sequence[socket.socket] = ()) -> None:
        """Listen on the proxy's addresses: on ``inherited`` sockets that are
        bound there (a predecessor's, see ``agent.handover``), else on new
        ones. Inherited sockets that do not fit are closed."""
        settings = self.policy.proxy
        spare = list(inherited)
        for address in (settings.address_v4, settings.address_v6):
            sock = _take(spare, address, settings.port) or _listener(address, settings.port)
            await self.listen(sock, lambda: Connection(self).client, backlog=4096)
            self._own.add((str(address), settings.port))
        for sock in spare:
            sock.close()
        self._sweeper = self.tasks.spawn(self._sweep(), name="idle-sweeper")
        self.resolver.keep_warm(names_to_keep_warm(self.policy))
        self.tasks.spawn(self.resolver.run(), name="dns-refresh")
        self.listening = True
        log.info(
            "proxy listening on %s:%d and [%s]:%d",
            settings.address_v4,
            settings.port,
            settings.address_v6,
            settings.port,
        )

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def listening_sockets(self) -> list[socket.socket]:
        """The listening sockets, for handing over to a successor (the caller
        sends their descriptors; they stay ours until ``stop_accepting``)."""
        return [listener.duplicate() for listener in self._listeners if listener.owner is self]

    async def listen(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], *, backlog: int,
        owner: object = None,
    ) -> Listener:  # fmt: skip
        """Serve ``sock`` (a listening socket, now ours) with ``factory``'s
        protocols, watched by the sweeper (see :class:`Listener`)."""
        listener = Listener(self.loop, sock, factory, backlog)
        listener.owner = owner if owner is not None else self
        try:
            await listener.serve()
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)
        return listener

    def stop_accepting(self) -> None:
        """Stop accepting; connections being relayed go on until they end."""
        self.listening = False
        for listener in self._listeners:
            if listener.owner is self:
                listener.close()

    def update_policy(self, policy: Policy, *, generation: int, policy_hash: str) -> int:
        """Swap the policy for new connections; returns how many open ones it closed.

        Open connections keep running unless the policy says
        ``on_reload: {denied_connections: close}``: then each relayed
        connection is decided again under the new policy, and those it denies
        are reset; their audit record's error names the generation and rule.
        The listening addresses and port cannot change here (the caller
        refuses such a reload); timeouts and caps apply to new connections.
        """
        self.policy = policy
        self.generation = generation
        self.policy_hash = policy_hash
        self.resolver.configure(policy.dns)
        self.resolver.keep_warm(names_to_keep_warm(policy))
        if not policy.close_denied_on_reload:
            return 0
        closed = 0
        for conn in list(self.connections):
            relayed = conn.upstream is not None or conn.requests is not None
            if not relayed or conn.src is None or conn.dst is None:
                continue  # still being decided, under the policy it arrived with
            workload = identify(policy, conn.src.address) or (
                policy.workload_for_mark(conn.socket_mark) if conn.socket_mark is not None else None
            )
            name = conn.peeked.server_name if conn.peeked else None
            names = names_to_resolve(
                policy, workload=workload, dst=conn.dst.address, dst_port=conn.dst.port,
                server_name=name,
            )  # fmt: skip
            # What the cache knows now: a reload does not wait for the resolver.
            verdict = decide(
                policy,
                workload=workload,
                dst=conn.dst.address,
                dst_port=conn.dst.port,
                server_name=name,
                resolved=self.resolver.known(names),
            )
            if verdict.action is Action.DENY:
                conn.abort_both(
                    f"closed by reload to policy generation {generation}: "
                    f"rule {verdict.rule} denies it"
                )
                closed += 1
        return closed

    def is_own_endpoint(self, ep: Endpoint) -> bool:
        return (str(ep.address), ep.port) in self._own

    @property
    def max_connections(self) -> int:
        """The cap on open connections: the policy's, or as many relayed
        connections (two descriptors each) as the descriptor limit holds."""
        return min(self.policy.proxy.max_connections, self.fd_room // FDS_PER_CONNECTION)

    def admit(self, conn: Connection) -> tuple[str, str] | None:
        """Count ``conn`` as open, or say which cap refuses it and why."""
        settings = conn.policy.proxy
        workload = conn.workload
        total_cap = settings.max_connections
        per_cap = min(settings.max_connections_per_workload, total_cap)
        held = self.open_by_workload.get(workload, 0)
        in_use = self.admitted + self.upstreams
        refused: tuple[str, str] | None = None
        if self.admitted >= total_cap:
            refused = (
                CAP_TOTAL,
                f"refused: {self.admitted} connections open, the cap ({CAP_TOTAL})",
            )
        elif in_use + FDS_PER_CONNECTION > self.fd_room:
            # Below the policy's cap, the descriptor limit is the cap.
            refused = (
                CAP_TOTAL,
                f"refused: {self.admitted} connections open hold {in_use} of the {self.fd_room}"
                f" file descriptors the limit leaves them ({CAP_TOTAL} is more than fits)",
            )
        elif held >= per_cap:
            who = f"workload {workload}" if workload else "sources with no workload"
            refused = (
                CAP_WORKLOAD,
                f"refused: {held} connections open for {who}, the cap ({CAP_WORKLOAD})",
            )
        if refused is None:
            self.admitted += 1
            self.open_by_workload[workload] = held + 1
            conn.counted_as = workload
            return None
        key = (refused[0], workload or "")
        self.refused[key] = self.refused.get(key, 0) + 1
        now = self.loop.time()
        if now - self._cap_warned >= CAP_WARNING_INTERVAL:
            self._cap_warned = now
            log.warning(
                "connection cap reached, refusing new connections: %s (connections"
                " refused so far by cap: %s)",
                refused[1],
                ", ".join(f"{c} {w or '-'}: {n}" for (c, w), n in sorted(self.refused.items())),
            )
        return refused

    def release(self, conn: Connection) -> None:
        self.admitted -= 1
        held = self.open_by_workload.get(conn.counted_as, 0) - 1
        if held > 0:
            self.open_by_workload[conn.counted_as] = held
        else:
            self.open_by_workload.pop(conn.counted_as, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            idle = self.policy.proxy.idle_timeout
            now = self.loop.time()
            for conn in list(self.connections):
                if now - conn.last_activity > idle:
                    conn.abort_both(f"idle for more than {idle:g}s")
            for listener in list(self._listeners):
                await listener.check()
            self._give_memory_back()

    def _give_memory_back(self) -> None:
        """After a flood of connections has ended, hand the memory it took
        back to the system: glibc keeps freed heap memory for reuse (and
        Python's small-object arenas go back only when empty), so the agent's
        RSS would otherwise stay at the flood's peak."""
        open_now = len(self.connections)
        self._peak_open = max(self._peak_open, open_now)
        if self._peak_open - open_now < TRIM_AFTER_DROP or open_now > self._peak_open // 2:
            return
        self._peak_open = open_now
        # A connection's objects refer to each other (the connection, its
        # halves, their transports): only the cycle collector frees them,
        # and its oldest generation may not run for a long while.
        gc.collect()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    async def close(self) -> None:
        self.listening = False
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.abort_both("proxy stopping")
        await self.tasks.cancel_all()
        await self.resolver.close()
        self.conntrack.close()
        await asyncio.sleep(0)  # let aborted transports report connection_lost
        for conn in list(self.connections):
            conn.finish()
        for listener in self._listeners:
            await listener.wait_closed()


def _take(
    spare: list[socket.socket], address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> socket.socket | None:
    """Remove and return the listening socket in ``spare`` bound to address:port."""
    for sock in spare:
        try:
            bound = sock.getsockname()
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            continue
        if listening and ipaddress.ip_address(bound[0]) == address and bound[1] == port:
            spare.remove(sock)
            sock.setblocking(False)
            return sock
    return None


def _listener(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> socket.socket:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Bind even before the address is configured (or while IPv6 DAD runs).
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            sock.bind((str(address), port, 0, 0))
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.bind((str(address), port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = (
            " (another process holds it: stop it or set proxy.port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise OSError(
            exc.errno, f"cannot listen on {address}:{port}: {exc.strerror}{hint}"
        ) from exc
    return sock


def _show(address: IPAddress | None, port: int) -> str | None:
    if address is None:
        return None
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return str(exc) or type(exc).__name__
