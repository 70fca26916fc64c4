"""The ctnetlink codec the proxy uses to find a client's own source port."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress_agent.policy.model import IPAddress
from egress_agent.proxy import conntrack as ct
from egress_agent.proxy import netlink as nl


def _reply(src: str, sport: int, *, with_orig: bool = True) -> bytes:
    """A CT_NEW message as the kernel sends it for a GET: original and reply
    tuples (the reply one with another source port, as after a clash)."""
    addr = ipaddress.ip_address(src)
    v4 = addr.version == 4
    proxy = ipaddress.ip_address("169.254.99.1" if v4 else "fd65:6772:6573::1")

    def tuple_(s: IPAddress, sp: int, d: IPAddress, dp: int) -> bytes:
        ip = nl.attribute(ct.CTA_IP_V4_SRC if v4 else ct.CTA_IP_V6_SRC, s.packed) + nl.attribute(
            ct.CTA_IP_V4_DST if v4 else ct.CTA_IP_V6_DST, d.packed
        )
        proto = (
            nl.attribute(ct.CTA_PROTO_NUM, bytes([6]))
            + nl.attribute(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", sp))
            + nl.attribute(ct.CTA_PROTO_DST_PORT, struct.pack("!H", dp))
        )
        return nl.attribute(ct.CTA_TUPLE_IP | nl.NLA_F_NESTED, ip) + nl.attribute(
            ct.CTA_TUPLE_PROTO | nl.NLA_F_NESTED, proto
        )

    dst = ipaddress.ip_address("198.18.1.2" if v4 else "fd00:18:1::2")
    body = struct.pack("!BBH", socket.AF_INET if v4 else socket.AF_INET6, 0, 0)
    if with_orig:
        body += nl.attribute(ct.CTA_TUPLE_ORIG | nl.NLA_F_NESTED, tuple_(addr, sport, dst, 443))
    body += nl.attribute(ct.CTA_TUPLE_REPLY | nl.NLA_F_NESTED, tuple_(proxy, 15001, addr, 31258))
    body += nl.attribute(3, struct.pack("!I", 0x1A8))  # CTA_STATUS
    kind = (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


@pytest.mark.parametrize(("src", "port"), [("198.19.1.2", 41000), ("fd00:19:1::2", 47542)])
def test_the_original_source_is_read_from_the_original_tuple(src: str, port: int) -> None:
    assert ct.decode_original_source(_reply(src, port)) == (ipaddress.ip_address(src), port)


def test_a_request_names_the_reply_tuple() -> None:
    req = ct.encode_get(
        src=ipaddress.ip_address("169.254.99.1"), sport=15001,
        dst=ipaddress.ip_address("198.19.1.2"), dport=31258, seq=7,
    )  # fmt: skip
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq) == (len(req), 0x101, nl.NLM_F_REQUEST, 7)
    assert req[16] == socket.AF_INET
    top = nl.attributes(req, 20, len(req))
    assert set(top) == {ct.CTA_TUPLE_REPLY}
    inner = nl.attributes(req, *top[ct.CTA_TUPLE_REPLY])
    ip = nl.attributes(req, *inner[ct.CTA_TUPLE_IP])
    proto = nl.attributes(req, *inner[ct.CTA_TUPLE_PROTO])
    a, b = ip[ct.CTA_IP_V4_SRC]
    assert req[a:b] == bytes([169, 254, 99, 1])
    a, _ = proto[ct.CTA_PROTO_DST_PORT]
    assert struct.unpack_from("!H", req, a) == (31258,)
    with pytest.raises(ValueError, match="families differ"):
        ct.encode_get(
            src=ipaddress.ip_address("169.254.99.1"), sport=1,
            dst=ipaddress.ip_address("::1"), dport=2,
        )  # fmt: skip


def test_an_error_reply_and_a_reply_without_the_tuple() -> None:
    error = struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    with pytest.raises(ct.ConntrackError) as info:
        ct.decode_original_source(error)
    assert info.value.errno == 2
    with pytest.raises(ValueError, match="original tuple"):
        ct.decode_original_source(_reply("198.19.1.2", 1, with_orig=False))


@given(st.binary(max_size=200))
def test_any_bytes_give_an_answer_or_a_clear_error(data: bytes) -> None:
    with contextlib.suppress(ValueError, ct.ConntrackError):
        ct.decode_original_source(data)


@given(st.integers(0, 400), st.integers(1, 65535))
def test_truncated_replies_are_refused(cut: int, port: int) -> None:
    data = _reply("198.19.1.2", port)
    if cut < len(data):
        data = data[:cut]
        with pytest.raises((ValueError, ct.ConntrackError)):
            ct.decode_original_source(data)
