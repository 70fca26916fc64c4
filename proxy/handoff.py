"""Handing a decided connection to the HTTP relay (``httprelay``).

An ``http`` rule's connection, plain HTTP allowed by a rule's hosts (served
without rewriting anything, so that every request's Host is decided, not only
the first one's), and a malformed request head where an ``http`` rule would
have served the connection (answered 400): the HTTP relay takes over the
client's transport and this connection's record gets its totals.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from egress_agent.policy.decide import candidate_rule
from egress_agent.policy.model import Action, HttpRule
from egress_agent.proxy import controls, httpmessage, httprelay
from egress_agent.proxy.audit import RequestRecord, rfc3339
from egress_agent.proxy.peek import Protocol
from egress_agent.proxy.peek_http import HTTP_STARTS
from egress_agent.proxy.relay import Half
from egress_agent.proxy.streams import TcpStream, take_over

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection

# Plain HTTP allowed by a rule's hosts is served by the HTTP relay without
# rewriting anything, so that every request's Host is checked.
PASS_THROUGH = HttpRule()


async def refuse_malformed_http(conn: Connection, exc: ValueError) -> bool:
    """Answer a malformed HTTP request head with 400 when an http rule
    would have served the connection; False when that is not the case."""
    assert conn.src is not None and conn.dst is not None
    rule = candidate_rule(
        conn.policy, workload=conn.workload, dst=conn.dst.address, dst_port=conn.dst.port
    )
    transport = conn.client.transport
    if (
        rule is None
        or rule.http is None
        or rule.action is not Action.ALLOW
        or transport is None
        or not bytes(conn.buffer[:16]).startswith(HTTP_STARTS)
    ):
        return False
    conn.event = "failed"
    conn.error = f"malformed HTTP request: {exc}"
    conn.requests = 1
    conn.bytes_up = len(conn.buffer)
    body = httpmessage.error_response(400, conn.error)
    conn.bytes_down += len(body)
    conn.server.audit.write_request(
        RequestRecord(
            time=rfc3339(time.time()), connection=conn.id, src=str(conn.src),
            workload=conn.workload, dst=str(conn.dst), upstream=None, rule=rule.name,
            method=None, host=None, path=None, status=400, bytes_up=len(conn.buffer),
            bytes_down=len(body), duration_ms=0.0, error=conn.error,
        )
    )  # fmt: skip
    try:
        await httprelay.refuse(transport, body, idle=conn.policy.proxy.idle_timeout)
    finally:
        conn.client.lost = True  # the relay took the transport over and closed it
    return True


async def serve_http(conn: Connection, rule: HttpRule, *, upstream: Half | None = None) -> None:
    """Hand the connection to the HTTP relay (see ``httprelay``);
    ``upstream`` is a connection already made to the destination."""
    assert conn.src is not None and conn.dst is not None and conn.verdict is not None
    peeked = conn.peeked
    tls = peeked is not None and peeked.protocol is Protocol.TLS
    transport = conn.client.transport
    if tls and rule.client_tls is None:
        conn.event = "denied"
        conn.error = "http rule needs plaintext HTTP or client_tls (the client speaks TLS)"
        conn.reset_client()
        return
    if peeked is not None and peeked.protocol is Protocol.TCP:
        conn.event = "denied"
        conn.error = "http rule needs HTTP (or TLS with client_tls); the client sent other bytes"
        conn.reset_client()
        return
    assert transport is not None
    verdict = conn.verdict

    async def decide_host(host: str | None) -> httprelay.HostDecision:
        decided = await conn.verdict_for(host)
        return httprelay.HostDecision(
            rule=decided.rule if decided.action is Action.ALLOW else None,
            address=decided.upstream,
            reason=decided.reason,
        )

    settings = conn.policy.proxy
    served = httprelay.HttpConnection(
        conn_id=conn.id,
        src=conn.src,
        dst=conn.dst,
        workload=conn.workload,
        rule=verdict.rule,
        http=rule,
        pass_through=rule is PASS_THROUGH,
        tls=tls,
        decide_host=decide_host,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.idle_timeout,
        upstream_mark=settings.upstream_mark,
        audit=conn.server.audit,
        resources=conn.server.http,
        touch=conn.touch,
        traffic=controls.RuleTraffic(
            state=conn.server.traffic, rule=verdict.rule, workload=conn.workload,
            by_name=verdict.by_name, http=rule is not PASS_THROUGH, now=conn.loop.time,
        ),
    )  # fmt: skip
    conn.event = "closed"
    conn.requests = 0
    initial = bytes(conn.buffer)
    conn.buffer.clear()
    early: TcpStream | None = None
    if upstream is not None and upstream.transport is not None:
        early = take_over(upstream.transport, idle=settings.idle_timeout, touch=conn.touch)
        if upstream.eof:
            early.reader.feed_eof()  # it closed already: the relay connects anew
    try:
        await httprelay.serve(served, transport, initial, upstream=early)
    finally:
        # The relay owned the client transport and has closed it.
        conn.client.lost = True
        conn.requests = served.requests
        conn.bytes_up += served.bytes_up
        conn.bytes_down += served.bytes_down
        conn.error = conn.error or served.error
        if served.denied:
            conn.event = "denied"
        elif served.forwarded == 0 and served.error is not None:
            conn.event = "failed"  # no request ever reached the server
