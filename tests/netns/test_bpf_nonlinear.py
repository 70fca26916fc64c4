"""A packet whose headers are not in the linear part of the skb cannot walk
around the BPF classifier.

The attacker is a pod with ``CAP_NET_RAW`` (container runtimes grant it). It
sends through an ``AF_PACKET`` socket with a transmit ring and
``PACKET_VNET_HDR``: a ``virtio_net_hdr`` with ``hdr_len`` 14 makes the
kernel copy only the Ethernet header into the skb's linear part
(net/packet/af_packet.c, ``tpacket_snd``/``tpacket_fill_skb``); the IP and
TCP headers stay in page fragments, the veth hands the skb over as it is,
and a classifier that reads only the linear part sees a frame of 14 bytes.

The packet is a conntrack pre-seed: a bare ACK with a TCP-MD5 option (the
server, which has no MD5 key, drops it silently) for the 4-tuple of the
pod's next connection. With ``nf_conntrack_tcp_loose`` (the default) it
makes a conntrack entry, and NAT is decided once, for that first packet; the
pod's real ``connect()`` from the same port then reuses the entry. Were the
ACK not marked, that connection would go out directly; marked (or dropped),
the connection reaches the proxy. Judged from the server's side: the server
must see the node's address (the proxy's upstream), never the pod's.
"""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from tests.harness import Agent, Audit, status_page, wait_until

pytestmark = pytest.mark.netns

POD_V4, POD_V6 = "198.19.1.2", "fd00:19:1::2"
SERVER_V4, SERVER_V6 = "198.18.1.2", "fd00:18:1::2"
NODE_V4, NODE_V6 = "198.18.1.1", "fd00:18:1::1"  # the node's side of the server's subnet
PORT = 9000

POLICY = f"""\
version: 1
workloads:
  pa: {{cidrs: [{POD_V4}/32, "{POD_V6}/128"]}}
intercept:
  - from: [pa]
    ports: [{PORT}]
default: allow
"""

# Runs in the pod: one non-linear pre-seed; prints how many bytes went out.
ATTACK = r"""
import json, mmap, socket, struct, sys, time
from scapy.all import IP, TCP, Ether, IPv6, raw

src, dst, port, sport, node_mac, how = sys.argv[1:7]
port, sport = int(port), int(sport)
six = ":" in dst
l3 = (IPv6(src=src, dst=dst) if six else IP(src=src, dst=dst))
md5 = (19, b"\x00" * 16)  # TCP-MD5 signature option (RFC 2385), kind 19
frame = raw(
    Ether(dst=node_mac, src=open("/sys/class/net/eth0/address").read().strip())
    / l3
    / TCP(sport=sport, dport=port, flags="A", seq=1000, ack=2000, options=[md5])
)

SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, PACKET_VNET_HDR = 263, 10, 13, 15
TPACKET_V2, TP_STATUS_SEND_REQUEST = 1, 1
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
if how == "linear":  # the same frame through send(): all of it in the linear part
    s.bind(("eth0", 0))
    sent = s.send(frame)
else:
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # before the ring: -EBUSY after
    s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    s.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack("IIII", 4096, 1, 2048, 2))
    s.bind(("eth0", 0))
    ring = mmap.mmap(s.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # struct virtio_net_hdr: no checksum offload, no GSO, hdr_len 14: only
    # the Ethernet header is copied into the linear part.
    vnet = struct.pack("=BBHHHH", 0, 0, 14, 0, 0, 0)
    data = vnet + frame
    # TPACKET_V2: a frame's data starts at TPACKET2_HDRLEN - sizeof(sockaddr_ll) = 32.
    ring[32 : 32 + len(data)] = data
    struct.pack_into("=I", ring, 4, len(data))  # tp_len
    struct.pack_into("=I", ring, 0, TP_STATUS_SEND_REQUEST)  # tp_status
    sent = s.send(b"")
    deadline = time.monotonic() + 5
    while struct.unpack_from("=I", ring, 0)[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel sets tp_status back once it sent the frame
print(json.dumps({"sent": sent}))
"""

# Runs in the pod: a real connection from the pre-seed's port; prints the
# address the server says it saw.
CONNECT = r"""
import json, socket, sys

src, dst, port, sport = sys.argv[1:5]
port, sport = int(port), int(sport)
six = ":" in dst
fam = socket.AF_INET6 if six else socket.AF_INET
c = socket.socket(fam, socket.SOCK_STREAM)
c.settimeout(5)
c.bind((src, sport))
try:
    c.connect((dst, port))
    c.sendall(b"hi\n")
    reply = c.makefile().readline()
    saw = reply.split(" saw ")[1].rsplit(":", 1)[0].strip("[]")
except OSError as exc:
    saw = "error: %s" % exc
print(json.dumps({"saw": saw}))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("nonlinear")
    with Lab() as lab:
        lab.add_pod("pa", POD_V4, POD_V6)
        lab.add_external("xa", SERVER_V4, SERVER_V6)
        start_server(
            lab,
            "xa",
            name="xa",
            listen=[f"{SERVER_V4}:{PORT}", f"[{SERVER_V6}]:{PORT}"],
            tls=None,
            log=work / "xa.jsonl",
        )
        yield lab


def _status(lab: Lab) -> dict[str, object]:
    status: dict[str, object] = json.loads(status_page(lab, "/status"))
    return status


def _marked(lab: Lab) -> int:
    bpf = _status(lab)["bpf"]
    assert isinstance(bpf, dict)
    return int(bpf["reasons"]["marked"])


@pytest.mark.timeout(300)  # an agent compiling its classifier on a loaded machine takes minutes
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("how", ["linear", "non-linear"])
def test_a_pre_seed_cannot_take_a_connection_around_the_proxy(
    world: Lab, tmp_path: Path, family: int, how: str
) -> None:
    lab = world
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    agent = Agent(
        lab,
        policy=policy,
        audit=tmp_path / "audit.jsonl",
        log=tmp_path / "agent.log",
        extra_args=(
            "--datapath",
            "bpf",
            "--bpf-pin-dir",
            f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}",
        ),
    ).start()
    try:
        node_if = lab.hosts["pa"].node_ifname
        node_mac = lab.run("node", ["cat", f"/sys/class/net/{node_if}/address"]).stdout.strip()
        src, dst, node = (
            (POD_V4, SERVER_V4, NODE_V4) if family == 4 else (POD_V6, SERVER_V6, NODE_V6)
        )
        sport = random.randint(20000, 30000)
        marked = _marked(lab)
        out = lab.run(
            "pa",
            [
                sys.executable,
                "-c",
                textwrap.dedent(ATTACK),
                src,
                dst,
                str(PORT),
                str(sport),
                node_mac,
                how,
            ],
            timeout=60,
        )
        assert json.loads(out.stdout.strip().splitlines()[-1])["sent"] > 0  # the frame went out
        # The classifier has seen the pre-seed (and conntrack, right behind
        # it on the same path, made its entry) before the real connection.
        wait_until(
            lambda: _marked(lab) > marked,
            timeout=10,
            what="the classifier's count of marked packets grown by the pre-seed",
        )
        out = lab.run(
            "pa",
            [sys.executable, "-c", textwrap.dedent(CONNECT), src, dst, str(PORT), str(sport)],
            timeout=60,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # The server saw the proxy's upstream connection (the node's address),
        # not the pod: the pre-seeded entry carried the DNAT to the proxy.
        assert result["saw"] == node, result
        audit = Audit(tmp_path / "audit.jsonl").wait(1, timeout=10)
        assert [(r["src"].rsplit(":", 1)[1], r["event"]) for r in audit] == [(str(sport), "closed")]
        bpf = _status(lab)["bpf"]
        assert isinstance(bpf, dict)
        assert bpf["reasons"]["marked"] >= 2  # the pre-seed and the real SYN
    finally:
        assert agent.stop() == 0
