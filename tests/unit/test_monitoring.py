"""What monitoring reads: the ``/metrics`` exposition (names and labels are an
interface), and the alert rules and dashboard in ``deploy/monitoring`` that
use it, checked with Prometheus' own ``promtool``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from egress_agent.agent import metrics as agent_metrics
from egress_agent.agent.metrics import Metrics
from egress_agent.agent.status import ReloadResult
from egress_agent.bpf.datapath import ClassifierCounters, Traffic
from egress_agent.bpf.layout import Reason
from egress_agent.policy.load import parse_policy
from egress_agent.proxy.audit import AuditLog, AuditRecord, RequestRecord
from egress_agent.proxy.kernel_relay import RelayStats
from egress_agent.proxy.traffic import LocalTraffic, Ticket
from tests.lab.metricnames import FAMILIES

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts_test.yaml"
DASHBOARD = MONITORING / "egress-agent-dashboard.json"


def _record(**kw: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "time": "2026-01-01T00:00:00.000000Z",
        "event": "closed",
        "src": "10.0.0.2:40000",
        "workload": "app",
        "dst": "192.0.2.10:443",
        "server_name": "api.example.com",
        "protocol": "tls",
        "rule": "api",
        "verdict": "allow",
        "bytes_up": 10,
        "bytes_down": 20,
        "duration_ms": 1.0,
        "error": None,
        "policy_generation": 1,
        "policy_hash": "0" * 16,
    }
    base.update(kw)
    return AuditRecord(**base)


def _agent(tmp_path: Path) -> SimpleNamespace:
    """An agent as the metrics read it: real audit totals, the rest as a
    running agent on the BPF datapath holds it."""
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit.write(_record())
    audit.write(_record(event="denied", verdict="deny", rule="default", bytes_up=0, bytes_down=0))
    audit.write(_record(event="failed", verdict=None, rule=None, workload=None, error="timeout"))
    audit.write(_record(via="connect", connect_host="api.example.com:443"))
    audit.write_request(
        RequestRecord(
            time="2026-01-01T00:00:00.000000Z",
            connection="1-1",
            src="10.0.0.2:40000",
            workload="app",
            dst="192.0.2.10:80",
            upstream=None,
            rule="blob",
            method="PUT",
            host="blob.example.com",
            path="/c/x",
            status=201,
            bytes_up=5,
            bytes_down=6,
            duration_ms=2.0,
            error=None,
        )
    )
    classified = ClassifierCounters(
        reasons={Reason.MARKED: 7, Reason.NO_RULE: 2},
        workloads={},
        non_tcp={0: Traffic(packets=3, bytes=300)},
    )
    bpf = SimpleNamespace(
        counters=lambda: classified,
        workload_counters=lambda: {"app": (1, 100, 2, 200)},
    )
    resolver = SimpleNamespace(
        queries={"answer": 4}, lookups={"cached": 3, "queried": 1}, cache={"a": 1}
    )
    proxy = SimpleNamespace(
        traffic=_traffic(),
        refused={("proxy.max_connections", "app"): 2},
        max_connections=100,
        listeners=[SimpleNamespace(restarts=1)],
        resolver=resolver,
        relays=RelayStats(started=5, kernel=4, open=1, fallbacks={"EINVAL": 1}),
    )
    reconciler = SimpleNamespace(generation=2, in_sync=True, repairs=1, bpf=bpf, proxy=proxy)
    return SimpleNamespace(
        reconciler=reconciler,
        audit=audit,
        last_reload=ReloadResult(applied=False, generation=2, policy_hash="x", error="bad"),
        reloads={"applied": 1, "failed": 1},
    )


def _traffic() -> LocalTraffic:
    """Traffic controls with one refusal by a rate and one open breaker."""
    policy = parse_policy(
        "version: 1\nworkloads: {}\negress:\n  - name: api\n    action: allow\n"
        '    limits: {rate: "1/s", burst: 1, per: workload}\n'
        "    breaker: {consecutive_failures: 1, open_for: 30s}\ndefault: deny\n",
        source_name="p.yaml",
    )
    traffic = LocalTraffic()
    traffic.configure(policy.egress, 0.0)
    traffic.open_flow("api", "app", 0.0)
    traffic.open_flow("api", "app", 0.0)
    ticket = traffic.enter("api", "app", "api.example.com:443", 0.0)
    assert isinstance(ticket, Ticket)
    traffic.report(ticket, False, 0.0)
    return traffic


SNAPSHOT = {
    "ready": True,
    "connections_open": 3,
    "diverted": {
        "rules": [{"chain": "prerouting", "rule": 'marked "x"', "packets": 5, "bytes": 50}]
    },
    "drops": {
        "rules": [
            {
                "chain": "forward",
                "rule": "reverse-path check",
                "reason": "reverse_path",
                "packets": 2,
                "bytes": 20,
            }
        ],
        "by_reason": {"reverse_path": 2, "bpf_malformed": 1},
    },
}


def _exposition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(agent_metrics, "snapshot", lambda agent: SNAPSHOT)
    return Metrics(_agent(tmp_path)).text()  # type: ignore[arg-type]


def test_the_exposition_parses_and_keeps_every_name_and_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _exposition(tmp_path, monkeypatch)
    seen: dict[str, tuple[str, set[tuple[str, ...]]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        seen[name] = (family.type, {tuple(s.labels) for s in family.samples})
        for sample in family.samples:  # no _created or other extra series
            assert sample.name == name, sample
    assert set(seen) == set(FAMILIES)
    for name, (kind, labels) in FAMILIES.items():
        assert seen[name][0] == kind, name
        assert seen[name][1] <= {labels}, (name, seen[name][1])
    for line in text.splitlines():
        # Only HELP and TYPE comments, every one about the agent's own families.
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) egress_agent_\w+ ", line), line
            continue
        # Labels in their known order (scripts match the text as it is).
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        assert tuple(re.findall(r'[{,](\w+)="', line)) in ((), FAMILIES[name][1]), line


def test_the_exposition_has_the_values_the_agent_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _exposition(tmp_path, monkeypatch)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }

    def v(name: str, **labels: str) -> float:
        return values[(f"egress_agent_{name}", tuple(sorted(labels.items())))]

    assert v("policy_generation") == 2 and v("last_reload_failed") == 1
    assert v("reloads_total", result="failed") == 1
    assert v("connections_total", event="denied", verdict="deny") == 1
    assert v("connections_total", event="failed", verdict="none") == 1
    assert v("connect_connections_total", event="closed", verdict="allow") == 1
    assert v("rule_connections_total", workload="app", rule="api", verdict="allow") == 2
    assert v("rule_connections_total", workload="app", rule="default", verdict="deny") == 1
    assert v("rule_connections_total", workload="-", rule="-", verdict="none") == 1
    assert v("bytes_total", direction="down") == 60
    assert v("http_requests_total", rule="blob", status="2xx") == 1
    # A label value with a double quote comes back as it was.
    assert v("diverted_packets_total", chain="prerouting", rule='marked "x"') == 5
    assert v("dropped_packets_total", reason="bpf_malformed", rule="BPF classifier") == 1
    assert v("bpf_verdicts_total", reason="no_rule") == 2
    assert v("bpf_bypassed_bytes_total", workload="app") == 200
    assert v("bpf_non_tcp_marked_bytes_total", rule="intercept[0]") == 300
    assert v("connections_refused_total", cap="proxy.max_connections", workload="app") == 2
    assert v("dns_lookups_total", result="queried") == 1 and v("dns_cache_names") == 1
    assert v("audit_write_errors_total") == 0
    assert v("limited_total", limit="rate", rule="api", workload="app") == 1
    dest = "api.example.com:443"
    assert v("breaker_state", rule="api", destination=dest, state="open") == 1
    assert v("breaker_state", rule="api", destination=dest, state="closed") == 0
    assert v("breaker_transitions_total", rule="api", destination=dest, to="open") == 1
    assert v("relay_connections_total", relay="kernel") == 4
    assert v("relay_connections_total", relay="userspace") == 1
    assert v("relay_fallbacks_total", reason="EINVAL") == 1 and v("relay_kernel_open") == 1


def test_an_audit_record_that_cannot_be_written_is_counted() -> None:
    audit = AuditLog("/dev/full")  # every write fails with ENOSPC
    try:
        audit.write(_record())
        audit.write(_record(event="denied", verdict="deny"))
    finally:
        audit.close()
    assert audit.write_errors == 2 and audit.written == 0


# -- alert rules and dashboard ---------------------------------------------


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (./run test does)"
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\begress_agent_\w+", expr))


def test_the_alert_rules_pass_promtool_check() -> None:
    proc = _promtool("check", "rules", ALERTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rule in _alerts():
        assert _names(rule["expr"]) <= set(FAMILIES), rule["alert"]


def test_each_alert_fires_on_its_synthetic_series_and_not_on_a_healthy_one() -> None:
    proc = _promtool("test", "rules", ALERT_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Each alert has a case where it fires for the "sick" target, in a test
    # whose "healthy" target has the same series (promtool fails on any alert
    # exp_alerts does not list, so the healthy one is asserted silent).
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    for rule in _alerts():
        cases = [
            (test, case)
            for test in doc["tests"]
            for case in test["alert_rule_test"]
            if case["alertname"] == rule["alert"]
        ]
        assert any(case["exp_alerts"] for _, case in cases), f"{rule['alert']} never fires"
        for test, case in cases:
            assert all(a["exp_labels"]["instance"] == "sick" for a in case["exp_alerts"])
            healthy = [s for s in test["input_series"] if 'instance="healthy"' in s["series"]]
            assert healthy and any(_names(s["series"]) & _names(rule["expr"]) for s in healthy)


@pytest.mark.parametrize("alert", [r["alert"] for r in _alerts()])
def test_an_alert_that_cannot_fire_fails_its_test(alert: str, tmp_path: Path) -> None:
    """The tests can fail: with this alert's expression matching nothing,
    promtool reports the missing alert."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 2"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yaml")
    proc = _promtool("test", "rules", tmp_path / "alerts_test.yaml")
    assert proc.returncode != 0 and alert in proc.stdout + proc.stderr


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_the_dashboard_queries_parse_and_read_the_agent_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = set().union(*map(_names, exprs))
    assert used <= set(FAMILIES), used - set(FAMILIES)
    # What the issue asks to see: connections and denies per rule and
    # workload, bytes, reloads, drift repairs, the datapath, DNS.
    for name in (
        "egress_agent_rule_connections_total",
        "egress_agent_bytes_total",
        "egress_agent_reloads_total",
        "egress_agent_drift_repairs_total",
        "egress_agent_dropped_packets_total",
        "egress_agent_bpf_verdicts_total",
        "egress_agent_dns_queries_total",
    ):
        assert name in used, name
    # Every query is valid PromQL: promtool parses them as recording rules
    # (Grafana's variables replaced by what they stand for).
    rules = [
        {
            "record": f"dashboard:query{i}",
            "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _promtool("check", "rules", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
