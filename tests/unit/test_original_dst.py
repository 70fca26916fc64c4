"""original_dst(): the parsing of what netfilter returns, and the not-diverted case."""

from __future__ import annotations

import ipaddress
import socket
import struct

from egress_agent.proxy.original_dst import (
    IP6T_SO_ORIGINAL_DST,
    SO_ORIGINAL_DST,
    SOL_IP,
    SOL_IPV6,
    Endpoint,
    NotDiverted,
    endpoint_of,
    original_dst,
)


class FakeSock:
    """Answers getsockopt like the kernel would after a DNAT."""

    def __init__(self, local: str, answer: bytes) -> None:
        self.family = socket.AF_INET6 if ":" in local else socket.AF_INET
        self._local = local
        self._answer = answer
        self.asked: tuple[int, int] | None = None

    def getsockname(self) -> tuple[object, ...]:
        return (self._local, 15001)

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        self.asked = (level, optname)
        return self._answer[:buflen]


def test_ipv4_sockaddr_in() -> None:
    raw = struct.pack("!HH4s8x", socket.AF_INET, 443, ipaddress.IPv4Address("198.18.1.2").packed)
    sock = FakeSock("169.254.99.1", raw)
    assert original_dst(sock) == Endpoint(address=ipaddress.IPv4Address("198.18.1.2"), port=443)
    assert sock.asked == (SOL_IP, SO_ORIGINAL_DST)


def test_ipv6_sockaddr_in6() -> None:
    addr = ipaddress.IPv6Address("fd00:18:1::2")
    raw = struct.pack("!HHI16sI", socket.AF_INET6, 8443, 0, addr.packed, 0)
    sock = FakeSock("fd65:6772:6573::1", raw)
    ep = original_dst(sock)
    assert ep == Endpoint(address=addr, port=8443) and str(ep) == "[fd00:18:1::2]:8443"
    assert sock.asked == (SOL_IPV6, IP6T_SO_ORIGINAL_DST)


def test_ipv4_mapped_local_address_asks_the_ipv4_table() -> None:
    raw = struct.pack("!HH4s8x", socket.AF_INET, 80, ipaddress.IPv4Address("10.1.2.3").packed)
    sock = FakeSock("::ffff:169.254.99.1", raw)
    assert original_dst(sock).address == ipaddress.IPv4Address("10.1.2.3")
    assert sock.asked == (SOL_IP, SO_ORIGINAL_DST)


def test_endpoint_of_unmaps_ipv4_mapped_peers() -> None:
    assert endpoint_of(("::ffff:10.0.0.1", 5, 0, 0)) == Endpoint(
        address=ipaddress.IPv4Address("10.0.0.1"), port=5
    )


def test_a_connection_that_was_not_diverted_has_no_original_destination() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        # Without conntrack there is no record at all; with conntrack but no
        # NAT, the "original" destination is the socket's own address (the
        # proxy treats that as not diverted and refuses it).
        try:
            ep = original_dst(conn)
        except NotDiverted:
            return
        assert ep == endpoint_of(conn.getsockname())
    finally:
        for s in (conn, cli, srv):
            s.close()
