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

Writes are grouped (a group commit): records written while the event loop
runs are queued in order and written together, whole lines in one
``write(2)``, at most :data:`FLUSH_DELAY` seconds after the first of them
(or at once when :data:`FLUSH_LINES` are queued). Many connections ending in
one loop turn cost one system call instead of one each. ``flush`` and
``close`` write what is queued, so stopping (SIGTERM) or handing over to a
successor loses nothing; the file is opened ``O_APPEND``, so a predecessor's
and a successor's groups never interleave within a line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import IO, Literal

log = logging.getLogger(__name__)

Event = Literal["closed", "denied", "failed"]

# A group of records is written at most this long after its first record...
FLUSH_DELAY = 0.002
# ...or at once when this many records are waiting.
FLUSH_LINES = 256


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
    """Appends records as JSON lines to a file (or stdout), grouped per loop
    turn (see the module docstring); ``delay`` 0 writes each record at once."""

    def __init__(self, path: str | None, *, delay: float = FLUSH_DELAY) -> None:
        self._path = path
        self._stream: IO[str] | None = None
        self._fd: int | None = None
        if path is None or path == "-":
            self._stream = sys.stdout
        else:
            # Unbuffered and appending: each group is one write(2) at the end
            # of the file, whoever else (a handover's other process) appends.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._delay = delay
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
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
        # Groups written (write(2) calls), for the benchmark's profile notes.
        self.flushes = 0

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
        self._queue(
            json.dumps(
                {name: getattr(record, name) for name in _FIELD_NAMES}, separators=(",", ":")
            )
        )

    def write_request(self, record: RequestRecord) -> None:
        status = f"{record.status // 100}xx" if record.status is not None else "none"
        key = (record.rule, status)
        self.requests_by_outcome[key] = self.requests_by_outcome.get(key, 0) + 1
        self._queue(
            json.dumps(
                {name: getattr(record, name) for name in _REQUEST_FIELDS}, separators=(",", ":")
            )
        )

    def _queue(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) >= FLUSH_LINES or self._delay <= 0:
            self.flush()
            return
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): no one to flush later
                self.flush()
                return
            self._timer = loop.call_later(self._delay, self.flush)

    def flush(self) -> None:
        """Write every queued record now, in order, whole lines in one write."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        count = len(self._pending)
        self._pending.append("")  # the last line's newline
        text = "\n".join(self._pending)
        self._pending.clear()
        try:
            if self._fd is not None:
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(self._fd, data) :]
            elif self._stream is not None:
                self._stream.write(text)
                self._stream.flush()
            else:
                raise OSError(f"the audit log was closed; {count} record(s) came after")
            self.written += count
            self.flushes += 1
        except OSError as exc:  # a full disk must not take connections down
            self.write_errors += count
            log.error(
                "cannot write %d audit record(s) to %s: %s", count, self._path or "stdout", exc
            )

    def close(self) -> None:
        """Write what is queued and close the file (the agent does this last,
        once every connection has its record; a record written later is
        counted in ``write_errors``)."""
        self.flush()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._stream = None
