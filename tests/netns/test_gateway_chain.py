"""One egress address for a cluster, end to end on namespaces.

A pod's connections are diverted to the node's agent (transparent, as on a
Kubernetes node); its rules send them through a gateway with ``via:``, and
the gateway leaves from one "public" address. Two gateways: this project's
own agent (its CONNECT listener, ``source:`` bound to the public address)
and Debian's Squid (``tcp_outgoing_address``, Basic proxy credentials
checked by a helper, TLS to the proxy).

Judged where a user would look: the internet server's log (which address
every connection came from, and that a refused flow never arrived there --
not even directly), the client's result, and both agents' audit records.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log, start_server
from egress_agent.lab.tls import make_ca
from tests.harness import Agent, Audit, pin_dir, wait_until

pytestmark = pytest.mark.netns

SQUID = "/usr/sbin/squid"
PARTNER = "partner.example"  # allowed by both gateways
OTHER = "other.example"  # allowed by the node, refused by the gateways
SERVER_V4 = "198.18.1.2"
GW_NAME = "egress-gw.lab.test"  # the agent gateway's listening address, by name
GW_LISTEN = "198.18.5.3"  # on the gateway's loopback (its proxy.address_v4)
GW_PUBLIC = "198.18.5.7"  # what the internet sees
GW_PUBLIC_V6 = "fd00:18:5::7"
SQUID_LISTEN = "198.18.6.2"
SQUID_PUBLIC = "198.18.6.7"
USER, PASSWORD = "node-a", "Gate-Pass-1"


def node_policy(work: Path) -> str:
    return f"""
version: 1
proxy: {{peek_timeout: 3, connect_timeout: 5}}
workloads:
  app: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
intercept:
  - from: [app]
    ports: [443, 8080, 8081, 8443, 8444, 9443, 9444, 9445, 9446, 9447, 9448]
egress:
  - name: via-agent-gateway
    from: [app]
    to: {{ports: [443, 8080]}}
    action: allow
    via: {{connect: "{GW_NAME}:3128"}}
  - name: via-squid
    from: [app]
    to: {{ports: [8443]}}
    action: allow
    via:
      connect: "{SQUID_LISTEN}:3129"
      auth: {{username_file: {work / "user"}, password_file: {work / "password"}}}
      tls: {{ca_file: {work / "ca" / "ca.crt"}, server_name: squid.lab.test}}
  - name: via-squid-wrong-password
    from: [app]
    to: {{ports: [8444]}}
    action: allow
    via:
      connect: "{SQUID_LISTEN}:3128"
      auth: {{username_file: {work / "user"}, password_file: {work / "wrong"}}}
  - name: via-gateway-down
    from: [app]
    to: {{ports: [9443]}}
    action: allow
    via: {{connect: "{GW_LISTEN}:3999"}}
  - name: via-banner-gateway
    from: [app]
    to: {{ports: [9445]}}
    action: allow
    via: {{connect: "{SQUID_LISTEN}:3300"}}
  - name: via-plain-port-with-tls
    from: [app]
    to: {{ports: [9446]}}
    action: allow
    via: {{connect: "{SQUID_LISTEN}:3128", tls: {{ca_file: {work / "ca" / "ca.crt"}}}}}
  - name: from-either-family
    from: [app]
    to: {{ports: [9447]}}
    action: allow
    source: {{address: [198.18.1.1, "fd00:18:1::1"]}}
  - name: from-v4-only
    from: [app]
    to: {{ports: [9444]}}
    action: allow
    source: {{address: 198.18.1.1}}
  - name: partner-through-gateway
    from: [app]
    to: {{hosts: ["*.example"], ports: [9448]}}   # a wildcard owns no address
    action: allow
    via: {{connect: "{GW_NAME}:3128"}}
  - name: plain-by-name-through-gateway
    from: [app]
    to: {{hosts: [{PARTNER}], ports: [8081]}}
    action: allow
    via: {{connect: "{GW_NAME}:3128"}}
  - name: server-address-direct
    from: [app]
    to: {{cidrs: [{SERVER_V4}/32], ports: [9448]}}
    action: allow
default: deny
"""


GATEWAY_POLICY = f"""
version: 1
proxy: {{address_v4: {GW_LISTEN}, peek_timeout: 3, connect_timeout: 5}}
workloads:
  nodes: {{cidrs: [198.18.5.1/32]}}
intercept: []
egress:
  - name: partner
    from: [nodes]
    to: {{hosts: [{PARTNER}], ports: [443, 8080]}}
    action: allow
    source: {{address: [{GW_PUBLIC}, "{GW_PUBLIC_V6}"]}}
default: deny
connect: {{port: 3128}}
"""

# Squid's basic authentication helper protocol: one "user password" line
# (URL-encoded) in, "OK" or "ERR" out.
AUTH_HELPER = f"""
import sys, urllib.parse
for line in sys.stdin:
    user, _, password = line.rstrip("\\n").partition(" ")
    ok = urllib.parse.unquote(user) == {USER!r} and urllib.parse.unquote(password) == {PASSWORD!r}
    print("OK" if ok else "ERR", flush=True)
"""


# A gateway that answers CONNECT and, in the same write, speaks first for the
# server (a banner); then echoes. It logs the request head and what followed.
BANNER_GATEWAY = """
import socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    conn, _ = listener.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += conn.recv(4096)
    head, _, rest = data.partition(b"\\r\\n\\r\\n")
    conn.sendall(b"HTTP/1.1 200 Connection established\\r\\n\\r\\nbanner from the tunnel\\n")
    while b"\\n" not in rest:
        more = conn.recv(4096)
        if not more:
            break
        rest += more
    conn.sendall(b"echo " + rest)
    with open(sys.argv[3], "a") as log:
        log.write(head.decode().split("\\r\\n")[0] + " | " + rest.decode())
    conn.close()
"""


def squid_conf(folder: Path, cert: Path, key: Path) -> str:
    return f"""
http_port {SQUID_LISTEN}:3128
https_port {SQUID_LISTEN}:3129 tls-cert={cert} tls-key={key}
pid_filename none
cache_effective_user proxy
cache deny all
cache_mem 8 MB
cache_log {folder}/cache.log
access_log stdio:{folder}/access.log
logfile_rotate 0
coredump_dir {folder}
dns_nameservers 198.18.255.2
tcp_outgoing_address {SQUID_PUBLIC}
shutdown_lifetime 1 seconds
pinger_enable off
auth_param basic program {sys.executable} {folder}/auth.py
auth_param basic children 1
auth_param basic realm lab gateway
acl node src 198.18.6.1/32
acl authed proxy_auth REQUIRED
acl partner dstdomain {PARTNER}
acl tls_ports port 443 8443 8444
acl CONNECT method CONNECT
http_access deny !node
http_access deny !authed
http_access allow CONNECT partner tls_ports
http_access deny all
"""


@dataclass
class World:
    lab: Lab
    work: Path
    ca: Path
    node: Agent
    gateway: Agent
    squid_log: Path

    def curl(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "curl", "-sS", "--max-time", "15", "--cacert", str(self.ca),
            "-o", "-", "-w", "\n%{http_code}", *args, url,
        ]  # fmt: skip
        return self.lab.run("app", argv, check=False)

    def server_log(self) -> list[dict[str, Any]]:
        return read_log(self.work / "server.jsonl")


def _wait_listening(lab: Lab, host: str, address: str, port: int) -> None:
    wait_until(
        lambda: lab.run(host, ["ss", "-Hltn", f"src {address}:{port}"]).stdout.strip(),
        timeout=30,
        what=f"a listener on {address}:{port} in {host}",
        interval=0.2,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("gateway")
    squid_dir = Path(tempfile.mkdtemp(prefix="egress-squid-"))
    with Lab() as lab:
        lab.add_pod("app", "198.19.1.2", "fd00:19:1::2")
        lab.add_external("internet", SERVER_V4, "fd00:18:1::2", hostnames=[PARTNER, OTHER])
        lab.add_external("gateway", "198.18.5.2/24", "fd00:18:5::2/64")
        lab.add_external("squidgw", "198.18.6.2/24", "fd00:18:6::2/64")
        lab.add_hosts_entry(GW_NAME, GW_LISTEN)
        # The gateways' "public" addresses: second addresses on their uplinks,
        # which the node routes to them (the subnet is on that link).
        lab.run("gateway", ["ip", "address", "add", f"{GW_PUBLIC}/24", "dev", "eth0"])
        lab.run("gateway", ["ip", "address", "add", f"{GW_PUBLIC_V6}/64", "dev", "eth0"])
        lab.run("squidgw", ["ip", "address", "add", f"{SQUID_PUBLIC}/24", "dev", "eth0"])
        # The gateways resolve names with the lab's DNS server only.
        for host in ("gateway", "squidgw"):
            (Path("/etc/netns") / lab.netns_of(host) / "resolv.conf").write_text(
                "nameserver 198.18.255.2\noptions timeout:1 attempts:1\n"
            )

        ca = make_ca(work / "ca")
        cert = ca.issue(work / "server", [PARTNER, OTHER])
        start_server(
            lab,
            "internet",
            name="internet",
            listen=[f"{SERVER_V4}:{p}" for p in (443, 8443, 8444, 9443, 9444)]
            + [f"{SERVER_V4}:9448", "[fd00:18:1::2]:9444", "[fd00:18:1::2]:9447"],
            tls=cert,
            log=work / "server.jsonl",
        )
        start_server(
            lab,
            "internet",
            name="internet-http",
            listen=[f"{SERVER_V4}:8080", f"{SERVER_V4}:8081"],
            tls=None,
            log=work / "server.jsonl",
        )

        # Squid: its own files, readable by the user it drops to.
        squid_cert = ca.issue(work / "squid", ["squid.lab.test"])
        shutil.copy(squid_cert.cert_path, squid_dir / "cert.pem")
        shutil.copy(squid_cert.key_path, squid_dir / "key.pem")
        (squid_dir / "auth.py").write_text(textwrap.dedent(AUTH_HELPER))
        conf = squid_dir / "squid.conf"
        conf.write_text(squid_conf(squid_dir, squid_dir / "cert.pem", squid_dir / "key.pem"))
        proxy_user = pwd.getpwnam("proxy")
        for path in [squid_dir, *squid_dir.iterdir()]:
            os.chown(path, proxy_user.pw_uid, proxy_user.pw_gid)
        squid_dir.chmod(0o755)

        (work / "user").write_text(f"{USER}\n")
        (work / "password").write_text(f"{PASSWORD}\n")
        (work / "wrong").write_text("not-the-password\n")
        for name in ("user", "password", "wrong"):
            (work / name).chmod(0o600)
        (work / "node.yaml").write_text(node_policy(work))
        (work / "gateway.yaml").write_text(GATEWAY_POLICY)

        banner = lab.popen(
            "squidgw",
            [sys.executable, "-c", BANNER_GATEWAY, SQUID_LISTEN, "3300", str(work / "banner.log")],
            stdout=subprocess.PIPE,
        )
        assert banner.stdout is not None and banner.stdout.readline() == b"READY\n"
        squid = lab.popen(
            "squidgw",
            [SQUID, "-N", "-f", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(squid_dir / "stderr.log", "wb"),  # noqa: SIM115
        )
        gateway = Agent(
            lab,
            host="gateway",
            policy=work / "gateway.yaml",
            audit=work / "gateway-audit.jsonl",
            log=work / "gateway.log",
            extra_args=("--datapath", "nft", "--bpf-pin-dir", pin_dir(lab) + "-gw"),
        )
        node = Agent(
            lab, policy=work / "node.yaml", audit=work / "node-audit.jsonl", log=work / "node.log"
        )
        try:
            gateway.start()
            node.start()
            _wait_listening(lab, "squidgw", SQUID_LISTEN, 3129)
            yield World(
                lab=lab,
                work=work,
                ca=ca.cert_path,
                node=node,
                gateway=gateway,
                squid_log=squid_dir / "access.log",
            )
        finally:
            for agent in (node, gateway):
                if agent.proc is not None:
                    agent.stop()
            banner.terminate()
            banner.wait(10)
            squid.terminate()
            try:
                squid.wait(15)
            except subprocess.TimeoutExpired:
                squid.kill()
                squid.wait()
            # Its helpers end when their input does.
            ns = lab.netns_of("squidgw")

            def left() -> list[str]:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                if not pids.stdout.split():
                    return []
                ps = subprocess.run(
                    ["ps", "-o", "stat=,pid=,args=", "-p", ",".join(pids.stdout.split())],
                    capture_output=True,
                    text=True,
                )
                return [line for line in ps.stdout.splitlines() if not line.startswith("Z")]

            wait_until(lambda: not left(), timeout=10, what="squid's helpers gone")
            shutil.rmtree(squid_dir, ignore_errors=True)


def _records_of(
    audit: Audit, mark: int, *rules: str, count: int = 1
) -> list[dict[str, Any]]:
    """This test's records after ``mark``: those of ``rules`` (the record of
    an earlier test's last connection may be written after the mark)."""
    return wait_until(
        lambda: (got := [r for r in audit.since(mark) if r.get("rule") in rules])
        and len(got) >= count
        and got,
        timeout=15,
        what=f"{count} audit record(s) of {', '.join(rules)}",
    )


def _peer_address(record: dict[str, Any]) -> str:
    return str(record["peer"]).rsplit(":", 1)[0].strip("[]")


def test_the_server_sees_only_the_gateways_public_address(world: World) -> None:
    node_audit = Audit(world.work / "node-audit.jsonl")
    gw_audit = Audit(world.work / "gateway-audit.jsonl")
    node_mark, gw_mark, seen = node_audit.mark(), gw_audit.mark(), len(world.server_log())

    tls = world.curl(f"https://{PARTNER}/tls")
    plain = world.curl(f"http://{PARTNER}:8080/plain")

    assert tls.stdout.endswith("\n200"), tls.stderr
    assert plain.stdout.endswith("\n200"), plain.stderr
    server = read_log(world.work / "server.jsonl", at_least=seen + 2)[seen:]
    assert len(server) == 2
    assert {_peer_address(r) for r in server} == {GW_PUBLIC}
    assert {r["local"] for r in server} == {f"{SERVER_V4}:443", f"{SERVER_V4}:8080"}
    assert all(r["error"] is None for r in server), server

    node_records = _records_of(node_audit, node_mark, "via-agent-gateway", count=2)
    for record in node_records:
        assert record["event"] == "closed" and record["rule"] == "via-agent-gateway"
        assert record["gateway"] == f"{GW_NAME}:3128"
        assert record["server_name"] == PARTNER
        # The tunnel left the node from its address on the gateway's link.
        assert record["source"].startswith("198.18.5.1:")
    assert {r["protocol"] for r in node_records} == {"tls", "http"}

    # The gateway decided by name (the CONNECT named the server) and left
    # from its public address, at the very port the server saw.
    gw_records = gw_audit.wait(2, after=gw_mark)
    for record in gw_records:
        assert record["via"] == "connect" and record["event"] == "closed"
        assert record["rule"] == "partner" and record["server_name"] == PARTNER
        assert record["src"].startswith("198.18.5.1:")
    assert {r["connect_host"] for r in gw_records} == {f"{PARTNER}:443", f"{PARTNER}:8080"}
    assert {r["source"] for r in gw_records} == {r["peer"] for r in server}


def test_a_name_the_gateway_refuses_resets_the_client_and_never_leaves(world: World) -> None:
    node_audit = Audit(world.work / "node-audit.jsonl")
    gw_audit = Audit(world.work / "gateway-audit.jsonl")
    node_mark, gw_mark, seen = node_audit.mark(), gw_audit.mark(), len(world.server_log())

    result = world.curl(f"https://{OTHER}/")

    assert result.returncode in (35, 56), (result.returncode, result.stderr)
    [record] = _records_of(node_audit, node_mark, "via-agent-gateway")
    assert record["event"] == "failed" and record["rule"] == "via-agent-gateway"
    assert record["server_name"] == OTHER
    assert record["error"] == (f"gateway {GW_NAME}:3128 answered CONNECT: 'HTTP/1.1 403 Forbidden'")
    [denied] = gw_audit.wait(1, after=gw_mark)
    assert denied["event"] == "denied" and denied["rule"] == "default"
    assert denied["connect_host"] == f"{OTHER}:443"
    assert world.server_log()[seen:] == []


def test_squid_as_the_gateway(world: World) -> None:
    """Interop: TLS to the proxy, Basic credentials, CONNECT by name; the
    server sees Squid's outgoing address; a wrong password is Squid's 407."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    ok = world.curl(f"https://{PARTNER}:8443/through-squid")
    refused = world.curl(f"https://{PARTNER}:8444/wrong-password")

    assert ok.stdout.endswith("\n200"), ok.stderr
    assert refused.returncode in (35, 56), (refused.returncode, refused.stderr)
    server = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
    assert [(_peer_address(r), r["local"]) for r in server] == [(SQUID_PUBLIC, f"{SERVER_V4}:8443")]
    records = _records_of(node_audit, node_mark, "via-squid", "via-squid-wrong-password", count=2)
    by_rule = {r["rule"]: r for r in records}
    good = by_rule["via-squid"]
    assert good["event"] == "closed" and good["gateway"] == f"{SQUID_LISTEN}:3129"
    assert good["server_name"] == PARTNER and good["bytes_down"] > 0
    bad = by_rule["via-squid-wrong-password"]
    assert bad["event"] == "failed"
    assert bad["error"] == (
        f"gateway {SQUID_LISTEN}:3128 answered CONNECT:"
        " 'HTTP/1.1 407 Proxy Authentication Required' (check via.auth's files)"
    )
    access = wait_until(
        lambda: (text := world.squid_log.read_text()) and f"{PARTNER}:8443" in text and text,
        timeout=10,
        what="squid's access log line for the tunnel",
    )
    assert f"CONNECT {PARTNER}:8443 {USER}" in access


def test_a_gateway_that_is_down_fails_closed(world: World) -> None:
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    result = world.curl(f"https://{PARTNER}:9443/")

    assert result.returncode in (7, 35, 56), (result.returncode, result.stderr)
    [record] = _records_of(node_audit, node_mark, "via-gateway-down")
    assert record["event"] == "failed" and record["rule"] == "via-gateway-down"
    assert record["gateway"] == f"{GW_LISTEN}:3999"
    assert record["error"].startswith(f"gateway {GW_LISTEN}:3999: connect failed: ECONNREFUSED")
    # Nothing went direct: the server listens on 9443 and saw no one.
    assert world.server_log()[seen:] == []


def test_a_source_of_another_family_refuses_the_flow(world: World) -> None:
    """A rule whose source has no IPv6 address never sends an IPv6 flow
    from another address; its IPv4 flows leave from the source."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    v4 = world.curl(f"https://{PARTNER}:9444/")
    v6 = world.curl("https://[fd00:18:1::2]:9444/", "-k")

    assert v4.stdout.endswith("\n200"), v4.stderr
    # Reset as soon as it is accepted (the rule needs no name): curl may
    # see that before or after its connect completes.
    assert v6.returncode in (7, 35, 56), (v6.returncode, v6.stderr)
    server = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
    assert [_peer_address(r) for r in server] == ["198.18.1.1"]
    records = _records_of(node_audit, node_mark, "from-v4-only", count=2)
    [ok] = [r for r in records if r["event"] == "closed"]
    assert ok["source"] == server[0]["peer"]
    [refused] = [r for r in records if r["event"] == "failed"]
    assert refused["error"] == (
        "rule from-v4-only's source (198.18.1.1) has no IPv6 address for the destination"
        " fd00:18:1::2: not sent from another address; add an IPv6 address to"
        " source.address, or keep the rule to the families it has"
    )


def test_a_source_address_the_host_lacks_is_refused_at_start_and_reload(world: World) -> None:
    """Checked against the host at start (exit 2, nothing installed) and at
    every reload (the policy in force stays, and so do its flows)."""
    good = GATEWAY_POLICY
    missing = good.replace(f"address: [{GW_PUBLIC},", "address: [198.18.5.99,")
    assert missing != good
    line = next(i for i, text in enumerate(missing.splitlines(), 1) if "198.18.5.99" in text)
    column = missing.splitlines()[line - 1].index("198.18.5.99") + 1

    bad_file = world.work / "missing-source.yaml"
    bad_file.write_text(missing)
    started = world.lab.run(
        "gateway",
        [sys.executable, "-m", "egress_agent.agent.cli", "run", "--policy", str(bad_file),
         "--status-address", "127.0.0.1:15099", "--audit-log", "-", "--datapath", "nft"],
        check=False,
    )  # fmt: skip
    expected = (
        f":{line}:{column}: egress[0].source.address[0]: 198.18.5.99 is not an address of this"
        " host (its network namespace): add it to an interface (ip address add"
        " 198.18.5.99/PREFIX dev IFACE), or name one the host has"
    )
    assert started.returncode == 2, started.stderr
    assert f"{bad_file}{expected}" in started.stderr

    gateway = world.gateway
    generation, failed = gateway.generation(), gateway.reloads("failed")
    policy = world.work / "gateway.yaml"
    policy.write_text(missing)
    try:
        gateway.wait_reloads("failed", above=failed, timeout=30)
        status = gateway.status()
        assert status["policy"]["generation"] == generation
        assert f"{policy}{expected}" in status["last_reload"]["error"]
        seen = len(world.server_log())
        result = world.curl(f"https://{PARTNER}/still")
        assert result.stdout.endswith("\n200"), result.stderr
        server = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
        assert [_peer_address(r) for r in server] == [GW_PUBLIC]
    finally:
        policy.write_text(good)


def test_bytes_the_gateway_sends_with_its_answer_reach_the_client(world: World) -> None:
    """A server that speaks first, behind a gateway that passes its banner
    in the same segment as its 200: the client gets the banner, the
    CONNECT goes by address (the client sent no name), and the client's
    bytes go through the tunnel unchanged."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark = node_audit.mark()
    code = f"""
    import socket
    s = socket.create_connection(("{SERVER_V4}", 9445), timeout=15)
    banner = s.recv(100)
    s.sendall(b"ping through the tunnel\\n")
    data = b""
    while True:
        more = s.recv(100)
        if not more:
            break
        data += more
    print(repr((banner, data)))
    """
    out = world.lab.run("app", [sys.executable, "-c", textwrap.dedent(code)]).stdout.strip()

    assert out == repr((b"banner from the tunnel\n", b"echo ping through the tunnel\n"))
    logged = (world.work / "banner.log").read_text()
    assert logged == f"CONNECT {SERVER_V4}:9445 HTTP/1.1 | ping through the tunnel\n"
    [record] = _records_of(node_audit, node_mark, "via-banner-gateway")
    assert record["event"] == "closed" and record["rule"] == "via-banner-gateway"
    assert record["bytes_down"] == len(b"banner from the tunnel\necho ping through the tunnel\n")
    assert record["bytes_up"] == len(b"ping through the tunnel\n")


def test_tls_to_a_gateway_that_does_not_speak_it_fails_closed(world: World) -> None:
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    result = world.curl(f"https://{PARTNER}:9446/")

    assert result.returncode in (35, 56), (result.returncode, result.stderr)
    [record] = _records_of(node_audit, node_mark, "via-plain-port-with-tls")
    assert record["event"] == "failed" and record["rule"] == "via-plain-port-with-tls"
    assert record["error"].startswith(f"gateway {SQUID_LISTEN}:3128: TLS failed: "), record
    assert world.server_log()[seen:] == []


def test_a_source_per_family_is_used_for_ipv6(world: World) -> None:
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    v6 = world.curl("https://[fd00:18:1::2]:9447/", "-k")

    assert v6.stdout.endswith("\n200"), v6.stderr
    server = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
    assert [_peer_address(r) for r in server] == ["fd00:18:1::1"]
    [record] = _records_of(node_audit, node_mark, "from-either-family")
    assert record["rule"] == "from-either-family" and record["source"] == server[0]["peer"]


def test_a_name_whose_rule_chains_never_rides_a_direct_connection(world: World) -> None:
    """Connected early as a flow allowed without a name (a later rule allows
    the address directly), a ClientHello that names a server whose rule goes
    through the gateway is refused: not a byte of it reaches the server."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    result = world.curl(f"https://{PARTNER}:9448/")

    assert result.returncode in (35, 56), (result.returncode, result.stderr)
    [record] = _records_of(node_audit, node_mark, "partner-through-gateway")
    assert (record["event"], record["rule"]) == ("denied", "partner-through-gateway"), record
    assert record["error"] == (
        f"SNI {PARTNER} is allowed by rule partner-through-gateway only from its source or"
        " through its gateway, but the connection was made as a flow without a name (rule"
        " server-address-direct), which leaves another way"
    )
    server = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
    assert [r["bytes_in"] for r in server] == [0]


def test_plain_http_by_name_through_a_gateway_is_refused(world: World) -> None:
    """Plain HTTP allowed by a rule's hosts needs each request's Host checked,
    which only a direct connection gets: through a gateway it is reset, never
    sent direct."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())

    result = world.curl(f"http://{PARTNER}:8081/")

    assert result.returncode == 56, (result.returncode, result.stderr)
    [record] = _records_of(node_audit, node_mark, "plain-by-name-through-gateway")
    assert (record["event"], record["rule"]) == ("denied", "plain-by-name-through-gateway")
    assert record["error"].startswith("plain HTTP allowed by rule plain-by-name-through-gateway")
    assert world.server_log()[seen:] == []


def test_a_bulk_transfer_through_a_tls_gateway_arrives_intact(world: World) -> None:
    """Megabytes each way through Squid over TLS: the proxy's side of the
    tunnel is a TLS session, so its bytes must never be moved by the
    kernel relay (which would splice them past the encryption); the client
    gets back exactly what it sent, and the server counted it."""
    node_audit = Audit(world.work / "node-audit.jsonl")
    node_mark, seen = node_audit.mark(), len(world.server_log())
    code = f"""
    import hashlib, os, socket, ssl
    ctx = ssl.create_default_context(cafile="{world.ca}")
    raw = socket.create_connection(("{PARTNER}", 8443), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="{PARTNER}")
    s.sendall(b"bulk\\n")
    line = b""
    while not line.endswith(b"\\n"):
        line += s.recv(1)
    payload = os.urandom(3 * 1024 * 1024)
    back = bytearray()
    for i in range(0, len(payload), 256 * 1024):
        s.sendall(payload[i : i + 256 * 1024])
        while len(back) < min(i + 256 * 1024, len(payload)):
            more = s.recv(65536)
            if not more:
                break
            back += more
    same = hashlib.sha256(payload).digest() == hashlib.sha256(bytes(back)).digest()
    print(len(payload), len(back), same)
    """
    out = world.lab.run("app", [sys.executable, "-c", textwrap.dedent(code)], check=False)
    assert out.stdout.split() == [str(3 * 1024 * 1024), str(3 * 1024 * 1024), "True"], (
        out.stdout,
        out.stderr,
    )
    [record] = _records_of(node_audit, node_mark, "via-squid")
    assert record["event"] == "closed" and record["rule"] == "via-squid", record
    assert record["bytes_up"] > 3 * 1024 * 1024 and record["bytes_down"] > 3 * 1024 * 1024
    [server] = read_log(world.work / "server.jsonl", at_least=seen + 1)[seen:]
    assert _peer_address(server) == SQUID_PUBLIC and server["error"] is None, server
    assert server["bytes_in"] == record["bytes_up"], (server, record)
    # The proxy relayed it, and says why the kernel did not.
    assert world.node.status()["relay"]["fallbacks"].get("tls", 0) >= 1
