"""Restarting the agent: a new one takes the listening sockets over from the
running one (agent.handover); nothing is refused, nothing relayed is cut."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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

# Streams to the echoing sink while it is relayed, until told to stop (and
# at least 2 MB), and verifies every byte came back.
STREAM = """
import socket, threading, time
s = socket.create_connection(("198.18.1.2", 9000), timeout=20)
got = 0
def read():
    global got
    while data := s.recv(1 << 16):
        got += len(data)
reader = threading.Thread(target=read)
reader.start()
chunk = bytes(range(256)) * 256
sent = 0
while not stop.is_set() or sent < 2_000_000:
    s.sendall(chunk); sent += len(chunk)
    time.sleep(0.02)                     # a steady stream, not a flood
s.shutdown(socket.SHUT_WR)
reader.join()
print(json.dumps({"sent": sent, "got": got}))
"""

# Opens a new connection every 20 ms until told to stop; counts what failed.
PROBE = """
import socket, time
ok, failed, errors = 0, 0, []
while not stop.is_set():
    try:
        with socket.create_connection(("198.18.1.2", 9000), timeout=5) as s:
            s.sendall(b"probe\\n")
            if not s.recv(100):
                raise ConnectionError("closed without an answer")
        ok += 1
    except OSError as exc:
        failed += 1; errors.append(repr(exc))
    time.sleep(0.02)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""


# The scripts run until a line on their stdin says stop: the test stops them
# once what it waits for happened, however long an agent took to start.
STOP_ON_STDIN = """
import json, sys, threading
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
"""


def _script(body: str) -> str:
    return STOP_ON_STDIN + textwrap.dedent(body)


def _popen(lab: Lab, body: str) -> subprocess.Popen[str]:
    return lab.popen(
        "pod", [sys.executable, "-c", _script(body)], stdin=-1, stdout=-1, stderr=-1, text=True
    )


def _probes_ended(audit: Audit, count: int) -> None:
    """Wait until ``count`` more probe connections have ended (been recorded)."""
    target = audit.mark() + count
    audit.wait(target, timeout=60)


def _agent(lab: Lab, work: Path, name: str, *args: str) -> Agent:
    return Agent(
        lab,
        policy=work / "policy.yaml",
        audit=work / "audit.jsonl",
        log=work / f"{name}.log",
        extra_args=args,
    )


def _ruleset(lab: Lab) -> str:
    text = lab.run("node", ["nft", "list", "table", "inet", "egress_agent"]).stdout
    return re.sub(r"packets \d+ bytes \d+", "packets N bytes N", text)


def _tables(lab: Lab) -> str:
    return lab.run("node", ["nft", "list", "tables"]).stdout


def test_a_new_agent_takes_over_without_refusing_or_cutting(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    old = _agent(lab, tmp_path, "old").start()
    ruleset = _ruleset(lab)
    new = _agent(lab, tmp_path, "new")
    audit = Audit(tmp_path / "audit.jsonl")
    stream = _popen(lab, STREAM)
    probe = _popen(lab, PROBE)
    try:
        _probes_ended(audit, 10)  # both under way through the old agent
        new.start()
        _probes_ended(audit, 50)  # and on through the new one
        out, err = stream.communicate("stop\n", timeout=60)
        assert stream.returncode == 0, err
        moved = json.loads(out)
        out, err = probe.communicate("stop\n", timeout=30)
        assert probe.returncode == 0, err
        probed = json.loads(out)
        # The old agent drained its last connection (the stream) and left.
        assert old.proc is not None and old.proc.wait(timeout=10) == 0
        assert _ruleset(lab) == ruleset
        n = len(audit.all())
        out = lab.run(
            "pod", [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", "9000"]
        ).stdout
        assert json.loads(out)["ok"]
        audit.wait(1, after=n)  # still diverted: recorded
    finally:
        for proc in (stream, probe):
            if proc.poll() is None:
                proc.kill()
        new.stop()
        if old.proc is not None and old.proc.poll() is None:
            old.kill()
    # Nothing refused, nothing cut: every byte of the stream came back.
    assert probed["failed"] == 0 and probed["ok"] > 50, probed
    assert moved["sent"] > 1_000_000 and moved["got"] >= moved["sent"], moved
    old_log = (tmp_path / "old.log").read_text()
    new_log = (tmp_path / "new.log").read_text()
    assert f"handed over to pid {new.proc.pid}" in old_log  # type: ignore[union-attr]
    assert "drained: every connection has ended" in old_log
    assert f"took over 2 listening sockets from the agent with pid {old.proc.pid}" in new_log  # type: ignore[union-attr]
    # Every connection got exactly one audit record, from one agent or the other.
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == probed["ok"] + 2
    assert len({(r["src"], r["time"]) for r in records}) == len(records)
    (long,) = [r for r in records if r["bytes_up"] > 1_000_000]
    assert long["event"] == "closed" and long["bytes_up"] >= moved["sent"]
    assert "egress_agent" not in _tables(lab)  # the last one stopping removed the table


def test_a_fail_open_agent_hands_its_owned_table_over(pod_and_sink: Lab, tmp_path: Path) -> None:
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY + "fail: open\n")
    old = _agent(lab, tmp_path, "old").start()
    new = _agent(lab, tmp_path, "new").start()
    try:
        assert old.proc is not None and old.proc.wait(timeout=10) == 0  # nothing to drain
        assert "egress_agent" in _tables(lab)
        new.kill()  # the table belonged to the new agent: the kernel removes it with it
        assert "egress_agent" not in _tables(lab)
    finally:
        if new.proc is not None and new.proc.poll() is None:
            new.stop()


def test_without_handover_a_second_agent_says_the_ports_are_taken(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    first = _agent(lab, tmp_path, "first").start()
    try:
        with pytest.raises(RuntimeError) as exc:
            _agent(lab, tmp_path, "second", "--no-handover").start()
        assert "already in use" in str(exc.value)  # the first one holds the ports
        assert first.proc is not None and first.proc.poll() is None  # untouched
    finally:
        assert first.stop() == 0


# One connection at a time, back to back, until told to stop: how long each waited
# for the sink's answer, and whether the sink saw the pod itself (direct).
LATENCY_PROBE = """
import socket, time
waits, failed, direct, errors = [], 0, 0, []
while not stop.is_set():
    t0 = time.monotonic()
    try:
        with socket.create_connection(("198.18.1.2", 9000), timeout=15) as s:
            s.sendall(b"probe\\n")
            reply = s.recv(200).decode()
        if " saw " not in reply:
            raise ConnectionError("no answer")
        waits.append(time.monotonic() - t0)
        if " saw 198.19.1.2:" in reply:
            direct += 1
    except OSError as exc:
        failed += 1; errors.append(repr(exc))
print(json.dumps({"ok": len(waits), "failed": failed, "direct": direct,
                  "longest": max(waits or [0]), "errors": errors[:5]}))
"""

# The longest any new connection may wait across a handover. Without one a
# connection here is answered in milliseconds; a successor that starts in
# seconds (compiling its BPF program) must not show through.
HANDOVER_WAIT_BOUND = 1.0


@pytest.mark.parametrize("datapath", ["bpf", "nft"])
def test_no_new_connection_waits_for_the_successor_to_start(
    pod_and_sink: Lab, tmp_path: Path, datapath: str
) -> None:
    """The predecessor accepts and serves until its successor accepts: a pod
    connecting continuously across the handover never waits for the
    successor's start-up (policy, BPF compile and attach, table)."""
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    pins = f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}"
    args = ("--datapath", datapath, "--bpf-pin-dir", pins)
    old = _agent(lab, tmp_path, "old", *args).start(timeout=60)
    new = _agent(lab, tmp_path, "new", *args)
    audit = Audit(tmp_path / "audit.jsonl")
    probe = _popen(lab, LATENCY_PROBE)
    try:
        _probes_ended(audit, 20)  # under way through the old agent
        new.start(timeout=60)
        _probes_ended(audit, 81)  # and on through the new one (more than 100 in all)
        out, err = probe.communicate("stop\n", timeout=60)
        assert probe.returncode == 0, err
        probed = json.loads(out)
        assert old.proc is not None and old.proc.wait(timeout=10) == 0
    finally:
        if probe.poll() is None:
            probe.kill()
        new.stop()
        if old.proc is not None and old.proc.poll() is None:
            old.kill()
    print(f"handover ({datapath}): {probed}")
    assert probed["failed"] == 0 and probed["direct"] == 0, probed
    assert probed["ok"] > 100, probed
    assert probed["longest"] < HANDOVER_WAIT_BOUND, probed
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == probed["ok"], (len(records), probed)


# Holds the CONNECT port a doomed successor's policy asks for, on the
# proxy's own address, so that its start-up fails after the takeover.
HOLD_PORT = """
import socket, sys, time
s = socket.socket()
s.bind(("169.254.99.1", 3128))
s.listen()
print("held", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _serves_on(lab: Lab, tmp_path: Path, old: Agent, doomed: Agent) -> tuple[dict[str, Any], str]:
    """Start ``doomed`` against the running ``old`` while a pod connects
    continuously; the doomed start must fail and ``old`` must serve on with
    its kernel state, refusing, delaying and leaking nothing."""
    ruleset = _ruleset(lab)
    audit = Audit(tmp_path / "audit.jsonl")
    probe = _popen(lab, LATENCY_PROBE)
    try:
        _probes_ended(audit, 10)  # under way
        with pytest.raises(RuntimeError, match="exited with"):
            doomed.start(timeout=60)
        _probes_ended(audit, 20)  # and on after the failed start
        out, err = probe.communicate("stop\n", timeout=60)
        assert probe.returncode == 0, err
        probed: dict[str, Any] = json.loads(out)
        assert old.proc is not None and old.proc.poll() is None  # still the agent
        assert _ruleset(lab) == ruleset
    finally:
        if probe.poll() is None:
            probe.kill()
        old.stop()
    assert probed["failed"] == 0 and probed["direct"] == 0, probed
    assert probed["longest"] < HANDOVER_WAIT_BOUND, probed
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == probed["ok"]
    return probed, (tmp_path / "old.log").read_text()


def test_a_successor_that_cannot_load_its_datapath_leaves_the_predecessor_alone(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    """The successor's BPF datapath cannot pin where it is told to: it fails
    while loading, before it asks for the sockets, and leaves the kernel state
    (the predecessor's table) as it was."""
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    old = _agent(lab, tmp_path, "old", "--datapath", "nft").start()
    doomed = _agent(
        lab, tmp_path, "doomed", "--datapath", "bpf", "--bpf-pin-dir", "/proc/egress-agent-no"
    )
    _, old_log = _serves_on(lab, tmp_path, old, doomed)
    assert "listening sockets" not in old_log  # never asked for them
    assert (
        "BPF pin folder /proc/egress-agent-no: not on bpffs"
        in (tmp_path / "doomed.log").read_text()
    )


def test_a_successor_that_fails_after_taking_the_sockets_leaves_the_predecessor_serving(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    """The successor takes the sockets, then its start-up fails (the CONNECT
    port its policy asks for is taken): the predecessor, which never stopped
    accepting, serves on and keeps the kernel state."""
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "doomed.yaml").write_text(POLICY + "connect: {port: 3128}\n")
    old = _agent(lab, tmp_path, "old", "--datapath", "nft").start()
    holder = lab.popen("node", [sys.executable, "-c", HOLD_PORT, "60"], stdout=-1, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        doomed = Agent(
            lab,
            policy=tmp_path / "doomed.yaml",
            audit=tmp_path / "audit.jsonl",
            log=tmp_path / "doomed.log",
            extra_args=("--datapath", "nft"),
        )
        _, old_log = _serves_on(lab, tmp_path, old, doomed)
    finally:
        holder.kill()
        holder.wait()
    assert "stopped before accepting: serving on" in old_log
    assert "cannot listen on 169.254.99.1:3128" in (tmp_path / "doomed.log").read_text()
