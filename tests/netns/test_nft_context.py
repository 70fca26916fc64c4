"""The agent survives running out of file descriptors.

libnftables opens a netlink socket for every context it makes and ends the
process with ``exit()`` when it cannot. The agent keeps one context from
start-up on, so its periodic drift check keeps talking to the kernel over
that socket however many descriptors are taken.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from egress_agent.lab.netns import Lab
from tests.harness import Agent, wait_until

pytestmark = pytest.mark.netns

POLICY = """
version: 1
workloads:
  app: {{cidrs: [198.19.1.2/32]}}
intercept:
  - from: [app]
    ports: [9000]
    non_tcp: drop
default: deny
"""


def _status(lab: Lab) -> dict[str, object]:
    code = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:15021/status').read().decode())"
    )
    out = lab.run("node", [sys.executable, "-c", code]).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_the_drift_check_outlives_exhausted_file_descriptors(tmp_path: Path) -> None:
    with Lab() as lab:
        lab.add_pod("app", "198.19.1.2", "fd00:19:1::2")
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format())
        log = tmp_path / "agent.log"
        agent = Agent(
            lab,
            policy=policy,
            audit=tmp_path / "audit.jsonl",
            log=log,
            extra_args=("--datapath", "nft"),
        ).start()
        assert agent.proc is not None
        pid = agent.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        try:
            # Not one descriptor more than the agent holds now.
            resource.prlimit(
                pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard)
            )
            # Someone empties a chain meanwhile: the next round must notice
            # and restore it, over the socket the agent already has.
            lab.run("node", ["nft", "flush", "chain", "inet", "egress_agent", "forward"])
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and "restoring" not in log.read_text():
                time.sleep(0.2)
            # One more round under the limit: no state says a round passed
            # without finding anything (rounds are 2 s apart).
            time.sleep(2.5)
            assert agent.proc.poll() is None, log.read_text()[-3000:]
            forward = lab.run("node", ["nft", "list", "chain", "inet", "egress_agent", "forward"])
            assert "AH from workloads" in forward.stdout, log.read_text()[-3000:]
        finally:
            if agent.proc.poll() is None:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        wait_until(
            lambda: _status(lab)["kernel_in_sync"] is True,
            timeout=10,
            what="the kernel in sync with the agent again",
        )
        assert agent.stop() == 0
