"""Read the mark of a local client's socket by its exact TCP tuple (sock_diag).

A connection diverted from a node process arrives with the node's own source
address, so the address names no workload. Its socket, though, carries the
cgroup workload's mark (bpf/cgroup_mark.bpf.c). The accepted socket does not
(``net.ipv4.tcp_fwmark_accept`` would change that for every service on the
host, so it stays off); the client's socket lives in the same network
namespace and the kernel finds it by its tuple: the client's address and
port, and the original destination (DNAT does not change the client's view).

``NETLINK_SOCK_DIAG`` with ``SOCK_DIAG_BY_FAMILY`` and an exact
``inet_diag_req_v2`` (no dump flag) returns one ``inet_diag_msg``; the kernel
adds ``INET_DIAG_MARK`` when the asker has CAP_NET_ADMIN (the agent does).
The encoder and decoder are pure (include/uapi/linux/inet_diag.h,
sock_diag.h, netlink.h); :func:`socket_mark` is the only I/O.
"""

from __future__ import annotations

import socket
import struct

from egress_agent.policy.model import IPAddress
from egress_agent.proxy.netlink import HEADER, attributes, reply_length, request, unmapped

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_DONE = 3
INET_DIAG_MARK = 15
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_ALL_STATES = 0xFFFFFFFF

# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (big endian), src[4], dst[4] (network order words), if, cookie[2].
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue,
# wqueue, uid, inode.
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_SIZE = _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size


class SockDiagError(OSError):
    """The kernel answered with an error (ENOENT: no such socket)."""


def _packed(addr: IPAddress) -> bytes:
    # IPv4 goes in the first word of the 16-byte field.
    return addr.packed.ljust(16, b"\0")


def encode_request(
    src: IPAddress, sport: int, dst: IPAddress, dport: int, *, seq: int = 1
) -> bytes:
    """One SOCK_DIAG_BY_FAMILY request for the TCP socket src:sport -> dst:dport."""
    if src.version != dst.version:
        raise ValueError(f"address families differ: {src} and {dst}")
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, TCP_ALL_STATES)
        + _SOCKID.pack(sport, dport, _packed(src), _packed(dst))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return request(SOCK_DIAG_BY_FAMILY, body, seq=seq)


def decode_mark(data: bytes) -> int | None:
    """The socket mark in a reply; None when the reply has no INET_DIAG_MARK
    (the asker lacked CAP_NET_ADMIN). Raises SockDiagError for an error reply
    and ValueError for bytes that are no reply at all."""
    length = reply_length(
        data,
        kind=SOCK_DIAG_BY_FAMILY,
        answer="a socket",
        source="sock_diag",
        error=SockDiagError,
    )
    start = HEADER.size + _MSG_SIZE
    if length < start:
        raise ValueError(f"inet_diag_msg truncated: {length} bytes")
    found = attributes(data, start, length).get(INET_DIAG_MARK)
    if found is None:
        return None
    a, b = found
    if b - a < 4:
        raise ValueError("INET_DIAG_MARK shorter than 4 bytes")
    (mark,) = struct.unpack_from("=I", data, a)
    return int(mark)


def socket_mark(src: IPAddress, sport: int, dst: IPAddress, dport: int) -> int | None:
    """The mark of this namespace's TCP socket src:sport -> dst:dport.

    A blocking netlink round trip, answered at once by the kernel (no
    network I/O). Raises SockDiagError (ENOENT) when no such socket exists,
    e.g. the client is in another network namespace."""
    src, dst = unmapped(src), unmapped(dst)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(encode_request(src, sport, dst, dport), (0, 0))
        return decode_mark(nl.recv(65536))
