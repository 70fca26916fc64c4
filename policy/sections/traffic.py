"""An egress rule's traffic controls: ``limits:`` and ``breaker:`` (see
:mod:`egress_agent.policy.traffic` for what they mean).

Rates are written ``N/s``, ``N/m`` or ``N/h`` (``"20/s"``); durations as a
number of seconds or with a unit (``30s``, ``500ms``, ``2m``, ``1h``).
"""

from __future__ import annotations

import math
import re

from yaml.nodes import MappingNode, Node

from egress_agent.policy import fields
from egress_agent.policy.model import Action
from egress_agent.policy.traffic import Breaker, Limits, Rate, Scope
from egress_agent.policy.yamlnodes import Fields, Reader, join

_LIMITS_KEYS = ("connections", "rate", "burst", "requests", "per")
_REQUESTS_KEYS = ("rate", "burst")
_BREAKER_KEYS = ("consecutive_failures", "open_for")
_RATE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([a-z]+)\s*")
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0}  # fmt: skip
_RATE_EXAMPLE = 'a rate like "20/s" (per second; also /m, /h)'
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_EXAMPLE = "a duration like 30s, 500ms or 2m (or a number of seconds)"
# Bounds that keep the numbers meaningful: a day at most for a breaker to
# stay open, a million of anything per second.
MAX_OPEN_FOR = 86400.0
MAX_COUNT = 1_000_000
MAX_PER_SECOND = 1_000_000.0
_per = fields.one_of(
    {s.value: s for s in Scope},
    what="rule or workload",
    expected="expected rule (one count for all the rule's flows; the default) or workload"
    " (a count of its own for each workload);",
)
_count = fields.integer_in(1, MAX_COUNT)


def rate(r: Reader, node: Node, path: str) -> Rate | None:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` with N greater than 0."""
    text = r.text(node, path, what=_RATE_EXAMPLE, raw=True)
    if text is None:
        return None
    m = _RATE_RE.fullmatch(text.lower())
    if m is None:
        hint = ""
        if re.fullmatch(r"\s*[0-9.]+\s*", text):
            hint = f'; say per what: "{text.strip()}/s"'
        r.problem(node, path, f"{text!r} is not a rate: expected {_RATE_EXAMPLE}{hint}")
        return None
    period = _PERIODS.get(m[2])
    if period is None:
        r.problem(
            node,
            path,
            f"{text!r} has an unknown unit {m[2]!r}: write /s (per second), /m (per minute)"
            " or /h (per hour)",
        )
        return None
    count = float(m[1])
    if not 0 < count <= MAX_COUNT or count / period > MAX_PER_SECOND:
        r.problem(
            node,
            path,
            f"{text!r} is out of range: expected more than 0 and at most"
            f" {MAX_PER_SECOND:g} per second",
        )
        return None
    return Rate(count=count, period=period)


def duration(r: Reader, node: Node, path: str, *, high: float) -> float | None:
    """Seconds greater than 0 and at most ``high``: a number, or a number
    with a unit (ms, s, m, h)."""
    text = r.text(node, path, what=_DURATION_EXAMPLE, raw=True)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        m = _DURATION_RE.fullmatch(text.lower())
        if m is None:
            r.problem(
                node,
                path,
                f"{text!r} is not a duration: expected {_DURATION_EXAMPLE}, at most"
                f" {high:g} seconds",
            )
            return None
        value = float(m[1]) * _DURATION_UNITS[m[2]]
    if not (math.isfinite(value) and 0 < value <= high):
        r.problem(
            node,
            path,
            f"{text!r} is out of range: expected more than 0 and at most {high:g} seconds",
        )
        return None
    return value


def limits(r: Reader, node: Node, path: str, *, http: bool) -> Limits | None:
    """``limits:``; ``http`` says whether the rule has an ``http:`` section
    (``requests`` counts HTTP requests, which only such a rule reads)."""
    section = r.mapping(node, path, what="limits", allowed=_LIMITS_KEYS)
    if section is None:
        return None
    if not section:
        r.problem(node, path, "empty limits: give connections, rate or requests, or remove limits")
        return None
    connections = r.field(section, path, "connections", _count, default=None)
    got_rate = r.field(section, path, "rate", rate, default=None)
    burst = r.field(section, path, "burst", _count, default=None)
    if "burst" in section and "rate" not in section:
        r.problem(
            section["burst"][0],
            join(path, "burst"),
            "burst is the size of the rate's token bucket, and there is no rate: add"
            ' rate (like "20/s"), or remove burst',
        )
    requests: Rate | None = None
    requests_burst: int | None = None
    if "requests" in section:
        r_key, r_node = section["requests"]
        r_path = join(path, "requests")
        if isinstance(r_node, MappingNode):
            sub = r.mapping(r_node, r_path, what="a request limit", allowed=_REQUESTS_KEYS)
            if sub is not None:
                r.require(r_node, r_path, sub, {"rate": f"expected {_RATE_EXAMPLE}"})
                requests = r.field(sub, r_path, "rate", rate, default=None)
                requests_burst = r.field(sub, r_path, "burst", _count, default=None)
        else:
            requests = rate(r, r_node, r_path)
        if not http:
            r.problem(
                r_key,
                r_path,
                "requests limits HTTP requests, which the proxy only reads for a rule with"
                " an http section: add http, or limit connections with rate",
            )
    return Limits(
        connections=connections,
        rate=got_rate,
        burst=burst,
        requests=requests,
        requests_burst=requests_burst,
        per=r.field(section, path, "per", _per, default=Scope.RULE),
    )


def breaker(r: Reader, node: Node, path: str) -> Breaker | None:
    """``breaker: {consecutive_failures: N, open_for: 30s}``."""
    section = r.mapping(node, path, what="a circuit breaker", allowed=_BREAKER_KEYS)
    if section is None:
        return None
    r.require(
        node,
        path,
        section,
        {
            "consecutive_failures": "expected how many failures in a row open the breaker (like 5)",
            "open_for": f"expected how long it stays open: {_DURATION_EXAMPLE}",
        },
    )
    failures = r.field(section, path, "consecutive_failures", fields.integer_in(1, 10000), None)

    def open_for(r: Reader, node: Node, path: str) -> float | None:
        return duration(r, node, path, high=MAX_OPEN_FOR)

    opened = r.field(section, path, "open_for", open_for, None)
    if failures is None or opened is None:
        return None
    return Breaker(consecutive_failures=failures, open_for=opened)


def traffic_controls(
    r: Reader, rule: Fields, path: str, act: Action | None
) -> tuple[Limits | None, Breaker | None]:
    """An egress rule's ``limits`` and ``breaker`` (``act``: its action,
    None when it has none that could be read)."""
    got_limits: Limits | None = None
    got_breaker: Breaker | None = None
    if "limits" in rule:
        got_limits = limits(r, rule["limits"][1], join(path, "limits"), http="http" in rule)
    if "breaker" in rule:
        got_breaker = breaker(r, rule["breaker"][1], join(path, "breaker"))
    if act is Action.DENY:
        for key in ("limits", "breaker"):
            if key in rule:
                r.problem(
                    rule[key][0],
                    join(path, key),
                    f"{key} applies to allow rules only: a denied flow is refused already;"
                    " remove it, or make the rule allow",
                )
        return None, None
    return got_limits, got_breaker
