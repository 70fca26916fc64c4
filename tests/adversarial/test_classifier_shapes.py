"""Packets the BPF classifier cannot parse, used as the first packet of a
4-tuple; then the pod's real kernel connection on that 4-tuple.

The classifier marks what nftables diverts; a packet it cannot classify got
no mark, so its conntrack entry says "no NAT" and the real connection
inherits it (the pre-seeding of test_preseed.py, from the pod's own address
this time). Each shape below is something the kernel accepts and tracks as
the TCP 4-tuple: fragments (reassembled before NAT, keeping the first
fragment's mark), IPv6 Fragment headers, long IPv6 extension header chains,
AH, stacked VLAN tags, and a frame whose headers are not in the skb's
linear data. The nftables datapath parses in the kernel's own code and
diverts most of them, except TCP behind IPv6 AH (``meta l4proto`` stops at
AH while conntrack looks through it).

Judged at the target: anything from the pod's own address is a leak.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from adversary import DENIED_PORT, Range, assert_held, ip_header, seed_syn, segment
from scapy.all import IP, TCP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Packet, Raw

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

AH_PROTO = 51
TCP_PROTO = 6
DEST_OPTS = 60


def md5_syn(family: str, *, src: str, dst: str, sport: int, seq: int, data: bytes = b"") -> bytes:
    """The TCP segment of a seed SYN to the denied port, to be put behind
    other headers."""
    seed = seed_syn(family, src=src, dst=dst, sport=sport, dport=DENIED_PORT, data=data, seq=seq)
    return segment(seed)


def ah(next_header: int) -> bytes:
    """An AH header (RFC 4302) with a 96-bit ICV of zeros: nobody has its SA."""
    return struct.pack("!BBHII", next_header, 4, 0, 0x1000, 1) + b"\x00" * 12


Frames = tuple[list[bytes], dict[str, Any]]


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    build: Callable[[Range, str, str, int, int], Frames]  # (rng, src, dst, sport, seq)

    def __str__(self) -> str:
        return f"{self.family}-{self.name}"


def short_first_fragment(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
    # The first fragment holds 8 bytes of the TCP header (ports and sequence
    # number), the non-first one the rest.
    seg = md5_syn("ipv4", src=src, dst=dst, sport=sport, seq=seq)
    first = IP(src=src, dst=dst, proto=TCP_PROTO, id=0x4242, flags="MF", frag=0) / Raw(seg[:8])
    rest = IP(src=src, dst=dst, proto=TCP_PROTO, id=0x4242, frag=1) / Raw(seg[8:])
    return [rng.l2("pa", first), rng.l2("pa", rest)], {}


def non_first_fragment_first(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
    # The whole TCP header in the first fragment, but the non-first
    # fragment arrives before it.
    seg = md5_syn("ipv4", src=src, dst=dst, sport=sport, seq=seq, data=b"x" * 16)
    first = IP(src=src, dst=dst, proto=TCP_PROTO, id=0x4343, flags="MF", frag=0) / Raw(seg[:40])
    rest = IP(src=src, dst=dst, proto=TCP_PROTO, id=0x4343, frag=5) / Raw(seg[40:])
    return [rng.l2("pa", rest), rng.l2("pa", first)], {}


def v6_fragments(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
    seg = md5_syn("ipv6", src=src, dst=dst, sport=sport, seq=seq, data=b"x" * 16)
    ident = random.getrandbits(32)
    first = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=TCP_PROTO, offset=0, m=1, id=ident)
    rest = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=TCP_PROTO, offset=5, m=0, id=ident)
    return [rng.l2("pa", first / Raw(seg[:40])), rng.l2("pa", rest / Raw(seg[40:]))], {}


def v6_atomic_fragment(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
    # A Fragment header around a whole packet (offset 0, no more fragments).
    seg = md5_syn("ipv6", src=src, dst=dst, sport=sport, seq=seq)
    pkt = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=TCP_PROTO, offset=0, m=0) / Raw(seg)
    return [rng.l2("pa", pkt)], {}


def v6_five_extension_headers(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
    # One more destination options header than the classifier walks.
    seg = md5_syn("ipv6", src=src, dst=dst, sport=sport, seq=seq)
    pkt: Packet = IPv6(src=src, dst=dst, nh=DEST_OPTS)
    for i in range(5):
        pkt = pkt / IPv6ExtHdrDestOpt(nh=TCP_PROTO if i == 4 else DEST_OPTS)
    return [rng.l2("pa", pkt / Raw(seg))], {}


def behind_ah(family: str) -> Callable[[Range, str, str, int, int], Frames]:
    def build(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
        seg = md5_syn(family, src=src, dst=dst, sport=sport, seq=seq)
        if family == "ipv4":
            pkt = IP(src=src, dst=dst, proto=AH_PROTO) / Raw(ah(TCP_PROTO) + seg)
        else:
            pkt = IPv6(src=src, dst=dst, nh=AH_PROTO) / Raw(ah(TCP_PROTO) + seg)
        return [rng.l2("pa", pkt)], {}

    return build


def double_tagged(family: str) -> Callable[[Range, str, str, int, int], Frames]:
    def build(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
        seg = md5_syn(family, src=src, dst=dst, sport=sport, seq=seq)
        pkt = ip_header(family, src, dst) / TCP(seg)
        return [rng.l2("pa", pkt, tags="adq")], {}

    return build


def non_linear(family: str) -> Callable[[Range, str, str, int, int], Frames]:
    def build(rng: Range, src: str, dst: str, sport: int, seq: int) -> Frames:
        # Longer than a page, or the kernel copies it into linear data anyway;
        # virtio_net_hdr.hdr_len 14: only the Ethernet header is linear.
        data = b"x" * 4200
        seg = md5_syn(family, src=src, dst=dst, sport=sport, seq=seq, data=data)
        pkt = ip_header(family, src, dst) / TCP(seg)
        return [rng.l2("pa", pkt)], {"vnet_hdr_len": 14}

    return build


SHAPES = [
    Shape("first-fragment-shorter-than-a-tcp-header", "ipv4", short_first_fragment),
    Shape("non-first-fragment-before-the-first", "ipv4", non_first_fragment_first),
    Shape("fragment-header", "ipv6", v6_fragments),
    Shape("atomic-fragment-header", "ipv6", v6_atomic_fragment),
    Shape("five-extension-headers", "ipv6", v6_five_extension_headers),
    Shape("ah", "ipv4", behind_ah("ipv4")),
    Shape("ah", "ipv6", behind_ah("ipv6")),
    Shape("802.1ad-and-802.1q-tags", "ipv4", double_tagged("ipv4")),
    Shape("802.1ad-and-802.1q-tags", "ipv6", double_tagged("ipv6")),
    Shape("headers-outside-the-linear-data", "ipv4", non_linear("ipv4")),
    Shape("headers-outside-the-linear-data", "ipv6", non_linear("ipv6")),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unclassifiable_first_packet_opens_no_direct_path(
    rng: Range, datapath: str, shape: Shape
) -> None:
    family = shape.family
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seq = rng.seed_seq(family, port)
    mark = rng.mark()
    frames, extra = shape.build(rng, pod, server, port, seq)
    rng.send_frames("pa", frames, **extra)
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"a first packet shaped '{shape.name}' pre-seeded {pod}:{port} -> "
        f"{server}:{DENIED_PORT} undiverted, and the pod reached the target directly",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


def test_tcp_behind_ipv6_ah_never_reaches_the_target(rng: Range, datapath: str) -> None:
    """TCP segments with data behind an IPv6 AH header, sent straight to the
    target: a server that wants them (the attacker's own, with the SA) reads
    them. They must be diverted or dropped, never delivered."""
    server, pod = rng.addr(rng.inet, "ipv6"), rng.addr(rng.pa, "ipv6")
    port = rng.next_port()
    mark = rng.mark()
    seq = random.getrandbits(32)
    frames = []
    for flags, data, offset in (("S", b"", 0), ("PA", b"exfiltrated\n", 1)):
        tcp = IPv6(src=pod, dst=server) / TCP(
            sport=port, dport=DENIED_PORT, flags=flags, seq=seq + offset, ack=1
        )
        seg = bytes(tcp / Raw(data) if data else tcp)[40:]
        pkt = IPv6(src=pod, dst=server, nh=AH_PROTO) / Raw(ah(TCP_PROTO) + seg)
        frames.append(rng.l2("pa", pkt))
    rng.send_frames("pa", frames, gap=0.05)
    attempt = rng.judge(mark, family="ipv6", src_port=port)
    assert_held(
        attempt,
        f"TCP behind an IPv6 AH header went from {pod} to {server}:{DENIED_PORT} undiverted",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, (
        f"[{datapath}] TCP behind AH was held, but no drop counter of the agent grew"
    )
    rng.assert_still_serving("ipv6")
