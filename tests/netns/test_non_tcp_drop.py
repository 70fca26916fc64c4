"""``non_tcp: drop``: a workload's UDP and ICMP to a rule's destinations never
arrive, while DNS to an excepted resolver, replies to flows started from
outside and ICMP errors about them still pass. Judged where packets land: the
external host's UDP server log, a packet log on its interface, ping's answer.

Both datapaths, IPv4 and IPv6. The topology: pod ``app`` (a workload bound
to its interface, as Kubernetes pods are) and pod ``batch`` (a workload by
address only) send to the external host ``ext``; a real resolver (dnsmasq)
runs on the external host ``dns``, which the rule excepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Host, Lab
from egress_agent.lab.servers import start_server
from tests import harness
from tests.harness import Agent, wait_until
from tests.lab.sniff import read_packets, start_sniffer
from tests.lab.udp import start_udp_server

pytestmark = pytest.mark.netns

DNS_NAME = "backups.example.test"
DNS_ANSWER = "198.18.1.2"


@dataclass
class World(harness.World):
    datapath: str
    app: Host
    batch: Host
    ext: Host
    dns: Host
    agent: Agent

    @property
    def udp_log(self) -> Path:
        return self.work / "udp.jsonl"

    @property
    def packet_log(self) -> Path:
        return self.work / "packets.jsonl"


def _addr(host: Host, family: int) -> str:
    return str(host.ipv4 if family == 4 else host.ipv6)


def _listen(host: Host, port: int) -> list[str]:
    return [f"{host.ipv4}:{port}", f"[{host.ipv6}]:{port}"]


def _start_resolver(lab: Lab, host: Host, work: Path) -> None:
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={host.ipv4}",
        f"--listen-address={host.ipv6}",
        "--user=root",
        "--pid-file=",
        "--conf-file=/dev/null",
        f"--log-facility={work / 'dnsmasq.log'}",
        f"--host-record={DNS_NAME},{DNS_ANSWER}",
    ]
    proc = lab.popen(host.name, argv)

    def listening() -> bool:
        probe = lab.run(host.name, ["ss", "-Hlun", "sport", "= :53"], check=False).stdout
        if proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited with {proc.returncode}")
        return str(host.ipv4) in probe and str(host.ipv6) in probe

    wait_until(listening, timeout=10, what="dnsmasq listening on both addresses")


POLICY = """
version: 1
proxy: {{port: 15001, connect_timeout: 2}}
workloads:
  app: {{cidrs: [{app4}/32, "{app6}/128"], interfaces: [{app_if}]}}
  batch: {{cidrs: [{batch4}/32, "{batch6}/128"]}}
intercept:
  - from: [app, batch]
    except_cidrs: [{dns4}/32, "{dns6}/128"]
    non_tcp: drop
egress:
  - name: sink
    to: {{cidrs: [198.18.1.0/24, "fd00:18:1::/64"], ports: [9000]}}
    action: allow
default: deny
"""


@pytest.fixture(scope="module", params=["nft", "bpf"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    datapath: str = request.param
    work = tmp_path_factory.mktemp(f"non-tcp-{datapath}")
    with Lab() as lab:
        app = lab.add_pod("app", "198.19.1.2", "fd00:19:1::2")
        batch = lab.add_pod("batch", "198.19.4.2", "fd00:19:4::2")
        ext = lab.add_external("ext", "198.18.1.2", "fd00:18:1::2")
        dns = lab.add_external("dns", "198.18.2.2", "fd00:18:2::2")
        start_udp_server(lab, "ext", listen=_listen(ext, 5353), log=work / "udp.jsonl")
        start_sniffer(lab, "ext", log=work / "packets.jsonl")
        # Echo servers in the pods answer flows that the external host starts.
        start_udp_server(lab, "app", listen=_listen(app, 7), log=work / "app-udp.jsonl", echo=True)
        start_server(
            lab,
            "app",
            name="app-tcp",
            listen=_listen(app, 8080),
            tls=None,
            log=work / "app-tcp.jsonl",
        )
        _start_resolver(lab, dns, work)
        policy = work / "policy.yaml"
        policy.write_text(
            POLICY.format(
                app4=app.ipv4,
                app6=app.ipv6,
                app_if=app.node_ifname,
                batch4=batch.ipv4,
                batch6=batch.ipv6,
                dns4=dns.ipv4,
                dns6=dns.ipv6,
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
            yield World(
                lab=lab,
                work=work,
                datapath=datapath,
                app=app,
                batch=batch,
                ext=ext,
                dns=dns,
                agent=agent,
            )
        finally:
            agent.stop()


def _send_udp(world: World, pod: Host, family: int, port: int, text: str, count: int = 3) -> None:
    dst = _addr(world.ext, family)
    af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    world.python(
        pod.name,
        f"""
        import socket, time
        s = socket.socket({af}, socket.SOCK_DGRAM)
        for i in range({count}):
            s.sendto({text!r}.encode(), ({dst!r}, {port}))
            time.sleep(0.05)
        """,
    )


def _metric_lines(world: World, name: str) -> dict[str, float]:
    return {
        key: value
        for key, value in world.agent.metrics().items()
        if key.startswith(f"egress_agent_{name}{{") or key == f"egress_agent_{name}"
    }


def _non_tcp_drops(world: World) -> float:
    """Packets dropped by the non_tcp rules, from /metrics."""
    lines = _metric_lines(world, "dropped_packets_total")
    return sum(v for k, v in lines.items() if 'reason="non_tcp"' in k)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("pod", ["app", "batch"])
def test_udp_to_a_rule_destination_never_arrives(world: World, family: int, pod: str) -> None:
    host = world.app if pod == "app" else world.batch
    before = _non_tcp_drops(world)
    marker = f"udp-{world.datapath}-{pod}-{family}"
    _send_udp(world, host, family, 5353, marker)
    # Counted as dropped: they can no longer arrive.
    wait_until(
        lambda: _non_tcp_drops(world) >= before + 3,
        timeout=5,
        what="the datagrams counted as dropped",
    )
    got = [r for r in _read(world.udp_log) if r["data"] == marker]
    assert got == [], f"the external host received {got}"
    seen = [p for p in read_packets(world.packet_log) if p["src"] == _addr(host, family)]
    assert not [p for p in seen if 17 in p["protocols"]], seen


@pytest.mark.parametrize("family", [4, 6])
def test_ping_to_a_rule_destination_gets_no_reply(world: World, family: int) -> None:
    before = _non_tcp_drops(world)
    dst = _addr(world.ext, family)
    proc = world.lab.run(
        "app", ["ping", f"-{family}", "-c", "3", "-i", "0.2", "-W", "1", dst], check=False
    )
    assert proc.returncode != 0 and " 0 received" in proc.stdout, proc.stdout
    icmp = 1 if family == 4 else 58
    seen = [
        p
        for p in read_packets(world.packet_log)
        if p["src"] == _addr(world.app, family) and icmp in p["protocols"]
    ]
    assert seen == []
    assert _non_tcp_drops(world) >= before + 3


@pytest.mark.parametrize("family", [4, 6])
def test_dns_to_a_resolver_in_except_cidrs_is_answered(world: World, family: int) -> None:
    server = _addr(world.dns, family)
    af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    out = world.python(
        "app",
        f"""
        import socket
        from scapy.layers.dns import DNS, DNSQR
        s = socket.socket({af}, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(bytes(DNS(id=7, rd=1, qd=DNSQR(qname={DNS_NAME!r}))), ({server!r}, 53))
        answer = DNS(s.recv(4096))
        print(answer.an[0].rdata)
        """,
    )
    assert out.strip() == DNS_ANSWER


@pytest.mark.parametrize("family", [4, 6])
def test_reply_to_a_udp_flow_the_external_host_started_passes(world: World, family: int) -> None:
    pod = _addr(world.app, family)
    af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    out = world.python(
        "ext",
        f"""
        import socket
        s = socket.socket({af}, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"hello from outside", ({pod!r}, 7))
        print(s.recv(100).decode())
        """,
    )
    assert out.strip() == "hello from outside"


@pytest.mark.parametrize("family", [4, 6])
def test_port_unreachable_from_the_pod_reaches_the_sender(world: World, family: int) -> None:
    # The pod answers a datagram to a closed port with an ICMP error: it is
    # related to the external host's flow and passes.
    pod = _addr(world.app, family)
    af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    out = world.python(
        "ext",
        f"""
        import socket
        s = socket.socket({af}, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect(({pod!r}, 9))
        s.send(b"anyone?")
        try:
            s.recv(100)
            print("answered")
        except ConnectionRefusedError:
            print("refused")
        except TimeoutError:
            print("timeout")
        """,
    )
    assert out.strip() == "refused"


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_from_outside_to_the_pod_is_answered(world: World, family: int) -> None:
    # Every TCP port of the pod is intercepted: the pod's answers to a
    # connection the external host opened are not the pod's own new flows
    # and must still pass (they are never DNAT-ed).
    pod = _addr(world.app, family)
    af = "socket.AF_INET" if family == 4 else "socket.AF_INET6"
    out = world.python(
        "ext",
        f"""
        import socket
        s = socket.socket({af}, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(({pod!r}, 8080))
        s.sendall(b"ping\\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(len(data) > 0)
        """,
    )
    assert out.strip() == "True"


def test_counters_name_the_rule_that_dropped(world: World) -> None:
    _send_udp(world, world.batch, 4, 5353, "count-me", count=2)
    status = json.loads(
        world.python(
            "node",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15021/status').read().decode())",
        )
    )
    drops = status["drops"]
    assert drops["by_reason"]["non_tcp"] >= 2
    if world.datapath == "nft":
        per_rule = {r["rule"]: r["packets"] for r in drops["rules"] if r["reason"] == "non_tcp"}
        assert per_rule["intercept[0] from batch non_tcp"] >= 2
    else:
        # The classifier counts per intercept rule what it marked for dropping.
        assert status["bpf"]["non_tcp_marked"]["intercept[0]"] >= 2


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]
