"""A name allows only that name's addresses: forged SNI and Host, from the
attacker's side, judged from the target's.

The pod is allowed to reach pgbackups.blob.core.windows.net (and a few other
names) by name. It sends those names to a second external host, over TLS and
plain HTTP, IPv4 and IPv6, by literal and wildcard rules, and pipelines a
second request for another virtual host. The second host must never see a
connection, and the audit record must say which name, which destination and
which addresses the name has. Names come from a real DNS server (dnsmasq in
the lab), asked by the agent in the node; nothing here fakes the resolver.

The opt-outs work as documented (``resolve: connect`` goes to the name's own
address), a name-less protocol (SMTP) is allowed by a ``hosts`` rule without
the peek delay, WebSocket upgrades pass through plain HTTP allowed by name,
and a stopped DNS server fails closed after the stale-answer window.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log, start_server, wait_ready
from egress_agent.lab.tls import make_ca
from tests import harness
from tests.harness import Agent, client, wait_until
from tests.lab.httpupstream import requests_seen, start_http_upstream

pytestmark = pytest.mark.netns

BLOB = "pgbackups.blob.core.windows.net"
OTHER = "other.example.net"
WEB = "www.web.test"  # allowed by a wildcard rule
CDN = "assets.cdn.test"  # allowed with resolve: connect
FRONTED = "fronted.test"  # another virtual host at Azure's address, allowed by nothing
SMTP = "smtp-relay.test"
AZURE, AZURE6 = "198.18.1.2", "fd00:18:1::2"
ELSEWHERE, ELSEWHERE6 = "198.18.2.2", "fd00:18:2::2"
MAIL = "198.18.3.2"

POLICY = f"""
version: 1
proxy: {{port: 15001, peek_timeout: 5, connect_timeout: 2, idle_timeout: 30}}
workloads:
  pg: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
intercept:
  - from: [pg]
    ports: [80, 443, 587, 8080, 8081, 8443]
egress:
  - name: azure-backups
    from: [pg]
    to: {{hosts: [{BLOB}], ports: [443]}}
    action: allow
  - name: blob-http
    from: [pg]
    to: {{hosts: [{BLOB}], ports: [80, 8080, 8081]}}
    action: allow
  - name: web
    from: [pg]
    to: {{hosts: ["*.web.test"], ports: [443]}}
    action: allow
  - name: cdn
    from: [pg]
    to: {{hosts: ["*.cdn.test"], ports: [8443], resolve: connect}}
    action: allow
  - name: smtp
    from: [pg]
    to: {{hosts: [{SMTP}], ports: [587]}}
    action: allow
default: deny
"""

# A real SMTP server (the standard library's, as Python 3.11 still ships it)
# that logs each message it receives and the address that sent it.
SMTP_SERVER = """
import asyncore, json, socket, sys, warnings
warnings.simplefilter("ignore")
import smtpd
socket.getfqdn = lambda name="": "mail.test"  # the lab host has no name of its own
log = sys.argv[1]
class Server(smtpd.SMTPServer):
    def process_message(self, peer, mailfrom, rcpttos, data, **kw):
        with open(log, "a") as fh:
            fh.write(json.dumps({"peer": peer[0], "from": mailfrom, "to": rcpttos}) + "\\n")
Server((sys.argv[2], 587), None)
print("READY", flush=True)
asyncore.loop()
"""

# A WebSocket echo server (aiohttp, which the Kubernetes client kubernetes_asyncio brings).
WS_SERVER = """
import asyncio, sys
from aiohttp import web
async def echo(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str("echo " + msg.data + " from " + request.remote)
    return ws
async def main():
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, sys.argv[1], 8081).start()
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class World(harness.World):
    ca: Path
    agent: Agent

    def requests(self) -> list[dict[str, Any]]:
        return [r for r in self.audit_log.all() if r.get("event") == "request"]

    def new_records(self, before: int, count: int = 1) -> list[dict[str, Any]]:
        return self.audit_log.wait(count, after=before)

    def new_at_elsewhere(self, seen: int) -> list[dict[str, Any]]:
        """What reached the elsewhere host after its first ``seen`` connections,
        once a barrier did: one connection from the node (never diverted),
        made after whatever the test made, whose arrival is waited for."""
        result = client(self.lab, "node", ELSEWHERE, 80)
        assert result["ok"], result
        barrier = result["reply"].split(" saw ", 1)[1]  # the client's ip:port
        new = wait_until(
            lambda: (
                (n := self.server_log("elsewhere")[seen:])
                and any(r["peer"] == barrier for r in n)
                and n
            ),
            timeout=5,
            what="the barrier connection reached the elsewhere host",
        )
        return [r for r in new if r["peer"] != barrier]

    def tls(self, target: str, port: int, sni: str) -> dict[str, Any]:
        argv = [sys.executable, "-m", "egress_agent.lab.client", target, str(port), "--tls"]
        argv += ["--ca", str(self.ca), "--sni", sni, "--timeout", "5"]
        result: dict[str, Any] = json.loads(self.lab.run("pg", argv, check=False).stdout)
        return result


def _raw_http(world: World, target: str, port: int, payload: str) -> str:
    """Send raw bytes from the pod and return what came back (until close)."""
    code = """
    import socket, sys
    host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(10)
    try:
        s.connect((host, port))
        s.sendall(payload.replace(b"\\\\r\\\\n", b"\\r\\n"))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    except OSError as exc:
        out = f"ERROR {type(exc).__name__}".encode()
    print(out.decode(errors="replace"))
    """
    return world.python("pg", code, target, str(port), payload)


def _start_script(lab: Lab, host: str, code: str, *args: str) -> subprocess.Popen[bytes]:
    proc = lab.popen(
        host, [sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE
    )
    wait_ready(proc, f"script in {host}", 15)
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("names")
    with Lab() as lab:
        lab.add_pod("pg", "198.19.1.2", "fd00:19:1::2")
        lab.add_external("azure", AZURE, AZURE6, hostnames=[BLOB, WEB, CDN, FRONTED])
        lab.add_external("elsewhere", ELSEWHERE, ELSEWHERE6, hostnames=[OTHER])
        lab.add_external("mail", MAIL, "fd00:18:3::2", hostnames=[SMTP])
        ca = make_ca(work / "ca")
        azure_cert = ca.issue(work / "azure", [BLOB, WEB, CDN])
        other_cert = ca.issue(work / "other", [OTHER])
        for name, host, addrs, cert in (
            ("azure", "azure", (AZURE, f"[{AZURE6}]"), azure_cert),
            ("elsewhere", "elsewhere", (ELSEWHERE, f"[{ELSEWHERE6}]"), other_cert),
        ):
            start_server(
                lab, host, name=f"{name}-tls", tls=cert, log=work / f"{name}.jsonl",
                listen=[f"{a}:{p}" for a in addrs for p in (443, 8443)],
            )  # fmt: skip
            start_server(
                lab, host, name=f"{name}-http", tls=None, log=work / f"{name}.jsonl",
                listen=[f"{addrs[0]}:80", f"{addrs[0]}:587"],
            )  # fmt: skip
        start_http_upstream(lab, "azure", listen=[f"{AZURE}:8080"], tls=None,
                            log=work / "azure-http.jsonl")  # fmt: skip
        _start_script(lab, "mail", SMTP_SERVER, str(work / "mail.jsonl"), MAIL)
        _start_script(lab, "azure", WS_SERVER, AZURE)
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        agent = Agent(
            lab, policy=policy, audit=work / "audit.jsonl", log=work / "agent.log"
        ).start()
        try:
            yield World(lab=lab, work=work, ca=ca.cert_path, agent=agent)
        finally:
            agent.stop()


def _proxy_address(world: World, towards: str) -> str:
    out = world.lab.run("node", ["ip", "-j", "route", "get", towards]).stdout
    return str(json.loads(out)[0]["prefsrc"])


def _peer(record: dict[str, Any]) -> str:
    return str(record["peer"]).rsplit(":", 1)[0].strip("[]")


# -- the name's own addresses still work ------------------------------------------


@pytest.mark.parametrize(("target", "sni"), [(AZURE, BLOB), (AZURE6, BLOB), (AZURE, WEB)])
def test_a_name_at_its_own_address_is_allowed(world: World, target: str, sni: str) -> None:
    before, seen = len(world.audit_records()), len(world.server_log("azure"))
    result = world.tls(target, 443, sni)
    assert result["ok"], result
    assert [s["sni"] for s in world.server_log("azure")[seen:]] == [sni]
    [record] = world.new_records(before)
    assert record["event"] == "closed" and record["verdict"] == "allow", record
    assert record["upstream"] is None


# -- forged names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "sni", "rule"),
    [
        (ELSEWHERE, BLOB, "azure-backups"),  # a literal rule
        (ELSEWHERE6, BLOB, "azure-backups"),  # over IPv6
        (ELSEWHERE, WEB, "web"),  # a wildcard rule
    ],
)
def test_an_allowed_sni_sent_to_another_address_never_reaches_it(
    world: World, target: str, sni: str, rule: str
) -> None:
    before, seen = len(world.audit_records()), len(world.server_log("elsewhere"))
    result = world.tls(target, 443, sni)
    assert not result["ok"], result
    # The target's side: not even a TCP connection arrived.
    assert world.new_at_elsewhere(seen) == []
    [record] = world.new_records(before)
    assert record["event"] == "denied" and record["rule"] == "default", record
    assert record["server_name"] == sni and record["bytes_up"] == 0
    shown = f"[{target}]" if ":" in target else target
    assert record["dst"] == f"{shown}:443"
    assert record["error"] == (
        f"rule {rule} allows {sni} only at its own addresses ({AZURE}, {AZURE6}):"
        f" the destination {target} is not one of them"
    )


def test_an_allowed_host_header_sent_to_another_address_never_reaches_it(world: World) -> None:
    before, seen = len(world.audit_records()), len(world.server_log("elsewhere"))
    reply = _raw_http(world, ELSEWHERE, 80, f"GET / HTTP/1.1\\r\\nHost: {BLOB}\\r\\n\\r\\n")
    assert "200 OK" not in reply
    assert world.new_at_elsewhere(seen) == []
    [record] = world.new_records(before)
    assert record["event"] == "denied" and record["protocol"] == "http", record
    assert f"rule blob-http allows {BLOB} only at its own addresses" in record["error"]
    assert f"the destination {ELSEWHERE} is not one of them" in record["error"]


def test_a_pipelined_request_for_another_host_gets_421_and_never_reaches_it(
    world: World,
) -> None:
    log = world.work / "azure-http.jsonl"
    before, seen = len(world.audit_records()), len(requests_seen(log))
    reply = _raw_http(
        world,
        AZURE,
        8080,
        f"GET /first HTTP/1.1\\r\\nHost: {BLOB}\\r\\n\\r\\n"
        f"GET /second HTTP/1.1\\r\\nHost: {FRONTED}\\r\\nConnection: close\\r\\n\\r\\n",
    )
    assert reply.startswith("HTTP/1.1 200 OK"), reply
    assert "HTTP/1.1 421 Misdirected Request" in reply or "HTTP/1.1 421 " in reply, reply
    got = requests_seen(log)[seen:]
    assert [r["target"] for r in got] == ["/first"]
    [record] = world.new_records(before)
    assert record["rule"] == "blob-http" and record["requests"] == 2, record
    refused = [r for r in world.requests() if r["connection"] == record["id"]][-1]
    assert refused["status"] == 421 and refused["host"] == FRONTED
    assert f"Host {FRONTED} is not served by rule blob-http" in refused["error"]


def test_plain_http_allowed_by_name_keeps_keep_alive_and_chunked_bodies(world: World) -> None:
    log = world.work / "azure-http.jsonl"
    seen = len(requests_seen(log))
    body = "5\\r\\nhello\\r\\n0\\r\\n\\r\\n"
    reply = _raw_http(
        world,
        AZURE,
        8080,
        f"POST /a HTTP/1.1\\r\\nHost: {BLOB}\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n{body}"
        f"GET /last HTTP/1.1\\r\\nHost: {BLOB}\\r\\nConnection: close\\r\\n\\r\\n",
    )
    assert reply.count("HTTP/1.1 200 OK") == 2, reply
    got = requests_seen(log)[seen:]
    assert [(r["target"], r["body_bytes"]) for r in got] == [("/a", 5), ("/last", 0)]


def test_a_websocket_upgrade_switches_to_a_byte_relay(world: World) -> None:
    code = """
    import sys, websocket
    ws = websocket.create_connection(
        "ws://198.18.1.2:8081/ws", host=sys.argv[1], timeout=10, suppress_origin=True
    )
    for text in ("one", "two"):
        ws.send(text)
        print(ws.recv())
    ws.close()
    """
    before = len(world.audit_records())
    out = world.python("pg", code, BLOB)
    proxy = _proxy_address(world, AZURE)
    assert out.splitlines() == [f"echo one from {proxy}", f"echo two from {proxy}"], out
    [record] = world.new_records(before)
    assert record["rule"] == "blob-http" and record["event"] == "closed", record
    [upgrade] = [r for r in world.requests() if r["connection"] == record["id"]]
    assert upgrade["status"] == 101 and upgrade["path"] == "/ws"


# -- opt-outs -----------------------------------------------------------------------


def test_resolve_connect_goes_to_the_names_own_address(world: World) -> None:
    before = len(world.audit_records())
    seen_azure, seen_other = len(world.server_log("azure")), len(world.server_log("elsewhere"))
    result = world.tls(ELSEWHERE, 8443, CDN)  # dialled the wrong host on purpose
    assert result["ok"], result
    assert "azure-tls" in result["reply"]
    assert [s["sni"] for s in world.server_log("azure")[seen_azure:]] == [CDN]
    assert world.server_log("elsewhere")[seen_other:] == []
    [record] = world.new_records(before)
    assert record["rule"] == "cdn" and record["event"] == "closed", record
    assert record["dst"] == f"{ELSEWHERE}:8443" and record["upstream"] == f"{AZURE}:8443"


# -- protocols without a name ---------------------------------------------------------


def test_smtp_by_hosts_rule_works_without_the_peek_delay(world: World) -> None:
    code = """
    import smtplib, sys, time
    started = time.monotonic()
    with smtplib.SMTP(sys.argv[1], 587, local_hostname="pg", timeout=10) as smtp:
        greeted = time.monotonic() - started
        smtp.sendmail("backup@pg", ["ops@example.test"], "Subject: done\\r\\n\\r\\nok\\r\\n")
    print(greeted, time.monotonic() - started)
    """
    before = len(world.audit_records())
    greeted, total = map(float, world.python("pg", code, MAIL).split())
    # The proxy's peek_timeout is 5 s: the greeting must not wait for it.
    assert greeted < 1.0 and total < 2.0, (greeted, total)
    got = read_log(world.work / "mail.jsonl")
    assert got[-1]["to"] == ["ops@example.test"]
    assert got[-1]["peer"] == _proxy_address(world, MAIL)
    [record] = world.new_records(before)
    assert record["rule"] == "smtp" and record["event"] == "closed", record
    assert record["server_name"] is None and record["protocol"] == "tcp"


def test_a_nameless_flow_to_an_address_no_host_owns_is_refused(world: World) -> None:
    before, seen = len(world.audit_records()), len(world.server_log("elsewhere"))
    code = """
    import smtplib, sys
    try:
        smtplib.SMTP(sys.argv[1], 587, local_hostname="pg", timeout=10).quit()
        print("connected")
    except (OSError, smtplib.SMTPException) as exc:
        print(type(exc).__name__)
    """
    assert world.python("pg", code, ELSEWHERE).strip() != "connected"
    assert world.server_log("elsewhere")[seen:] == []
    [record] = world.new_records(before)
    assert record["event"] == "denied" and record["rule"] == "default", record


def test_a_forged_name_on_a_connection_made_early_resets_both_sides(world: World) -> None:
    """The SMTP relay's address is allowed without a name, so the proxy
    connects at once; a ClientHello naming a host the policy denies then
    resets both sides, and none of the client's bytes reach the server."""
    before = len(world.audit_records())
    result = world.tls(MAIL, 587, OTHER)
    assert not result["ok"], result
    [record] = world.new_records(before)
    assert record["event"] == "denied" and record["server_name"] == OTHER, record
    assert record["bytes_up"] == 0
    assert record["error"].startswith(f"SNI {OTHER} is denied by rule default")


# -- observability --------------------------------------------------------------------


def test_status_and_metrics_show_the_dns_cache(world: World) -> None:
    world.tls(AZURE, 443, BLOB)
    status = world.lab.run(
        "node", [sys.executable, "-m", "egress_agent.agent.cli", "status"], check=False
    ).stdout
    assert "dns:          nameservers 198.18.255.2" in status, status
    line = next(x for x in status.splitlines() if x.strip().startswith(BLOB))
    assert AZURE in line and AZURE6 in line and "(policy)" in line
    metrics = world.lab.run("node", ["curl", "-sf", "http://127.0.0.1:15021/metrics"]).stdout
    assert 'egress_agent_dns_queries_total{result="answer"}' in metrics
    assert "egress_agent_dns_cache_names " in metrics
    cached = next(
        x
        for x in metrics.splitlines()
        if x.startswith('egress_agent_dns_lookups_total{result="cached"}')
    )
    assert float(cached.split()[-1]) > 0


def test_explain_resolves_the_name_itself_and_says_so(world: World) -> None:
    argv = [
        sys.executable, "-m", "egress_agent.agent.cli", "explain",
        "--policy", str(world.work / "policy.yaml"),
        "--from", "198.19.1.2", "--to", f"{ELSEWHERE}:443", "--server-name", BLOB,
    ]  # fmt: skip
    out = world.lab.run("node", argv).stdout
    assert f"names:     {BLOB} -> {AZURE}, {AZURE6} (resolved by this command" in out, out
    assert "verdict:   deny (rule default)" in out
    assert f"the destination {ELSEWHERE} is not one of them" in out


# -- the resolver fails ---------------------------------------------------------------

STALE_POLICY = f"""
version: 1
proxy: {{port: 15001, peek_timeout: 5, connect_timeout: 2}}
dns: {{min_ttl: 1, max_ttl: 2, serve_stale: 4, timeout: 0.5}}
workloads:
  pg: {{cidrs: [198.19.1.2/32]}}
intercept:
  - from: [pg]
    ports: [443]
egress:
  - name: azure-backups
    to: {{hosts: [{BLOB}], ports: [443]}}
    action: allow
default: deny
"""


def test_a_stopped_dns_server_fails_closed_after_the_stale_window(tmp_path: Path) -> None:
    with Lab(dns_ttl=2) as lab:
        lab.add_pod("pg", "198.19.1.2", "fd00:19:1::2")
        lab.add_external("azure", AZURE, AZURE6, hostnames=[BLOB])
        ca = make_ca(tmp_path / "ca")
        start_server(
            lab, "azure", name="azure", listen=[f"{AZURE}:443"], log=tmp_path / "azure.jsonl",
            tls=ca.issue(tmp_path / "azure", [BLOB]),
        )  # fmt: skip
        policy = tmp_path / "policy.yaml"
        policy.write_text(STALE_POLICY)
        audit = tmp_path / "audit.jsonl"
        agent = Agent(lab, policy=policy, audit=audit, log=tmp_path / "agent.log").start()
        world = World(lab=lab, work=tmp_path, ca=ca.cert_path, agent=agent)
        try:
            assert world.tls(AZURE, 443, BLOB)["ok"]
            lab.dns.stop()
            stopped = time.monotonic()
            # Within the TTL (2 s) and then the stale window (4 s more), the
            # last answer still holds.
            assert world.tls(AZURE, 443, BLOB)["ok"]
            time.sleep(max(0.0, stopped + 3.5 - time.monotonic()))
            assert world.tls(AZURE, 443, BLOB)["ok"]
            time.sleep(max(0.0, stopped + 7.5 - time.monotonic()))
            before = len(world.audit_records())
            result = world.tls(AZURE, 443, BLOB)
            assert not result["ok"], result
            [record] = world.new_records(before)
            assert record["event"] == "denied", record
            assert f"rule azure-backups allows {BLOB} only at its own addresses" in record["error"]
            assert "198.18.255.2" in record["error"] and "serve_stale" in record["error"]
            # The server is back: names resolve again (after min_ttl at most).
            lab.dns.start()
            time.sleep(1.5)
            assert world.tls(AZURE, 443, BLOB)["ok"]
        finally:
            agent.stop()
        seen = read_log(tmp_path / "azure.jsonl")
        assert len(seen) == 4  # the refused one never arrived
