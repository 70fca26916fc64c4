"""Server-speaks-first protocols through the agent, at volume, with the real
programs: Python's smtplib against aiosmtpd on port 587, and OpenSSH's
ssh-keyscan against sshd, each behind a CIDR allow rule (so the proxy
connects upstream at once and the server's greeting may arrive before the
relay is wired), through both datapaths.

Judged from both ends: every SMTP session gets the server's own 220
greeting, EHLO works, and the server stores each message byte for byte;
every SSH session gets the server's host key; the audit log has exactly one
record per connection, and for SMTP its byte counts equal what the client
sent and received.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent

pytestmark = pytest.mark.netns

MAIL = "198.18.1.2"
SSH = "198.18.2.2"
POD = "198.19.1.2"

POLICY = f"""
version: 1
workloads:
  pod: {{cidrs: [{POD}/32]}}
intercept:
  - from: [pod]
egress:
  - name: mail-relay
    from: [pod]
    to: {{cidrs: [{MAIL}/32], ports: [587]}}
    action: allow
  - name: ssh
    from: [pod]
    to: {{cidrs: [{SSH}/32], ports: [22]}}
    action: allow
default: deny
"""

# aiosmtpd on MAIL:587; each message's DATA is stored as sent (after dot
# unstuffing) in OUT/<sender>.
SMTP_SERVER = """
import asyncio, os, sys
from aiosmtpd.smtp import SMTP
OUT = sys.argv[1]
class Store:
    async def handle_DATA(self, server, session, envelope):
        name = envelope.mail_from.split("@")[0]
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(envelope.original_content)
        return "250 stored"
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(
        lambda: SMTP(Store(), hostname="mail.lab", ident="lab-smtp 1.0"),
        "198.18.1.2", 587, backlog=1024)
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

# SEQUENTIAL sessions one after the other, then CONCURRENT sessions from
# WORKERS threads. Bytes are counted as smtplib sends and reads them.
SMTP_CLIENT = """
import concurrent.futures, json, smtplib, socket, sys

class Counted:
    def __init__(self, sock):
        self.sock, self.sent, self.received = sock, 0, 0
    def sendall(self, data):
        self.sock.sendall(data)
        self.sent += len(data)
    def makefile(self, mode):
        return CountedFile(self, self.sock.makefile(mode))
    def __getattr__(self, name):
        return getattr(self.sock, name)

class CountedFile:
    def __init__(self, counted, f):
        self.counted, self.f = counted, f
    def readline(self, size=-1):
        line = self.f.readline(size)
        self.counted.received += len(line)
        return line
    def close(self):
        self.f.close()

class Client(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):
        self.counted = Counted(socket.create_connection((host, port), timeout))
        return self.counted

def message(i):
    lines = [b"Subject: session %d" % i, b"", b"line one of %d" % i,
             b".a line that starts with a dot", b"." * (i % 5 + 1),
             bytes(range(32, 127)) * (1 + i % 7), b"the end"]
    return b"\\r\\n".join(lines) + b"\\r\\n"

def session(i):
    result = {"i": i, "ok": False, "error": None}
    try:
        smtp = Client(local_hostname="pod.lab", timeout=30)
        code, banner = smtp.connect("198.18.1.2", 587)
        result["port"] = smtp.counted.getsockname()[1]
        if code != 220 or b"lab-smtp" not in banner:
            raise ValueError(f"greeting {code} {banner[:60]!r}")
        code, _ = smtp.ehlo("pod.lab")
        if code != 250:
            raise ValueError(f"EHLO answered {code}")
        refused = smtp.sendmail(f"s{i}@pod.lab", ["backups@mail.lab"], message(i))
        if refused:
            raise ValueError(f"refused {refused}")
        smtp.quit()
        result.update(ok=True, sent=smtp.counted.sent, received=smtp.counted.received)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result

results = [session(i) for i in range(SEQUENTIAL)]
with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    results += pool.map(session, range(SEQUENTIAL, SEQUENTIAL + CONCURRENT))
json.dump({"results": results, "messages": {i: message(i).hex() for i in range(len(results))}},
          sys.stdout)
"""

SSHD_CONFIG = """\
HostKey {key}
PidFile none
UsePAM no
UseDNS no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
KexAlgorithms curve25519-sha256
LogLevel ERROR
"""
# (The default key exchange, sntrup761x25519, costs sshd about a quarter of a
# second of CPU per connection here; the server speaks first either way.)

# Runs ssh-keyscan INVOCATIONS times from WORKERS threads, each scanning
# the server PER_INVOCATION times (one connection each); every line of
# output must carry the server's host key.
KEYSCAN = """
import concurrent.futures, json, subprocess, tempfile
hosts = tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False)
hosts.write("198.18.2.2\\n" * PER_INVOCATION)
hosts.close()
def scan(_):
    proc = subprocess.run(["ssh-keyscan", "-T", "20", "-t", "ed25519", "-f", hosts.name],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout.splitlines()
with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    lines = [line for out in pool.map(scan, range(INVOCATIONS)) for line in out]
print(json.dumps(lines))
"""


# sshd in inetd mode (``sshd -i``) for each connection to SSH:22, behind a
# relay that counts the TCP payload each way, so that the audit records'
# byte counts can be checked against what crossed the server's socket.
# sshd still speaks first: its banner is relayed as soon as it writes it.
SSH_SERVER = """
import asyncio, json, sys
CONFIG, LOG = sys.argv[1], open(sys.argv[2], "a", buffering=1)
async def pump(read, write, done, count):
    try:
        while data := await read(65536):
            count[0] += len(data)
            write(data)
    finally:
        done()
async def handle(reader, writer):
    sshd = await asyncio.create_subprocess_exec(
        "/usr/sbin/sshd", "-i", "-f", CONFIG, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    up, down = [0], [0]
    await asyncio.gather(
        pump(reader.read, sshd.stdin.write, sshd.stdin.close, up),
        pump(sshd.stdout.read, writer.write, writer.write_eof, down),
        return_exceptions=True)
    await sshd.wait()
    writer.close()
    LOG.write(json.dumps({"up": up[0], "down": down[0]}) + "\\n")
async def main():
    await asyncio.start_server(handle, "198.18.2.2", 22, backlog=1024)
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _script(body: str, **values: Any) -> str:
    head = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    return head + textwrap.dedent(body)


@pytest.fixture
def world(lab: Lab, tmp_path: Path) -> Lab:
    lab.add_pod("pod", POD, "fd00:19:1::2")
    lab.add_external("mail", MAIL, "fd00:18:1::2")
    lab.add_external("ssh", SSH, "fd00:18:2::2")
    (tmp_path / "mail").mkdir()
    smtp = lab.popen(
        "mail",
        [sys.executable, "-c", textwrap.dedent(SMTP_SERVER), str(tmp_path / "mail")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert smtp.stdout.readline().strip() == "READY"
    key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "sshd_config").write_text(SSHD_CONFIG.format(key=key))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    ssh = lab.popen(
        "ssh",
        [
            sys.executable,
            "-c",
            textwrap.dedent(SSH_SERVER),
            str(tmp_path / "sshd_config"),
            str(tmp_path / "ssh.jsonl"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert ssh.stdout.readline().strip() == "READY"
    return lab


def _agent(lab: Lab, work: Path, datapath: str) -> Agent:
    (work / "policy.yaml").write_text(POLICY)
    return Agent(
        lab,
        policy=work / "policy.yaml",
        audit=work / "audit.jsonl",
        log=work / "agent.log",
        extra_args=(
            "--datapath",
            datapath,
            "--bpf-pin-dir",
            f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}",
        ),
    ).start(timeout=60)


def _records(work: Path, port: int) -> list[dict[str, Any]]:
    lines = (work / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["dst"].endswith(f":{port}")]


# Enough sessions that the 30 concurrent SMTP clients and 6 keyscan workers
# overlap for several seconds: what breaks at volume (a lost greeting, a
# record written twice, bytes miscounted) is about sessions at once, not
# their total (a thousand of each took half a minute per datapath).
SMTP_SEQUENTIAL = 100
SMTP_CONCURRENT = 300
SSH_SCANS = 400


@pytest.mark.timeout(600)
@pytest.mark.parametrize("datapath", ["nft", "bpf"])
def test_smtp_and_ssh_at_volume(world: Lab, tmp_path: Path, datapath: str) -> None:
    lab = world
    agent = _agent(lab, tmp_path, datapath)
    try:
        smtp = lab.run(
            "pod",
            [
                sys.executable,
                "-c",
                _script(
                    SMTP_CLIENT, SEQUENTIAL=SMTP_SEQUENTIAL, CONCURRENT=SMTP_CONCURRENT, WORKERS=30
                ),
            ],
            timeout=300,
        )
        keyscan = lab.run(
            "pod",
            [
                sys.executable,
                "-c",
                _script(KEYSCAN, INVOCATIONS=SSH_SCANS // 5, PER_INVOCATION=5, WORKERS=6),
            ],
            timeout=300,
        )
    finally:
        agent.stop()

    # SMTP: every session greeted by the server itself, every message stored
    # byte for byte, one record per connection with the bytes each way.
    out = json.loads(smtp.stdout)
    results = out["results"]
    failed = [r for r in results if not r["ok"]]
    print(f"\nSMTP ({datapath}): {len(results) - len(failed)} of {len(results)} sessions ok")
    assert not failed, failed[:5]
    assert len(results) == SMTP_SEQUENTIAL + SMTP_CONCURRENT
    stored = tmp_path / "mail"
    for r in results:
        assert (stored / f"s{r['i']}").read_bytes() == bytes.fromhex(out["messages"][str(r["i"])])
    records = _records(tmp_path, 587)
    assert all(r["event"] == "closed" and r["error"] is None for r in records), [
        r for r in records if r["event"] != "closed" or r["error"]
    ][:3]
    seen = collections.Counter((r["src"], r["bytes_up"], r["bytes_down"]) for r in records)
    sent = collections.Counter((f"{POD}:{r['port']}", r["sent"], r["received"]) for r in results)
    assert seen == sent

    # SSH: every scan saw the server's own host key; one record per connection.
    host_key = (tmp_path / "ssh_host_ed25519_key.pub").read_text().split()[1]
    lines = json.loads(keyscan.stdout)
    good = [line for line in lines if line.split()[1:3] == ["ssh-ed25519", host_key]]
    print(f"SSH ({datapath}): {len(good)} of {SSH_SCANS} keyscans saw the host key")
    assert len(good) == len(lines) == SSH_SCANS, [line for line in lines if line not in good][:3]
    records = _records(tmp_path, 22)
    assert all(r["event"] == "closed" and r["error"] is None for r in records), [
        r for r in records if r["event"] != "closed" or r["error"]
    ][:3]
    served = [json.loads(line) for line in (tmp_path / "ssh.jsonl").read_text().splitlines()]
    # Each connection's bytes each way as the server's socket saw them: the
    # same multiset as the records' (random KEX padding makes them differ).
    assert collections.Counter((r["bytes_up"], r["bytes_down"]) for r in records) == (
        collections.Counter((s["up"], s["down"]) for s in served)
    )
    assert len(records) == SSH_SCANS
