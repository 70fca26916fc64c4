"""One diverted connection, from accept to its audit record.

The pipeline, in the order :class:`Connection` runs it:

1. :meth:`~Connection.accepted`: the original destination (SO_ORIGINAL_DST),
   the client's own address (conntrack) and workload (its address, or for a
   node process its socket's mark), counted against the caps (``admit``);
2. :meth:`~Connection.run`: when the verdict depends on the server name, a
   look at the first bytes (TLS SNI or HTTP Host; capped in bytes and time)
   -- or, when the flow is allowed without a name, connect at once and hold
   the client's bytes until its first message is checked (``held``);
3. the decision, after the names the policy binds for this client have been
   resolved, so that a name is allowed only at its own addresses;
4. the upstream connection with a socket mark the rules never divert
   (``upstream``), and the relay both ways with half-close (``relay``) -- or
   the HTTP relay when an ``http`` rule decided it (``handoff``);
5. :meth:`~Connection.finish`: exactly one audit record (see ``audit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

from egress_agent.policy.decide import (
    decide,
    identify,
    names_to_resolve,
    needs_server_name,
    source_index,
)
from egress_agent.policy.model import Action, IPAddress, Policy, Verdict
from egress_agent.proxy import controls, gateway, handoff, held, kernel_relay
from egress_agent.proxy.audit import AuditRecord, Event, rfc3339
from egress_agent.proxy.original_dst import Endpoint, NotDiverted, endpoint_of, original_dst
from egress_agent.proxy.peek import Peeked, Protocol, Sniffer
from egress_agent.proxy.relay import Half, describe, start_relay
from egress_agent.proxy.sockdiag import socket_mark
from egress_agent.proxy.traffic import Lease, Refusal, Ticket
from egress_agent.proxy.upstream import connect_marked, upstream_socket

if TYPE_CHECKING:
    from egress_agent.proxy.server import ProxyServer

log = logging.getLogger(__name__)


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
        self.client = Half(self, upstream=False)
        self.upstream: Half | None = None
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
        # The rule's traffic controls (see ``controls``): counted as open,
        # a breaker's answer awaiting the result, what refused the flow.
        self.lease: Lease | None = None
        self.ticket: Ticket | None = None
        self.refusal: Refusal | None = None
        # Set by proxy.gateway for a rule with source or via: the upstream
        # socket's local address:port, and the gateway it went through.
        self.route_source: str | None = None
        self.route_gateway: str | None = None
        # Set when the relay starts (``relaying``) and the kernel may move its bytes.
        self.relaying = False
        self.kernel: kernel_relay.KernelRelay | None = None

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
        if self.workload is None and source_index(self.policy).has_cgroups:
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
            if self.kernel is not None:
                self.kernel.sniffed()

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
            nameless = await self.verdict_for(None)
            if nameless.action is Action.ALLOW and nameless.http is None and nameless.via is None:
                # Allowed even without a name (the destination is a literal
                # host's address, or a later rule allows it): connect now, so
                # a server that speaks first is not kept waiting; the client's
                # bytes wait until its first message has been looked at.
                await held.connect_then_check(self, nameless)
                return
            try:
                self.peeked = await self._peek(settings.peek_bytes, settings.peek_timeout)
            except ValueError as exc:
                if not await handoff.refuse_malformed_http(self, exc):
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
        self.verdict = await self.verdict_for(name)
        if self.verdict.via is not None and self.sniff_buf is not None:
            # A gateway's policy decides by name: learn it before the CONNECT.
            failure = await gateway.learn_name(self)
            if failure is not None:
                self.fail(failure)
                return
        if self.verdict.action is Action.DENY:
            self.event = "denied"
            self.error = self.verdict.reason
            self.reset_client()
            return
        refusal = controls.admit_flow(self)
        if refusal is not None:
            controls.refuse_flow(self, refusal)
            return
        if self.verdict.http is not None:
            await handoff.serve_http(self, self.verdict.http)
            return
        if self._check_every_request():
            if gateway.routed(self.verdict):
                gateway.refuse_plain_http_by_name(self)
                return
            await handoff.serve_http(self, handoff.PASS_THROUGH)
            return
        self.upstream_address = self.verdict.upstream
        failure = await self.dial(address=self.verdict.upstream)
        if failure is not None:
            self.fail(failure)
            return
        if self.client_left():
            return
        self.event = "closed"
        start_relay(self)

    async def verdict_for(self, server_name: str | None) -> Verdict:
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
                async with asyncio.timeout(remaining):  # no Task per wait, unlike wait_for
                    await self._data_event.wait()
            except TimeoutError:
                if not self.buffer:
                    return None
                raise

    async def first_message(self, cap: int, timeout: float) -> Peeked | None:
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
                async with asyncio.timeout(remaining):
                    await self._data_event.wait()

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

    async def dial(self, *, address: IPAddress | None = None) -> str | None:
        """Connect upstream with the policy's mark and timeout (see
        ``_connect_upstream``); why it failed, or None."""
        settings = self.policy.proxy
        assert self.dst is not None
        fast = controls.breaker_gate(self, address or self.dst.address, self.dst.port)
        if fast is not None:
            return fast
        try:
            await self._connect_upstream(
                settings.upstream_mark, settings.connect_timeout, address=address
            )
        except gateway.RouteError as exc:
            # The gateway refused, failed or could not be reached: the flow
            # failed to reach its upstream, as a failed connect does.
            controls.breaker_result(self, False)
            return str(exc)
        except TimeoutError:
            controls.breaker_result(self, False)
            return f"upstream connect timed out after {settings.connect_timeout:g}s"
        except OSError as exc:
            controls.breaker_result(self, False)
            return f"upstream connect failed: {describe(exc)}"
        controls.breaker_result(self, True)
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
        if gateway.routed(self.verdict):
            self.upstream = await gateway.connect_routed(self, dst, mark=mark, timeout=timeout)
            return
        sock = upstream_socket(dst)
        self.server.upstreams += 1  # until the upstream half is lost
        half: Half | None = None
        try:
            async with asyncio.timeout(timeout):  # no extra Task, unlike wait_for
                await connect_marked(sock, dst, mark=mark)
            half = Half(self, upstream=True)
            await self.loop.create_connection(lambda: half, sock=sock)
        except BaseException:
            sock.close()
            if half is None or half.transport is None:
                self.server.upstreams -= 1
            raise
        self.upstream = half

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def relay_started(self) -> None:
        """The relay is wired (``relay.start_relay``): the kernel may take it over."""
        self.relaying = True
        kernel_relay.start(self, self.server.relays)

    def to_kernel(self, source: Half) -> None:
        """``source`` has sent enough for its direction to go to the kernel."""
        kernel_relay.want(self, source, self.server.relays)

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
        if self.kernel is not None:
            self.kernel.stop()
        for half in (self.client, self.upstream):
            if half is not None and half.transport is not None and not half.transport.is_closing():
                half.transport.close()

    def abort_both(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.kernel is not None:
            self.kernel.stop()
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
        controls.release_flow(self)
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
            verdict=verdict.label if verdict else None,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration_ms=round((self.loop.time() - self.started_mono) * 1000, 3),
            error=self.error,
            policy_generation=self.generation,
            policy_hash=self.policy_hash,
            id=self.id,
            requests=self.requests,
            upstream=_show(self.upstream_address, self.dst.port) if self.dst else None,
            limit=self.refusal.limit if self.refusal else None,
            limit_value=self.refusal.value if self.refusal else None,
            source=self.route_source,
            gateway=self.route_gateway,
        )


def _show(address: IPAddress | None, port: int) -> str | None:
    if address is None:
        return None
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
