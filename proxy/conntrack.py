"""Recover the port a diverted client really sent from (ctnetlink).

The proxy's view of a client, ``getpeername()``, is conntrack's reply tuple.
Usually it is the client's own address and port, but not always: a client
may use one source port for two connections to different destinations (TCP
only needs the 4-tuple to be unique), and both are DNAT-ed to the same proxy
address and port. The second one's reply tuple would then equal the first's,
so netfilter's implicit source NAT on the way in (the "null binding" every
NAT-ed connection gets, ``nf_nat_alloc_null_binding``) moves it to another
source port. The proxy would then audit a port the client never used, and a
node process's socket, found by its exact tuple (``proxy.sockdiag``), would
not be found.

Conntrack knows the original tuple. An ``IPCTNL_MSG_CT_GET`` request naming
the reply tuple (the accepted socket's local and peer address) returns the
entry; its ``CTA_TUPLE_ORIG`` holds the client's own address and port
(include/uapi/linux/netfilter/nfnetlink_conntrack.h, nfnetlink.h). Encoder
and decoder are pure; :class:`Conntrack` holds the one netlink socket.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from egress_agent.policy.model import IPAddress
from egress_agent.proxy.netlink import (
    HEADER,
    NLA_F_NESTED,
    attribute,
    attributes,
    reply_length,
    request,
    unmapped,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big endian)


class ConntrackError(OSError):
    """The kernel answered with an error (ENOENT: no such entry)."""


def encode_get(*, src: IPAddress, sport: int, dst: IPAddress, dport: int, seq: int = 1) -> bytes:
    """A CT_GET request for the TCP entry whose *reply* tuple is
    src:sport -> dst:dport (the proxy's address and port, then the client's
    as the proxy sees it)."""
    if src.version != dst.version:
        raise ValueError(f"address families differ: {src} and {dst}")
    v4 = src.version == 4
    ip = attribute(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src.packed) + attribute(
        CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst.packed
    )
    proto = (
        attribute(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
        + attribute(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
        + attribute(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    )
    tuple_ = attribute(CTA_TUPLE_IP | NLA_F_NESTED, ip) + attribute(
        CTA_TUPLE_PROTO | NLA_F_NESTED, proto
    )
    body = _NFGENMSG.pack(socket.AF_INET if v4 else socket.AF_INET6, 0, 0) + attribute(
        CTA_TUPLE_REPLY | NLA_F_NESTED, tuple_
    )
    return request((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, body, seq=seq)


def decode_original_source(data: bytes) -> tuple[IPAddress, int]:
    """The original tuple's source address and port in a CT_GET reply.

    Raises ConntrackError for an error reply (ENOENT: no such entry) and
    ValueError for bytes that are no such reply."""
    length = reply_length(
        data,
        kind=(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
        answer="a conntrack entry",
        source="conntrack",
        error=ConntrackError,
    )
    top = attributes(data, HEADER.size + _NFGENMSG.size, length)
    if CTA_TUPLE_ORIG not in top:
        raise ValueError("conntrack entry without its original tuple")
    orig = attributes(data, *top[CTA_TUPLE_ORIG])
    if CTA_TUPLE_IP not in orig or CTA_TUPLE_PROTO not in orig:
        raise ValueError("original tuple without addresses or ports")
    ip = attributes(data, *orig[CTA_TUPLE_IP])
    proto = attributes(data, *orig[CTA_TUPLE_PROTO])
    address: IPAddress
    if CTA_IP_V4_SRC in ip:
        a, b = ip[CTA_IP_V4_SRC]
        address = ipaddress.IPv4Address(data[a:b])
    elif CTA_IP_V6_SRC in ip:
        a, b = ip[CTA_IP_V6_SRC]
        address = ipaddress.IPv6Address(data[a:b])
    else:
        raise ValueError("original tuple without a source address")
    if CTA_PROTO_SRC_PORT not in proto:
        raise ValueError("original tuple without a source port")
    a, _ = proto[CTA_PROTO_SRC_PORT]
    (port,) = struct.unpack_from("!H", data, a)
    return address, int(port)


class Conntrack:
    """One netlink socket to this namespace's conntrack, opened on first use
    and kept (a connection's accept path should not open descriptors)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def original_source(
        self, *, local: IPAddress, local_port: int, peer: IPAddress, peer_port: int
    ) -> tuple[IPAddress, int]:
        """The client's own address and port for the accepted connection
        ``peer:peer_port -> local:local_port``. A blocking netlink round trip
        the kernel answers at once. Raises ConntrackError / OSError."""
        local, peer = unmapped(local), unmapped(peer)
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_NETFILTER)
            sock.settimeout(1.0)
            self._sock = sock
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        request = encode_get(src=local, sport=local_port, dst=peer, dport=peer_port, seq=self._seq)
        try:
            self._sock.send(request)
            while True:
                data = self._sock.recv(65536)
                (seq,) = struct.unpack_from("=I", data, 8)
                if seq == self._seq:  # a late answer to an earlier, timed-out ask
                    return decode_original_source(data)
        except OSError as exc:
            if not isinstance(exc, ConntrackError) and exc.errno != errno.ENOENT:
                self.close()  # a broken socket is not kept
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
