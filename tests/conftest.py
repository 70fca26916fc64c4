"""Fixtures shared by every test tier: a root check and a fresh lab per test,
and how the suite runs on several workers (pytest-xdist).

The harness (tests/harness.py) builds on these: lab → hosts (``pod_and_sink``)
→ agent (``harness.Agent``) → audit (``harness.Audit``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_agent.bpf.cache import CACHE_ENV
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from tests import harness

# Run one after the other, on one worker, never beside each other: the tests
# that load the machine (volumes, floods, the soak, the benchmark) and those
# that assert how fast something happens or how much memory comes back. The
# other worker meanwhile runs the rest, which loads little. Also here: files
# whose agents use the machine's default BPF pin folder.
SERIAL = (
    "tests/adversarial/test_proxy_resources.py",
    "tests/netns/test_bench.py",
    "tests/netns/test_bpf_datapath.py",
    "tests/netns/test_discovery.py",
    "tests/netns/test_handover.py",
    "tests/netns/test_reload.py",
    "tests/netns/test_server_first.py",
    "tests/netns/test_soak.py",
)


@pytest.fixture(scope="session", autouse=True)
def bpf_compile_cache() -> Iterator[None]:
    """The agents the tests start share one compile cache of their own (the
    agent reads the folder from the environment), so that only the first
    start of each program compiles; removed at the end. The compile path
    itself is tested on its own (test_bpf_cache) and by the tests that load
    the classifier directly."""
    if CACHE_ENV in os.environ:
        yield
        return
    folder = tempfile.mkdtemp(prefix="egress-agent-bpf-cache-")
    os.environ[CACHE_ENV] = folder
    try:
        yield
    finally:
        os.environ.pop(CACHE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def lab(require_root: None) -> Iterator[Lab]:
    """A node namespace with nothing plugged in yet; always torn down."""
    with Lab() as built:
        yield built


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Root-only tiers skip on a non-root laptop (CI runs as root and fails on
    any skip)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: builds network namespaces and nftables")
    for item in items:
        if "netns" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pod_and_sink(lab: Lab, tmp_path: Path) -> Lab:
    """One pod (198.19.1.2) and one external host (198.18.1.2) whose test server
    listens on ports 9000 and 9001; the server log is tmp_path/server.jsonl."""
    lab.add_pod("pod", "198.19.1.2", "fd00:19:1::2")
    lab.add_external("ext", "198.18.1.2", "fd00:18:1::2")
    start_server(
        lab,
        "ext",
        name="ext",
        listen=["198.18.1.2:9000", "198.18.1.2:9001"],
        tls=None,
        log=tmp_path / "server.jsonl",
    )
    return lab


def pytest_sessionfinish(session: pytest.Session) -> None:
    """What a killed agent left in its lab's own BPF pin folder (an agent
    that stops cleanly removes it; a restarted one would have)."""
    for folder in sorted(harness.PIN_DIRS):
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``-n``: each test file goes to one worker as a whole (its module
    fixtures are built once), and the SERIAL files as one unit."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "serial" if path in SERIAL else path

    return FileScheduling(config, log)
