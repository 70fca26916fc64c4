"""The running agent's lifecycle: status, readiness, and repair of drift."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit, client, wait_until

pytestmark = pytest.mark.netns

POD = "198.19.1.2"

POLICY = """
version: 1
workloads:
  pod: {cidrs: [198.19.1.2/32]}
intercept:
  - from: [pod]
    ports: [9000]
egress:
  - name: sink
    to: {ports: [9000]}
    action: allow
default: deny
"""


class Node:
    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab, self.work = lab, work
        self.policy = work / "policy.yaml"
        self.policy.write_text(POLICY)
        self.audit = Audit(work / "audit.jsonl")
        self.agent = Agent(lab, policy=self.policy, audit=self.audit.path, log=work / "agent.log")

    def cli(self, *args: str) -> tuple[int, str]:
        proc = self.lab.run(
            "node", [sys.executable, "-m", "egress_agent.agent.cli", *args], check=False
        )
        return proc.returncode, proc.stdout + proc.stderr

    def status(self) -> dict[str, Any]:
        code, out = self.cli("status", "--json")
        assert code == 0, out
        result: dict[str, Any] = json.loads(out)
        return result

    def http(self, path: str) -> tuple[int, str]:
        out = self.lab.run(
            "node",
            ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:15021{path}"],
        ).stdout
        body, _, code = out.rpartition("\n")
        return int(code), body

    def diverted(self) -> bool:
        """Whether the pod's traffic currently goes through the proxy: the
        server saw the node instead of the pod, and the proxy wrote the
        connection's record."""
        before = self.audit.mark()
        result = client(self.lab, "pod", "198.18.1.2", 9000)
        assert result["ok"], result
        saw = result["reply"].split(" saw ", 1)[1].rsplit(":", 1)[0]
        if saw == POD:
            return False
        self.audit.wait(1, after=before)
        return True

    def wait_until(self, check: Any, limit: float) -> float:
        t0 = time.monotonic()
        wait_until(check, timeout=limit, what="restored", interval=0.1)
        return time.monotonic() - t0

    def wait_reload_error(self) -> str:
        """Wait until the agent has refused the policy file's content."""
        error: str = wait_until(
            lambda: (self.status()["last_reload"] or {}).get("error"),
            timeout=5.0,
            what="the agent refused the edit",
        )
        return error


@pytest.fixture
def node(pod_and_sink: Lab, tmp_path: Path) -> Iterator[Node]:
    n = Node(pod_and_sink, tmp_path)
    n.agent.start()
    try:
        yield n
    finally:
        n.agent.stop()


def test_status_and_health_endpoints(node: Node) -> None:
    snap = node.status()
    assert snap["policy"]["generation"] == 1 and snap["ready"] and snap["kernel_in_sync"]
    # auto picks BPF on a machine like CI's: the classifier selects, and
    # prerouting holds the two "to the proxy itself" returns and the two
    # mark matches (IPv4, IPv6).
    assert snap["datapath"] == "bpf" and snap["datapath_requested"] == "auto"
    assert snap["bpf"]["in_sync"] and snap["nft_rules_per_chain"]["prerouting"] == 4
    assert node.http("/healthz")[0] == 200 and node.http("/readyz")[0] == 200
    code, text = node.cli("status")
    assert code == 0 and "generation 1" in text and "ready:        yes" in text
    assert node.http("/nope")[0] == 404


def test_a_bad_edit_is_visible_in_status(node: Node) -> None:
    node.policy.write_text(POLICY.replace("action: allow", "action: alow"))
    node.wait_reload_error()
    snap = node.status()
    assert snap["policy"]["generation"] == 1
    assert snap["last_reload"]["error"] and "egress[0].action" in snap["last_reload"]["error"]
    assert f"{node.policy}:" in snap["last_reload"]["error"]
    code, text = node.cli("status")
    assert code == 0  # still ready: the last good policy is enforced
    assert "last reload:  FAILED, still enforcing generation 1" in text and "alow" in text
    assert node.diverted()  # the old policy is still in force


def test_a_deleted_table_is_restored(node: Node) -> None:
    assert node.diverted()
    node.lab.run("node", ["nft", "delete", "table", "inet", "egress_agent"])
    assert not node.diverted()
    took = node.wait_until(node.diverted, 5.0)
    assert took < 5.0
    assert (
        "drift: table inet egress_agent is missing; restoring"
        in (node.work / "agent.log").read_text()
    )
    assert node.status()["drift_repairs"] >= 1


def test_an_edited_chain_and_a_removed_address_are_restored(node: Node) -> None:
    listing = json.loads(
        node.lab.run(
            "node", ["nft", "-j", "-a", "list", "chain", "inet", "egress_agent", "prerouting"]
        ).stdout
    )
    handle = next(
        i["rule"]["handle"]
        for i in listing["nftables"]
        if "rule" in i and i["rule"].get("comment", "").startswith(("intercept", "marked"))
    )
    node.lab.run(
        "node",
        ["nft", "delete", "rule", "inet", "egress_agent", "prerouting", "handle", str(handle)],
    )
    node.lab.run("node", ["ip", "addr", "del", "169.254.99.1/32", "dev", "lo"])
    node.wait_until(
        lambda: "169.254.99.1"
        in node.lab.run("node", ["ip", "-o", "addr", "show", "dev", "lo"]).stdout,
        5.0,
    )
    node.wait_until(node.diverted, 5.0)
    log = (node.work / "agent.log").read_text()
    assert "chain prerouting" in log and "proxy address 169.254.99.1 missing from lo" in log


def _metrics(node: Node) -> dict[str, float]:
    code, text = node.http("/metrics")
    assert code == 200
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP egress_agent_", "# TYPE egress_agent_")), line
            continue
        name, value = line.rsplit(" ", 1)  # exposition format: NAME{LABELS} VALUE
        values[name] = float(value)
    return values


def test_metrics_count_connections_reloads_and_repairs(node: Node) -> None:
    before = _metrics(node)
    assert before["egress_agent_ready"] == 1 and before["egress_agent_policy_generation"] == 1
    assert node.diverted()  # its record is written: the counters counted it
    after = _metrics(node)
    key = 'egress_agent_connections_total{event="closed",verdict="allow"}'
    assert after[key] == before.get(key, 0) + 1
    assert after['egress_agent_bytes_total{direction="up"}'] > 0
    node.policy.write_text(POLICY.replace("action: allow", "action: alow"))
    node.wait_reload_error()
    bad = _metrics(node)
    assert bad["egress_agent_last_reload_failed"] == 1
    assert bad['egress_agent_reloads_total{result="failed"}'] >= 1
    node.policy.write_text(POLICY + "# fixed\n")
    node.agent.wait_generation(above=1)
    good = _metrics(node)
    assert good["egress_agent_last_reload_failed"] == 0
    assert good['egress_agent_reloads_total{result="applied"}'] == 1
    assert good["egress_agent_policy_generation"] == 2


def _tables(node: Node) -> str:
    return node.lab.run("node", ["nft", "list", "tables"]).stdout


def test_fail_open_sends_traffic_direct_once_the_agent_is_gone(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    n = Node(pod_and_sink, tmp_path)
    n.policy.write_text(POLICY + "fail: open\n")
    n.agent.start()
    try:
        assert n.diverted()
        # The table is the agent's own: nobody else may delete or change it.
        refused = n.lab.run("node", ["nft", "delete", "table", "inet", "egress_agent"], check=False)
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
        assert n.diverted()
        # Changing the failure mode needs a restart; the running one stays.
        n.policy.write_text(POLICY + "fail: closed\n")
        error = n.wait_reload_error()
        assert "fail changed to closed" in error and "restart" in error
        n.agent.kill()
        # The kernel removed the table with the process: traffic goes direct.
        assert "egress_agent" not in _tables(n)
        out = n.lab.run(
            "pod", [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", "9000"]
        ).stdout
        assert json.loads(out)["ok"]
        n.policy.write_text(POLICY + "fail: open\n")
        n.agent.start()
        assert n.diverted()
    finally:
        assert n.agent.stop() == 0
    assert "egress_agent" not in _tables(n)


def test_a_fail_closed_leftover_is_replaced_by_a_fail_open_start(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    n = Node(pod_and_sink, tmp_path)
    n.agent.start()
    n.agent.kill()  # leaves a plain table behind: fail closed while nothing runs
    assert "egress_agent" in _tables(n)
    n.policy.write_text(POLICY + "fail: open\n")
    n.agent.start()
    try:
        assert n.diverted()
        assert n.status()["fail"] == "open"
    finally:
        n.agent.kill()
    assert "egress_agent" not in _tables(n)


def test_stopping_tells_the_clients_of_relayed_connections_at_once(node: Node) -> None:
    """The proxy resets what it relays before its addresses go: a client does
    not hang on a connection nobody holds any more."""
    code = """
import socket, time
s = socket.create_connection(("198.18.1.2", 9000), timeout=10)
s.sendall(b"hello\\n")
s.recv(100)
print("open", flush=True)
t0 = time.time()
try:
    data = s.recv(100)
    how = "eof" if not data else "data"
except OSError as exc:
    how = type(exc).__name__
print(how, round(time.time() - t0, 2), flush=True)
"""
    client = node.lab.popen("pod", [sys.executable, "-c", code], stdout=-1, stderr=-1, text=True)
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "open"
    assert node.agent.stop() == 0
    out, err = client.communicate(timeout=15)
    how, waited = out.split()
    assert how in ("eof", "ConnectionResetError"), (out, err)
    assert float(waited) < 2.0
