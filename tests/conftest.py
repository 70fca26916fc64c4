"""Fixtures shared by every test tier: a root check and a fresh lab per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from egress_agent.lab.netns import Lab


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def lab(require_root: None) -> Iterator[Lab]:
    """A node namespace with nothing plugged in yet; always torn down."""
    with Lab() as built:
        yield built
