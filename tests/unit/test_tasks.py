"""Debouncer and TaskSet: the agent's and the proxy's background work."""

from __future__ import annotations

import asyncio
import logging

import pytest

from egress_agent.proxy.tasks import Debouncer, TaskSet


def test_a_burst_becomes_one_call_with_every_event() -> None:
    calls: list[list[str]] = []

    async def main() -> None:
        debounce = Debouncer(0.05, calls.append)
        debounce("file changed")
        debounce("periodic check")
        await asyncio.sleep(0.01)
        debounce("SIGHUP")
        assert calls == []  # not before the delay after the first event
        await asyncio.sleep(0.1)
        debounce("file changed")  # a new burst
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert calls == [["file changed", "periodic check", "SIGHUP"], ["file changed"]]


def test_a_cancelled_burst_is_not_called() -> None:
    calls: list[list[None]] = []

    async def main() -> None:
        debounce = Debouncer[None](0.02, calls.append)
        debounce(None)
        debounce.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert calls == []


def test_tasks_are_kept_until_they_end_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    async def main() -> tuple[int, int, int]:
        tasks = TaskSet()
        tasks.spawn(asyncio.sleep(10), name="sleeper")
        tasks.spawn(fail(), name="doomed")
        running = len(tasks)
        await asyncio.sleep(0.01)
        after_failure = len(tasks)
        await tasks.cancel_all()
        return running, after_failure, len(tasks)

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(main()) == (2, 1, 0)
    assert "task doomed failed" in caplog.text
