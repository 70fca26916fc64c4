"""Audit records are written in groups; stopping the agent (SIGTERM) while
connections are open still leaves exactly one record for each of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit

pytestmark = pytest.mark.netns

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

# Opens COUNT relayed connections (each answered once, so the relay is wired
# end to end), prints their source ports, then holds them until stdin closes.
HOLD = """
import json, socket, sys
COUNT = int(sys.argv[1])
held = []
for _ in range(COUNT):
    s = socket.create_connection(("198.18.1.2", 9000), timeout=20)
    s.sendall(b"hello\\n")
    if not s.recv(100):
        raise SystemExit("closed without an answer")
    held.append(s)
print(json.dumps(sorted(s.getsockname()[1] for s in held)), flush=True)
sys.stdin.read()
"""


def test_sigterm_with_open_connections_leaves_one_record_each(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    agent = Agent(
        lab,
        policy=tmp_path / "policy.yaml",
        audit=tmp_path / "audit.jsonl",
        log=tmp_path / "agent.log",
    ).start()
    audit = Audit(tmp_path / "audit.jsonl")
    count = 60
    client = lab.popen(
        "pod", [sys.executable, "-c", HOLD, str(count)], stdin=-1, stdout=-1, stderr=-1, text=True
    )
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line, client.stderr.read() if client.stderr else ""
        ports = json.loads(line)
        assert audit.records() == []  # all still open: nothing recorded yet
        # SIGTERM: the proxy ends all 60 at once, their records queue in one
        # group, and the agent exits right after.
        assert agent.stop(timeout=60) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()
    text = (tmp_path / "audit.jsonl").read_text()
    assert text.endswith("\n")  # whole lines only
    records = audit.records()
    got = sorted(int(r["src"].rpartition(":")[2]) for r in records)
    assert got == ports, records
    assert {r["event"] for r in records} == {"closed"}


# Like HOLD, then closes every connection at once on a line on stdin (the
# server answers each FIN with its own: clean ends both ways).
HOLD_THEN_CLOSE = HOLD.replace(
    "sys.stdin.read()",
    """sys.stdin.readline()
for s in held:
    s.shutdown(socket.SHUT_WR)
for s in held:
    s.recv(100)
    s.close()
print("closed", flush=True)
sys.stdin.read()""",
)


def test_a_handover_loses_no_record_of_the_connections_drained(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    # The predecessor drains its connections and exits as soon as the last
    # one ends: the records of connections ending together are one group,
    # written before it exits.
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)

    def agent(name: str) -> Agent:
        return Agent(
            lab,
            policy=tmp_path / "policy.yaml",
            audit=tmp_path / "audit.jsonl",
            log=tmp_path / f"{name}.log",
        )

    old = agent("old").start()
    new = agent("new")
    audit = Audit(tmp_path / "audit.jsonl")
    count = 60
    client = lab.popen(
        "pod",
        [sys.executable, "-c", HOLD_THEN_CLOSE, str(count)],
        stdin=-1,
        stdout=-1,
        stderr=-1,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line, client.stderr.read() if client.stderr else ""
        ports = json.loads(line)
        new.start()  # takes the listening sockets; the old one drains
        assert audit.records() == []
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "closed"
        assert old.proc is not None and old.proc.wait(timeout=60) == 0
        records = audit.records()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        if new.proc is not None:
            new.stop(timeout=60)
        if old.proc is not None and old.proc.poll() is None:
            old.kill()
    assert "drained: every connection has ended" in (tmp_path / "old.log").read_text()
    got = sorted(int(r["src"].rpartition(":")[2]) for r in records)
    assert got == ports, records
    assert {r["event"] for r in records} == {"closed"}
    assert (tmp_path / "audit.jsonl").read_text().endswith("\n")
