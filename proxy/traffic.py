"""The state of the egress rules' traffic controls: open connections and
token buckets for ``limits:``, circuit breakers for ``breaker:``.

Everything the proxy asks goes through :class:`TrafficState`'s few
methods, with plain keys (rule name, workload, destination text) and plain
results, so that the state could live elsewhere than in this process (see
the README's notes on several proxy processes) without touching the
callers. :class:`LocalTraffic` keeps it in this process's memory.

Keys: limits count per rule, or per (rule, workload) with ``per:
workload``; open connections are always counted per (rule, workload) for
every allow rule, so that a reload that adds or changes ``connections``
counts the connections open already. Breakers are per (rule, destination),
where the destination is ``name:port`` for a flow allowed by its name and
``address:port`` otherwise.

Reload (:meth:`LocalTraffic.configure`): a rule whose limits are unchanged
keeps its buckets; changed ones keep what their buckets hold, up to the new
burst, and refill at the new rate; ``per`` changed starts new buckets. Open
counts go on. A rule's breakers keep their state with new thresholds; a
rule that lost its breaker (or is gone) forgets them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from egress_agent.policy.model import Action, EgressRule
from egress_agent.policy.traffic import Breaker, Limits, Scope
from egress_agent.proxy.breaker import Admission, CircuitBreaker, State
from egress_agent.proxy.tokenbucket import TokenBucket

LimitName = Literal["connections", "rate", "requests", "breaker"]
# Breakers kept per rule at most: closed ones without failures are
# forgotten first (they are the same as new ones).
MAX_BREAKERS_PER_RULE = 10000
NO_WORKLOAD = "-"


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why a flow or request was refused: the rule, which of its limits
    (``connections``, ``rate``, ``requests`` or ``breaker``), that limit as
    configured, and when trying again may succeed (seconds; None: when a
    connection ends)."""

    rule: str
    workload: str | None
    limit: LimitName
    value: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class Lease:
    """An allowed flow counted as open for its rule and workload, until
    :meth:`TrafficState.release`."""

    rule: str
    workload: str


@dataclass(frozen=True, kw_only=True)
class Ticket:
    """A flow the breaker of ``rule`` towards ``destination`` let through;
    its result is reported with :meth:`TrafficState.report`."""

    rule: str
    destination: str
    admission: Admission


class TrafficState(Protocol):
    """What the proxy asks of the traffic controls' state, and what status
    and metrics read from it."""

    # Refusals by (rule, workload, limit); breaker transitions by (rule,
    # destination, state moved to).
    limited: dict[tuple[str, str, str], int]
    transitions: dict[tuple[str, str, str], int]

    def configure(self, rules: Iterable[EgressRule], now: float) -> None: ...

    def open_flow(self, rule: str, workload: str | None, now: float) -> Lease | Refusal: ...

    def release(self, lease: Lease) -> None: ...

    def take_request(self, rule: str, workload: str | None, now: float) -> Refusal | None: ...

    def enter(
        self, rule: str, workload: str | None, destination: str, now: float
    ) -> Ticket | Refusal | None: ...

    def report(self, ticket: Ticket, ok: bool | None, now: float) -> None: ...

    def has_breaker(self, rule: str) -> bool: ...

    def status(self, now: float) -> dict[str, Any]: ...

    def breaker_states(self) -> list[tuple[str, str, State]]: ...


def describe_rate(rate: str, burst: int) -> str:
    return f"{rate}, burst {burst}"


def describe_breaker(b: Breaker) -> str:
    return f"{b.consecutive_failures} consecutive failures, open_for {b.open_for:g}s"


class LocalTraffic:
    """The traffic controls' state in this process's memory."""

    def __init__(self) -> None:
        self.limits: dict[str, Limits] = {}
        self.breaker_settings: dict[str, Breaker] = {}
        # Open allowed flows by (rule, workload).
        self.open: dict[tuple[str, str], int] = {}
        self._connection_buckets: dict[tuple[str, str], TokenBucket] = {}
        self._request_buckets: dict[tuple[str, str], TokenBucket] = {}
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        # Refusals by (rule, workload, limit), for the metrics.
        self.limited: dict[tuple[str, str, str], int] = {}
        # Breaker transitions by (rule, destination, state moved to).
        self.transitions: dict[tuple[str, str, str], int] = {}

    # -- configuration ---------------------------------------------------------------

    def configure(self, rules: Iterable[EgressRule], now: float) -> None:
        limits: dict[str, Limits] = {}
        breakers: dict[str, Breaker] = {}
        for rule in rules:
            if rule.action is not Action.ALLOW:
                continue
            if rule.limits is not None:
                limits[rule.name] = rule.limits
            if rule.breaker is not None:
                breakers[rule.name] = rule.breaker
        for buckets, rate_of in (
            (self._connection_buckets, _connection_rate),
            (self._request_buckets, _request_rate),
        ):
            for key, bucket in list(buckets.items()):
                old, new = self.limits.get(key[0]), limits.get(key[0])
                wanted = rate_of(new) if new is not None else None
                if new is None or wanted is None or old is None or old.per is not new.per:
                    del buckets[key]
                elif new != old:
                    bucket.reconfigure(rate=wanted[0], burst=wanted[1], now=now)
        for key, breaker in list(self.breakers.items()):
            settings = breakers.get(key[0])
            if settings is None:
                del self.breakers[key]
            else:
                breaker.reconfigure(
                    consecutive_failures=settings.consecutive_failures, open_for=settings.open_for
                )
        self.limits = limits
        self.breaker_settings = breakers

    # -- limits ----------------------------------------------------------------------------

    def _scope(self, limits: Limits, rule: str, workload: str | None) -> tuple[str, str]:
        return (rule, (workload or NO_WORKLOAD) if limits.per is Scope.WORKLOAD else "")

    def _refuse(self, refusal: Refusal) -> Refusal:
        key = (refusal.rule, refusal.workload or NO_WORKLOAD, refusal.limit)
        self.limited[key] = self.limited.get(key, 0) + 1
        return refusal

    def open_flow(self, rule: str, workload: str | None, now: float) -> Lease | Refusal:
        """Count a flow ``rule`` allowed as open, or refuse it: its rule's (or
        workload's) connections are all in use, or its rate bucket is empty."""
        who = workload or NO_WORKLOAD
        limits = self.limits.get(rule)
        if limits is not None:
            scope = self._scope(limits, rule, workload)
            whose = _whose(limits, rule, workload)
            if limits.connections is not None:
                if limits.per is Scope.WORKLOAD:
                    held = self.open.get((rule, who), 0)
                else:
                    held = sum(n for (r, _), n in self.open.items() if r == rule)
                if held >= limits.connections:
                    return self._refuse(
                        Refusal(
                            rule=rule,
                            workload=workload,
                            limit="connections",
                            value=str(limits.connections),
                            message=f"limited: {held} connections open {whose}, the limit"
                            f" (limits.connections: {limits.connections})",
                        )
                    )
            wanted = _connection_rate(limits)
            if wanted is not None:
                bucket = self._connection_buckets.get(scope)
                if bucket is None:
                    bucket = TokenBucket(rate=wanted[0], burst=wanted[1], now=now)
                    self._connection_buckets[scope] = bucket
                wait = bucket.take(now)
                if wait > 0:
                    assert limits.rate is not None
                    value = describe_rate(str(limits.rate), wanted[1])
                    return self._refuse(
                        Refusal(
                            rule=rule,
                            workload=workload,
                            limit="rate",
                            value=value,
                            message=f"limited: new connections {whose} over limits.rate"
                            f" ({value}); the next is allowed in {wait:.3g}s",
                            retry_after=wait,
                        )
                    )
        self.open[(rule, who)] = self.open.get((rule, who), 0) + 1
        return Lease(rule=rule, workload=who)

    def release(self, lease: Lease) -> None:
        key = (lease.rule, lease.workload)
        held = self.open.get(key, 0) - 1
        if held > 0:
            self.open[key] = held
        else:
            self.open.pop(key, None)

    def take_request(self, rule: str, workload: str | None, now: float) -> Refusal | None:
        """Take a token for one HTTP request of ``rule``, or refuse it."""
        limits = self.limits.get(rule)
        wanted = _request_rate(limits) if limits is not None else None
        if limits is None or wanted is None:
            return None
        scope = self._scope(limits, rule, workload)
        bucket = self._request_buckets.get(scope)
        if bucket is None:
            bucket = TokenBucket(rate=wanted[0], burst=wanted[1], now=now)
            self._request_buckets[scope] = bucket
        wait = bucket.take(now)
        if wait == 0:
            return None
        value = describe_rate(str(limits.requests), wanted[1])
        return self._refuse(
            Refusal(
                rule=rule,
                workload=workload,
                limit="requests",
                value=value,
                message=f"limited: requests {_whose(limits, rule, workload)} over"
                f" limits.requests ({value}); the next is allowed in {wait:.3g}s",
                retry_after=wait,
            )
        )

    # -- breakers --------------------------------------------------------------------------

    def has_breaker(self, rule: str) -> bool:
        return rule in self.breaker_settings

    def enter(
        self, rule: str, workload: str | None, destination: str, now: float
    ) -> Ticket | Refusal | None:
        """Ask ``rule``'s breaker for ``destination`` whether a flow may try
        it: a ticket to report the result on, a refusal (fail fast), or None
        when the rule has no breaker."""
        settings = self.breaker_settings.get(rule)
        if settings is None:
            return None
        key = (rule, destination)
        breaker = self.breakers.get(key)
        if breaker is None:
            self._make_room(rule)
            breaker = CircuitBreaker(
                consecutive_failures=settings.consecutive_failures, open_for=settings.open_for
            )
            self.breakers[key] = breaker
        before = breaker.state
        admission = breaker.admit(now)
        self._count_transition(key, before, breaker)
        if admission.allowed:
            return Ticket(rule=rule, destination=destination, admission=admission)
        if admission.retry_in > 0:
            when = f"a probe may try it in {admission.retry_in:.3g}s"
        else:
            when = "a probe is trying it"
        return self._refuse(
            Refusal(
                rule=rule,
                workload=workload,
                limit="breaker",
                value=describe_breaker(settings),
                message=f"circuit breaker open for {destination} (rule {rule},"
                f" {describe_breaker(settings)}): failing fast; {when}",
                retry_after=admission.retry_in or None,
            )
        )

    def report(self, ticket: Ticket, ok: bool | None, now: float) -> None:
        """The result of a flow let through: ``ok`` True (reached the
        destination), False (failed), None (ended before it tried)."""
        key = (ticket.rule, ticket.destination)
        breaker = self.breakers.get(key)
        if breaker is None:
            return
        before = breaker.state
        if ok is None:
            breaker.abandoned(ticket.admission)
        elif ok:
            breaker.succeeded(ticket.admission, now)
        else:
            breaker.failed(ticket.admission, now)
        self._count_transition(key, before, breaker)

    def _count_transition(
        self, key: tuple[str, str], before: State, breaker: CircuitBreaker
    ) -> None:
        if breaker.state is not before:
            t = (key[0], key[1], breaker.state.value)
            self.transitions[t] = self.transitions.get(t, 0) + 1

    def _make_room(self, rule: str) -> None:
        mine = [k for k in self.breakers if k[0] == rule]
        if len(mine) < MAX_BREAKERS_PER_RULE:
            return
        for key in mine:
            if self.breakers[key].idle():
                del self.breakers[key]
        mine = [k for k in self.breakers if k[0] == rule]
        for key in mine[: max(0, len(mine) - MAX_BREAKERS_PER_RULE + 1)]:
            del self.breakers[key]

    # -- what status and metrics show -------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """Limits and breakers as ``status`` shows them (plain data)."""
        limited: dict[str, dict[str, int]] = {}
        for (rule, workload, limit), n in sorted(self.limited.items()):
            limited.setdefault(rule, {})
            limited[rule][f"{limit} {workload}"] = n
        limits = {}
        for rule, lim in sorted(self.limits.items()):
            limits[rule] = {
                "per": lim.per.value,
                "connections": lim.connections,
                "rate": describe_rate(str(lim.rate), lim.connection_burst()) if lim.rate else None,
                "requests": (
                    describe_rate(str(lim.requests), lim.request_burst()) if lim.requests else None
                ),
                "open": {w: n for (r, w), n in sorted(self.open.items()) if r == rule},
                "refused": limited.get(rule, {}),
            }
        breakers = []
        for (rule, destination), b in sorted(self.breakers.items()):
            if b.idle():
                continue
            entry: dict[str, Any] = {
                "rule": rule,
                "destination": destination,
                "state": b.state.value,
                "failures": b.failures,
            }
            if b.state is State.OPEN:
                entry["probe_in_s"] = round(max(0.0, b.opened_at + b.open_for - now), 3)
            breakers.append(entry)
        return {"limits": limits, "breakers": breakers}

    def breaker_states(self) -> list[tuple[str, str, State]]:
        """(rule, destination, state) of every breaker known."""
        return [(r, d, b.state) for (r, d), b in sorted(self.breakers.items())]


def _whose(limits: Limits, rule: str, workload: str | None) -> str:
    if limits.per is Scope.WORKLOAD:
        who = f"workload {workload}" if workload else "sources with no workload"
        return f"for rule {rule} and {who}"
    return f"for rule {rule}"


def _connection_rate(limits: Limits | None) -> tuple[float, int] | None:
    if limits is None or limits.rate is None:
        return None
    return limits.rate.per_second, limits.connection_burst()


def _request_rate(limits: Limits | None) -> tuple[float, int] | None:
    if limits is None or limits.requests is None:
        return None
    return limits.requests.per_second, limits.request_burst()


def retry_after_header(seconds: float | None) -> int:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds or 0.0))
