"""Audit records: exactly one JSON line per connection that reaches the proxy.

Lifecycle: a connection is accepted, decided, and then ends in exactly one
record whose ``event`` is

* ``closed`` -- it was allowed and relayed until both sides finished (or an
  idle timeout or a reset ended it; ``error`` then says which),
* ``denied`` -- the policy refused it; ``rule`` names the rule that did,
* ``failed`` -- it never got going: bad bytes, no original destination, the
  upstream refused or timed out; ``error`` says what happened.

``id`` identifies the connection within this agent process (its start time
and a counter); ``requests`` counts the HTTP requests served on a connection
an ``http:`` rule handled, or plain HTTP a rule's hosts allowed (null for
others); ``upstream`` is where the proxy connected when that is not ``dst``
(a rule with ``resolve: connect`` sends a name to its own address);
``source`` is the local address and port an upstream connection left from
(a rule with ``source:``) and ``gateway`` the proxy it went through (a rule
with ``via:``), whose refusal the ``error`` quotes.

Such connections also get one record per HTTP request, with ``event``
``request`` and the connection's ``id`` in ``connection``: method, Host, the
path without its query string (a query may carry a SAS), the status the
client got (null if none), bytes of that request and response, and ``error``.
Request records are written as each request ends, so they precede their
connection's record.

``limit`` and ``limit_value`` (connection and request records) name the
rule's traffic control that refused the flow or request, or failed it fast
(``connections``, ``rate``, ``requests``, ``breaker``), and its setting.

``policy_generation`` and ``policy_hash`` say which applied policy decided the
connection: the generation counts successful (re)loads of this agent process.

Records carry addresses, names, the rule and byte counts, never payload bytes
or credentials.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from typing import IO, Literal

log = logging.getLogger(__name__)

Event = Literal["closed", "denied", "failed"]


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    time: str  # connection start, RFC 3339 UTC
    event: Event
    src: str
    workload: str | None
    dst: str
    server_name: str | None
    protocol: str  # tls | http | tcp
    rule: str | None
    verdict: str | None  # allow | deny | None when no decision was reached
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client
    duration_ms: float
    error: str | None
    policy_generation: int  # which applied policy decided it (1 = the first)
    policy_hash: str  # sha256 of that policy file's text, first 16 hex digits
    # How the client reached the proxy: "transparent" (diverted by the rules)
    # or "connect" (the explicit CONNECT listener, which sets connect_host
    # to the request's host:port).
    via: str = "transparent"
    connect_host: str | None = None
    id: str = ""  # the connection within this process: "<start time hex>-<counter>"
    requests: int | None = None  # HTTP requests served (http rules only)
    # Where the proxy connected when that is not ``dst``: a name's own
    # address (a rule with ``resolve: connect``).
    upstream: str | None = None
    # The rule's traffic control that refused or failed the flow fast
    # (connections, rate, requests or breaker) and its setting.
    limit: str | None = None
    limit_value: str | None = None
    # A rule with ``source``: the local address:port the upstream connection
    # left from. A rule with ``via``: the gateway proxy it went through.
    source: str | None = None
    gateway: str | None = None


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """One HTTP request on a connection an ``http:`` rule handles."""

    time: str  # request start, RFC 3339 UTC
    connection: str  # the connection record's id
    src: str
    workload: str | None
    dst: str  # the original destination
    upstream: str | None  # the address the proxy sent the request to
    rule: str
    method: str | None  # None when the request line could not be parsed
    host: str | None
    path: str | None  # without the query string
    status: int | None  # what the client got; None if nothing was sent
    bytes_up: int
    bytes_down: int
    duration_ms: float
    error: str | None
    event: str = "request"
    # The traffic control that refused the request (requests or breaker)
    # and its setting.
    limit: str | None = None
    limit_value: str | None = None


_FIELD_NAMES = tuple(f.name for f in fields(AuditRecord))
_REQUEST_FIELDS = (
    "time",
    "event",
    *(f.name for f in fields(RequestRecord) if f.name not in ("time", "event")),
)


def rfc3339(ts: float) -> str:
    frac = f"{ts % 1:.6f}"[1:]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + frac + "Z"


class AuditLog:
    """Appends records as JSON lines to a file (or stdout), one write per record."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._stream: IO[str]
        if path is None or path == "-":
            self._stream = sys.stdout
            self._owned = False
        else:
            self._stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._owned = True
        self.written = 0
        # Totals for metrics: records by (event, verdict), bytes by direction.
        self.by_outcome: dict[tuple[str, str], int] = {}
        self.bytes_up = 0
        self.bytes_down = 0
        # Records of the explicit CONNECT listener by (event, verdict).
        self.connect_by_outcome: dict[tuple[str, str], int] = {}
        # HTTP request records by (rule, status class: "2xx".."5xx", or "none").
        self.requests_by_outcome: dict[tuple[str, str], int] = {}
        # Connection records by (workload, rule, verdict); "-" where none.
        self.by_rule: dict[tuple[str, str, str], int] = {}
        # Records that could not be written.
        self.write_errors = 0

    @property
    def path(self) -> str | None:
        """The file records go to; None for stdout."""
        return None if self._path in (None, "-") else self._path

    def write(self, record: AuditRecord) -> None:
        outcome = (record.event, record.verdict or "none")
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        if record.via == "connect":
            self.connect_by_outcome[outcome] = self.connect_by_outcome.get(outcome, 0) + 1
        by_rule = (record.workload or "-", record.rule or "-", record.verdict or "none")
        self.by_rule[by_rule] = self.by_rule.get(by_rule, 0) + 1
        self.bytes_up += record.bytes_up
        self.bytes_down += record.bytes_down
        # Fields are flat scalars: a plain dict avoids asdict()'s deep copy,
        # which showed up as the largest cost per connection in profiles.
        line = json.dumps(
            {name: getattr(record, name) for name in _FIELD_NAMES}, separators=(",", ":")
        )
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
            self.written += 1
        except OSError as exc:  # a full disk must not take connections down
            self.write_errors += 1
            log.error("cannot write audit record to %s: %s", self._path or "stdout", exc)

    def write_request(self, record: RequestRecord) -> None:
        status = f"{record.status // 100}xx" if record.status is not None else "none"
        key = (record.rule, status)
        self.requests_by_outcome[key] = self.requests_by_outcome.get(key, 0) + 1
        line = json.dumps(
            {name: getattr(record, name) for name in _REQUEST_FIELDS}, separators=(",", ":")
        )
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
            self.written += 1
        except OSError as exc:
            self.write_errors += 1
            log.error("cannot write audit record to %s: %s", self._path or "stdout", exc)

    def close(self) -> None:
        if self._owned:
            try:
                self._stream.close()
            except OSError as exc:  # records already counted as not written
                log.error("cannot write audit record to %s: %s", self._path, exc)
