"""Names bound to addresses, as the reference decision makes them: a flow an
allow rule admits by name must be headed to one of that name's addresses,
be re-targeted there, or the rule must say it trusts the name alone.

The addresses are data here (what the proxy's resolver found); the netns
tests drive the same decisions through a real DNS server."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.decide import (
    decide,
    format_addresses,
    names_to_keep_warm,
    names_to_resolve,
    needs_server_name,
)
from egress_agent.policy.load import parse_policy
from egress_agent.policy.model import (
    Action,
    EgressRule,
    IPAddress,
    Policy,
    PortRange,
    ProxySettings,
    Resolution,
    Resolve,
)

ALLOW, DENY = Action.ALLOW, Action.DENY
BLOB = "pgbackups.blob.core.windows.net"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


POLICY = parse_policy(
    textwrap.dedent(
        f"""\
        version: 1
        workloads:
          pg: {{cidrs: [10.1.0.5/32, "fd00:1::5/128"]}}
        egress:
          - name: backups
            from: [pg]
            to: {{hosts: [{BLOB}], ports: [443]}}
            action: allow
          - name: cdn
            to: {{hosts: ["*.cdn.example"], ports: [443], resolve: connect}}
            action: allow
          - name: legacy
            to: {{hosts: [legacy.example], ports: [443], resolve: none}}
            action: allow
          - name: blocked
            to: {{hosts: [blocked.example.org]}}
            action: deny
          - name: web
            to: {{hosts: ["*.example.org"], ports: [80, 443]}}
            action: allow
          - name: smtp
            to: {{hosts: [smtp-relay.example.com], ports: [587]}}
            action: allow
          - name: internal
            to: {{cidrs: [10.50.0.0/16], ports: [443]}}
            action: allow
        default: deny
        """
    )
)

ADDRESSES = {
    BLOB: Resolution(addresses=frozenset({ip("20.60.1.1"), ip("2603:1000::1")})),
    "a.cdn.example": Resolution(addresses=frozenset({ip("203.0.113.7"), ip("2001:db8:7::1")})),
    "v4only.cdn.example": Resolution(addresses=frozenset({ip("203.0.113.9")})),
    "www.example.org": Resolution(addresses=frozenset({ip("192.0.2.10")})),
    "smtp-relay.example.com": Resolution(addresses=frozenset({ip("198.51.100.25")})),
    "gone.example.org": Resolution(error="the name does not exist (NXDOMAIN)"),
    "down.example.org": Resolution(error="no answer from 10.96.0.10 within 2s"),
    "stale.example.org": Resolution(addresses=frozenset({ip("192.0.2.77")}), stale=True),
}


def verdict(dst: str, port: int, name: str | None, *, workload: str | None = "pg") -> tuple:
    got = decide(
        POLICY,
        workload=workload,
        dst=ip(dst),
        dst_port=port,
        server_name=name,
        resolved=ADDRESSES,
    )
    return got.action, got.rule, str(got.upstream) if got.upstream else None


@pytest.mark.parametrize(
    ("dst", "port", "name", "expected"),
    [
        # The name owns the destination: allowed, to the destination itself.
        ("20.60.1.1", 443, BLOB, (ALLOW, "backups", None)),
        ("2603:1000::1", 443, BLOB, (ALLOW, "backups", None)),
        ("::ffff:20.60.1.1", 443, BLOB, (ALLOW, "backups", None)),
        ("20.60.1.1", 443, BLOB.upper() + ".", (ALLOW, "backups", None)),
        # A forged name: the allowed name sent to another address. Refused,
        # IPv4 and IPv6 alike.
        ("198.18.2.2", 443, BLOB, (DENY, "default", None)),
        ("2001:db8::99", 443, BLOB, (DENY, "default", None)),
        # Wildcards bind the name the client sent.
        ("192.0.2.10", 443, "www.example.org", (ALLOW, "web", None)),
        ("192.0.2.11", 443, "www.example.org", (DENY, "default", None)),
        # A name that does not resolve, or whose resolver fails, owns nothing.
        ("192.0.2.10", 443, "gone.example.org", (DENY, "default", None)),
        ("192.0.2.10", 443, "down.example.org", (DENY, "default", None)),
        # An answer kept past its TTL while the resolver is down still counts.
        ("192.0.2.77", 443, "stale.example.org", (ALLOW, "web", None)),
        # A name the proxy never resolved owns nothing either (fail closed).
        ("192.0.2.10", 443, "never.example.org", (DENY, "default", None)),
        # resolve: connect re-targets to the name's address, the client's family first.
        ("198.18.2.2", 443, "a.cdn.example", (ALLOW, "cdn", "203.0.113.7")),
        ("2001:db8::99", 443, "a.cdn.example", (ALLOW, "cdn", "2001:db8:7::1")),
        ("2001:db8::99", 443, "v4only.cdn.example", (ALLOW, "cdn", "203.0.113.9")),
        ("203.0.113.7", 443, "a.cdn.example", (ALLOW, "cdn", None)),
        # resolve: none trusts the name alone (documented as unsafe).
        ("198.18.2.2", 443, "legacy.example", (ALLOW, "legacy", None)),
        # Deny rules deny by name, wherever the flow goes: no lookup.
        ("192.0.2.10", 443, "blocked.example.org", (DENY, "blocked", None)),
        # A binding miss falls through: a later rule may still allow the
        # destination on its own terms (it allows any flow there).
        ("10.50.3.3", 443, BLOB, (ALLOW, "internal", None)),
        # No name (SMTP): a literal host matches its own addresses only.
        ("198.51.100.25", 587, None, (ALLOW, "smtp", None)),
        ("198.51.100.26", 587, None, (DENY, "default", None)),
        ("20.60.1.1", 443, None, (ALLOW, "backups", None)),
        # ... and a name that is not the literal host is decided by name.
        ("198.51.100.25", 587, "smtp-relay.example.com", (ALLOW, "smtp", None)),
        ("198.51.100.25", 587, "evil.example.net", (DENY, "default", None)),
        # Wildcards and resolve: none never match a flow without a name.
        ("192.0.2.10", 443, None, (DENY, "default", None)),
        ("203.0.113.7", 443, None, (DENY, "default", None)),
    ],
)
def test_a_name_allows_only_its_own_addresses(
    dst: str, port: int, name: str | None, expected: tuple
) -> None:
    assert verdict(dst, port, name) == expected


def test_a_refusal_says_which_name_which_destination_and_the_names_addresses() -> None:
    got = decide(
        POLICY, workload="pg", dst=ip("198.18.2.2"), dst_port=443, server_name=BLOB,
        resolved=ADDRESSES,
    )  # fmt: skip
    assert got.action is DENY and got.rule == "default"
    assert got.reason == (
        f"rule backups allows {BLOB} only at its own addresses (20.60.1.1, 2603:1000::1):"
        " the destination 198.18.2.2 is not one of them"
    )
    failed = decide(
        POLICY, workload="pg", dst=ip("192.0.2.10"), dst_port=443,
        server_name="down.example.org", resolved=ADDRESSES,
    )  # fmt: skip
    assert failed.reason is not None
    assert "down.example.org" in failed.reason and "no answer from 10.96.0.10" in failed.reason
    nameless = decide(
        POLICY, workload="pg", dst=ip("198.51.100.25"), dst_port=587, server_name=None,
        resolved={"smtp-relay.example.com": Resolution(error="no answer within 2s")},
    )  # fmt: skip
    assert nameless.action is DENY
    assert nameless.reason == (
        "rule smtp: smtp-relay.example.com could not be resolved (no answer within 2s),"
        " so a flow without a server name to 198.51.100.25 cannot be matched to it"
    )


def test_verdicts_say_whether_the_rule_matched_by_name() -> None:
    def by_name(dst: str, port: int, name: str | None) -> bool:
        return decide(
            POLICY, workload="pg", dst=ip(dst), dst_port=port, server_name=name,
            resolved=ADDRESSES,
        ).by_name  # fmt: skip

    assert by_name("20.60.1.1", 443, BLOB)
    assert by_name("198.51.100.25", 587, None)  # a literal host matched without a name
    assert not by_name("10.50.3.3", 443, None)  # a CIDR rule


@pytest.mark.parametrize(
    ("dst", "port", "name", "names"),
    [
        ("20.60.1.1", 443, BLOB, (BLOB,)),
        ("20.60.1.1", 443, "A.cdn.example.", ("a.cdn.example",)),
        # resolve: none and deny rules need no lookup.
        ("20.60.1.1", 443, "legacy.example", ()),
        ("20.60.1.1", 443, "blocked.example.org", ()),
        # A name no rule allows is never looked up: the client cannot make
        # the proxy resolve whatever it likes.
        ("20.60.1.1", 443, "attacker-chosen.example.net", ()),
        # No name: the literal hosts of the allow rules that could match.
        ("198.51.100.25", 587, None, ("smtp-relay.example.com",)),
        ("20.60.1.1", 443, None, (BLOB,)),
        # A rule without hosts that matches ends the list.
        ("10.50.3.3", 443, None, (BLOB,)),
        ("20.60.1.1", 25, None, ()),
    ],
)
def test_names_to_resolve(dst: str, port: int, name: str | None, names: tuple[str, ...]) -> None:
    got = names_to_resolve(POLICY, workload="pg", dst=ip(dst), dst_port=port, server_name=name)
    assert got == names


def test_the_policy_names_kept_fresh_are_the_literal_hosts_that_bind() -> None:
    assert names_to_keep_warm(POLICY) == {BLOB, "smtp-relay.example.com"}


def test_a_flow_to_a_literal_hosts_address_still_waits_for_its_name() -> None:
    # The verdict depends on the name (another name may be denied), so the
    # proxy looks at the first message; it connects early (see proxy.held).
    assert needs_server_name(POLICY, workload="pg", dst=ip("198.51.100.25"), dst_port=587)


def test_format_addresses_sorts_and_shortens() -> None:
    many = [ip(f"192.0.2.{i}") for i in range(9, 0, -1)] + [ip("2001:db8::1")]
    assert format_addresses(many) == (
        "192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4, 192.0.2.5, 192.0.2.6 and 4 more"
    )
    assert format_addresses([]) == "none"


HOSTS = ["a.test", "b.test", "*.test", "x.a.test"]
ADDRS = [ip(a) for a in ("192.0.2.1", "192.0.2.2", "2001:db8::1")]


@st.composite
def binding_policies(draw: st.DrawFn) -> Policy:
    rules = []
    for i in range(draw(st.integers(0, 5))):
        action = draw(st.sampled_from(Action))
        hosts = tuple(draw(st.lists(st.sampled_from(HOSTS), max_size=2, unique=True)))
        rules.append(
            EgressRule(
                name=f"r{i}",
                action=action,
                hosts=hosts,
                ports=(PortRange(first=1, last=1),) if draw(st.booleans()) else (),
                resolve=draw(st.sampled_from(Resolve))
                if hosts and action is Action.ALLOW
                else Resolve.VERIFY,
            )
        )
    return Policy(
        version=1, proxy=ProxySettings(), workloads=(), intercept=(), egress=tuple(rules),
        default=draw(st.sampled_from(Action)),
    )  # fmt: skip


@settings(max_examples=300)
@given(
    policy=binding_policies(),
    dst=st.sampled_from(ADDRS),
    port=st.sampled_from([1, 2]),
    name=st.one_of(st.none(), st.sampled_from(["a.test", "b.test", "x.a.test", "c.test"])),
    known=st.dictionaries(
        st.sampled_from(["a.test", "b.test", "x.a.test", "c.test"]),
        st.frozensets(st.sampled_from(ADDRS)).map(lambda a: Resolution(addresses=a)),
    ),
)
def test_resolving_only_the_listed_names_decides_alike(
    policy: Policy,
    dst: IPAddress,
    port: int,
    name: str | None,
    known: dict[str, Resolution],
) -> None:
    """The proxy resolves only what names_to_resolve lists: that must be all
    decide ever looks at."""
    needed = names_to_resolve(policy, workload=None, dst=dst, dst_port=port, server_name=name)
    some = {n: known[n] for n in needed if n in known}
    full = decide(policy, workload=None, dst=dst, dst_port=port, server_name=name, resolved=known)
    partial = decide(policy, workload=None, dst=dst, dst_port=port, server_name=name, resolved=some)
    assert (full.action, full.rule, full.upstream) == (
        partial.action,
        partial.rule,
        partial.upstream,
    )
