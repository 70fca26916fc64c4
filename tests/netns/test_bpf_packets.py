"""The loaded classifier decides every kind of packet like the reference.

Packets are crafted with scapy from a description (:class:`Packet`): IPv4 and
IPv6; TCP, UDP, ICMP and GRE; IPv4 options; first, later and tiny first
fragments; IPv6 Fragment headers (first, later, atomic); 0 to 9 IPv6
extension headers; AH; none to three VLAN tags; ARP and other ethertypes;
malformed IP headers and truncated TCP headers. The real program, compiled
and verified by the kernel, runs on each in the kernel
(``BPF_PROG_TEST_RUN``, nothing attached anywhere) with maps written for a
random policy, and its verdict (pass, mark, drop), its counters by reason,
by workload and by intercept rule must be the reference's.

The reference (:func:`expected`) is built from the description and
``policy.decide`` (``identify``, ``should_divert``, ``non_tcp_drop``) plus
the datapath contract's fail-closed rules; it never parses bytes. What the
kernel does with packets whose headers are outside the skb's linear part is
test_bpf_nonlinear's business (a test run's skb is always linear).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.all import (
    AH,
    ARP,
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1AD,
    Dot1Q,
    Ether,
    ICMPv6EchoRequest,
    IPOption,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    Raw,
    raw,
)

from egress_agent.bpf import layout
from egress_agent.bpf.classifier import BpfConfig, Classifier
from egress_agent.bpf.datapath import BpfDatapath, Traffic, WorkloadCounters
from egress_agent.bpf.maps import assign_ids, desired_maps, diff
from egress_agent.policy.decide import identify, non_tcp_drop, should_divert
from egress_agent.policy.load import parse_policy
from egress_agent.policy.model import NonTcp, Policy, ProxySettings
from tests.lab import policygen
from tests.lab.bpfrun import TC_ACT_OK, TC_ACT_SHOT, run_classifier

pytestmark = pytest.mark.netns

PROXY = ProxySettings()
DIVERT = PROXY.divert_mark
UPSTREAM = PROXY.upstream_mark
# The contract's bounds, as the classifier has them.
MAX_VLAN_TAGS = 2
MAX_EXT_HEADERS = 8

IFINDEX = {policygen.pod_ifname(i, p[0]): 10 + i for i, p in enumerate(policygen.PODS)}
UPLINK, UPLINK_INDEX = "uplink0", 99  # an interface no workload is bound to
INTERFACES = {**IFINDEX, UPLINK: UPLINK_INDEX}

Verdict, Reason = layout.Verdict, layout.Reason

# IP protocol numbers of what a chain may hold.
NUMBERS = {
    "hop": 0,
    "tcp": 6,
    "udp": 17,
    "rout": 43,
    "frag0": 44,
    "atomic": 44,
    "fragN": 44,
    "gre": 47,
    "ah": 51,
    "icmp": 58,  # ICMPv6 (ICMP is 1 in IPv4)
    "dst": 60,
}
WALKED = ("hop", "dst", "rout", "frag0", "atomic")  # walked on to the upper layer
EXTENSIONS = (*WALKED, "fragN", "ah")


@dataclass(frozen=True, kw_only=True)
class Packet:
    """What a crafted packet holds; :func:`build` makes its bytes."""

    vlans: tuple[int, ...] = ()  # TPIDs of the tags, outermost first
    l3: str = "ip"  # "ip", "arp" or "lldp"
    src: str = "198.19.1.2"
    dst: str = "198.18.1.2"
    proto: str = "tcp"  # the upper layer: tcp, udp, icmp, gre
    dport: int = 443
    options: int = 0  # IPv4 option bytes
    frag: str = (
        ""  # IPv4: "", "first", "tiny" (a first fragment without a whole TCP header), "later"
    )
    # Headers between the IP header and the upper layer: IPv4 only "ah"; IPv6
    # any of EXTENSIONS ("fragN": a later fragment, what follows is its data).
    chain: tuple[str, ...] = ()
    big_ext: bool = False  # IPv6 Destination Options headers of 112 bytes
    malformed: str = ""  # version, ihl, total-long, total-short, cut-ip, cut-ext
    tcp_cut: str = ""  # short, doff-small, doff-long
    mark: int = 0  # skb->mark before the classifier

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.src).version


@dataclass(frozen=True, kw_only=True)
class Expect:
    verdict: layout.Verdict
    reason: layout.Reason
    workload: str | None = None  # counted for this workload
    rule: int | None = None  # non-TCP counted for this intercept rule index


def _upper(p: Packet) -> Raw | TCP | UDP | ICMP | GRE | ICMPv6EchoRequest:
    if p.proto == "tcp":
        if p.tcp_cut == "short":
            return Raw(raw(TCP(sport=40000, dport=p.dport))[:12])
        offset = {"doff-small": 4, "doff-long": 15}.get(p.tcp_cut)
        return TCP(sport=40000, dport=p.dport, flags="S", dataofs=offset, chksum=0)
    if p.proto == "udp":
        return UDP(sport=40000, dport=p.dport, chksum=0) / Raw(b"q" * 12)
    if p.proto == "gre":
        return GRE() / Raw(b"g" * 20)
    if p.family == 4:
        return ICMP() / Raw(b"i" * 8)
    return ICMPv6EchoRequest(cksum=0)


def _v4(p: Packet) -> bytes:
    upper = _upper(p)
    number = {"tcp": 6, "udp": 17, "icmp": 1, "gre": 47}[p.proto]
    payload = raw(upper)
    if "ah" in p.chain:
        payload = raw(AH(nh=number, payloadlen=1, spi=7, seq=1)) + payload
        number = 51
    flags, offset = 0, 0
    if p.frag == "first":
        flags = 1
    elif p.frag == "tiny":
        flags, payload = 1, payload[:8]
    elif p.frag == "later":
        flags, offset, payload = 0, 3, b"f" * 16
    options = [IPOption(b"\x01" * p.options)] if p.options else []
    fields: dict[str, object] = {}
    if p.malformed == "version":
        fields["version"] = 5
    elif p.malformed == "ihl":
        fields["ihl"] = 4
    header = IP(
        src=p.src, dst=p.dst, proto=number, flags=flags, frag=offset, options=options, **fields
    )
    packet = raw(header / Raw(payload))
    total = len(packet)
    if p.malformed == "total-long":
        packet = packet[:2] + (total + 20).to_bytes(2, "big") + packet[4:]
    elif p.malformed == "total-short":
        packet = packet[:2] + (16).to_bytes(2, "big") + packet[4:]
    elif p.malformed == "cut-ip":
        packet = packet[:12]
    return packet


def _v6(p: Packet) -> bytes:
    items = [*p.chain, p.proto]
    body = b""
    # From the upper layer outwards: each header names the one after it.
    upper = _upper(p)
    for i in range(len(items) - 1, -1, -1):
        item = items[i]
        if i == len(items) - 1:
            body = raw(upper)
            continue
        after = NUMBERS[items[i + 1]]
        if item == "hop":
            body = raw(IPv6ExtHdrHopByHop(nh=after)) + body
        elif item == "dst":
            opts = [PadN(optdata=b"\x00" * 108)] if p.big_ext else []
            body = raw(IPv6ExtHdrDestOpt(nh=after, options=opts)) + body
        elif item == "rout":
            body = raw(IPv6ExtHdrRouting(nh=after)) + body
        elif item in ("frag0", "atomic"):
            body = raw(IPv6ExtHdrFragment(nh=after, offset=0, m=int(item == "frag0"), id=9)) + body
        elif item == "fragN":
            data = (body + b"\x00" * 16)[:16]  # what follows is fragment data
            body = raw(IPv6ExtHdrFragment(nh=after, offset=5, m=1, id=9)) + data
        elif item == "ah":
            body = raw(AH(nh=after, payloadlen=1, spi=7, seq=1)) + body
    first = NUMBERS[items[0]]
    if p.malformed == "cut-ext":
        body = body[: len(body) - len(raw(upper)) - 4]  # the last header cut short
    plen = len(body)
    if p.malformed == "payload-long":
        plen += 16
    version = 4 if p.malformed == "version" else 6
    packet = raw(IPv6(src=p.src, dst=p.dst, nh=first, plen=plen, version=version)) + body
    if p.malformed == "cut-ip":
        packet = packet[:30]
    return packet


def build(p: Packet) -> bytes:
    eth: Ether = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    frame = eth
    for tpid in p.vlans:
        frame = frame / (Dot1Q(vlan=7) if tpid == 0x8100 else Dot1AD(vlan=7))
    if p.l3 == "arp":
        return raw(frame / ARP(psrc="198.19.1.2", pdst="198.19.1.1"))
    if p.l3 == "lldp":
        if p.vlans:
            frame.lastlayer().type = 0x88CC
        else:
            frame.type = 0x88CC
        return raw(frame / Raw(b"\x00" * 30))
    if p.vlans:
        frame.lastlayer().type = 0x0800 if p.family == 4 else 0x86DD
    else:
        frame.type = 0x0800 if p.family == 4 else 0x86DD
    return raw(frame) + (_v4(p) if p.family == 4 else _v6(p))


# -- the reference ------------------------------------------------------------


def expected(policy: Policy, p: Packet, interface: str) -> Expect:
    """The contract's verdict for packet ``p`` arriving on ``interface``."""
    if (p.mark & UPSTREAM) == UPSTREAM:
        return Expect(verdict=Verdict.PASS, reason=Reason.UPSTREAM_MARK)
    if len(p.vlans) > MAX_VLAN_TAGS:
        return Expect(verdict=Verdict.DROP, reason=Reason.VLAN_TAGS)
    if p.l3 != "ip":
        return Expect(verdict=Verdict.PASS, reason=Reason.NOT_IP)
    if p.malformed and p.malformed != "cut-ext":
        return Expect(verdict=Verdict.DROP, reason=Reason.MALFORMED)
    src, dst = ipaddress.ip_address(p.src), ipaddress.ip_address(p.dst)
    if identify(policy, src) is None:
        return Expect(verdict=Verdict.PASS, reason=Reason.NO_IDENTITY)
    workload = identify(policy, src, interface=interface)
    if workload is None:  # a bound workload's address on another interface
        return Expect(verdict=Verdict.DROP, reason=Reason.WRONG_INTERFACE)

    def done(verdict: layout.Verdict, reason: layout.Reason, rule: int | None = None) -> Expect:
        return Expect(verdict=verdict, reason=reason, workload=workload, rule=rule)

    def non_tcp() -> Expect:
        rule = non_tcp_drop(policy, src=src, dst=dst, interface=interface)
        if rule is None:
            return done(Verdict.PASS, Reason.NOT_TCP)
        return done(Verdict.MARK, Reason.NON_TCP_MARKED, rule.index)

    fragment = False
    if p.family == 4:
        if "ah" in p.chain:
            return done(Verdict.DROP, Reason.AH)
        fragment = bool(p.frag)
        upper = p.proto
    else:
        if p.malformed == "cut-ext":
            return done(Verdict.DROP, Reason.MALFORMED)
        items = [*p.chain, p.proto]
        upper = p.proto
        for i, item in enumerate(items):
            if item in (*WALKED, "fragN") and i >= MAX_EXT_HEADERS:
                return done(Verdict.DROP, Reason.EXT_HEADERS)
            if item == "fragN":
                # A later fragment: only its header's next-header value is known.
                named = items[i + 1]
                if named == "tcp" or named in EXTENSIONS:
                    return done(Verdict.DROP, Reason.FRAGMENT)
                return non_tcp()
            if item in WALKED:
                fragment = fragment or item in ("frag0", "atomic")
                continue
            if item == "ah":
                return done(Verdict.DROP, Reason.AH)
            break
    if upper != "tcp":
        return non_tcp()
    if fragment:
        return done(Verdict.DROP, Reason.FRAGMENT)
    if p.tcp_cut:
        return done(Verdict.DROP, Reason.TCP_TRUNCATED)
    if dst in (PROXY.address_v4, PROXY.address_v6):
        return done(Verdict.PASS, Reason.TO_PROXY)
    if should_divert(policy, src=src, dst=dst, dst_port=p.dport, interface=interface):
        return done(Verdict.MARK, Reason.MARKED)
    return done(Verdict.PASS, Reason.NO_RULE)


# -- random packets -----------------------------------------------------------

SOURCES = {
    4: [v4 for _, v4, _ in policygen.PODS] + ["203.0.113.9"],
    6: [v6 for _, _, v6 in policygen.PODS] + ["2001:db8::9"],
}
DESTINATIONS = {
    4: [v4 for _, v4, _ in policygen.EXTERNALS] + ["198.19.2.2", str(PROXY.address_v4)],
    6: [v6 for _, _, v6 in policygen.EXTERNALS] + ["fd00:19:2::2", str(PROXY.address_v6)],
}


OWN_INTERFACE = {
    addr: policygen.pod_ifname(i, name)
    for i, (name, v4, v6) in enumerate(policygen.PODS)
    for addr in (v4, v6)
}


def random_case(rng: random.Random) -> tuple[Packet, str]:
    """A random packet and the interface it arrives on (mostly its pod's own)."""
    family = rng.choice((4, 6))
    kind = rng.random()
    src = rng.choice(SOURCES[family])
    interface = OWN_INTERFACE.get(src, UPLINK)
    if rng.random() < 0.3:
        interface = rng.choice(list(INTERFACES))
    fields: dict[str, object] = {
        "src": src,
        "dst": rng.choice(DESTINATIONS[family]),
        "proto": rng.choice(("tcp", "tcp", "tcp", "udp", "icmp", "gre")),
        "dport": rng.choice((*policygen.PORTS, 444, 9999)),
        "mark": rng.choices((0, DIVERT | 0x5, UPSTREAM), weights=(85, 10, 5))[0],
        "vlans": tuple(
            rng.choice((0x8100, 0x88A8))
            for _ in range(rng.choices((0, 1, 2, 3), weights=(80, 8, 8, 4))[0])
        ),
    }
    if kind < 0.04:
        fields["l3"] = rng.choice(("arp", "lldp"))
    elif kind < 0.12:
        choices = ["version", "cut-ip", "total-long" if family == 4 else "payload-long"]
        if family == 4:
            choices += ["ihl", "total-short"]
        fields["malformed"] = rng.choice(choices)
        if fields["malformed"] == "cut-ip" and not fields["vlans"]:
            # A test run refuses an IP ethertype with less than an IP header;
            # behind a VLAN tag the kernel leaves the frame alone.
            fields["vlans"] = (0x8100,)
    if fields["proto"] == "tcp" and rng.random() < 0.1:
        fields["tcp_cut"] = rng.choice(("short", "doff-small", "doff-long"))
    if family == 4:
        if rng.random() < 0.3:
            fields["frag"] = rng.choice(("first", "tiny", "later"))
        if rng.random() < 0.15:
            fields["options"] = rng.choice((4, 8, 40))
        if rng.random() < 0.1:
            fields["chain"] = ("ah",)
    elif rng.random() < 0.6:
        length = rng.choice((1, 1, 2, 3, MAX_EXT_HEADERS - 1, MAX_EXT_HEADERS, MAX_EXT_HEADERS + 1))
        chain = [rng.choice(("hop", "dst", "rout", "dst")) for _ in range(length)]
        if rng.random() < 0.4:
            chain[rng.randrange(length)] = rng.choice(("frag0", "atomic", "fragN"))
        if rng.random() < 0.15:
            chain[rng.randrange(length)] = "ah"
        if "fragN" in chain:  # a later fragment's data holds the rest
            chain = chain[: chain.index("fragN") + 2]
            if chain[-1] != "fragN":
                chain[-1] = rng.choice((*EXTENSIONS[:-2], "ah"))
        fields["chain"] = tuple(chain)
        fields["big_ext"] = rng.random() < 0.2
        if (
            rng.random() < 0.1
            and not fields.get("malformed")
            and all(c in WALKED for c in chain)
            and len(chain) <= MAX_EXT_HEADERS
        ):
            fields["malformed"] = "cut-ext"
    return Packet(**fields), interface  # type: ignore[arg-type]


def with_non_tcp(rng: random.Random, policy: Policy) -> Policy:
    rules = tuple(
        dataclasses.replace(r, non_tcp=NonTcp.DROP) if rng.random() < 0.5 else r
        for r in policy.intercept
    )
    return dataclasses.replace(policy, intercept=rules)


# -- the kernel side ------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Classifier]:
    """The classifier compiled, verified and loaded, attached nowhere. Its pins
    go to a bpffs of the test's own (a filesystem mount, removed below)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root")
    bpffs = tmp_path_factory.mktemp("bpffs")
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        config = BpfConfig(
            divert_mark=DIVERT,
            upstream_mark=UPSTREAM,
            proxy_v4=PROXY.address_v4,
            proxy_v6=PROXY.address_v6,
            pin_dir=str(bpffs / "egress_agent"),
        )
        loaded = Classifier(config)
        try:
            yield loaded
        finally:
            loaded.close()
    finally:
        subprocess.run(["umount", str(bpffs)], check=False)


def _load(classifier: Classifier, policy: Policy) -> dict[str, int]:
    ids = assign_ids(policy, {})
    classifier.apply(diff(classifier.read(), desired_maps(policy, ids=ids, ifindexes=IFINDEX)))
    counters = classifier.maps[layout.COUNTERS]
    for key in list(counters.keys()):
        counters.delete(key)
    return ids


@dataclass
class Tally:
    reasons: Counter[layout.Reason] = dataclasses.field(default_factory=Counter)
    rules: Counter[tuple[int, str]] = dataclasses.field(default_factory=Counter)
    workloads: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)


def _check(classifier: Classifier, policy: Policy, packets: list[tuple[Packet, str]]) -> None:
    """Run each (packet, ingress interface) and compare verdicts, then counters."""
    ids = _load(classifier, policy)
    reasons_before = classifier.reasons()
    rules_before = classifier.non_tcp()
    want = Tally()
    for p, interface in packets:
        frame = build(p)
        e = expected(policy, p, interface)
        assert layout.REASON_VERDICT[e.reason] is e.verdict
        run = run_classifier(
            classifier.prog_fd, frame, mark=p.mark, ingress_ifindex=INTERFACES[interface]
        )
        if e.verdict is Verdict.DROP:
            right = run.action == TC_ACT_SHOT
        elif e.reason is Reason.UPSTREAM_MARK:
            right = run.action == TC_ACT_OK and run.mark == p.mark
        elif e.verdict is Verdict.MARK:
            right = run.action == TC_ACT_OK and run.mark == p.mark | DIVERT
        else:
            right = run.action == TC_ACT_OK and run.mark == p.mark & ~DIVERT
        assert right, (
            f"{p} on {interface}: want {e.verdict.name} ({e.reason.name}), got action"
            f" {run.action} mark {run.mark:#x}\n{frame.hex()}\npolicy: {policy}"
        )
        want.reasons[e.reason] += 1
        if e.rule is not None:
            want.rules[(e.rule, "packets")] += 1
            want.rules[(e.rule, "bytes")] += len(frame)
        if e.workload is not None and e.reason is not Reason.NOT_TCP:
            want.workloads[(e.workload, e.verdict.name)] += 1
            want.workloads[(e.workload, e.verdict.name + " bytes")] += len(frame)
    after = classifier.reasons()
    got_reasons = {r: after[r] - reasons_before[r] for r in layout.Reason}
    assert got_reasons == {r: want.reasons[r] for r in layout.Reason}
    got_rules: Counter[tuple[int, str]] = Counter()
    for bit, (count, size) in classifier.non_tcp().items():
        old = rules_before.get(bit, (0, 0))
        if (count, size) != old:
            index = policy.intercept[bit].index
            got_rules[(index, "packets")] += count - old[0]
            got_rules[(index, "bytes")] += size - old[1]
    assert +got_rules == +want.rules
    by_id = {wid: name for name, wid in ids.items()}
    got_workloads: Counter[tuple[str, str]] = Counter()
    for wid, values in classifier.counters().items():
        for value, what in zip(
            values, ("MARK", "MARK bytes", "PASS", "PASS bytes", "DROP", "DROP bytes"), strict=True
        ):
            got_workloads[(by_id[wid], what)] += value
    assert +got_workloads == +want.workloads


SEEDS = range(40)


@pytest.mark.timeout(300)
def test_random_packets_under_random_policies_get_the_reference_verdict(
    classifier: Classifier,
) -> None:
    reasons: Counter[layout.Reason] = Counter()
    for seed in SEEDS:
        rng = random.Random(seed)
        policy = with_non_tcp(rng, policygen.random_policy(rng))
        packets = [random_case(rng) for _ in range(250)]
        for p, interface in packets:
            reasons[expected(policy, p, interface).reason] += 1
        _check(classifier, policy, packets)
    # Every reason, so every rule of the contract, was put to the test.
    assert min(reasons[r] for r in layout.Reason) >= 50, reasons


# -- the contract, case by case -----------------------------------------------

POLICY = f"""\
version: 1
workloads:
  pa: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"], interfaces: [{policygen.pod_ifname(0, "pa")}]}}
  pb: {{cidrs: [198.19.1.3/32, "fd00:19:1::3/128"]}}
intercept:
  - from: [pa, pb]
    ports: [443]
    except_cidrs: [198.18.2.0/24, "fd00:18:2::/64"]
    non_tcp: drop
default: deny
"""
PA = policygen.pod_ifname(0, "pa")
PB = policygen.pod_ifname(1, "pb")
V6 = {"src": "fd00:19:1::2", "dst": "fd00:18:1::2"}
NO_WORKLOAD = "203.0.113.9"
EIGHT = ("hop",) + ("dst",) * 7


def case(name: str, reason: layout.Reason, on: str = PA, **fields: Any) -> Any:
    """A packet of pa's (unless said otherwise) arriving on ``on``, and the
    reason (so the verdict) it must get under ``POLICY``."""
    return pytest.param(Packet(**fields), on, reason, id=name)


CASES = [
    case("TCP to an intercepted port", Reason.MARKED),
    case("TCP to another port", Reason.NO_RULE, dport=80),
    case("TCP to an excepted destination", Reason.NO_RULE, dst="198.18.2.2"),
    case("TCP with 40 bytes of IPv4 options", Reason.MARKED, options=40),
    case("TCP behind one VLAN tag", Reason.MARKED, vlans=(0x8100,)),
    case("TCP behind 802.1ad and 802.1Q tags", Reason.MARKED, vlans=(0x88A8, 0x8100)),
    case("three VLAN tags", Reason.VLAN_TAGS, vlans=(0x88A8, 0x8100, 0x8100)),
    case("IPv4 first fragment of TCP", Reason.FRAGMENT, frag="first"),
    case("IPv4 tiny first fragment of TCP", Reason.FRAGMENT, frag="tiny"),
    case("IPv4 later fragment of TCP", Reason.FRAGMENT, frag="later", dport=80),
    case("IPv4 AH", Reason.AH, chain=("ah",)),
    case("TCP header cut short", Reason.TCP_TRUNCATED, tcp_cut="short"),
    case("TCP data offset 4", Reason.TCP_TRUNCATED, tcp_cut="doff-small"),
    case("TCP data offset past the end", Reason.TCP_TRUNCATED, tcp_cut="doff-long"),
    case("IPv4 header length 4", Reason.MALFORMED, malformed="ihl"),
    case("IPv4 total length too long", Reason.MALFORMED, malformed="total-long"),
    case("IPv4 header cut short", Reason.MALFORMED, UPLINK, malformed="cut-ip", vlans=(0x8100,)),
    case("UDP to a non_tcp: drop destination", Reason.NON_TCP_MARKED, proto="udp"),
    case("a UDP fragment, the same", Reason.NON_TCP_MARKED, proto="udp", frag="later"),
    case("ICMP to an excepted destination", Reason.NOT_TCP, proto="icmp", dst="198.18.2.2"),
    case("a bound workload's address elsewhere, TCP", Reason.WRONG_INTERFACE, PB),
    case("a bound workload's address elsewhere, UDP", Reason.WRONG_INTERFACE, UPLINK, proto="udp"),
    case("an unbound workload on any interface", Reason.MARKED, UPLINK, src="198.19.1.3"),
    case("no workload: fragments pass", Reason.NO_IDENTITY, UPLINK, src=NO_WORKLOAD, frag="first"),
    case("no workload: AH passes", Reason.NO_IDENTITY, UPLINK, src=NO_WORKLOAD, chain=("ah",)),
    case("TCP to the proxy itself", Reason.TO_PROXY, dst=str(PROXY.address_v4)),
    case("ARP", Reason.NOT_IP, l3="arp"),
    case("ARP behind two VLAN tags", Reason.NOT_IP, l3="arp", vlans=(0x88A8, 0x8100)),
    case("LLDP", Reason.NOT_IP, l3="lldp"),
    case("IPv6 TCP", Reason.MARKED, **V6),
    case("IPv6 TCP behind 8 extension headers", Reason.MARKED, **V6, chain=EIGHT),
    case("IPv6 TCP behind 9 extension headers", Reason.EXT_HEADERS, **V6, chain=(*EIGHT, "rout")),
    case("IPv6 UDP behind 9 extension headers", Reason.EXT_HEADERS, **V6, chain=("dst",) * 9),
    case("IPv6 long extension headers", Reason.MARKED, **V6, chain=("dst",) * 3, big_ext=True),
    case("IPv6 first fragment of TCP", Reason.FRAGMENT, **V6, chain=("frag0",)),
    case("IPv6 atomic fragment of TCP", Reason.FRAGMENT, **V6, chain=("atomic",)),
    case("IPv6 later fragment naming TCP", Reason.FRAGMENT, **V6, chain=("fragN",)),
    case(
        "IPv6 later fragment naming an extension header",
        Reason.FRAGMENT,
        **V6,
        proto="udp",
        chain=("fragN", "dst"),
    ),
    case("IPv6 later fragment of UDP", Reason.NON_TCP_MARKED, **V6, proto="udp", chain=("fragN",)),
    case(
        "IPv6 first fragment of UDP",
        Reason.NON_TCP_MARKED,
        **V6,
        proto="udp",
        chain=("hop", "frag0", "dst"),
    ),
    case("IPv6 AH", Reason.AH, **V6, chain=("ah",)),
    case("IPv6 AH after a Fragment header", Reason.AH, **V6, proto="udp", chain=("frag0", "ah")),
    case(
        "IPv6 extension header cut short",
        Reason.MALFORMED,
        **V6,
        chain=("hop", "dst"),
        malformed="cut-ext",
    ),
    case("IPv6 payload length too long", Reason.MALFORMED, **V6, malformed="payload-long"),
    case("IPv6 TCP to the proxy itself", Reason.TO_PROXY, src=V6["src"], dst=str(PROXY.address_v6)),
    case("the proxy's own packets", Reason.UPSTREAM_MARK, UPLINK, mark=UPSTREAM, frag="first"),
]


@pytest.mark.parametrize(("packet", "interface", "reason"), CASES)
def test_the_contract_case_by_case(
    classifier: Classifier, packet: Packet, interface: str, reason: layout.Reason
) -> None:
    policy = parse_policy(POLICY)
    # The reference agrees with the table, and the kernel with both.
    e = expected(policy, packet, interface)
    assert (e.verdict, e.reason) == (layout.REASON_VERDICT[reason], reason)
    _check(classifier, policy, [(packet, interface)])


def test_the_datapath_reports_counters_by_workload_rule_and_reason(
    classifier: Classifier,
) -> None:
    """``BpfDatapath.counters()``, what the agent reads: workloads by name,
    non-TCP marks by intercept rule index, drops by reason."""
    policy = parse_policy(POLICY)
    classifier.apply(diff(classifier.read(), {}))  # the datapath writes from empty
    for key in list(classifier.maps[layout.COUNTERS].keys()):
        classifier.maps[layout.COUNTERS].delete(key)
    datapath = BpfDatapath(config=classifier.config, classifier=classifier, ifindexes=IFINDEX)
    datapath.update(policy)
    before = datapath.counters()
    sent = [
        (Packet(), PA),  # marked
        (Packet(dport=80), PA),  # passed
        (Packet(frag="first"), PA),  # dropped
        (Packet(proto="udp"), PA),  # non-TCP marked for intercept[0]
        (Packet(proto="udp", dst="198.18.2.2"), PA),  # non-TCP passed: by reason only
        (Packet(src="198.19.1.3", chain=("ah",)), PB),  # dropped
        (Packet(), PB),  # pa's address elsewhere: dropped, not pa's
    ]
    sizes = [len(build(p)) for p, _ in sent]
    for p, interface in sent:
        run_classifier(
            classifier.prog_fd, build(p), mark=p.mark, ingress_ifindex=INTERFACES[interface]
        )
    after = datapath.counters()
    assert dict(after.workloads) == {
        "pa": WorkloadCounters(
            marked=Traffic(packets=2, bytes=sizes[0] + sizes[3]),
            passed=Traffic(packets=1, bytes=sizes[1]),
            dropped=Traffic(packets=1, bytes=sizes[2]),
        ),
        "pb": WorkloadCounters(
            marked=Traffic(), passed=Traffic(), dropped=Traffic(packets=1, bytes=sizes[5])
        ),
    }
    # Rule counters live as long as the program (an array): compare growth.
    old = before.non_tcp.get(0, Traffic())
    assert set(after.non_tcp) == {0}
    assert after.non_tcp[0] == Traffic(packets=old.packets + 1, bytes=old.bytes + sizes[3])
    grew = {r: n - before.reasons[r] for r, n in after.reasons.items() if n != before.reasons[r]}
    assert grew == {
        Reason.MARKED: 1,
        Reason.NO_RULE: 1,
        Reason.FRAGMENT: 1,
        Reason.NON_TCP_MARKED: 1,
        Reason.NOT_TCP: 1,
        Reason.AH: 1,
        Reason.WRONG_INTERFACE: 1,
    }
    dropped = after.dropped()
    assert set(dropped) == {r for r, v in layout.REASON_VERDICT.items() if v is Verdict.DROP}
    assert dropped[Reason.WRONG_INTERFACE] - before.reasons[Reason.WRONG_INTERFACE] == 1
    assert datapath.workload_counters()["pa"] == (2, sizes[0] + sizes[3], 1, sizes[1])
    # A reload that changes the rule starts its count again; an unchanged one keeps it.
    datapath.update(policy)
    assert datapath.counters().non_tcp == after.non_tcp
    changed = dataclasses.replace(
        policy, intercept=(dataclasses.replace(policy.intercept[0], ports=()),)
    )
    datapath.update(changed)
    assert datapath.counters().non_tcp == {}
