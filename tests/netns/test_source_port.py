"""The audit record names the port the client really used.

A client may use one source port for connections to two destinations; both
are DNAT-ed to the proxy's one address and port, so netfilter moves the
second one's source port on the way in. The proxy asks conntrack for the
client's own port instead of trusting ``getpeername``.
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

# Two sockets bound to one source port, each to another destination.
CLIENT = """
import json, socket, sys
family, host, port = socket.AF_INET, "198.18.1.2", 41000
if sys.argv[1] == "6":
    family, host = socket.AF_INET6, "fd00:18:1::2"
socks = []
for dport in (9000, 9001):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    s.settimeout(5)
    s.connect((host, dport))
    s.sendall(b"hello\\n")
    socks.append((s, s.makefile().readline().strip()))
for s, _ in socks:
    s.close()
print(json.dumps([line for _, line in socks]))
"""

POLICY = """\
version: 1
workloads:
  pod: {cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}
intercept:
  - from: [pod]
egress:
  - {name: sink, from: [pod], to: {cidrs: [198.18.1.2/32, "fd00:18:1::2/128"]}, action: allow}
default: deny
"""


@pytest.mark.parametrize("family", ["4", "6"])
def test_two_connections_from_one_port_are_audited_with_that_port(
    pod_and_sink: Lab, tmp_path: Path, family: str
) -> None:
    lab = pod_and_sink
    if family == "6":
        from egress_agent.lab.servers import start_server

        start_server(
            lab, "ext", name="ext6", listen=["[fd00:18:1::2]:9000", "[fd00:18:1::2]:9001"],
            tls=None, log=tmp_path / "server6.jsonl",
        )  # fmt: skip
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit = tmp_path / "audit.jsonl"
    agent = Agent(lab, policy=policy, audit=audit, log=tmp_path / "agent.log").start()
    try:
        out = lab.run("pod", [sys.executable, "-c", textwrap.dedent(CLIENT), family], timeout=30)
        answers = json.loads(out.stdout)
        assert len(answers) == 2 and all(" saw " in a for a in answers), answers
    finally:
        assert agent.stop() == 0
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    client = "198.19.1.2" if family == "4" else "[fd00:19:1::2]"
    assert sorted(r["src"] for r in records) == [f"{client}:41000"] * 2, records
    assert sorted(r["dst"].rsplit(":", 1)[1] for r in records) == ["9000", "9001"]
