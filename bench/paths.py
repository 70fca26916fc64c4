"""The three paths under test, each put in place and removed by a context manager.

* ``direct``: nothing in the node but routing.
* ``haproxy``: HAProxy 2.6 in the node as a transparent TCP proxy. The
  diversion is the project's own: a policy whose ``proxy:`` section points at
  HAProxy's address and port, rendered by ``rules.render.render_ruleset`` and
  applied by ``rules.apply.apply_ruleset`` inside the node namespace. HAProxy
  reaches the original destination with ``server s 0.0.0.0:0`` (it reads
  SO_ORIGINAL_DST).
* ``egress-agent``: ``egress-agent run`` (``lab.agentproc.AgentProcess``).

Each manager yields the proxy's PID (None for direct) and removes everything it
added -- nftables table, loopback addresses, process -- also on failure.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

CLIENT_V4, CLIENT_V6 = "198.19.1.2", "fd00:19:1::2"
SERVER_V4, SERVER_V6 = "198.18.1.2", "fd00:18:1::2"
IPERF_PORT = 5201
SINK_PORT = 9000
# The TLS-by-name scenario: a ClientHello naming SERVER_NAME to this port,
# allowed by a host rule only (no CIDR rule covers it).
TLS_PORT = 9443
SERVER_NAME = "bench-server.test"

AGENT_PROXY = "{port: 15001, idle_timeout: 120}"
HAPROXY_PORT = 15002
HAPROXY_V4 = "169.254.99.2"
HAPROXY_V6 = "fd65:6772:6573::2"
HAPROXY_PROXY = f'{{port: {HAPROXY_PORT}, address_v4: {HAPROXY_V4}, address_v6: "{HAPROXY_V6}"}}'
# One thread: the agent is one event loop on one core, so this compares the two
# per core; and on a 2-core machine where the client and the server run too, a
# second HAProxy thread would only compete with them for the same cores.
HAPROXY_THREADS = 1

POLICY = """\
version: 1
proxy: {proxy}
workloads:
  client: {{cidrs: [{client_v4}/32, "{client_v6}/128"]}}
intercept:
  - from: [client]
    ports: [{iperf}, {sink}, {tls}]
egress:
  - name: bench-server-by-name
    from: [client]
    to: {{hosts: [{name}], ports: [{tls}]}}
    action: allow
  - name: bench-server
    from: [client]
    to: {{cidrs: [{server_v4}/32, "{server_v6}/128"], ports: [{iperf}, {sink}]}}
    action: allow
default: deny
"""

HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn {maxconn}
    log stdout format raw local0

defaults
    mode tcp
    log global
    # Per connection: client, original destination (the server HAProxy reached),
    # termination state ("--" = normal), bytes to the client and from it.
    log-format "%ci:%cp %si:%sp %ts %B %U"
    maxconn {maxconn}
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend diverted
    bind {v4}:{port}
    bind [{v6}]:{port} v6only
    # The TLS-by-name scenario, decided like the agent's host rule: only a
    # ClientHello naming the server goes on (the destination is the original one).
    tcp-request inspect-delay 5s
    tcp-request content reject if {{ dst_port {tls_port} }} !{{ req_ssl_sni -i {name} }}
    default_backend original_dst

backend original_dst
    # 0.0.0.0:0 = connect to the connection's destination before DNAT (SO_ORIGINAL_DST).
    server s 0.0.0.0:0
"""

# Run inside the node namespace: the same renderer and transaction the agent uses.
APPLY_RULES = """
import sys
from egress_agent.policy.load import load_policy
from egress_agent.rules.apply import apply_ruleset, verify_applied
from egress_agent.rules.render import render_ruleset
doc = render_ruleset(load_policy(sys.argv[1]))
apply_ruleset(doc)
problems = verify_applied(doc)
if problems:
    sys.exit("; ".join(problems))
"""
REMOVE_RULES = "from egress_agent.rules.apply import remove_table; remove_table()"

# The log-format above: "%ci:%cp %si:%sp %ts %B %U".
_LOG_LINE = re.compile(r"^\S+ \S*:(\d+) (\S\S) \d+ \d+$")


def policy_text(proxy: str) -> str:
    return POLICY.format(
        proxy=proxy,
        client_v4=CLIENT_V4,
        client_v6=CLIENT_V6,
        server_v4=SERVER_V4,
        server_v6=SERVER_V6,
        iperf=IPERF_PORT,
        sink=SINK_PORT,
        tls=TLS_PORT,
        name=SERVER_NAME,
    )


@dataclass
class Running:
    """A path in place: its name, its proxy's PID and facts for the report."""

    name: str
    pid: int | None
    facts: dict[str, Any] = field(default_factory=dict)


def wait_listening(lab: Lab, host: str, port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        out = lab.run(host, ["ss", "-Hltn", f"sport = :{port}"]).stdout
        if out.strip():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} in {host} after 10 s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def haproxy_maxconn() -> int:
    """HAProxy refuses to start when it cannot raise its open-files limit to
    about 2 x maxconn; it inherits ours (see ``run.raise_nofile``)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, min(20000, (soft - 200) // 2))


@contextlib.contextmanager
def direct(lab: Lab, work: Path) -> Iterator[Running]:
    yield Running(
        name="direct", pid=None, facts={"what": "no diversion, pod -> server routed by the node"}
    )


@contextlib.contextmanager
def haproxy(lab: Lab, work: Path) -> Iterator[Running]:
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(
            threads=HAPROXY_THREADS,
            maxconn=haproxy_maxconn(),
            v4=HAPROXY_V4,
            v6=HAPROXY_V6,
            port=HAPROXY_PORT,
            tls_port=TLS_PORT,
            name=SERVER_NAME,
        )
    )
    policy = work / "haproxy-policy.yaml"
    policy.write_text(policy_text(HAPROXY_PROXY))
    haproxy_log = work / "haproxy.log"
    added: list[str] = []
    proc: subprocess.Popen[Any] | None = None
    applied = False
    try:
        for addr in (f"{HAPROXY_V4}/32", f"{HAPROXY_V6}/128"):
            extra = ["nodad"] if ":" in addr else []
            lab.run("node", ["ip", "addr", "add", addr, "dev", "lo", *extra])
            added.append(addr)
        with open(haproxy_log, "wb") as out:
            # -db: stay in the foreground, one process (its PID is the one we measure).
            proc = lab.popen("node", ["haproxy", "-db", "-f", str(cfg)], stdout=out, stderr=out)
        wait_listening(lab, "node", HAPROXY_PORT, proc)
        applied = True  # from here on the table may exist: always remove it
        lab.run("node", [sys.executable, "-c", APPLY_RULES, str(policy)], cwd=ROOT)
        version = subprocess.run(
            ["haproxy", "-v"], capture_output=True, text=True, check=False
        ).stdout.split("\n")[0]
        yield Running(
            name="haproxy",
            pid=proc.pid,
            facts={
                "what": f"{version.split(' - ')[0].removeprefix('HAProxy version ')}, mode tcp, "
                f"nbthread {HAPROXY_THREADS} (like the agent's one event loop), "
                "server 0.0.0.0:0, default buffers, no splice, a log line per connection, "
                f"SNI checked on port {TLS_PORT} (req_ssl_sni)",
                "nofile": open_files_limit(proc.pid),
                "log": str(haproxy_log),
            },
        )
    finally:
        # Like the agent's own stop: no more diversion first, then the proxy.
        if applied:
            done = lab.run("node", [sys.executable, "-c", REMOVE_RULES], cwd=ROOT, check=False)
            if done.returncode != 0:
                log.error("could not remove the HAProxy ruleset: %s", done.stderr.strip())
        if proc is not None:
            stop_process(proc)
        for addr in reversed(added):
            lab.run("node", ["ip", "addr", "del", addr, "dev", "lo"], check=False)


def haproxy_log_summary(path: Path) -> dict[str, Any]:
    """Connections HAProxy logged and their termination states ("--" = normal)
    by destination port."""
    states: Counter[str] = Counter()
    other: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if m:
            states[f"port {m.group(1)}: {m.group(2)}"] += 1
        elif line.strip():
            other.append(line)
    return {"records": sum(states.values()), "states": dict(states), "other_lines": other[:20]}


@contextlib.contextmanager
def egress_agent(lab: Lab, work: Path) -> Iterator[Running]:
    """The agent as deployed: bytes of decided connections move in the kernel (splice)."""
    with _agent(lab, work / "kernel-relay", relay="kernel") as running:
        yield running


@contextlib.contextmanager
def egress_agent_userspace(lab: Lab, work: Path) -> Iterator[Running]:
    """The agent with ``proxy.relay: userspace``: the proxy copies every byte."""
    with _agent(lab, work / "userspace-relay", relay="userspace") as running:
        yield running


@contextlib.contextmanager
def _agent(lab: Lab, work: Path, *, relay: str) -> Iterator[Running]:
    # The agent watches its policy's folder for edits (inotify): the audit log,
    # written once per connection, lives elsewhere, as it would on a real node.
    (work / "policy").mkdir(parents=True)
    policy = work / "policy" / "agent-policy.yaml"
    policy.write_text(policy_text(AGENT_PROXY.replace("}", f", relay: {relay}}}")))
    audit = work / "audit.jsonl"
    agent = AgentProcess(lab, policy=policy, audit=audit, log=work / "agent.log")
    try:
        agent.start(timeout=300)  # compiling the classifier takes long on a busy machine
        assert agent.proc is not None
        yield Running(
            name="egress-agent",
            pid=agent.proc.pid,
            facts={
                "what": "egress-agent run (uvloop, one event loop, datapath "
                + ("bpf" if "BPF datapath:" in (work / "agent.log").read_text() else "nft")
                + f", {relay} relay), an audit record per connection",
                "nofile": open_files_limit(agent.proc.pid),
                "audit": str(audit),
            },
        )
    finally:
        if agent.proc is not None:
            code = agent.stop()
            if code != 0:
                log.error("egress-agent exited with %s; see %s", code, work / "agent.log")
