"""Where the proxy applies the egress rules' traffic controls (``limits:``,
``breaker:``) to its flows: the few calls the connection pipeline and the
HTTP relay make into the state (:mod:`.traffic`), and how a refusal looks
to the client and in the audit record.

* An allowed flow is counted as open for its rule (:func:`admit_flow`)
  before anything goes upstream; over ``limits.connections`` or
  ``limits.rate`` the client's connection is reset (event ``denied``).
* Before the proxy connects upstream, the rule's breaker for the
  destination is asked (:func:`breaker_gate`); an open breaker fails the
  flow fast (event ``failed``), and the connect's result is reported
  (:func:`breaker_result`).
* HTTP requests of an ``http:`` rule take a token of ``limits.requests``
  and ask the breaker (:class:`RuleTraffic`): refused requests are answered
  429 or 503 with ``Retry-After``.

Each refusal is written into the audit record as ``limit`` (which limit)
and ``limit_value`` (its setting), with the rule in ``rule`` and the
reason in ``error``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egress_agent.policy.model import Action, IPAddress, Verdict
from egress_agent.proxy.traffic import Refusal, Ticket, TrafficState, retry_after_header

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection


def admit_flow(conn: Connection) -> Refusal | None:
    """Count the connection's allowed flow against its rule's limits; the
    refusal when it is over one (the caller refuses the client)."""
    verdict = conn.verdict
    if verdict is None or verdict.action is not Action.ALLOW or conn.lease is not None:
        return None
    got = conn.server.traffic.open_flow(verdict.rule, conn.workload, conn.loop.time())
    if isinstance(got, Refusal):
        conn.refusal = got
        return got
    conn.lease = got
    return None


def refuse_flow(conn: Connection, refusal: Refusal) -> None:
    """Reset the client of a flow a limit refused; its record says which."""
    conn.event = "denied"
    conn.verdict = Verdict(action=Action.DENY, rule=refusal.rule, workload=conn.workload)
    conn.error = refusal.message
    conn.reset_client()


def release_flow(conn: Connection) -> None:
    """The connection ended: it no longer counts as open, and a breaker
    probe it held without a result frees its place."""
    if conn.lease is not None:
        conn.server.traffic.release(conn.lease)
        conn.lease = None
    if conn.ticket is not None:
        conn.server.traffic.report(conn.ticket, None, conn.loop.time())
        conn.ticket = None


def destination(name: str | None, address: IPAddress, port: int, *, by_name: bool) -> str:
    """A breaker's destination: ``name:port`` for a flow allowed by its
    name, else ``address:port``."""
    if by_name and name:
        return f"{name}:{port}"
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"


def breaker_gate(conn: Connection, address: IPAddress, port: int) -> str | None:
    """Ask the breaker of the connection's rule whether it may connect to
    ``address``:``port``: None to go ahead (the result is reported with
    :func:`breaker_result`), else why it fails fast."""
    verdict = conn.verdict
    if verdict is None or not conn.server.traffic.has_breaker(verdict.rule):
        return None
    name = conn.peeked.server_name if conn.peeked is not None else None
    where = destination(name, address, port, by_name=verdict.by_name)
    got = conn.server.traffic.enter(verdict.rule, conn.workload, where, conn.loop.time())
    if isinstance(got, Refusal):
        conn.refusal = got
        return got.message
    conn.ticket = got
    conn.refusal = None  # another address of the flow may have failed fast before
    return None


def breaker_result(conn: Connection, ok: bool) -> None:
    if conn.ticket is not None:
        conn.server.traffic.report(conn.ticket, ok, conn.loop.time())
        conn.ticket = None


@dataclass(kw_only=True)
class RuleTraffic:
    """The traffic controls as the HTTP relay meets them, for one
    connection's rule and workload."""

    state: TrafficState
    rule: str
    workload: str | None
    by_name: bool  # the rule allowed the connection by its name
    http: bool  # an http: rule (a 5xx is a failure); False: plain HTTP passed through
    now: Callable[[], float]

    def request(self) -> Refusal | None:
        """A token of ``limits.requests`` for one request, or the refusal."""
        return self.state.take_request(self.rule, self.workload, self.now())

    def enter(self, host: str | None, address: IPAddress, port: int) -> Ticket | Refusal | None:
        where = destination(host, address, port, by_name=self.by_name)
        return self.state.enter(self.rule, self.workload, where, self.now())

    def report(self, ticket: Ticket, ok: bool | None) -> None:
        self.state.report(ticket, ok, self.now())


def refusal_response(refusal: Refusal, *, close: bool) -> tuple[int, bytes]:
    """The proxy's own answer to a refused request: 429 for a limit, 503
    for an open breaker, with ``Retry-After`` (RFC 9110 section 10.2.3) in
    whole seconds; the status and the bytes."""
    status, reason = (503, "Service Unavailable") if refusal.limit == "breaker" else (
        429, "Too Many Requests",
    )  # fmt: skip
    body = f"egress-agent: {refusal.message}\n".encode("utf-8", "replace")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if refusal.retry_after is not None or status == 429:
        lines.append(f"Retry-After: {retry_after_header(refusal.retry_after)}")
    if close:
        lines.append("Connection: close")
    return status, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
