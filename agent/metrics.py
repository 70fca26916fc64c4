"""The agent's ``/metrics``: its counters and gauges in the Prometheus text
format, written by the ``prometheus_client`` library.

Every value already lives in the agent (the reconciler, the proxy, the audit
log, the kernel's rule counters read once per scrape), so nothing is counted
twice: a collector builds the metric families from a :func:`snapshot` at
scrape time. Names and labels are an interface (dashboards and alert rules in
``deploy/monitoring`` use them): never rename one, add new ones instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egress_agent.agent.status import AgentState, snapshot
from egress_agent.policy.model import AUDIT_DENY
from egress_agent.proxy.breaker import State as BreakerState

PREFIX = "egress_agent_"


class _Families:
    """The families of one scrape, in the order they are added. The text
    format sorts each sample's labels by name, so they are declared in that
    order too."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def gauge(self, name: str, help_: str, value: float) -> None:
        family = GaugeMetricFamily(PREFIX + name, help_)
        family.add_metric([], value)
        self.families.append(family)

    def gauges(
        self,
        name: str,
        help_: str,
        labels: Iterable[str],
        samples: Iterable[tuple[Iterable[Any], float]],
    ) -> None:
        family = GaugeMetricFamily(PREFIX + name, help_, labels=list(labels))
        for values, value in samples:
            family.add_metric([str(v) for v in values], value)
        self.families.append(family)

    def counter(
        self,
        name: str,
        help_: str,
        labels: Iterable[str],
        samples: Iterable[tuple[Iterable[Any], float]],
    ) -> None:
        """A counter family; ``name`` ends in ``_total``, which the text
        format gives back to the family and its samples."""
        family = CounterMetricFamily(PREFIX + name, help_, labels=list(labels))
        for values, value in samples:
            family.add_metric([str(v) for v in values], value)
        self.families.append(family)


def families(agent: AgentState) -> list[Metric]:
    """The metric families of one scrape."""
    r = agent.reconciler
    snap = snapshot(agent)
    last = agent.last_reload
    out = _Families()
    out.gauge("policy_generation", "Generation of the policy in force.", r.generation)
    out.counter(
        "reloads_total",
        "Policy reloads by result.",
        ["result"],
        [((k,), v) for k, v in sorted(agent.reloads.items())],
    )
    out.gauge(
        "last_reload_failed",
        "1 when the last reload was refused and an older policy is in force.",
        1 if last is not None and last.error else 0,
    )
    out.gauge(
        "kernel_in_sync", "1 when the kernel holds the desired ruleset.", 1 if r.in_sync else 0
    )
    out.counter(
        "drift_repairs_total", "Times the kernel state was restored.", [], [((), r.repairs)]
    )
    out.gauge(
        "ready",
        "1 when ready (rules, proxy and discovery in place).",
        1 if snap["ready"] else 0,
    )
    # The rule counters as the snapshot read them (one read per scrape).
    for unit in ("packets", "bytes"):
        out.counter(
            f"diverted_{unit}_total",
            f"{unit.capitalize()} DNAT-ed to the proxy, by nftables chain and rule.",
            ["chain", "rule"],
            [((row["chain"], row["rule"]), row[unit]) for row in snap["diverted"]["rules"]],
        )
    for unit in ("packets", "bytes"):
        samples = [((row["reason"], row["rule"]), row[unit]) for row in snap["drops"]["rules"]]
        if unit == "packets":
            samples += [
                ((reason, "BPF classifier"), n)
                for reason, n in snap["drops"]["by_reason"].items()
                if reason.startswith("bpf_")
            ]
        out.counter(
            f"dropped_{unit}_total",
            f"{unit.capitalize()} the datapath dropped, by reason and rule"
            " (nftables rule comments; the BPF classifier's own drops have bpf_ reasons).",
            ["reason", "rule"],
            samples,
        )
    if r.bpf is not None:
        classified = r.bpf.counters()
        for unit in ("packets", "bytes"):
            out.counter(
                f"bpf_non_tcp_marked_{unit}_total",
                f"Non-TCP {unit} the BPF classifier marked for an intercept rule with"
                " non_tcp: drop (replies among them pass in nftables).",
                ["rule"],
                [
                    ((f"intercept[{index}]",), getattr(traffic, unit))
                    for index, traffic in sorted(classified.non_tcp.items())
                ],
            )
        out.counter(
            "bpf_verdicts_total",
            "Packets the BPF classifier saw, by the reason of its verdict.",
            ["reason"],
            [((reason.name.lower(),), n) for reason, n in sorted(classified.reasons.items())],
        )
        counters = r.bpf.workload_counters()
        for i, (kind, what) in enumerate(
            (
                ("packets", "marked"),
                ("bytes", "marked"),
                ("packets", "bypassed"),
                ("bytes", "bypassed"),
            )
        ):
            out.counter(
                f"bpf_{what}_{kind}_total",
                f"TCP {kind} of a workload the BPF classifier {what}"
                + (
                    " for the proxy (diverted_* counts what was DNAT-ed)."
                    if what == "marked"
                    else "."
                ),
                ["workload"],
                [((w,), v[i]) for w, v in sorted(counters.items())],
            )
    out.gauge("connections_open", "Connections the proxy holds.", snap["connections_open"])
    out.counter(
        "connections_total",
        "Finished connections by audit event and verdict.",
        ["event", "verdict"],
        sorted(agent.audit.by_outcome.items()),
    )
    out.counter(
        "rule_connections_total",
        "Finished connections by the rule that decided them ('-': none), verdict"
        " ('none': no decision was reached) and workload ('-': none).",
        ["rule", "verdict", "workload"],
        sorted(((r, v, w), n) for (w, r, v), n in agent.audit.by_rule.items()),
    )
    out.counter(
        "audit_denies_total",
        "Finished connections that a rule in audit mode (or enforce: false) would have"
        " denied and let through, by that rule ('default': the default) and workload.",
        ["rule", "workload"],
        sorted(((r, w), n) for (w, r, v), n in agent.audit.by_rule.items() if v == AUDIT_DENY),
    )
    out.counter(
        "bytes_total",
        "Bytes relayed by direction (up: client to upstream).",
        ["direction"],
        [(("up",), agent.audit.bytes_up), (("down",), agent.audit.bytes_down)],
    )
    out.counter(
        "audit_write_errors_total",
        "Audit records that could not be written (a full disk, a closed pipe).",
        [],
        [((), agent.audit.write_errors)],
    )
    if r.proxy is not None:
        out.counter(
            "connections_refused_total",
            "Connections refused because a cap on open connections was reached, by the"
            " setting (proxy.max_connections, proxy.max_connections_per_workload) and"
            " workload.",
            ["cap", "workload"],
            sorted(r.proxy.refused.items()),
        )
        out.gauge(
            "connections_max",
            "The cap on open connections in force (the policy's, or lower to fit the"
            " file descriptor limit).",
            r.proxy.max_connections,
        )
        relays = r.proxy.relays
        out.counter(
            "relay_connections_total",
            "Relayed connections by who moved their bytes: kernel (splice(2), at least one"
            " direction) or userspace (the proxy copied them).",
            ["relay"],
            [(("kernel",), relays.kernel), (("userspace",), relays.userspace)],
        )
        out.counter(
            "relay_fallbacks_total",
            "Directions of relayed connections that the kernel relay gave back to the"
            " proxy, by the error that made it (EINVAL: splice does not support the"
            " socket; EMFILE: no descriptors left for its pipes).",
            ["reason"],
            [((k,), v) for k, v in sorted(relays.fallbacks.items())],
        )
        out.gauge("relay_kernel_open", "Connections the kernel relays now.", relays.open)
        out.counter(
            "listener_restarts_total",
            "Times a listening socket was served again after the event loop stopped"
            " accepting on it.",
            [],
            [((), sum(lst.restarts for lst in r.proxy.listeners))],
        )
    out.counter(
        "connect_connections_total",
        "Finished connections of the explicit CONNECT listener by audit event and verdict.",
        ["event", "verdict"],
        sorted(agent.audit.connect_by_outcome.items()),
    )
    out.counter(
        "http_requests_total",
        "HTTP requests served by http rules (and plain HTTP allowed by hosts), by rule"
        " and status class.",
        ["rule", "status"],
        sorted(agent.audit.requests_by_outcome.items()),
    )
    if r.proxy is not None:
        resolver = r.proxy.resolver
        out.counter(
            "dns_queries_total",
            "Names asked of the resolver (A and AAAA together) by outcome: answer,"
            " nodata (no addresses), nxdomain, failed (timeout, unreachable, SERVFAIL).",
            ["result"],
            [((k,), v) for k, v in sorted(resolver.queries.items())],
        )
        out.counter(
            "dns_lookups_total",
            "Names the proxy needed for a decision, by what it got: cached, queried,"
            " stale (an expired answer while the resolver fails), failed (no address).",
            ["result"],
            [((k,), v) for k, v in sorted(resolver.lookups.items())],
        )
        out.gauge("dns_cache_names", "Names in the proxy's DNS cache.", len(resolver.cache))
        traffic = r.proxy.traffic
        out.counter(
            "limited_total",
            "Flows and HTTP requests an egress rule's traffic controls refused, by rule,"
            " workload ('-': none) and limit (connections, rate, requests, breaker).",
            ["limit", "rule", "workload"],
            sorted(((lim, rule, w), n) for (rule, w, lim), n in traffic.limited.items()),
        )
        out.gauges(
            "breaker_state",
            "1 for the state each circuit breaker is in (closed, open, half-open), 0 for"
            " the others, by rule and destination (name:port or address:port).",
            ["destination", "rule", "state"],
            [
                ((dest, rule, st.value), 1 if st is state else 0)
                for rule, dest, state in traffic.breaker_states()
                for st in BreakerState
            ],
        )
        out.counter(
            "breaker_transitions_total",
            "Circuit breaker transitions by rule, destination and the state moved to.",
            ["destination", "rule", "to"],
            sorted(((d, r_, to), n) for (r_, d, to), n in traffic.transitions.items()),
        )
    return out.families


class _AgentCollector(Collector):
    def __init__(self, agent: AgentState) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from families(self._agent)


class Metrics:
    """The registry ``/metrics`` is read from: the agent's families only (no
    process or runtime collectors, whose names would come and go with the
    library's version)."""

    def __init__(self, agent: AgentState) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_AgentCollector(agent))

    def text(self) -> str:
        return generate_latest(self._registry).decode()
