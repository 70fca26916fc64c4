"""The proxy's listening sockets: bound (or taken over from a predecessor)
and served by the event loop, and watched so that a socket the loop stopped
serving after an accept error is served again."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable

from egress_agent.proxy.original_dst import endpoint_of
from egress_agent.proxy.relay import describe

log = logging.getLogger(__name__)

IP_FREEBIND = 15
IPV6_FREEBIND = 78
# How often the server checks its listeners (and sweeps idle connections).
SWEEP_INTERVAL = 1.0


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
            log.error("listener %s: cannot listen again yet: %s", self.name, describe(exc))
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


def take_listening(
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


def bind_listener(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> socket.socket:
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
