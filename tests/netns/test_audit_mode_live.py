"""Audit mode on real namespaces: under ``enforce: false`` a flow the policy
denies reaches its server and is audited as ``audit-deny`` with the rule that
would have denied it; after an ordinary reload to enforce, the same flow is
refused and audited as ``deny``. Judged from the server's log."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log
from tests.harness import Agent, Audit, client, wait_until

pytestmark = pytest.mark.netns

EXT = "198.18.1.2"
POLICY = """
version: 1
workloads:
  pod: {cidrs: [198.19.1.2/32]}
intercept:
  - from: [pod]
    ports: ["9000-9010"]
egress:
  - name: no-9000
    to: {ports: [9000]}
    action: deny
default: deny
"""
AUDIT = POLICY + "enforce: false\n"


def _send(lab: Lab, port: int, text: str) -> dict[str, Any]:
    out = lab.run(
        "pod",
        [sys.executable, "-m", "egress_agent.lab.client", EXT, str(port), "--send", text + "\n"],
        check=False,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _records(path: Path, dst: str, *, at_least: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The audit records of connections to ``dst``, once there are ``at_least``."""

    def enough() -> list[dict[str, Any]] | None:
        got = [r for r in Audit(path).all() if r.get("dst") == dst and "event" in r]
        return got if len(got) >= at_least else None

    return wait_until(enough, timeout=timeout, what=f"{at_least} audit record(s) to {dst}")


def _lab_run_json(lab: Lab, argv: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(lab.run("node", argv).stdout)
    return result


def _audit_denies(lab: Lab) -> dict[tuple[str, str], float]:
    text = lab.run("node", ["curl", "-sS", "http://127.0.0.1:15021/metrics"]).stdout
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "egress_agent_audit_denies":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["rule"], s.labels["workload"])] = s.value
    return out


def test_audit_mode_lets_denied_flows_through_until_enforced(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    policy = tmp_path / "policy.yaml"
    policy.write_text(AUDIT)
    audit, log = tmp_path / "audit.jsonl", tmp_path / "agent.log"
    server_log = tmp_path / "server.jsonl"
    status = [sys.executable, "-m", "egress_agent.agent.cli", "status", "--json"]
    run = f"audit-{uuid.uuid4().hex[:8]}"
    agent = Agent(lab, policy=policy, audit=audit, log=log).start(timeout=90)
    try:
        assert _lab_run_json(lab, status)["policy"]["mode"] == "audit"
        # Denied by a rule, then by the default: both reach the server.
        by_rule = _send(lab, 9000, f"{run} by-rule")
        by_default = _send(lab, 9001, f"{run} by-default")
        assert by_rule["ok"] and by_default["ok"], (by_rule, by_default)
        seen = read_log(server_log, at_least=2)
        firsts = {r["local"]: r for r in seen if run in r.get("first", "")}
        assert firsts[f"{EXT}:9000"]["first"].strip() == f"{run} by-rule"
        assert firsts[f"{EXT}:9001"]["first"].strip() == f"{run} by-default"
        (rule_rec,) = _records(audit, f"{EXT}:9000", at_least=1)
        (default_rec,) = _records(audit, f"{EXT}:9001", at_least=1)
        for rec, rule in ((rule_rec, "no-9000"), (default_rec, "default")):
            assert (rec["event"], rec["verdict"], rec["rule"], rec["workload"]) == (
                "closed",
                "audit-deny",
                rule,
                "pod",
            ), rec
        assert rule_rec["bytes_up"] == len(f"{run} by-rule\n")
        assert default_rec["bytes_up"] == len(f"{run} by-default\n")
        assert _audit_denies(lab) == {("no-9000", "pod"): 1.0, ("default", "pod"): 1.0}

        served = len(read_log(server_log))
        # An ordinary reload switches to enforce.
        policy.write_text(POLICY)
        agent.wait_generation(1, timeout=10)
        assert _lab_run_json(lab, status)["policy"]["mode"] == "enforce"
        refused_rule = _send(lab, 9000, f"{run} enforced-rule")
        refused_default = _send(lab, 9001, f"{run} enforced-default")
        assert not refused_rule["ok"] and not refused_default["ok"]
        after_rule = _records(audit, f"{EXT}:9000", at_least=2)
        after_default = _records(audit, f"{EXT}:9001", at_least=2)
        assert (after_rule[1]["event"], after_rule[1]["verdict"], after_rule[1]["rule"]) == (
            "denied",
            "deny",
            "no-9000",
        )
        assert (after_default[1]["verdict"], after_default[1]["rule"]) == ("deny", "default")
        assert _audit_denies(lab) == {("no-9000", "pod"): 1.0, ("default", "pod"): 1.0}
    finally:
        assert agent.stop() == 0
    # A barrier: one connection from the node (never diverted) once the
    # others ended. When the server has logged it, it has logged theirs.
    barrier = client(lab, "node", EXT, 9000)
    assert barrier["ok"], barrier
    peer = barrier["reply"].split(" saw ", 1)[1]
    new = wait_until(
        lambda: (n := read_log(server_log, timeout=0)[served:])
        and any(r["peer"] == peer for r in n)
        and n,
        timeout=10,
        what=f"the server's record of the barrier connection from {peer}",
    )
    after = [r for r in new if r["peer"] != peer]
    assert after == [], f"connections reached the server after the reload to enforce: {after}"
