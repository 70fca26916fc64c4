"""What a monitoring pipeline reads from a running agent: ``/metrics`` parsed
by Prometheus' own parser, and the agent's log as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit, wait_until
from tests.lab.metricnames import FAMILIES

pytestmark = pytest.mark.netns

POLICY = """
version: 1
workloads:
  pod: {cidrs: [198.19.1.2/32]}
intercept:
  - from: [pod]
    ports: [9000, 9001]
egress:
  - name: sink
    to: {ports: [9000]}
    action: allow
default: deny
"""


def _connect(lab: Lab, port: int) -> None:
    lab.run(
        "pod",
        [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", str(port)],
        check=False,
    )


def test_metrics_parse_and_logs_are_json_lines(pod_and_sink: Lab, tmp_path: Path) -> None:
    lab = pod_and_sink
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    log = tmp_path / "agent.log"
    agent = Agent(
        lab,
        policy=policy,
        audit=tmp_path / "audit.jsonl",
        log=log,
        extra_args=("--log-format", "json"),
    )
    agent.start(timeout=90)
    try:
        _connect(lab, 9000)  # allowed by "sink"
        _connect(lab, 9001)  # denied by the default
        Audit(tmp_path / "audit.jsonl").wait(2, timeout=10)  # both decided and counted
        failed = agent.reloads("failed")
        policy.write_text(POLICY.replace("action: allow", "action: alow"))  # refused
        agent.wait_reloads("failed", failed, timeout=10)
        wait_until(
            lambda: "the new file is not valid" in log.read_text(),
            timeout=5,
            what="the bad edit logged",
        )
        text = agent.get("/metrics")
    finally:
        assert agent.stop() == 0

    samples = {}
    seen = set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in FAMILIES and FAMILIES[name][0] == family.type, name
        seen.add(name)
        for s in family.samples:
            assert tuple(sorted(s.labels)) == FAMILIES[name][1], s
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    # On the BPF datapath (auto on a machine like CI's) with the proxy
    # running, every family shows, with no samples where nothing was counted.
    assert seen == set(FAMILIES), set(FAMILIES) - seen
    rule = "egress_agent_rule_connections_total"
    assert samples[(rule, (("rule", "sink"), ("verdict", "allow"), ("workload", "pod")))] == 1
    assert samples[(rule, (("rule", "default"), ("verdict", "deny"), ("workload", "pod")))] == 1
    assert samples[("egress_agent_last_reload_failed", ())] == 1
    assert samples[("egress_agent_audit_write_errors_total", ())] == 0

    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert all(set(x) == {"time", "level", "event", "fields"} for x in lines)
    assert any(x["event"].startswith("ready: policy ") for x in lines)
    refused = next(x for x in lines if "the new file is not valid" in x["event"])
    assert refused["level"] == "error" and "egress[0].action" in refused["event"]
    assert refused["fields"]["logger"] == "egress_agent.agent.agent"
    assert refused["fields"]["args"][0] == "file changed"
