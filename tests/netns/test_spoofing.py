"""Identity bound to an interface cannot be claimed with a spoofed address.

scapy crafts SYNs inside the pods; the kernel's own rule counters in
``table inet egress_agent`` say whether the diversion rule matched.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent

pytestmark = pytest.mark.netns


def _divert_packets(lab: Lab) -> int:
    listing = json.loads(
        lab.run("node", ["nft", "-j", "list", "chain", "inet", "egress_agent", "prerouting"]).stdout
    )
    total = 0
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == "intercept[0] from pg-primary":
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def _send_syn(lab: Lab, host: str, src: str) -> None:
    code = f"""
    from scapy.all import IP, TCP, conf, send
    conf.verb = 0
    send(IP(src="{src}", dst="198.18.1.2") / TCP(sport=40000, dport=443, flags="S"), iface="eth0")
    """
    lab.run(host, [sys.executable, "-c", textwrap.dedent(code)], timeout=60)


def test_spoofed_source_from_another_interface_is_not_diverted(tmp_path: Path) -> None:
    with Lab() as lab:
        primary = lab.add_pod("pg-primary", "198.19.1.2", "fd00:19:1::2")
        lab.add_pod("registry", "198.19.3.2", "fd00:19:3::2")
        lab.add_external("azure", "198.18.1.2", "fd00:18:1::2")
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            textwrap.dedent(
                f"""
                version: 1
                workloads:
                  pg-primary: {{cidrs: [198.19.1.2/32], interfaces: [{primary.node_ifname}]}}
                intercept:
                  - from: [pg-primary]
                    ports: [443]
                default: deny
                """
            )
        )
        # The nftables datapath's own check (its selection rules count the
        # packets); test_bpf_datapath checks the classifier the same way.
        agent = Agent(
            lab,
            policy=policy,
            audit=tmp_path / "audit.jsonl",
            log=tmp_path / "agent.log",
            extra_args=("--datapath", "nft"),
        ).start()
        try:
            assert _divert_packets(lab) == 0
            # registry pretends to be pg-primary: same source address, wrong interface.
            _send_syn(lab, "registry", "198.19.1.2")
            assert _divert_packets(lab) == 0
            # The real pg-primary, from its own interface, is diverted.
            _send_syn(lab, "pg-primary", "198.19.1.2")
            assert _divert_packets(lab) == 1
        finally:
            agent.stop()
