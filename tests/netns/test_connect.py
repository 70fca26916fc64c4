"""The explicit CONNECT listener end to end: the agent in a lab node, curl and
small Python clients in pods that are told to use the proxy, real TLS servers.

Each flow is checked at the client (status, bytes), at the server (what it saw,
from which address) and in the audit log (one record, ``via: connect``).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log, start_server
from egress_agent.lab.tls import make_ca
from tests import harness
from tests.harness import Agent, Audit, wait_until

pytestmark = pytest.mark.netns

BLOB = "pgbackups.blob.core.windows.net"
ALIAS = "alias.blob.test"  # same server address, a name the policy does not allow
OTHER = "exfil.example.net"
PROXY = "http://169.254.99.1:3128"
PROXY_V6 = "http://[fd65:6772:6573::1]:3128"
SECRET = "s3cret-Proxy-Pass"


def _policy(users: Path) -> str:
    return f"""
version: 1
proxy: {{peek_timeout: 1.5, connect_timeout: 2}}
workloads:
  app: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
  authed: {{cidrs: [198.19.2.2/32]}}
intercept: []
egress:
  - name: blob
    to: {{hosts: [{BLOB}], ports: [443]}}
    action: allow
  - name: tcp-sink
    from: [app]
    to: {{cidrs: [198.18.1.2/32], ports: [9000]}}
    action: allow
  - name: any-8080
    from: [app]
    to: {{ports: [8080, 15021]}}
    action: allow
  - name: injected
    from: [app]
    to: {{hosts: [{OTHER}], ports: [8444]}}
    action: allow
    http: {{set_headers: {{X-Team: {{value: db}}}}}}
  - name: blob-v6
    from: [app]
    to: {{cidrs: ["fd00:18:1::2/128"], ports: [443]}}
    action: allow
default: deny
connect:
  port: 3128
  auth:
    authed: {{users_file: {users}}}
"""


# A tunnel that must be recorded: CONNECT to the TCP sink, one line each way.
BARRIER = """
import socket
s = socket.create_connection(("169.254.99.1", 3128), timeout=10)
s.sendall(b"CONNECT 198.18.1.2:9000 HTTP/1.1\\r\\n\\r\\n")
data = b""
while b"\\r\\n\\r\\n" not in data:
    chunk = s.recv(4096)
    assert chunk, data
    data += chunk
head, _, data = data.partition(b"\\r\\n\\r\\n")
assert head.startswith(b"HTTP/1.1 200"), head
s.sendall(b"barrier\\n")
while b"\\n" not in data:
    chunk = s.recv(4096)
    assert chunk, data
    data += chunk
print("%s:%d" % s.getsockname()[:2])
s.close()
"""


@dataclass
class World(harness.World):
    ca: Path
    users: Path
    agent: Agent
    barriers: set[str] = field(default_factory=set)  # the barrier tunnels' sources

    def new_audit(self, before: int, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The records after the first ``before``, once there are ``count``
        and nothing more than that: a barrier tunnel's record follows the
        last of them (and is left out, as earlier barriers' are)."""

        def new() -> list[dict[str, Any]]:
            return [r for r in self.audit_records()[before:] if r.get("src") not in self.barriers]

        wait_until(
            lambda: len(new()) >= count,
            timeout=timeout,
            what=f"{count} audit record(s) after the first {before}",
        )
        self.barrier()
        return new()

    def barrier(self) -> None:
        """One tunnel of app to the TCP sink, and its audit record: the
        records of connections that ended before it began are written by then."""
        src = self.python("app", BARRIER).strip()
        self.barriers.add(src)
        self.audit_log.wait_for(lambda r: r.get("src") == src, timeout=10)

    def curl(self, host: str, url: str, *args: str, env: dict[str, str] | None = None) -> Any:
        argv = [
            "curl", "-sS", "--max-time", "10", "--cacert", str(self.ca),
            "-o", "-", "-w", "\n%{http_code} %{http_connect}", *args, url,
        ]  # fmt: skip
        if env is not None:
            argv = ["env", *[f"{k}={v}" for k, v in env.items()], *argv]
        return self.lab.run(host, argv, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("connect")
    with Lab() as lab:
        lab.add_pod("app", "198.19.1.2", "fd00:19:1::2")
        lab.add_pod("authed", "198.19.2.2", "fd00:19:2::2")
        lab.add_pod("stranger", "198.19.9.2", "fd00:19:9::2")
        lab.add_external("azure", "198.18.1.2", "fd00:18:1::2", hostnames=[BLOB, ALIAS])
        lab.add_external("elsewhere", "198.18.2.2", "fd00:18:2::2", hostnames=[OTHER])
        ca = make_ca(work / "ca")
        blob = ca.issue(work / "blob", [BLOB, ALIAS, "fd00:18:1::2"])
        other = ca.issue(work / "other", [OTHER])
        start_server(
            lab,
            "azure",
            name="azure-tls",
            listen=["198.18.1.2:443", "[fd00:18:1::2]:443"],
            tls=blob,
            log=work / "azure.jsonl",
        )
        start_server(
            lab,
            "azure",
            name="azure-9000",
            listen=["198.18.1.2:9000"],
            tls=None,
            log=work / "azure-9000.jsonl",
        )
        start_server(
            lab,
            "elsewhere",
            name="elsewhere-tls",
            listen=["198.18.2.2:443"],
            tls=other,
            log=work / "elsewhere.jsonl",
        )
        users = work / "connect-users"
        users.write_text(f"# proxy users\nbackup:{SECRET}\n")
        users.chmod(0o600)
        policy = work / "policy.yaml"
        policy.write_text(_policy(users))
        agent = Agent(
            lab, policy=policy, audit=work / "audit.jsonl", log=work / "agent.log"
        ).start()
        try:
            yield World(lab=lab, work=work, ca=ca.cert_path, users=users, agent=agent)
        finally:
            agent.stop()


def _status(proc: Any) -> tuple[str, str]:
    """(http_code, http_connect) from curl's -w line."""
    code, connect = proc.stdout.rsplit("\n", 1)[-1].split()
    return code, connect


def _node_address_towards(world: World, ip: str) -> str:
    out = world.lab.run("node", ["ip", "-j", "route", "get", ip]).stdout
    return str(json.loads(out)[0]["prefsrc"])


@pytest.mark.parametrize("how", ["--proxy", "https_proxy"])
def test_allowed_name_is_tunnelled_and_audited(world: World, how: str) -> None:
    n_seen, n_audit = len(world.server_log("azure")), len(world.audit_records())
    if how == "--proxy":
        proc = world.curl("app", f"https://{BLOB}/", "--proxy", PROXY)
    else:
        proc = world.curl("app", f"https://{BLOB}/", env={"https_proxy": PROXY})
    assert proc.returncode == 0, proc.stderr
    assert _status(proc) == ("200", "200")
    assert f"azure-tls 198.18.1.2:443 saw {_node_address_towards(world, '198.18.1.2')}" in (
        proc.stdout
    )
    seen = world.server_log("azure")[n_seen:]
    assert len(seen) == 1 and seen[0]["sni"] == BLOB
    (rec,) = world.new_audit(n_audit)
    assert rec["via"] == "connect" and rec["connect_host"] == f"{BLOB}:443"
    assert rec["event"] == "closed" and rec["verdict"] == "allow" and rec["rule"] == "blob"
    assert rec["workload"] == "app" and rec["src"].startswith("198.19.1.2:")
    assert rec["dst"] == "198.18.1.2:443" and rec["server_name"] == BLOB
    assert rec["protocol"] == "tls"
    # curl closes as soon as it has the response; the server's close_notify
    # may still be unread on its socket, and then its kernel sends a reset.
    assert rec["error"] in (None, "client: ECONNRESET (Connection reset by peer)")
    # The server logs before the TLS close_notify alerts (one TLS 1.3 record
    # of 24 bytes each way) that the proxy relays too.
    assert rec["bytes_up"] - seen[0]["bytes_in"] in (0, 24)
    assert rec["bytes_down"] - seen[0]["bytes_out"] in (0, 24)


def test_denied_name_gets_403_and_never_reaches_the_server(world: World) -> None:
    n_audit = len(world.audit_records())
    proc = world.curl("app", f"https://{OTHER}/", "--proxy", PROXY)
    assert proc.returncode != 0
    assert _status(proc)[1] == "403"
    assert read_log(world.work / "elsewhere.jsonl", timeout=0) == []
    (rec,) = world.new_audit(n_audit)
    assert rec["via"] == "connect" and rec["event"] == "denied" and rec["verdict"] == "deny"
    assert rec["rule"] == "default" and rec["connect_host"] == f"{OTHER}:443"
    # Rule blob-v6 allows app by address on port 443: the name had to be
    # resolved to know that it does not apply.
    assert rec["dst"] == "198.18.2.2:443"
    assert rec["server_name"] == OTHER and rec["bytes_up"] == 0


def test_name_denied_whatever_its_address_is_not_even_resolved(world: World) -> None:
    n_audit = len(world.audit_records())
    proc = world.curl("app", f"https://{OTHER}:8443/", "--proxy", PROXY)
    assert _status(proc)[1] == "403"
    (rec,) = world.new_audit(n_audit)
    assert rec["event"] == "denied" and rec["rule"] == "default"
    assert rec["error"] == f"egress to {OTHER}:8443 denied by rule default"
    assert rec["dst"] == "?" and rec["connect_host"] == f"{OTHER}:8443"


def test_a_rule_with_http_handling_is_not_tunnelled(world: World) -> None:
    """An http: rule works on plaintext requests; inside a tunnel it could
    not, so the tunnel is refused rather than relayed without it."""
    n_audit = len(world.audit_records())
    proc = world.curl("app", f"https://{OTHER}:8444/", "--proxy", PROXY)
    assert _status(proc)[1] == "403"
    (rec,) = world.new_audit(n_audit)
    assert rec["event"] == "denied" and rec["verdict"] == "deny" and rec["rule"] == "injected"
    assert "does not carry" in rec["error"] and rec["bytes_up"] == 0


def test_sni_other_than_the_connect_host_is_refused(world: World) -> None:
    n_seen, n_audit = len(world.server_log("azure")), len(world.audit_records())
    out = world.python(
        "app",
        f"""
        import socket, ssl
        s = socket.create_connection(("169.254.99.1", 3128), timeout=5)
        s.sendall(b"CONNECT {BLOB}:443 HTTP/1.1\\r\\nHost: {BLOB}:443\\r\\n\\r\\n")
        head = b""
        while not head.endswith(b"\\r\\n\\r\\n"):
            head += s.recv(1)
        print(head.split(b"\\r\\n")[0].decode())
        ctx = ssl.create_default_context(cafile="{world.ca}")
        try:
            ctx.wrap_socket(s, server_hostname="{ALIAS}")
            print("handshake completed")
        except (OSError, ssl.SSLError) as exc:
            print("refused", type(exc).__name__)
        """,
    )
    assert out.splitlines()[0] == "HTTP/1.1 200 Connection Established"
    assert "refused" in out.splitlines()[1]
    (rec,) = world.new_audit(n_audit)
    assert rec["event"] == "denied" and rec["rule"] == "connect:sni-mismatch"
    assert rec["error"] == f"SNI {ALIAS} does not match CONNECT host {BLOB}"
    assert rec["bytes_up"] == 0  # the ClientHello never went upstream
    # The upstream connection was opened (the tunnel is set up before the
    # client speaks) but the server never received a byte.
    assert all(r["bytes_in"] == 0 for r in world.server_log("azure")[n_seen:])


def test_late_client_hello_is_still_checked(world: World) -> None:
    # Waiting longer than peek_timeout (1.5 s) before speaking does not let a
    # ClientHello through unchecked.
    n_audit = len(world.audit_records())
    out = world.python(
        "app",
        f"""
        import socket, ssl, time
        s = socket.create_connection(("169.254.99.1", 3128), timeout=5)
        s.sendall(b"CONNECT {BLOB}:443 HTTP/1.1\\r\\n\\r\\n")
        print(s.recv(4096).split(b"\\r\\n")[0].decode())
        time.sleep(2.0)
        ctx = ssl.create_default_context(cafile="{world.ca}")
        try:
            ctx.wrap_socket(s, server_hostname="{ALIAS}")
            print("handshake completed")
        except (OSError, ssl.SSLError) as exc:
            print("refused", type(exc).__name__)
        """,
    )
    assert out.splitlines()[0] == "HTTP/1.1 200 Connection Established"
    assert out.splitlines()[1].startswith("refused")
    (rec,) = world.new_audit(n_audit)
    assert rec["rule"] == "connect:sni-mismatch" and rec["bytes_up"] == 0


def test_server_speaks_first_through_the_tunnel(world: World) -> None:
    # The lab server answers on its own after 2 s of silence, like an SSH or
    # SMTP server greeting its client; the client sends only after that.
    n_audit = len(world.audit_records())
    out = world.python(
        "app",
        """
        import socket
        s = socket.create_connection(("169.254.99.1", 3128), timeout=8)
        s.sendall(b"CONNECT 198.18.1.2:9000 HTTP/1.1\\r\\n\\r\\n")
        data = b""
        while data.count(b"\\n") < 3:
            data += s.recv(4096)
        print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip())
        s.sendall(b"SSH-2.0-client\\r\\n")
        s.shutdown(socket.SHUT_WR)
        echo = b""
        while chunk := s.recv(4096):
            echo += chunk
        print(echo.decode().strip())
        """,
    )
    greeting, echo = out.splitlines()
    assert greeting.startswith("azure-9000 198.18.1.2:9000 saw ")
    assert echo == "SSH-2.0-client"
    (rec,) = world.new_audit(n_audit)
    assert rec["event"] == "closed" and rec["rule"] == "tcp-sink" and rec["protocol"] == "tcp"
    assert rec["server_name"] is None and rec["connect_host"] == "198.18.1.2:9000"
    assert rec["bytes_up"] == len(b"SSH-2.0-client\r\n") and rec["error"] is None


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("127.0.0.1:15021", "127.0.0.1:15021"),
        ("localhost:15021", "localhost:15021"),
        ("[::ffff:127.0.0.1]:15021", "[::ffff:7f00:1]:15021"),
        ("0.0.0.0:8080", "0.0.0.0:8080"),
    ],
)
def test_node_loopback_is_never_tunnelled(world: World, target: str, shown: str) -> None:
    # Rule any-8080 would allow these; the agent's own status endpoint
    # listens on the node's 127.0.0.1:15021.
    n_audit = len(world.audit_records())
    proc = world.curl("app", f"http://{target}/status", "--proxy", PROXY, "--proxytunnel")
    assert _status(proc)[1] == "403"
    (rec,) = world.new_audit(n_audit)
    assert rec["event"] == "denied" and rec["rule"] == "connect:loopback"
    assert rec["connect_host"] == shown


def test_ipv6_literal_target_over_the_ipv6_listener(world: World) -> None:
    n_audit = len(world.audit_records())
    proc = world.curl("app", "https://[fd00:18:1::2]/", "--proxy", PROXY_V6)
    assert proc.returncode == 0, proc.stderr
    assert _status(proc) == ("200", "200")
    assert "azure-tls [fd00:18:1::2]:443 saw" in proc.stdout
    (rec,) = world.new_audit(n_audit)
    assert rec["connect_host"] == "[fd00:18:1::2]:443" and rec["dst"] == "[fd00:18:1::2]:443"
    # No name, and the address is one of BLOB's: its literal host matches first.
    assert rec["src"].startswith("[fd00:19:1::2]:") and rec["rule"] == "blob"
    assert rec["server_name"] is None and rec["event"] == "closed"


def test_proxy_authentication_per_workload(world: World) -> None:
    n_audit = len(world.audit_records())
    missing = world.curl("authed", f"https://{BLOB}/", "--proxy", PROXY)
    wrong = world.curl("authed", f"https://{BLOB}/", "--proxy", PROXY, "-U", "backup:nope")
    right = world.curl("authed", f"https://{BLOB}/", "--proxy", PROXY, "-U", f"backup:{SECRET}")
    assert _status(missing)[1] == "407" and _status(wrong)[1] == "407"
    assert right.returncode == 0, right.stderr
    assert _status(right) == ("200", "200")
    recs = world.new_audit(n_audit, 3)
    assert [(r["event"], r["rule"]) for r in recs] == [
        ("denied", "connect:proxy-auth"),
        ("denied", "connect:proxy-auth"),
        ("closed", "blob"),
    ]
    assert "no Proxy-Authorization" in recs[0]["error"]
    assert recs[1]["error"] == "proxy credentials not accepted"
    # A rotated secret applies at once, without a reload.
    new_secret = "rotated-" + SECRET
    world.users.write_text(f"backup:{new_secret}\n")
    old = world.curl("authed", f"https://{BLOB}/", "--proxy", PROXY, "-U", f"backup:{SECRET}")
    new = world.curl("authed", f"https://{BLOB}/", "--proxy", PROXY, "-U", f"backup:{new_secret}")
    assert _status(old)[1] == "407" and _status(new) == ("200", "200")
    world.new_audit(n_audit, 5)
    token = base64.b64encode(f"backup:{SECRET}".encode()).decode()
    for text in (world.audit.read_text(), (world.work / "agent.log").read_text()):
        assert SECRET not in text and token not in text


def test_workload_without_auth_needs_no_credentials_but_others_do(world: World) -> None:
    # `app` has no auth entry: credentials it sends anyway are ignored.
    proc = world.curl("app", f"https://{BLOB}/", "--proxy", PROXY, "-U", "x:y")
    assert _status(proc) == ("200", "200")


def test_source_that_is_no_workload_is_refused_by_the_kernel(world: World) -> None:
    n_audit = len(world.audit_records())
    before = _reject_counter(world)
    proc = world.curl("stranger", f"https://{BLOB}/", "--proxy", PROXY)
    assert proc.returncode == 7, proc.stderr  # couldn't connect: reset by the input chain
    assert _reject_counter(world) > before
    # Nothing of the stranger's reached the proxy. (Only its records: an
    # earlier test's tunnel may end, and be recorded, meanwhile.)
    new = world.new_audit(n_audit, 0)
    assert [r for r in new if r["src"].startswith("198.19.9.2:")] == [], new


def test_malformed_request_gets_400_and_plain_http_gets_501(world: World) -> None:
    n_audit = len(world.audit_records())
    out = world.python(
        "app",
        """
        import socket
        for request in (b"CONNECT no-port-here HTTP/1.1\\r\\n\\r\\n",
                        b"CONNECT a.test:443 HTTP/1.1\\nHost: a\\n\\n"):
            s = socket.create_connection(("169.254.99.1", 3128), timeout=5)
            s.sendall(request)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            print(data.split(b"\\r\\n")[0].decode())
        """,
    )
    assert out.splitlines() == ["HTTP/1.1 400 Bad Request"] * 2
    plain = world.curl("app", f"http://{BLOB}/", "--proxy", PROXY)
    assert _status(plain)[0] == "501"
    assert "only opens tunnels with CONNECT" in plain.stdout
    recs = world.new_audit(n_audit, 3)
    assert [r["event"] for r in recs] == ["failed"] * 3
    assert recs[0]["error"].startswith("malformed proxy request: CONNECT target needs a port")
    assert "bare LF" in recs[1]["error"]
    assert recs[2]["connect_host"] is None and recs[2]["via"] == "connect"


def test_metrics_count_connect_connections(world: World) -> None:
    out = world.lab.run(
        "node", ["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:15021/metrics"]
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("egress_agent_connect_")]
    assert any('event="closed",verdict="allow"' in line for line in lines), out


def _reject_counter(world: World) -> int:
    out = world.lab.run("node", ["nft", "-j", "list", "chain", "inet", "egress_agent", "input"])
    total = 0
    for item in json.loads(out.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment", "").startswith("CONNECT listener refuses"):
            for expr in rule["expr"]:
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
    return total


LISTENER_ALONE = '''
import asyncio, sys
from egress_agent.policy.load import parse_policy
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.connect import ConnectListener
from egress_agent.proxy.server import ProxyServer

POLICY = """
version: 1
proxy: {address_v4: 127.0.0.1, address_v6: "::1"}
workloads: {known: {cidrs: [127.0.0.3/32]}}
egress: []
default: deny
connect: {port: 3128}
"""

async def ask(source):
    reader, writer = await asyncio.open_connection("127.0.0.1", 3128, local_addr=(source, 0))
    writer.write(b"CONNECT a.test:443 HTTP/1.1\\r\\n\\r\\n")
    answer = await reader.read()
    writer.close()
    return answer.split(b"\\r\\n")[0].decode()

async def main():
    audit = AuditLog(sys.argv[1])
    proxy = ProxyServer(policy=parse_policy(POLICY), audit=audit)
    await proxy.start()
    listener = ConnectListener(proxy, 3128)
    await listener.start()
    print(await ask("127.0.0.4"))
    print(await ask("127.0.0.3"))
    await listener.close()
    await proxy.close()
    audit.close()

asyncio.run(main())
'''


def test_listener_refuses_a_source_it_does_not_know(lab: Lab, tmp_path: Path) -> None:
    # Without the kernel's filter in front (here nothing but the listener runs
    # in a fresh node namespace), the proxy's own identity check answers 403.
    audit = tmp_path / "audit.jsonl"
    proc = lab.run("node", [sys.executable, "-c", LISTENER_ALONE, str(audit)], check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["HTTP/1.1 403 Forbidden"] * 2
    unknown, known = (json.loads(line) for line in audit.read_text().splitlines())
    assert unknown["rule"] == "connect:unknown-source" and unknown["workload"] is None
    assert unknown["error"] == "source 127.0.0.4 is not a workload of this node's egress policy"
    assert known["rule"] == "default" and known["workload"] == "known"
    assert known["via"] == "connect" and known["event"] == "denied"


def _reload(world: World, text: str, expect: str, timeout: float = 10.0) -> None:
    log = world.work / "agent.log"
    offset = log.stat().st_size
    world.work.joinpath("policy.yaml").write_text(text)
    wait_until(
        lambda: expect in log.read_bytes()[offset:].decode(errors="replace"),
        timeout=timeout,
        what=f"{expect!r} in the agent log {log}",
    )


def test_reload_changes_auth_live_but_not_the_port(world: World) -> None:
    original = world.work.joinpath("policy.yaml").read_text()
    with_auth = original.replace(
        "    authed: {users_file:",
        f"    app: {{users_file: {world.users}}}\n    authed: {{users_file:",
    )
    assert with_auth != original
    try:
        _reload(world, with_auth, "reloaded (")  # by the file watch, or a poll that came first
        assert _status(world.curl("app", f"https://{BLOB}/", "--proxy", PROXY))[1] == "407"
        _reload(world, original, "reloaded (")
        assert _status(world.curl("app", f"https://{BLOB}/", "--proxy", PROXY))[1] == "200"
        _reload(world, original.replace("port: 3128", "port: 3129"), "connect.port changed")
        assert _status(world.curl("app", f"https://{BLOB}/", "--proxy", PROXY))[1] == "200"
    finally:
        world.work.joinpath("policy.yaml").write_text(original)


def test_stopping_the_agent_ends_open_tunnels_with_a_record(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nworkloads: {pod: {cidrs: [198.19.1.2/32]}}\n"
        "egress: [{name: sink, to: {ports: [9000]}, action: allow}]\n"
        "default: deny\nconnect: {port: 3128}\n"
    )
    audit = tmp_path / "audit.jsonl"
    agent = Agent(lab, policy=policy, audit=audit, log=tmp_path / "agent.log").start()
    client = lab.popen(
        "pod",
        [sys.executable, "-c", textwrap.dedent(
            """
            import socket, sys
            s = socket.create_connection(("169.254.99.1", 3128), timeout=20)
            s.sendall(b"CONNECT 198.18.1.2:9000 HTTP/1.1\\r\\n\\r\\nhello\\n")
            data = b""
            while data.count(b"\\n") < 3:
                data += s.recv(4096)
            print("open", flush=True)
            try:
                while s.recv(4096):
                    pass
                print("closed")
            except OSError as exc:
                print(type(exc).__name__)
            """
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "open"
        started = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - started < 2.0
        # The client learns at once that the tunnel is gone: tunnels end
        # before the proxy's address is removed, since without it the kernel
        # cannot route the packets that end them (the client would hang).
        assert client.wait(5) == 0
        assert client.stdout.read().strip() in ("closed", "ConnectionResetError")
    finally:
        client.kill()
    (rec,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert rec["via"] == "connect" and rec["event"] == "closed" and rec["rule"] == "sink"
    assert rec["error"] == "proxy stopping" and rec["bytes_up"] == len(b"hello\n")


# Opens a tunnel every 20 ms, and holds one open across, until a line on
# its stdin says stop: the test stops it once the successor took over,
# however long that took.
CONNECT_PROBE = """
import json, socket, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
def tunnel():
    s = socket.create_connection(("169.254.99.1", 3128), timeout=5)
    s.sendall(b"CONNECT 198.18.1.2:9000 HTTP/1.1\\r\\n\\r\\n")
    head = b""
    while not head.endswith(b"\\r\\n\\r\\n"):
        data = s.recv(1)
        if not data:
            raise ConnectionError("closed during the CONNECT answer")
        head += data
    if not head.startswith(b"HTTP/1.1 200 "):
        raise ConnectionError(head.split(b"\\r\\n")[0].decode())
    return s
long = tunnel()
long.sendall(b"before\\n")
first = long.recv(4096)
ok, failed, errors = 0, 0, []
while not stop.is_set():
    try:
        with tunnel() as s:
            s.sendall(b"probe\\n")
            if not s.recv(100):
                raise ConnectionError("closed without an answer")
        ok += 1
    except OSError as exc:
        failed += 1
        errors.append(repr(exc))
    time.sleep(0.02)
long.sendall(b"after\\n")
echo = long.recv(4096)
long.close()
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5], "echo": echo.decode()}))
"""


def test_a_new_agent_takes_the_connect_listener_over(pod_and_sink: Lab, tmp_path: Path) -> None:
    lab = pod_and_sink
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nworkloads: {pod: {cidrs: [198.19.1.2/32]}}\n"
        "egress: [{name: sink, to: {ports: [9000]}, action: allow}]\n"
        "default: deny\nconnect: {port: 3128}\n"
    )

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
    probe = lab.popen(
        "pod", [sys.executable, "-c", CONNECT_PROBE], stdin=-1, stdout=-1, stderr=-1, text=True
    )
    try:
        audit.wait(10, timeout=60)  # tunnels under way through the old agent
        new.start()
        audit.wait(audit.mark() + 50, timeout=60)  # and on through the new one
        out, err = probe.communicate("stop\n", timeout=30)
        assert probe.returncode == 0, err
        probed = json.loads(out)
        assert old.proc is not None and old.proc.wait(timeout=10) == 0  # drained, gone
    finally:
        if probe.poll() is None:
            probe.kill()
        new.stop()
        if old.proc is not None and old.proc.poll() is None:
            old.kill()
    # No CONNECT refused during the switch; the tunnel open across it still works.
    assert probed["failed"] == 0 and probed["ok"] > 50, probed
    assert probed["echo"] == "after\n"
    new_log = (tmp_path / "new.log").read_text()
    assert "took over 4 listening sockets" in new_log
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == probed["ok"] + 1 and all(r["via"] == "connect" for r in records)
    assert all(r["event"] == "closed" and r["error"] is None for r in records)
