"""``egress-agent flows`` against a running agent: two connections held open
through it (one to a named destination over TLS, one raw TCP) are listed
with their workload, addresses, name, rule, verdict and byte counts that
grow as bytes flow; filters narrow the list; ``--follow`` prints the audit
records of the connections as they close."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from egress_agent.lab.tls import make_ca

pytestmark = pytest.mark.netns

EXT, EXT6 = "198.18.1.2", "fd00:18:1::2"
POD = "198.19.1.2"
NAME = "a.blob.lab.test"

POLICY = """
version: 1
workloads:
  app: {cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}
intercept:
  - from: [app]
egress:
  - name: blobs
    to: {hosts: [a.blob.lab.test], ports: [443]}
    action: allow
default: allow
"""

# Holds a TLS connection (with SNI) and a raw one open; on each line of
# input: "more" sends 1000 bytes on both and reads them back, "close raw" /
# "close tls" ends one. Says "ok" after each step.
HOLDER = """
import socket, ssl, sys
ca, ext, name = sys.argv[1:]
raw = socket.create_connection((ext, 9000), timeout=5)
ctx = ssl.create_default_context(cafile=ca)
tls = ctx.wrap_socket(socket.create_connection((ext, 443), timeout=5), server_hostname=name)
for s in (raw, tls):
    s.sendall(b"hello\\n")
    assert b"saw" in s.recv(200)

def echo(s, n):
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        got += len(s.recv(n))

print("ok", flush=True)
for line in sys.stdin:
    what = line.strip()
    if what == "more":
        echo(raw, 1000); echo(tls, 1000)
    elif what == "close raw":
        raw.shutdown(socket.SHUT_WR); raw.recv(100); raw.close()
    elif what == "close tls":
        tls.close()
    print("ok", flush=True)
"""


def _cli(lab: Lab, *args: str) -> tuple[int, str, str]:
    proc = lab.run("node", [sys.executable, "-m", "egress_agent.agent.cli", *args], check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _flows(lab: Lab, *filters: str) -> list[dict[str, Any]]:
    code, out, err = _cli(lab, "flows", "--json", *filters)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _by_port(flows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(f["dst"].rsplit(":", 1)[1]): f for f in flows}


class Lines:
    """A process's output lines, read with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)

    def next(self, timeout: float = 10.0) -> str:
        return self._queue.get(timeout=timeout).rstrip("\n")


def test_flows_lists_open_connections_and_follows_their_records(lab: Lab, tmp_path: Path) -> None:
    lab.add_pod("pod", POD, "fd00:19:1::2")
    lab.add_external("ext", EXT, EXT6, hostnames=[NAME])
    ca = make_ca(tmp_path / "ca")
    start_server(
        lab, "ext", name="ext-tls", listen=[f"{EXT}:443"], log=tmp_path / "tls.jsonl",
        tls=ca.issue(tmp_path / "ext", [NAME]),
    )  # fmt: skip
    start_server(
        lab, "ext", name="ext-raw", listen=[f"{EXT}:9000"], tls=None, log=tmp_path / "raw.jsonl"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit = tmp_path / "audit.jsonl"
    agent = AgentProcess(lab, policy=policy, audit=audit, log=tmp_path / "agent.log")
    agent.start(timeout=90)
    holder = lab.popen(
        "pod",
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(ca.cert_path), EXT, NAME],
        stdin=-1, stdout=-1, text=True,
    )  # fmt: skip
    follow = None
    try:
        assert holder.stdin is not None and holder.stdout is not None
        said = Lines(holder.stdout)

        def step(what: str) -> None:
            assert holder.stdin is not None
            holder.stdin.write(what + "\n")
            holder.stdin.flush()
            assert said.next() == "ok", what

        assert said.next(20) == "ok"

        # Both listed, with what each is.
        flows = _by_port(_flows(lab))
        assert sorted(flows) == [443, 9000], flows
        tls, raw = flows[443], flows[9000]
        for flow in (tls, raw):
            assert flow["workload"] == "app" and flow["verdict"] == "allow"
            assert flow["state"] == "open"
            assert flow["src"].startswith(f"{POD}:") and flow["age_s"] > 0
            assert flow["bytes_up"] > 0 and flow["bytes_down"] > 0
        assert (tls["server_name"], tls["rule"], tls["protocol"]) == (NAME, "blobs", "tls")
        assert (raw["server_name"], raw["rule"], raw["protocol"]) == (None, "default", "tcp")
        assert raw["bytes_up"] == len("hello\n")  # what the client sent, nothing else

        # Bytes counted as they flow, while the connections stay open.
        step("more")
        grown = _by_port(_flows(lab))
        assert grown[9000]["bytes_up"] == raw["bytes_up"] + 1000
        assert grown[9000]["bytes_down"] == raw["bytes_down"] + 1000
        assert grown[443]["bytes_up"] > tls["bytes_up"] + 1000  # TLS records carry more
        assert grown[443]["bytes_down"] > tls["bytes_down"] + 1000
        assert grown[443]["age_s"] > tls["age_s"]

        # Filters.
        assert [f["dst"] for f in _flows(lab, "--name", "*.lab.test")] == [f"{EXT}:443"]
        assert [f["dst"] for f in _flows(lab, "--rule", "default")] == [f"{EXT}:9000"]
        assert len(_flows(lab, "--workload", "app", "--verdict", "allow")) == 2
        assert _flows(lab, "--workload", "other") == []
        assert _flows(lab, "--verdict", "deny") == []

        # The table.
        code, table, err = _cli(lab, "flows", "--rule", "blobs")
        assert code == 0, err
        header, row, total = table.splitlines()
        assert header.split()[:4] == ["WORKLOAD", "SOURCE", "DESTINATION", "NAME"]
        assert row.split()[2:6] == [f"{EXT}:443", NAME, "blobs", "allow"]
        assert total == "1 open (1 more not matching the filters)"

        # --follow: the open flows, then each record as its connection closes
        # (the audit log is the one the agent names).
        follow = lab.popen(
            "node",
            [sys.executable, "-m", "egress_agent.agent.cli", "flows", "--follow", "--json"],
            stdout=-1, stderr=-1, text=True,
        )  # fmt: skip
        assert follow.stdout is not None
        followed = Lines(follow.stdout)
        listed = [json.loads(followed.next(20)) for _ in range(2)]
        assert {f["state"] for f in listed} == {"open"}
        step("close raw")
        closed_raw = json.loads(followed.next())
        assert (closed_raw["event"], closed_raw["dst"]) == ("closed", f"{EXT}:9000")
        assert closed_raw["bytes_up"] == raw["bytes_up"] + 1000
        step("close tls")
        closed_tls = json.loads(followed.next())
        assert (closed_tls["event"], closed_tls["dst"]) == ("closed", f"{EXT}:443")
        assert (closed_tls["server_name"], closed_tls["rule"]) == (NAME, "blobs")
        follow.send_signal(signal.SIGINT)
        try:
            code = follow.wait(30)
        except subprocess.TimeoutExpired:
            follow.kill()
            _, err = follow.communicate()
            raise AssertionError(f"flows --follow did not stop on SIGINT: {err}") from None
        assert code == 0
        assert _flows(lab) == []
    finally:
        for proc in (holder, follow):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        assert agent.stop() == 0
