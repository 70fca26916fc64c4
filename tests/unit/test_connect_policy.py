"""The CONNECT listener's policy: the ``connect`` section of a policy file,
the nftables rules it renders, deciding by name before resolving, and the
tunnel's name check."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.decide import decide
from egress_agent.policy.load import PolicyError, parse_policy
from egress_agent.policy.model import ConnectSettings, ProxyAuth, Resolution
from egress_agent.proxy.connect import decide_by_name, names_match
from egress_agent.rules.render import render_ruleset

GOLDEN = Path(__file__).parent / "golden"

POLICY = """
version: 1
workloads:
  pods: {cidrs: [10.10.0.0/16, "fd00:10::/32"], interfaces: [veth-a]}
  pg-main: {cidrs: [10.10.1.2/32]}
  v6only: {cidrs: ["fd00:20::/64"]}
intercept: []
egress:
  - {name: blob, to: {hosts: [blob.example.net, "*.blob.example.net"], ports: [443]}, action: allow}
  - {name: no-exfil, from: [pods], to: {cidrs: [203.0.113.0/24]}, action: deny}
  - {name: metrics, to: {cidrs: [198.51.100.0/24], ports: [9000]}, action: allow}
  - {name: pg-any, from: [pg-main], to: {ports: [5432]}, action: allow}
default: deny
connect:
  port: 3128
  auth:
    pg-main: {users_file: /etc/egress-agent/connect-users}
    v6only: {username: ci, password_file: /run/secrets/ci}
"""


def test_connect_section_loads() -> None:
    policy = parse_policy(POLICY)
    assert policy.connect == ConnectSettings(
        port=3128,
        auth=(
            ("pg-main", ProxyAuth(users_file="/etc/egress-agent/connect-users")),
            ("v6only", ProxyAuth(username="ci", password_file="/run/secrets/ci")),
        ),
    )
    assert policy.connect.auth_for("pods") is None
    assert parse_policy(POLICY.split("connect:")[0]).connect is None


@pytest.mark.parametrize(
    ("section", "where", "message"),
    [
        ("connect: {}", "connect.port", "missing required key 'port'"),
        ("connect: {port: 15001}", "connect.port", "also proxy.port"),
        ("connect: {port: 0}", "connect.port", "out of range"),
        ("connect: {prot: 3128}", "connect.prot", "did you mean 'port'?"),
        ("connect: {port: 3128, auth: {nope: {users_file: /x}}}", "connect.auth.nope",
         "unknown workload 'nope'"),
        ("connect: {port: 3128, auth: {pods: {users_file: rel/path}}}",
         "connect.auth.pods.users_file", "not an absolute path"),
        ("connect: {port: 3128, auth: {pods: {username: ci}}}", "connect.auth.pods",
         "incomplete or mixed proxy credentials"),
        ("connect: {port: 3128, auth: {pods: {users_file: /x, username: a, password_file: /y}}}",
         "connect.auth.pods", "incomplete or mixed"),
        ("connect: {port: 3128, auth: {pods: {username: 'a:b', password_file: /y}}}",
         "connect.auth.pods.username", "without ':'"),
        ("connect: {port: 3128, auth: {pods: {password: hunter2}}}", "connect.auth.pods.password",
         "unknown key 'password'"),
    ],
)  # fmt: skip
def test_connect_section_problems(section: str, where: str, message: str) -> None:
    text = POLICY.split("connect:")[0] + section + "\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, source_name="p.yaml")
    problems = [str(p) for p in exc.value.problems]
    assert any(f": {where}: " in p and message in p for p in problems), problems
    assert all(p.startswith("p.yaml:") for p in problems)


def test_connect_rules_render_to_golden_ruleset() -> None:
    doc = render_ruleset(parse_policy(POLICY))
    path = GOLDEN / "connect-ruleset.json"
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), "differs from the golden file (UPDATE_GOLDEN=1 to accept)"


def test_without_connect_the_ruleset_has_no_connect_rules() -> None:
    doc = render_ruleset(parse_policy(POLICY.split("connect:")[0]))
    assert "3128" not in json.dumps(doc) and "CONNECT" not in json.dumps(doc)


NAMES = ["blob.example.net", "x.blob.example.net", "BLOB.example.net.", "other.test", "a.b"]
ADDRESSES = [
    "203.0.113.5",
    "198.51.100.7",
    "10.20.0.1",
    "2001:db8::1",
    "::ffff:203.0.113.9",
]


@settings(max_examples=500, deadline=None)
@given(
    workload=st.sampled_from([None, "pods", "pg-main", "v6only"]),
    port=st.sampled_from([443, 9000, 5432, 80]),
    name=st.sampled_from(NAMES),
    address=st.one_of(
        st.sampled_from(ADDRESSES).map(ipaddress.ip_address),
        st.ip_addresses(),
    ),
)
def test_deciding_by_name_agrees_with_decide_for_every_address(
    workload: str | None, port: int, name: str, address: ipaddress.IPv4Address
) -> None:
    policy = parse_policy(POLICY)
    early = decide_by_name(policy, workload=workload, port=port, server_name=name)
    if early is not None:
        # The listener connects to the name's own addresses: bound by construction.
        owned = {name.lower().rstrip("."): Resolution(addresses=frozenset({address}))}
        later = decide(
            policy, workload=workload, dst=address, dst_port=port, server_name=name,
            resolved=owned,
        )  # fmt: skip
        assert (early.action, early.rule) == (later.action, later.rule)


def test_deciding_by_name_answers_when_no_address_rule_comes_first() -> None:
    policy = parse_policy(POLICY)
    got = decide_by_name(policy, workload="pg-main", port=443, server_name="other.test")
    assert got is not None and (got.rule, got.action.value) == ("default", "deny")
    got = decide_by_name(policy, workload="pg-main", port=443, server_name="x.blob.example.net")
    assert got is not None and got.rule == "blob"
    # "no-exfil" denies pods by address first: which rule decides depends on it.
    assert decide_by_name(policy, workload="pods", port=443, server_name="other.test") is None


@pytest.mark.parametrize(
    ("connect_host", "inner", "match"),
    [
        ("blob.example.net", "blob.example.net", True),
        ("blob.example.net", "BLOB.Example.NET.", True),
        ("blob.example.net.", "blob.example.net", True),
        ("blob.example.net", None, True),  # no SNI: nothing to compare
        ("blob.example.net", "other.example.net", False),
        ("blob.example.net", "x.blob.example.net", False),
        ("2001:db8::1", "2001:DB8:0::1", True),
        ("198.51.100.7", "other.test", False),
    ],
)
def test_tunnel_name_must_be_the_connect_host(
    connect_host: str, inner: str | None, match: bool
) -> None:
    assert names_match(connect_host, inner) is match


def test_readme_policy_example_with_connect_section_loads() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    example = next(b for b in blocks if b.startswith("version: 1"))
    policy = parse_policy(example)
    assert policy.connect is not None and policy.connect.port == 3128
    assert policy.connect.auth_for("pg-main") == ProxyAuth(
        users_file="/etc/egress-agent/connect-users"
    )
    section = next(b for b in blocks if b.startswith("connect:"))
    # The top-level section (a rule's via: names a connect: of its own).
    connect = parse_policy(example.split("\nconnect:")[0] + "\n" + section).connect
    assert connect is not None and connect.auth_for("registry") == ProxyAuth(
        username="mirror", password_file="/run/secrets/proxy-password"
    )
