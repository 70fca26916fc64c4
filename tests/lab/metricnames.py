"""The names and labels of the agent's ``/metrics``, as tests check them."""

from __future__ import annotations

# Every family /metrics has shown since the format was first documented:
# name -> (type, label names in the order the text shows them: sorted).
# Dashboards and alert rules depend on these; a new metric is added here, an
# existing one never changes.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "egress_agent_policy_generation": ("gauge", ()),
    "egress_agent_reloads_total": ("counter", ("result",)),
    "egress_agent_last_reload_failed": ("gauge", ()),
    "egress_agent_kernel_in_sync": ("gauge", ()),
    "egress_agent_drift_repairs_total": ("counter", ()),
    "egress_agent_ready": ("gauge", ()),
    "egress_agent_diverted_packets_total": ("counter", ("chain", "rule")),
    "egress_agent_diverted_bytes_total": ("counter", ("chain", "rule")),
    "egress_agent_dropped_packets_total": ("counter", ("reason", "rule")),
    "egress_agent_dropped_bytes_total": ("counter", ("reason", "rule")),
    "egress_agent_bpf_non_tcp_marked_packets_total": ("counter", ("rule",)),
    "egress_agent_bpf_non_tcp_marked_bytes_total": ("counter", ("rule",)),
    "egress_agent_bpf_verdicts_total": ("counter", ("reason",)),
    "egress_agent_bpf_marked_packets_total": ("counter", ("workload",)),
    "egress_agent_bpf_marked_bytes_total": ("counter", ("workload",)),
    "egress_agent_bpf_bypassed_packets_total": ("counter", ("workload",)),
    "egress_agent_bpf_bypassed_bytes_total": ("counter", ("workload",)),
    "egress_agent_connections_open": ("gauge", ()),
    "egress_agent_connections_total": ("counter", ("event", "verdict")),
    "egress_agent_rule_connections_total": ("counter", ("rule", "verdict", "workload")),
    "egress_agent_audit_denies_total": ("counter", ("rule", "workload")),
    "egress_agent_bytes_total": ("counter", ("direction",)),
    "egress_agent_audit_write_errors_total": ("counter", ()),
    "egress_agent_connections_refused_total": ("counter", ("cap", "workload")),
    "egress_agent_connections_max": ("gauge", ()),
    "egress_agent_relay_connections_total": ("counter", ("relay",)),
    "egress_agent_relay_fallbacks_total": ("counter", ("reason",)),
    "egress_agent_relay_kernel_open": ("gauge", ()),
    "egress_agent_listener_restarts_total": ("counter", ()),
    "egress_agent_connect_connections_total": ("counter", ("event", "verdict")),
    "egress_agent_http_requests_total": ("counter", ("rule", "status")),
    "egress_agent_dns_queries_total": ("counter", ("result",)),
    "egress_agent_dns_lookups_total": ("counter", ("result",)),
    "egress_agent_dns_cache_names": ("gauge", ()),
    "egress_agent_limited_total": ("counter", ("limit", "rule", "workload")),
    "egress_agent_breaker_state": ("gauge", ("destination", "rule", "state")),
    "egress_agent_breaker_transitions_total": ("counter", ("destination", "rule", "to")),
}
