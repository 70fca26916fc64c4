"""Live policy reload on real namespaces: every kind of edit applies within a
second, bad edits keep the running policy, and open connections survive."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit, wait_until

pytestmark = pytest.mark.netns

BASE = """
version: 1
workloads:
  pod: {{cidrs: [198.19.1.2/32]}}
intercept:
  - from: [pod]
    ports: ["9000-9010"]
egress:
  - name: stream
    to: {{ports: [9000]}}
    action: allow
{extra}
default: deny
"""
ALLOW_9001 = """  - name: open-9001
    to: {ports: [9001]}
    action: allow"""


def policy_text(*, allow_9001: bool, comment: str = "") -> str:
    return BASE.format(extra=ALLOW_9001 if allow_9001 else "") + f"# {comment}\n"


@dataclass
class Setup:
    lab: Lab
    work: Path

    def reachable(self, port: int) -> bool:
        out = self.lab.run(
            "pod",
            [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", str(port)],
            check=False,
        )
        return bool(json.loads(out.stdout)["ok"])

    def time_until_reachable(self, port: int, since: float, limit: float = 5.0) -> float:
        """Poll from inside the pod; seconds from ``since`` until a reply came."""
        code = f"""
        import socket, time
        end = time.time() + {limit}
        while time.time() < end:
            try:
                s = socket.create_connection(("198.18.1.2", {port}), timeout=1)
                s.sendall(b"x\\n")
                if s.recv(100):
                    print(time.time()); break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            print("never")
        """
        out = self.lab.run("pod", [sys.executable, "-c", textwrap.dedent(code)]).stdout.strip()
        assert out != "never", f"port {port} did not become reachable within {limit}s"
        return float(out) - since


@pytest.fixture
def setup(pod_and_sink: Lab, tmp_path: Path) -> Setup:
    return Setup(lab=pod_and_sink, work=tmp_path)


def _start(setup: Setup, policy: Path) -> Agent:
    return Agent(
        setup.lab, policy=policy, audit=setup.work / "audit.jsonl", log=setup.work / "agent.log"
    ).start()


def _audit(setup: Setup) -> list[dict[str, Any]]:
    path = setup.work / "audit.jsonl"
    return Audit(path).all()


def _in_place(path: Path, text: str) -> None:
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)


def _rename_over(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.rename(tmp, path)


def test_each_kind_of_edit_applies_within_a_second(setup: Setup) -> None:
    policy = setup.work / "policy.yaml"
    policy.write_text(policy_text(allow_9001=False))
    agent = _start(setup, policy)
    try:
        assert setup.reachable(9000) and not setup.reachable(9001)
        # In place, then rename-over.
        t0 = time.time()
        _in_place(policy, policy_text(allow_9001=True, comment="in place"))
        assert setup.time_until_reachable(9001, t0) < 1.0
        _rename_over(policy, policy_text(allow_9001=False, comment="rename"))
        deadline = time.time() + 1.0
        while setup.reachable(9001):
            assert time.time() < deadline, "rename-over edit did not apply within 1 s"
            time.sleep(0.05)
        # SIGHUP: write through a hard link in a folder nobody watches (same
        # inode, no event in the policy's folder), so only the signal applies it.
        hidden = setup.work / "elsewhere"
        hidden.mkdir()
        os.link(policy, hidden / "policy-link.yaml")
        _in_place(hidden / "policy-link.yaml", policy_text(allow_9001=True, comment="sighup"))
        # The wait is the point: half a second in which nothing may notice the
        # write (an edit the agent sees applies within a second).
        time.sleep(0.5)
        assert not setup.reachable(9001)  # not noticed without the signal
        assert agent.proc is not None
        t0 = time.time()
        os.kill(agent.proc.pid, signal.SIGHUP)
        assert setup.time_until_reachable(9001, t0) < 1.0
    finally:
        assert agent.stop() == 0
    log = (setup.work / "agent.log").read_text()
    assert "reloaded (file changed): generation 2" in log
    assert "reloaded (file changed): generation 3" in log
    assert "reloaded (SIGHUP): generation 4" in log


def test_configmap_symlink_swap_applies(setup: Setup) -> None:
    """The kubelet's layout: policy.yaml -> ..data/policy.yaml, ..data -> ..<ts>;
    an update renames a new ..data_tmp link over ..data."""
    cm = setup.work / "configmap"
    (cm / "..2026_11_25_a").mkdir(parents=True)
    (cm / "..2026_11_25_a" / "policy.yaml").write_text(policy_text(allow_9001=False))
    os.symlink("..2026_11_25_a", cm / "..data")
    os.symlink("..data/policy.yaml", cm / "policy.yaml")
    agent = _start(setup, cm / "policy.yaml")
    try:
        assert not setup.reachable(9001)
        (cm / "..2026_11_25_b").mkdir()
        new_text = policy_text(allow_9001=True, comment="configmap v2")
        (cm / "..2026_11_25_b" / "policy.yaml").write_text(new_text)
        os.symlink("..2026_11_25_b", cm / "..data_tmp")
        t0 = time.time()
        os.rename(cm / "..data_tmp", cm / "..data")
        assert setup.time_until_reachable(9001, t0) < 1.0
    finally:
        assert agent.stop() == 0
    # The connections decided under the new policy carry its generation and hash.
    last = _audit(setup)[-1]
    assert last["policy_generation"] == 2
    assert last["policy_hash"] == hashlib.sha256(new_text.encode()).hexdigest()[:16]


def test_a_bad_edit_keeps_the_running_policy(setup: Setup) -> None:
    policy = setup.work / "policy.yaml"
    good = policy_text(allow_9001=True)
    policy.write_text(good)
    agent = _start(setup, policy)
    try:
        _rename_over(policy, good.replace("to: {ports: [9001]}", "to: {ports: [9001], hots: [x]}"))
        agent.wait_reloads("failed", above=0)
        assert setup.reachable(9001) and setup.reachable(9000)  # old behaviour kept
        _rename_over(policy, "version: 1\nworkloads: [\n")  # half-written file
        agent.wait_reloads("failed", above=1)
        policy.unlink()  # deleted file
        wait_until(
            lambda: "no such file" in (setup.work / "agent.log").read_text(),
            timeout=5,
            what="the agent noticed the policy file is gone",
        )
        assert setup.reachable(9001)
        policy.write_text(policy_text(allow_9001=True, comment="fixed"))
        agent.wait_generation(above=1)
        assert setup.reachable(9001)
    finally:
        assert agent.stop() == 0
    log = (setup.work / "agent.log").read_text()
    assert f"{policy}:" in log and "unknown key 'hots'" in log
    assert "keeping policy generation 1" in log
    assert "no such file" in log
    assert "reloaded (file changed): generation 2" in log
    assert [r["policy_generation"] for r in _audit(setup)][-1] == 2


def test_a_long_transfer_survives_ten_reloads(setup: Setup) -> None:
    policy = setup.work / "policy.yaml"
    policy.write_text(policy_text(allow_9001=False))
    agent = _start(setup, policy)
    code = """
    import socket, sys, threading, time
    s = socket.create_connection(("198.18.1.2", 9000), timeout=20)
    got = 0
    def read():                              # the server echoes: read while sending
        global got
        while data := s.recv(1 << 16):
            got += len(data)
    reader = threading.Thread(target=read)
    reader.start()
    chunk = bytes(range(256)) * 256          # 64 KiB
    sent = 0
    done = threading.Event()                 # a line on stdin: the reloads are over
    threading.Thread(target=lambda: (sys.stdin.readline(), done.set())).start()
    while not done.is_set() or sent < 2_000_000:  # keep streaming while reloads happen
        s.sendall(chunk); sent += len(chunk)
        time.sleep(0.02)                     # a steady stream, not a flood
    s.shutdown(socket.SHUT_WR)
    reader.join()
    print(sent, got)
    """
    try:
        assert agent.proc is not None
        client = setup.lab.popen(
            "pod",
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=-1,
            stdout=-1,
            stderr=-1,
            text=True,
        )
        wait_until(
            lambda: agent.status()["connections_open"] >= 1,
            timeout=10,
            what="the stream is relayed",
        )
        for i in range(10):
            _rename_over(policy, policy_text(allow_9001=i % 2 == 0, comment=f"reload {i}"))
            agent.wait_generation(above=i + 1)
        assert client.poll() is None, "the stream ended before the reloads did"
        out, err = client.communicate("done\n", timeout=60)
    finally:
        assert agent.stop() == 0
    assert client.returncode == 0, err
    sent, got = (int(x) for x in out.split())
    # The server answers one line, then echoes everything after the first line.
    assert sent > 1_000_000 and got >= sent
    log = (setup.work / "agent.log").read_text()
    assert "generation 11" in log
    (rec,) = [r for r in _audit(setup) if r["dst"] == "198.18.1.2:9000"]
    assert rec["event"] == "closed" and rec["error"] is None
    assert rec["bytes_up"] == sent and rec["policy_generation"] == 1


@pytest.mark.parametrize("mode", ["keep", "close"])
def test_open_connections_the_new_policy_denies(setup: Setup, mode: str) -> None:
    """on_reload.denied_connections: keep lets them run; close resets them and
    says which reload and rule did it."""
    policy = setup.work / "policy.yaml"
    header = f"on_reload: {{denied_connections: {mode}}}\n"
    policy.write_text(header + policy_text(allow_9001=True))
    agent = _start(setup, policy)
    code = """
    import socket, sys, time
    s = socket.create_connection(("198.18.1.2", 9001), timeout=5)
    s.sendall(b"first\\n")
    s.recv(100)                              # the server's line: relayed
    print("connected", flush=True)
    sys.stdin.readline()                     # wait until the policy was reloaded
    try:
        s.sendall(b"after reload\\n")
        print("echo" if s.recv(100) else "eof", flush=True)
    except OSError as exc:
        print(type(exc).__name__, flush=True)
    """
    try:
        client = setup.lab.popen(
            "pod",
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=-1,
            stdout=-1,
            stderr=-1,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "connected"
        _rename_over(policy, header + policy_text(allow_9001=False))
        wait_until(
            lambda: "generation 2" in (setup.work / "agent.log").read_text(),
            timeout=3,
            what="the reload (its connections handled) is logged",
        )
        client.stdin.write("go\n")
        client.stdin.flush()
        outcome = client.stdout.readline().strip()
        client.wait(10)
        assert not setup.reachable(9001)  # new connections follow the new policy
    finally:
        assert agent.stop() == 0
    rec = [r for r in _audit(setup) if r["dst"] == "198.18.1.2:9001" and r["verdict"] == "allow"]
    assert len(rec) == 1
    if mode == "keep":
        assert outcome == "echo" and rec[0]["error"] is None
    else:
        assert outcome in ("ConnectionResetError", "eof", "BrokenPipeError"), outcome
        assert rec[0]["error"] == "closed by reload to policy generation 2: rule default denies it"
        assert "closed 1 open connections it denies" in (setup.work / "agent.log").read_text()
