"""Fixtures shared by every test tier: a root check and a fresh lab per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server


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
