"""The lab itself: namespaces wired like a Calico node, the test server, the
test CA, and a teardown that leaves nothing behind -- also after a failure.

Every other integration test stands on these properties (the pods' own
addresses reach the servers, names resolve through /etc/netns, the node side
of a pod veth has no IPv4 address), so they are checked here first.
"""

from __future__ import annotations

import json
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from egress_agent.lab.netns import NETNS_ETC_DIR, Host, Lab, LabCommandError, pid_alive
from egress_agent.lab.servers import read_log, start_server
from egress_agent.lab.tls import make_ca

pytestmark = pytest.mark.netns

BLOB = "pgbackups.blob.core.windows.net"

# Connect, send, half-close, read to the end: what a plain TCP client does.
TCP_CLIENT = r"""
import json, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.create_connection((host, port), timeout=5)
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"local": s.getsockname()[0], "reply": data.decode()}))
"""

# TLS with the lab CA only, strict X.509 checks, by host name (SNI).
TLS_CLIENT = r"""
import json, socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.verify_flags |= ssl.VERIFY_X509_STRICT
with socket.create_connection((host, port), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(b"hello\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            line += chunk
        s.sendall(b"again")
        echo = s.recv(100)
        peer = s.getpeername()[0]
print(json.dumps({"reply": line.decode(), "echo": echo.decode(), "peer": peer}))
"""


def tcp(lab: Lab, host: str, target: str, port: int, payload: str = "hello\n") -> dict[str, Any]:
    out = lab.run(host, [sys.executable, "-c", TCP_CLIENT, target, str(port), payload]).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def hostport(addr: object, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def peer_ip(record: dict[str, Any]) -> str:
    return str(record["peer"]).rsplit(":", 1)[0].strip("[]")


def build(lab: Lab) -> tuple[Host, Host, Host]:
    primary = lab.add_pod("pg-primary", "198.19.1.2", "fd00:19:1::2")
    replica = lab.add_pod("pg-replica", "198.19.2.2", "fd00:19:2::2")
    azure = lab.add_external("azure", "198.18.1.2", "fd00:18:1::2", hostnames=[BLOB])
    return primary, replica, azure


def assert_all_gone(prefix: str, names: list[str], pids: list[int]) -> None:
    assert [n for n in netns.listnetns() if n.startswith(prefix)] == []
    assert [n for n in names if (NETNS_ETC_DIR / n).exists()] == []
    assert [pid for pid in pids if pid_alive(pid)] == []


def test_pods_and_externals_talk_directly_over_both_families(lab: Lab, tmp_path: Path) -> None:
    primary, replica, azure = build(lab)
    log = tmp_path / "servers.jsonl"
    start_server(
        lab,
        "pg-replica",
        name="replica",
        listen=["198.19.2.2:5432", "[fd00:19:2::2]:5432"],
        tls=None,
        log=log,
    )
    start_server(
        lab, "azure", name="azure", listen=["198.18.1.2:9000", "[fd00:18:1::2]:9000"], tls=None,
        log=log,
    )  # fmt: skip
    flows = [
        ("replica", replica.ipv4, 5432, primary.ipv4),
        ("replica", replica.ipv6, 5432, primary.ipv6),
        ("azure", azure.ipv4, 9000, primary.ipv4),
        ("azure", azure.ipv6, 9000, primary.ipv6),
    ]
    for name, target, port, source in flows:
        result = tcp(lab, "pg-primary", str(target), port)
        assert result["local"] == str(source)
        assert result["reply"].startswith(
            f"{name} {hostport(target, port)} saw {hostport(source, 0)[:-1]}"
        ), result
    records = read_log(log, at_least=len(flows))
    # No NAT anywhere: every server saw the pod's own address.
    assert [(r["server"], peer_ip(r)) for r in records] == [
        (name, str(source)) for name, _, _, source in flows
    ]
    # And the way back works from the external side, too (replies and new flows).
    assert tcp(lab, "azure", str(replica.ipv4), 5432)["local"] == str(azure.ipv4)
    assert tcp(lab, "azure", str(replica.ipv6), 5432)["local"] == str(azure.ipv6)


def test_node_side_of_a_pod_veth_has_no_ipv4_address(lab: Lab) -> None:
    primary, _, azure = build(lab)
    show = ["ip", "-j", "addr", "show", "dev", primary.node_ifname]
    addrs = json.loads(lab.run("node", show).stdout)
    families = {a["family"] for a in addrs[0]["addr_info"]}
    assert families == {"inet6"}  # link-locals only
    assert "fe80::1" in {a["local"] for a in addrs[0]["addr_info"]}
    sysctl = ["sysctl", "-n", f"net.ipv4.conf.{primary.node_ifname}.proxy_arp"]
    assert lab.run("node", sysctl).stdout.strip() == "1"
    # The pod's own view: a /32 and an on-link gateway, like Calico.
    show = ["ip", "-j", "addr", "show", "dev", "eth0"]
    pod_addrs = json.loads(lab.run("pg-primary", show).stdout)
    assert {(a["local"], a["prefixlen"]) for a in pod_addrs[0]["addr_info"]} >= {
        ("198.19.1.2", 32),
        ("fd00:19:1::2", 128),
    }
    v4 = json.loads(lab.run("pg-primary", ["ip", "-j", "route", "show", "default"]).stdout)
    v6 = json.loads(lab.run("pg-primary", ["ip", "-j", "-6", "route", "show", "default"]).stdout)
    assert (v4[0]["gateway"], v4[0]["dev"]) == ("169.254.1.1", "eth0")
    assert (v6[0]["gateway"], v6[0]["dev"]) == ("fe80::1", "eth0")
    # External hosts do have a subnet with the node.
    assert azure.node_ipv4 == ip_address("198.18.1.1")
    assert azure.node_ipv6 == ip_address("fd00:18:1::1")


def test_names_resolve_in_every_namespace(lab: Lab) -> None:
    build(lab)
    for host in ("pg-primary", "pg-replica", "azure", "node"):
        out = lab.run(host, ["getent", "ahostsv4", BLOB]).stdout
        assert out.split()[0] == "198.18.1.2", (host, out)
    lab.add_hosts_entry("echo6.test", "fd00:18:1::2")
    assert lab.run("pg-replica", ["getent", "hosts", "echo6.test"]).stdout.split()[0] == (
        "fd00:18:1::2"
    )
    # Logical names resolve too, and a host added later is known everywhere.
    lab.add_pod("registry", "198.19.3.2", "fd00:19:3::2")
    assert lab.run("registry", ["getent", "hosts", BLOB]).stdout.split()[0] == "198.18.1.2"
    assert lab.run("node", ["getent", "hosts", "registry"]).stdout.split()[0] == "198.19.3.2"


def test_tls_server_with_the_lab_ca(lab: Lab, tmp_path: Path) -> None:
    build(lab)
    ca = make_ca(tmp_path / "ca")
    cert = ca.issue(tmp_path / "blob", [BLOB, "198.18.1.2"])
    log = tmp_path / "azure.jsonl"
    start_server(lab, "azure", name="azure-tls", listen=["198.18.1.2:443"], tls=cert, log=log)
    argv = [sys.executable, "-c", TLS_CLIENT, BLOB, "443", str(ca.cert_path)]
    result = json.loads(lab.run("pg-primary", argv).stdout)
    assert result["reply"].startswith("azure-tls 198.18.1.2:443 saw 198.19.1.2:")
    assert result["echo"] == "again"
    # curl: HTTP over TLS, by IP (an IP SAN), with the CA given explicitly.
    curl = [
        "curl", "-sS", "--cacert", str(ca.cert_path), "-D", "-", "--data-binary", "x" * 3000,
        "https://198.18.1.2/upload",
    ]  # fmt: skip
    response = lab.run("pg-primary", curl).stdout
    head, _, body = response.partition("\n\n")  # text mode: CRLF reads as LF
    assert head.startswith("HTTP/1.1 200 OK")
    assert f"Content-Length: {len(body)}" in head
    assert body.startswith("azure-tls 198.18.1.2:443 saw 198.19.1.2:")
    first, second = read_log(log, at_least=2)
    assert first["tls"] and first["sni"] == BLOB and first["error"] is None
    assert first["first"] == "hello\n"
    assert second["sni"] is None  # no SNI for an IP address
    assert second["first"].startswith("POST /upload HTTP/1.1\r\n")
    assert second["bytes_in"] > 3000  # TLS records of the head and body


def test_server_echoes_after_the_first_line_and_counts_bytes(lab: Lab, tmp_path: Path) -> None:
    build(lab)
    log = tmp_path / "replica.jsonl"
    start_server(lab, "pg-replica", name="replica", listen=["198.19.2.2:7000"], tls=None, log=log)
    # More than one read's worth, so the first line and the rest arrive together.
    payload = "first line\n" + "and the rest " * 8000
    result = tcp(lab, "pg-primary", "198.19.2.2", 7000, payload)
    answer, _, echoed = result["reply"].partition("\n")
    assert answer.startswith("replica 198.19.2.2:7000 saw 198.19.1.2:")
    assert echoed == payload.partition("\n")[2]
    (record,) = read_log(log, at_least=1)
    assert record["bytes_in"] == len(payload)
    assert record["bytes_out"] == len(result["reply"])
    assert record["first"] == "first line\n" and record["tls"] is False


def test_a_busy_port_is_reported_by_start_server(lab: Lab, tmp_path: Path) -> None:
    build(lab)
    log = tmp_path / "a.jsonl"
    start_server(lab, "azure", name="one", listen=["198.18.1.2:9000"], tls=None, log=log)
    with pytest.raises(RuntimeError, match=r"(?i)address already in use"):
        start_server(lab, "azure", name="two", listen=["198.18.1.2:9000"], tls=None, log=log)


def test_run_reports_the_failing_command(lab: Lab) -> None:
    with pytest.raises(LabCommandError, match=r"in node: .*No such file"):
        lab.run("node", ["ls", "/nonexistent-egress-lab"])
    assert lab.run("node", ["false"], check=False).returncode == 1
    with pytest.raises(KeyError, match="no lab host"):
        lab.run("nobody", ["true"])


def test_bad_hosts_are_refused_before_anything_is_made(lab: Lab) -> None:
    bad_pods = [
        ("p", "10.1.2.3", "fd00:19:9::2"),  # outside 198.18.0.0/15
        ("p", "198.19.9.2", "2001:db8::2"),  # outside fd00::/8
        ("node", "198.19.9.2", "fd00:19:9::2"),
        ("Bad_Name", "198.19.9.2", "fd00:19:9::2"),
    ]
    for args in bad_pods:
        with pytest.raises(ValueError):
            lab.add_pod(*args)
    lab.add_external("azure", "198.18.1.2", "fd00:18:1::2")
    with pytest.raises(ValueError, match="exists already"):
        lab.add_pod("azure", "198.19.9.2", "fd00:19:9::2")
    with pytest.raises(ValueError, match="subnet"):
        lab.add_external("other", "198.18.1.9", "fd00:18:9::2")
    with pytest.raises(ValueError, match="node's"):
        lab.add_external("other", "198.18.2.1", "fd00:18:2::2")
    assert list(lab.namespaces) == [lab.node, f"{lab.prefix}azure"]


def test_the_node_resolves_the_lab_names_from_a_real_dns_server(lab: Lab) -> None:
    build(lab)
    lab.add_hosts_entry("v6only.test", "fd00:18:1::2")
    code = """
import json, dns.resolver
r = dns.resolver.Resolver()
out = {}
for name in ("pgbackups.blob.core.windows.net", "v6only.test", "unknown.test"):
    for rdtype in ("A", "AAAA"):
        try:
            got = r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
            ttl = got.rrset.ttl if got.rrset else 0
            out[name + " " + rdtype] = [str(x) for x in got.rrset or []] + [ttl]
        except dns.resolver.NXDOMAIN:
            out[name + " " + rdtype] = "NXDOMAIN"
print(json.dumps(out))
"""
    got = json.loads(lab.run("node", [sys.executable, "-c", code]).stdout)
    assert got == {
        f"{BLOB} A": ["198.18.1.2", 30],
        f"{BLOB} AAAA": ["fd00:18:1::2", 30],
        "v6only.test A": [0],
        "v6only.test AAAA": ["fd00:18:1::2", 30],
        "unknown.test A": "NXDOMAIN",
        "unknown.test AAAA": "NXDOMAIN",
    }
    assert lab.run("node", ["cat", "/etc/resolv.conf"]).stdout.count("nameserver") == 1
    # Stopped, it answers nothing; started again, it serves the same names.
    lab.dns.stop()
    assert lab.run("node", [sys.executable, "-c", code], check=False).returncode != 0
    lab.dns.start()
    assert json.loads(lab.run("node", [sys.executable, "-c", code]).stdout) == got


def test_close_removes_namespaces_folders_and_processes(require_root: None, tmp_path: Path) -> None:
    lab = Lab()
    pids: list[int] = []
    try:
        lab.start()
        build(lab)
        server = start_server(
            lab, "azure", name="azure", listen=["198.18.1.2:9000"], tls=None,
            log=tmp_path / "a.jsonl",
        )  # fmt: skip
        # A process that leaves a child behind when it is terminated: the
        # teardown finds that child by its namespace.
        parent = lab.popen(
            "pg-primary", ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=-1, text=True
        )
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        pids = [server.pid, parent.pid, child, lab.dns.pid]
        assert all(pid_alive(pid) for pid in pids)
        names = list(lab.namespaces)  # node, two pods, azure and the DNS server's host
        assert len(names) == 5 and all((NETNS_ETC_DIR / n / "hosts").exists() for n in names)
        dns_folder = lab.dns.folder
        assert dns_folder.exists()
    finally:
        lab.close()
    assert_all_gone(lab.prefix, names, pids)
    assert not dns_folder.exists()
    lab.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        lab.add_pod("late", "198.19.9.2", "fd00:19:9::2")


def test_teardown_happens_when_the_body_raises(require_root: None, tmp_path: Path) -> None:
    pids: list[int] = []
    names: list[str] = []
    prefix = ""
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        prefix = lab.prefix
        build(lab)
        server = start_server(
            lab, "pg-replica", name="r", listen=["198.19.2.2:5432"], tls=None,
            log=tmp_path / "r.jsonl",
        )  # fmt: skip
        pids += [server.pid, lab.dns.pid]
        names += lab.namespaces
        raise RuntimeError("boom")
    assert prefix and len(names) == 5
    assert_all_gone(prefix, names, pids)
