"""The agent's own HTTP endpoint on loopback: status, liveness, readiness;
and what it reports (:func:`snapshot`; ``metrics`` writes ``/metrics``).

``GET /status`` returns the agent's state as JSON (what ``egress-agent
status`` prints); ``GET /flows`` the connections the proxy holds open now
(what ``egress-agent flows`` prints, see :func:`flows`); ``GET /metrics``
its counters as Prometheus text (the callable it is given);
``GET /healthz`` answers 200 while the event loop runs; ``GET /readyz``
answers 200 only when the kernel holds the ruleset of the current policy and
the proxy is listening, 503 otherwise. It binds to
loopback only: on a node with hostNetwork that is reachable by the kubelet's
probes and nothing else. A deliberately tiny HTTP/1.0 responder: one request
per connection, no bodies, so it needs no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from egress_agent.agent.counters import Count
from egress_agent.agent.counters import summary as counter_summary
from egress_agent.agent.desired import Observed
from egress_agent.agent.reconcile import Reconciler
from egress_agent.agent.reflector import PodWatcher
from egress_agent.policy.model import NonTcp
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.flows import open_flows
from egress_agent.rules.apply import NftablesError

log = logging.getLogger(__name__)

DEFAULT_STATUS_ADDRESS = "127.0.0.1:15021"
_MAX_REQUEST = 8192
_ENDPOINTS = "/status, /flows, /metrics, /healthz, /readyz"
_REASONS = {200: "OK", 404: "Not Found", 400: "Bad Request", 503: "Service Unavailable"}


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT such as {DEFAULT_STATUS_ADDRESS}")
    return host.strip("[]"), int(port)


class StatusServer:
    def __init__(
        self,
        *,
        snapshot: Callable[[], dict[str, Any]],
        address: str,
        metrics: Callable[[], str] | None = None,
        flows: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._flows = flows
        self._metrics = metrics
        self._host, self._port = parse_address(address)
        self._server: asyncio.Server | None = None

    async def start(self, *, retry_for: float = 0.0) -> None:
        """Listen; ``retry_for`` seconds of retries while the address is in use
        (a predecessor that handed over is closing its own status server)."""
        deadline = time.monotonic() + retry_for
        try:
            while True:
                try:
                    self._server = await asyncio.start_server(self._handle, self._host, self._port)
                    return
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve status on {self._host}:{self._port}: {exc.strerror} "
                "(choose another with --status-address)",
            ) from exc

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            content_type = "application/json"
            body: str | dict[str, Any]
            if len(parts) != 3 or parts[0] != "GET":
                code, body = 400, {"error": f"only GET {_ENDPOINTS}"}
            elif parts[1] == "/metrics" and self._metrics is not None:
                code, body = 200, self._metrics()
                content_type = "text/plain; version=0.0.4"
            else:
                code, body = self._route(parts[1])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            code, body = 400, {"error": "incomplete request"}
        if isinstance(body, str):
            payload = body.encode()
        else:
            payload = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        writer.write(
            f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    def _route(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/healthz":
            return 200, {"alive": True}
        if path == "/flows" and self._flows is not None:
            return 200, self._flows()
        snap = self._snapshot()
        if path == "/readyz":
            return (200 if snap["ready"] else 503), {
                "ready": snap["ready"],
                "reasons": snap["not_ready_because"],
            }
        if path == "/status":
            return 200, snap
        return 404, {"error": f"no such endpoint {path!r}: try {_ENDPOINTS}"}


@dataclass(frozen=True, kw_only=True)
class ReloadResult:
    applied: bool
    generation: int
    policy_hash: str
    error: str | None = None


class AgentState(Protocol):
    """What the status and the metrics are read from (``runner.Agent``)."""

    path: str
    reconciler: Reconciler
    observed: Observed
    watcher: PodWatcher | None
    audit: AuditLog
    last_reload: ReloadResult | None
    reloads: dict[str, int]
    started_at: float


def snapshot(agent: AgentState) -> dict[str, Any]:
    """What ``egress-agent status`` shows."""
    r = agent.reconciler
    reasons = []
    if not r.in_sync:
        reasons.append("kernel state differs from the policy: " + "; ".join(r.drift_problems))
    if r.proxy is None or not r.proxy.listening:
        reasons.append("proxy not listening")
    discovery: dict[str, Any] | None = None
    if agent.watcher is not None:
        pods = agent.observed.pods
        if pods is None or not pods.synced:
            reasons.append("pod discovery has not listed the pods on this node yet")
        discovery = {
            "node": agent.watcher.node_name,
            "synced": bool(pods and pods.synced),
            "pods_on_node": len(pods.pods) if pods else 0,
            "error": agent.watcher.last_error,
            "addresses": {
                w.name: [str(n) for n in w.cidrs] for w in r.policy.workloads if w.pods is not None
            },
            # The pods' host-side interfaces each pod workload is bound to
            # (empty: not bound, some pod's interface is unknown).
            "interfaces": {
                w.name: list(w.interfaces) for w in r.policy.workloads if w.pods is not None
            },
        }
    counts: dict[str, int] = {}
    for cmd in r.desired.doc["nftables"]:
        rule = cmd.get("add", {}).get("rule")
        if rule is not None:
            counts[rule["chain"]] = counts.get(rule["chain"], 0) + 1
    counted, counters_error = _counts(r)
    counters = counter_summary(counted, bpf_drops=_bpf_drops(r))
    if counters_error is not None:
        counters["error"] = counters_error
    return {
        "policy": {
            "path": agent.path,
            "generation": r.generation,
            "hash": r.desired.policy_hash,
            "workloads": len(r.policy.workloads),
            "intercept_rules": len(r.policy.intercept),
            "egress_rules": len(r.policy.egress),
            "default": r.policy.default.value,
            # enforce, or audit (enforce: false); audited: the deny rules
            # (and "default") whose denies are allowed and logged as audit-deny.
            "mode": "enforce" if r.policy.enforce else "audit",
            "audited": list(r.policy.audited()),
            # Intercept rules that drop their workloads' non-TCP traffic.
            "non_tcp_drop": [
                f"intercept[{r.index}]" for r in r.policy.intercept if r.non_tcp is NonTcp.DROP
            ],
            "reverse_path_interfaces": list(r.policy.reverse_path_interfaces()),
        },
        "diverted": counters["diverted"],
        "drops": counters["drops"],
        "counters_error": counters_error,
        "last_reload": asdict(agent.last_reload) if agent.last_reload else None,
        "datapath": "bpf" if r.bpf is not None else "nftables",
        "datapath_requested": r.datapath,
        "bpf": _bpf_snapshot(r),
        "cgroups": r.cgroups.status(),
        "fail": "open" if r.policy.fail_open else "closed",
        "discovery": discovery,
        "nft_rules_per_chain": counts,
        "kernel_in_sync": r.in_sync,
        "drift_repairs": r.repairs,
        "dns": r.proxy.resolver.status() if r.proxy else None,
        "connections_open": len(r.proxy.connections) if r.proxy else 0,
        "connection_caps": {
            "max_connections": r.proxy.max_connections,
            "max_connections_per_workload": min(
                r.policy.proxy.max_connections_per_workload, r.proxy.max_connections
            ),
            "open_by_workload": {
                (w or "-"): n
                for w, n in sorted(r.proxy.open_by_workload.items(), key=lambda i: i[0] or "")
            },
            "refused": sum(r.proxy.refused.values()),
        }
        if r.proxy
        else None,
        # Egress rules' limits (open counts, refusals) and the circuit
        # breakers that are not closed and idle.
        "traffic": r.proxy.traffic.status(r.proxy.loop.time()) if r.proxy else None,
        # Who moved the relayed connections' bytes: the kernel (splice) or
        # the proxy, and why the kernel relay fell back (see proxy.kernel_relay).
        "relay": r.proxy.relays.snapshot(mode=r.policy.proxy.relay) if r.proxy else None,
        "audit_records_written": agent.audit.written,
        "uptime_s": round(time.time() - agent.started_at, 1),
        "ready": not reasons,
        "not_ready_because": reasons,
    }


def flows(agent: AgentState) -> dict[str, Any]:
    """What ``egress-agent flows`` shows: the connections the proxy holds
    open now (see ``proxy.flows``), and where the audit records of those
    that end are written (None: stdout)."""
    proxy = agent.reconciler.proxy
    return {
        "flows": open_flows(proxy.connections, now=proxy.loop.time()) if proxy else [],
        "audit_log": agent.audit.path,
        "policy_generation": agent.reconciler.generation,
    }


def _counts(r: Reconciler) -> tuple[list[Count], str | None]:
    """The rule counters, or none and why they could not be read."""
    try:
        return r.counters.read(), None
    except NftablesError as exc:
        return [], str(exc)


def _bpf_drops(r: Reconciler) -> dict[str, int]:
    """The classifier's own drops by reason (BPF datapath only)."""
    if r.bpf is None:
        return {}
    return {r.name.lower(): n for r, n in r.bpf.counters().dropped().items()}


def _bpf_snapshot(r: Reconciler) -> dict[str, Any] | None:
    if r.bpf is None:
        return {"fallback_reason": r.bpf_fallback} if r.bpf_fallback else None
    counters = r.bpf.counters()
    return {
        **r.bpf.status(),
        "in_sync": not r.bpf.last_problems,
        "problems": r.bpf.last_problems,
        # Non-TCP the classifier marked for each non_tcp: drop rule (replies
        # among them pass in nftables; what was dropped is in `drops`).
        "non_tcp_marked": {
            f"intercept[{index}]": traffic.packets
            for index, traffic in sorted(counters.non_tcp.items())
        },
    }
