"""Attempts the datapaths hold today, kept here so that they stay held.

A plain connection (the baseline every other attempt is measured against),
data in the SYN (TCP Fast Open), IPv4 options, a single VLAN tag, connections
straight to the proxy's own port, and a neighbour claiming the pod's address
to borrow its identity. Judged at the target, and at the proxy.
"""

from __future__ import annotations

import json

import pytest
from adversary import (
    DENIED_PORT,
    PROXY_PORT,
    PROXY_V4,
    PROXY_V6,
    Range,
    assert_held,
    endpoint,
    seed_syn,
)
from scapy.all import IP, IPOption

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

FAMILIES = ["ipv4", "ipv6"]
# Record route with room for two addresses (RFC 791); setsockopt(IP_OPTIONS)
# takes it from an unprivileged socket.
RECORD_ROUTE = bytes([7, 11, 4]) + bytes(8) + bytes([1])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_connection_to_a_denied_destination_is_diverted_and_refused(
    rng: Range, datapath: str, family: str
) -> None:
    mark = rng.mark()
    real = rng.connect(family, DENIED_PORT)
    port = real["local"][1]
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"a plain connection went from {rng.addr(rng.pa, family)} to "
        f"{rng.addr(rng.inet, family)}:{DENIED_PORT} undiverted",
        datapath=datapath,
    )
    assert [r["event"] for r in attempt.audit] == ["denied"], (
        f"[{datapath}] the proxy did not deny the diverted connection: {attempt.audit}"
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_data_in_the_syn_tcp_fast_open_is_diverted(rng: Range, datapath: str, family: str) -> None:
    """The pod's kernel sends its first bytes in the SYN (cookie-less TCP
    Fast Open): the SYN is diverted like any other, data and all."""
    mark = rng.mark()
    real = rng.connect(family, DENIED_PORT, fastopen=True, payload="GET / HTTP/1.0\r\n\r\n")
    assert real["local"], f"the Fast Open connect failed in the pod: {real}"
    port = real["local"][1]
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"data in a Fast Open SYN went from {rng.addr(rng.pa, family)} to "
        f"{rng.addr(rng.inet, family)}:{DENIED_PORT} undiverted",
        datapath=datapath,
    )
    assert attempt.audit, f"[{datapath}] the proxy has no record of the Fast Open connection"
    rng.assert_still_serving(family)


def test_a_connection_with_ipv4_options_is_diverted(rng: Range, datapath: str) -> None:
    """Every packet of the pod's connection carries IPv4 options (a longer
    IP header than 20 bytes): the classifier finds TCP behind them."""
    mark = rng.mark()
    real = rng.connect("ipv4", DENIED_PORT, ip_options=RECORD_ROUTE.hex())
    port = real["local"][1]
    attempt = rng.judge(mark, family="ipv4", real=real, src_port=port)
    assert_held(
        attempt,
        f"a connection with IPv4 options went from {rng.pa.ipv4} to "
        f"{rng.inet.ipv4}:{DENIED_PORT} undiverted",
        datapath=datapath,
    )
    assert attempt.audit, f"[{datapath}] the proxy has no record of the connection"
    rng.assert_still_serving("ipv4")


SEEDS = [("ipv4", "ipv4-options"), ("ipv4", "802.1q-tag"), ("ipv6", "802.1q-tag")]


@pytest.mark.parametrize(("family", "shape"), SEEDS, ids=[f"{f}-{s}" for f, s in SEEDS])
def test_a_first_packet_the_classifier_parses_opens_no_direct_path(
    rng: Range, datapath: str, family: str, shape: str
) -> None:
    """A pre-seed (see test_conntrack.py) shaped in a way the classifier
    handles: IPv4 options, one VLAN tag (priority tag, which the kernel
    strips before tc ingress). The seed is diverted, and so is the real
    connection that follows on its 4-tuple."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seq = rng.seed_seq(family, port)
    mark = rng.mark()
    seed = seed_syn(family, src=pod, dst=server, sport=port, dport=DENIED_PORT, seq=seq)
    if shape == "ipv4-options":
        seed[IP].options = IPOption(RECORD_ROUTE)
        frame = rng.l2("pa", seed)
    else:
        frame = rng.l2("pa", seed, tags="q")
    rng.send_frames("pa", [frame])
    real = rng.connect(family, DENIED_PORT, src_port=port)
    attempt = rng.judge(mark, family=family, real=real, src_port=port)
    assert_held(
        attempt,
        f"a first packet with {shape} pre-seeded {pod}:{port} -> {server}:{DENIED_PORT} undiverted",
        datapath=datapath,
    )
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_proxy_port_refuses_direct_connections(rng: Range, datapath: str, family: str) -> None:
    """The pod connects to the proxy's own address and port: refused by the
    kernel, never served (the proxy would take its own address for the
    original destination)."""
    proxy = PROXY_V4 if family == "ipv4" else PROXY_V6
    mark = rng.mark()
    real = rng.attack(
        "pa",
        {
            "op": "connect",
            "src": rng.addr(rng.pa, family),
            "dst": proxy,
            "port": PROXY_PORT,
            "timeout": 3.0,
        },
    )
    assert real["outcome"] in ("refused", "timeout"), (
        f"[{datapath}] the pod connected straight to the proxy at "
        f"{endpoint(proxy, PROXY_PORT)}: {real}"
    )
    # A barrier: once a diverted connection's record is written, a record of
    # the direct one would be too.
    barrier = rng.barrier(family)
    served = [r for r in rng.audit_since(mark) if r != barrier]
    assert not served, f"[{datapath}] the proxy served a direct connection: {served}"
    rng.assert_still_serving(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_neighbour_spoofing_the_pods_address_borrows_no_identity(
    rng: Range, datapath: str, family: str
) -> None:
    """po (under no policy) sends a SYN with pa's address from its own veth:
    the kernel must not treat it as pa's (no diversion in pa's name). The
    conntrack entry, if any, is not NAT-ed to the proxy."""
    server, pod = rng.addr(rng.inet, family), rng.addr(rng.pa, family)
    port = rng.next_port()
    seed = seed_syn(family, src=pod, dst=server, sport=port, dport=DENIED_PORT)
    rng.send_frames("po", [rng.l2("po", seed)])
    entries = rng.lab.run(
        "node",
        ["conntrack", "-L", "-f", family, "-p", "tcp", "--orig-port-src", str(port)],
        check=False,
    ).stdout
    proxy = PROXY_V4 if family == "ipv4" else PROXY_V6
    assert f"src={proxy}" not in entries, (
        f"[{datapath}] po's SYN claiming {pod} was diverted to the proxy as pa's: {entries}"
    )
    status = json.loads(rng.http("/status")[1])
    assert status.get("ready"), f"[{datapath}] the agent is not ready after the spoofed SYN"
    rng.assert_still_serving(family)
