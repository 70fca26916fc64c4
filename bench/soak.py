"""The soak: mixed traffic through the agent for minutes, with policy reloads
every few seconds and one listening-socket handover, proving that nothing is
lost, corrupted or left unaudited.

    sudo ./run soak [--minutes N] [--workers N] [--reload-every S]

It builds a node, a pod ``app`` and four "internet" hosts as network
namespaces, starts the agent in the node (BPF datapath when it loads, else
nftables) and runs ``bench.soakclient`` in the pod: concurrent sessions of

* TLS allowed by name (SNI), echoed and compared byte for byte;
* raw TCP allowed by CIDR, echoed and compared;
* SMTP (the server speaks first) to a real aiosmtpd server, each message's
  body digest compared with what the server logged;
* HTTP through an ``http:`` rule that injects a header, each body's digest
  compared with what the server saw, and the header checked on every request;

IPv4 and IPv6 alike. Meanwhile the policy file is rewritten every few seconds
(the agent reloads; the hash changes, the verdicts do not) and, halfway, a
second agent takes the listening sockets over from the first.

Checks, each of which fails the soak: every session completed and compared
equal; the audit logs of both agents hold exactly one connection record per
session (matched by the client's address and port), each ``closed`` with the
rule that allowed it and byte counts equal to what the client sent (raw and
SMTP, where no TLS record overhead is involved); every HTTP request reached the
server with the injected header; the agents' RSS grew by less than a bound.
It prints a summary table and writes it as JSON next to the benchmark results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import RESULTS_DIR, _interrupt, raise_nofile, rss_kib
from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log, start_server, wait_ready
from egress_agent.lab.tls import make_ca
from tests.lab.httpupstream import start_http_upstream

log = logging.getLogger("soak")

POD = ("app", "198.19.1.2", "fd00:19:1::2")
BLOB = ("blob", "198.18.1.2", "fd00:18:1::2", "blob.soak.test")
RAW = ("raw", "198.18.2.2", "fd00:18:2::2")
MAIL = ("mail", "198.18.3.2", "fd00:18:3::2")
WEB = ("web", "198.18.4.2", "fd00:18:4::2", "web.soak.test")
TOKEN_HEADER = "X-Soak-Token"
# RSS growth allowed over the run, per agent, after warm-up.
RSS_GROWTH_LIMIT_KIB = 64 * 1024


POLICY = """\
version: 1
workloads:
  app: {{cidrs: [{pod_v4}/32, "{pod_v6}/128"], interfaces: [{pod_if}]}}
intercept:
  - from: [app]
egress:
  - name: blob-by-name
    from: [app]
    to: {{hosts: [{blob_name}], ports: [443]}}
    action: allow
  - name: raw-by-cidr
    from: [app]
    to: {{cidrs: [{raw_v4}/32, "{raw_v6}/128"], ports: [9000]}}
    action: allow
  - name: smtp
    from: [app]
    to: {{cidrs: [{mail_v4}/32, "{mail_v6}/128"], ports: [587]}}
    action: allow
  - name: web-injected
    from: [app]
    to: {{hosts: [{web_name}], ports: [80]}}
    action: allow
    http:
      set_headers: {{{token_header}: {{file: {token_file}}}}}
  - name: reload-{generation}
    from: [app]
    to: {{ports: [1]}}
    action: deny
default: deny
"""


@dataclass
class Summary:
    minutes: float
    datapath: str = "?"
    sessions: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    records: int = 0
    reloads: int = 0
    handovers: int = 0
    rss_kib: dict[str, tuple[int, int]] = field(default_factory=dict)  # agent -> (start, end)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        rows = [f"soak: {self.minutes:g} min, datapath {self.datapath}"]
        rows.append(f"  {'protocol':<10}{'sessions':>10}{'failed':>8}")
        for proto in sorted(self.sessions):
            rows.append(f"  {proto:<10}{self.sessions[proto]:>10}{self.failed[proto]:>8}")
        total = sum(self.sessions.values())
        rows.append(f"  {'total':<10}{total:>10}{sum(self.failed.values()):>8}")
        rows.append(
            f"  bytes up {self.bytes_up:,}  down {self.bytes_down:,}  audit records {self.records}"
        )
        rows.append(f"  reloads {self.reloads}  handovers {self.handovers}")
        for name, (start, end) in self.rss_kib.items():
            rows.append(
                f"  RSS {name}: {start / 1024:.1f} MiB after warm-up, {end / 1024:.1f} MiB at end"
            )
        rows.append("  result: " + ("ok" if self.ok else "FAILED"))
        rows += [f"    - {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            rows.append(f"    ... and {len(self.problems) - 20} more")
        return "\n".join(rows)


class _Soak:
    def __init__(self, lab: Lab, work: Path, *, workers: int, datapath: str) -> None:
        self.lab = lab
        self.work = work
        self.workers = workers
        self.datapath = datapath
        self.policy = work / "policy.yaml"
        self.generation = 0
        self.agents: list[tuple[str, AgentProcess]] = []

    # -- building ----------------------------------------------------------------

    def build(self) -> dict[str, list[dict[str, Any]]]:
        lab, work = self.lab, self.work
        pod = lab.add_pod(*POD)
        self.pod_if = pod.node_ifname
        for name, v4, v6, *host in (BLOB, RAW, MAIL, WEB):
            lab.add_external(name, v4, v6, hostnames=host)
        ca = make_ca(work / "ca")
        cert = ca.issue(work / "blob-cert", [BLOB[3]])
        start_server(
            lab, "blob", name="blob",
            listen=[f"{BLOB[1]}:443", f"[{BLOB[2]}]:443"],
            tls=(cert.cert_path, cert.key_path), log=work / "blob.jsonl",
        )  # fmt: skip
        start_server(
            lab, "raw", name="raw",
            listen=[f"{RAW[1]}:9000", f"[{RAW[2]}]:9000"], tls=None, log=work / "raw.jsonl",
        )  # fmt: skip
        smtp = lab.popen(
            "mail",
            [sys.executable, "-m", "bench.smtpsink", "--log", str(work / "mail.jsonl"),
             "--listen", f"{MAIL[1]}:587", "--listen", f"[{MAIL[2]}]:587"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        wait_ready(smtp, "SMTP server in mail", 15)
        start_http_upstream(
            lab, "web", listen=[f"{WEB[1]}:80", f"[{WEB[2]}]:80"], tls=None,
            log=work / "web.jsonl",
        )  # fmt: skip
        self.token_file = work / "token"
        self.token_file.write_text("soak-secret-token\n")
        self.write_policy()
        ca_path = str(ca.cert_path)
        return {
            "tls": [
                {"address": BLOB[1], "port": 443, "name": BLOB[3], "ca": ca_path},
                {"address": BLOB[2], "port": 443, "name": BLOB[3], "ca": ca_path},
            ],
            "raw": [{"address": RAW[1], "port": 9000}, {"address": RAW[2], "port": 9000}],
            "smtp": [{"address": MAIL[1], "port": 587}, {"address": MAIL[2], "port": 587}],
            "http": [
                {"address": WEB[1], "port": 80, "name": WEB[3]},
                {"address": WEB[2], "port": 80, "name": WEB[3]},
            ],
        }

    def write_policy(self) -> None:
        self.generation += 1
        text = POLICY.format(
            pod_v4=POD[1], pod_v6=POD[2], pod_if=self.pod_if, blob_name=BLOB[3],
            raw_v4=RAW[1], raw_v6=RAW[2], mail_v4=MAIL[1], mail_v6=MAIL[2],
            web_name=WEB[3], token_header=TOKEN_HEADER, token_file=self.token_file,
            generation=self.generation,
        )  # fmt: skip
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(self.policy)  # as editors and the kubelet do: rename-over

    def start_agent(self, name: str) -> AgentProcess:
        args = ["--after-handover", "exit", "--bpf-pin-dir", f"/sys/fs/bpf/soak-{name}"]
        if self.datapath != "auto":
            args += ["--datapath", self.datapath]
        agent = AgentProcess(
            self.lab,
            policy=self.policy,
            audit=self.work / f"audit-{name}.jsonl",
            log=self.work / f"agent-{name}.log",
            extra_args=tuple(args),
        ).start(timeout=60)
        self.agents.append((name, agent))
        return agent

    # -- running -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        code = (
            "import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:15021/status', timeout=5)"
            ".read().decode())"
        )
        out = self.lab.run("node", [sys.executable, "-c", code], timeout=15).stdout
        status: dict[str, Any] = json.loads(out)
        return status

    def reload(self) -> bool:
        before = self.status()["policy"]["generation"]
        self.write_policy()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.status()["policy"]["generation"] > before:
                return True
            time.sleep(0.1)
        return False


def run(
    minutes: float,
    *,
    workers: int = 24,
    reload_every: float = 3.0,
    datapath: str = "auto",
    work: Path | None = None,
) -> Summary:
    """One soak; the caller decides what to do with a failed summary."""
    summary = Summary(minutes=minutes)
    seconds = minutes * 60
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="egress-soak-") as tmp, Lab() as lab:
        work = work or Path(tmp)
        soak = _Soak(lab, work, workers=workers, datapath=datapath)
        targets = soak.build()
        first = soak.start_agent("first")
        summary.datapath = soak.status().get("datapath", "?")
        sessions_path = work / "sessions.jsonl"
        client = lab.popen(
            "app",
            [sys.executable, "-m", "bench.soakclient", "--targets", json.dumps(targets),
             "--seconds", str(seconds), "--workers", str(workers), "--out", str(sessions_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        started = time.monotonic()
        warm = started + min(10.0, seconds / 6)
        rss: dict[str, list[int]] = {}
        serving = ("first", first)
        handover_at = started + seconds / 2
        next_reload = started + reload_every
        while client.poll() is None:
            now = time.monotonic()
            if now > started + seconds + 120:
                client.kill()
                summary.problems.append("the client did not finish within 2 minutes of its time")
                break
            if serving[0] == "first" and now >= handover_at:
                second = soak.start_agent("second")
                serving = ("second", second)
                summary.handovers += 1
                warm = now + 5
                assert first.proc is not None
                try:
                    first.proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    summary.problems.append("the first agent did not exit after the handover")
                if first.proc.returncode not in (0, None):
                    summary.problems.append(f"the first agent exited {first.proc.returncode}")
            if now >= next_reload and now < started + seconds:
                if soak.reload():
                    summary.reloads += 1
                else:
                    summary.problems.append(f"reload {soak.generation} was not applied in 10 s")
                next_reload = now + reload_every
            if now >= warm:
                proc = serving[1].proc
                kib = rss_kib(proc.pid if proc is not None else None)
                if kib is not None:
                    rss.setdefault(serving[0], []).append(kib)
            time.sleep(0.5)
        _, err = client.communicate(timeout=30)
        if client.returncode != 0:
            summary.problems.append(f"soak client exited {client.returncode}: {err[-500:]!r}")
        for name, values in rss.items():
            summary.rss_kib[name] = (values[0], values[-1])
            if values[-1] - values[0] > RSS_GROWTH_LIMIT_KIB:
                summary.problems.append(
                    f"agent {name} RSS grew from {values[0]} KiB to {values[-1]} KiB"
                )
        for name, agent in soak.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                code = agent.stop(timeout=30)
                if code != 0:
                    summary.problems.append(f"agent {name} stopped with exit status {code}")
        _check(work, summary, [f"audit-{name}.jsonl" for name, _ in soak.agents])
    return summary


def _check(work: Path, summary: Summary, audit_files: Sequence[str]) -> None:
    sessions = [json.loads(line) for line in (work / "sessions.jsonl").read_text().splitlines()]
    records: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    for name in audit_files:
        path = work / name
        for line in path.read_text().splitlines() if path.exists() else ():
            record = json.loads(line)
            (requests if record["event"] == "request" else records).append(record)
    summary.records = len(records)
    problems = summary.problems
    for s in sessions:
        summary.sessions[s["proto"]] += 1
        summary.bytes_up += s["bytes_up"]
        summary.bytes_down += s["bytes_down"]
        if not s["ok"]:
            summary.failed[s["proto"]] += 1
            problems.append(f"{s['proto']} session {s['id']} from {s['src']}: {s['error']}")
    if not sessions:
        problems.append("no session ran")
    # Exactly one record per connection, matched by the client's address.
    by_src = Counter(s["src"] for s in sessions)
    recorded = Counter(r["src"] for r in records)
    for src in (by_src - recorded).elements():
        problems.append(f"no audit record for the connection from {src}")
    for src in (recorded - by_src).elements():
        problems.append(f"an audit record for {src}, which no session opened")
    record_by_src = {r["src"]: r for r in records}
    expected_rule = {"tls": "blob-by-name", "raw": "raw-by-cidr", "smtp": "smtp",
                     "http": "web-injected"}  # fmt: skip
    for s in sessions:
        r = record_by_src.get(s["src"])
        if r is None or not s["ok"] or by_src[s["src"]] != 1:
            continue
        if (r["event"], r["rule"]) != ("closed", expected_rule[s["proto"]]):
            problems.append(f"{s['proto']} {s['src']}: audited {r['event']} by {r['rule']}")
        if s["proto"] == "raw" and (r["bytes_up"], r["bytes_down"]) != (
            s["bytes_up"],
            s["bytes_down"],
        ):
            problems.append(
                f"raw {s['src']}: audit counted {r['bytes_up']}/{r['bytes_down']} bytes, "
                f"the client sent/received {s['bytes_up']}/{s['bytes_down']}"
            )
        if s["proto"] == "http" and r["requests"] != s["requests"]:
            problems.append(
                f"http {s['src']}: {r['requests']} requests audited, {s['requests']} made"
            )
    # What the far ends saw.
    mail = {m["subject"]: m for m in read_log(work / "mail.jsonl")}
    for s in sessions:
        if s["proto"] == "smtp" and s["ok"]:
            got = mail.get(s["id"])
            if got is None or got["sha256"] != s["digest"]:
                problems.append(f"smtp {s['id']}: the server stored other bytes (or none)")
    web = read_log(work / "web.jsonl")
    injected = sum(
        1
        for w in web
        if any(n == TOKEN_HEADER and v == "soak-secret-token" for n, v in w["headers"])
    )
    made = sum(s["requests"] for s in sessions if s["proto"] == "http")
    if injected < made or injected != len(web):
        problems.append(
            f"http: {made} requests made, {len(web)} reached the server, {injected} with the header"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./run soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=24, help="concurrent client sessions")
    parser.add_argument("--reload-every", type=float, default=3.0, help="seconds between reloads")
    parser.add_argument("--datapath", choices=("auto", "bpf", "nft"), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, nftables): sudo ./run soak", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)  # tear the lab down on SIGTERM too
    try:
        summary = run(
            args.minutes,
            workers=args.workers,
            reload_every=args.reload_every,
            datapath=args.datapath,
        )
    except KeyboardInterrupt:
        print("soak: interrupted; the lab and everything in it were removed", file=sys.stderr)
        return 130
    print(summary.table())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "minutes": summary.minutes,
                "datapath": summary.datapath,
                "sessions": dict(summary.sessions),
                "failed": dict(summary.failed),
                "bytes_up": summary.bytes_up,
                "bytes_down": summary.bytes_down,
                "records": summary.records,
                "reloads": summary.reloads,
                "handovers": summary.handovers,
                "rss_kib": summary.rss_kib,
                "problems": summary.problems,
            },
            indent=2,
        )
    )
    print(f"written to {out}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
