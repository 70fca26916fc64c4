"""The kernel relay in a running agent: a pod's raw TCP connection through
the BPF datapath is relayed by splice once its first bytes are known;
``flows`` shows who moves its bytes and counts that grow while it is open,
``status`` and ``/metrics`` count the connections per relay kind, the audit
record's byte counts equal what the server counted on its socket, and a
reload to ``proxy.relay: userspace`` turns the kernel relay off for new
connections."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from tests.harness import Agent, Audit, wait_until
from tests.netns.test_flows_live import Lines

pytestmark = pytest.mark.netns

EXT, EXT6 = "198.18.1.2", "fd00:18:1::2"
POD = "198.19.1.2"

POLICY = """
version: 1
proxy: {{relay: {relay}}}
workloads:
  app: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
intercept:
  - from: [app]
egress:
  - name: raw
    from: [app]
    to: {{cidrs: [198.18.1.2/32], ports: [9000]}}
    action: allow
default: deny
"""

# One raw connection held open: "hello" and the server's line first, then on
# each line of input "more N" sends N bytes and reads the echo back, "close"
# half-closes and reads to the end. Says "ok" after each step.
HOLDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=20)
s.sendall(b"hello\\n")
assert b"saw" in s.recv(200)
print("ok", flush=True)
for line in sys.stdin:
    what = line.split()
    if what[0] == "more":
        n = int(what[1])
        s.sendall(b"k" * n)
        got = 0
        while got < n:
            got += len(s.recv(1 << 20))
    elif what[0] == "close":
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()
    print("ok", flush=True)
"""


def _flows(lab: Lab) -> list[dict[str, Any]]:
    proc = lab.run("node", [sys.executable, "-m", "egress_agent.agent.cli", "flows", "--json"])
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _status_text(lab: Lab) -> str:
    argv = [sys.executable, "-m", "egress_agent.agent.cli", "status"]
    return lab.run("node", argv, check=False).stdout


def _hold(lab: Lab, tmp_path: Path, sizes: list[int]) -> list[list[dict[str, Any]]]:
    """Hold one connection open, send ``sizes`` in turn; the flows seen
    after each step."""
    holder = lab.popen(
        "pod", [sys.executable, "-c", textwrap.dedent(HOLDER), EXT],
        stdin=-1, stdout=-1, text=True,
    )  # fmt: skip
    seen = []
    try:
        assert holder.stdin is not None and holder.stdout is not None
        said = Lines(holder.stdout)
        assert said.next(20) == "ok"
        for n in sizes:
            holder.stdin.write(f"more {n}\n")
            holder.stdin.flush()
            assert said.next(30) == "ok"
            seen.append(_flows(lab))
        holder.stdin.write("close\n")
        holder.stdin.flush()
        assert said.next(30) == "ok"
    finally:
        holder.kill()
        holder.wait()
    return seen


def test_the_kernel_relays_and_status_says_so(lab: Lab, tmp_path: Path) -> None:
    lab.add_pod("pod", POD, "fd00:19:1::2")
    lab.add_external("ext", EXT, EXT6)
    server_log = tmp_path / "raw.jsonl"
    start_server(lab, "ext", name="ext-raw", listen=[f"{EXT}:9000"], tls=None, log=server_log)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(relay="kernel"))
    audit = Audit(tmp_path / "audit.jsonl")
    agent = Agent(lab, policy=policy, audit=audit.path, log=tmp_path / "agent.log").start()
    try:
        seen = _hold(lab, tmp_path, [1 << 20, 4 << 20])
        [first], [second] = seen
        assert first["relay"] == "kernel", first
        assert second["relay"] == "kernel", second
        # Counted as the kernel delivers, while the connection is open.
        assert second["bytes_up"] == first["bytes_up"] + (4 << 20), (first, second)
        assert second["bytes_down"] == first["bytes_down"] + (4 << 20), (first, second)
        [record] = audit.wait(1, timeout=20)
        served = wait_until(
            lambda: server_log.exists() and server_log.read_text().splitlines(),
            timeout=10,
            what="the server's record of the connection",
        )
        server = json.loads(served[0])
        # Exact: what the server read and wrote on its socket.
        assert (record["bytes_up"], record["bytes_down"]) == (
            server["bytes_in"],
            server["bytes_out"],
        ), (record, server)
        assert record["bytes_up"] == len("hello\n") + (5 << 20)

        relay = agent.status()["relay"]
        assert relay["mode"] == "kernel" and relay["method"] == "splice", relay
        assert relay["connections"] == {"kernel": 1, "userspace": 0}, relay
        assert relay["kernel_open"] == 0 and relay["fallbacks"] == {}, relay
        assert "relay:        kernel (splice), 0 open in the kernel; relayed so far: 1 kernel," \
            " 0 userspace" in _status_text(lab)  # fmt: skip
        metrics = agent.metrics()
        assert metrics['egress_agent_relay_connections_total{relay="kernel"}'] == 1
        assert metrics['egress_agent_relay_connections_total{relay="userspace"}'] == 0

        # Turned off by a reload: the next connection is the proxy's to relay.
        generation = agent.generation()
        policy.write_text(POLICY.format(relay="userspace"))
        agent.wait_generation(generation, timeout=30)
        [[flow]] = _hold(lab, tmp_path, [1 << 20])
        assert flow["relay"] == "userspace", flow
        audit.wait(1, after=1, timeout=20)
        relay = agent.status()["relay"]
        assert relay["mode"] == "userspace" and relay["method"] is None, relay
        assert relay["connections"] == {"kernel": 1, "userspace": 1}, relay
        assert "relay:        userspace (proxy.relay: userspace)" in _status_text(lab)
    finally:
        agent.stop()
