"""The reference decisions: identity, diversion, verdicts, and when the verdict
can depend on the server name. Every datapath must agree with these tables."""

from __future__ import annotations

import ipaddress
import random
import textwrap
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.decide import (
    decide,
    host_matches,
    identify,
    needs_server_name,
    non_tcp_drop,
    should_divert,
    spoofed,
)
from egress_agent.policy.load import parse_policy
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
    Workload,
)
from tests.lab import policygen

ALLOW, DENY = Action.ALLOW, Action.DENY


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


POLICY = parse_policy(
    textwrap.dedent(
        """\
        version: 1
        workloads:
          pg:       {cidrs: [10.1.0.5/32, "fd00:1::5/128"]}
          pods:     {cidrs: [10.1.0.0/16, "fd00:1::/64"]}
          node-net: {cidrs: [10.0.0.0/8]}
          bound:    {cidrs: [10.2.0.7/32, "fd00:2::7/128"], interfaces: [veth-b1, veth-b2]}
          wide-v6:  {cidrs: ["fd00::/16"]}
        intercept:
          - from: [pg]
            ports: [443, 80, "8000-8100"]
            except_cidrs: [10.0.0.0/8, "fd00::/16"]
          - from: [pods]
            to_cidrs: [192.0.2.0/24, "2001:db8::/32"]
            except_cidrs: [192.0.2.128/25]
          - from: [bound]
        egress:
          - name: pg-backups
            from: [pg]
            to: {hosts: [pgbackups.blob.core.windows.net], ports: [443]}
            action: allow
          - name: deny-evil
            to: {hosts: ["*.evil.example"]}
            action: deny
          - name: any-example
            to: {hosts: ["*.example.org", example.org]}
            action: allow
          - name: metrics
            from: [pods, bound]
            to: {cidrs: [198.51.100.0/24, "2001:db8:100::/48"], ports: ["9000-9100"]}
            action: allow
          - name: no-ssh
            to: {ports: [22]}
            action: deny
          - name: ssh-bastion          # shadowed by no-ssh: the first match wins
            to: {cidrs: [203.0.113.10/32], ports: [22]}
            action: allow
        default: deny
        """
    )
)


@pytest.mark.parametrize(
    ("src", "interface", "expected"),
    [
        # IPv4, longest prefix: /32 over /16 over /8.
        ("10.1.0.5", None, "pg"),
        ("10.1.0.6", None, "pods"),
        ("10.1.255.255", None, "pods"),
        ("10.3.0.1", None, "node-net"),
        ("10.255.255.255", None, "node-net"),
        ("11.0.0.1", None, None),
        ("9.255.255.255", None, None),
        # IPv4-mapped IPv6 sources are their IPv4 address.
        ("::ffff:10.1.0.5", None, "pg"),
        ("::ffff:10.1.9.9", None, "pods"),
        ("::ffff:10.3.0.1", None, "node-net"),
        ("::ffff:11.0.0.1", None, None),
        # An IPv4-compatible (not mapped) address is plain IPv6: no IPv4 identity.
        ("::10.1.0.5", None, None),
        # IPv6, longest prefix: /128 over /64 over /16.
        ("fd00:1::5", None, "pg"),
        ("fd00:1::6", None, "pods"),
        ("fd00:1::ffff:ffff:ffff:ffff", None, "pods"),
        ("fd00:5::1", None, "wide-v6"),
        ("fd00:2::8", None, "wide-v6"),
        ("fd01::1", None, None),
        ("2001:db8::1", None, None),
        # Interface-bound workload: its interfaces or unknown keep the identity;
        # any other interface loses identity altogether (no fallback to node-net).
        ("10.2.0.7", None, "bound"),
        ("10.2.0.7", "veth-b1", "bound"),
        ("10.2.0.7", "veth-b2", "bound"),
        ("10.2.0.7", "eth0", None),
        ("10.2.0.7", "veth-b", None),
        ("::ffff:10.2.0.7", "veth-b1", "bound"),
        ("::ffff:10.2.0.7", "eth0", None),
        ("fd00:2::7", "veth-b2", "bound"),
        ("fd00:2::7", "eth0", None),
        # Unbound workloads ignore the interface.
        ("10.2.0.8", "eth0", "node-net"),
        ("10.1.0.5", "anything", "pg"),
        ("fd00:1::6", "veth-b1", "pods"),
    ],
)
def test_identify(src: str, interface: str | None, expected: str | None) -> None:
    assert identify(POLICY, ip(src), interface=interface) == expected


@pytest.mark.parametrize(
    ("src", "dst", "port", "interface", "expected"),
    [
        # pg: only its ports, never to the node/pod networks.
        ("10.1.0.5", "93.184.216.34", 443, None, True),
        ("10.1.0.5", "93.184.216.34", 80, None, True),
        ("10.1.0.5", "93.184.216.34", 8000, None, True),
        ("10.1.0.5", "93.184.216.34", 8100, None, True),
        ("10.1.0.5", "93.184.216.34", 7999, None, False),
        ("10.1.0.5", "93.184.216.34", 8101, None, False),
        ("10.1.0.5", "93.184.216.34", 22, None, False),
        ("10.1.0.5", "10.9.9.9", 443, None, False),
        ("10.1.0.5", "11.0.0.1", 443, None, True),
        ("fd00:1::5", "2001:db8::1", 443, None, True),
        ("fd00:1::5", "fd00:9::1", 443, None, False),
        ("fd00:1::5", "fd01::1", 443, None, True),
        # Mapped source and destination are their IPv4 addresses.
        ("::ffff:10.1.0.5", "::ffff:93.184.216.34", 443, None, True),
        ("::ffff:10.1.0.5", "::ffff:10.9.9.9", 443, None, False),
        ("10.1.0.5", "::ffff:10.9.9.9", 443, None, False),
        # pg's address is inside pods' CIDR, but pg is not pods: pods' rule
        # (every port to 192.0.2.0/24) does not apply to it.
        ("10.1.0.5", "192.0.2.1", 5432, None, False),
        # pods: every port, only to_cidrs, minus except_cidrs inside them.
        ("10.1.0.6", "192.0.2.1", 5432, None, True),
        ("10.1.0.6", "192.0.2.127", 1, None, True),
        ("10.1.0.6", "192.0.2.128", 443, None, False),
        ("10.1.0.6", "192.0.2.200", 443, None, False),
        ("10.1.0.6", "198.51.100.1", 443, None, False),
        ("fd00:1::6", "2001:db8::1", 65535, None, True),
        ("fd00:1::6", "2001:db9::1", 443, None, False),
        ("fd00:1::6", "::ffff:192.0.2.1", 443, None, True),
        # Workloads without an intercept rule, and unknown sources.
        ("10.3.0.1", "93.184.216.34", 443, None, False),
        ("fd00:5::1", "2001:db8::1", 443, None, False),
        ("11.0.0.1", "93.184.216.34", 443, None, False),
        # Interface-bound workload: diverted only from its interfaces.
        ("10.2.0.7", "8.8.8.8", 53, "veth-b1", True),
        ("10.2.0.7", "8.8.8.8", 53, None, True),
        ("10.2.0.7", "8.8.8.8", 53, "eth0", False),
        ("fd00:2::7", "2001:4860::8888", 443, "veth-b2", True),
        ("fd00:2::7", "2001:4860::8888", 443, "eth1", False),
    ],
)
def test_should_divert(
    src: str, dst: str, port: int, interface: str | None, expected: bool
) -> None:
    got = should_divert(POLICY, src=ip(src), dst=ip(dst), dst_port=port, interface=interface)
    assert got is expected


@pytest.mark.parametrize(
    ("workload", "dst", "port", "name", "action", "rule"),
    [
        # Named host, its workload and port only.
        ("pg", "20.60.1.1", 443, "pgbackups.blob.core.windows.net", ALLOW, "pg-backups"),
        ("pg", "20.60.1.1", 443, "PGBACKUPS.Blob.Core.Windows.NET.", ALLOW, "pg-backups"),
        ("pg", "20.60.1.1", 443, " pgbackups.blob.core.windows.net ", ALLOW, "pg-backups"),
        ("pg", "2603:1000::1", 443, "pgbackups.blob.core.windows.net", ALLOW, "pg-backups"),
        ("pg", "20.60.1.1", 80, "pgbackups.blob.core.windows.net", DENY, "default"),
        ("pods", "20.60.1.1", 443, "pgbackups.blob.core.windows.net", DENY, "default"),
        (None, "20.60.1.1", 443, "pgbackups.blob.core.windows.net", DENY, "default"),
        ("pg", "20.60.1.1", 443, "other.blob.core.windows.net", DENY, "default"),
        # Without a name, a literal host matches its own addresses only
        # (SMTP, PostgreSQL, SSH carry no name); wildcards never do.
        ("pg", "20.60.1.1", 443, None, ALLOW, "pg-backups"),
        ("pg", "20.60.1.1", 443, "", ALLOW, "pg-backups"),
        ("pg", "20.60.1.1", 443, ".", ALLOW, "pg-backups"),
        ("pg", "20.60.1.2", 443, None, DENY, "default"),
        (None, "192.0.2.2", 443, None, DENY, "default"),
        # Wildcards: any depth below, not the suffix itself; rules without
        # `from` apply to every workload and to traffic without one.
        (None, "192.0.2.1", 443, "x.evil.example", DENY, "deny-evil"),
        ("pg", "192.0.2.1", 80, "a.b.evil.example", DENY, "deny-evil"),
        ("pods", "192.0.2.1", 443, "X.EVIL.EXAMPLE.", DENY, "deny-evil"),
        (None, "192.0.2.1", 443, "evil.example", DENY, "default"),
        (None, "192.0.2.1", 443, "notevil.example", DENY, "default"),
        (None, "192.0.2.1", 443, "www.example.org", ALLOW, "any-example"),
        (None, "192.0.2.1", 443, "example.org", ALLOW, "any-example"),
        ("bound", "192.0.2.1", 8080, "deep.a.example.org", ALLOW, "any-example"),
        (None, "192.0.2.1", 443, "notexample.org", DENY, "default"),
        # First match wins: deny-evil is before any-example.
        (None, "192.0.2.1", 443, "example.org.evil.example", DENY, "deny-evil"),
        # Destination CIDRs and port ranges, IPv4, IPv6 and mapped.
        ("pods", "198.51.100.7", 9000, None, ALLOW, "metrics"),
        ("pods", "198.51.100.7", 9050, None, ALLOW, "metrics"),
        ("pods", "198.51.100.7", 9100, None, ALLOW, "metrics"),
        ("pods", "198.51.100.7", 8999, None, DENY, "default"),
        ("pods", "198.51.100.7", 9101, None, DENY, "default"),
        ("pods", "198.51.101.7", 9000, None, DENY, "default"),
        ("bound", "198.51.100.255", 9000, "whatever.test", ALLOW, "metrics"),
        ("pg", "198.51.100.7", 9000, None, DENY, "default"),
        (None, "198.51.100.7", 9000, None, DENY, "default"),
        ("pods", "::ffff:198.51.100.7", 9000, None, ALLOW, "metrics"),
        ("pods", "2001:db8:100::1", 9000, None, ALLOW, "metrics"),
        ("pods", "2001:db8:101::1", 9000, None, DENY, "default"),
        # First match wins: no-ssh shadows ssh-bastion.
        ("pods", "203.0.113.10", 22, None, DENY, "no-ssh"),
        (None, "203.0.113.10", 22, None, DENY, "no-ssh"),
        ("pg", "203.0.113.10", 23, None, DENY, "default"),
    ],
)
def test_decide(
    workload: str | None, dst: str, port: int, name: str | None, action: Action, rule: str
) -> None:
    verdict = decide(
        POLICY,
        workload=workload,
        dst=ip(dst),
        dst_port=port,
        server_name=name,
        resolved=POLICY_ADDRESSES,
    )
    assert (verdict.action, verdict.rule, verdict.workload) == (action, rule, workload)


# What the names of the table above resolve to: each owns the destinations
# the table sends it to, so these verdicts are about the rest of the rules.
POLICY_ADDRESSES = {
    "pgbackups.blob.core.windows.net": Resolution(
        addresses=frozenset({ip("20.60.1.1"), ip("2603:1000::1")})
    ),
    **{
        name: Resolution(addresses=frozenset({ip("192.0.2.1")}))
        for name in ("www.example.org", "example.org", "deep.a.example.org")
    },
}


DEFAULT_ALLOW = parse_policy(
    textwrap.dedent(
        """\
        version: 1
        workloads:
          app: {cidrs: [10.0.0.0/24]}
        egress:
          - {name: block-metadata, to: {cidrs: [169.254.169.254/32]}, action: deny}
          - {name: app-smtp, from: [app], to: {ports: [25]}, action: deny}
        default: allow
        """
    )
)


@pytest.mark.parametrize(
    ("workload", "dst", "port", "action", "rule"),
    [
        ("app", "169.254.169.254", 80, DENY, "block-metadata"),
        (None, "::ffff:169.254.169.254", 80, DENY, "block-metadata"),
        ("app", "192.0.2.1", 25, DENY, "app-smtp"),
        (None, "192.0.2.1", 25, ALLOW, "default"),
        ("app", "192.0.2.1", 26, ALLOW, "default"),
        ("app", "2001:db8::1", 443, ALLOW, "default"),
    ],
)
def test_decide_default_allow(
    workload: str | None, dst: str, port: int, action: Action, rule: str
) -> None:
    verdict = decide(DEFAULT_ALLOW, workload=workload, dst=ip(dst), dst_port=port, server_name=None)
    assert (verdict.action, verdict.rule) == (action, rule)


NAME_POLICY = parse_policy(
    textwrap.dedent(
        """\
        version: 1
        workloads:
          pg:   {cidrs: [10.1.0.5/32]}
          pods: {cidrs: [10.1.0.0/16]}
        egress:
          - {name: smtp-out, from: [pg], to: {ports: [25]}, action: allow}
          - name: blob
            from: [pg]
            to: {hosts: [x.blob.core.windows.net], ports: [443]}
            action: allow
          - {name: metrics, to: {cidrs: [198.51.100.0/24, "2001:db8::/32"]}, action: allow}
          - {name: web, to: {hosts: ["*.example.org"], ports: [80, 443]}, action: allow}
        default: deny
        """
    )
)


@pytest.mark.parametrize(
    ("workload", "dst", "port", "expected"),
    [
        # The first rule that can match regardless of name has no hosts.
        ("pg", "20.60.1.1", 25, False),
        ("pods", "198.51.100.5", 443, False),
        ("pods", "::ffff:198.51.100.5", 443, False),
        ("pods", "2001:db8::5", 80, False),
        # Nothing can match: the default decides, no name needed.
        ("pods", "20.60.1.1", 22, False),
        ("pods", "20.60.1.1", 25, False),
        (None, "2001:db9::1", 8080, False),
        # A rule with hosts can match first: wait for the name.
        ("pg", "20.60.1.1", 443, True),
        ("pg", "198.51.100.5", 443, True),  # blob comes before metrics
        ("pg", "::ffff:198.51.100.5", 443, True),
        ("pods", "20.60.1.1", 443, True),
        (None, "20.60.1.1", 80, True),
        ("pg", "20.60.1.1", 80, True),
    ],
)
def test_needs_server_name(workload: str | None, dst: str, port: int, expected: bool) -> None:
    got = needs_server_name(NAME_POLICY, workload=workload, dst=ip(dst), dst_port=port)
    assert got is expected


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("example.org", "example.org", True),
        ("example.org", "EXAMPLE.ORG", True),
        ("example.org", "example.org.", True),
        ("Example.Org.", "example.org", True),
        ("example.org", "www.example.org", False),
        ("example.org", "example.or", False),
        ("example.org", "example.org.uk", False),
        ("*.example.org", "a.example.org", True),
        ("*.example.org", "a.b.example.org", True),
        ("*.example.org", "A.Example.ORG.", True),
        ("*.EXAMPLE.org", "a.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "example.org.", False),
        ("*.example.org", ".example.org", False),
        ("*.example.org", "badexample.org", False),
        ("*.example.org", "aexample.org", False),
        ("*.example.org", "example.org.evil.com", False),
        ("*.example.org", "a.example.org.evil.com", False),
        ("*.org", "example.org", True),
        ("*.org", "org", False),
    ],
)
def test_host_matches(pattern: str, name: str, expected: bool) -> None:
    assert host_matches(pattern, name) is expected


# -- properties -------------------------------------------------------------------

NAMES = ("a", "b", "c", "d")
INTERFACES = ("if0", "if1", "if2")


def _v4_net(base: int, prefixlen: int) -> IPNetwork:
    # Networks inside 10.0.0.0/24, so that random addresses often hit several.
    host_bits = 32 - prefixlen
    return ipaddress.IPv4Network(((0x0A000000 | base) >> host_bits << host_bits, prefixlen))


def _v6_net(base: int, prefixlen: int) -> IPNetwork:
    # Networks inside fd00::/120.
    host_bits = 128 - prefixlen
    value = (0xFD00 << 112) | base
    return ipaddress.IPv6Network((value >> host_bits << host_bits, prefixlen))


networks = st.one_of(
    st.builds(_v4_net, st.integers(0, 255), st.integers(24, 32)),
    st.builds(_v6_net, st.integers(0, 255), st.integers(120, 128)),
)


@st.composite
def small_policies(draw: st.DrawFn) -> Policy:
    """Up to four workloads; each network belongs to at most one workload (the
    loader refuses the same network in two)."""
    owner: dict[IPNetwork, str] = {}
    for net in draw(st.lists(networks, max_size=10)):
        owner.setdefault(net, draw(st.sampled_from(NAMES)))
    workloads = []
    for name in NAMES:
        cidrs = tuple(n for n, o in owner.items() if o == name)
        if cidrs:
            interfaces = tuple(draw(st.lists(st.sampled_from(INTERFACES), max_size=2, unique=True)))
            workloads.append(Workload(name=name, cidrs=cidrs, interfaces=interfaces))
    return Policy(
        version=1,
        proxy=POLICY.proxy,
        workloads=tuple(workloads),
        intercept=(),
        egress=(),
        default=DENY,
    )


@st.composite
def addresses(draw: st.DrawFn) -> IPAddress:
    low = draw(st.integers(0, 255))
    kind = draw(st.sampled_from(["v4", "mapped", "v6", "elsewhere"]))
    if kind == "v4":
        return ipaddress.IPv4Address(0x0A000000 | low)
    if kind == "mapped":
        return ipaddress.IPv6Address((0xFFFF << 32) | 0x0A000000 | low)
    if kind == "v6":
        return ipaddress.IPv6Address((0xFD00 << 112) | low)
    return ipaddress.IPv4Address(0x0B000000 | low)


def reference_identify(policy: Policy, src: IPAddress, interface: str | None) -> str | None:
    """Longest prefix by brute force over integers, without ipaddress' `in`."""
    version, value = (4, int(src)) if src.version == 4 else (6, int(src))
    if version == 6 and value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d is a.b.c.d
        version, value = 4, value & 0xFFFFFFFF
    width = 32 if version == 4 else 128
    candidates = []
    for w in policy.workloads:
        for n in w.cidrs:
            shift = width - n.prefixlen
            if n.version == version and value >> shift == int(n.network_address) >> shift:
                candidates.append((n.prefixlen, w))
    if not candidates:
        return None
    best = max(length for length, _ in candidates)
    [owner] = {w for length, w in candidates if length == best}  # unique by construction
    if interface is not None and owner.interfaces and interface not in owner.interfaces:
        return None
    return owner.name


@settings(max_examples=400, deadline=None)
@given(
    policy=small_policies(),
    src=addresses(),
    interface=st.one_of(st.none(), st.sampled_from(INTERFACES)),
)
def test_identify_is_longest_prefix(policy: Policy, src: IPAddress, interface: str | None) -> None:
    assert identify(policy, src, interface=interface) == reference_identify(policy, src, interface)


hosts = st.sampled_from(
    ["example.org", "*.example.org", "a.example.org", "*.a.example.org", "other.test"]
)
names = st.one_of(
    st.none(),
    st.sampled_from(["example.org", "a.example.org", "b.a.example.org", "other.test", "x.y"]),
)
ports = st.lists(
    st.builds(
        lambda a, b: PortRange(first=min(a, b), last=max(a, b)),
        st.integers(1, 6),
        st.integers(1, 6),
    ),
    max_size=2,
)
rules = st.builds(
    EgressRule,
    name=st.sampled_from(["r"]),
    action=st.sampled_from(Action),
    sources=st.one_of(st.none(), st.lists(st.sampled_from(NAMES), min_size=1).map(tuple)),
    hosts=st.lists(hosts, max_size=2).map(tuple),
    cidrs=st.lists(networks, max_size=2).map(tuple),
    ports=ports.map(tuple),
)


@settings(max_examples=400, deadline=None)
@given(
    egress=st.lists(rules, max_size=4),
    default=st.sampled_from(Action),
    workload=st.one_of(st.none(), st.sampled_from(NAMES)),
    dst=addresses(),
    port=st.integers(1, 6),
    name=names,
)
def test_verdict_ignores_the_name_when_not_needed(
    egress: list[EgressRule],
    default: Action,
    workload: str | None,
    dst: IPAddress,
    port: int,
    name: str | None,
) -> None:
    """When needs_server_name says no, the proxy connects without peeking: the
    verdict must then be the same whatever name the client would have sent."""
    egress = [
        EgressRule(
            name=f"r{i}",
            action=r.action,
            sources=r.sources,
            hosts=r.hosts,
            cidrs=r.cidrs,
            ports=r.ports,
        )
        for i, r in enumerate(egress)
    ]
    policy = Policy(
        version=1,
        proxy=POLICY.proxy,
        workloads=(),
        intercept=(),
        egress=tuple(egress),
        default=default,
    )
    if needs_server_name(policy, workload=workload, dst=dst, dst_port=port):
        return
    without = decide(policy, workload=workload, dst=dst, dst_port=port, server_name=None)
    with_name = decide(policy, workload=workload, dst=dst, dst_port=port, server_name=name)
    assert with_name == without


@pytest.mark.parametrize("workload", ["pg", "pods", None])
def test_rule_with_empty_sources_matches_no_workload(workload: str | None) -> None:
    # The loader refuses `from: []` because of this: an empty source list is
    # not "any workload" (that is None, `from` left out), it is no workload.
    rule = EgressRule(name="none", action=ALLOW, sources=())
    policy = Policy(
        version=1,
        proxy=POLICY.proxy,
        workloads=POLICY.workloads,
        intercept=(),
        egress=(rule,),
        default=DENY,
    )
    verdict = decide(policy, workload=workload, dst=ip("192.0.2.1"), dst_port=443, server_name=None)
    assert (verdict.action, verdict.rule) == (DENY, "default")


NON_TCP = parse_policy(
    textwrap.dedent(
        """\
        version: 1
        workloads:
          pg:    {cidrs: [10.1.0.5/32, "fd00:1::5/128"]}
          pods:  {cidrs: [10.1.0.0/16]}
          bound: {cidrs: [10.2.0.7/32], interfaces: [veth-b1]}
        intercept:
          - from: [pg]
            ports: [443]
            except_cidrs: [10.96.0.0/12, "fd00:96::/64"]
            non_tcp: drop
          - from: [pods]
            to_cidrs: [192.0.2.0/24]
          - from: [pods, bound]
            to_cidrs: [198.51.100.0/24, 192.0.2.0/25]
            except_cidrs: [198.51.100.128/25]
            non_tcp: drop
        default: deny
        """
    )
)


@pytest.mark.parametrize(
    ("src", "dst", "interface", "rule"),
    [
        # Every destination but the excepted ones, whatever the ports say.
        ("10.1.0.5", "203.0.113.9", None, 0),
        ("fd00:1::5", "2001:db8::1", None, 0),
        ("10.1.0.5", "10.96.0.10", None, None),  # the cluster resolver stays reachable
        ("fd00:1::5", "fd00:96::a", None, None),
        ("10.1.0.5", "::ffff:203.0.113.9", None, 0),  # IPv4-mapped is IPv4
        # pg is also in pods' range, but identity is by longest prefix: pg only.
        ("10.1.0.5", "198.51.100.1", None, 0),
        # pods: a rule with non_tcp: pass drops nothing; the drop rule's own
        # destinations do.
        ("10.1.0.9", "192.0.2.200", None, None),
        ("10.1.0.9", "192.0.2.1", None, 2),
        ("10.1.0.9", "198.51.100.1", None, 2),
        ("10.1.0.9", "198.51.100.200", None, None),
        ("10.1.0.9", "203.0.113.9", None, None),
        # Bound workloads: only on their interface (elsewhere there is no identity).
        ("10.2.0.7", "198.51.100.1", "veth-b1", 2),
        ("10.2.0.7", "198.51.100.1", "veth-x", None),
        ("10.9.9.9", "198.51.100.1", None, None),  # no workload at all
    ],
)
def test_non_tcp_drop(src: str, dst: str, interface: str | None, rule: int | None) -> None:
    got = non_tcp_drop(NON_TCP, src=ip(src), dst=ip(dst), interface=interface)
    assert (got.index if got is not None else None) == rule


@st.composite
def policies_with_intercepts(draw: st.DrawFn) -> Policy:
    """small_policies with up to three intercept rules over their workloads."""
    policy = draw(small_policies())
    names = [w.name for w in policy.workloads]
    rules = []
    for index in range(draw(st.integers(0, 3)) if names else 0):
        rules.append(
            InterceptRule(
                index=index,
                sources=tuple(draw(st.lists(st.sampled_from(names), min_size=1, unique=True))),
                ports=tuple(
                    PortRange(first=p, last=p)
                    for p in draw(st.lists(st.sampled_from([22, 443, 8080]), unique=True))
                ),
                to_cidrs=tuple(draw(st.lists(networks, max_size=2))),
                except_cidrs=tuple(draw(st.lists(networks, max_size=2))),
                non_tcp=draw(st.sampled_from(NonTcp)),
            )
        )
    return replace(policy, intercept=tuple(rules))


@given(policy=policies_with_intercepts(), src=addresses(), dst=addresses(),
       interface=st.sampled_from((None, *INTERFACES)))  # fmt: skip
@settings(max_examples=400, deadline=None)
def test_non_tcp_drop_covers_what_the_drop_rules_would_intercept(
    policy: Policy, src: IPAddress, dst: IPAddress, interface: str | None
) -> None:
    """A flow is dropped exactly when a rule with non_tcp: drop would divert
    its TCP on some port: the same sources, to_cidrs and except_cidrs."""
    dropping_only = replace(
        policy, intercept=tuple(r for r in policy.intercept if r.non_tcp is NonTcp.DROP)
    )
    got = non_tcp_drop(policy, src=src, dst=dst, interface=interface)
    diverted_on_some_port = any(
        should_divert(dropping_only, src=src, dst=dst, dst_port=port, interface=interface)
        for port in (22, 443, 8080, 9)
    )
    assert (got is not None) == diverted_on_some_port
    if got is not None:
        assert got.non_tcp is NonTcp.DROP
        passing = replace(
            policy,
            intercept=tuple(replace(r, non_tcp=NonTcp.PASS) for r in policy.intercept),
        )
        assert non_tcp_drop(passing, src=src, dst=dst, interface=interface) is None


@pytest.mark.parametrize(
    ("src", "interface", "expected"),
    [
        ("10.2.0.7", "veth-b1", False),  # its own interface
        ("10.2.0.7", "veth-b2", False),
        ("10.2.0.7", "veth-x", True),  # a bound workload's address elsewhere
        ("fd00:2::7", "veth-x", True),
        ("10.1.0.5", "veth-x", False),  # unbound workloads have no interface to keep to
        ("192.0.2.1", "veth-x", False),  # no workload at all
    ],
)
def test_spoofed(src: str, interface: str, expected: bool) -> None:
    assert spoofed(POLICY, ip(src), interface=interface) is expected


def _identify_by_scan(policy: Policy, src: IPAddress, interface: str | None) -> str | None:
    """Identification as the policy states it: every workload CIDR holding
    ``src``, the longest wins, the first listed among equals."""
    if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    best: tuple[int, str, tuple[str, ...]] | None = None
    for w in policy.workloads:
        for net in w.cidrs:
            holds = net.version == src.version and src in net
            if holds and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, w.name, w.interfaces)
    if best is None:
        return None
    if interface is not None and best[2] and interface not in best[2]:
        return None
    return best[1]


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_the_source_index_identifies_like_a_scan_of_every_workload(seed: int) -> None:
    # The proxy identifies each connection through an index made once per
    # policy; it must name the workload a scan of every CIDR names.
    rng = random.Random(seed)
    policy = policygen.random_policy(rng)
    if rng.random() < 0.5:  # equal and nested prefixes in two workloads (discovered pods)
        extra = Workload(name="late", cidrs=tuple(rng.sample(policygen.SOURCE_POOL, 3)))
        policy = replace(policy, workloads=(*policy.workloads, extra))
    interfaces = [None, *(policygen.pod_ifname(i, p[0]) for i, p in enumerate(policygen.PODS))]
    addresses = [a for _, v4, v6 in policygen.PODS for a in (v4, v6)]
    addresses += ["198.19.1.77", "198.19.200.1", "10.0.0.1", "fd00:19:1::99", "::ffff:198.19.1.2"]
    for text in addresses:
        src = ipaddress.ip_address(text)
        for interface in interfaces:
            assert identify(policy, src, interface=interface) == _identify_by_scan(
                policy, src, interface
            ), (text, interface)


def test_the_source_index_follows_the_policy_object() -> None:
    # A new policy (a reload, a pod discovered) is identified by its own
    # workloads, never by an index kept from the previous one.
    first = parse_policy("version: 1\nworkloads: {a: {cidrs: [10.0.0.0/24]}}\ndefault: deny\n")
    second = parse_policy("version: 1\nworkloads: {b: {cidrs: [10.0.0.0/24]}}\ndefault: deny\n")
    src = ipaddress.ip_address("10.0.0.5")
    assert identify(first, src) == "a"
    assert identify(second, src) == "b"
    assert identify(first, src) == "a"
