"""A policy path that is a symlink to a file elsewhere (config management, a
checkout): edits of the target, a swapped checkout link, and a link pointed
somewhere new each apply within a second, judged from the pod: the
connection the new policy allows gets through, the one it denies does not."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from tests.lab.edits import rename_over, swap_link, write_in_place

pytestmark = pytest.mark.netns

POLICY = """
version: 1
workloads:
  pod: {{cidrs: [198.19.1.2/32]}}
intercept:
  - from: [pod]
    ports: [9000, 9001]
egress:
  - name: open
    to: {{ports: [{port}]}}
    action: allow
default: deny
# {comment}
"""


def _text(port: int, comment: str) -> str:
    return POLICY.format(port=port, comment=comment)


def _reachable(lab: Lab, port: int) -> bool:
    out = lab.run(
        "pod",
        [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", str(port)],
        check=False,
    )
    return bool(json.loads(out.stdout)["ok"])


def _applied(lab: Lab, port: int) -> bool:
    """The pod reaches ``port`` and not the other one."""
    other = 9001 if port == 9000 else 9000
    return _reachable(lab, port) and not _reachable(lab, other)


def _reloads(log: Path) -> list[float]:
    """When the agent applied a changed file (its JSON log's times)."""
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record["event"].startswith("reloaded (file changed)"):
            when = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
            out.append(when.replace(tzinfo=UTC).timestamp())
    return out


def test_edits_through_symlinks_apply_within_a_second(pod_and_sink: Lab, tmp_path: Path) -> None:
    lab = pod_and_sink
    deploy = tmp_path / "deploy"
    for release in ("v1", "v2"):
        (deploy / "releases" / release).mkdir(parents=True)
    (deploy / "releases" / "v1" / "policy.yaml").write_text(_text(9000, "v1"))
    os.symlink("releases/v1", deploy / "current")
    etc = tmp_path / "etc"
    etc.mkdir()
    link = etc / "policy.yaml"
    os.symlink(deploy / "current" / "policy.yaml", link)
    log = tmp_path / "agent.log"
    agent = AgentProcess(
        lab,
        policy=link,
        audit=tmp_path / "audit.jsonl",
        log=log,
        extra_args=("--log-format", "json"),
    )
    agent.start(timeout=90)
    took: dict[str, float] = {}
    try:
        assert _applied(lab, 9000)

        def step(what: str, port: int, edit: Callable[[], None]) -> None:
            before = len(_reloads(log))
            t0 = time.time()
            edit()
            while len(_reloads(log)) == before:
                assert time.time() - t0 < 15, f"{what}: never applied"
                time.sleep(0.05)
            took[what] = _reloads(log)[-1] - t0
            assert _applied(lab, port), what

        v1 = deploy / "releases" / "v1" / "policy.yaml"
        step("target edited in place", 9001, lambda: write_in_place(v1, _text(9001, "in place")))
        step("target renamed over", 9000, lambda: rename_over(v1, _text(9000, "renamed")))
        v2 = deploy / "releases" / "v2" / "policy.yaml"
        v2.write_text(_text(9001, "v2"))
        step("checkout link swapped", 9001, lambda: swap_link(deploy / "current", "releases/v2"))
        step("new release edited", 9000, lambda: write_in_place(v2, _text(9000, "v2 edited")))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "p.yaml").write_text(_text(9001, "elsewhere"))
        step("link pointed elsewhere", 9001, lambda: swap_link(link, str(elsewhere / "p.yaml")))
        step(
            "new target renamed over",
            9000,
            lambda: rename_over(elsewhere / "p.yaml", _text(9000, "elsewhere edited")),
        )
    finally:
        assert agent.stop() == 0
    print("seconds until applied:", json.dumps({k: round(v, 3) for k, v in took.items()}))
    slow = {k: v for k, v in took.items() if v >= 1.0}
    assert not slow, f"took a second or more (the periodic check, not the watch): {slow}"
    assert len(_reloads(log)) == len(took)
