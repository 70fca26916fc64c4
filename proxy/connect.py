"""The explicit HTTP CONNECT listener, for clients that do set HTTPS_PROXY.

Some clients insist on a proxy they are told about (or a platform sets
HTTPS_PROXY for every process). This listener serves them under the same
policy as the transparent path: the client is identified by its source
address, the CONNECT target's host is the server name and its resolved
address the destination, and :func:`~egress_agent.policy.decide.decide`
rules. Two things are added:

* Name binding: after ``200 Connection Established``, the client's first
  bytes in the tunnel are held and sniffed like a diverted connection's; a
  TLS ClientHello whose SNI (or an HTTP head whose Host) names another server
  than the CONNECT target is refused, so a client cannot CONNECT to an
  allowed name and then speak to another virtual host on the same address.
* Optional proxy authentication per workload (:mod:`.connect_auth`).

Denied names are decided before anything is resolved when the policy allows
it (:func:`decide_by_name`), so a denied name never even reaches the resolver.
Only CONNECT is served: a plain-HTTP forward request (``GET http://...`` with
HTTP_PROXY) gets ``501`` saying so.

Each CONNECT connection is a :class:`~egress_agent.proxy.connection.Connection`
with another front half: it lives in the proxy server's connection set (idle
sweep, close-on-reload and shutdown apply), relays with the same machinery and
ends in exactly one audit record, with ``via: connect`` and ``connect_host``.
Loopback and unspecified destinations are refused whatever the policy says:
a diverted client's loopback is its own, but through this listener it would
be the node's. Refusals use pseudo-rules that no egress rule can be named
(``:`` is not allowed in rule names): ``connect:unknown-source``,
``connect:proxy-auth``, ``connect:sni-mismatch``, ``connect:loopback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import socket

from egress_agent.policy.decide import default_verdict, host_matches, identify, rule_verdict
from egress_agent.policy.model import Action, IPAddress, Policy, Resolution, Verdict
from egress_agent.proxy import controls
from egress_agent.proxy.audit import AuditRecord
from egress_agent.proxy.connect_auth import AuthResult, CredentialFiles
from egress_agent.proxy.connect_head import MAX_CONNECT_HEAD, ProxyRequest, parse_proxy_request
from egress_agent.proxy.connection import Connection
from egress_agent.proxy.listener import Listener, bind_listener, take_listening
from egress_agent.proxy.original_dst import Endpoint, endpoint_of
from egress_agent.proxy.peek import Peeked, Protocol
from egress_agent.proxy.relay import start_relay, wire_downstream
from egress_agent.proxy.server import ProxyServer
from egress_agent.proxy.traffic import Refusal, retry_after_header

log = logging.getLogger(__name__)

RULE_UNKNOWN_SOURCE = "connect:unknown-source"
RULE_PROXY_AUTH = "connect:proxy-auth"
RULE_SNI_MISMATCH = "connect:sni-mismatch"
RULE_LOOPBACK = "connect:loopback"
REALM = "egress-agent"


def decide_by_name(
    policy: Policy, *, workload: str | None, port: int, server_name: str
) -> Verdict | None:
    """The verdict when it cannot depend on the destination address, else None.

    Walks the egress rules like :func:`~egress_agent.policy.decide.decide`
    with the address unknown. The first rule that matches whatever the
    address decides -- unless a rule before it matches only some addresses:
    then the answer (or at least the rule that gives it) depends on the address.
    """
    name = server_name.lower().rstrip(".")
    for rule in policy.egress:
        if rule.sources is not None and workload not in rule.sources:
            continue
        if rule.ports and not any(port in r for r in rule.ports):
            continue
        if rule.hosts and not any(host_matches(p, name) for p in rule.hosts):
            continue
        if rule.cidrs:
            return None
        return rule_verdict(policy, rule, workload)
    return default_verdict(policy, workload)


def names_match(connect_host: str, inner: str | None) -> bool:
    """Whether the name inside the tunnel (SNI or Host) is the CONNECT host:
    case-insensitive, trailing dot ignored, IP literals compared as addresses.
    No inner name (a ClientHello without SNI) always matches."""
    if inner is None:
        return True
    a, b = connect_host.lower().rstrip("."), inner.lower().rstrip(".")
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class ConnectConnection(Connection):
    """One client of the CONNECT listener, from accept to its audit record."""

    def __init__(self, listener: ConnectListener) -> None:
        super().__init__(listener.server)
        self.listener = listener
        self.request: ProxyRequest | None = None
        self._paused = False

    # -- front half: the request head ----------------------------------------------

    def accepted(self, transport: asyncio.Transport) -> None:
        self.server.connections.add(self)
        try:
            self.src = endpoint_of(transport.get_extra_info("peername"))
        except (OSError, ValueError) as exc:
            self.fail(f"no peer address: {exc}")
            return
        # Counted against the caps by its address's workload (an unknown
        # source is refused later, with its own answer).
        self.workload = identify(self.policy, self.src.address)
        if not self.admit():
            return
        self.deciding = True
        self.server.tasks.spawn(self.run(), name="connect")

    def buffer_client_bytes(self, data: bytes) -> None:
        # Room for the head and for the first bytes of the tunnel behind it.
        self.buffer += data
        cap = MAX_CONNECT_HEAD + self.policy.proxy.peek_bytes
        if len(self.buffer) >= cap and self.client.transport and not self._paused:
            self._paused = True
            self.client.transport.pause_reading()
        self._data_event.set()

    async def _read_head(self) -> ProxyRequest | None:
        """The request head; None after answering or failing the connection."""
        timeout = self.policy.proxy.peek_timeout
        deadline = self.loop.time() + timeout
        while True:
            try:
                request = parse_proxy_request(bytes(self.buffer))
            except ValueError as exc:
                self.respond(400, "Bad Request", f"malformed proxy request: {exc}", event="failed")
                return None
            if request is not None:
                return request
            if self.client_eof or self.client.lost:
                self.fail(
                    "client closed before sending a complete request head"
                    f" ({len(self.buffer)} bytes received)"
                )
                return None
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                self.respond(
                    408,
                    "Request Timeout",
                    f"no complete request head within {timeout:g}s",
                    event="failed",
                )
                return None
            self._data_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._data_event.wait(), remaining)

    # -- deciding --------------------------------------------------------------------

    async def _decide_and_connect(self) -> None:
        assert self.src is not None
        policy = self.policy
        settings = policy.proxy
        request = await self._read_head()
        if request is None:
            return
        self.request = request
        self.workload = identify(policy, self.src.address)
        if self.workload is None:
            # The kernel admits only workloads; this is a source the policy
            # stopped knowing (a reload) or a listener reached some other way.
            self.verdict = Verdict(action=Action.DENY, rule=RULE_UNKNOWN_SOURCE, workload=None)
            self.respond(
                403,
                "Forbidden",
                f"source {self.src.address} is not a workload of this node's egress policy",
                event="denied",
            )
            return
        auth = policy.connect.auth_for(self.workload) if policy.connect else None
        if auth is not None:
            checked = self.listener.credentials.check(auth, request.proxy_authorization)
            if not checked.ok:
                self._refuse_auth(checked)
                return
        if request.method != "CONNECT" or request.host is None or request.port is None:
            self.respond(
                501,
                "Not Implemented",
                f"this proxy only opens tunnels with CONNECT, not {request.method}: use an"
                " https:// URL, or send plain HTTP without a proxy (the transparent path"
                " applies the same policy)",
                event="failed",
            )
            return
        host, port = request.host, request.port
        name = None if request.address is not None else host
        if name is not None:
            early = decide_by_name(policy, workload=self.workload, port=port, server_name=name)
            if early is not None and early.action is Action.DENY:
                self._deny(early, host, port)
                return
        try:
            async with asyncio.timeout(settings.connect_timeout):
                addresses, _answer = await self._resolve(request)
        except TimeoutError:
            self.respond(
                504,
                "Gateway Timeout",
                f"resolving {host} took more than {settings.connect_timeout:g}s",
                event="failed",
            )
            return
        except OSError as exc:
            self.respond(502, "Bad Gateway", f"cannot resolve {host}: {exc}", event="failed")
            return
        local = next((a for a in addresses if _is_node_local(a)), None)
        if local is not None:
            # A diverted client's loopback is its own; this client would be
            # reaching services the node binds to loopback only.
            self.dst = Endpoint(address=local, port=port)
            self._deny(
                Verdict(action=Action.DENY, rule=RULE_LOOPBACK, workload=self.workload), host, port
            )
            return
        # The first address the resolver gives decides, as it would for a
        # client connecting by itself; further allowed ones are tried in turn.
        first = await self.decide_at(addresses[0], port, name)
        if first.action is Action.DENY:
            self.dst = Endpoint(address=addresses[0], port=port)
            self._deny(first, host, port)
            return
        self.peeked = Peeked(protocol=Protocol.TCP, server_name=name)
        if not await self._connect_any(addresses, port, name):
            return
        if self.client_left():
            return
        self._send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        # From now on the server's bytes go straight to the client, so
        # server-speaks-first protocols (SSH, SMTP) work; the client's bytes
        # wait until its first message's name has been checked.
        self.holding = True
        wire_downstream(self)
        del self.buffer[: request.head_length]
        self._resume_client()
        await self._check_tunnel_name(host)

    async def _resolve(self, request: ProxyRequest) -> tuple[list[IPAddress], Resolution | None]:
        """The target's addresses (IPv4 first, as a client would try them)
        and, for a name, what the proxy's resolver knows of it (the same
        cache the transparent path binds names with)."""
        if request.address is not None:
            return [request.address], None
        assert request.host is not None
        if _is_localhost_name(request.host):
            # RFC 6761 section 6.3: the node's own loopback, whatever a DNS
            # server would say (so it is refused as loopback below).
            return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")], None
        got = await self.server.resolver.resolve(request.host)
        if not got.addresses:
            raise OSError(errno.ENOENT, got.error or "no addresses")
        return sorted(got.addresses, key=lambda a: (a.version, int(a))), got

    async def _connect_any(self, addresses: list[IPAddress], port: int, name: str | None) -> bool:
        """Connect to the first allowed address that answers; on failure answer
        502/504 and return False."""
        last = ""
        for address in addresses:
            verdict = await self.decide_at(address, port, name)
            if verdict.action is Action.DENY:
                continue
            self.dst = Endpoint(address=address, port=port)
            self.verdict = verdict
            if verdict.http is not None:
                # The rule's HTTP handling (credentials, TLS origination) needs
                # the plaintext requests; a tunnel carries the client's own TLS.
                self.verdict = Verdict(
                    action=Action.DENY, rule=verdict.rule, workload=self.workload
                )
                self.respond(
                    403,
                    "Forbidden",
                    f"rule {verdict.rule} handles HTTP requests (http:), which a CONNECT tunnel "
                    "does not carry: reach this host without the proxy setting (the transparent "
                    "path applies the rule), or add a rule without http: for the tunnel",
                    event="denied",
                )
                return False
            if self.listener.is_own_endpoint(self.dst) or self.server.is_own_endpoint(self.dst):
                self.respond(
                    403,
                    "Forbidden",
                    "the target is the proxy itself (loop refused)",
                    event="failed",
                )
                return False
            refusal = controls.admit_flow(self)
            if refusal is not None:
                self._refuse_limited(refusal, event="denied")
                return False
            failure = await self.dial()
            if failure is None:
                return True
            last = failure
        if self.refusal is not None:
            self._refuse_limited(self.refusal, event="failed")  # a breaker failed it fast
        elif last.startswith("upstream connect timed out"):
            self.respond(504, "Gateway Timeout", last, event="failed")
        else:
            self.respond(502, "Bad Gateway", last, event="failed")
        return False

    async def _check_tunnel_name(self, host: str) -> None:
        """Peek at the tunnel's first bytes; refuse another server name; relay."""
        assert self.upstream is not None and self.upstream.transport is not None
        settings = self.policy.proxy
        try:
            peeked = await self.first_message(settings.peek_bytes, settings.peek_timeout)
        except ValueError as exc:
            self._close_tunnel(f"malformed first bytes in the tunnel: {exc}")
            return
        except TimeoutError:
            self._close_tunnel(
                f"first message in the tunnel incomplete after {settings.peek_timeout:g}s"
                f" ({len(self.buffer)} bytes received)"
            )
            return
        finally:
            self.holding = False
        if peeked is not None:
            connect_name = self.peeked.server_name if self.peeked else None
            inner = peeked.server_name
            if not names_match(host, inner):
                what = "SNI" if peeked.protocol is Protocol.TLS else "Host"
                self.verdict = Verdict(
                    action=Action.DENY, rule=RULE_SNI_MISMATCH, workload=self.workload
                )
                self.peeked = Peeked(protocol=peeked.protocol, server_name=connect_name)
                self._close_tunnel(
                    f"{what} {inner} does not match CONNECT host {host}", event="denied"
                )
                return
            self.peeked = Peeked(protocol=peeked.protocol, server_name=connect_name)
        if self.client.lost or self.upstream.lost:
            # The server said its piece and closed, or the client left.
            self.event = "closed" if self.error is None else "failed"
            self.close_both()
            return
        self.event = "closed"
        start_relay(self)

    # -- answering -----------------------------------------------------------------

    def _deny(self, verdict: Verdict, host: str, port: int) -> None:
        self.verdict = verdict
        literal = self.request is not None and self.request.address is not None
        self.peeked = Peeked(protocol=Protocol.TCP, server_name=None if literal else host)
        self.respond(
            403,
            "Forbidden",
            f"egress to {host}:{port} denied by rule {verdict.rule}",
            event="denied",
        )

    def _refuse_auth(self, checked: AuthResult) -> None:
        if checked.unavailable:
            log.error("CONNECT from %s: %s", self.src, checked.reason)
            self.respond(
                503,
                "Service Unavailable",
                "the proxy cannot check credentials right now",
                event="failed",
                error=checked.reason,
            )
            return
        self.verdict = Verdict(action=Action.DENY, rule=RULE_PROXY_AUTH, workload=self.workload)
        self.respond(
            407,
            "Proxy Authentication Required",
            checked.reason,
            event="denied",
            headers=f'Proxy-Authenticate: Basic realm="{REALM}", charset="UTF-8"\r\n',
        )

    def _refuse_limited(self, refusal: Refusal, *, event: str) -> None:
        """Answer a CONNECT that the rule's traffic controls refused: 429
        (a limit) or 503 (an open breaker), with Retry-After."""
        status, reason = (503, "Service Unavailable") if refusal.limit == "breaker" else (
            429, "Too Many Requests",
        )  # fmt: skip
        retry = (
            f"Retry-After: {retry_after_header(refusal.retry_after)}\r\n"
            if refusal.retry_after is not None or status == 429
            else ""
        )
        if event == "denied":
            self.verdict = Verdict(action=Action.DENY, rule=refusal.rule, workload=self.workload)
        self.respond(status, reason, refusal.message, event=event, headers=retry)

    def respond(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        event: str,
        error: str | None = None,
        headers: str = "",
    ) -> None:
        """Answer with a short plain-text response and close (never keep-alive)."""
        body = (message + "\n").encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{headers}"
            "Connection: close\r\n\r\n"
        )
        self.event = "denied" if event == "denied" else "failed"
        self.error = error or message
        self._send(head.encode() + body)
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _send(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _resume_client(self) -> None:
        if self._paused and self.client.transport is not None:
            self._paused = False
            self.client.transport.resume_reading()

    def _close_tunnel(self, reason: str, *, event: str = "failed") -> None:
        self.event = "denied" if event == "denied" else "failed"
        self.error = reason
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()
        self.reset_client()

    def record(self) -> AuditRecord:
        request = self.request
        connect_host = None
        if request is not None and request.host is not None:
            shown = (
                f"[{request.host}]"
                if request.address and request.address.version == 6
                else (request.host)
            )
            connect_host = f"{shown}:{request.port}"
        return dataclasses.replace(super().record(), via="connect", connect_host=connect_host)


def _is_localhost_name(name: str) -> bool:
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def _is_node_local(address: IPAddress) -> bool:
    """Loopback or unspecified (which connects to the node itself), also
    written as an IPv4-mapped IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


class ConnectListener:
    """Listens on the proxy's addresses at ``connect.port`` and serves CONNECT.

    Shares the proxy server's policy, connection set, tasks and audit log, so
    a reload or shutdown of the proxy covers these connections too.
    """

    def __init__(self, server: ProxyServer, port: int) -> None:
        self.server = server
        self.port = port
        self.credentials = CredentialFiles()
        self._listeners: list[Listener] = []
        self._own: set[tuple[str, int]] = set()

    async def start(self, spare: list[socket.socket] | None = None) -> None:
        """Listen; on sockets from ``spare`` that are bound to our address and
        port (a predecessor's, see ``agent.handover``: they are removed from
        the list), else on new ones."""
        settings = self.server.policy.proxy
        for address in (settings.address_v4, settings.address_v6):
            try:
                sock = take_listening(spare, address, self.port) if spare else None
                sock = sock or bind_listener(address, self.port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(
                        exc.errno,
                        f"cannot listen on {address}:{self.port} for CONNECT:"
                        f" {os.strerror(exc.errno)} (another process holds it: stop it or"
                        " set connect.port)",
                    ) from exc
                raise
            listener = await self.server.listen(
                sock, lambda: ConnectConnection(self).client, backlog=1024, owner=self
            )
            self._listeners.append(listener)
            self._own.add((str(address), self.port))
        log.info(
            "CONNECT listener on %s:%d and [%s]:%d",
            settings.address_v4,
            self.port,
            settings.address_v6,
            self.port,
        )

    def is_own_endpoint(self, ep: Endpoint) -> bool:
        return (str(ep.address), ep.port) in self._own

    def listening_sockets(self) -> list[socket.socket]:
        """Duplicates of the listening sockets, for handing over to a successor."""
        return [listener.duplicate() for listener in self._listeners]

    def stop_accepting(self) -> None:
        """Stop accepting; open tunnels go on until they end."""
        for listener in self._listeners:
            listener.close()

    async def close(self) -> None:
        """Stop accepting and end this listener's connections (each writes its
        record); the proxy server's close would end them too."""
        for listener in self._listeners:
            listener.close()
        for conn in list(self.server.connections):
            if isinstance(conn, ConnectConnection):
                conn.abort_both("proxy stopping")
        await asyncio.sleep(0)  # let aborted transports report connection_lost
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
