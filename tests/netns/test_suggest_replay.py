"""``egress-agent suggest`` from a real agent's audit log (rotated and
gzipped in part): the suggested policy passes ``check``, and the same traffic
replayed under it in enforce mode is allowed without one deny, while traffic
that was never seen is denied."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from egress_agent.lab.tls import make_ca

pytestmark = pytest.mark.netns

EXT, EXT6 = "198.18.1.2", "fd00:18:1::2"
SEEN_NAMES = ["a.blob.lab.test", "b.blob.lab.test"]
UNSEEN_NAME = "c.blob.lab.test"  # a sibling that never connected

# Watching: every connection allowed, and a rule on names so that each
# connection's name is read and recorded.
OBSERVE = """
version: 1
workloads:
  app: {cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}
intercept:
  - from: [app]
egress:
  - name: names
    to: {hosts: ["*.lab.test"]}
    action: allow
default: allow
"""


def _flows(lab: Lab, ca: Path) -> list[tuple[str, dict[str, Any]]]:
    """The workload's traffic: TLS to two sibling names, plain TCP without a name."""
    runs = [
        ("a", ["--tls", "--ca", str(ca), "--sni", SEEN_NAMES[0], EXT, "443"]),
        ("a again", ["--tls", "--ca", str(ca), "--sni", SEEN_NAMES[0], EXT, "443"]),
        ("b", ["--tls", "--ca", str(ca), "--sni", SEEN_NAMES[1], EXT, "443"]),
        ("plain", [EXT, "9000"]),
    ]
    return [(what, _client(lab, argv)) for what, argv in runs]


def _client(lab: Lab, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "egress_agent.lab.client", "--timeout", "5", *argv]
    result: dict[str, Any] = json.loads(lab.run("pod", cmd, check=False).stdout)
    return result


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _cli(lab: Lab, *args: str) -> tuple[int, str, str]:
    proc = lab.run("node", [sys.executable, "-m", "egress_agent.agent.cli", *args], check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_suggested_policy_allows_the_seen_traffic_and_nothing_else(
    lab: Lab, tmp_path: Path
) -> None:
    lab.add_pod("pod", "198.19.1.2", "fd00:19:1::2")
    lab.add_external("ext", EXT, EXT6, hostnames=[*SEEN_NAMES, UNSEEN_NAME])
    ca = make_ca(tmp_path / "ca")
    start_server(
        lab, "ext", name="ext-tls", listen=[f"{EXT}:443"], log=tmp_path / "tls.jsonl",
        tls=ca.issue(tmp_path / "ext", [*SEEN_NAMES, UNSEEN_NAME]),
    )  # fmt: skip
    start_server(
        lab, "ext", name="ext-plain", listen=[f"{EXT}:9000", f"{EXT}:9001"], tls=None,
        log=tmp_path / "plain.jsonl",
    )  # fmt: skip

    # 1. Watch the traffic under a policy that allows everything.
    observe = tmp_path / "observe.yaml"
    observe.write_text(OBSERVE)
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(lab, policy=observe, audit=audit, log=tmp_path / "observe.log")
    agent.start(timeout=90)
    try:
        flows = _flows(lab, ca.cert_path)
    finally:
        assert agent.stop() == 0
    assert all(result["ok"] for _, result in flows), flows
    # A rotation happened midway: the older half is in audit.jsonl.1.gz.
    lines = audit.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    with gzip.open(tmp_path / "audit.jsonl.1.gz", "wt") as old:
        old.writelines(lines[:2])
    audit.write_text("".join(lines[2:]))

    # 2. Suggest, and check.
    code, text, err = _cli(lab, "suggest", "--audit-log", str(audit), "--policy", str(observe))
    assert code == 0, err
    suggested = tmp_path / "suggested.yaml"
    suggested.write_text(text)
    code, out, err = _cli(lab, "check", str(suggested))
    assert code == 0, out + err
    assert "default: deny" in text and "*." not in text.split("egress:")[1]
    assert "# 3 connections, last seen" in text  # the two names, one rule
    assert "cidrs: [198.18.1.2/32], ports: [9000]" in text

    # 3. Replay under the suggestion, enforcing: nothing denied; unseen traffic is.
    enforce_audit = tmp_path / "enforce.jsonl"
    agent = AgentProcess(lab, policy=suggested, audit=enforce_audit, log=tmp_path / "enforce.log")
    agent.start(timeout=90)
    try:
        replay = _flows(lab, ca.cert_path)
        replayed = _records(enforce_audit)
        unseen_name = _client(
            lab, ["--tls", "--ca", str(ca.cert_path), "--sni", UNSEEN_NAME, EXT, "443"]
        )
        unseen_port = _client(lab, [EXT, "9001"])
    finally:
        assert agent.stop() == 0
    assert all(result["ok"] for _, result in replay), replay
    assert len(replayed) == 4
    assert [r["verdict"] for r in replayed] == ["allow"] * 4, replayed
    assert not any(r["event"] == "denied" for r in replayed)
    assert not unseen_name["ok"] and not unseen_port["ok"]
    denied = _records(enforce_audit)[4:]
    assert [(r["event"], r["rule"]) for r in denied] == [("denied", "default")] * 2
