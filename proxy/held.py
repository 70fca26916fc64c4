"""A connection allowed without a name, made early, its client held.

When the verdict for a destination does not need the server name (a literal
host's address, or a later rule allows the flow anyway), the proxy connects
upstream at once so that a server that speaks first (SMTP's greeting, SSH's
banner) is not kept waiting: the server's bytes reach the client, and the
client's bytes are held until its first message has been looked at. If that
message names a server, the connection is decided again with that name, and
refused -- both sides reset, not a byte of the client's sent upstream -- unless
the name is allowed *at this destination*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from egress_agent.policy.model import Action, Verdict
from egress_agent.proxy import controls, handoff
from egress_agent.proxy.audit import Event
from egress_agent.proxy.peek import Peeked, Protocol
from egress_agent.proxy.relay import start_relay, wire_downstream

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection


async def connect_then_check(conn: Connection, nameless: Verdict) -> None:
    """Connect upstream at once, let the server's bytes reach the client,
    and hold the client's until its first message is known: a flow
    without a name stays allowed; one whose message names a server is
    decided again with that name, and refused (both sides reset) unless
    the name is allowed *at this destination*."""
    assert conn.dst is not None
    settings = conn.policy.proxy
    conn.verdict = nameless
    limited = controls.admit_flow(conn)
    if limited is not None:
        controls.refuse_flow(conn, limited)
        return
    conn.holding = True
    failure = await conn.dial()
    if failure is not None:
        conn.fail(failure)
        return
    if conn.client_left():
        return
    assert conn.upstream is not None
    wire_downstream(conn)
    try:
        peeked = await conn.first_message(settings.peek_bytes, settings.peek_timeout)
    except ValueError as exc:
        refuse_held(conn, f"malformed first bytes: {exc}", event="failed")
        return
    except TimeoutError:
        refuse_held(
            conn,
            f"first message incomplete after {settings.peek_timeout:g}s"
            f" ({len(conn.buffer)} bytes received)",
            event="failed",
        )
        return
    conn.peeked = peeked
    if peeked is not None and peeked.server_name is not None:
        named = await conn.verdict_for(peeked.server_name)
        refusal = named_refusal(conn, nameless, named, peeked)
        if refusal is not None:
            conn.verdict = (
                named
                if named.action is Action.DENY
                else Verdict(action=Action.DENY, rule=named.rule, workload=conn.workload)
            )
            refuse_held(conn, refusal, event="denied")
            return
        conn.verdict = named
    if conn.upstream.lost or conn.client.lost:
        # The server said its piece and closed, the client left, or the
        # idle timeout ended it (the error says which).
        conn.holding = False
        conn.event = "closed"
        conn.close_both()
        return
    if peeked is not None and peeked.protocol is Protocol.HTTP and conn.verdict.by_name:
        if conn.bytes_down:
            refuse_held(
                conn,
                "an HTTP request on a connection whose server spoke first: the requests"
                " cannot be checked one by one",
                event="denied",
            )
            return
        upstream, conn.upstream = conn.upstream, None
        conn.holding = False
        await handoff.serve_http(conn, handoff.PASS_THROUGH, upstream=upstream)
        return
    conn.holding = False
    conn.event = "closed"
    start_relay(conn)


def named_refusal(
    conn: Connection, nameless: Verdict, named: Verdict, peeked: Peeked
) -> str | None:
    """Why a connection made early (allowed without a name) cannot go on
    once its first message names a server, or None if it can."""
    assert conn.dst is not None
    what = "SNI" if peeked.protocol is Protocol.TLS else "Host"
    name = peeked.server_name
    if named.action is Action.DENY:
        why = f": {named.reason}" if named.reason else ""
        return f"{what} {name} is denied by rule {named.rule}{why}"
    if named.upstream is not None and named.upstream != conn.dst.address:
        return (
            f"{what} {name} is allowed by rule {named.rule} only at its own addresses,"
            f" and {conn.dst.address} is not one of them (the connection was made as a"
            f" flow without a name, allowed by rule {nameless.rule})"
        )
    if named.http is not None:
        return (
            f"{what} {name} is served by rule {named.rule} (http:), but the connection"
            f" was made as a flow without a name (rule {nameless.rule})"
        )
    if (named.via, named.source) != (nameless.via, nameless.source):
        return (
            f"{what} {name} is allowed by rule {named.rule} only from its source or through"
            f" its gateway, but the connection was made as a flow without a name (rule"
            f" {nameless.rule}), which leaves another way"
        )
    return None


def refuse_held(conn: Connection, reason: str, *, event: Event) -> None:
    """Refuse a connection whose client bytes were held: none went up;
    reset both sides."""
    conn.holding = False
    conn.event = event
    conn.error = reason
    if conn.upstream is not None and conn.upstream.transport is not None:
        conn.upstream.transport.abort()
    conn.reset_client()
