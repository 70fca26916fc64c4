"""The transparent path end to end: real namespaces, nftables, proxy and clients.

Each flow is checked from both ends (what the client got, what the server saw,
which address it saw) and in the audit log. The topology is the demo's: a
node, pods pg-primary, pg-replica and registry, and two external hosts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from egress_agent.lab.tls import make_ca
from tests import harness
from tests.harness import Agent

pytestmark = pytest.mark.netns

BLOB = "pgbackups.blob.core.windows.net"
OTHER = "exfil.example.net"

POLICY = f"""
version: 1
proxy: {{port: 15001, peek_timeout: 1.5, idle_timeout: 30, connect_timeout: 1}}
workloads:
  pg-primary: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
  pg-replica: {{cidrs: [198.19.2.2/32, "fd00:19:2::2/128"]}}
  registry:   {{cidrs: [198.19.3.2/32, "fd00:19:3::2/128"]}}
  node-local: {{cidrs: [198.18.1.1/32]}}
intercept:
  - from: [pg-primary]
    ports: [80, 443, 7000, "9000-9003"]
    except_cidrs: [198.19.0.0/16, "fd00:19::/32"]
  - from: [node-local]
    ports: [9000]
egress:
  - name: azure-backups
    from: [pg-primary]
    to: {{hosts: [{BLOB}], ports: [443]}}
    action: allow
  - name: tcp-sinks
    to: {{cidrs: [198.18.0.0/16], ports: ["9000-9003"]}}
    action: allow
  - name: named-echo
    from: [pg-primary]
    to: {{hosts: [echo.test], ports: [7000, 80]}}
    action: allow
default: deny
"""


@dataclass
class World(harness.World):
    ca: Path
    policy: Path
    agent: Agent | None = None

    def start_agent(self) -> Agent:
        self.agent = Agent(
            self.lab, policy=self.policy, audit=self.audit, log=self.work / "agent.log"
        ).start()
        return self.agent

    def client(
        self,
        host: str,
        target: str,
        port: int,
        *,
        tls: bool = False,
        sni: str | None = None,
        send: str = "hello\n",
    ) -> dict[str, Any]:
        args = ["--send", send]
        if tls:
            args += ["--tls", "--ca", str(self.ca)]
        if sni:
            args += ["--sni", sni]
        return super().client(host, target, port, args=args)

    def after_barrier(self, n_audit: int) -> list[dict[str, Any]]:
        """The connection records after the first ``n_audit``, once one more
        diverted connection (pg-primary to :9000) was made and its record
        written: whatever the test's own flows were to leave is there by then.
        The barrier's record is left out."""
        return self.audit_log.barrier(
            lambda: self.client("pg-primary", "198.18.1.2", 9000)["ok"] or None,
            lambda r: r["src"].startswith("198.19.1.2:") and r["dst"] == "198.18.1.2:9000",
            after=n_audit,
        )

    def seen(self, server: str) -> list[dict[str, Any]]:
        return self.server_log(server)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("datapath")
    with Lab() as lab:
        lab.add_pod("pg-primary", "198.19.1.2", "fd00:19:1::2")
        lab.add_pod("pg-replica", "198.19.2.2", "fd00:19:2::2")
        lab.add_pod("registry", "198.19.3.2", "fd00:19:3::2")
        lab.add_external("azure", "198.18.1.2", "fd00:18:1::2", hostnames=[BLOB, "echo.test"])
        lab.add_external("elsewhere", "198.18.2.2", "fd00:18:2::2", hostnames=[OTHER])
        ca = make_ca(work / "ca")
        blob = ca.issue(work / "blob", [BLOB])
        other = ca.issue(work / "other", [OTHER])
        logs = {n: work / f"{n}.jsonl" for n in ("azure", "azure-9001", "elsewhere", "replica")}
        start_server(
            lab,
            "azure",
            name="azure-tls",
            listen=["198.18.1.2:443", "[fd00:18:1::2]:443"],
            tls=blob,
            log=logs["azure"],
        )
        start_server(
            lab,
            "azure",
            name="azure-9000",
            listen=["198.18.1.2:9000", "198.18.1.2:7000", "198.18.1.2:80"],
            tls=None,
            log=logs["azure"],
        )
        start_server(
            lab,
            "azure",
            name="azure-9001",
            listen=["198.18.1.2:9001"],
            tls=None,
            log=logs["azure-9001"],
        )
        start_server(
            lab,
            "elsewhere",
            name="elsewhere-tls",
            listen=["198.18.2.2:443"],
            tls=other,
            log=logs["elsewhere"],
        )
        start_server(
            lab,
            "elsewhere",
            name="elsewhere-9000",
            listen=["198.18.2.2:9000"],
            tls=None,
            log=logs["elsewhere"],
        )
        start_server(
            lab,
            "pg-replica",
            name="replica",
            listen=["198.19.2.2:5432", "198.19.2.2:443"],
            tls=None,
            log=logs["replica"],
        )
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        w = World(lab=lab, work=work, ca=ca.cert_path, policy=policy)
        try:
            yield w
        finally:
            if w.agent is not None:
                w.agent.stop()


@pytest.fixture
def agent(world: World) -> Iterator[Agent]:
    proc = world.start_agent()
    yield proc
    proc.stop()


def _peer_ip(rec: dict[str, Any]) -> str:
    return str(rec["peer"]).rsplit(":", 1)[0].strip("[]")


def _node_address_towards(world: World, ip: str) -> str:
    out = world.lab.run("node", ["ip", "-j", "route", "get", ip]).stdout
    return str(json.loads(out)[0]["prefsrc"])


def test_allowed_tls_flow_is_relayed_by_the_proxy(world: World, agent: Agent) -> None:
    n_seen, n_audit = len(world.seen("azure")), len(world.audit_records())
    result = world.client("pg-primary", BLOB, 443, tls=True)
    assert result["ok"], result
    assert "azure-tls" in result["reply"]
    seen = world.seen("azure")[n_seen:]
    assert len(seen) == 1 and seen[0]["sni"] == BLOB
    # The server saw the node (the proxy's upstream), not the pod.
    assert _peer_ip(seen[0]) == _node_address_towards(world, "198.18.1.2")
    recs = world.audit_log.wait(1, after=n_audit)
    assert len(recs) == 1
    rec = recs[0]
    assert rec["event"] == "closed" and rec["verdict"] == "allow" and rec["rule"] == "azure-backups"
    assert (
        rec["workload"] == "pg-primary" and rec["server_name"] == BLOB and rec["protocol"] == "tls"
    )
    assert rec["src"].startswith("198.19.1.2:") and rec["dst"] == "198.18.1.2:443"
    assert rec["bytes_up"] == seen[0]["bytes_in"] and rec["bytes_down"] == seen[0]["bytes_out"]
    assert rec["error"] is None


def test_allowed_tls_flow_over_ipv6(world: World, agent: Agent) -> None:
    n_seen, n_audit = len(world.seen("azure")), len(world.audit_records())
    result = world.client("pg-primary", "fd00:18:1::2", 443, tls=True, sni=BLOB)
    assert result["ok"], result
    seen = world.seen("azure")[n_seen:]
    assert len(seen) == 1 and ":" in _peer_ip(seen[0])
    assert _peer_ip(seen[0]) != "fd00:19:1::2"
    rec = world.audit_log.wait(1, after=n_audit)[0]
    assert rec["dst"] == "[fd00:18:1::2]:443" and rec["src"].startswith("[fd00:19:1::2]:")
    assert rec["rule"] == "azure-backups" and rec["event"] == "closed"


def test_denied_host_is_reset_and_never_reaches_the_server(world: World, agent: Agent) -> None:
    n_seen, n_audit = len(world.seen("elsewhere")), len(world.audit_records())
    result = world.client("pg-primary", OTHER, 443, tls=True)
    assert not result["ok"]
    assert "Reset" in result["error"] or "EOF" in result["error"], result
    assert world.seen("elsewhere")[n_seen:] == []
    rec = world.audit_log.wait(1, after=n_audit)[0]
    assert rec["event"] == "denied" and rec["verdict"] == "deny" and rec["rule"] == "default"
    assert rec["server_name"] == OTHER and rec["dst"] == "198.18.2.2:443"
    assert rec["bytes_up"] == 0 and rec["bytes_down"] == 0


def test_replication_to_the_replica_stays_direct(world: World, agent: Agent) -> None:
    n_seen, n_audit = len(world.seen("replica")), len(world.audit_records())
    for port in (5432, 443):  # 443 is an intercepted port, but the pod network is excepted
        result = world.client("pg-primary", "198.19.2.2", port)
        assert result["ok"], result
    seen = world.seen("replica")[n_seen:]
    assert [_peer_ip(s) for s in seen] == ["198.19.1.2", "198.19.1.2"]
    assert world.after_barrier(n_audit) == []


def test_registry_talks_to_azure_directly(world: World, agent: Agent) -> None:
    n_seen, n_audit = len(world.seen("azure")), len(world.audit_records())
    result = world.client("registry", BLOB, 443, tls=True)
    assert result["ok"], result
    seen = world.seen("azure")[n_seen:]
    assert [_peer_ip(s) for s in seen] == ["198.19.3.2"]
    assert world.after_barrier(n_audit) == []


def test_original_destination_is_reached_exactly(world: World, agent: Agent) -> None:
    targets = [
        ("198.18.1.2", 9000, "azure-9000"),
        ("198.18.1.2", 9001, "azure-9001"),
        ("198.18.2.2", 9000, "elsewhere-9000"),
    ]
    n_audit = len(world.audit_records())
    for ip, port, name in targets:
        result = world.client("pg-primary", ip, port)
        assert result["ok"], result
        assert result["reply"].startswith(f"{name} {ip}:{port} saw"), result
    recs = world.audit_log.wait(3, after=n_audit)
    assert [(r["dst"], r["rule"], r["protocol"]) for r in recs] == [
        (f"{ip}:{port}", "tcp-sinks", "tcp") for ip, port, _ in targets
    ]


def test_half_close_and_large_transfer_both_ways(world: World, agent: Agent) -> None:
    n_audit = len(world.audit_records())
    out = world.python(
        "pg-primary",
        """
        import socket
        payload = bytes(range(256)) * 4096 * 4   # 4 MiB
        s = socket.create_connection(("198.18.1.2", 9000), timeout=20)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)              # half-close: we still read the echo
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
        print(len(payload), len(got))
        """,
    )
    sent, received = out.split()
    assert int(sent) == 4 * 1024 * 1024
    rec = world.audit_log.wait(1, after=n_audit)[0]
    assert rec["bytes_up"] == int(sent)
    assert rec["bytes_down"] == int(received)
    assert int(received) >= int(
        sent
    )  # the server's line plus the echo of all but what it read first


def test_local_traffic_is_diverted_without_looping(world: World, agent: Agent) -> None:
    """The node's own address is a workload: its traffic to :9000 goes through
    the output hook to the proxy, and the proxy's upstream connection -- from
    that same address to the same port -- is not diverted again."""
    n_seen, n_audit = len(world.seen("azure")), len(world.audit_records())
    result = world.client("node", "198.18.1.2", 9000)
    assert result["ok"], result
    seen = world.seen("azure")[n_seen:]
    assert len(seen) == 1 and _peer_ip(seen[0]) == "198.18.1.1"
    recs = world.after_barrier(n_audit)
    assert len(recs) == 1, recs  # exactly one pass through the proxy: no loop
    assert recs[0]["workload"] == "node-local" and recs[0]["src"].startswith("198.18.1.1:")


def test_direct_connections_to_the_proxy_port_are_refused(world: World, agent: Agent) -> None:
    n_audit = len(world.audit_records())
    for host in ("pg-primary", "registry", "node"):
        result = world.client(host, "169.254.99.1", 15001)
        assert not result["ok"] and "Refused" in result["error"], (host, result)
    assert world.after_barrier(n_audit) == []


def test_bad_first_bytes_close_one_connection_and_the_proxy_stays_up(
    world: World, agent: Agent
) -> None:
    """Port 7000's verdict depends on the server name. The destination is
    echo.test's own address, so a flow without a name is allowed too: the
    proxy connects at once and holds the client's bytes until its first
    message has been checked, and bad first bytes never reach the server."""
    n_seen, n_audit = len(world.seen("azure")), len(world.audit_records())
    out = world.python(
        "pg-primary",
        r"""
        import socket, time, json
        def attempt(data, close_after=0.0, wait=4.0):
            s = socket.create_connection(("198.18.1.2", 7000), timeout=wait)
            s.sendall(data)
            if close_after:
                time.sleep(close_after)
            try:
                got = s.recv(100)
                return "eof" if not got else "data"
            except ConnectionResetError:
                return "reset"
            except socket.timeout:
                return "timeout"
        res = {
          "garbage_tls": attempt(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
          "bad_http": attempt(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
          "slowloris": attempt(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
          "oversized": attempt(b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + b"\x00" * 100),
          "good": attempt(b"GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"),
        }
        print(json.dumps(res))
        """,
    )
    res = json.loads(out)
    assert res["garbage_tls"] == "reset" and res["bad_http"] == "reset"
    assert res["slowloris"] == "reset" and res["oversized"] == "reset"
    assert res["good"] == "data"
    recs = world.audit_log.wait(5, after=n_audit)
    assert [r["event"] for r in recs] == ["failed", "failed", "failed", "failed", "closed"]
    assert "malformed" in recs[0]["error"] and "malformed" in recs[1]["error"]
    assert "incomplete after 1.5s" in recs[2]["error"]
    assert recs[4]["server_name"] == "echo.test" and recs[4]["rule"] == "named-echo"
    seen = world.seen("azure")[n_seen:]
    assert sorted(r["bytes_in"] for r in seen)[:4] == [0, 0, 0, 0]  # nothing of the bad ones
    assert [r["first"] for r in seen if r["bytes_in"]] == [
        "GET / HTTP/1.1\r\nHost: echo.test\r\n\r\n"
    ]


def _ruleset(world: World) -> str:
    out = world.lab.run("node", ["nft", "-j", "list", "table", "inet", "egress_agent"], check=False)
    if out.returncode != 0:
        return ""
    doc = json.loads(out.stdout)
    for item in doc["nftables"]:
        for obj in item.values():
            if isinstance(obj, dict):
                obj.pop("handle", None)
                for expr in obj.get("expr", []):
                    if "counter" in expr:
                        expr["counter"] = None
    return json.dumps([i for i in doc["nftables"] if "metainfo" not in i], sort_keys=True)


def _lo_addresses(world: World) -> str:
    return world.lab.run("node", ["ip", "-o", "addr", "show", "dev", "lo"]).stdout


def test_stop_removes_exactly_what_the_agent_installed(world: World) -> None:
    before_tables = world.lab.run("node", ["nft", "list", "tables"]).stdout
    before_lo = _lo_addresses(world)
    proc = world.start_agent()
    assert "169.254.99.1" in _lo_addresses(world)
    assert _ruleset(world)
    assert proc.stop() == 0
    assert world.lab.run("node", ["nft", "list", "tables"]).stdout == before_tables
    assert _lo_addresses(world) == before_lo
    # With the agent gone, pg-primary's traffic flows directly again.
    n_seen = len(world.seen("azure"))
    assert world.client("pg-primary", "198.18.1.2", 9000)["ok"]
    assert _peer_ip(world.seen("azure")[n_seen]) == "198.19.1.2"


def test_crash_fails_closed_and_restart_converges(world: World) -> None:
    first = world.start_agent()
    clean = _ruleset(world)
    first.kill()  # no teardown: rules and addresses stay, nothing listens
    n_seen = len(world.seen("azure"))
    result = world.client("pg-primary", BLOB, 443, tls=True)
    assert not result["ok"] and "Refused" in result["error"], result
    assert world.seen("azure")[n_seen:] == []  # refused, never sent direct
    # Unrelated traffic is unaffected while the agent is down.
    assert world.client("registry", BLOB, 443, tls=True)["ok"]
    second = world.start_agent()
    try:
        assert _ruleset(world) == clean
        assert world.client("pg-primary", BLOB, 443, tls=True)["ok"]
    finally:
        assert second.stop() == 0
    assert _ruleset(world) == ""


def test_a_bad_policy_is_refused_with_its_location(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        POLICY.replace("- from: [pg-primary]\n    ports:", "- from: [pg-primery]\n    ports:", 1)
    )
    proc = world.lab.run(
        "node",
        [sys.executable, "-m", "egress_agent.agent.cli", "run", "--policy", str(bad)],
        check=False,
    )
    assert proc.returncode == 2
    assert (
        f"{bad}:" in proc.stderr
        and "pg-primery" in proc.stderr
        and "intercept[0].from[0]" in proc.stderr
    )
    assert _ruleset(world) == ""  # nothing was applied


def test_real_clients_curl_and_openssl(world: World, agent: Agent) -> None:
    n_audit = len(world.audit_records())
    curl = world.lab.run(
        "pg-primary",
        [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            str(world.ca),
            f"https://{BLOB}/backups/base.tar",
        ],
        check=False,
    )
    assert curl.returncode == 0 and "azure-tls" in curl.stdout, curl.stderr
    plain = world.lab.run(
        "pg-primary", ["curl", "-sS", "--max-time", "5", "http://echo.test/x"], check=False
    )
    assert plain.returncode == 0 and "azure-9000 198.18.1.2:80 saw" in plain.stdout, (
        plain.stderr,
        json.dumps(world.audit_records()[-1]),
    )
    denied = world.lab.run(
        "pg-primary",
        ["curl", "-sS", "--max-time", "5", "--cacert", str(world.ca), f"https://{OTHER}/"],
        check=False,
    )
    assert denied.returncode != 0
    ossl = world.lab.run(
        "pg-primary",
        [
            "openssl",
            "s_client",
            "-connect",
            f"{BLOB}:443",
            "-servername",
            BLOB,
            "-CAfile",
            str(world.ca),
            "-verify_return_error",
            "-brief",
        ],
        check=False,
        input="",
        timeout=10,
    )
    assert "Verification: OK" in ossl.stderr, ossl.stderr
    recs = world.audit_log.wait(4, after=n_audit)
    assert [(r["event"], r["protocol"], r["server_name"], r["rule"]) for r in recs] == [
        ("closed", "tls", BLOB, "azure-backups"),
        ("closed", "http", "echo.test", "named-echo"),
        ("denied", "tls", OTHER, "default"),
        ("closed", "tls", BLOB, "azure-backups"),
    ]


def test_upstream_refused_and_connect_timeout_are_reset_and_audited(
    world: World, agent: Agent
) -> None:
    # Nothing listens on elsewhere:9002 (the kernel refuses); 9003 is silently
    # dropped inside that external host, so the upstream connect times out.
    world.lab.run(
        "elsewhere",
        ["nft", "-f", "-"],
        input=(
            "table inet blackhole {\n chain input {\n type filter hook input priority 0;\n"
            "tcp dport 9003 drop\n }\n}\n"
        ),
    )
    try:
        n_audit = len(world.audit_records())
        refused = world.client("pg-primary", "198.18.2.2", 9002)
        timed_out = world.client("pg-primary", "198.18.2.2", 9003)
    finally:
        world.lab.run("elsewhere", ["nft", "delete", "table", "inet", "blackhole"])
    assert not refused["ok"] and not timed_out["ok"]
    recs = world.audit_log.wait(2, after=n_audit)
    assert recs[0]["event"] == "failed" and "ECONNREFUSED" in recs[0]["error"]
    assert recs[1]["event"] == "failed" and "timed out after 1s" in recs[1]["error"]
    assert recs[1]["verdict"] == "allow" and recs[1]["rule"] == "tcp-sinks"


def test_idle_connections_are_closed_with_a_record(world: World, tmp_path: Path) -> None:
    policy = tmp_path / "idle.yaml"
    policy.write_text(POLICY.replace("idle_timeout: 30", "idle_timeout: 1"))
    audit = tmp_path / "audit.jsonl"
    proc = Agent(world.lab, policy=policy, audit=audit, log=tmp_path / "agent.log").start()
    try:
        out = world.python(
            "pg-primary",
            """
            import socket, time
            s = socket.create_connection(("198.18.1.2", 9000), timeout=10)
            s.sendall(b"hi\\n")
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(100):   # the reply line, then nothing until the proxy closes
                data += chunk
            print(round(time.monotonic() - t0, 1), data.count(b"\\n"))
            """,
        )
    finally:
        proc.stop()
    waited, lines = out.split()
    assert 1.0 <= float(waited) < 5.0 and int(lines) == 1
    (rec,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert rec["event"] == "closed" and "idle for more than 1s" in rec["error"]
