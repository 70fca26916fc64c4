"""The loader's layers on their own: the positioned YAML reader
(``yamlnodes``), the field-type readers (``fields``) and a section reader
(``sections``), each reporting at the line and column of the node at fault
with its field path, and returning what a caller falls back on."""

from __future__ import annotations

import re
import textwrap

import pytest
from yaml.nodes import MappingNode, Node

from egress_agent.policy import fields
from egress_agent.policy.load import PolicyError as LoadPolicyError
from egress_agent.policy.load import Problem as LoadProblem
from egress_agent.policy.model import NonTcp, PortRange, ProxySettings
from egress_agent.policy.sections.intercept import non_tcp
from egress_agent.policy.sections.settings import proxy
from egress_agent.policy.yamlnodes import PolicyError, Problem, Reader, compose


def _tree(text: str) -> tuple[Reader, dict[str, Node]]:
    """A reader over ``text`` and its top-level value nodes by key."""
    root = compose(textwrap.dedent(text), source_name="p.yaml")
    assert isinstance(root, MappingNode)
    return Reader("p.yaml"), {k.value: v for k, v in root.value}


def _said(r: Reader) -> list[str]:
    return [str(p) for p in r.problems]


def test_the_loader_still_exports_its_error_types() -> None:
    assert LoadPolicyError is PolicyError
    assert LoadProblem is Problem


def test_compose_locates_a_syntax_error() -> None:
    with pytest.raises(PolicyError) as info:
        compose("a: [1, 2\nb: 3\n", source_name="p.yaml")
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == ("p.yaml", 2)
    assert problem.message.startswith("YAML syntax error: ")


def test_items_reads_each_item_at_its_index_and_reports_an_empty_list() -> None:
    r, top = _tree(
        """\
        ports: [80, "9-1", 443]
        none: []
        """
    )
    got = r.items(top["ports"], "ports", what="a list of ports", read=fields.port_range)
    assert got == [PortRange(first=80, last=80), PortRange(first=443, last=443)]
    assert (
        r.items(top["none"], "none", what="a list", read=fields.port_range, empty="give one") == []
    )
    assert _said(r) == [
        "p.yaml:1:13: ports[1]: '9-1' is not a port range: the first port must not be greater"
        ' than the last (write "1-9")',
        "p.yaml:2:7: none: give one",
    ]


def test_field_falls_back_on_the_default_when_absent_or_unusable() -> None:
    r, top = _tree(
        """\
        s: {port: 70000}
        """
    )
    s = r.mapping(top["s"], "s", what="settings", allowed=("port", "other"))
    assert s is not None
    assert r.field(s, "s", "port", fields.port, default=8080) == 8080
    assert r.field(s, "s", "other", fields.port, default=1) == 1
    assert _said(r) == ["p.yaml:1:11: s.port: 70000 is out of range: expected an integer 1-65535"]


def test_require_says_what_each_missing_key_should_hold() -> None:
    r, top = _tree(
        """\
        s: {a: 1}
        """
    )
    s = r.mapping(top["s"], "s", what="settings", allowed=("a", "b", "c"))
    assert s is not None
    r.require(top["s"], "s", s, {"a": "expected one", "b": "expected two", "c": "three"})
    assert _said(r) == [
        "p.yaml:1:4: s.b: missing required key 'b': expected two",
        "p.yaml:1:4: s.c: missing required key 'c': three",
    ]


def test_one_of_maps_words_to_values_and_refuses_anything_else() -> None:
    r, top = _tree(
        """\
        a: drop
        b: 1
        c: Drop
        """
    )
    assert non_tcp(r, top["a"], "a") is NonTcp.DROP
    assert non_tcp(r, top["b"], "b") is None
    assert non_tcp(r, top["c"], "c") is None
    assert [p.line for p in r.problems] == [2, 3]
    assert r.problems[0].message.endswith("excepted), found the integer 1")
    assert r.problems[1].message.endswith("excepted), found the string 'Drop'")


def test_checked_text_and_text_like_say_what_the_text_is_not() -> None:
    r, top = _tree(
        """\
        a: "cali*"
        b: "*"
        c: eth0
        d: NotANamespace
        """
    )
    assert fields.interface_pattern(r, top["a"], "a") == "cali*"
    assert fields.interface_pattern(r, top["b"], "b") is None
    assert fields.interface_name(r, top["c"], "c") == "eth0"
    ns = fields.text_like(
        re.compile("[a-z]+"), what="a namespace", kind="a namespace", rule="lower"
    )
    assert ns(r, top["d"], "d") is None
    said = _said(r)
    assert said[0].startswith("p.yaml:2:4: b: '*' is not an interface name or pattern: a bare")
    assert said[1] == "p.yaml:4:4: d: 'NotANamespace' is not a namespace: lower"


def test_a_host_name_is_a_host_pattern_without_a_wildcard() -> None:
    r, top = _tree(
        """\
        a: "*.Example.org."
        b: "*.example.org"
        c: API.example.org
        """
    )
    assert fields.host_pattern(r, top["a"], "a") == "*.example.org"
    assert fields.host_name(r, top["b"], "b") is None
    assert fields.host_name(r, top["c"], "c") == "api.example.org"
    assert _said(r) == [
        "p.yaml:2:4: b: '*.example.org' is not a host name: a wildcard names no one server"
    ]


def test_a_section_reads_alone_and_reports_under_its_path() -> None:
    r, top = _tree(
        """\
        proxy:
          port: 15002
          upstream_mark: 0x10
          cgroup_mark_mask: 0x30
          idle_timeout: 0
        """
    )
    got = proxy(r, top["proxy"], "proxy")
    assert got.port == 15002 and got.upstream_mark == 0x10
    assert got.idle_timeout == ProxySettings().idle_timeout
    assert _said(r) == [
        "p.yaml:4:21: proxy.cgroup_mark_mask: cgroup_mark_mask 0x30 shares bits with"
        " upstream_mark 0x10: give the cgroup workloads' marks bits of their own",
        "p.yaml:5:17: proxy.idle_timeout: 0 is out of range: expected a number of seconds"
        " greater than 0 and at most 86400",
    ]
