"""The range the adversarial suite attacks, and how an attempt is judged.

One lab per test module (building it costs seconds, an attempt costs
milliseconds):

* ``pa`` (198.19.1.2, fd00:19:1::2): the attacker's pod, a workload bound to
  its own veth, whose traffic to the "internet" must go through the proxy;
* ``pn`` (198.19.2.2, fd00:19:2::2): a neighbouring pod, a workload bound to
  its own veth with nothing intercepted (the registry of the backup story);
* ``po`` (198.19.3.2, fd00:19:3::2): another neighbour under no policy at
  all; the attacker controls both neighbours too;
* ``inet`` (198.18.1.2, fd00:18:1::2): the target, a server that logs every
  connection (ports 443 and 9000) and a sniffer that logs every packet that
  arrives on its link, whoever it is for;
* ``dns`` (198.18.2.2, fd00:18:2::2): a host in the intercept rule's
  ``except_cidrs`` (the cluster resolver, say), with a sniffer as well.

The policy diverts all of pa's TCP to 198.18.0.0/15 and fd00:18::/32 except
the dns host, drops its non-TCP traffic there (``non_tcp: drop``), and lets
the proxy relay only port 9000. So from the target's side every outcome is
visible: a packet or a connection from pa's own address is a **leak**; a
connection from the node's address (the proxy's upstream) is **diverted**;
nothing at all is **dropped**.

The attacker runs pod_attacker.py inside the pod with every capability
dropped except CAP_NET_RAW (what container runtimes grant by default); the
test process crafts the frames with scapy. Settings real nodes have and
the attacks need are made in the lab's own namespaces only: reverse-path
filtering off in the node (as Cilium sets it) and jumbo frames on the links
(as on AWS pods). ``twin``, a lab of its own holding pa's addresses, tells
the ISN pa's kernel will use (see Range.seed_seq).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scapy.all import IP, TCP, Dot1AD, Dot1Q, Ether, IPv6, Packet, Raw, conf

from egress_agent.lab.netns import Host, Lab
from egress_agent.lab.servers import start_server
from tests.harness import Agent, wait_until

conf.verb = 0

HERE = Path(__file__).resolve().parent
ATTACKER = HERE / "pod_attacker.py"
SNIFFER = HERE / "target_sniffer.py"
CAP_NET_RAW = 13
TCP_MD5 = 19  # TCP option kind (RFC 2385)

DENIED_PORT = 443  # diverted, and the proxy refuses it: nothing reaches the target
ALLOWED_PORT = 9000  # diverted, and the proxy relays it from the node's address
PROXY_PORT = 15001
PROXY_V4 = "169.254.99.1"
PROXY_V6 = "fd65:6772:6573::1"
CONNECT_TIMEOUT = 3.0
MTU = 9001

POLICY = """\
version: 1
workloads:
  pa: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"], interfaces: [{pa_if}]}}
  pn: {{cidrs: [198.19.2.2/32, "fd00:19:2::2/128"], interfaces: [{pn_if}]}}
intercept:
  - from: [pa]
    to_cidrs: [198.18.0.0/15, "fd00:18::/32"]
    except_cidrs: [198.18.2.0/24, "fd00:18:2::/64"]
    non_tcp: drop
egress:
  - name: target-9000
    from: [pa]
    to: {{cidrs: [198.18.1.2/32, "fd00:18:1::2/128"], ports: [{allowed}]}}
    action: allow
default: deny
"""


def ip_header(family: str, src: str, dst: str, **kw: Any) -> Packet:
    return IP(src=src, dst=dst, **kw) if family == "ipv4" else IPv6(src=src, dst=dst, **kw)


def seed_syn(
    family: str,
    *,
    src: str,
    dst: str,
    sport: int,
    dport: int,
    data: bytes = b"",
    seq: int | None = None,
) -> Packet:
    """A SYN no host here accepts: a TCP-MD5 option with a key nobody has
    (a host without the key drops it silently, RFC 2385), so it can only
    ever seed conntrack."""
    tcp = TCP(
        sport=sport,
        dport=dport,
        flags="S",
        seq=random.getrandbits(32) if seq is None else seq,
        options=[("MSS", 1400), ("MD5", b"\x00" * 16)],
    )
    pkt = ip_header(family, src, dst) / tcp
    return pkt / Raw(data) if data else pkt


def segment(pkt: Packet) -> bytes:
    """The bytes above the IP header (checksums computed for its addresses),
    to be put behind other headers."""
    return bytes(pkt)[20 if IP in pkt else 40 :]


def endpoint(address: str, port: int) -> str:
    """``ip:port`` as the audit log and the lab server write it."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class LineProcess:
    """A helper process in a lab host that answers one JSON line per command."""

    def __init__(self, lab: Lab, host: str, argv: list[str], what: str) -> None:
        self.what = what
        self.proc = lab.popen(
            host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.hello = self._read(30)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"{self.what} gave no answer within {timeout}s")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer and "outcome" not in answer and "sent" not in answer:
            raise AssertionError(f"{self.what}: {cmd['op']} failed: {answer['error']}")
        return answer


@dataclass
class Mark:
    """Where every log stood when an attempt began."""

    sniffed: dict[str, int]
    server: int
    audit: int
    metrics: str


@dataclass
class Attempt:
    """What one attempt left at the target, in the proxy and in the counters."""

    pod: Host
    family: str
    arrived: list[dict[str, Any]]  # packets from the pod's own address at the target
    accepted: list[dict[str, Any]]  # connections the target's server accepted from it
    audit: list[dict[str, Any]]  # the proxy's records for the real connection
    real: dict[str, Any] | None  # the pod's view of its real kernel connection
    drops: float  # growth of the agent's drop counters

    def leaked(self) -> bool:
        return bool(self.arrived or self.accepted)

    def evidence(self) -> str:
        parts = []
        if self.accepted:
            peers = ", ".join(sorted({r["peer"] for r in self.accepted}))
            parts.append(f"the server accepted a connection from {peers}")
        if self.arrived:
            kinds = sorted({_describe(p) for p in self.arrived})
            parts.append(f"{len(self.arrived)} packet(s) from the pod arrived: {'; '.join(kinds)}")
        if self.real is not None:
            parts.append(f"the pod's connection: {self.real.get('outcome')}")
        return "; ".join(parts) or "nothing arrived"


def _describe(p: dict[str, Any]) -> str:
    proto = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6", 51: "AH", 44: "fragment"}.get(
        p["proto"], f"protocol {p['proto']}"
    )
    where = f" {p['sport']}->{p['dport']}" if "sport" in p else ""
    if "flags" in p:
        names = "".join(c for bit, c in enumerate("FSRPAUEC") if p["flags"] >> bit & 1)
        where += f" [{names}]"
    frag = " (fragment)" if p.get("frag") else ""
    return f"{proto}{where}{frag}"


@dataclass
class Range:
    lab: Lab
    work: Path
    pa: Host
    pn: Host
    po: Host
    inet: Host
    dns: Host
    attackers: dict[str, LineProcess] = field(default_factory=dict)
    node_probe: LineProcess | None = None
    twin: LineProcess | None = None
    sniff_logs: dict[str, Path] = field(default_factory=dict)
    server_log: Path | None = None
    agent: Agent | None = None
    datapath: str | None = None
    macs: dict[str, tuple[str, str]] = field(default_factory=dict)  # pod -> (own, gateway)
    _ports: Iterator[int] = field(
        default_factory=lambda: itertools.count(random.randrange(20000, 40000, 1000))
    )

    # -- addresses --------------------------------------------------------

    def next_port(self) -> int:
        """A source port no earlier attempt used: every attempt gets a fresh
        4-tuple, so conntrack entries of earlier attempts never interfere."""
        return next(self._ports)

    @staticmethod
    def addr(host: Host, family: str) -> str:
        return str(host.ipv4 if family == "ipv4" else host.ipv6)

    def node_addr(self, family: str) -> str:
        addr = self.inet.node_ipv4 if family == "ipv4" else self.inet.node_ipv6
        return str(addr)

    # -- the agent --------------------------------------------------------

    def start_agent(self, datapath: str) -> Agent:
        policy = self.work / "policy.yaml"
        policy.write_text(
            POLICY.format(
                pa_if=self.pa.node_ifname, pn_if=self.pn.node_ifname, allowed=ALLOWED_PORT
            )
        )
        self.agent = Agent(
            self.lab,
            policy=policy,
            audit=self.work / f"audit-{datapath}.jsonl",
            log=self.work / f"agent-{datapath}.log",
            extra_args=(
                "--datapath",
                datapath,
                "--bpf-pin-dir",
                f"/sys/fs/bpf/egress-{self.lab.prefix.rstrip('-')}",
            ),
        ).start()  # the harness bound: compiling the classifier under load takes a while
        self.datapath = datapath
        return self.agent

    def stop_agent(self) -> int:
        assert self.agent is not None
        code = self.agent.stop()
        self.agent = None
        return code

    def http(self, path: str) -> tuple[int, str]:
        assert self.node_probe is not None
        answer = self.node_probe.ask({"op": "get", "url": f"http://127.0.0.1:15021{path}"})
        return int(answer["status"]), str(answer["body"])

    def metrics(self) -> str:
        status, body = self.http("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    # -- the attacker -----------------------------------------------------

    def attack(self, pod: str, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return self.attackers[pod].ask(cmd, timeout)

    def l2(self, pod: str, pkt: Packet, *, tags: str = "") -> bytes:
        """``pkt`` in an Ethernet frame from ``pod`` to its gateway (the node's
        veth), with ``tags``: "" (none), "q" (802.1Q) or "adq" (802.1ad
        outer, 802.1Q inner); VLAN id 0, which the node strips (priority tags)
        and then processes the packet inside as untagged."""
        own, gw = self.macs[pod]
        eth = Ether(src=own, dst=gw)
        if tags == "q":
            return bytes(eth / Dot1Q(vlan=0) / pkt)
        if tags == "adq":
            return bytes(eth / Dot1AD(vlan=0, type=0x8100) / Dot1Q(vlan=0) / pkt)
        assert not tags
        return bytes(eth / pkt)

    def send_frames(self, pod: str, frames: list[bytes], **extra: Any) -> None:
        answer = self.attack(pod, {"op": "frames", "frames": [f.hex() for f in frames], **extra})
        assert answer.get("sent"), f"the attacker in {pod} could not send: {answer}"

    def seed_seq(self, family: str, port: int, *, ahead: bool = False) -> int:
        """A sequence number for a SYN that seeds (pa:port -> target:443):
        a quarter of the sequence space behind the ISN the pod's kernel will
        use on that 4-tuple (or ahead of it).

        Behind: the pod's real SYN re-initialises conntrack's window
        tracking (RFC 793 "sequence numbers larger than those recently
        used"), so the entry keeps only the seed's NAT decision, whatever
        the pod's ISN. Ahead: the real SYN falls in the seed's window
        without re-initialising it, and the connection's later segments
        look out of window to conntrack.

        The ISN is read in ``twin``, a namespace of its own with pa's
        addresses: Linux keys the ISN hash per boot, not per namespace. An
        attacker in the pod learns the same from a connection of its own on
        the 4-tuple and waits for its conntrack entry to expire; the twin
        keeps this suite from waiting.
        """
        assert self.twin is not None
        answer = self.twin.ask(
            {
                "op": "isn",
                "src": self.addr(self.pa, family),
                "dst": self.addr(self.inet, family),
                "port": DENIED_PORT,
                "src_port": port,
            }
        )
        isn_now = answer["isn"] + (time.time_ns() - answer["t_ns"]) // 64
        return (isn_now + (1 << 30 if ahead else -(1 << 30))) % (1 << 32)

    def connect(
        self, family: str, port: int, *, src_port: int | None = None, pod: str = "pa", **extra: Any
    ) -> dict[str, Any]:
        host = self.lab.hosts[pod]
        cmd = {
            "op": "connect",
            "src": self.addr(host, family),
            "dst": self.addr(self.inet, family),
            "port": port,
            "timeout": CONNECT_TIMEOUT,
            **extra,
        }
        if src_port is not None:
            cmd["src_port"] = src_port
        return self.attack(pod, cmd)

    # -- judging ----------------------------------------------------------

    def mark(self) -> Mark:
        assert self.agent is not None and self.server_log is not None
        return Mark(
            sniffed={name: _size(path) for name, path in self.sniff_logs.items()},
            server=_size(self.server_log),
            audit=_size(self.agent.audit),
            metrics=self.metrics(),
        )

    def sniffed(self, mark: Mark, host: str = "inet") -> list[dict[str, Any]]:
        return _lines(self.sniff_logs[host], mark.sniffed[host])

    def arrived_from(self, mark: Mark, address: str, host: str = "inet") -> list[dict[str, Any]]:
        return [p for p in self.sniffed(mark, host) if p.get("src") == address]

    def accepted_from(self, mark: Mark, address: str) -> list[dict[str, Any]]:
        assert self.server_log is not None
        return [
            r
            for r in _lines(self.server_log, mark.server)
            if r["peer"].rsplit(":", 1)[0].strip("[]") == address
        ]

    def audit_since(self, mark: Mark) -> list[dict[str, Any]]:
        assert self.agent is not None
        return _lines(self.agent.audit, mark.audit)

    def judge(
        self,
        mark: Mark,
        *,
        family: str,
        pod: Host | None = None,
        real: dict[str, Any] | None = None,
        src_port: int | None = None,
        ignore_seeds: bool = False,
    ) -> Attempt:
        """What the attempt begun at ``mark`` achieved, from the target's side.

        ``ignore_seeds``: packets with a TCP-MD5 option (the attacker's crafted
        first packets, which no host here accepts) do not count; for a seed
        sent by a pod that is under no policy, whose own packets go anywhere."""
        pod = pod or self.pa
        try:
            self.barrier(family)
        except AssertionError as exc:
            left = self._attempt(mark, family, pod, real, src_port, ignore_seeds)
            raise AssertionError(f"{exc}; what the attempt left: {left.evidence()}") from None
        return self._attempt(mark, family, pod, real, src_port, ignore_seeds)

    def _attempt(
        self,
        mark: Mark,
        family: str,
        pod: Host,
        real: dict[str, Any] | None,
        src_port: int | None,
        ignore_seeds: bool,
    ) -> Attempt:
        address = self.addr(pod, family)
        audit = []
        if src_port is not None:
            want = endpoint(address, src_port)
            audit = [r for r in self.audit_since(mark) if r.get("src") == want]
        arrived = self.arrived_from(mark, address)
        if src_port is not None:
            # This attempt's 4-tuple (and fragments, which carry no ports);
            # not an earlier attempt's stragglers.
            arrived = [p for p in arrived if p.get("sport", src_port) == src_port]
        if ignore_seeds:
            arrived = [p for p in arrived if TCP_MD5 not in p.get("opts", ())]
        return Attempt(
            pod=pod,
            family=family,
            arrived=arrived,
            accepted=self.accepted_from(mark, address),
            audit=audit,
            real=real,
            drops=drop_total(self.metrics()) - drop_total(mark.metrics),
        )

    def barrier(self, family: str) -> dict[str, Any]:
        """After an attempt, what it left is all written down once one more
        legitimate diverted connection of pa is: make one and wait for its
        audit record, for the target server's record of it and for the
        sniffer's record of its last packet. The proxy, the server and the
        sniffer each write in the order things reach them, and stragglers
        of the attempt were sent before the barrier began. Returns the
        barrier's audit record (a test that counts records since a mark
        counts it too)."""
        assert self.agent is not None and self.server_log is not None
        audit, server, sniffed = self.agent.audit, self.server_log, self.sniff_logs["inet"]
        start = (_size(audit), _size(server), _size(sniffed))
        result = self.connect(family, ALLOWED_PORT)
        node = self.node_addr(family)
        src = endpoint(*result["local"]) if result.get("local") else "?"
        if result["outcome"] != "replied" or seen_peer(result["reply"]) != node:
            raise AssertionError(
                f"after the attempt a legitimate connection of pa ({src}) to "
                f"{self.addr(self.inet, family)}:{ALLOWED_PORT} did not reach the target "
                f"through the proxy (from {node}): {result}"
            )
        upstream = result["reply"].split(" saw ", 1)[1].strip()  # the proxy's socket
        upstream_port = int(upstream.rsplit(":", 1)[1])
        record = wait_until(
            lambda: next((r for r in _lines(audit, start[0]) if r.get("src") == src), None),
            timeout=10,
            what=f"the audit record of the barrier connection from {src}",
        )
        wait_until(
            lambda: any(r["peer"] == upstream for r in _lines(server, start[1])),
            timeout=10,
            what=f"the target server's record of the barrier connection from {upstream}",
        )
        wait_until(
            lambda: any(
                p.get("src") == node
                and p.get("sport") == upstream_port
                and p.get("flags", 0) & 0x5  # FIN or RST
                for p in _lines(sniffed, start[2])
            ),
            timeout=10,
            what=f"the sniffer's record of the barrier connection's FIN or RST from {upstream}",
        )
        return record

    def assert_still_serving(self, family: str) -> None:
        """The agent is alive and still diverts and relays a legitimate
        connection of the pod (the target sees the node's address), and
        audits it."""
        assert self.agent is not None and self.agent.proc is not None
        assert self.agent.proc.poll() is None, (
            f"the agent exited ({self.agent.proc.returncode}) after the attempt:\n"
            + self.agent.log.read_text()[-3000:]
        )
        status, _ = self.http("/healthz")
        assert status == 200, f"the agent's /healthz answered {status} after the attempt"
        mark = self.mark()
        result = self.connect(family, ALLOWED_PORT)
        node = self.node_addr(family)
        assert result["outcome"] == "replied" and seen_peer(result["reply"]) == node, (
            f"after the attempt a legitimate diverted connection of pa to "
            f"{self.addr(self.inet, family)}:{ALLOWED_PORT} did not reach the target "
            f"through the proxy (from {node}): {result}"
        )
        src = endpoint(result["local"][0], result["local"][1])
        record = wait_until(
            lambda: next((r for r in self.audit_since(mark) if r.get("src") == src), None),
            timeout=10,
            what=f"an audit record for the legitimate connection from {src}",
        )
        assert record["verdict"] == "allow", (
            f"no allow audit record for the legitimate connection from {src}: {record}"
        )


def assert_held(attempt: Attempt, finding: str, *, datapath: str, accounted: bool = True) -> None:
    """Nothing from the pod's own address reached the target; and the agent
    says what happened: the proxy audited the real connection (it was
    diverted) or a drop counter grew (it was dropped)."""
    assert not attempt.leaked(), f"[{datapath}] {finding}: {attempt.evidence()}"
    if accounted:
        assert attempt.audit or attempt.drops > 0, (
            f"[{datapath}] held, but the agent cannot say how: no audit record for the "
            f"pod's connection and no drop counter grew ({attempt.evidence()})"
        )


def seen_peer(reply: str) -> str | None:
    """The peer address in the lab server's answer ``NAME <local> saw <peer>``."""
    if " saw " not in reply:
        return None
    return reply.split(" saw ", 1)[1].strip().rsplit(":", 1)[0].strip("[]")


def drop_total(metrics: str) -> float:
    """Everything the agent says it dropped: every sample of every metric
    family whose name mentions a drop."""
    return sum(families(metrics, "drop").values())


def families(metrics: str, word: str) -> dict[str, float]:
    """Each metric family whose name contains ``word``, with the sum of its
    samples (any breakdown by label adds up to the family's total)."""
    totals: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if word in name:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _lines(path: Path, offset: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    out = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _mac(lab: Lab, host: str, ifname: str) -> str:
    links = json.loads(lab.run(host, ["ip", "-j", "link", "show", ifname]).stdout)
    return str(links[0]["address"])


NODE_PROBE = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            with urllib.request.urlopen(cmd["url"], timeout=10) as r:
                out = {"status": r.status, "body": r.read().decode()}
        except urllib.error.HTTPError as exc:
            out = {"status": exc.code, "body": exc.read().decode()}
        except OSError as exc:
            out = {"status": 0, "body": str(exc)}
        print(json.dumps(out), flush=True)
    """
)


@contextlib.contextmanager
def build_range(work: Path) -> Iterator[Range]:
    """The lab, servers, sniffers and attackers (no agent yet); all removed after."""
    with Lab() as lab, Lab() as twin_lab:
        pa = lab.add_pod("pa", "198.19.1.2", "fd00:19:1::2")
        pn = lab.add_pod("pn", "198.19.2.2", "fd00:19:2::2")
        po = lab.add_pod("po", "198.19.3.2", "fd00:19:3::2")
        inet = lab.add_external("inet", "198.18.1.2", "fd00:18:1::2")
        dns = lab.add_external("dns", "198.18.2.2", "fd00:18:2::2")
        rng = Range(lab=lab, work=work, pa=pa, pn=pn, po=po, inet=inet, dns=dns)
        # Jumbo frames, as pods get them on AWS (the VPC CNI gives them an MTU
        # of 9001): an AF_PACKET frame longer than a page is what the kernel
        # builds as a non-linear skb (net/packet/af_packet.c,
        # packet_alloc_skb), and a 1500-byte link could not carry one.
        for host in (pa, pn, po, inet, dns):
            lab.run("node", ["ip", "link", "set", "dev", host.node_ifname, "mtu", str(MTU)])
            lab.run(host.name, ["ip", "link", "set", "dev", host.ifname, "mtu", str(MTU)])
        # Reverse-path filtering off, as Cilium sets it on nodes (Calico and
        # others choose per interface). Loose mode would not do here: on an
        # interface without an IPv4 address (the lab's pod veths, like
        # Calico's) the kernel treats any source it does not route back
        # through that interface as martian (net/ipv4/fib_frontend.c,
        # __fib_validate_source: no_addr -> last_resort). IPv6 has no such
        # filter at all. Only the lab node's namespace is changed.
        confs = lab.run("node", ["ls", "/proc/sys/net/ipv4/conf"]).stdout.split()
        lab.run(
            "node",
            ["sysctl", "-q", "-w", *[f"net.ipv4.conf.{c}.rp_filter=0" for c in confs]],
        )
        # The pod may send data in its SYNs (cookie-less TCP Fast Open
        # client): a pod's own sysctl, as a pod spec may set it.
        lab.run("pa", ["sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=5"])
        rng.server_log = work / "server.jsonl"
        listen = [f"{inet.ipv4}:{p}" for p in (DENIED_PORT, ALLOWED_PORT)]
        listen += [f"[{inet.ipv6}]:{p}" for p in (DENIED_PORT, ALLOWED_PORT)]
        start_server(lab, "inet", name="inet", listen=listen, tls=None, log=rng.server_log)
        for host in ("inet", "dns"):
            log = work / f"sniffed-{host}.jsonl"
            proc = lab.popen(
                host,
                [sys.executable, str(SNIFFER), str(log)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY", f"the sniffer in {host} did not start"
            rng.sniff_logs[host] = log
        for pod in (pa, pn, po):
            rng.macs[pod.name] = (
                _mac(lab, pod.name, pod.ifname),
                _mac(lab, "node", pod.node_ifname),
            )
            # Root in the pod's namespace, but with CAP_NET_RAW alone.
            argv = ["setpriv", "--bounding-set=-all,+net_raw", "--inh-caps=-all"]
            argv += [sys.executable, "-u", str(ATTACKER)]
            attacker = LineProcess(lab, pod.name, argv, f"the attacker in {pod.name}")
            assert attacker.hello["cap_eff"] == 1 << CAP_NET_RAW, (
                f"the attacker in {pod.name} has capabilities {attacker.hello['cap_eff']:#x}, "
                "not CAP_NET_RAW alone"
            )
            rng.attackers[pod.name] = attacker
        # The twin: pa's addresses in a lab of their own (see Range.seed_seq).
        twin_lab.add_pod("twin", str(pa.ipv4), str(pa.ipv6))
        rng.twin = LineProcess(
            twin_lab, "twin", [sys.executable, "-u", str(ATTACKER)], "the ISN reader"
        )
        rng.node_probe = LineProcess(
            lab, "node", [sys.executable, "-u", "-c", NODE_PROBE], "the node's status probe"
        )
        yield rng
