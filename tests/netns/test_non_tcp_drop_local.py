"""``non_tcp: drop`` for locally generated traffic: a workload of the node's
own addresses and a cgroup workload (node processes by their cgroup). Their
non-TCP to the rule's destinations never arrives; the same program outside
the cgroup, and a reply to a flow the external host started, do. Judged by
the external hosts' UDP server logs.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_agent.bpf.cgroup import default_root
from egress_agent.lab.netns import Lab
from tests.harness import Agent, wait_until
from tests.lab.udp import start_udp_server

pytestmark = pytest.mark.netns

POLICY = """
version: 1
workloads:
  node-ext2: {{cidrs: [198.18.3.1/32, "fd00:18:3::1/128"]}}
  backup: {{cgroups: [{path}]}}
intercept:
  - from: [node-ext2, backup]
    to_cidrs: [198.18.0.0/15, "fd00:18::/32"]
    non_tcp: drop
default: deny
"""


@pytest.fixture
def cgroup(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(cgroup2 root, a fresh cgroup's relative path), removed at the end."""
    root = default_root()
    assert root is not None, "this machine has no cgroup2 mount"
    name = f"egress-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    Path(root, name).mkdir()
    yield root, name
    path = Path(root, name)
    if Path(path, "cgroup.kill").exists():
        Path(path, "cgroup.kill").write_text("1")
    for _ in range(50):
        try:
            path.rmdir()
            break
        except OSError:
            time.sleep(0.1)


def _records(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


@pytest.mark.parametrize("datapath", ["nft", "bpf"])
def test_local_and_cgroup_workloads_non_tcp_is_dropped(
    tmp_path: Path, cgroup: tuple[str, str], datapath: str
) -> None:
    root, name = cgroup
    with Lab() as lab:
        lab.add_external("ext", "198.18.1.2", "fd00:18:1::2")
        lab.add_external("ext2", "198.18.3.2", "fd00:18:3::2")
        for host in ("ext", "ext2"):
            start_udp_server(
                lab,
                host,
                listen=[f"{lab.hosts[host].ipv4}:5353", f"[{lab.hosts[host].ipv6}]:5353"],
                log=tmp_path / f"{host}.jsonl",
            )
        start_udp_server(
            lab, "node", listen=["198.18.3.1:7"], log=tmp_path / "node.jsonl", echo=True
        )
        (tmp_path / "policy.yaml").write_text(POLICY.format(path=name))
        agent = Agent(
            lab,
            policy=tmp_path / "policy.yaml",
            audit=tmp_path / "audit.jsonl",
            log=tmp_path / "agent.log",
            extra_args=(
                "--datapath",
                datapath,
                "--cgroup-root",
                f"/proc/{os.getpid()}/root{root}",
                "--bpf-pin-dir",
                str(tmp_path / "bpffs" / "egress"),
            ),
        ).start(timeout=120)
        try:

            def send(to: str, text: str, *, in_cgroup: bool) -> str:
                procs = f"/proc/{os.getpid()}/root{root}/{name}/cgroup.procs"
                family = "socket.AF_INET6" if ":" in to else "socket.AF_INET"
                code = textwrap.dedent(
                    f"""
                    import socket
                    s = socket.socket({family}, socket.SOCK_DGRAM)
                    try:
                        s.sendto({text!r}.encode(), ({to!r}, 5353))
                        print("sent")
                    except PermissionError:  # dropped in the output hook
                        print("dropped")
                    """
                )
                enter = f"echo $$ > {procs} && " if in_cgroup else ""
                argv = ["sh", "-c", f'{enter}exec "$@"', "sh", sys.executable, "-c", code]
                return lab.run("node", argv).stdout.strip()

            for to in ("198.18.1.2", "fd00:18:1::2"):
                assert send(to, f"outside-{to}", in_cgroup=False) == "sent"
                # A drop in the output hook fails the sender's call (EPERM).
                assert send(to, f"inside-{to}", in_cgroup=True) == "dropped"
            for to in ("198.18.3.2", "fd00:18:3::2"):
                # From the node's address on ext2's link: the address workload.
                assert send(to, f"node-{to}", in_cgroup=False) == "dropped"
            # ext2 starts a flow to the node: the node's echo is a reply.
            echoed = lab.run(
                "ext2",
                [
                    sys.executable,
                    "-c",
                    "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                    "s.settimeout(3);s.sendto(b'echo me',('198.18.3.1',7));"
                    "print(s.recv(100).decode())",
                ],
            ).stdout.strip()
            outside = {"outside-198.18.1.2", "outside-fd00:18:1::2"}

            def arrived() -> set[str]:
                got = {r["data"] for r in _records(tmp_path / "ext.jsonl")}
                return got | {r["data"] for r in _records(tmp_path / "ext2.jsonl")}

            # The drops failed in the senders' calls (EPERM): only what was sent
            # can arrive. Wait for that, then nothing else may be there.
            wait_until(lambda: outside <= arrived(), timeout=5, what="the allowed datagrams")
            assert arrived() == outside
            assert echoed == "echo me"
            status = json.loads(
                lab.run(
                    "node", [sys.executable, "-m", "egress_agent.agent.cli", "status", "--json"]
                ).stdout
            )
            per_rule = {
                r["rule"]: r["packets"]
                for r in status["drops"]["rules"]
                if r["reason"] == "non_tcp"
            }
            assert per_rule["intercept[0] from backup non_tcp (cgroup mark)"] == 2
            assert per_rule["intercept[0] from node-ext2 non_tcp"] == 2
        finally:
            assert agent.stop() == 0
