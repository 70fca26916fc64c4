"""The node-wide settings: ``proxy:`` (its addresses, ports, marks, timeouts
and limits), ``dns:`` (the proxy's name cache), ``on_reload:``, ``fail:`` and
``reverse_path:``."""

from __future__ import annotations

from yaml.nodes import Node, ScalarNode

from egress_agent.policy import fields
from egress_agent.policy.model import (
    RELAY_KERNEL,
    RELAY_USERSPACE,
    DnsSettings,
    ProxySettings,
    ReversePath,
)
from egress_agent.policy.yamlnodes import Read, Reader, join

_PROXY_KEYS = (
    "port",
    "address_v4",
    "address_v6",
    "upstream_mark",
    "divert_mark",
    "cgroup_mark_mask",
    "peek_bytes",
    "peek_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_workload",
    "relay",
)
_DNS_KEYS = ("min_ttl", "max_ttl", "serve_stale", "timeout", "cache_size")
_ON_RELOAD_KEYS = ("denied_connections",)
_REVERSE_PATH_KEYS = ("interfaces",)
_MARK = fields.integer_in(1, 0xFFFFFFFF, hex_=True)
_CONNECTIONS = fields.integer_in(1, 1_000_000)


def proxy(r: Reader, node: Node, path: str) -> ProxySettings:
    settings = r.mapping(node, path, what="proxy settings", allowed=_PROXY_KEYS)
    defaults = ProxySettings()
    if settings is None:
        return defaults

    address_v4 = r.field(settings, path, "address_v4", fields.ipv4_address, defaults.address_v4)
    address_v6 = r.field(settings, path, "address_v6", fields.ipv6_address, defaults.address_v6)
    upstream_mark = r.field(settings, path, "upstream_mark", _MARK, defaults.upstream_mark)
    divert_mark = r.field(settings, path, "divert_mark", _MARK, defaults.divert_mark)
    cgroup_mark_mask = r.field(settings, path, "cgroup_mark_mask", _MARK, defaults.cgroup_mark_mask)
    for other, mark in (("upstream_mark", upstream_mark), ("divert_mark", divert_mark)):
        if cgroup_mark_mask & mark and "cgroup_mark_mask" in settings:
            r.problem(
                settings["cgroup_mark_mask"][1],
                join(path, "cgroup_mark_mask"),
                f"cgroup_mark_mask {cgroup_mark_mask:#x} shares bits with {other}"
                f" {mark:#x}: give the cgroup workloads' marks bits of their own",
            )
    max_connections = r.field(
        settings, path, "max_connections", _CONNECTIONS, defaults.max_connections
    )
    per_workload = r.field(
        settings,
        path,
        "max_connections_per_workload",
        _CONNECTIONS,
        defaults.max_connections_per_workload,
    )
    if per_workload > max_connections and "max_connections_per_workload" in settings:
        r.problem(
            settings["max_connections_per_workload"][1],
            join(path, "max_connections_per_workload"),
            f"max_connections_per_workload {per_workload} is above max_connections"
            f" {max_connections}: no workload could reach it; lower it or raise"
            " max_connections",
        )

    def seconds(key: str, high: float, default: float) -> float:
        return r.field(settings, path, key, fields.seconds_up_to(high), default)

    return ProxySettings(
        port=r.field(settings, path, "port", fields.port, defaults.port),
        address_v4=address_v4,
        address_v6=address_v6,
        upstream_mark=upstream_mark,
        divert_mark=divert_mark,
        cgroup_mark_mask=cgroup_mark_mask,
        peek_bytes=r.field(
            settings, path, "peek_bytes", fields.integer_in(512, 65536), defaults.peek_bytes
        ),
        peek_timeout=seconds("peek_timeout", 60, defaults.peek_timeout),
        connect_timeout=seconds("connect_timeout", 300, defaults.connect_timeout),
        idle_timeout=seconds("idle_timeout", 86400, defaults.idle_timeout),
        max_connections=max_connections,
        max_connections_per_workload=min(per_workload, max_connections),
        relay=r.field(settings, path, "relay", _relay, defaults.relay),
    )


def dns(r: Reader, node: Node, path: str) -> DnsSettings:
    """``dns: {min_ttl, max_ttl, serve_stale, timeout, cache_size}``."""
    settings = r.mapping(node, path, what="DNS settings", allowed=_DNS_KEYS)
    defaults = DnsSettings()
    if settings is None:
        return defaults

    min_ttl = r.field(settings, path, "min_ttl", fields.seconds_up_to(3600), defaults.min_ttl)
    max_ttl = r.field(settings, path, "max_ttl", fields.seconds_up_to(86400), defaults.max_ttl)
    if max_ttl < min_ttl and "max_ttl" in settings:
        r.problem(
            settings["max_ttl"][1],
            join(path, "max_ttl"),
            f"max_ttl {max_ttl:g} is below min_ttl {min_ttl:g}: the ceiling on TTLs must"
            " be at least the floor",
        )
    elif max_ttl < min_ttl:
        r.problem(
            settings["min_ttl"][1],
            join(path, "min_ttl"),
            f"min_ttl {min_ttl:g} is above max_ttl ({max_ttl:g}, the default): set a"
            " max_ttl of at least the floor too",
        )
    cache_size = r.field(
        settings, path, "cache_size", fields.integer_in(16, 1_000_000), defaults.cache_size
    )
    return DnsSettings(
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        serve_stale=r.field(
            settings, path, "serve_stale", _zero_or_seconds_up_to(86400), defaults.serve_stale
        ),
        timeout=r.field(settings, path, "timeout", fields.seconds_up_to(60), defaults.timeout),
        cache_size=cache_size,
    )


def _zero_or_seconds_up_to(high: float) -> Read[float]:
    """Like :func:`~egress_agent.policy.fields.seconds_up_to`, where 0 is
    allowed too (it turns the feature off)."""

    def read(r: Reader, node: Node, path: str) -> float | None:
        if isinstance(node, ScalarNode) and node.value in ("0", "0.0"):
            return 0.0
        return fields.seconds(r, node, path, high=high)

    return read


def on_reload(r: Reader, node: Node, path: str) -> bool:
    """``on_reload: {denied_connections: keep | close}``; True means close."""
    settings = r.mapping(node, path, what="reload settings", allowed=_ON_RELOAD_KEYS)
    if settings is None:
        return False
    return r.field(settings, path, "denied_connections", _denied_connections, default=False)


# ``on_reload.denied_connections``; True means close.
_denied_connections = fields.one_of(
    {"keep": False, "close": True},
    what="keep or close",
    expected="expected keep (open connections run until they end) or close (connections"
    " the new policy denies are closed),",
)
# ``proxy.relay``: who moves a relayed connection's bytes once it is decided.
_relay = fields.one_of(
    {RELAY_KERNEL: RELAY_KERNEL, RELAY_USERSPACE: RELAY_USERSPACE},
    what="kernel or userspace",
    expected="expected kernel (bytes move socket to socket in the kernel, with splice(2);"
    " the default) or userspace (the proxy copies them itself),",
)
# ``fail: closed | open``; True means open.
fail = fields.one_of(
    {"closed": False, "open": True},
    what="closed or open",
    expected="expected closed (diverted traffic is refused while the agent is not running;"
    " the default) or open (it goes direct),",
)


def reverse_path(r: Reader, node: Node, path: str) -> ReversePath:
    """``reverse_path: {interfaces: [name or name*, ...]}``."""
    settings = r.mapping(node, path, what="reverse-path check settings", allowed=_REVERSE_PATH_KEYS)
    if settings is None:
        return ReversePath()
    names: list[str] = r.field(settings, path, "interfaces", _interface_patterns, default=[])
    return ReversePath(interfaces=tuple(dict.fromkeys(names)))


def _interface_patterns(r: Reader, node: Node, path: str) -> list[str]:
    return r.items(
        node,
        path,
        what='a list of interface names or patterns ("cali*")',
        read=fields.interface_pattern,
    )
