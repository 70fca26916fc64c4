"""The reference decisions, as pure functions over a :class:`Policy`.

Three questions are answered here, and every datapath must answer them alike:

* :func:`should_divert` -- does the kernel send this new TCP flow to the proxy?
  (the nftables renderer in ``rules`` and the BPF classifier implement exactly
  this),
* :func:`non_tcp_drop` -- does the kernel drop this new non-TCP flow (an
  intercept rule with ``non_tcp: drop``)? and
* :func:`decide` -- what does the proxy do with a diverted connection?

Names are bound to addresses: an allow rule that matches by server name (TLS
SNI, HTTP Host) matches only when the original destination is one of that
name's addresses (``resolve: verify``, the default), or re-targets the
connection to one of them (``resolve: connect``); ``resolve: none`` trusts the
name alone. A literal host also matches a flow that carries no name at all
when the flow is headed to one of that host's addresses. The addresses are
*data* here: the proxy resolves the names :func:`names_to_resolve` lists and
hands the answers in, so every decision stays a pure function.

Identity is by longest-prefix match of the source address over all workloads'
CIDRs (equal prefixes in two workloads are refused when the policy loads). A
workload bound to interfaces keeps its identity only for packets that arrived on
one of them; a packet from elsewhere with its address has no identity at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from egress_agent.policy.model import (
    Action,
    EgressRule,
    InterceptRule,
    IPAddress,
    IPNetwork,
    NonTcp,
    Policy,
    PortRange,
    Resolution,
    Resolve,
    Verdict,
)

# Addresses a refusal names at most (a CDN name may have dozens).
_SHOWN_ADDRESSES = 6


@dataclass(frozen=True, kw_only=True)
class SourceIndex:
    """The workloads' CIDRs by prefix length, for :func:`identify`: made once
    per policy (a proxy identifies every connection; scanning every workload's
    CIDRs each time cost in proportion to the workloads, with ipaddress
    objects at that)."""

    # (IP version, prefix length) -> network address as int -> (name, interfaces),
    # lengths longest first.
    tables: tuple[tuple[int, int, dict[int, tuple[str, tuple[str, ...]]]], ...]
    has_cgroups: bool  # some workload is identified by cgroup, not address


_INDEXES: dict[int, tuple[Policy, SourceIndex]] = {}
_INDEXES_KEPT = 4  # the policy in force and the one being swapped in, with room


def source_index(policy: Policy) -> SourceIndex:
    """``policy``'s :class:`SourceIndex`, made on first use and kept while the
    policy object is among the last few asked about."""
    hit = _INDEXES.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    tables: dict[tuple[int, int], dict[int, tuple[str, tuple[str, ...]]]] = {}
    for w in policy.workloads:
        for net in w.cidrs:
            table = tables.setdefault((net.version, net.prefixlen), {})
            # Equal prefixes in two workloads: the first listed keeps it.
            table.setdefault(int(net.network_address), (w.name, w.interfaces))
    index = SourceIndex(
        tables=tuple(
            (version, plen, tables[(version, plen)])
            for version, plen in sorted(tables, key=lambda k: -k[1])
        ),
        has_cgroups=any(w.cgroups for w in policy.workloads),
    )
    if len(_INDEXES) >= _INDEXES_KEPT:
        del _INDEXES[next(iter(_INDEXES))]
    _INDEXES[id(policy)] = (policy, index)
    return index


def identify(policy: Policy, src: IPAddress, *, interface: str | None = None) -> str | None:
    """The workload name that source address ``src`` belongs to, or None:
    the workload with the longest prefix holding it (the first listed of
    equal ones).

    ``interface`` is the ingress interface when known (the kernel knows it; the
    proxy does not, and passes None: it only ever sees flows the kernel already
    attributed, so the address alone identifies them).
    """
    src = _unmap(src)
    version, value = src.version, int(src)
    width = 32 if version == 4 else 128
    for table_version, plen, table in source_index(policy).tables:
        if table_version != version:
            continue
        found = table.get(value >> (width - plen) << (width - plen))
        if found is not None:
            name, bound = found
            if interface is not None and bound and interface not in bound:
                return None
            return name
    return None


def spoofed(policy: Policy, src: IPAddress, *, interface: str) -> bool:
    """Whether a packet from ``src`` arriving on ``interface`` claims a
    workload's address that is bound to other interfaces: it has no identity
    (:func:`identify`), and both datapaths drop it rather than forward it."""
    return identify(policy, src) is not None and identify(policy, src, interface=interface) is None


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
    resolved: Mapping[str, Resolution] | None = None,
) -> Verdict:
    """The proxy's verdict: the first egress rule that matches, else the default.

    ``resolved`` holds the addresses of the names :func:`names_to_resolve`
    lists for this flow (normalised: lower case, no trailing dot). A name
    missing from it, or known only with an error, owns no address: an allow
    rule that needs it does not match (fail closed), and the verdict's
    ``reason`` says why when the rest of the policy then decides.
    """
    dst = _unmap(dst)
    name = _normalise_name(server_name)
    known: Mapping[str, Resolution] = resolved or {}
    reason: str | None = None
    for rule in policy.egress:
        if not _matches_without_name(rule, workload=workload, dst=dst, dst_port=dst_port):
            continue
        if not rule.hosts:
            return _verdict(policy, rule, workload, reason=reason)
        if name is not None:
            if not any(host_matches(p, name) for p in rule.hosts):
                continue
            if rule.action is Action.DENY or rule.resolve is Resolve.NONE:
                return _verdict(policy, rule, workload, by_name=True, reason=reason)
            bound = _bind(rule, name, dst, known.get(name))
            if isinstance(bound, str):
                reason = reason or bound
                continue
            return _verdict(policy, rule, workload, by_name=True, upstream=bound[0])
        if _binds_nameless(rule):
            for host in _literal_hosts(rule):
                answer = known.get(host)
                if answer is not None and dst in _owned(answer):
                    return _verdict(policy, rule, workload, by_name=True)
                if answer is None or (answer.error and not answer.addresses):
                    why = answer.error if answer is not None else "not resolved"
                    reason = reason or (
                        f"rule {rule.name}: {host} could not be resolved ({why}),"
                        f" so a flow without a server name to {dst} cannot be matched to it"
                    )
    return default_verdict(policy, workload, reason=reason)


def default_verdict(policy: Policy, workload: str | None, *, reason: str | None = None) -> Verdict:
    """The verdict of the ``default`` action, audit mode applied."""
    if policy.default is Action.DENY and policy.audits(None):
        return Verdict(
            action=Action.ALLOW, rule="default", workload=workload, reason=reason, audit=True
        )
    return Verdict(action=policy.default, rule="default", workload=workload, reason=reason)


def names_to_resolve(
    policy: Policy,
    *,
    workload: str | None,
    dst: IPAddress,
    dst_port: int,
    server_name: str | None,
) -> tuple[str, ...]:
    """The names whose addresses :func:`decide` needs for this flow: the
    server name when an allow rule binds it, or, for a flow without a name,
    the literal hosts of the allow rules that could match it."""
    dst = _unmap(dst)
    name = _normalise_name(server_name)
    out: dict[str, None] = {}
    for rule in policy.egress:
        if not _matches_without_name(rule, workload=workload, dst=dst, dst_port=dst_port):
            continue
        if not rule.hosts:
            break  # this rule decides whatever the names resolve to
        if name is not None:
            if not any(host_matches(p, name) for p in rule.hosts):
                continue
            if rule.action is Action.DENY or rule.resolve is Resolve.NONE:
                break
            return (name,)  # the only name a flow with a name needs
        elif _binds_nameless(rule):
            out.update((host, None) for host in _literal_hosts(rule))
    return tuple(out)


def names_to_keep_warm(policy: Policy) -> frozenset[str]:
    """The literal hosts of allow rules that bind names to addresses: the
    proxy keeps their answers fresh, so that a flow needing one (a flow with
    no server name above all) never waits for the resolver."""
    return frozenset(
        host
        for rule in policy.egress
        if rule.action is Action.ALLOW and rule.resolve is not Resolve.NONE
        for host in _literal_hosts(rule)
    )


def format_addresses(addresses: Iterable[IPAddress]) -> str:
    """Addresses sorted, IPv4 first, at most a few shown."""
    ordered = sorted(addresses, key=lambda a: (a.version, int(a)))
    shown = ", ".join(str(a) for a in ordered[:_SHOWN_ADDRESSES])
    more = len(ordered) - _SHOWN_ADDRESSES
    return shown + (f" and {more} more" if more > 0 else "") if ordered else "none"


def _bind(
    rule: EgressRule, name: str, dst: IPAddress, answer: Resolution | None
) -> tuple[IPAddress | None] | str:
    """Whether ``name`` owns ``dst`` for ``rule``: a one-tuple with the address
    to connect to instead (None: the original destination), or why not."""
    if answer is None or not answer.addresses:
        why = answer.error if answer is not None and answer.error else "no addresses known"
        return (
            f"rule {rule.name} allows {name} only at its own addresses, and none are known"
            f" ({why}): refused {dst}"
        )
    if dst in _owned(answer):
        return (None,)
    if rule.resolve is Resolve.CONNECT:
        return (_pick(answer.addresses, dst.version),)
    return (
        f"rule {rule.name} allows {name} only at its own addresses"
        f" ({format_addresses(answer.addresses)}): the destination {dst} is not one of them"
    )


def _owned(answer: Resolution) -> frozenset[IPAddress]:
    # An AAAA record may hold an IPv4-mapped address; destinations are unmapped.
    return frozenset(_unmap(a) for a in answer.addresses)


def _pick(addresses: frozenset[IPAddress], version: int) -> IPAddress:
    """The address to re-target to: the lowest of the client's family, else the lowest."""
    same = [a for a in addresses if a.version == version]
    return min(same or addresses, key=lambda a: (a.version, int(a)))


def _binds_nameless(rule: EgressRule) -> bool:
    # An http rule needs a request that names its host; a deny rule by name
    # denies what names it (deny an address with cidrs).
    return rule.action is Action.ALLOW and rule.http is None and rule.resolve is not Resolve.NONE


def _literal_hosts(rule: EgressRule) -> list[str]:
    return [h for h in rule.hosts if not h.startswith("*.")]


def rule_verdict(policy: Policy, rule: EgressRule, workload: str | None) -> Verdict:
    """The verdict of ``rule`` matched without a server name, audit mode applied."""
    return _verdict(policy, rule, workload)


def _verdict(
    policy: Policy,
    rule: EgressRule,
    workload: str | None,
    *,
    by_name: bool = False,
    upstream: IPAddress | None = None,
    reason: str | None = None,
) -> Verdict:
    if rule.action is Action.DENY and policy.audits(rule):
        # Relayed raw to where the client was headed: no re-targeting, no
        # per-request Host check, nothing a deny rule could carry.
        return Verdict(
            action=Action.ALLOW, rule=rule.name, workload=workload, reason=reason, audit=True
        )
    return Verdict(
        action=rule.action,
        rule=rule.name,
        workload=workload,
        http=rule.http,
        by_name=by_name,
        upstream=upstream,
        reason=reason,
        source=rule.source,
        via=rule.via,
    )


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
