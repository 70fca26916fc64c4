"""``egress-agent demo``: the product on one machine, in network namespaces.

Builds a node, three pods and two "internet" hosts as namespaces (the root
namespace is never touched), with the hosts' names served by a real DNS
server in a namespace of its own (the agent resolves them there), starts the
agent in the node with the embedded policy (``demo-policy.yaml``), sends real
flows -- one with an allowed name forged towards another host -- and shows,
for each, what the client got, what the server saw and what the audit log
says. Everything is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log, start_server
from egress_agent.lab.tls import make_ca

BLOB = "pgbackups.blob.core.windows.net"
OTHER = "exfil.example.net"


@dataclass(frozen=True, kw_only=True)
class Flow:
    title: str
    client: str
    host: str
    port: int
    tls: bool
    expect_diverted: bool
    expect_allowed: bool
    server: str  # which server log to look in
    sni: str | None = None  # the name the client sends, when not ``host``


def _flows() -> list[Flow]:
    return [
        Flow(
            title=f"pg-primary -> {BLOB}:443 (TLS)",
            client="pg-primary",
            host=BLOB,
            port=443,
            tls=True,
            expect_diverted=True,
            expect_allowed=True,
            server="azure",
        ),
        Flow(
            title="pg-primary -> 198.18.1.2:9000 (raw TCP)",
            client="pg-primary",
            host="198.18.1.2",
            port=9000,
            tls=False,
            expect_diverted=True,
            expect_allowed=True,
            server="azure",
        ),
        Flow(
            title=f"pg-primary -> {OTHER}:443 (TLS)",
            client="pg-primary",
            host=OTHER,
            port=443,
            tls=True,
            expect_diverted=True,
            expect_allowed=False,
            server="elsewhere",
        ),
        Flow(
            title="pg-primary -> 198.18.2.2:443 (TLS, forged SNI: blob)",
            client="pg-primary",
            host="198.18.2.2",
            port=443,
            tls=True,
            expect_diverted=True,
            expect_allowed=False,
            server="elsewhere",
            sni=BLOB,
        ),
        Flow(
            title="pg-primary -> pg-replica:5432 (replication)",
            client="pg-primary",
            host="198.19.2.2",
            port=5432,
            tls=False,
            expect_diverted=False,
            expect_allowed=True,
            server="pg-replica",
        ),
        Flow(
            title=f"registry   -> {BLOB}:443 (TLS)",
            client="registry",
            host=BLOB,
            port=443,
            tls=True,
            expect_diverted=False,
            expect_allowed=True,
            server="azure",
        ),
    ]


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="egress-demo-") as tmp, Lab() as lab:
        work = Path(tmp)
        print(f"egress-agent demo: building namespaces {lab.prefix}* (root namespace untouched)")
        lab.add_pod("pg-primary", "198.19.1.2", "fd00:19:1::2")
        lab.add_pod("pg-replica", "198.19.2.2", "fd00:19:2::2")
        lab.add_pod("registry", "198.19.3.2", "fd00:19:3::2")
        lab.add_external("azure", "198.18.1.2", "fd00:18:1::2", hostnames=[BLOB])
        lab.add_external("elsewhere", "198.18.2.2", "fd00:18:2::2", hostnames=[OTHER])

        ca = make_ca(work / "ca")
        blob_cert = ca.issue(work / "blob", [BLOB])
        other_cert = ca.issue(work / "other", [OTHER])
        logs = {name: work / f"{name}.jsonl" for name in ("azure", "elsewhere", "pg-replica")}
        start_server(
            lab,
            "azure",
            name="azure-tls",
            listen=["198.18.1.2:443", "[fd00:18:1::2]:443"],
            tls=blob_cert,
            log=logs["azure"],
        )
        start_server(
            lab, "azure", name="azure-tcp", listen=["198.18.1.2:9000"], tls=None, log=logs["azure"]
        )
        start_server(
            lab,
            "elsewhere",
            name="elsewhere",
            listen=["198.18.2.2:443"],
            tls=other_cert,
            log=logs["elsewhere"],
        )
        start_server(
            lab,
            "pg-replica",
            name="pg-replica",
            listen=["198.19.2.2:5432"],
            tls=None,
            log=logs["pg-replica"],
        )

        policy = work / "policy.yaml"
        policy.write_text(
            resources.files("egress_agent.agent").joinpath("demo-policy.yaml").read_text()
        )
        audit = work / "audit.jsonl"
        agent = AgentProcess(lab, policy=policy, audit=audit, log=work / "agent.log").start()
        print("agent running in the node namespace with this policy:\n")
        for line in policy.read_text().splitlines():
            if line and not line.startswith("#"):
                print(f"    {line}")
        print()

        failures = 0
        for flow in _flows():
            failures += _show_flow(lab, flow, ca_path=ca.cert_path, logs=logs)

        status = agent.stop()
        tables = lab.run("node", ["nft", "list", "tables"]).stdout
        gone = "yes" if "egress_agent" not in tables else "NO"
        print(f"\nagent stopped (exit {status}); its table is gone: {gone}")
        print(f"\naudit log ({audit.name}), one record per diverted connection:")
        for line in audit.read_text().splitlines():
            rec = json.loads(line)
            print(
                f"  {rec['event']:<7} {rec['src']:>18} -> {rec['dst']:<20} "
                f"name={rec['server_name'] or '-':<32} proto={rec['protocol']:<4} "
                f"rule={rec['rule'] or '-':<14} up={rec['bytes_up']} down={rec['bytes_down']}"
            )
            if rec["event"] == "denied" and rec["error"]:
                print(f"          why: {rec['error']}")
        lines = audit.read_text().splitlines()
        print(f"\nraw record: {lines[0] if lines else '(none)'}")
        if failures:
            print(f"\n{failures} flows did NOT behave as the policy says")
        else:
            print("\nall flows behaved as the policy says")
        return 0 if failures == 0 else 1


def _show_flow(lab: Lab, flow: Flow, *, ca_path: Path, logs: dict[str, Path]) -> int:
    before = len(read_log(logs[flow.server]))
    argv = [
        sys.executable,
        "-m",
        "egress_agent.lab.client",
        flow.host,
        str(flow.port),
        "--send",
        "demo\n",
    ]
    if flow.tls:
        argv += ["--tls", "--ca", str(ca_path)]
    if flow.sni:
        argv += ["--sni", flow.sni]
    result = json.loads(lab.run(flow.client, argv, check=False).stdout)
    seen = read_log(logs[flow.server])[before:]
    client_addr = str(lab.hosts[flow.client].ipv4)
    peer = seen[-1]["peer"].rsplit(":", 1)[0] if seen else None
    diverted = peer is not None and peer != client_addr
    if result["ok"]:
        outcome = f"allowed; server saw {peer} ({'the proxy' if diverted else 'the pod itself'})"
    else:
        outcome = f"refused ({result['error'] or 'no reply'})"
    allowed_ok = bool(result["ok"]) == flow.expect_allowed
    diverted_ok = (not result["ok"]) or diverted == flow.expect_diverted
    if not flow.expect_allowed:
        diverted_ok = not seen  # denied: the server must never see the connection
    ok = allowed_ok and diverted_ok
    route = "diverted" if flow.expect_diverted else "direct  "
    print(f"  {'ok ' if ok else 'BAD'} {flow.title:<56} {route}  {outcome}")
    return 0 if ok else 1
