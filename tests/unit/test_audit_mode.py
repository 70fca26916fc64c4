"""Audit mode: ``enforce: false``, ``mode: audit`` on a deny rule or on the
default. What would be denied is allowed, relayed raw to the original
destination, and labelled ``audit-deny`` with the rule that would have denied
it; allow rules and their name binding decide exactly as in enforce mode."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from egress_agent.policy.decide import decide
from egress_agent.policy.load import PolicyError, Problem, parse_policy
from egress_agent.policy.model import Action, Policy, Resolution, Verdict
from egress_agent.proxy.connect import decide_by_name

BASE = """\
version: 1
workloads:
  app: {cidrs: [10.1.0.5/32]}
intercept:
  - from: [app]
egress:
  - name: api
    from: [app]
    to: {hosts: [api.example.com], ports: [443]}
    action: allow
  - name: no-smtp
    from: [app]
    to: {ports: [25]}
    action: deny%(rule_mode)s
default: %(default)s
%(top)s"""


def policy(*, rule_mode: str = "", default: str = "deny", top: str = "") -> Policy:
    text = BASE % {"rule_mode": rule_mode, "default": default, "top": top}
    return parse_policy(text, source_name="p.yaml")


def problems(**kw: str) -> tuple[Problem, ...]:
    with pytest.raises(PolicyError) as info:
        policy(**kw)
    return tuple(info.value.problems)


API = ipaddress.ip_address("192.0.2.10")
OTHER = ipaddress.ip_address("198.51.100.7")
RESOLVED = {"api.example.com": Resolution(addresses=frozenset({API}))}


def verdict(p: Policy, dst: str, port: int, name: str | None = None) -> Verdict:
    return decide(
        p,
        workload="app",
        dst=ipaddress.ip_address(dst),
        dst_port=port,
        server_name=name,
        resolved=RESOLVED,
    )


def test_enforce_is_the_default() -> None:
    p = policy()
    assert p.enforce is True and p.default_audit is False
    assert not any(r.audit for r in p.egress)
    assert p.audited() == ()
    v = verdict(p, "198.51.100.7", 25)
    assert (v.action, v.rule, v.label, v.audit) == (Action.DENY, "no-smtp", "deny", False)


def test_enforce_false_audits_every_deny() -> None:
    p = policy(top="enforce: false\n")
    assert p.enforce is False
    assert p.audited() == ("no-smtp", "default")
    by_rule = verdict(p, "198.51.100.7", 25)
    assert (by_rule.action, by_rule.rule, by_rule.label) == (Action.ALLOW, "no-smtp", "audit-deny")
    by_default = verdict(p, "198.51.100.7", 8080)
    assert (by_default.action, by_default.rule, by_default.label) == (
        Action.ALLOW,
        "default",
        "audit-deny",
    )
    # An audit-deny is relayed raw to where the client was headed.
    assert by_default.upstream is None and by_default.http is None and not by_default.by_name


def test_allow_rules_are_unchanged_in_audit_mode() -> None:
    p = policy(top="enforce: false\n")
    v = verdict(p, "192.0.2.10", 443, "api.example.com")
    assert (v.action, v.rule, v.label) == (Action.ALLOW, "api", "allow")


def test_a_name_not_at_its_addresses_is_an_audit_deny_with_the_reason() -> None:
    # The binding still decides: a forged SNI is not an allow; in audit mode
    # the record says it would be denied, and why.
    p = policy(top="enforce: false\n")
    v = verdict(p, str(OTHER), 443, "api.example.com")
    assert (v.rule, v.label, v.upstream) == ("default", "audit-deny", None)
    assert v.reason is not None and "198.51.100.7 is not one of them" in v.reason
    enforced = verdict(policy(), str(OTHER), 443, "api.example.com")
    assert (enforced.rule, enforced.label) == ("default", "deny")


def test_mode_audit_on_one_rule_audits_that_rule_only() -> None:
    p = policy(rule_mode="\n    mode: audit")
    assert [r.audit for r in p.egress] == [False, True]
    assert p.audited() == ("no-smtp",)
    assert verdict(p, "198.51.100.7", 25).label == "audit-deny"
    assert verdict(p, "198.51.100.7", 8080).label == "deny"


def test_mode_audit_on_the_default_audits_the_default_only() -> None:
    p = policy(default="{action: deny, mode: audit}")
    assert (p.default, p.default_audit) == (Action.DENY, True)
    assert p.audited() == ("default",)
    assert verdict(p, "198.51.100.7", 25).label == "deny"
    v = verdict(p, "198.51.100.7", 8080)
    assert (v.rule, v.label, v.action) == ("default", "audit-deny", Action.ALLOW)


def test_mode_enforce_is_accepted_everywhere() -> None:
    p = policy(rule_mode="\n    mode: enforce", default="{action: deny, mode: enforce}")
    assert p.audited() == ()
    assert policy(default="{action: allow}").default is Action.ALLOW


def test_reload_from_audit_to_enforce_is_a_different_policy() -> None:
    assert policy(top="enforce: false\n") != policy()
    assert policy(top="enforce: true\n") == policy()


def test_the_connect_listener_decides_alike() -> None:
    p = policy(top="enforce: false\n")
    v = decide_by_name(p, workload="app", server_name="other.example", port=25)
    assert v is not None and (v.rule, v.label) == ("no-smtp", "audit-deny")


@pytest.mark.parametrize(
    ("kw", "line", "path", "words"),
    [
        ({"top": "enforce: maybe\n"}, 16, "enforce", "expected true or false"),
        ({"rule_mode": "\n    mode: watch"}, 15, "egress[1].mode", "expected enforce"),
        (
            {"default": "{action: allow, mode: audit}"},
            15,
            "default.mode",
            "mode: audit applies to default: deny only",
        ),
        ({"default": "{mode: audit}"}, 15, "default.action", "missing required key 'action'"),
        ({"default": "{action: deny, mood: audit}"}, 15, "default.mood", "unknown key 'mood'"),
        ({"default": "{action: deny, mode: loud}"}, 15, "default.mode", "expected enforce"),
    ],
)
def test_bad_modes_are_located(kw: dict[str, str], line: int, path: str, words: str) -> None:
    found = problems(**kw)
    assert len(found) == 1, found
    got = found[0]
    assert (got.file, got.line, got.path) == ("p.yaml", line, path)
    assert words in got.message


def test_mode_audit_on_an_allow_rule_says_what_to_do() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        workloads:
          app: {cidrs: [10.1.0.5/32]}
        egress:
          - name: api
            to: {hosts: [api.example.com]}
            action: allow
            mode: audit
        default: deny
        """
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source_name="p.yaml")
    (got,) = info.value.problems
    assert (got.line, got.path) == (8, "egress[0].mode")
    assert "deny rules only" in got.message and "remove it" in got.message


def test_a_deny_rule_by_name_in_audit_mode_relays_raw() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        workloads:
          app: {cidrs: [10.1.0.5/32]}
        egress:
          - name: no-tracker
            to: {hosts: ["*.tracker.example"]}
            action: deny
            mode: audit
        default: deny
        """
    )
    p = parse_policy(text)
    v = verdict(p, "198.51.100.7", 80, "a.tracker.example")
    assert (v.rule, v.label, v.action) == ("no-tracker", "audit-deny", Action.ALLOW)
    # No per-request Host check, no re-targeting: the bytes go where they were headed.
    assert not v.by_name and v.upstream is None and v.http is None
    assert verdict(p, "198.51.100.7", 80, "tracker.example").label == "deny"
