"""Recover the destination a diverted connection was originally sent to.

After a DNAT in nftables, the accepted socket's local address is the proxy's;
conntrack still knows the original tuple, and netfilter hands it out through
``getsockopt``:

* IPv4: ``SOL_IP``/``SO_ORIGINAL_DST`` (80) returns a ``struct sockaddr_in``
  (include/uapi/linux/netfilter_ipv4.h);
* IPv6: ``SOL_IPV6``/``IP6T_SO_ORIGINAL_DST`` (80) returns a ``struct
  sockaddr_in6`` (include/uapi/linux/netfilter_ipv6/ip6_tables.h).

An IPv4 connection accepted on a dual-stack IPv6 socket has family AF_INET6 but
an IPv4 conntrack entry: its local address reads ``::ffff:a.b.c.d`` and only the
IPv4 query answers. We ask by the address the socket actually carries.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Protocol, cast

from egress_agent.policy.model import IPAddress

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    address: IPAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


class _SockOpts(Protocol):
    family: int

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def getsockname(self) -> tuple[object, ...]: ...


class NotDiverted(OSError):
    """The socket has no NAT record: the connection was not diverted to us."""


def original_dst(sock: _SockOpts) -> Endpoint:
    """The original destination of an accepted, DNAT-ed TCP connection."""
    local = ipaddress.ip_address(str(sock.getsockname()[0]).split("%")[0])
    is_v4 = local.version == 4 or (
        isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None
    )
    try:
        if is_v4:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return Endpoint(address=ipaddress.IPv4Address(packed), port=port)
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        port, _flowinfo, packed = struct.unpack_from("!2xHI16s", raw)
        return Endpoint(address=ipaddress.IPv6Address(packed), port=port)
    except OSError as exc:
        # ENOENT: conntrack has no NAT for this socket (someone connected
        # directly); the rules refuse that, so this is a misconfiguration.
        raise NotDiverted(exc.errno, f"no original destination: {exc.strerror}") from exc


def endpoint_of(sockaddr: tuple[object, ...]) -> Endpoint:
    """An Endpoint from a socket module address tuple (v4 or v6)."""
    host = str(sockaddr[0]).split("%")[0]
    port = cast(int, sockaddr[1])
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return Endpoint(address=addr, port=port)


def family_of(ep: Endpoint) -> socket.AddressFamily:
    return socket.AF_INET if ep.address.version == 4 else socket.AF_INET6
