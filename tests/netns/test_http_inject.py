"""HTTP rules end to end: a pod speaks HTTP, the proxy injects credentials
read from files and originates TLS to a lab HTTPS server that logs every
request head it received.

Topology: pod ``pg`` (198.19.1.2), external host ``azure`` (198.18.1.2, named
pgbackups.blob.core.windows.net) running ``tests/lab/httpupstream.py``
on 443 with a certificate from the test CA, and on 8443 with one from another
CA (for the verification failure). The agent runs in the node namespace.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.tls import make_ca
from tests import harness
from tests.harness import Agent, wait_until
from tests.lab.httpupstream import requests_seen, start_http_upstream

pytestmark = pytest.mark.netns

BLOB = "pgbackups.blob.core.windows.net"
OTHER_BLOB = "replicas.blob.core.windows.net"
SECRETS = {
    "apikey": "apikey-Zx81-first",
    "sas": "sv=2022-11-02&ss=b&srt=co&sp=rwdlac&se=2030-01-01T00:00:00Z&sig=SECRETsig0001",
    "token": "bearer-token-Qm29-first",
    "account-key": base64.b64encode(b"account key for the lab, 32 bytes+").decode(),
}
MiB = 1024 * 1024


@dataclass
class World(harness.World):
    ca: Path
    agent: Agent
    upstream_log: Path

    def records(self) -> list[dict[str, Any]]:
        """Every record, the requests' too."""
        return self.audit_log.all()

    def wait_records(self, pred: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The records ``pred`` picks, once there is one."""
        return wait_until(
            lambda: [r for r in self.records() if pred(r)],
            timeout=timeout,
            what="a matching audit record",
        )

    def seen(self) -> list[dict[str, Any]]:
        return requests_seen(self.upstream_log)

    def pod(self, code: str, timeout: float = 120) -> Any:
        return json.loads(self.python("pg", code, timeout=timeout))

    def raw(self, port: int, payload: bytes) -> bytes:
        """Send ``payload`` from the pod to BLOB:port and read until the proxy closes."""
        code = f"""
            import base64, json, socket
            s = socket.create_connection(({BLOB!r}, {port}), timeout=10)
            s.sendall(base64.b64decode({base64.b64encode(payload).decode()!r}))
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            print(json.dumps(base64.b64encode(out).decode()))
        """
        return base64.b64decode(self.pod(code))

    def rss_kib(self) -> int:
        assert self.agent.proc is not None
        for line in Path(f"/proc/{self.agent.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def _policy(work: Path, ca: Path, other_ca: Path, blob_cert: Path, blob_key: Path) -> str:
    return f"""
version: 1
proxy: {{port: 15001, idle_timeout: 30, connect_timeout: 2}}
on_reload: {{denied_connections: close}}
workloads:
  pg: {{cidrs: [198.19.1.2/32, "fd00:19:1::2/128"]}}
intercept:
  - from: [pg]
    ports: [80, 443, 8080, 8081, 8082, 8083, 8084, 8443]
egress:
  - name: blob-sas
    from: [pg]
    to: {{hosts: [{BLOB}], ports: [80]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {ca}}}
      set_headers:
        X-Team: {{value: db}}
        X-Api-Key: {{file: {work}/secrets/apikey}}
      remove_headers: [X-Debug]
      auth: {{azure_sas: {{file: {work}/secrets/sas}}}}
  - name: blob-bearer
    to: {{hosts: [{BLOB}], ports: [8080]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {ca}}}
      auth: {{bearer: {{file: {work}/secrets/token}}}}
  - name: blob-wrong-ca
    to: {{hosts: [{BLOB}], ports: [8081]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {other_ca}}}
  - name: blob-missing
    to: {{hosts: [{BLOB}], ports: [8082]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {ca}}}
      set_headers:
        X-Api-Key: {{file: {work}/secrets/absent}}
  - name: blob-shared-key
    to: {{hosts: [{BLOB}], ports: [8083]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {ca}}}
      auth: {{azure_shared_key: {{account: pgbackups, key_file: {work}/secrets/account-key}}}}
  - name: blob-wildcard
    to: {{hosts: ["*.blob.core.windows.net"], ports: [8084]}}
    action: allow
    http:
      upstream: {{tls: true, port: 443, ca_file: {ca}}}
  - name: blob-tls-no-cert
    to: {{hosts: [{BLOB}], ports: [8443]}}
    action: allow
    http:
      client_tls: {{cert: {work}/absent.crt, key: {work}/absent.key}}
  - name: blob-tls
    to: {{hosts: [{BLOB}], ports: [443]}}
    action: allow
    http:
      client_tls: {{cert: {blob_cert}, key: {blob_key}}}
      upstream: {{ca_file: {ca}}}
      set_headers:
        X-Injected: {{file: {work}/secrets/apikey}}
default: deny
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("http")
    (work / "secrets").mkdir()
    for name, value in SECRETS.items():
        (work / "secrets" / name).write_text(value + "\n")
    with Lab() as lab:
        lab.add_pod("pg", "198.19.1.2", "fd00:19:1::2")
        # Both names the server answers for resolve to it (the proxy checks).
        lab.add_external("azure", "198.18.1.2", "fd00:18:1::2", hostnames=[BLOB, OTHER_BLOB])
        ca = make_ca(work / "ca")
        other = make_ca(work / "other-ca", name="some other CA")
        blob = ca.issue(work / "blob", [BLOB, OTHER_BLOB])
        # What the proxy presents to the pod on 443 (client_tls): also from the test CA.
        front = ca.issue(work / "front", [BLOB])
        log = work / "upstream.jsonl"
        start_http_upstream(
            lab, "azure", listen=["198.18.1.2:443", "[fd00:18:1::2]:443"], tls=blob, log=log
        )
        policy = work / "policy.yaml"
        policy.write_text(
            _policy(work, ca.cert_path, other.cert_path, front.cert_path, front.key_path)
        )
        agent = Agent(
            lab, policy=policy, audit=work / "audit.jsonl", log=work / "agent.log"
        ).start()
        try:
            yield World(lab=lab, work=work, ca=ca.cert_path, agent=agent, upstream_log=log)
        finally:
            agent.stop()


def _headers(record: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in record["headers"]}


def test_headers_sas_and_keep_alive(world: World) -> None:
    before = len(world.seen())
    out = world.pod(
        f"""
        import http.client, json
        c = http.client.HTTPConnection({BLOB!r}, 80, timeout=10)
        statuses = []
        for i in range(3):
            c.request("GET", f"/backups/f{{i}}?comp=list&sv=2000-01-01&sig=client-sig",
                      headers={{"X-Debug": "1", "X-Team": "client-value"}})
            r = c.getresponse()
            r.read()
            statuses.append(r.status)
        print(json.dumps(statuses))
        """
    )
    assert out == [200, 200, 200]
    seen = world.seen()[before:]
    assert len(seen) == 3
    assert len({s["peer"] for s in seen}) == 1, "one upstream connection for all three"
    for i, s in enumerate(seen):
        h = _headers(s)
        assert s["tls"] and s["sni"] == BLOB
        assert h["x-team"] == "db"
        assert h["x-api-key"] == SECRETS["apikey"]
        assert "x-debug" not in h
        path, _, query = s["target"].partition("?")
        assert path == f"/backups/f{i}"
        params = [p.partition("=")[0] for p in query.split("&")]
        assert sorted(params) == sorted(["comp", "sv", "ss", "srt", "sp", "se", "sig"])
        assert query.endswith(SECRETS["sas"])
    conn = world.wait_records(lambda r: r.get("rule") == "blob-sas" and r["event"] == "closed")
    assert conn and conn[-1]["requests"] == 3
    reqs = [r for r in world.records() if r["event"] == "request" and r["rule"] == "blob-sas"]
    assert [r["path"] for r in reqs[-3:]] == ["/backups/f0", "/backups/f1", "/backups/f2"]
    assert all(r["status"] == 200 and r["connection"] == conn[-1]["id"] for r in reqs[-3:])


def test_bearer(world: World) -> None:
    before = len(world.seen())
    out = world.pod(
        f"""
        import http.client, json
        c = http.client.HTTPConnection({BLOB!r}, 8080, timeout=10)
        c.request("PUT", "/c/b", body=b"abc", headers={{"Authorization": "Bearer pod-own"}})
        r = c.getresponse()
        print(json.dumps([r.status, json.loads(r.read())]))
        """
    )
    assert out[0] == 200 and out[1]["bytes"] == 3
    (s,) = world.seen()[before:]
    assert _headers(s)["authorization"] == "Bearer " + SECRETS["token"]
    assert [n for n, _ in s["headers"] if n.lower() == "authorization"] == ["Authorization"]


def test_large_uploads_stream(world: World) -> None:
    rss_before = world.rss_kib()
    out = world.pod(
        f"""
        import hashlib, http.client, json
        block = bytes(range(256)) * 4096  # 1 MiB
        def body():
            for _ in range(64):
                yield block
        digest = hashlib.sha256(block * 64).hexdigest()
        c = http.client.HTTPConnection({BLOB!r}, 80, timeout=60)
        c.request("PUT", "/big/chunked", body=body(), encode_chunked=True,
                  headers={{"Transfer-Encoding": "chunked"}})
        r = c.getresponse()
        a = json.loads(r.read())
        c.request("PUT", "/big/length", body=body(), headers={{"Content-Length": str(64 << 20)}})
        r = c.getresponse()
        b = json.loads(r.read())
        print(json.dumps([digest, a, b]))
        """,
        timeout=300,
    )
    digest, chunked, length = out
    assert chunked == {"bytes": 64 * MiB, "sha256": digest}
    assert length == {"bytes": 64 * MiB, "sha256": digest}
    grown = world.rss_kib() - rss_before
    assert grown < 24 * 1024, f"proxy RSS grew by {grown} KiB for a 64 MiB body"
    reqs = [r for r in world.records() if r["event"] == "request" and r["path"].startswith("/big")]
    assert [r["bytes_up"] > 64 * MiB for r in reqs[-2:]] == [True, True]


def test_shared_key_signature_verifies_with_the_sdk(world: World) -> None:
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.pipeline.transport import HttpRequest
    from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy

    before = len(world.seen())
    reply = world.raw(
        8083,
        f"PUT /backups/base.tar?comp=block&blockid=YQ%3D%3D&sv=1&sig=dummy HTTP/1.1\r\n"
        f"Host: {BLOB}\r\nAuthorization: SharedKey pgbackups:pod-made-this-up\r\n"
        "x-ms-blob-type: BlockBlob\r\nContent-Length: 4\r\nConnection: close\r\n\r\nDATA".encode(),
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    (s,) = world.seen()[before:]
    assert s["target"] == "/backups/base.tar?comp=block&blockid=YQ%3D%3D"
    sent = [(n, v) for n, v in s["headers"]]
    names = [n.lower() for n, _ in sent]
    assert names.count("authorization") == 1 and "x-ms-date" in names and "x-ms-version" in names
    # What the server received must verify with the SDK's signing of the same request.
    received = dict(sent)
    claimed = received.pop("Authorization")
    request = HttpRequest("PUT", f"https://{BLOB}{s['target']}", headers=received)
    SharedKeyCredentialPolicy("pgbackups", SECRETS["account-key"]).on_request(
        PipelineRequest(request, PipelineContext(None))
    )
    assert claimed == request.headers["Authorization"]


def test_pipelining_framings_and_host_check(world: World) -> None:
    before = len(world.seen())
    host = f"Host: {BLOB}\r\n"
    reply = world.raw(
        80,
        (
            f"GET /chunked HTTP/1.1\r\n{host}\r\n"
            f"HEAD /head HTTP/1.1\r\n{host}\r\n"
            f"POST /post HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
            "3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
            "GET /elsewhere HTTP/1.1\r\nHost: other.example\r\n\r\n"
        ).encode(),
    )
    responses = reply.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"200", b"200", b"421"], reply
    assert b"Transfer-Encoding: chunked" in responses[0]
    assert responses[1].endswith(b"\r\n\r\n")  # HEAD: no body
    assert b'"bytes": 5' in responses[2]
    assert b"other.example is not served by rule blob-sas" in responses[3]
    seen = world.seen()[before:]
    assert [r["target"] for r in seen] == [
        "/chunked?" + SECRETS["sas"],
        "/head?" + SECRETS["sas"],
        "/post?" + SECRETS["sas"],
    ]
    assert seen[2]["body_bytes"] == 5


def test_http10_client_gets_a_bare_body_for_a_chunked_response(world: World) -> None:
    reply = world.raw(80, f"GET /chunked HTTP/1.0\r\nHost: {BLOB}\r\n\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding" not in head
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["bytes"] == 0


def test_expect_100_continue(world: World) -> None:
    code = f"""
        import json, socket
        s = socket.create_connection(({BLOB!r}, 80), timeout=10)
        s.sendall(b"PUT /cont HTTP/1.1\\r\\nHost: {BLOB}\\r\\nContent-Length: 5\\r\\n"
                  b"Expect: 100-continue\\r\\n\\r\\n")
        first = s.recv(4096)
        s.sendall(b"hello")
        rest = b""
        while b"sha256" not in rest:
            rest += s.recv(4096)
        print(json.dumps([first.decode(), rest.decode()]))
    """
    first, rest = world.pod(code)
    assert first.startswith("HTTP/1.1 100 Continue\r\n")
    assert rest.startswith("HTTP/1.1 200 OK\r\n") and '"bytes": 5' in rest


def test_certificate_verification_failure_is_denied(world: World) -> None:
    before = len(world.seen())
    reply = world.raw(8081, f"GET / HTTP/1.1\r\nHost: {BLOB}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"certificate verification failed" in reply
    assert world.seen()[before:] == []
    recs = world.wait_records(lambda r: r.get("rule") == "blob-wrong-ca" and "id" in r)
    assert recs[-1]["event"] == "denied"
    assert "certificate verification failed" in recs[-1]["error"]


def _request_header(world: World, port: int = 80) -> str:
    before = len(world.seen())
    reply = world.raw(
        port, f"GET /r HTTP/1.1\r\nHost: {BLOB}\r\nConnection: close\r\n\r\n".encode()
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    (s,) = world.seen()[before:]
    return _headers(s)["x-api-key"]


def test_secret_rotation_rename_and_symlink_swap(world: World) -> None:
    secrets = world.work / "secrets"
    assert _request_header(world) == SECRETS["apikey"]
    # Rename-over, as editors and `kubectl cp` do.
    (secrets / "apikey.new").write_text("apikey-rotated-by-rename\n")
    os.rename(secrets / "apikey.new", secrets / "apikey")
    assert _request_header(world) == "apikey-rotated-by-rename"
    # The kubelet's layout: apikey -> ..data/apikey, ..data -> a timestamped folder,
    # swapped atomically by renaming a new ..data symlink over the old one.
    for n, value in ((1, "apikey-k8s-one"), (2, "apikey-k8s-two")):
        (secrets / f"..v{n}").mkdir()
        (secrets / f"..v{n}" / "apikey").write_text(value + "\n")
    os.symlink("..v1", secrets / "..data")
    os.unlink(secrets / "apikey")
    os.symlink("..data/apikey", secrets / "apikey")
    assert _request_header(world) == "apikey-k8s-one"
    os.symlink("..v2", secrets / "..data_tmp")
    os.rename(secrets / "..data_tmp", secrets / "..data")
    assert _request_header(world) == "apikey-k8s-two"


def test_missing_secret_gives_502_and_no_secret_anywhere(world: World) -> None:
    before = len(world.seen())
    reply = world.raw(8082, f"GET /m?x=1 HTTP/1.1\r\nHost: {BLOB}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"blob-missing" in reply and str(world.work / "secrets" / "absent").encode() in reply
    assert world.seen()[before:] == []
    recs = world.wait_records(lambda r: r.get("rule") == "blob-missing" and r["event"] == "request")
    assert recs[-1]["status"] == 502 and "absent" in recs[-1]["error"]
    conns = world.wait_records(lambda r: r.get("rule") == "blob-missing" and "id" in r)
    assert conns[-1]["event"] == "failed" and conns[-1]["requests"] == 1
    assert "absent" in (world.work / "agent.log").read_text()
    # No secret value in the audit log, the agent's log, its metrics and
    # status, or any reply seen here.
    metrics = world.lab.run(
        "node", ["curl", "-sS", "http://127.0.0.1:15021/metrics"], check=True
    ).stdout
    assert 'egress_agent_http_requests_total{rule="blob-missing",status="5xx"}' in metrics
    status = world.lab.run("node", ["curl", "-sS", "http://127.0.0.1:15021/status"]).stdout
    outputs = world.audit.read_text() + (world.work / "agent.log").read_text()
    outputs += reply.decode(errors="replace") + metrics + status
    for value in [*SECRETS.values(), "SECRETsig0001", "apikey-rotated-by-rename", "apikey-k8s"]:
        assert value not in outputs


MALFORMED = {
    "bad request line": b"GET /x HTTP/1.1 extra\r\nHost: " + BLOB.encode() + b"\r\n\r\n",
    "te and cl": b"POST /x HTTP/1.1\r\nHost: %s\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two lengths": b"POST /x HTTP/1.1\r\nHost: %s\r\nContent-Length: 3\r\nContent-Length: 4\r\n"
    b"\r\nabcd",
    "chunked, identity": b"POST /x HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked, identity"
    b"\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /x HTTP/1.1\r\nHost: %s\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET /x HTTP/1.1\nHost: %s\n\n",
    "bad chunk size": b"POST /x HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "oversized head": b"GET /x HTTP/1.1\r\nHost: %s\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_malformed_requests_get_400_and_never_reach_upstream(world: World, shape: str) -> None:
    payload = MALFORMED[shape].replace(b"%s", BLOB.encode())
    before = len(world.seen())
    reply = world.raw(80, payload)
    assert reply.startswith(b"HTTP/1.1 400 "), (shape, reply[:200])
    assert b"\r\nConnection: close\r\n" in reply
    # A barrier: a good request after it, waited for at the upstream; the
    # malformed one, had it been forwarded, would be there by then.
    barrier = "/barrier-" + "".join(c if c.isalnum() else "-" for c in shape)
    world.raw(80, f"GET {barrier} HTTP/1.0\r\nHost: {BLOB}\r\n\r\n".encode())
    new = wait_until(
        lambda: (n := world.seen()[before:]) and n[-1]["target"].startswith(barrier) and n,
        timeout=5,
        what="the barrier request reached the upstream",
    )
    assert [r["target"].split("?")[0] for r in new] == [barrier]


def test_client_tls_termination_with_curl(world: World) -> None:
    before = len(world.seen())
    proc = world.lab.run(
        "pg",
        ["curl", "-sS", "--cacert", str(world.ca), f"https://{BLOB}/tls-path?a=1",
         "-H", "X-Injected: from-pod"],
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bytes"] == 0
    (s,) = world.seen()[before:]
    assert s["tls"] and s["sni"] == BLOB and s["target"] == "/tls-path?a=1"
    assert _headers(s)["x-injected"] not in ("from-pod", "")


def test_tls_client_on_plain_http_rule_is_denied(world: World) -> None:
    proc = world.lab.run(
        "pg",
        ["curl", "-sS", "--cacert", str(world.ca), f"https://{BLOB}:80/"],
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert proc.returncode != 0
    recs = world.wait_records(lambda r: r.get("rule") == "blob-sas" and r["event"] == "denied")
    assert recs and "needs plaintext HTTP or client_tls" in recs[-1]["error"]


def _peer_cert_digest(world: World) -> str:
    out: str = world.pod(
        f"""
        import hashlib, json, socket, ssl
        ctx = ssl.create_default_context(cafile={str(world.ca)!r})
        with socket.create_connection(({BLOB!r}, 443), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname={BLOB!r}) as s:
                der = s.getpeercert(binary_form=True)
                s.sendall(b"GET /cert HTTP/1.1\\r\\nHost: {BLOB}\\r\\n"
                          b"Connection: close\\r\\n\\r\\n")
                while s.recv(65536):
                    pass
        print(json.dumps(hashlib.sha256(der).hexdigest()))
        """
    )
    return out


def test_client_tls_certificate_is_reloaded_when_replaced(world: World) -> None:
    first = _peer_cert_digest(world)
    assert _peer_cert_digest(world) == first
    policy = world.work / "policy.yaml"
    front = world.work / "front"
    fresh = _issue_from_test_ca(world, world.work / "front-next")
    # Key first, then certificate: each a rename-over, as a secret update writes them.
    os.rename(fresh.key_path, front / "server.key")
    os.rename(fresh.cert_path, front / "server.crt")
    assert policy.exists()
    assert _peer_cert_digest(world) != first


def _issue_from_test_ca(world: World, directory: Path) -> Any:
    from egress_agent.lab.tls import CA

    ca = CA(cert_path=world.ca, key_path=world.ca.with_name("ca.key"))
    return ca.issue(directory, [BLOB])


def test_client_tls_with_missing_certificate_fails_with_the_path(world: World) -> None:
    proc = world.lab.run(
        "pg",
        ["curl", "-sS", "--cacert", str(world.ca), f"https://{BLOB}:8443/"],
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert proc.returncode != 0
    recs = world.wait_records(lambda r: r.get("rule") == "blob-tls-no-cert" and "id" in r)
    assert recs[-1]["event"] == "failed"
    assert str(world.work / "absent.crt") in recs[-1]["error"]


def test_ipv6_client(world: World) -> None:
    before = len(world.seen())
    out = world.pod(
        f"""
        import json, socket
        s = socket.create_connection(("fd00:18:1::2", 80), timeout=10)
        s.sendall(b"GET /v6 HTTP/1.1\\r\\nHost: {BLOB}\\r\\nConnection: close\\r\\n\\r\\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        print(json.dumps(out.decode()))
        """
    )
    assert out.startswith("HTTP/1.1 200 ")
    (s,) = world.seen()[before:]
    assert s["target"] == "/v6?" + SECRETS["sas"]


def test_each_host_gets_an_upstream_verified_for_it(world: World) -> None:
    before = len(world.seen())
    reply = world.raw(
        8084,
        (
            f"GET /a HTTP/1.1\r\nHost: {BLOB}\r\n\r\n"
            f"GET /b HTTP/1.1\r\nHost: {OTHER_BLOB}\r\n\r\n"
            f"GET /c HTTP/1.1\r\nHost: {OTHER_BLOB}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert reply.count(b"HTTP/1.1 200 ") == 3
    seen = world.seen()[before:]
    assert [(r["target"], r["sni"]) for r in seen] == [
        ("/a", BLOB),
        ("/b", OTHER_BLOB),
        ("/c", OTHER_BLOB),
    ]
    assert seen[0]["peer"] != seen[1]["peer"] and seen[1]["peer"] == seen[2]["peer"]


def test_upstream_closing_after_a_response_is_replaced(world: World) -> None:
    before = len(world.seen())
    reply = world.raw(
        8084,
        (
            f"GET /bye HTTP/1.1\r\nHost: {BLOB}\r\n\r\n"
            f"GET /after HTTP/1.1\r\nHost: {BLOB}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert reply.count(b"HTTP/1.1 200 ") == 2
    # The server's Connection: close is its own hop's business: the pod's
    # connection stays open for the second request.
    assert reply.count(b"Connection: close") == 1
    seen = world.seen()[before:]
    assert [r["target"] for r in seen] == ["/bye", "/after"]
    assert seen[0]["peer"] != seen[1]["peer"]


def _wait_log(world: World, text: str) -> None:
    wait_until(
        lambda: text in (world.work / "agent.log").read_text(),
        timeout=5,
        what=f"the agent log saying {text!r}",
    )


def test_a_reload_that_denies_closes_open_http_connections(world: World) -> None:
    """Last in this module: it edits the policy (and puts it back)."""
    policy = world.work / "policy.yaml"
    original = policy.read_text()
    code = f"""
    import http.client, sys
    c = http.client.HTTPConnection({BLOB!r}, 80, timeout=10)
    c.request("GET", "/before-reload")
    c.getresponse().read()
    print("first", flush=True)
    sys.stdin.readline()
    try:
        c.request("GET", "/after-reload")
        print(c.getresponse().status, flush=True)
    except (OSError, http.client.HTTPException) as exc:
        print(type(exc).__name__, flush=True)
    """
    client = world.lab.popen(
        "pg", [sys.executable, "-c", textwrap.dedent(code)], stdin=-1, stdout=-1, text=True
    )
    assert client.stdout is not None and client.stdin is not None
    try:
        assert client.stdout.readline().strip() == "first"
        # Port 80 no longer matches blob-sas: the default (deny) decides it now.
        edited = original.replace(
            f"to: {{hosts: [{BLOB}], ports: [80]}}", f"to: {{hosts: [{BLOB}], ports: [9]}}"
        )
        assert edited != original
        (world.work / "policy.new").write_text(edited)
        os.rename(world.work / "policy.new", policy)
        _wait_log(world, "generation 2")
        client.stdin.write("go\n")
        client.stdin.flush()
        outcome = client.stdout.readline().strip()
        client.wait(10)
    finally:
        (world.work / "policy.new").write_text(original)
        os.rename(world.work / "policy.new", policy)
        _wait_log(world, "generation 3")
    assert outcome in ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError"), outcome
    recs = world.wait_records(
        lambda r: "id" in r and "closed by reload to policy generation 2" in (r["error"] or "")
    )
    assert recs and recs[-1]["rule"] == "blob-sas" and recs[-1]["requests"] == 1
