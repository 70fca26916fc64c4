"""Background work on the event loop: named tasks that are kept and logged,
and bursts of events coalesced into one call.

The proxy runs each connection and its housekeeping as a task of a
:class:`TaskSet`; the agent runs its reloads, pod changes and link changes
the same way, started by a :class:`Debouncer` where events come in bursts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Creates named tasks and keeps a reference until they finish, so none is
    garbage-collected mid-flight and every failure is logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def cancel(self) -> None:
        """Cancel every task, without waiting for them to end."""
        for task in list(self._tasks):
            task.cancel()

    async def cancel_all(self) -> None:
        """Cancel every task and wait until they have ended."""
        self.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)


class Debouncer(Generic[T]):
    """Coalesces a burst of events into one call of ``fire``, ``delay``
    seconds after the burst's first event, with every event's value in the
    order they came."""

    def __init__(self, delay: float, fire: Callable[[list[T]], None]) -> None:
        self._delay = delay
        self._fire = fire
        self._events: list[T] = []
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, event: T) -> None:
        self._events.append(event)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._run)

    def _run(self) -> None:
        self._timer = None
        events, self._events = self._events, []
        self._fire(events)

    def cancel(self) -> None:
        """Forget a burst whose call is still due."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._events = []
