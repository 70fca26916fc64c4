"""Connections from the proxy to upstream servers, marked so that the rules
never divert them.

Every connection the proxy opens towards a destination -- the byte relay's
(:mod:`.server`, also for the CONNECT listener) and the HTTP relay's
(:mod:`.httprelay`) -- is connected here. Its socket carries
``proxy.upstream_mark``: the nftables rules and the BPF classifier let
marked packets pass, so the proxy's own connection is not diverted back to
the proxy. Setting a mark needs CAP_NET_ADMIN; without it the connect fails
with EPERM, which the callers report as an upstream failure.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from egress_agent.proxy.original_dst import Endpoint, family_of


def upstream_socket(dst: Endpoint) -> socket.socket:
    """A new TCP socket of ``dst``'s address family, for :func:`connect_marked`."""
    return socket.socket(family_of(dst), socket.SOCK_STREAM)


async def connect_marked(sock: socket.socket, dst: Endpoint, *, mark: int) -> None:
    """Mark ``sock`` with ``mark`` and connect it to ``dst`` (non-blocking,
    Nagle off). The caller bounds the time and closes ``sock`` on failure."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    address = str(dst.address)
    target: tuple[Any, ...] = (
        (address, dst.port) if dst.address.version == 4 else (address, dst.port, 0, 0)
    )
    await asyncio.get_running_loop().sock_connect(sock, target)
