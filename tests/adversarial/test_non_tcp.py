"""Non-TCP traffic of a workload whose intercept rule says ``non_tcp: drop``.

Only TCP can be diverted; the rule asks the kernel to drop everything else
the pod sends to the rule's destinations: QUIC-like UDP to 443, ICMP echo,
UDP large enough to be fragmented, any other IP protocol. The destinations
in ``except_cidrs`` (the cluster resolver, say) stay reachable, and replies
to what the outside started still get out.

Judged at the target: any packet from the pod's own address is a leak.
"""

from __future__ import annotations

import pytest
from adversary import Range, assert_held
from scapy.all import (
    ICMP,
    IP,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
    Raw,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

FAMILIES = ["ipv4", "ipv6"]
# A QUIC Initial's first bytes (RFC 9000 17.2: long header, version 1),
# padded to the 1200 bytes clients send.
QUIC_INITIAL = bytes([0xC3, 0, 0, 0, 1, 8]) + bytes(8) + bytes(1186)
EXPERIMENTAL_PROTO = 253  # RFC 3692


def _udp(rng: Range, family: str, host: str, port: int, size: int, payload: bytes = b"") -> None:
    cmd = {
        "op": "udp",
        "src": rng.addr(rng.pa, family),
        "dst": rng.addr(rng.lab.hosts[host], family),
        "port": port,
        "count": 3,
    }
    if payload:
        cmd["payload"] = payload.hex()
    else:
        cmd["size"] = size
    answer = rng.attack("pa", cmd)
    assert answer.get("sent"), f"the pod could not send UDP: {answer}"


@pytest.mark.parametrize("family", FAMILIES)
def test_quic_like_udp_to_443_never_arrives(rng: Range, datapath: str, family: str) -> None:
    mark = rng.mark()
    _udp(rng, family, "inet", 443, 0, QUIC_INITIAL)
    attempt = rng.judge(mark, family=family)
    assert_held(
        attempt,
        f"UDP to {rng.addr(rng.inet, family)}:443 (QUIC-like) arrived from "
        f"{rng.addr(rng.pa, family)} despite non_tcp: drop",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, f"[{datapath}] UDP was held, but no drop counter of the agent grew"
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_fragmented_udp_never_arrives(rng: Range, datapath: str, family: str) -> None:
    """A datagram longer than the link's MTU: the pod's kernel sends it in
    fragments, and only the first carries the UDP header."""
    mark = rng.mark()
    _udp(rng, family, "inet", 443, 20000)
    attempt = rng.judge(mark, family=family)
    assert_held(
        attempt,
        f"fragmented UDP to {rng.addr(rng.inet, family)}:443 arrived from "
        f"{rng.addr(rng.pa, family)} despite non_tcp: drop",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, f"[{datapath}] UDP was held, but no drop counter of the agent grew"
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_icmp_echo_never_arrives(rng: Range, datapath: str, family: str) -> None:
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    echo = (
        IP(src=pod, dst=server) / ICMP(id=0x4242, seq=1)
        if family == "ipv4"
        else IPv6(src=pod, dst=server) / ICMPv6EchoRequest(id=0x4242, seq=1)
    )
    mark = rng.mark()
    rng.send_frames("pa", [rng.l2("pa", echo / Raw(b"tunnelled bytes"))])
    attempt = rng.judge(mark, family=family)
    assert_held(
        attempt,
        f"an ICMP echo from {pod} reached {server} despite non_tcp: drop",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, f"[{datapath}] ICMP was held, but no drop counter of the agent grew"
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_another_ip_protocol_never_arrives(rng: Range, datapath: str, family: str) -> None:
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    pkt = (
        IP(src=pod, dst=server, proto=EXPERIMENTAL_PROTO)
        if family == "ipv4"
        else IPv6(src=pod, dst=server, nh=EXPERIMENTAL_PROTO)
    )
    mark = rng.mark()
    rng.send_frames("pa", [rng.l2("pa", pkt / Raw(b"x" * 64))])
    attempt = rng.judge(mark, family=family)
    assert_held(
        attempt,
        f"IP protocol {EXPERIMENTAL_PROTO} from {pod} reached {server} despite non_tcp: drop",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, (
        f"[{datapath}] protocol {EXPERIMENTAL_PROTO} was held, but no drop counter grew"
    )
    rng.assert_still_serving(family)


def test_icmpv6_conntrack_does_not_track_never_arrives(rng: Range, datapath: str) -> None:
    """Neighbour discovery messages are untracked by conntrack (neither new
    nor established nor related, and with no conntrack addresses to match),
    and a router forwards them to a global address like any packet; their
    options carry bytes."""
    server, pod = str(rng.inet.ipv6), str(rng.pa.ipv6)
    own_mac = rng.macs["pa"][0]
    packets = [
        IPv6(src=pod, dst=server, hlim=255)
        / ICMPv6ND_NS(tgt=server)
        / ICMPv6NDOptSrcLLAddr(lladdr=own_mac),
        IPv6(src=pod, dst=server, hlim=255) / ICMPv6ND_NA(tgt=pod),
        IPv6(src=pod, dst=server, hlim=255) / ICMPv6ND_RS(),
    ]
    mark = rng.mark()
    rng.send_frames("pa", [rng.l2("pa", p) for p in packets])
    attempt = rng.judge(mark, family="ipv6")
    assert_held(
        attempt,
        f"ICMPv6 that conntrack leaves untracked went from {pod} to {server} despite non_tcp: drop",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, f"[{datapath}] held, but no drop counter of the agent grew"
    rng.assert_still_serving("ipv6")


@pytest.mark.parametrize("family", FAMILIES)
def test_udp_to_an_excepted_destination_still_arrives(
    rng: Range, datapath: str, family: str
) -> None:
    """The dns host is in the rule's except_cidrs: its UDP is not the
    rule's business (a resolver must keep working)."""
    mark = rng.mark()
    _udp(rng, family, "dns", 53, 60)
    arrived = [
        p
        for p in rng.arrived_from(mark, rng.addr(rng.pa, family), host="dns")
        if p.get("dport") == 53
    ]
    assert arrived, (
        f"[{datapath}] UDP to {rng.addr(rng.dns, family)}:53, excepted from the rule, "
        "did not arrive"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_to_what_the_outside_started_still_get_out(
    rng: Range, datapath: str, family: str
) -> None:
    """The target pings the pod: the pod's echo replies belong to a flow
    that came in from outside, and pass."""
    proc = rng.lab.run(
        "inet",
        ["ping", "-c", "1", "-W", "2", rng.addr(rng.pa, family)],
        check=False,
        timeout=10,
    )
    assert proc.returncode == 0, (
        f"[{datapath}] the target got no echo reply from {rng.addr(rng.pa, family)}: "
        f"{proc.stdout.strip()}"
    )
