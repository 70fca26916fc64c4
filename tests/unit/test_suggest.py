"""``egress-agent suggest``: from audit records to a policy that allows what
was seen and nothing else."""

from __future__ import annotations

import gzip
import json
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from egress_agent.agent.cli import main
from egress_agent.agent.suggest import SuggestError, audit_files, suggest
from egress_agent.policy.decide import decide
from egress_agent.policy.load import parse_policy
from egress_agent.policy.model import Action, Resolution


def _rec(workload: str | None, dst: str, name: str | None, when: str, **kw: Any) -> str:
    record = {
        "time": f"2026-12-07T{when}.123456Z",
        "event": "closed",
        "src": "10.0.0.2:40000" if workload != "batch" else "[fd00::3]:40000",
        "workload": workload,
        "dst": dst,
        "server_name": name,
        "protocol": "tls" if name else "tcp",
        "rule": "any",
        "verdict": "allow",
        "bytes_up": 1,
        "bytes_down": 1,
        "duration_ms": 1.0,
        "error": None,
        "policy_generation": 1,
        "policy_hash": "0" * 16,
    }
    record.update(kw)
    return json.dumps(record) + "\n"


LOG = [
    _rec("app", "192.0.2.10:443", "a.blob.example.com", "10:00:00"),
    _rec("app", "192.0.2.11:443", "B.blob.example.com", "10:01:00"),
    _rec("app", "192.0.2.10:443", None, "10:02:00"),  # no name, at a's address
    _rec("app", "198.51.100.7:5432", None, "10:03:00"),
    _rec("app", "192.0.2.20:443", "example.com", "10:03:30"),
    _rec("batch", "[2001:db8::2]:8443", "api.example.org", "10:05:00"),
    _rec(
        "batch",
        "[2001:db8::1]:443",
        "evil.example.net",
        "10:04:00",
        event="denied",
        verdict="deny",
        rule="default",
    ),
    _rec(None, "192.0.2.99:80", None, "10:06:00"),
    _rec("app", "192.0.2.98:80", None, "10:07:00", event="failed", verdict=None),
    json.dumps({"time": "x", "event": "request", "connection": "1"}) + "\n",
    "not json\n",
]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl.2.gz", "wt") as f:
        f.writelines(LOG[:3])
    (tmp_path / "audit.jsonl.1").write_text("".join(LOG[3:6]))
    path.write_text("".join(LOG[6:]))
    (tmp_path / "audit.jsonl.bak").write_text(_rec("app", "203.0.113.1:1", None, "09:00:00"))
    return path


# What the names resolve to when the suggested policy is enforced.
DNS = {
    "a.blob.example.com": "192.0.2.10",
    "b.blob.example.com": "192.0.2.11",
    "c.blob.example.com": "192.0.2.12",
    "example.com": "192.0.2.20",
    "api.example.org": "2001:db8::2",
    "evil.example.net": "2001:db8::1",
}


def _allows(text: str, workload: str, dst: str, port: int, name: str | None) -> bool:
    policy = parse_policy(text, source_name="suggested")
    resolved = {n: Resolution(addresses=frozenset({ip_address(a)})) for n, a in DNS.items()}
    verdict = decide(
        policy,
        workload=workload,
        dst=ip_address(dst),
        dst_port=port,
        server_name=name,
        resolved=resolved,
    )
    return verdict.action is Action.ALLOW


def test_rotated_files_oldest_first_and_nothing_else(log: Path) -> None:
    names = [p.name for p in audit_files(str(log))]
    assert names == ["audit.jsonl.2.gz", "audit.jsonl.1", "audit.jsonl"]


def test_what_was_seen_is_allowed_and_nothing_else(log: Path) -> None:
    text = suggest(str(log), policy=None, wildcards=False)
    assert "# 3 connections, last seen 2026-12-07T10:02:00Z" in text
    assert "to: {hosts: [a.blob.example.com, b.blob.example.com], ports: [443]}" in text
    assert "to: {cidrs: [198.51.100.7/32], ports: [5432]}" in text
    assert "#   denied: batch -> evil.example.net:443, once" in text
    assert "#   1 connections from no workload" in text
    assert "not JSON" in text and "203.0.113.1" not in text  # .bak is not a rotation
    ok = [
        ("app", "192.0.2.10", 443, "a.blob.example.com"),
        ("app", "192.0.2.11", 443, "b.blob.example.com"),
        ("app", "198.51.100.7", 5432, None),
        ("app", "192.0.2.20", 443, "example.com"),
        ("batch", "2001:db8::2", 8443, "api.example.org"),
    ]
    refused = [
        ("app", "192.0.2.10", 443, "c.blob.example.com"),  # an unseen sibling
        ("app", "192.0.2.10", 8443, "a.blob.example.com"),  # an unseen port
        ("app", "198.51.100.7", 5433, None),
        ("batch", "192.0.2.10", 443, "a.blob.example.com"),  # another workload's
        ("batch", "2001:db8::1", 443, "evil.example.net"),  # denied when seen
        ("app", "192.0.2.98", 80, None),  # failed before any decision
    ]
    for flow in ok:
        assert _allows(text, *flow), flow
    for flow in refused:
        assert not _allows(text, *flow), flow


def test_wildcards_only_when_asked_and_only_for_siblings(log: Path) -> None:
    text = suggest(str(log), policy=None, wildcards=True)
    assert "hosts: ['*.blob.example.com']" in text or 'hosts: ["*.blob.example.com"]' in text
    assert "(2 names seen)" in text and "hosts: [example.com]" in text
    # A wildcard does not cover flows without a name: their address is listed.
    assert "to: {cidrs: [192.0.2.10/32], ports: [443]}" in text
    assert _allows(text, "app", "192.0.2.10", 443, None)
    assert _allows(text, "app", "192.0.2.12", 443, "c.blob.example.com")


def test_the_current_policy_keeps_its_workloads_and_settings(log: Path, tmp_path: Path) -> None:
    current = tmp_path / "policy.yaml"
    current.write_text(
        "version: 1\nproxy: {port: 15009}\n"
        "workloads:\n  app: {cidrs: [10.0.0.0/24]}\n"
        "intercept:\n  - {from: [app], ports: [443, 5432]}\n"
        "egress:\n  - {name: all, to: {ports: [443]}, action: allow}\ndefault: allow\n"
    )
    text = suggest(str(log), policy=str(current), wildcards=False)
    policy = parse_policy(text, source_name="suggested")
    assert policy.proxy.port == 15009 and [w.name for w in policy.workloads] == ["app"]
    assert policy.default is Action.DENY and "all" not in [r.name for r in policy.egress]
    assert f"workload batch is not in {current}: 1 connections" in text


def test_the_command_and_its_errors(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["suggest", "--audit-log", str(log)]) == 0
    assert "default: deny" in capsys.readouterr().out
    assert main(["suggest", "--audit-log", str(tmp_path / "none.jsonl")]) == 2
    assert "no audit log there" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nworkloads: {}\ndefault: alow\n")
    assert main(["suggest", "--audit-log", str(log), "--policy", str(bad)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err
    with pytest.raises(SuggestError):
        audit_files(str(tmp_path / "missing" / "audit.jsonl"))
