"""The reference decisions, as pure functions over a :class:`Policy`.

Three questions are answered here, and every datapath must answer them alike:

* :func:`should_divert` -- does the kernel send this new TCP flow to the proxy?
  (the nftables renderer in ``rules`` and the BPF classifier implement exactly
  this),
* :func:`non_tcp_drop` -- does the kernel drop this new non-TCP flow (an
  intercept rule with ``non_tcp: drop``)? and
* :func:`decide` -- what does the proxy do with a diverted connection?

Identity is by longest-prefix match of the source address over all workloads'
CIDRs (equal prefixes in two workloads are refused when the policy loads). A
workload bound to interfaces keeps its identity only for packets that arrived on
one of them; a packet from elsewhere with its address has no identity at all.
"""

from __future__ import annotations

import ipaddress

from egress_agent.policy.model import (
    EgressRule,
    InterceptRule,
    IPAddress,
    IPNetwork,
    NonTcp,
    Policy,
    PortRange,
    Verdict,
)


def identify(policy: Policy, src: IPAddress, *, interface: str | None = None) -> str | None:
    """The workload name that source address ``src`` belongs to, or None.

    ``interface`` is the ingress interface when known (the kernel knows it; the
    proxy does not, and passes None: it only ever sees flows the kernel already
    attributed, so the address alone identifies them).
    """
    src = _unmap(src)
    best: tuple[int, str] | None = None
    bound: tuple[str, ...] = ()
    for w in policy.workloads:
        for net in w.cidrs:
            if (
                net.version == src.version
                and src in net
                and (best is None or net.prefixlen > best[0])
            ):
                best = (net.prefixlen, w.name)
                bound = w.interfaces
    if best is None:
        return None
    if interface is not None and bound and interface not in bound:
        return None
    return best[1]


def should_divert(
    policy: Policy,
    *,
    src: IPAddress,
    dst: IPAddress,
    dst_port: int,
    interface: str | None = None,
) -> bool:
    """Whether a new TCP flow is diverted to the proxy (the kernel's decision)."""
    workload = identify(policy, src, interface=interface)
    if workload is None:
        return False
    dst = _unmap(dst)
    for rule in policy.intercept:
        if workload not in rule.sources:
            continue
        if rule.ports and not _port_in(dst_port, rule.ports):
            continue
        if rule.to_cidrs and not _addr_in(dst, rule.to_cidrs):
            continue
        if _addr_in(dst, rule.except_cidrs):
            continue
        return True
    return False


def non_tcp_drop(
    policy: Policy,
    *,
    src: IPAddress,
    dst: IPAddress,
    interface: str | None = None,
) -> InterceptRule | None:
    """The intercept rule that drops a new non-TCP flow (UDP, ICMP, any other
    protocol) from ``src`` to ``dst``, or None when it may pass.

    The first rule, in file order, with ``non_tcp: drop`` whose sources hold
    the flow's workload and whose destinations (``to_cidrs`` minus
    ``except_cidrs``) hold ``dst``; ports do not apply. Replies to flows that
    came in from outside and ICMP errors about allowed flows are not new
    flows: the kernel lets them pass whatever this says.
    """
    workload = identify(policy, src, interface=interface)
    if workload is None:
        return None
    dst = _unmap(dst)
    for rule in policy.intercept:
        if rule.non_tcp is not NonTcp.DROP or workload not in rule.sources:
            continue
        if rule.to_cidrs and not _addr_in(dst, rule.to_cidrs):
            continue
        if _addr_in(dst, rule.except_cidrs):
            continue
        return rule
    return None


def decide(
    policy: Policy,
    *,
    workload: str | None,
    dst: IPAddress,
    dst_port: int,
    server_name: str | None,
) -> Verdict:
    """The proxy's verdict: the first egress rule that matches, else the default."""
    dst = _unmap(dst)
    name = _normalise_name(server_name)
    for rule in policy.egress:
        if _matches(rule, workload=workload, dst=dst, dst_port=dst_port, server_name=name):
            return Verdict(action=rule.action, rule=rule.name, workload=workload, http=rule.http)
    return Verdict(action=policy.default, rule="default", workload=workload)


def needs_server_name(
    policy: Policy, *, workload: str | None, dst: IPAddress, dst_port: int
) -> bool:
    """Whether the verdict for this flow can depend on the server name.

    When it cannot, the proxy need not wait for the client's first bytes before
    connecting upstream: protocols where the server speaks first (SMTP, MySQL,
    SSH) then work without a peek delay. A rule with ``http:`` needs the
    first bytes too: the proxy must know whether the client speaks plain HTTP
    or TLS before it can inject anything.
    """
    rule = candidate_rule(policy, workload=workload, dst=dst, dst_port=dst_port)
    return rule is not None and (bool(rule.hosts) or rule.http is not None)


def candidate_rule(
    policy: Policy, *, workload: str | None, dst: IPAddress, dst_port: int
) -> EgressRule | None:
    """The first egress rule that matches this flow if its server name does:
    the rule that decides it unless the name sends it further down the list."""
    dst = _unmap(dst)
    for rule in policy.egress:
        if _matches_without_name(rule, workload=workload, dst=dst, dst_port=dst_port):
            return rule
    return None


def host_matches(pattern: str, name: str) -> bool:
    """``pattern`` is an exact name or ``*.suffix`` (any depth below suffix,
    not suffix itself); both compared case-insensitively, trailing dot ignored."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def _matches(
    rule: EgressRule,
    *,
    workload: str | None,
    dst: IPAddress,
    dst_port: int,
    server_name: str | None,
) -> bool:
    if not _matches_without_name(rule, workload=workload, dst=dst, dst_port=dst_port):
        return False
    if rule.hosts:
        if server_name is None:
            return False
        return any(host_matches(p, server_name) for p in rule.hosts)
    return True


def _matches_without_name(
    rule: EgressRule, *, workload: str | None, dst: IPAddress, dst_port: int
) -> bool:
    if rule.sources is not None and workload not in rule.sources:
        return False
    if rule.ports and not _port_in(dst_port, rule.ports):
        return False
    return not (rule.cidrs and not _addr_in(dst, rule.cidrs))


def _normalise_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip().lower().rstrip(".")
    return name or None


def _port_in(port: int, ranges: tuple[PortRange, ...]) -> bool:
    return any(port in r for r in ranges)


def _addr_in(addr: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


def _unmap(addr: IPAddress) -> IPAddress:
    # An IPv4 client seen through a dual-stack IPv6 socket appears as
    # ::ffff:a.b.c.d (RFC 4291 section 2.5.5.2); policy speaks of the IPv4 address.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
