"""The netlink framing that the proxy's two kernel queries share.

``proxy.conntrack`` (ctnetlink: a client's own source port) and
``proxy.sockdiag`` (sock_diag: a local client socket's mark) each send one
request and read one reply. Their messages differ; the frame around them
does not: a ``nlmsghdr`` (include/uapi/linux/netlink.h), an error reply
carrying a negative errno, and type-length-value attributes padded to four
bytes. Pure functions; the sockets stay with their users.
"""

from __future__ import annotations

import ipaddress
import os
import struct

from egress_agent.policy.model import IPAddress

NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # length, type


def attribute(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to four bytes."""
    data = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def request(kind: int, body: bytes, *, seq: int) -> bytes:
    """A request message of type ``kind`` around ``body``."""
    return HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def reply_length(data: bytes, *, kind: int, answer: str, source: str, error: type[OSError]) -> int:
    """Check that ``data`` is one reply of type ``kind`` and return its
    length. An error reply raises ``error(errno, "source: strerror")``; an
    acknowledgement or a message of another type, or bytes that are no
    reply at all, raise ValueError (``answer`` names what was expected)."""
    if len(data) < HEADER.size:
        raise ValueError(f"netlink reply of {len(data)} bytes is shorter than its header")
    length, got, _flags, _seq, _pid = HEADER.unpack_from(data)
    if length < HEADER.size or length > len(data):
        raise ValueError(f"netlink length {length} does not fit the {len(data)}-byte reply")
    if got == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, HEADER.size)
        if err == 0:
            raise ValueError(f"netlink acknowledgement instead of {answer}")
        raise error(-err, f"{source}: {os.strerror(-err)}")
    if got != kind:
        raise ValueError(f"unexpected netlink message type {got:#x}")
    return int(length)


def attributes(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type (flags masked off) -> (payload start, payload end) for
    the attributes in ``data[start:end]``; the first of a type wins."""
    out: dict[int, tuple[int, int]] = {}
    offset = start
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            raise ValueError(f"attribute of length {length} at {offset} overruns the message")
        out.setdefault(kind & NLA_TYPE_MASK, (offset + _ATTR.size, offset + length))
        offset += (length + 3) & ~3
    return out


def unmapped(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view) as IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
