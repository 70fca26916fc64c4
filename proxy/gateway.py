"""Upstream connections that leave from a chosen address, or go through a
gateway proxy: an allow rule's ``source:`` and ``via:``.

``source`` binds the upstream socket to one of the rule's addresses before
it connects, so that the connection leaves from that address whatever the
routes would pick. The address of the destination's family is used; a
destination of a family the rule gives no address for is refused (the flow
never leaves from another address than the one the rule promises).

``via`` connects to the gateway instead of the destination and asks it for a
tunnel, ``CONNECT destination HTTP/1.1`` -- by name when the client sent one
(its SNI or Host), so that the gateway's own policy can decide by name, else
by address -- optionally over TLS to the gateway and with Basic proxy
credentials. Once the gateway answers 2xx, the tunnel is the upstream side
of the relay: the client's bytes, including those the proxy looked at
before deciding (a ClientHello, an HTTP head), go through it unchanged.
Anything else -- refused, an error status, a TLS failure, no answer -- ends
the connection as a failed dial does (the client is reset), with the
gateway's status line in the audit record's error. The flow never goes
direct instead.

Either way the socket keeps the proxy's upstream mark, so the rules never
divert it back to the proxy. Audit records name the ``source`` used (the
upstream socket's local address and port) and the ``gateway``.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import socket
import ssl
from typing import TYPE_CHECKING, Any

from egress_agent.policy.model import Action, Gateway, IPAddress, SourceBinding, Verdict
from egress_agent.proxy.original_dst import Endpoint
from egress_agent.proxy.relay import Half, describe
from egress_agent.proxy.secretfiles import SecretError
from egress_agent.proxy.upstream import connect_marked

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection

# The gateway's answer to CONNECT: a status line and headers, no body.
MAX_RESPONSE_HEAD = 16 * 1024
# Linux's IP_BIND_ADDRESS_NO_PORT (ip(7)): a source-bound socket takes its
# port at connect time, per destination, not from the bind-time range that
# every destination shares -- so binding does not exhaust the ports.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class RouteError(Exception):
    """The rule's source or gateway could not be used; ``str()`` is the audit error."""


def routed(verdict: Verdict | None) -> bool:
    """Whether ``verdict``'s rule says how its flows leave (``source`` or ``via``)."""
    return verdict is not None and (verdict.source is not None or verdict.via is not None)


async def connect_routed(conn: Connection, dst: Endpoint, *, mark: int, timeout: float) -> Half:
    """The upstream half of ``conn`` towards ``dst`` as its verdict's rule
    says: from its source address, through its gateway. Raises
    :class:`RouteError`, ``TimeoutError`` or ``OSError``."""
    verdict = conn.verdict
    assert verdict is not None
    if verdict.via is None:
        assert verdict.source is not None
        sock = _bound_socket(verdict.rule, verdict.source, dst.address, what="destination")
        return await _connect_direct(conn, sock, dst, mark=mark, timeout=timeout)
    return await _connect_via(conn, verdict, dst, mark=mark, timeout=timeout)


def _bound_socket(
    rule: str, source: SourceBinding | None, target: IPAddress, *, what: str
) -> socket.socket:
    """A TCP socket for ``target``'s family, bound to the rule's source
    address of that family (when the rule has a source)."""
    family = socket.AF_INET if target.version == 4 else socket.AF_INET6
    if source is None:
        return socket.socket(family, socket.SOCK_STREAM)
    address = source.for_version(target.version)
    if address is None:
        given = ", ".join(str(a) for a in source.addresses)
        raise RouteError(
            f"rule {rule}'s source ({given}) has no IPv{target.version} address for the"
            f" {what} {target}: not sent from another address; add an IPv{target.version}"
            " address to source.address, or keep the rule to the families it has"
        )
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((str(address), 0))
    except OSError as exc:
        sock.close()
        raise RouteError(
            f"rule {rule}: cannot leave from source {address}: {describe(exc)}"
        ) from None
    return sock


async def _connect_direct(
    conn: Connection, sock: socket.socket, dst: Endpoint, *, mark: int, timeout: float
) -> Half:
    conn.server.upstreams += 1  # until the upstream half is lost
    half: Half | None = None
    try:
        async with asyncio.timeout(timeout):
            await connect_marked(sock, dst, mark=mark)
        conn.route_source = _local(sock)
        half = Half(conn, upstream=True)
        await conn.loop.create_connection(lambda: half, sock=sock)
    except BaseException:
        sock.close()
        if half is None or half.transport is None:
            conn.server.upstreams -= 1
        raise
    return half


def connect_target(conn: Connection, dst: Endpoint) -> str:
    """What to ask the gateway for: the client's server name when it sent
    one, else the destination address, with the destination's port."""
    name = conn.peeked.server_name if conn.peeked is not None else None
    if name is not None:
        return f"{name}:{dst.port}"
    return (
        f"{dst.address}:{dst.port}" if dst.address.version == 4 else f"[{dst.address}]:{dst.port}"
    )


async def learn_name(conn: Connection) -> str | None:
    """Look at the client's first bytes (as a rule that needs the server name
    does) so that the CONNECT names the server; why that failed, or None.
    A client that sends nothing in time (a server-speaks-first protocol) or
    bytes that are neither TLS nor HTTP is sent on by address."""
    settings = conn.policy.proxy
    conn.sniff_buf = None
    try:
        conn.peeked = await conn._peek(settings.peek_bytes, settings.peek_timeout)
    except ValueError as exc:
        return f"malformed first bytes: {exc}"
    except TimeoutError:
        return (
            f"first bytes incomplete after {settings.peek_timeout:g}s"
            f" ({len(conn.buffer)} bytes received)"
        )
    return None


def refuse_plain_http_by_name(conn: Connection) -> None:
    """Refuse plain HTTP that a rule with ``source`` or ``via`` allows by its
    hosts. Such a connection must have every request's Host decided (one
    connection can carry requests for several hosts at one address), which
    the HTTP relay does from the node's own address only: rather than send
    it another way than the rule says, it is reset."""
    assert conn.verdict is not None
    rule = conn.verdict.rule
    conn.verdict = Verdict(action=Action.DENY, rule=rule, workload=conn.workload)
    conn.event = "denied"
    conn.error = (
        f"plain HTTP allowed by rule {rule}'s hosts needs each request's Host checked, which"
        " the proxy does not do from a source address or through a gateway: use HTTPS, or"
        " allow the destination by cidrs or ports in a rule without hosts"
    )
    conn.reset_client()


async def _connect_via(
    conn: Connection, verdict: Verdict, dst: Endpoint, *, mark: int, timeout: float
) -> Half:
    via = verdict.via
    assert via is not None
    conn.route_gateway = str(via)
    target = connect_target(conn, dst)
    where = f"gateway {via}"
    try:
        request = _connect_request(conn, via, target)
        ctx = None
        if via.tls is not None:
            ctx = conn.server.http.tls.client_context(via.tls.ca_file)
    except SecretError as exc:
        raise RouteError(f"{where}: {exc}: CONNECT {target} not sent") from None
    try:
        async with asyncio.timeout(timeout):
            address = await _gateway_address(conn, via, verdict.source)
            sock = _bound_socket(verdict.rule, verdict.source, address, what="gateway")
            return await _open_tunnel(
                conn, sock, Endpoint(address=address, port=via.port), via, ctx, request, mark=mark
            )
    except TimeoutError:
        raise RouteError(f"{where}: no tunnel for CONNECT {target} within {timeout:g}s") from None
    except ssl.SSLCertVerificationError as exc:
        raise RouteError(
            f"{where}: TLS certificate verification failed: {exc.verify_message}"
        ) from None
    except ssl.SSLError as exc:
        raise RouteError(f"{where}: TLS failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise RouteError(f"{where}: connect failed: {describe(exc)}") from None


async def _gateway_address(
    conn: Connection, via: Gateway, source: SourceBinding | None
) -> IPAddress:
    """The gateway's address: its literal one, or its name's first address
    (IPv4 first) of a family the rule's source has."""
    literal = via.address
    if literal is not None:
        return literal
    got = await conn.server.resolver.resolve(via.host)
    addresses = sorted(got.addresses, key=lambda a: (a.version, int(a)))
    if source is not None:
        addresses = [a for a in addresses if source.for_version(a.version) is not None] or addresses
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, f"{via.host} has no address ({got.error or 'no answer'})")
    return addresses[0]


def _connect_request(conn: Connection, via: Gateway, target: str) -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if via.auth is not None:
        secrets = conn.server.http.secrets
        user = secrets.text(via.auth.username_file)
        password = secrets.text(via.auth.password_file)
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


class _TunnelOpener(asyncio.Protocol):
    """Reads the gateway's answer to CONNECT; what follows it in the same
    read already belongs to the tunnel and is handed on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str) -> None:
        self.where = where
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answered: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            self.buffer += data
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0:
            head, rest = bytes(self.buffer[:end]), bytes(self.buffer[end + 4 :])
            self.buffer.clear()
            self.answered.set_result((head, rest))
        elif len(self.buffer) > MAX_RESPONSE_HEAD:
            self.answered.set_exception(
                RouteError(
                    f"{self.where}: no complete answer to CONNECT in {MAX_RESPONSE_HEAD} bytes"
                )
            )

    def eof_received(self) -> bool:
        self.eof = True
        self._end(None)
        return True  # a half-close: the tunnel's upstream half passes it on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self.answered.done():
            return
        if exc is not None:
            self.answered.set_exception(exc)
            return
        first = bytes(self.buffer.split(b"\r\n", 1)[0][:200]).decode("latin-1")
        said = f" after {first!r}" if first else ""
        self.answered.set_exception(
            ConnectionResetError(errno.ECONNRESET, f"closed before answering CONNECT{said}")
        )


async def _open_tunnel(
    conn: Connection,
    sock: socket.socket,
    gateway: Endpoint,
    via: Gateway,
    ctx: ssl.SSLContext | None,
    request: bytes,
    *,
    mark: int,
) -> Half:
    """Connect ``sock`` to the gateway, ask for the tunnel, and hand the
    transport to a new upstream :class:`Half` once the gateway agrees."""
    conn.server.upstreams += 1  # until the upstream half is lost
    half: Half | None = None
    transport: asyncio.Transport | None = None
    try:
        await connect_marked(sock, gateway, mark=mark)
        conn.route_source = _local(sock)
        opener = _TunnelOpener(conn.loop, f"gateway {via}")
        kwargs: dict[str, Any] = {}
        if ctx is not None:
            assert via.tls is not None
            kwargs = {"ssl": ctx, "server_hostname": via.tls.server_name or via.host}
        transport, _ = await conn.loop.create_connection(lambda: opener, sock=sock, **kwargs)
        transport.write(request)
        head, rest = await opener.answered
        status = head.split(b"\r\n", 1)[0].decode("latin-1")[:200]
        code = _status_code(status)
        if code is None or not 200 <= code < 300:
            hint = ""
            if code == 407:
                hint = (
                    " (check via.auth's files)"
                    if via.auth
                    else " (the gateway wants credentials: add via.auth)"
                )
            raise RouteError(f"gateway {via} answered CONNECT: {status!r}{hint}")
        half = Half(conn, upstream=True)
        transport.set_protocol(half)
        half.connection_made(transport)
        if rest or opener.buffer:
            half.data_received(rest + bytes(opener.buffer))
        if opener.eof:
            half.eof_received()
        if opener.lost:
            half.connection_lost(None)
    except BaseException:
        if transport is not None:
            transport.abort()
        sock.close()
        if half is None:
            conn.server.upstreams -= 1
        raise
    return half


def _status_code(status_line: str) -> int | None:
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


def _local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    address = ipaddress.ip_address(host)
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
