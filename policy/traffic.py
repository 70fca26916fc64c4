"""Traffic controls of an egress rule, as policy data: ``limits:`` (open
connections, new connections per second, HTTP requests per second) and
``breaker:`` (a circuit breaker per upstream destination).

Plain frozen data like the rest of the model (:mod:`egress_agent.policy.model`
refers to it from :class:`~egress_agent.policy.model.EgressRule`); the proxy
keeps the state that goes with it (``proxy.traffic``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Scope(enum.Enum):
    """Whom a rule's limits count for (``limits.per``)."""

    RULE = "rule"  # one count for every flow the rule allows (the default)
    WORKLOAD = "workload"  # a count of its own for each workload the rule allows


@dataclass(frozen=True, kw_only=True)
class Rate:
    """So many events per period: ``"20/s"`` is count 20, period 1.0."""

    count: float
    period: float  # seconds

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        count = f"{self.count:g}"
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period)
        return f"{count}/{unit}" if unit else f"{count}/{self.period:g}s"


def default_burst(rate: Rate) -> int:
    """The burst of a rate written without one: a period's worth (``20/s``
    lets 20 through at once), at least 1."""
    return max(1, math.ceil(rate.count))


@dataclass(frozen=True, kw_only=True)
class Limits:
    """``limits:`` of an allow rule; None fields are not limited.

    ``connections`` caps the rule's connections open at once; ``rate`` (with
    ``burst``) is a token bucket for new connections; ``requests`` (with
    ``requests_burst``) one for HTTP requests of an ``http:`` rule. ``per``
    says whether the counts are the rule's as a whole or each workload's.
    """

    connections: int | None = None
    rate: Rate | None = None
    burst: int | None = None
    requests: Rate | None = None
    requests_burst: int | None = None
    per: Scope = Scope.RULE

    def connection_burst(self) -> int:
        assert self.rate is not None
        return self.burst if self.burst is not None else default_burst(self.rate)

    def request_burst(self) -> int:
        assert self.requests is not None
        if self.requests_burst is not None:
            return self.requests_burst
        return default_burst(self.requests)


@dataclass(frozen=True, kw_only=True)
class Breaker:
    """``breaker:`` of an allow rule: after ``consecutive_failures`` failures
    in a row towards one destination, its flows fail fast for ``open_for``
    seconds; then one probe decides whether it closes again."""

    consecutive_failures: int
    open_for: float  # seconds
