"""The connections the proxy holds open now, as plain data (``/flows``).

The registry is the proxy's own set of open connections (which the idle
sweep and the caps already keep); listing it costs nothing per connection.
Each flow is the audit record the connection would write if it ended now
(so its fields mean the same as there: workload, src, dst, server_name,
rule, verdict, bytes each way) without ``event``, ``error`` and
``duration_ms``, plus ``state`` (``deciding``: not yet decided; ``open``:
relayed), ``age_s``, ``idle_s`` and ``relay`` (who moves the bytes: ``kernel``,
``userspace``, or the kernel one way only; null while deciding and for
connections an ``http`` rule serves). Bytes are the relay's counters, kept
by the kernel relay too as it delivers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from egress_agent.proxy.audit import AuditRecord

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection

# Audit record fields a flow leaves out: they are only known at the end.
_AT_END = {"event", "error", "duration_ms"}
_FLOW_FIELDS = tuple(name for name in AuditRecord.__dataclass_fields__ if name not in _AT_END)


def open_flows(connections: Iterable[Connection], *, now: float) -> list[dict[str, Any]]:
    """The open ``connections``, oldest first; ``now`` is the event loop's time."""
    flows = []
    for conn in sorted(connections, key=lambda c: c.started_mono):
        if conn.finished:
            continue
        record = conn.record()
        flow: dict[str, Any] = {name: getattr(record, name) for name in _FLOW_FIELDS}
        flow["state"] = "deciding" if conn.verdict is None else "open"
        flow["age_s"] = round(now - conn.started_mono, 3)
        flow["idle_s"] = round(now - conn.last_activity, 3)
        flow["relay"] = (
            conn.kernel.kind
            if conn.kernel is not None
            else ("userspace" if conn.relaying else None)
        )
        flows.append(flow)
    return flows
