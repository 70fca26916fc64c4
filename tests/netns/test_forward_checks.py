"""Packets a pod crafts to get workload TCP around the proxy, and the checks
that hold them: the reverse-path check before conntrack, the ``forward``
chain's "TCP that was not DNAT-ed" and "AH" drops. Written from the
attacker's side with scapy (a pod has CAP_NET_RAW by default) and judged
from the target's side: the server's log of who connected, and a packet log
on the external host's interface.

Pods: ``app`` is a workload bound to its interface (as discovered Kubernetes
pods are, so its interface is reverse-path checked); ``batch`` is a workload
by address only (no reverse-path check: the forward checks must hold alone);
``intruder`` and ``registry`` are no workloads, and only ``registry``'s
interface is named under ``reverse_path``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from egress_agent.lab.netns import Host, Lab
from egress_agent.lab.servers import start_server
from tests import harness
from tests.harness import Agent, wait_until
from tests.lab.sniff import read_packets, start_sniffer
from tests.lab.udp import start_udp_server

pytestmark = pytest.mark.netns

SERVER_PORT = 9000
BARRIER_PORT = 43001  # the source port of the barrier datagrams

POLICY = """
version: 1
proxy: {{port: 15001, connect_timeout: 2}}
workloads:
  app: {{cidrs: [{app4}/32, "{app6}/128"], interfaces: [{app_if}]}}
  batch: {{cidrs: [{batch4}/32, "{batch6}/128"]}}
intercept:
  - from: [app, batch]
    ports: [{port}]
reverse_path: {{interfaces: ["{registry_pattern}"]}}
egress:
  - name: sink
    to: {{cidrs: [198.18.1.0/24, "fd00:18:1::/64"], ports: [{port}]}}
    action: allow
default: deny
"""


@dataclass
class World(harness.World):
    datapath: str
    hosts: dict[str, Host]
    agent: Agent

    @property
    def ext(self) -> Host:
        return self.hosts["ext"]

    def gateway_mac(self, pod: str) -> str:
        ifname = self.hosts[pod].node_ifname
        return self.lab.run("node", ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()

    def send_frame(self, pod: str, packet: str, *more: str) -> None:
        """Send scapy packet expressions from the pod's eth0, each as one
        frame to the node, in order (a layer-3 send would route a packet to
        the pod's own address back into the pod)."""
        mac = self.gateway_mac(pod)
        frames = ", ".join(f"Ether(dst={mac!r}) / ({p})" for p in (packet, *more))
        self.python(
            pod,
            f"""
            from scapy.all import AH, IP, UDP, Ether, IPv6, TCP, conf, sendp
            from scapy.all import in4_chksum, in6_chksum, raw
            conf.verb = 0
            sendp([{frames}], iface="eth0")
            """,
        )

    def send_then_barrier(self, pod: str, family: int, packet: str) -> None:
        """Send ``packet`` from ``pod``, then a datagram from the pod's own
        address to the external host right behind it, and wait until that
        datagram arrived: the node handled the frames of one interface in
        order, so ``packet`` has been through its checks (and conntrack) by
        then."""
        marker = f"barrier-{uuid.uuid4().hex[:12]}"
        own, ext = _addr(self.hosts[pod], family), _addr(self.ext, family)
        udp = _ip(family, own, ext) + f" / UDP(sport={BARRIER_PORT}, dport=5353) / {marker!r}"
        self.send_frame(pod, packet, udp)
        self.wait_datagram(marker)

    def wait_datagram(self, marker: str) -> None:
        wait_until(
            lambda: marker in [r["data"] for r in _udp_log(self)],
            timeout=10,
            what=f"the datagram {marker!r} at the external host",
        )

    def connect_from(self, pod: str, family: int, sport: int) -> str:
        """A kernel TCP connect() from the pod on a chosen source port; then,
        from the same script, a datagram of the pod's own to the external
        host, whose arrival in the UDP server's log and in the packet log is
        waited for: what the connection sent has arrived by then, or never
        will."""
        src = _addr(self.hosts[pod], family)
        dst = _addr(self.ext, family)
        af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
        marker = f"barrier-{uuid.uuid4().hex[:12]}"

        def logged() -> int:
            return sum(
                1
                for p in self.packets_from(src)
                if p.get("sport") == BARRIER_PORT and p.get("dport") == 5353
            )

        before = logged()
        result = self.python(
            pod,
            f"""
            import socket
            s = socket.socket({af}, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(({src!r}, {sport}))
            s.settimeout(3)
            try:
                s.connect(({dst!r}, {SERVER_PORT}))
                s.sendall(b"hello\\n")
                s.shutdown(socket.SHUT_WR)
                print("connected", s.recv(100))
            except OSError as exc:
                print("failed", exc)
            s.close()
            u = socket.socket({af}, socket.SOCK_DGRAM)
            u.bind(({src!r}, {BARRIER_PORT}))
            u.sendto({marker!r}.encode(), ({dst!r}, 5353))
            """,
        ).strip()
        self.wait_datagram(marker)
        wait_until(
            lambda: logged() > before,
            timeout=10,
            what=f"the packet log's record of {pod}'s barrier datagram",
        )
        return result

    def server_peers(self) -> list[str]:
        return [r["peer"].rsplit(":", 1)[0].strip("[]") for r in self.server_log("server")]

    def packets_from(self, address: str) -> list[dict[str, object]]:
        return [p for p in read_packets(self.work / "packets.jsonl") if p["src"] == address]

    def dropped(self, reason: str) -> float:
        """Packets dropped for ``reason`` (in the BPF datapath the classifier
        drops some packets before nftables sees them: its reason counts too)."""
        reasons = {reason}
        if self.datapath == "bpf":
            reasons.add(_CLASSIFIER_REASON.get(reason, reason))
        return sum(
            value
            for name, value in self.agent.metrics().items()
            if name.startswith("egress_agent_dropped_packets_total{")
            and any(f'reason="{r}"' in name for r in reasons)
        )


# The classifier's reason for what nftables would drop later.
_CLASSIFIER_REASON = {"reverse_path": "bpf_wrong_interface", "ah": "bpf_ah"}


def _addr(host: Host, family: int) -> str:
    return str(host.ipv4 if family == 4 else host.ipv6)


def _ip(family: int, src: str, dst: str, extra: str = "") -> str:
    layer = "IP" if family == 4 else "IPv6"
    return f"{layer}(src={src!r}, dst={dst!r}{extra})"


@pytest.fixture(scope="module", params=["nft", "bpf"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    datapath: str = request.param
    work = tmp_path_factory.mktemp(f"forward-{datapath}")
    with Lab() as lab:
        hosts = {
            "app": lab.add_pod("app", "198.19.1.2", "fd00:19:1::2"),
            "batch": lab.add_pod("batch", "198.19.4.2", "fd00:19:4::2"),
            "intruder": lab.add_pod("intruder", "198.19.5.2", "fd00:19:5::2"),
            "registry": lab.add_pod("registry", "198.19.3.2", "fd00:19:3::2"),
            "ext": lab.add_external("ext", "198.18.1.2", "fd00:18:1::2"),
        }
        ext = hosts["ext"]
        start_server(
            lab,
            "ext",
            name="ext",
            listen=[f"{ext.ipv4}:{SERVER_PORT}", f"[{ext.ipv6}]:{SERVER_PORT}"],
            tls=None,
            log=work / "server.jsonl",
        )
        start_udp_server(
            lab, "ext", listen=[f"{ext.ipv4}:5353", f"[{ext.ipv6}]:5353"], log=work / "udp.jsonl"
        )
        start_sniffer(lab, "ext", log=work / "packets.jsonl")
        app, batch = hosts["app"], hosts["batch"]
        registry_if = hosts["registry"].node_ifname
        policy = work / "policy.yaml"
        policy.write_text(
            POLICY.format(
                app4=app.ipv4,
                app6=app.ipv6,
                app_if=app.node_ifname,
                batch4=batch.ipv4,
                batch6=batch.ipv6,
                port=SERVER_PORT,
                # A wildcard, as a user names a CNI's interfaces ("cali*").
                registry_pattern=registry_if[:-2] + "*",
            )
        )
        agent = Agent(
            lab,
            policy=policy,
            audit=work / "audit.jsonl",
            log=work / "agent.log",
            extra_args=("--datapath", datapath),
        ).start(timeout=120)
        try:
            yield World(lab=lab, work=work, datapath=datapath, hosts=hosts, agent=agent)
        finally:
            agent.stop()


# Distinct source ports per case: conntrack entries outlive a test.
_SPORTS = {("app", 4): 41001, ("app", 6): 41002, ("batch", 4): 41003, ("batch", 6): 41004}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("pod", ["app", "batch"])
def test_reply_direction_preseed_never_lets_the_pod_reach_the_server(
    world: World, pod: str, family: int
) -> None:
    """A SYN that claims to come from the server, sent by the pod itself,
    leaves a conntrack entry whose reply direction is the pod's next
    connection on the same ports: NAT is never decided for it. The TCP-MD5
    option makes the pod's kernel drop the SYN silently."""
    sport = _SPORTS[(pod, family)] + (100 if world.datapath == "bpf" else 0)
    pod_addr, server = _addr(world.hosts[pod], family), _addr(world.ext, family)
    forged = _ip(family, server, pod_addr) + (
        f" / TCP(sport={SERVER_PORT}, dport={sport}, flags='S', seq=1000,"
        " options=[('MD5', b'\\x00' * 16)])"
    )
    seen = len(world.server_peers())
    world.send_then_barrier(pod, family, forged)
    result = world.connect_from(pod, family, sport)
    if result.startswith("connected"):  # the server logs a connection when it ends
        wait_until(
            lambda: len(world.server_peers()) > seen,
            timeout=10,
            what="the server's record of the connection",
        )
    assert pod_addr not in world.server_peers(), result
    syns = [p for p in world.packets_from(pod_addr) if p.get("dport") == SERVER_PORT]
    assert syns == [], f"{result}; the server's interface saw {syns}"
    if pod == "app":
        # Its interface is reverse-path checked: the forged SYN never made an
        # entry, so the connection was diverted and the server saw the proxy.
        assert result.startswith("connected"), result


@pytest.mark.parametrize("family", [4, 6])
def test_neighbour_preseed_in_the_original_direction_is_not_forwarded(
    world: World, family: int
) -> None:
    """Another pod sends the first SYN of app's 4-tuple, with app's address:
    app's identity is bound to its own interface, so that SYN claims an
    identity it does not have. It is dropped where it arrives (the classifier
    at tc ingress, nftables' spoofed-source rule before conntrack), so it
    leaves no entry, and app's real connection on that 4-tuple is diverted."""
    sport = 42000 + family + (100 if world.datapath == "bpf" else 0)
    app, server = _addr(world.hosts["app"], family), _addr(world.ext, family)
    before = world.dropped("spoofed_source")
    forged = _ip(family, app, server) + (
        f" / TCP(sport={sport}, dport={SERVER_PORT}, flags='S', seq=5000,"
        " options=[('MD5', b'\\x00' * 16)])"
    )
    seen = len(world.server_peers())
    world.send_then_barrier("intruder", family, forged)
    result = world.connect_from("app", family, sport)
    if result.startswith("connected"):  # the server logs a connection when it ends
        wait_until(
            lambda: len(world.server_peers()) > seen,
            timeout=10,
            what="the server's record of the connection",
        )
    assert app not in world.server_peers(), result
    assert result.startswith("connected"), result
    if world.datapath == "nft":
        assert world.dropped("spoofed_source") > before


@pytest.mark.parametrize("family", [4, 6])
def test_spoofed_source_from_a_neighbour_interface_is_dropped(world: World, family: int) -> None:
    app, registry, server = (
        _addr(world.hosts["app"], family),
        _addr(world.hosts["registry"], family),
        _addr(world.ext, family),
    )
    before = world.dropped("reverse_path")
    marker = f"spoof-{world.datapath}-{family}"
    # The spoofed datagram, then a control: the same datagram with registry's
    # own address. Once the control arrived, the spoofed one would have.
    for src, text in ((app, marker), (registry, marker + "-own")):
        world.send_frame(
            "registry", _ip(family, src, server) + f" / UDP(sport=43000, dport=5353) / {text!r}"
        )
    wait_until(
        lambda: marker + "-own" in [r["data"] for r in _udp_log(world)],
        timeout=5,
        what="the control datagram arrived",
    )
    received = [r["data"] for r in _udp_log(world)]
    assert marker not in received
    wait_until(
        lambda: world.dropped("reverse_path") >= before + 1,
        timeout=5,
        what="the spoofed datagram counted as dropped",
    )


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_behind_ah_from_a_pod_is_dropped(world: World, family: int) -> None:
    """nftables' `meta l4proto` stops at AH (and so does `tcp dport`), while
    conntrack tracks the TCP behind it: such a SYN is never diverted."""
    batch, server = _addr(world.hosts["batch"], family), _addr(world.ext, family)
    before = world.dropped("ah")
    extra = ", proto=51" if family == 4 else ", nh=51"
    # AH is 24 bytes with its 12-byte ICV (payloadlen 4, RFC 4302 2.2); scapy
    # leaves the TCP checksum at zero behind AH: compute it over the
    # pseudo-header of the addresses, so that conntrack takes it for TCP.
    tcp = f"TCP(sport=44000, dport={SERVER_PORT}, flags='S')"
    checksum = f"in{family}_chksum(6, {_ip(family, batch, server)}, raw({tcp}))"
    packet = _ip(family, batch, server, extra) + (
        " / AH(nh=6, payloadlen=4, spi=0x100, seq=1, icv=b'\\x00' * 12)"
        f" / TCP(sport=44000, dport={SERVER_PORT}, flags='S', chksum={checksum})"
    )
    world.send_frame("batch", packet)
    wait_until(
        lambda: world.dropped("ah") >= before + 1, timeout=5, what="the SYN behind AH dropped"
    )
    behind_ah = [p for p in world.packets_from(batch) if 51 in p["protocols"]]
    assert behind_ah == []


def _udp_log(world: World) -> list[dict[str, str]]:
    import json

    try:
        text = (world.work / "udp.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]
