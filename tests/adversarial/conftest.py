"""Fixtures of the adversarial suite: one range per module, one agent per
datapath (the module's tests run against ``--datapath nft``, then ``bpf``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from adversary import Range, build_range


@pytest.fixture(scope="module")
def rng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Range]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with build_range(tmp_path_factory.mktemp("adversary")) as built:
        yield built


@pytest.fixture(scope="module", params=["nft", "bpf"])
def datapath(request: pytest.FixtureRequest, rng: Range) -> Iterator[str]:
    """The agent running with one datapath for the tests that ask for it."""
    rng.start_agent(request.param)
    try:
        yield request.param
    finally:
        assert rng.stop_agent() == 0, "the agent did not stop cleanly after the attacks"
