"""The kernel relay against the proxy's own relay, alternately, on loopback.

    python -m bench.relay_ab [--gib N] [--rounds N]

One bulk stream (a client process sending N GiB, a server process reading
it) through an in-process proxy, once with ``proxy.relay: kernel`` and once
with ``userspace``, ``--rounds`` times in turn. Prints, per run, the
client's throughput and the proxy's CPU seconds per GiB (its own user and
system time, from getrusage): the CPU time is the steadier number on a
machine busy with other work. Needs root (the upstream socket mark), and
uses only 127.0.0.1; the processes it starts end with it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop

from egress_agent.policy.load import parse_policy
from egress_agent.proxy import connection as proxy_connection
from egress_agent.proxy import server as proxy_server
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.original_dst import Endpoint

POLICY = """
version: 1
proxy: {{port: {port}, address_v4: 127.0.0.1, address_v6: "::1", relay: {relay}}}
workloads: {{lo: {{cidrs: [127.0.0.0/8]}}}}
egress:
  - {{name: lo, from: [lo], to: {{cidrs: [127.0.0.0/8]}}, action: allow}}
default: deny
"""
# The server: reads every connection to its end. Prints its port.
SINK = """
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""
# The client: sends N MiB, half-closes, waits for the end; prints its seconds.
SOURCE = """
import socket, sys, time
port, mib = int(sys.argv[1]), int(sys.argv[2])
block = b"x" * (1 << 20)
s = socket.create_connection(("127.0.0.1", port))
t = time.monotonic()
for _ in range(mib):
    s.sendall(block)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(time.monotonic() - t)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _one(relay: str, sink_port: int, gib: int, work: Path) -> dict[str, Any]:
    port = _free_port()
    policy = parse_policy(POLICY.format(port=port, relay=relay))

    def to_sink(sock: socket.socket) -> Endpoint:
        return Endpoint(address=ipaddress.ip_address("127.0.0.1"), port=sink_port)

    proxy_connection.original_dst = to_sink  # type: ignore[assignment]
    audit = AuditLog(str(work / f"audit-{relay}.jsonl"))
    proxy = proxy_server.ProxyServer(policy=policy, audit=audit)
    await proxy.start()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SOURCE, str(port), str(gib * 1024), stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(client.communicate(), 600)
        while proxy.connections:
            await asyncio.sleep(0.01)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await proxy.close()
        audit.close()
    seconds = float(out)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "relay": relay,
        "gbit_s": round(gib * 8 * (1 << 30) / 1e9 / seconds, 2),
        "proxy_cpu_s_per_gib": round(cpu / gib, 3),
        "kernel_relayed": proxy.relays.kernel,
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay_ab", description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=int, default=2, help="GiB per run (2)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each relay, in turn (3)")
    args = p.parse_args()
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        with tempfile.TemporaryDirectory(prefix="egress-relay-ab-") as tmp:
            for _ in range(args.rounds):
                for relay in ("kernel", "userspace"):
                    print(json.dumps(uvloop.run(_one(relay, sink_port, args.gib, Path(tmp)))))
    finally:
        sink.kill()
        sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
