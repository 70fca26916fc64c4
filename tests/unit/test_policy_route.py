"""An egress rule's ``source:`` and ``via:``: what loads, what is refused and
where, and what the agent's check of its host says about addresses and files
it does not have."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from egress_agent.agent.cli import main
from egress_agent.agent.hostcheck import check_host
from egress_agent.policy.decide import decide
from egress_agent.policy.load import parse_policy
from egress_agent.policy.model import Gateway, GatewayAuth, GatewayTls, Policy, SourceBinding
from egress_agent.policy.yamlnodes import PolicyError, Problem

HEAD = """\
version: 1
workloads:
  pods: {cidrs: [10.0.0.0/24]}
default: deny
egress:
"""


def load(rules: str) -> Policy:
    return parse_policy(HEAD + textwrap.indent(textwrap.dedent(rules), "  "), source_name="p.yaml")


def problems(rules: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(rules)
    return [str(p) for p in info.value.problems]


def host_problems(policy: Policy) -> list[Problem]:
    with pytest.raises(PolicyError) as info:
        check_host(policy)
    return list(info.value.problems)


def test_source_and_via_load_into_the_rule_and_its_verdict() -> None:
    policy = load(
        """\
        - name: out
          from: [pods]
          action: allow
          source: {address: [203.0.113.7, "2001:db8::7"]}
          via:
            connect: "gw.example.:3128"
            auth: {username_file: /etc/gw/user, password_file: /etc/gw/pass}
            tls: {ca_file: /etc/gw/ca.pem, server_name: proxy.example}
        - name: v6-gateway
          action: allow
          via: {connect: "[2001:DB8::10]:8080", tls: {}}
        """
    )
    out, v6 = policy.egress
    assert out.source == SourceBinding(
        addresses=(ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("2001:db8::7"))
    )
    assert out.source.for_version(6) == ipaddress.ip_address("2001:db8::7")
    assert out.via == Gateway(
        host="gw.example",
        port=3128,
        auth=GatewayAuth(username_file="/etc/gw/user", password_file="/etc/gw/pass"),
        tls=GatewayTls(ca_file="/etc/gw/ca.pem", server_name="proxy.example"),
    )
    assert str(out.via) == "gw.example:3128"
    assert v6.via is not None and str(v6.via) == "[2001:db8::10]:8080"
    assert v6.via.tls == GatewayTls() and v6.source is None
    verdict = decide(
        policy,
        workload="pods",
        dst=ipaddress.ip_address("192.0.2.1"),
        dst_port=443,
        server_name=None,
    )
    assert verdict.rule == "out" and verdict.source == out.source and verdict.via == out.via


@pytest.mark.parametrize(
    ("connect", "why"),
    [
        ("gw.example", "expected host:port"),
        ("http://gw.example:3128", "give host:port without a scheme"),
        ("2001:db8::10:3128", "write an IPv6 address in brackets"),
        ("[2001:db8::zz]:3128", "'2001:db8::zz' in brackets is not an IPv6 address"),
        ("gw.example:0", "the port '0' is not a number from 1 to 65535"),
        ("gw.example:http", "the port 'http' is not a number"),
        ("300.1.2.3:3128", "'300.1.2.3' is not an IPv4 address"),
        ("0.0.0.0:3128", "an unspecified address names no gateway"),
        (":3128", "the host is empty"),
        ("gw_proxy.example:3128", "label 'gw_proxy' must be 1-63 letters"),
    ],
)
def test_a_bad_connect_address_is_refused_where_it_is_written(connect: str, why: str) -> None:
    got = problems(
        f"""\
        - name: out
          action: allow
          via: {{connect: "{connect}"}}
        """
    )
    assert len(got) == 1, got
    assert got[0].startswith("p.yaml:8:20: egress[0].via.connect: ")
    assert f"{connect!r} is not a gateway address: {why}" in got[0]
    assert 'like "gateway.example:3128"' in got[0]


def test_source_and_via_are_refused_where_they_cannot_apply() -> None:
    got = problems(
        """\
        - name: nope
          action: deny
          source: {address: 203.0.113.7}
        - name: injected
          action: allow
          http: {set_headers: {X-A: {value: b}}}
          via: {connect: "gw:3128"}
        - name: two-v4
          action: allow
          source: {address: [203.0.113.7, 203.0.113.8, 224.0.0.1]}
        - name: no-password
          action: allow
          via: {connect: "gw:3128", auth: {username_file: relative/user}}
        """
    )
    assert got == [
        "p.yaml:8:5: egress[0].source: source applies to allow rules only: a denied flow"
        " leaves from nowhere; remove it, or make the rule allow",
        "p.yaml:12:5: egress[1].via: via is not supported on a rule with http: (its requests"
        " are sent by the HTTP relay from the node's own address): remove it, or drop http:"
        " from this rule",
        "p.yaml:15:37: egress[2].source.address[1]: a second IPv4 address: a connection leaves"
        " from one address, so give at most one per family (one IPv4, one IPv6)",
        "p.yaml:15:50: egress[2].source.address[2]: '224.0.0.1' is not a unicast IP address:"
        ' expected one of this host\'s addresses, like 203.0.113.7 or "2001:db8::7"',
        "p.yaml:18:37: egress[3].via.auth.password_file: missing required key 'password_file':"
        " expected the path of the file holding the password",
        "p.yaml:18:53: egress[3].via.auth.username_file: 'relative/user' is not an absolute"
        " path: write it from /, like /run/secrets/x",
    ]


def test_the_host_check_names_an_address_this_host_lacks_where_it_is_written() -> None:
    policy = load(
        """\
        - name: here
          action: allow
          source: {address: 127.0.0.1}
        - name: elsewhere
          action: allow
          source:
            address: ["::1", 192.0.2.77]
        """
    )
    got = host_problems(policy)
    assert [str(p) for p in got] == [
        "p.yaml:12:24: egress[1].source.address[1]: 192.0.2.77 is not an address of this"
        " host (its network namespace): add it to an interface (ip address add"
        " 192.0.2.77/PREFIX dev IFACE), or name one the host has"
    ]
    check_host(load("- {name: here, action: allow, source: {address: 127.0.0.1}}\n"))


def test_the_host_check_names_unreadable_gateway_files(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.write_text("node-a\n")
    empty = tmp_path / "pass"
    empty.write_text("\n")
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    policy = load(
        f"""\
        - name: gw
          action: allow
          via:
            connect: "gw.example:3128"
            auth: {{username_file: {user}, password_file: {empty}}}
            tls: {{ca_file: {tmp_path / "missing.pem"}}}
        - name: gw2
          action: allow
          via:
            connect: "gw.example:3128"
            auth: {{username_file: {tmp_path / "nobody"}, password_file: {user}}}
            tls: {{ca_file: {bad_ca}}}
        """
    )
    got = [(p.line, p.path, p.message) for p in host_problems(policy)]
    assert got == [
        (
            10,
            "egress[0].via.auth.password_file",
            f"{empty}: the file is empty: write the user name or password into it",
        ),
        (
            11,
            "egress[0].via.tls.ca_file",
            f"{tmp_path / 'missing.pem'}: no such file: create it, or correct the path",
        ),
        (
            16,
            "egress[1].via.auth.username_file",
            f"{tmp_path / 'nobody'}: no such file: create it, or correct the path",
        ),
        (
            17,
            "egress[1].via.tls.ca_file",
            f"{bad_ca}: no PEM certificate in it: give the CA certificate (PEM) that signed"
            " the gateway's",
        ),
    ]


def test_the_readme_walk_through_policies_load() -> None:
    """The gateway's policy and the node's rule, as a reader copies them."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### One egress IP for a cluster") :]
    section = section[: section.index("\n## ")]
    gateway_yaml, node_yaml = (block.split("\n", 1)[1] for block in section.split("```yaml")[1:3])
    gateway_yaml = gateway_yaml[: gateway_yaml.index("```")]
    node_yaml = node_yaml[: node_yaml.index("```")]
    gateway = parse_policy(gateway_yaml, source_name="gateway.yaml")
    assert gateway.connect is not None and gateway.connect.port == 3128
    [partners] = gateway.egress
    assert partners.source is not None and len(partners.source.addresses) == 2
    node = parse_policy(
        "version: 1\nworkloads: {app: {cidrs: [10.0.1.0/24]}}\ndefault: deny\n" + node_yaml,
        source_name="node.yaml",
    )
    [rule] = node.egress
    assert rule.via is not None and str(rule.via) == "10.0.9.3:3128"
    assert rule.via.auth is not None and rule.via.tls is None


def test_explain_says_where_a_flow_leaves_from_and_through_which_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            version: 1
            workloads:
              pods: {cidrs: [10.0.0.0/24]}
            intercept: [{from: [pods], ports: [443, 444]}]
            egress:
              - name: out
                to: {ports: [443]}
                action: allow
                source: {address: 203.0.113.7}
                via: {connect: "gw.example:3128"}
              - name: v4-only
                to: {ports: [444]}
                action: allow
                source: {address: 203.0.113.7}
            default: deny
            """
        )
    )
    args = ["explain", "--policy", str(path), "--from", "10.0.0.5"]
    assert main([*args, "--to", "192.0.2.9:443", "--server-name", "api.example"]) == 0
    out = capsys.readouterr().out
    assert "leaves:    from 203.0.113.7 (the connection to the gateway)\n" in out
    assert "through:   gateway gw.example:3128: CONNECT api.example:443\n" in out
    assert main([*args, "--to", "192.0.2.9:444"]) == 0
    assert "leaves:    from 203.0.113.7\n" in capsys.readouterr().out
    assert main([*args, "--to", "[2001:db8::9]:444"]) == 0
    assert (
        "leaves:    refused: the rule's source (203.0.113.7) has no IPv6 address\n"
        in capsys.readouterr().out
    )
