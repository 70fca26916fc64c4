"""The circuit breaker of one upstream destination (``breaker:``).

States and what moves between them:

* ``closed``: flows go ahead. Each failure adds to a count of failures in a
  row, each success resets it; ``consecutive_failures`` in a row open it.
* ``open``: flows fail fast, without trying the destination, for
  ``open_for`` seconds. Then the next flow becomes the probe.
* ``half-open``: exactly one flow, the probe, goes ahead; the others fail
  fast. The probe's success closes the breaker, its failure opens it again
  for another ``open_for``. A probe that ends without a result (its client
  left before it tried) frees the place for the next flow; one that has not
  said anything after ``probe_timeout`` seconds is given up on the same way.

Results of flows that started before the breaker opened change nothing
while it is open or half-open: only the probe decides.

Pure: the time is passed in (``now``, seconds on a monotonic clock).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, kw_only=True)
class Admission:
    """What the breaker says to one new flow: go ahead (as the probe, with
    its number, or not), or fail fast for ``retry_in`` more seconds."""

    allowed: bool
    probe: int = 0  # the probe's number; 0 for an ordinary flow
    retry_in: float = 0.0  # refused: seconds until a probe may go (0: one is under way)


class CircuitBreaker:
    """One destination's breaker; see the module's docstring."""

    def __init__(
        self, *, consecutive_failures: int, open_for: float, probe_timeout: float = 60.0
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.open_for = open_for
        self.probe_timeout = probe_timeout
        self.state = State.CLOSED
        self.failures = 0  # in a row, while closed
        self.opened_at = 0.0
        self.probe = 0  # the probe under way (half-open), 0: none
        self.probe_started = 0.0
        self._probes = 0
        # Transitions by the state moved to, since this breaker was made.
        self.transitions: dict[State, int] = {}

    def _move(self, state: State, now: float) -> None:
        self.state = state
        self.transitions[state] = self.transitions.get(state, 0) + 1
        if state is State.OPEN:
            self.opened_at = now
            self.probe = 0
        elif state is State.CLOSED:
            self.failures = 0
            self.probe = 0

    def admit(self, now: float) -> Admission:
        """Whether a new flow may try the destination now."""
        if self.state is State.CLOSED:
            return Admission(allowed=True)
        if self.state is State.OPEN:
            remaining = self.opened_at + self.open_for - now
            if remaining > 0:
                return Admission(allowed=False, retry_in=remaining)
            self._move(State.HALF_OPEN, now)
        if self.probe and now - self.probe_started < self.probe_timeout:
            return Admission(allowed=False)
        self._probes += 1
        self.probe = self._probes
        self.probe_started = now
        return Admission(allowed=True, probe=self.probe)

    def succeeded(self, admission: Admission, now: float) -> None:
        """The flow reached the destination (and, for HTTP, got no 5xx)."""
        if self.state is State.CLOSED:
            self.failures = 0
        elif self._is_current_probe(admission):
            self._move(State.CLOSED, now)

    def failed(self, admission: Admission, now: float) -> None:
        """The flow could not reach the destination (or got a 5xx)."""
        if self.state is State.CLOSED:
            self.failures += 1
            if self.failures >= self.consecutive_failures:
                self._move(State.OPEN, now)
        elif self._is_current_probe(admission):
            self._move(State.OPEN, now)

    def abandoned(self, admission: Admission) -> None:
        """The flow ended without a result: a probe's place is free again."""
        if self._is_current_probe(admission):
            self.probe = 0

    def _is_current_probe(self, admission: Admission) -> bool:
        return (
            self.state is State.HALF_OPEN and admission.probe != 0 and admission.probe == self.probe
        )

    def reconfigure(self, *, consecutive_failures: int, open_for: float) -> None:
        """New thresholds; the state stays (an open breaker stays open, now
        until its new ``open_for`` has passed since it opened)."""
        self.consecutive_failures = consecutive_failures
        self.open_for = open_for

    def idle(self) -> bool:
        """Nothing to remember: closed with no failures (a new breaker would
        be the same)."""
        return self.state is State.CLOSED and self.failures == 0
