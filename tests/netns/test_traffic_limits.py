"""Limits and circuit breakers of egress rules, with real clients (curl,
Python's http.client) through the transparent path, judged by what the
server received and by the audit log.

Topology: pod ``app`` (198.19.7.2), external host ``web`` (198.18.7.2, named
web.example) running ``tests/lab/httpupstream.py`` on 80, 8080, 8081 and
8082, which answers with the status written in a file (a server that fails
on demand); nothing listens on 9090 until a test starts a server there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit, wait_until
from tests.lab.httpupstream import requests_seen, start_http_upstream

pytestmark = pytest.mark.netns

WEB = "198.18.7.2"
NAME = "web.example"

POLICY = f"""\
version: 1
proxy: {{port: 15001, connect_timeout: 2, idle_timeout: 60}}
workloads:
  app: {{cidrs: [198.19.7.2/32]}}
intercept:
  - from: [app]
    ports: [80, 8080, 8081, 8082, 9090]
egress:
  - name: capped
    to: {{cidrs: [{WEB}/32], ports: [8080]}}
    action: allow
    limits: {{connections: 2, per: workload}}
  - name: rated
    to: {{cidrs: [{WEB}/32], ports: [8081]}}
    action: allow
    limits: {{rate: "3/h", burst: 3}}
  - name: api
    to: {{hosts: [{NAME}], ports: [80]}}
    action: allow
    http: {{}}
    limits: {{requests: {{rate: "2/h", burst: 2}}}}
  - name: api-breaker
    to: {{hosts: [{NAME}], ports: [8082]}}
    action: allow
    http: {{}}
    breaker: {{consecutive_failures: 2, open_for: 3s}}
  - name: tcp-breaker
    to: {{cidrs: [{WEB}/32], ports: [9090]}}
    action: allow
    breaker: {{consecutive_failures: 2, open_for: 3s}}
default: deny
connect: {{port: 3128}}
"""
PROXY = "http://169.254.99.1:3128"


@dataclass
class World:
    lab: Lab
    work: Path
    agent: Agent
    audit: Audit
    upstream_log: Path
    status_file: Path
    policy: Path

    def seen(self, log: Path | None = None) -> list[str]:
        """The targets of the requests the server received."""
        return [r["target"] for r in requests_seen(log or self.upstream_log)]

    def curl(self, url: str) -> tuple[int, str]:
        """curl from the pod: its exit code and the status it printed."""
        proc = self.lab.run(
            "app",
            ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", url],
            check=False,
        )
        return proc.returncode, proc.stdout.strip()

    def py(self, code: str) -> Any:
        proc = self.lab.run("app", [sys.executable, "-c", textwrap.dedent(code)], check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def breaker(self, rule: str) -> dict[str, Any] | None:
        for b in self.agent.status()["traffic"]["breakers"]:
            if b["rule"] == rule:
                return dict(b)
        return None

    def wait_probe_due(self, rule: str) -> None:
        """Wait until the rule's open breaker lets a probe through."""
        wait_until(
            lambda: (b := self.breaker(rule)) is not None
            and b["state"] == "open"
            and b["probe_in_s"] == 0,
            timeout=10,
            what=f"the breaker of {rule} due for a probe",
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("limits")
    with Lab() as lab:
        lab.add_pod("app", "198.19.7.2", "fd00:19:7::2")
        lab.add_external("web", WEB, "fd00:18:7::2", hostnames=[NAME])
        log = work / "upstream.jsonl"
        status_file = work / "status"
        status_file.write_text("")
        start_http_upstream(
            lab,
            "web",
            listen=[f"{WEB}:{port}" for port in (80, 8080, 8081, 8082)],
            tls=None,
            log=log,
            status_file=status_file,
        )
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        audit = work / "audit.jsonl"
        agent = Agent(lab, policy=policy, audit=audit, log=work / "agent.log").start()
        try:
            yield World(
                lab=lab, work=work, agent=agent, audit=Audit(audit), upstream_log=log,
                status_file=status_file, policy=policy,
            )  # fmt: skip
        finally:
            agent.stop()


def test_connections_over_the_limit_are_reset_and_the_server_never_sees_them(
    world: World,
) -> None:
    mark = world.audit.mark()
    got = world.py(
        f"""
        import json, socket
        def get(s, path):
            s.sendall(f"GET {{path}} HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n".encode())
            try:
                return s.recv(65536).split(b"\\r\\n", 1)[0].decode() or "closed"
            except ConnectionResetError:
                return "reset"
        held = [socket.create_connection(({WEB!r}, 8080), timeout=10) for _ in range(2)]
        out = [get(s, f"/c{{i}}") for i, s in enumerate(held)]
        third = socket.create_connection(({WEB!r}, 8080), timeout=10)
        out.append(get(third, "/c2"))
        held[0].close()
        import time
        time.sleep(0.5)  # the proxy sees the close
        fourth = socket.create_connection(({WEB!r}, 8080), timeout=10)
        out.append(get(fourth, "/c3"))
        print(json.dumps(out))
        """
    )
    assert got[0].startswith("HTTP/1.1 200") and got[1].startswith("HTTP/1.1 200")
    assert got[2] == "reset"
    assert got[3].startswith("HTTP/1.1 200")
    assert [t for t in world.seen() if t.startswith("/c")] == ["/c0", "/c1", "/c3"]
    refused = world.audit.wait_for(lambda r: r["rule"] == "capped" and r["event"] == "denied",
                                   after=mark)  # fmt: skip
    assert refused["limit"] == "connections" and refused["limit_value"] == "2"
    assert refused["workload"] == "app" and refused["verdict"] == "deny"
    assert "2 connections open for rule capped and workload app" in refused["error"]
    metrics = world.agent.metrics()
    key = 'egress_agent_limited_total{limit="connections",rule="capped",workload="app"}'
    assert metrics[key] == 1


def test_new_connections_over_the_rate_are_reset(world: World) -> None:
    mark = world.audit.mark()
    results = [world.curl(f"http://{WEB}:8081/r{i}") for i in range(5)]
    assert results[:3] == [(0, "200")] * 3
    for code, status in results[3:]:
        assert code != 0 and status == "000", results  # reset before any response
    assert [t for t in world.seen() if t.startswith("/r")] == ["/r0", "/r1", "/r2"]
    records = world.audit.wait(5, after=mark)
    refused = [r for r in records if r["event"] == "denied"]
    assert len(refused) == 2
    for r in refused:
        assert (r["rule"], r["limit"], r["limit_value"]) == ("rated", "rate", "3/h, burst 3")
    metrics = world.agent.metrics()
    assert metrics['egress_agent_limited_total{limit="rate",rule="rated",workload="app"}'] == 2


def test_a_connect_over_the_rate_gets_429_with_retry_after(world: World) -> None:
    # The rate test above emptied the bucket of rule rated (3/h).
    mark = world.audit.mark()
    proc = world.lab.run(
        "app",
        ["curl", "-sS", "--max-time", "10", "-p", "--proxy", PROXY, "-o", "/dev/null",
         "-D", "-", "-w", "%{http_connect}", f"http://{WEB}:8081/via-connect"],
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stdout.endswith("429"), (proc.stdout, proc.stderr)
    retry = [ln for ln in proc.stdout.splitlines() if ln.lower().startswith("retry-after:")]
    assert retry and int(retry[0].split(":")[1]) >= 1, proc.stdout
    assert "/via-connect" not in world.seen()
    record = world.audit.wait_for(lambda r: r.get("via") == "connect", after=mark)
    assert (record["event"], record["rule"], record["limit"]) == ("denied", "rated", "rate")


def test_requests_over_the_limit_get_429_and_the_connection_goes_on(world: World) -> None:
    got = world.py(
        f"""
        import http.client, json
        c = http.client.HTTPConnection({NAME!r}, 80, timeout=10)
        out = []
        for i in range(4):
            c.request("GET", f"/q{{i}}")
            r = c.getresponse()
            r.read()
            out.append([r.status, r.getheader("Retry-After"), r.getheader("Connection")])
        c.close()
        print(json.dumps(out))
        """
    )
    assert [g[0] for g in got] == [200, 200, 429, 429]
    for _status, retry_after, connection in got[2:]:
        # 2/h, burst 2: the next token in half an hour.
        assert retry_after is not None and 1700 <= int(retry_after) <= 1800
        assert connection is None  # not "close": the client keeps the connection
    assert [t for t in world.seen() if t.startswith("/q")] == ["/q0", "/q1"]
    conn = world.audit.wait_for(lambda r: r["rule"] == "api" and r.get("requests") == 4)
    assert conn["event"] == "closed"  # one connection carried all four
    requests = [
        r for r in world.audit.all() if r["event"] == "request" and r["connection"] == conn["id"]
    ]
    assert [r["status"] for r in requests] == [200, 200, 429, 429]
    assert requests[2]["limit"] == "requests"
    assert requests[2]["limit_value"] == "2/h, burst 2"
    metrics = world.agent.metrics()
    assert metrics['egress_agent_limited_total{limit="requests",rule="api",workload="app"}'] == 2


def test_an_http_breaker_opens_on_5xx_fails_fast_and_a_probe_closes_it(world: World) -> None:
    url = f"http://{NAME}:8082"
    world.status_file.write_text("500")
    try:
        assert [world.curl(f"{url}/b{i}") for i in range(2)] == [(0, "500")] * 2
        assert world.breaker("api-breaker") == {
            "rule": "api-breaker", "destination": f"{NAME}:8082", "state": "open",
            "failures": 2, "probe_in_s": pytest.approx(3, abs=1),
        }  # fmt: skip
        assert world.curl(f"{url}/b2") == (0, "503")  # fast: the server never sees it
        # After open_for the next request is the probe; the server still fails.
        world.wait_probe_due("api-breaker")
        assert world.curl(f"{url}/b3") == (0, "500")
        assert world.curl(f"{url}/b4") == (0, "503")  # open again
    finally:
        world.status_file.write_text("")
    world.wait_probe_due("api-breaker")
    assert world.curl(f"{url}/b5") == (0, "200")  # the probe succeeds: closed
    assert world.curl(f"{url}/b6") == (0, "200")
    assert world.breaker("api-breaker") is None  # closed, nothing to remember
    assert [t for t in world.seen() if t.startswith("/b")] == ["/b0", "/b1", "/b3", "/b5", "/b6"]
    fast = [
        r for r in world.audit.all()
        if r["event"] == "request" and r["rule"] == "api-breaker" and r["status"] == 503
    ]  # fmt: skip
    assert [r["path"] for r in fast] == ["/b2", "/b4"]
    assert fast[0]["limit"] == "breaker"
    assert fast[0]["limit_value"] == "2 consecutive failures, open_for 3s"
    assert f"circuit breaker open for {NAME}:8082" in fast[0]["error"]
    metrics = world.agent.metrics()
    moved = (
        'egress_agent_breaker_transitions_total{{destination="{}:8082",rule="api-breaker",to="{}"}}'
    )
    assert metrics[moved.format(NAME, "open")] == 2
    assert metrics[moved.format(NAME, "half-open")] == 2
    assert metrics[moved.format(NAME, "closed")] == 1
    state = 'egress_agent_breaker_state{{destination="{}:8082",rule="api-breaker",state="{}"}}'
    assert metrics[state.format(NAME, "closed")] == 1
    assert metrics[state.format(NAME, "open")] == 0


def test_a_half_open_breaker_lets_exactly_one_probe_through(world: World) -> None:
    url = f"http://{NAME}:8082"
    world.status_file.write_text("500")
    try:
        assert [world.curl(f"{url}/h{i}") for i in range(2)] == [(0, "500")] * 2
        world.wait_probe_due("api-breaker")
        world.status_file.write_text("")
        # The probe takes two seconds to be answered; others meanwhile fail fast.
        probe = world.lab.popen(
            "app",
            ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
             f"{url}/slow-probe"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_until(
                lambda: (b := world.breaker("api-breaker")) is not None
                and b["state"] == "half-open",
                timeout=10,
                what="the probe under way",
            )
            during = [world.curl(f"{url}/during{i}") for i in range(3)]
            out, _ = probe.communicate(timeout=20)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
    finally:
        world.status_file.write_text("")
    assert during == [(0, "503")] * 3
    assert out.decode() == "200"
    assert world.curl(f"{url}/after") == (0, "200")  # the probe closed it
    seen = [t for t in world.seen() if t.startswith(("/h", "/slow", "/during", "/after"))]
    assert seen == ["/h0", "/h1", "/slow-probe", "/after"]


def test_a_tcp_breaker_opens_on_refused_connects_and_closes_when_the_server_is_back(
    world: World,
) -> None:
    mark = world.audit.mark()
    url = f"http://{WEB}:9090"
    for i in range(3):
        code, status = world.curl(f"{url}/t{i}")
        assert code != 0 and status == "000"
    # Only this port's: the record of an earlier test's last connection may
    # still be on its way.
    records = wait_until(
        lambda: (got := [r for r in world.audit.since(mark) if r["dst"] == f"{WEB}:9090"])
        and len(got) >= 3
        and got,
        timeout=5,
        what=f"three records of connections to {WEB}:9090",
    )
    assert [r["event"] for r in records] == ["failed"] * 3
    assert "ECONNREFUSED" in records[0]["error"]
    assert records[2]["limit"] == "breaker" and records[2]["rule"] == "tcp-breaker"
    assert f"circuit breaker open for {WEB}:9090" in records[2]["error"]
    log = world.work / "upstream-9090.jsonl"
    server = start_http_upstream(world.lab, "web", listen=[f"{WEB}:9090"], tls=None, log=log)
    try:
        world.wait_probe_due("tcp-breaker")
        assert world.curl(f"{url}/t3") == (0, "200")
        assert world.curl(f"{url}/t4") == (0, "200")
        assert world.seen(log) == ["/t3", "/t4"]
        assert world.breaker("tcp-breaker") is None
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    shown = world.lab.run(
        "node", [sys.executable, "-m", "egress_agent.agent.cli", "status"], check=False
    ).stdout
    assert "limits:       capped: connections 2 per workload" in shown, shown


def test_a_reload_keeps_unchanged_limits_and_applies_changed_ones(world: World) -> None:
    # The bucket of rule rated (3/h) is empty since the rate test.
    generation = world.agent.generation()
    world.policy.write_text(POLICY.replace("connections: 2, per", "connections: 3, per"))
    world.agent.wait_generation(above=generation, timeout=30)
    code, status = world.curl(f"http://{WEB}:8081/kept")
    assert code != 0 and status == "000"  # reset: the bucket was kept, still empty
    generation = world.agent.generation()
    world.policy.write_text(POLICY.replace('rate: "3/h", burst: 3', 'rate: "20/s", burst: 1'))
    world.agent.wait_generation(above=generation, timeout=30)
    # What it held is kept (nothing), and it refills at the new rate.
    assert wait_until(
        lambda: world.curl(f"http://{WEB}:8081/changed") == (0, "200"),
        timeout=10,
        what="a connection through rule rated at its new rate",
    )
    assert "/kept" not in world.seen() and "/changed" in world.seen()
