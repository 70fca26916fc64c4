"""Conntrack as the way around the datapath: pre-seeded 4-tuples, segments
conntrack calls invalid, and source addresses that are not the pod's.

Pre-seeding: a crafted first packet decides NAT for a 4-tuple, and the
pod's real connection on that 4-tuple inherits "no NAT".

NAT is decided once per conntrack entry, on its first packet. If the first
packet for (pod:P, server:443) is one the datapath does not divert, the
entry says "no NAT", and the pod's ordinary kernel connection from port P
later goes straight out. The crafted packet carries a TCP-MD5 option, so
no host here answers it (a host without the key drops it silently, RFC 2385).

Invalid segments: NAT needs a conntrack entry, and a segment that cannot
start one (a SYN-ACK, a FIN out of nowhere) has none, so nothing rewrites
it: it is routed to where it is addressed, data and all.

Spoofed sources: a packet whose source is not the pod's own address has no
identity, so nothing diverts it; a one-way stream needs no replies.

Judged at the target: any packet from the pod's own address (or the address
it claims), or a connection the server accepted from it, is a leak.
"""

from __future__ import annotations

import pytest
from adversary import ALLOWED_PORT, DENIED_PORT, Range, assert_held, families, seed_syn
from scapy.all import IP, TCP, UDP, IPv6, Raw

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

FAMILIES = ["ipv4", "ipv6"]


SENDERS = {"pa": "the pod itself", "po": "a pod under no policy"}


@pytest.mark.parametrize("sender", sorted(SENDERS))
@pytest.mark.parametrize("family", FAMILIES)
def test_reply_direction_preseed_opens_no_direct_path(
    rng: Range, datapath: str, family: str, sender: str
) -> None:
    """A SYN that claims to come *from* the server (src server:443, dst
    pod:P), sent by the pod itself or by a neighbour; then the pod's kernel
    connects from P to the server. The real SYN is the entry's reply
    direction (a simultaneous open), and the entry has no NAT."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    mark = rng.mark()
    seed = seed_syn(family, src=server, dst=pod, sport=DENIED_PORT, dport=port)
    rng.send_frames(sender, [rng.l2(sender, seed)])
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"a reply-direction pre-seed sent by {SENDERS[sender]} let the pod reach "
        f"{server}:{DENIED_PORT} directly from {pod}",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mid_stream_entry_in_the_reply_direction_carries_no_data_of_the_pod(
    rng: Range, datapath: str, family: str
) -> None:
    """po (under no policy) sends an ACK claiming to come from the server
    (server:443 -> pa:P, TCP-MD5 so pa drops it silently): conntrack picks
    the "connection" up mid-stream, established, in that direction. Then pa
    sends data segments on it, from P to the server: the entry's reply
    direction, not a SYN, no NAT. A server that only listens reads them."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    ip_in = IP(src=server, dst=pod) if family == "ipv4" else IPv6(src=server, dst=pod)
    ip_out = IP(src=pod, dst=server) if family == "ipv4" else IPv6(src=pod, dst=server)
    opener = ip_in / TCP(
        sport=DENIED_PORT,
        dport=port,
        flags="A",
        seq=5000,
        ack=9000,
        options=[("MD5", b"\x00" * 16)],
    )
    data = [
        ip_out
        / TCP(sport=port, dport=DENIED_PORT, flags="PA", seq=9000 + 8 * i, ack=5000)
        / Raw(b"exfil-%d\n" % i)
        for i in range(3)
    ]
    mark = rng.mark()
    rng.send_frames("po", [rng.l2("po", opener)])
    rng.send_frames("pa", [rng.l2("pa", p) for p in data], gap=0.02)
    attempt = rng.judge(mark, family=family)
    assert_held(
        attempt,
        f"after a neighbour's spoofed ACK opened {server}:{DENIED_PORT} -> {pod}:{port} "
        "mid-stream, the pod's data went to the server on the reply direction",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, f"[{datapath}] held, but no drop counter of the agent grew"
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_preseed_from_a_neighbour_workload_opens_no_direct_path(
    rng: Range, datapath: str, family: str
) -> None:
    """pn (a workload bound to its own veth) sends a SYN with pa's address
    from pn's veth; then pa's kernel connects on that 4-tuple. Nothing with
    pa's address may reach the target: not the spoofed SYN (a workload's
    address arriving on another workload's interface is dropped), not pa's
    connection."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seq = rng.seed_seq(family, port)
    mark = rng.mark()
    seed = seed_syn(family, src=pod, dst=server, sport=port, dport=DENIED_PORT, seq=seq)
    rng.send_frames("pn", [rng.l2("pn", seed)])
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"a neighbour's spoofed SYN pre-seeded {pod}:{port} -> {server}:{DENIED_PORT}, "
        f"and the pod's own connection went direct",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_preseed_from_a_pod_under_no_policy_opens_no_direct_path(
    rng: Range, datapath: str, family: str
) -> None:
    """The same from po, a pod no workload names: po's own packets go where
    they like (so its crafted SYN may arrive), but pa's real connection on
    the pre-seeded 4-tuple must still be diverted or dropped."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seq = rng.seed_seq(family, port)
    mark = rng.mark()
    seed = seed_syn(family, src=pod, dst=server, sport=port, dport=DENIED_PORT, seq=seq)
    rng.send_frames("po", [rng.l2("po", seed)])
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port, ignore_seeds=True)
    assert_held(
        attempt,
        f"a spoofed SYN from a pod under no policy pre-seeded {pod}:{port} -> "
        f"{server}:{DENIED_PORT}, and the pod's own connection went direct",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_diverted_preseed_ahead_of_the_pods_isn_sends_nothing_direct(
    rng: Range, datapath: str, family: str
) -> None:
    """The pod's own SYN-shaped seed, diverted like any SYN, but a quarter
    of the sequence space ahead of the ISN its kernel will use next (learnt
    from a connection of its own). The real SYN fits the seed's window and
    is diverted too, but conntrack keeps the seed's sequence numbers, so
    the pod's next segments are out of window: invalid, so un-NAT-ed, so
    routed straight to the target."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seq = rng.seed_seq(family, port, ahead=True)
    mark = rng.mark()
    seed = seed_syn(family, src=pod, dst=server, sport=port, dport=DENIED_PORT, seq=seq)
    rng.send_frames("pa", [rng.l2("pa", seed)])
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"after a diverted seed ahead of its ISN, the pod's connection {pod}:{port} -> "
        f"{server}:{DENIED_PORT} sent segments conntrack calls invalid straight to the target",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_conntrack_calls_invalid_never_reach_the_target(
    rng: Range, datapath: str, family: str
) -> None:
    """Data in segments that cannot start a conntrack entry (SYN-ACK, and
    FIN-PSH-ACK without a connection): no entry, no NAT. A server that
    wants them (the attacker's own, reading its link) gets the data."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    mark = rng.mark()
    ip = IP(src=pod, dst=server) if family == "ipv4" else IPv6(src=pod, dst=server)
    frames = [
        rng.l2("pa", ip / TCP(sport=port, dport=DENIED_PORT, flags=flags, seq=seq, ack=1) / data)
        for flags, seq, data in (("SA", 1000, Raw(b"exfil-1\n")), ("FPA", 2000, Raw(b"exfil-2\n")))
    ]
    rng.send_frames("pa", frames, gap=0.05)
    attempt = rng.judge(mark, family=family, src_port=port)
    assert_held(
        attempt,
        f"TCP segments that conntrack calls invalid carried data from {pod} to "
        f"{server}:{DENIED_PORT} with no NAT",
        datapath=datapath,
        accounted=False,
    )
    assert attempt.drops > 0, (
        f"[{datapath}] the invalid segments were held, but no drop counter of the agent grew"
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_diverted_count_is_what_reached_the_proxy(
    rng: Range, datapath: str, family: str
) -> None:
    """A reply-direction pre-seed, the pod's connection on its 4-tuple, then
    one legitimate connection: the agent's diverted count grows by the
    connections the proxy received (each has its audit record), not by
    packets, and never by a connection that went around the proxy."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    mark = rng.mark()
    seed = seed_syn(family, src=server, dst=pod, sport=DENIED_PORT, dport=port)
    rng.send_frames("pa", [rng.l2("pa", seed)])
    rng.connect(family, DENIED_PORT, src_port=port)
    legit = rng.connect(family, ALLOWED_PORT)
    assert legit["outcome"] == "replied", f"[{datapath}] the legitimate connection failed: {legit}"
    attempt = rng.judge(mark, family=family)
    received = len(rng.audit_since(mark))
    # Byte counters aside: every family that counts diverted packets or
    # connections, whatever its labels, must add up to the same number.
    before = {k: v for k, v in families(mark.metrics, "divert").items() if "bytes" not in k}
    after = {k: v for k, v in families(rng.metrics(), "divert").items() if "bytes" not in k}
    assert after, f"[{datapath}] /metrics has no count of diverted connections"
    counted = {name: after[name] - before.get(name, 0.0) for name in after}
    assert all(n == received for n in counted.values()), (
        f"[{datapath}] the proxy received {received} connection(s) "
        f"({'one went around it; ' if attempt.leaked() else ''}audit records), "
        f"but /metrics counted as diverted: {counted}"
    )


# Addresses pa may claim: another pod's (po, under no policy), and one in
# the pods' range that nobody has and no route leads back to.
CLAIMED = {
    "ipv4": [("another pod's address", "198.19.3.2"), ("an unrouted address", "198.19.9.9")],
    "ipv6": [("another pod's address", "fd00:19:3::2"), ("an unrouted address", "fd00:19:9::9")],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pod_cannot_send_from_addresses_that_are_not_its_own(
    rng: Range, datapath: str, family: str
) -> None:
    """From its own veth, pa sends a SYN with data and a UDP datagram whose
    source is not its address: with no identity nothing diverts or drops
    them, and a receiver that only listens (a one-way channel) needs no
    replies."""
    server = rng.addr(rng.inet, family)
    port = rng.next_port()
    mark = rng.mark()
    for _, claimed in CLAIMED[family]:
        ip = IP(src=claimed, dst=server) if family == "ipv4" else IPv6(src=claimed, dst=server)
        frames = [
            rng.l2("pa", ip / TCP(sport=port, dport=DENIED_PORT, flags="S") / Raw(b"exfil\n")),
            rng.l2("pa", ip / UDP(sport=port, dport=DENIED_PORT) / Raw(b"exfil\n")),
        ]
        rng.send_frames("pa", frames)
    attempt = rng.judge(mark, family=family)
    leaks = [
        f"from {what} ({claimed}): {', '.join(sorted({_kind(p) for p in arrived}))}"
        for what, claimed in CLAIMED[family]
        if (arrived := [p for p in rng.arrived_from(mark, claimed) if p.get("sport") == port])
    ]
    assert not leaks, f"[{datapath}] pa sent to {server} " + "; ".join(leaks)
    assert attempt.drops > 0, (
        f"[{datapath}] the spoofed packets were held, but no drop counter of the agent grew"
    )
    rng.assert_still_serving(family)


def _kind(p: dict[str, object]) -> str:
    return {6: "TCP", 17: "UDP"}.get(p["proto"], str(p["proto"]))  # type: ignore[arg-type]
