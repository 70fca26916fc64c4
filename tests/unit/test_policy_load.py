"""The policy loader: the documented example loads to the expected model, and
every kind of mistake is reported at its exact line with its field path."""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.load import PolicyError, Problem, load_policy, parse_policy
from egress_agent.policy.model import (
    Action,
    DnsSettings,
    EgressRule,
    InterceptRule,
    IPNetwork,
    NonTcp,
    Policy,
    PortRange,
    ProxySettings,
    Resolve,
    Workload,
)

REPO = Path(__file__).resolve().parents[2]

# The example of the README / the schema contract, comments and all.
EXAMPLE = """\
version: 1                           # required, must be the integer 1
proxy:                               # optional
  port: 15001
  address_v4: 169.254.99.1
  address_v6: "fd65:6772:6573::1"
  upstream_mark: 0x6567
  peek_bytes: 16384
  peek_timeout: 5
  connect_timeout: 10
  idle_timeout: 300
workloads:
  pg-main: {cidrs: [10.10.1.2/32, "fd00:10:1::2/128"]}
  registry: {cidrs: [10.10.3.0/24], interfaces: [veth-reg]}
intercept:
  - from: [pg-main]
    ports: [443, 80, "8000-8100"]
    except_cidrs: [10.10.0.0/16]
    to_cidrs: []
egress:
  - name: azure-backups
    from: [pg-main]
    to: {hosts: ["pgbackups.blob.core.windows.net", "*.example.org"], cidrs: [], ports: [443]}
    action: allow
default: deny
"""


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def port(first: int, last: int | None = None) -> PortRange:
    return PortRange(first=first, last=first if last is None else last)


def problems_of(text: str) -> tuple[Problem, ...]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), source_name="p.yaml")
    return info.value.problems


def test_example_loads_to_the_expected_model() -> None:
    expected = Policy(
        version=1,
        proxy=ProxySettings(
            port=15001,
            address_v4=ipaddress.IPv4Address("169.254.99.1"),
            address_v6=ipaddress.IPv6Address("fd65:6772:6573::1"),
            upstream_mark=0x6567,
            peek_bytes=16384,
            peek_timeout=5.0,
            connect_timeout=10.0,
            idle_timeout=300.0,
        ),
        workloads=(
            Workload(name="pg-main", cidrs=(net("10.10.1.2/32"), net("fd00:10:1::2/128"))),
            Workload(name="registry", cidrs=(net("10.10.3.0/24"),), interfaces=("veth-reg",)),
        ),
        intercept=(
            InterceptRule(
                index=0,
                sources=("pg-main",),
                ports=(port(443), port(80), port(8000, 8100)),
                except_cidrs=(net("10.10.0.0/16"),),
                to_cidrs=(),
            ),
        ),
        egress=(
            EgressRule(
                name="azure-backups",
                action=Action.ALLOW,
                sources=("pg-main",),
                hosts=("pgbackups.blob.core.windows.net", "*.example.org"),
                cidrs=(),
                ports=(port(443),),
            ),
        ),
        default=Action.DENY,
    )
    policy = parse_policy(EXAMPLE, source_name="example.yaml")
    assert policy == expected
    assert policy.source_name == "example.yaml"
    # Tuples all the way down: the policy is hashable plain data.
    assert isinstance(policy.workloads[0].cidrs, tuple)
    hash(policy)


def test_minimal_policy_gets_the_documented_defaults() -> None:
    policy = parse_policy("version: 1\nworkloads: {}\ndefault: allow\n")
    assert policy.proxy == ProxySettings()
    assert policy.proxy.port == 15001
    assert policy.workloads == ()
    assert policy.intercept == ()
    assert policy.egress == ()
    assert policy.default is Action.ALLOW
    assert policy.source_name == "<policy>"


def test_reverse_path_interfaces_add_to_the_bound_ones() -> None:
    policy = parse_policy(
        "version: 1\nworkloads:\n  web: {cidrs: [10.0.1.0/24], interfaces: [veth-web, eth1]}\n"
        "reverse_path: {interfaces: [cali*, eth1, cali*]}\ndefault: deny\n"
    )
    assert policy.reverse_path.interfaces == ("cali*", "eth1")
    # Bound interfaces first, then the key's, each once.
    assert policy.reverse_path_interfaces() == ("veth-web", "eth1", "cali*")
    plain = parse_policy("version: 1\nworkloads: {}\ndefault: deny\n")
    assert plain.reverse_path_interfaces() == ()


def test_non_tcp_is_pass_unless_a_rule_says_drop() -> None:
    policy = parse_policy(
        "version: 1\nworkloads: {web: {cidrs: [10.0.1.0/24]}}\n"
        "intercept:\n  - {from: [web], non_tcp: drop}\n  - {from: [web]}\n"
        "  - {from: [web], non_tcp: pass}\ndefault: deny\n"
    )
    assert [r.non_tcp for r in policy.intercept] == [NonTcp.DROP, NonTcp.PASS, NonTcp.PASS]


def test_empty_rule_lists_are_allowed() -> None:
    policy = parse_policy("version: 1\nworkloads: {}\nintercept: []\negress: []\ndefault: deny\n")
    assert (policy.intercept, policy.egress, policy.default) == ((), (), Action.DENY)


def test_rule_order_and_intercept_index_are_preserved() -> None:
    policy = parse_policy(
        textwrap.dedent(
            """\
            version: 1
            workloads:
              b: {cidrs: [10.0.2.0/24]}
              a: {cidrs: [10.0.1.0/24]}
            intercept:
              - from: [b]
              - from: [a, b]
                ports: ["1-1024"]
              - from: [a]
                to_cidrs: [192.0.2.0/24]
            egress:
              - {name: z-first, action: deny, to: {ports: [22]}}
              - {name: a-second, action: allow}
              - {name: m-third, action: deny, from: [a]}
            default: deny
            """
        )
    )
    assert [w.name for w in policy.workloads] == ["b", "a"]
    assert [(r.index, r.sources) for r in policy.intercept] == [
        (0, ("b",)),
        (1, ("a", "b")),
        (2, ("a",)),
    ]
    assert policy.intercept[1].ports == (port(1, 1024),)
    assert policy.intercept[2].to_cidrs == (net("192.0.2.0/24"),)
    assert [r.name for r in policy.egress] == ["z-first", "a-second", "m-third"]
    assert policy.egress[0].sources is None  # no `from`: any workload
    assert policy.egress[2].sources == ("a",)


def test_values_are_normalised() -> None:
    policy = parse_policy(
        textwrap.dedent(
            """\
            version: 1
            proxy: {peek_timeout: 0.5, upstream_mark: 4294967295}
            workloads:
              one: {cidrs: [10.0.0.7, "fd00::7", 1:2:3:4:5:6:7:8]}
              2048: {cidrs: [10.9.0.0/16]}
            intercept:
              - from: [2048, one]
            egress:
              - name: hosts
                to: {hosts: [API.Example.ORG., "*.Example.org", xn--bcher-kva.de], ports: [443]}
                action: allow
            default: deny
            """
        )
    )
    assert policy.proxy.peek_timeout == 0.5
    assert policy.proxy.upstream_mark == 0xFFFFFFFF
    # A bare address is the one-address network; an unquoted IPv6 address that
    # YAML 1.1 reads as a base-60 integer is still taken as written.
    assert policy.workload("one").cidrs == (
        net("10.0.0.7/32"),
        net("fd00::7/128"),
        net("1:2:3:4:5:6:7:8/128"),
    )
    # A workload name written as a number is its text, and references match it.
    assert policy.intercept[0].sources == ("2048", "one")
    assert policy.egress[0].hosts == ("api.example.org", "*.example.org", "xn--bcher-kva.de")


def test_overlapping_prefixes_in_different_workloads_are_fine() -> None:
    policy = parse_policy(
        "version: 1\n"
        "workloads:\n"
        "  pods: {cidrs: [10.0.0.0/16, 'fd00::/64']}\n"
        "  pg: {cidrs: [10.0.0.5/32, 'fd00::5/128']}\n"
        "default: deny\n"
    )
    assert [len(w.cidrs) for w in policy.workloads] == [2, 2]


def test_aliases_reuse_a_value() -> None:
    policy = parse_policy(
        textwrap.dedent(
            """\
            version: 1
            workloads:
              a: {cidrs: [10.0.1.0/24]}
            egress:
              - {name: one, from: &who [a], action: allow, to: {ports: &web [80, 443]}}
              - {name: two, from: *who, action: deny, to: {ports: *web}}
            default: deny
            """
        )
    )
    assert policy.egress[0].ports == policy.egress[1].ports == (port(80), port(443))
    assert policy.egress[1].sources == ("a",)


def test_the_demo_policy_loads() -> None:
    policy = load_policy(REPO / "agent" / "demo-policy.yaml")
    assert [w.name for w in policy.workloads] == ["pg-primary", "pg-replica", "registry"]
    assert [r.name for r in policy.egress] == ["azure-backups", "metrics-sink"]


# -- one mistake, one problem ---------------------------------------------------

# Lines 1-5; a case's extra text starts at line 6.
BASE = """\
version: 1
workloads:
  web: {cidrs: [10.0.1.0/24]}
  db: {cidrs: [10.0.2.0/24, "fd00::2/128"]}
default: deny
"""
HEAD = "version: 1\ndefault: deny\n"  # lines 1-2; workloads follow at line 3


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    line: int
    path: str
    message: str


BAD = [
    # The document and its top-level keys.
    Bad(
        "unknown-top-key",
        BASE + "egres: []\n",
        6,
        "egres",
        "unknown key 'egres' (did you mean 'egress'?); allowed keys in the policy: version,",
    ),
    Bad("not-a-mapping", "- version: 1\n", 1, "", "expected the policy (a mapping), found a list"),
    Bad(
        "missing-version",
        "workloads: {}\ndefault: deny\n",
        1,
        "version",
        "missing required key 'version': expected the integer 1",
    ),
    Bad(
        "missing-workloads",
        "version: 1\ndefault: deny\n",
        1,
        "workloads",
        "missing required key 'workloads'",
    ),
    Bad(
        "missing-default",
        "version: 1\nworkloads: {}\n",
        1,
        "default",
        "missing required key 'default': expected allow or deny",
    ),
    Bad(
        "version-2",
        "workloads: {}\ndefault: deny\nversion: 2\n",
        3,
        "version",
        "unsupported version 2",
    ),
    Bad(
        "version-string",
        'version: "1"\nworkloads: {}\ndefault: deny\n',
        1,
        "version",
        "expected the integer 1, found the string '1'",
    ),
    Bad(
        "default-unknown",
        "version: 1\nworkloads: {}\ndefault: allow-all\n",
        3,
        "default",
        "expected allow or deny, found the string 'allow-all'",
    ),
    Bad(
        "default-boolean",
        "version: 1\nworkloads: {}\ndefault: yes\n",
        3,
        "default",
        "expected allow or deny, found the boolean yes",
    ),
    Bad(
        "default-null",
        "version: 1\nworkloads: {}\ndefault:\n",
        3,
        "default",
        "expected allow or deny, found nothing (null)",
    ),
    # proxy
    Bad(
        "proxy-unknown-key",
        BASE + "proxy: {prot: 15001}\n",
        6,
        "proxy.prot",
        "unknown key 'prot' (did you mean 'port'?)",
    ),
    Bad(
        "proxy-not-mapping",
        BASE + "proxy: [15001]\n",
        6,
        "proxy",
        "expected proxy settings (a mapping), found a list",
    ),
    Bad(
        "proxy-port-0",
        BASE + "proxy:\n  port: 0\n",
        7,
        "proxy.port",
        "0 is out of range: expected an integer 1-65535",
    ),
    Bad(
        "proxy-port-65536",
        BASE + "proxy:\n  port: 65536\n",
        7,
        "proxy.port",
        "65536 is out of range",
    ),
    Bad(
        "proxy-port-string",
        BASE + 'proxy:\n  port: "15001"\n',
        7,
        "proxy.port",
        "expected an integer 1-65535, found the string '15001'",
    ),
    Bad(
        "proxy-port-float",
        BASE + "proxy:\n  port: 15001.0\n",
        7,
        "proxy.port",
        "found the number 15001.0",
    ),
    Bad(
        "proxy-address-v4-is-v6",
        BASE + 'proxy:\n  address_v4: "fd00::1"\n',
        7,
        "proxy.address_v4",
        "'fd00::1' is not an IPv4 address: expected one like 169.254.99.1",
    ),
    Bad(
        "proxy-address-v6-is-v4",
        BASE + "proxy:\n  address_v6: 169.254.99.1\n",
        7,
        "proxy.address_v6",
        "'169.254.99.1' is not an IPv6 address",
    ),
    Bad(
        "proxy-address-v4-garbage",
        BASE + "proxy:\n  address_v4: 169.254.99\n",
        7,
        "proxy.address_v4",
        "'169.254.99' is not an IPv4 address",
    ),
    Bad(
        "upstream-mark-0",
        BASE + "proxy:\n  upstream_mark: 0\n",
        7,
        "proxy.upstream_mark",
        "expected an integer 0x1-0xffffffff",
    ),
    Bad(
        "upstream-mark-33-bits",
        BASE + "proxy:\n  upstream_mark: 0x100000000\n",
        7,
        "proxy.upstream_mark",
        "0x100000000 is out of range",
    ),
    Bad(
        "peek-bytes-small",
        BASE + "proxy:\n  peek_bytes: 511\n",
        7,
        "proxy.peek_bytes",
        "expected an integer 512-65536",
    ),
    Bad(
        "max-connections-0",
        BASE + "proxy:\n  max_connections: 0\n",
        7,
        "proxy.max_connections",
        "0 is out of range: expected an integer 1-1000000",
    ),
    Bad(
        "per-workload-cap-above-the-total",
        BASE + "proxy:\n  max_connections: 100\n  max_connections_per_workload: 500\n",
        8,
        "proxy.max_connections_per_workload",
        "max_connections_per_workload 500 is above max_connections 100: no workload could"
        " reach it; lower it or raise max_connections",
    ),
    Bad(
        "peek-timeout-0",
        BASE + "proxy:\n  peek_timeout: 0\n",
        7,
        "proxy.peek_timeout",
        "0 is out of range: expected a number of seconds greater than 0 and at most 60",
    ),
    Bad(
        "peek-timeout-too-long",
        BASE + "proxy:\n  peek_timeout: 60.5\n",
        7,
        "proxy.peek_timeout",
        "at most 60",
    ),
    Bad(
        "peek-timeout-units",
        BASE + "proxy:\n  peek_timeout: 5s\n",
        7,
        "proxy.peek_timeout",
        "found the string '5s'",
    ),
    Bad(
        "connect-timeout-bool",
        BASE + "proxy:\n  connect_timeout: true\n",
        7,
        "proxy.connect_timeout",
        "found the boolean true",
    ),
    Bad(
        "idle-timeout-too-long",
        BASE + "proxy:\n  idle_timeout: 86401\n",
        7,
        "proxy.idle_timeout",
        "at most 86400",
    ),
    Bad(
        "idle-timeout-nan",
        BASE + "proxy:\n  idle_timeout: .nan\n",
        7,
        "proxy.idle_timeout",
        ".nan is out of range",
    ),
    Bad(
        "idle-timeout-inf",
        BASE + "proxy:\n  idle_timeout: .inf\n",
        7,
        "proxy.idle_timeout",
        ".inf is out of range",
    ),
    Bad(
        "relay-unknown",
        BASE + "proxy:\n  relay: sockmap\n",
        7,
        "proxy.relay",
        "expected kernel (bytes move socket to socket in the kernel",
    ),
    # workloads
    Bad(
        "workloads-list",
        HEAD + "workloads: [web]\n",
        3,
        "workloads",
        "expected workloads (name: {cidrs: [...]}), found a list",
    ),
    Bad(
        "workload-name",
        HEAD + "workloads:\n  -web: {cidrs: [10.0.0.0/8]}\n",
        4,
        "workloads.-web",
        "'-web' is not a valid name: expected 1-63 characters",
    ),
    Bad(
        "workload-name-too-long",
        HEAD + f"workloads:\n  {'w' * 64}: {{cidrs: [10.0.0.0/8]}}\n",
        4,
        f"workloads.{'w' * 64}",
        "is not a valid name",
    ),
    Bad(
        "workload-name-boolean",
        HEAD + "workloads:\n  yes: {cidrs: [10.0.0.0/8]}\n",
        4,
        "workloads",
        "expected a key (a string), found the boolean yes; quote it",
    ),
    Bad(
        "workload-not-mapping",
        HEAD + "workloads:\n  web: [10.0.0.0/8]\n",
        4,
        "workloads.web",
        "expected workload 'web' (a mapping), found a list",
    ),
    Bad(
        "workload-missing-cidrs",
        HEAD + "workloads:\n  web: {interfaces: [eth0]}\n",
        4,
        "workloads.web.cidrs",
        "missing required key 'cidrs'",
    ),
    Bad(
        "workload-unknown-key",
        HEAD + "workloads:\n  web:\n    cidrs: [10.0.0.0/8]\n    cidr: [10.1.0.0/16]\n",
        6,
        "workloads.web.cidr",
        "unknown key 'cidr' (did you mean 'cidrs'?); allowed keys",
    ),
    Bad(
        "workload-no-cidrs",
        HEAD + "workloads:\n  web: {cidrs: []}\n",
        4,
        "workloads.web.cidrs",
        "workload 'web' needs at least one CIDR",
    ),
    Bad(
        "cidrs-not-list",
        HEAD + "workloads:\n  web: {cidrs: 10.0.0.0/8}\n",
        4,
        "workloads.web.cidrs",
        "expected a list of CIDRs, found the string '10.0.0.0/8'",
    ),
    Bad(
        "cidr-prefix-33",
        HEAD + "workloads:\n  web:\n    cidrs: [10.0.0.0/8, 10.0.0.0/33]\n",
        5,
        "workloads.web.cidrs[1]",
        "'10.0.0.0/33' is not a valid CIDR: expected an IPv4 or IPv6 network like 10.0.0.0/16",
    ),
    Bad(
        "cidr-garbage",
        HEAD + "workloads:\n  web: {cidrs: [ten.zero]}\n",
        4,
        "workloads.web.cidrs[0]",
        "'ten.zero' is not a valid CIDR",
    ),
    Bad(
        "cidr-host-bits",
        HEAD + "workloads:\n  web: {cidrs: [10.0.1.5/24]}\n",
        4,
        "workloads.web.cidrs[0]",
        "'10.0.1.5/24' has host bits set: write the network 10.0.1.0/24, or 10.0.1.5/32",
    ),
    Bad(
        "cidr-host-bits-v6",
        HEAD + "workloads:\n  web: {cidrs: ['fd00::1/64']}\n",
        4,
        "workloads.web.cidrs[0]",
        "write the network fd00::/64, or fd00::1/128",
    ),
    Bad(
        "cidr-null",
        HEAD + "workloads:\n  web: {cidrs: [~]}\n",
        4,
        "workloads.web.cidrs[0]",
        "found nothing (null)",
    ),
    Bad(
        "cidr-ipv4-mapped",
        HEAD + "workloads:\n  web: {cidrs: ['::ffff:10.0.0.0/104']}\n",
        4,
        "workloads.web.cidrs[0]",
        "IPv4-mapped IPv6 network: policy compares IPv4 traffic by"
        " its IPv4 address, write 10.0.0.0/8",
    ),
    Bad(
        "cidr-zone",
        HEAD + "workloads:\n  web: {cidrs: ['fe80::1%eth0']}\n",
        4,
        "workloads.web.cidrs[0]",
        "has an IPv6 zone",
    ),
    Bad(
        "cidr-in-two-workloads",
        HEAD + "workloads:\n  a: {cidrs: [10.0.0.0/24]}\n"
        "  b: {cidrs: [10.9.0.0/16, 10.0.0.0/24]}\n",
        5,
        "workloads.b.cidrs[1]",
        "10.0.0.0/24 is also a CIDR of workload 'a' (line 4): an address must identify one",
    ),
    Bad(
        "address-in-two-workloads",
        HEAD + "workloads:\n  a: {cidrs: [10.0.0.7/32]}\n  b: {cidrs: [10.0.0.7]}\n",
        5,
        "workloads.b.cidrs[0]",
        "10.0.0.7/32 is also a CIDR of workload 'a'",
    ),
    Bad(
        "v6-cidr-in-two-workloads-spelled-differently",
        HEAD + "workloads:\n  a: {cidrs: ['fd00:0:0::/64']}\n  b: {cidrs: ['FD00::/64']}\n",
        5,
        "workloads.b.cidrs[0]",
        "fd00::/64 is also a CIDR of workload 'a'",
    ),
    Bad(
        "interface-too-long",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: [veth0123456789ab]}\n",
        4,
        "workloads.web.interfaces[0]",
        "'veth0123456789ab' is not a valid interface name: Linux interface names are at most 15",
    ),
    Bad(
        "interface-slash",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: [eth0, eth/1]}\n",
        4,
        "workloads.web.interfaces[1]",
        "'/', ':' and whitespace are not allowed",
    ),
    Bad(
        "interface-space",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: ['eth 1']}\n",
        4,
        "workloads.web.interfaces[0]",
        "whitespace are not allowed",
    ),
    Bad(
        "interface-dotdot",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: ['..']}\n",
        4,
        "workloads.web.interfaces[0]",
        "'.' and '..' are not allowed",
    ),
    Bad(
        "interface-empty",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: ['']}\n",
        4,
        "workloads.web.interfaces[0]",
        "it is empty",
    ),
    Bad(
        "interfaces-not-list",
        HEAD + "workloads:\n  web: {cidrs: [10.0.0.0/8], interfaces: eth0}\n",
        4,
        "workloads.web.interfaces",
        "expected a list of interface names, found the string",
    ),
    # intercept
    Bad(
        "intercept-not-list",
        BASE + "intercept: {from: [web]}\n",
        6,
        "intercept",
        "expected a list of intercept rules ([] for none), found a mapping",
    ),
    Bad(
        "intercept-null", BASE + "intercept:\negress: []\n", 6, "intercept", "found nothing (null)"
    ),
    Bad(
        "intercept-rule-string",
        BASE + "intercept:\n  - web\n",
        7,
        "intercept[0]",
        "expected an intercept rule (a mapping), found the string 'web'",
    ),
    Bad(
        "intercept-unknown-key",
        BASE + "intercept:\n  - from: [web]\n    to_cidr: []\n",
        8,
        "intercept[0].to_cidr",
        "unknown key 'to_cidr' (did you mean 'to_cidrs'?)",
    ),
    Bad(
        "intercept-missing-from",
        BASE + "intercept:\n  - {from: [web]}\n  - ports: [443]\n",
        8,
        "intercept[1].from",
        "missing required key 'from'",
    ),
    Bad(
        "intercept-from-empty",
        BASE + "intercept:\n  - from: []\n",
        7,
        "intercept[0].from",
        "expected at least one workload name",
    ),
    Bad(
        "intercept-from-not-list",
        BASE + "intercept:\n  - from: web\n",
        7,
        "intercept[0].from",
        "expected a list of workload names, found the string 'web'",
    ),
    Bad(
        "intercept-from-unknown",
        BASE + "intercept:\n  - from: [web, wbe]\n",
        7,
        "intercept[0].from[1]",
        "unknown workload 'wbe' (did you mean 'web'?); workloads: db, web",
    ),
    Bad(
        "intercept-from-without-workloads",
        "version: 1\nworkloads: {}\nintercept:\n  - from: [web]\ndefault: deny\n",
        4,
        "intercept[0].from[0]",
        "unknown workload 'web'; workloads: none are defined",
    ),
    Bad(
        "intercept-non-tcp-unknown",
        BASE + "intercept:\n  - from: [web]\n    non_tcp: block\n",
        8,
        "intercept[0].non_tcp",
        "expected pass (non-TCP traffic of the rule's workloads goes where it is sent; the "
        "default) or drop (it is dropped in the kernel, replies and related ICMP errors "
        "excepted), found the string 'block'",
    ),
    Bad(
        "port-0",
        BASE + "intercept:\n  - from: [web]\n    ports: [443, 0]\n",
        8,
        "intercept[0].ports[1]",
        "port 0 is out of range",
    ),
    Bad(
        "port-65536",
        BASE + "intercept:\n  - from: [web]\n    ports: [65536]\n",
        8,
        "intercept[0].ports[0]",
        "port 65536 is out of range",
    ),
    Bad(
        "port-range-reversed",
        BASE + "intercept:\n  - from: [web]\n    ports: ['90-80']\n",
        8,
        "intercept[0].ports[0]",
        "'90-80' is not a port range: the first port must not be greater",
    ),
    Bad(
        "port-range-high",
        BASE + "intercept:\n  - from: [web]\n    ports: ['1-70000']\n",
        8,
        "intercept[0].ports[0]",
        "'1-70000' is out of range: ports are 1-65535",
    ),
    Bad(
        "port-range-0",
        BASE + "intercept:\n  - from: [web]\n    ports: ['0-80']\n",
        8,
        "intercept[0].ports[0]",
        "'0-80' is out of range",
    ),
    Bad(
        "port-boolean",
        BASE + "intercept:\n  - from: [web]\n    ports: [yes]\n",
        8,
        "intercept[0].ports[0]",
        "found the boolean yes",
    ),
    Bad(
        "port-name",
        BASE + "intercept:\n  - from: [web]\n    ports: [https]\n",
        8,
        "intercept[0].ports[0]",
        "'https' is not a port range: expected a port 1-65535 or a range string like \"8000-8100\"",
    ),
    Bad(
        "port-float",
        BASE + "intercept:\n  - from: [web]\n    ports: [443.0]\n",
        8,
        "intercept[0].ports[0]",
        "found the number 443.0",
    ),
    Bad(
        "port-base-60",
        BASE + "intercept:\n  - from: [web]\n    ports:\n      - 80:59\n",
        9,
        "intercept[0].ports[0]",
        "80:59 is a YAML 1.1 base-60 number, not a port range",
    ),
    Bad(
        "port-mapping",
        BASE + "intercept:\n  - from: [web]\n    ports: [{port: 80}]\n",
        8,
        "intercept[0].ports[0]",
        "found a mapping",
    ),
    Bad(
        "except-cidrs-bad",
        BASE + "intercept:\n  - from: [web]\n    except_cidrs: [11.0.0.0/7]\n",
        8,
        "intercept[0].except_cidrs[0]",
        "'11.0.0.0/7' has host bits set: write the network 10.0.0.0/7",
    ),
    Bad(
        "to-cidrs-not-list",
        BASE + "intercept:\n  - from: [web]\n    to_cidrs: 10.0.0.0/8\n",
        8,
        "intercept[0].to_cidrs",
        "expected a list of CIDRs",
    ),
    # egress
    Bad(
        "egress-not-list",
        BASE + "egress:\n  name: x\n",
        7,
        "egress",
        "expected a list of egress rules ([] for none), found a mapping",
    ),
    Bad(
        "egress-missing-name",
        BASE + "egress:\n  - {action: allow}\n",
        7,
        "egress[0].name",
        "missing required key 'name'",
    ),
    Bad(
        "egress-missing-action",
        BASE + "egress:\n  - {name: x}\n",
        7,
        "egress[0].action",
        "missing required key 'action': expected allow or deny",
    ),
    Bad(
        "egress-action-unknown",
        BASE + "egress:\n  - name: x\n    action: permit\n",
        8,
        "egress[0].action",
        "expected allow or deny, found the string 'permit'",
    ),
    Bad(
        "egress-name-invalid",
        BASE + "egress:\n  - {name: 'no spaces', action: allow}\n",
        7,
        "egress[0].name",
        "'no spaces' is not a valid name",
    ),
    Bad(
        "egress-name-default",
        BASE + "egress:\n  - {name: default, action: allow}\n",
        7,
        "egress[0].name",
        "'default' is reserved",
    ),
    Bad(
        "egress-name-duplicate",
        BASE + "egress:\n  - name: web-out\n    action: allow\n"
        "  - name: web-out\n    action: deny\n",
        9,
        "egress[1].name",
        "duplicate egress rule name 'web-out': already used at line 7",
    ),
    Bad(
        "egress-unknown-key",
        BASE + "egress:\n  - {name: x, action: allow, form: [web]}\n",
        7,
        "egress[0].form",
        "unknown key 'form' (did you mean 'from'?)",
    ),
    Bad(
        "egress-from-empty",
        BASE + "egress:\n  - {name: x, action: allow, from: []}\n",
        7,
        "egress[0].from",
        "leave out `from` to match traffic from any workload",
    ),
    Bad(
        "egress-from-null",
        BASE + "egress:\n  - name: x\n    action: allow\n    from:\n",
        9,
        "egress[0].from",
        "expected a list of workload names, found nothing (null)",
    ),
    Bad(
        "egress-from-unknown",
        BASE + "egress:\n  - {name: x, action: allow, from: [dbs]}\n",
        7,
        "egress[0].from[0]",
        "unknown workload 'dbs' (did you mean 'db'?); workloads: db, web",
    ),
    Bad(
        "egress-to-list",
        BASE + "egress:\n  - {name: x, action: allow, to: [443]}\n",
        7,
        "egress[0].to",
        "expected a destination (a mapping), found a list",
    ),
    Bad(
        "egress-to-unknown-key",
        BASE + "egress:\n  - name: x\n    action: allow\n    to:\n      host: [example.org]\n",
        10,
        "egress[0].to.host",
        "unknown key 'host' (did you mean 'hosts'?); allowed keys in a destination: hosts,"
        " cidrs, ports",
    ),
    Bad(
        "egress-to-port-bad",
        BASE + "egress:\n  - {name: x, action: allow, to: {ports: [80, 0]}}\n",
        7,
        "egress[0].to.ports[1]",
        "port 0 is out of range",
    ),
    Bad(
        "egress-to-cidr-bad",
        BASE + "egress:\n  - {name: x, action: allow, to: {cidrs: [300.0.0.0/8]}}\n",
        7,
        "egress[0].to.cidrs[0]",
        "'300.0.0.0/8' is not a valid CIDR",
    ),
    # hosts
    *(
        Bad(
            f"host-{i}",
            BASE + f"egress:\n  - name: x\n    action: allow\n    to:\n"
            f"      hosts:\n        - example.org\n        - {host}\n",
            12,
            "egress[0].to.hosts[1]",
            message,
        )
        for i, (host, message) in enumerate(
            [
                ("'*'", "'*' is not a host name pattern: a bare '*' is not allowed"),
                ("a.*.example.org", "a wildcard is only allowed as the whole first label"),
                ("'*foo.example.org'", "a wildcard is only allowed as the whole first label"),
                ("'*.*.example.org'", "a wildcard is only allowed as the whole first label"),
                ("exa mple.org", "label 'exa mple' must be 1-63 letters, digits or hyphens"),
                ("https://example.org/", "a host name, not a URL"),
                ("example.org:443", "a host name, not a URL"),
                ("under_score.example.org", "label 'under_score' must be"),
                ("a..example.org", "it has an empty label"),
                (".example.org", "it has an empty label"),
                ("bücher.de", "write international names in their xn-- (punycode) form"),
                ("'" + "a" * 64 + ".example.org'", "must be 1-63 letters"),
                ("'" + ".".join(["a" * 63] * 4) + "'", "a DNS name is at most 253 characters"),
                ("''", "it is empty"),
                ("[example.org]", "expected a host name like api.example.org, found a list"),
            ]
        )
    ),
    Bad(
        "hosts-not-list",
        BASE + "egress:\n  - {name: x, action: allow, to: {hosts: example.org}}\n",
        7,
        "egress[0].to.hosts",
        "expected a list of host names, found the string 'example.org'",
    ),
    # YAML features that would hide mistakes
    Bad(
        "duplicate-top-key",
        BASE + "default: allow\n",
        6,
        "default",
        "duplicate key 'default': already given at line 5; keep only one",
    ),
    Bad(
        "duplicate-workload",
        HEAD + "workloads:\n  web: {cidrs: [10.0.1.0/24]}\n  web: {cidrs: [10.0.2.0/24]}\n",
        5,
        "workloads.web",
        "duplicate key 'web': already given at line 4",
    ),
    Bad(
        "duplicate-key-in-to",
        BASE + "egress:\n  - {name: x, action: allow, to: {ports: [443], ports: [80]}}\n",
        7,
        "egress[0].to.ports",
        "duplicate key 'ports'",
    ),
    Bad(
        "merge-key",
        BASE + "egress:\n  - {<<: {name: x}, action: allow, name: y}\n",
        7,
        "egress[0]",
        "merge keys (<<) are not supported",
    ),
    Bad(
        "reverse-path-bare-star",
        BASE + "reverse_path: {interfaces: [cali*, '*']}\n",
        6,
        "reverse_path.interfaces[1]",
        "'*' is not an interface name or pattern: a bare '*' would check every interface",
    ),
    Bad(
        "reverse-path-inner-star",
        BASE + "reverse_path:\n  interfaces:\n    - ve*th\n",
        8,
        "reverse_path.interfaces[0]",
        "'*' may only end a pattern, as in 'veth*'",
    ),
    Bad(
        "reverse-path-long-name",
        BASE + "reverse_path: {interfaces: [veth0123456789ab*]}\n",
        6,
        "reverse_path.interfaces[0]",
        "Linux interface names are at most 15 bytes",
    ),
    Bad(
        "reverse-path-unknown-key",
        BASE + "reverse_path: {interface: [veth*]}\n",
        6,
        "reverse_path.interface",
        "unknown key 'interface' (did you mean 'interfaces'?)",
    ),
    Bad(
        "reverse-path-not-a-list",
        BASE + "reverse_path: {interfaces: veth*}\n",
        6,
        "reverse_path.interfaces",
        "expected a list of interface names or patterns",
    ),
    Bad(
        "unknown-tag",
        BASE + "proxy: {port: !port 80}\n",
        6,
        "proxy.port",
        "cannot read '80' as !port",
    ),
    # Names bound to addresses.
    Bad(
        "resolve-unknown",
        BASE + "egress:\n  - {name: x, action: allow, to: {hosts: [a.test], resolve: off}}\n",
        7,
        "egress[0].to.resolve",
        "expected one of verify (the original destination must be one of the name's"
        " addresses; the default); connect (",
    ),
    Bad(
        "resolve-without-hosts",
        BASE + "egress:\n  - {name: x, action: allow, to: {ports: [25], resolve: connect}}\n",
        7,
        "egress[0].to.resolve",
        "resolve says how a rule's hosts are bound to addresses, and this rule has no hosts",
    ),
    Bad(
        "resolve-on-deny",
        BASE + "egress:\n  - {name: x, action: deny, to: {hosts: [a.test], resolve: none}}\n",
        7,
        "egress[0].to.resolve",
        "resolve applies to allow rules only",
    ),
    Bad(
        "dns-unknown-key",
        BASE + "dns: {min_tll: 5}\n",
        6,
        "dns.min_tll",
        "unknown key 'min_tll' (did you mean 'min_ttl'?)",
    ),
    Bad(
        "dns-max-below-min",
        BASE + "dns: {min_ttl: 60, max_ttl: 30}\n",
        6,
        "dns.max_ttl",
        "max_ttl 30 is below min_ttl 60: the ceiling on TTLs must be at least the floor",
    ),
    Bad(
        "dns-min-above-default-max",
        BASE + "dns: {min_ttl: 600}\n",
        6,
        "dns.min_ttl",
        "min_ttl 600 is above max_ttl (300, the default): set a max_ttl of at least the floor",
    ),
    Bad(
        "dns-negative-stale",
        BASE + "dns: {serve_stale: -1}\n",
        6,
        "dns.serve_stale",
        "-1 is out of range",
    ),
    Bad(
        "dns-cache-size",
        BASE + "dns: {cache_size: 1}\n",
        6,
        "dns.cache_size",
        "1 is out of range: expected an integer 16-1000000",
    ),
]


def test_names_are_verified_unless_a_rule_says_otherwise() -> None:
    policy = parse_policy(
        BASE
        + "egress:\n"
        + "  - {name: a, action: allow, to: {hosts: [a.test]}}\n"
        + "  - {name: b, action: allow, to: {hosts: [b.test], resolve: connect}}\n"
        + "  - {name: c, action: allow, to: {hosts: [c.test], resolve: none}}\n"
        + "dns: {min_ttl: 1, max_ttl: 60, serve_stale: 0, timeout: 0.5, cache_size: 100}\n",
        source_name="p.yaml",
    )
    assert [r.resolve for r in policy.egress] == [Resolve.VERIFY, Resolve.CONNECT, Resolve.NONE]
    assert policy.dns == DnsSettings(
        min_ttl=1, max_ttl=60, serve_stale=0, timeout=0.5, cache_size=100
    )
    assert parse_policy(BASE).dns == DnsSettings()


def test_bad_table_is_big_enough() -> None:
    assert len(BAD) >= 25
    assert len({case.id for case in BAD}) == len(BAD)


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_input_reports_one_problem_at_its_place(case: Bad) -> None:
    problems = problems_of(case.text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    [problem] = problems
    assert (problem.file, problem.line, problem.path) == ("p.yaml", case.line, case.path)
    assert problem.column >= 1
    assert case.message in problem.message, problem.message


def test_columns_point_at_the_offending_node() -> None:
    text = BASE + "egress:\n  - {name: x, action: allow, to: {ports: [80, 0]}}\n"
    [problem] = problems_of(text)
    assert (problem.line, problem.column) == (7, 47)
    assert text.splitlines()[6][problem.column - 1] == "0"


def test_missing_key_points_at_the_mapping_that_lacks_it() -> None:
    [problem] = problems_of(BASE + "egress:\n  - name: x\n    from: [web]\n")
    assert (problem.line, problem.column, problem.path) == (7, 5, "egress[0].action")


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = textwrap.dedent(
        """\
        version: 2
        proxy: {port: 0, peek_bytes: 100}
        workloads:
          a: {cidrs: [10.0.0.1/8]}
          b: {cidrs: []}
        intercept:
          - from: [c]
            ports: ["90-80"]
        egress:
          - {name: x, action: allow, to: {hosts: ["*"]}}
          - {name: x, action: maybe}
        default: deny
        """
    )
    problems = problems_of(text)
    assert [(p.line, p.path) for p in problems] == [
        (1, "version"),
        (2, "proxy.port"),
        (2, "proxy.peek_bytes"),
        (4, "workloads.a.cidrs[0]"),
        (5, "workloads.b.cidrs"),
        (7, "intercept[0].from[0]"),
        (8, "intercept[0].ports[0]"),
        (10, "egress[0].to.hosts[0]"),
        (11, "egress[1].name"),
        (11, "egress[1].action"),
    ]


def test_problems_are_in_file_order_whatever_the_order_of_sections() -> None:
    text = textwrap.dedent(
        """\
        default: maybe
        egress:
          - {name: x, action: allow, from: [nobody]}
        workloads:
          a: {cidrs: [10.0.0.0/33]}
        proxy: {port: 0}
        version: 1
        """
    )
    assert [(p.line, p.path) for p in problems_of(text)] == [
        (1, "default"),
        (3, "egress[0].from[0]"),
        (5, "workloads.a.cidrs[0]"),
        (6, "proxy.port"),
    ]


def test_a_workload_with_invalid_contents_is_still_a_known_name() -> None:
    # The reference to `a` is fine: only the CIDR is wrong, reported once.
    problems = problems_of(
        "version: 1\nworkloads:\n  a: {cidrs: [bad]}\nintercept: [{from: [a]}]\ndefault: deny\n"
    )
    assert [p.path for p in problems] == ["workloads.a.cidrs[0]"]


def test_unusable_workloads_section_does_not_cascade_into_references() -> None:
    problems = problems_of("version: 1\nworkloads: [a]\nintercept: [{from: [a]}]\ndefault: deny\n")
    assert [p.path for p in problems] == ["workloads"]


def test_str_of_policy_error_lists_file_line_column_path_message() -> None:
    text = "version: 1\nworkloads:\n  web: {cidrs: [10.0.0.0/33]}\ndefault: nope\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source_name="policy.yaml")
    assert str(info.value).splitlines() == [
        "policy.yaml:3:17: workloads.web.cidrs[0]: '10.0.0.0/33' is not a valid CIDR:"
        " expected an IPv4 or IPv6 network like 10.0.0.0/16",
        "policy.yaml:4:10: default: expected allow or deny, found the string 'nope'",
    ]
    assert str(info.value.problems[1]) == (
        "policy.yaml:4:10: default: expected allow or deny, found the string 'nope'"
    )


def test_problem_without_path_omits_it() -> None:
    problem = Problem(file="f.yaml", line=2, column=3, path="", message="bad")
    assert str(problem) == "f.yaml:2:3: bad"


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            "version: 1\nworkloads: [a\ndefault: deny\n",
            3,
            8,
            "YAML syntax error: expected ',' or ']', but got ':'",
        ),
        (
            "version: 1\nworkloads: {}\n\tdefault: deny\n",
            3,
            1,
            "found character '\\t' that cannot start any token",
        ),
        (
            "version: 1\nworkloads: {}\ndefault: deny: allow\n",
            3,
            14,
            "mapping values are not allowed here",
        ),
        ("version: 1\nworkloads: {}\ndefault: *d\n", 3, 10, "found undefined alias 'd'"),
        (
            "version: 1\nworkloads: {}\ndefault: deny\n---\nversion: 1\n",
            4,
            1,
            "found another document",
        ),
        (
            "version: 1\nworkloads: {}\ndefault: d\x07eny\n",
            3,
            11,
            "YAML cannot read this character",
        ),
    ],
    ids=["unclosed-flow", "tab", "nested-colon", "undefined-alias", "two-documents", "control"],
)
def test_yaml_syntax_error_location(text: str, line: int, column: int, message: str) -> None:
    [problem] = problems_of(text)
    assert (problem.line, problem.column, problem.path) == (line, column, "")
    assert message in problem.message, problem.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_a_clear_problem(text: str) -> None:
    [problem] = problems_of(text)
    assert (problem.line, problem.column, problem.path) == (1, 1, "")
    assert "the policy is empty" in problem.message


def test_load_policy_reads_the_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE, encoding="utf-8")
    policy = load_policy(path)
    assert policy.source_name == str(path)
    assert policy == parse_policy(EXAMPLE)
    assert load_policy(str(path)) == policy


def test_load_policy_problems_carry_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nworkloads: {}\ndefault: maybe\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}:3:10: default: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.column) == (str(path), 0, 0)
    assert "no such file: check the path" in problem.message
    assert str(info.value) == f"{path}:0:0: {problem.message}"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [problem] = info.value.problems
    assert problem.line == 0
    assert "directory: give the path of the policy file" in problem.message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    [problem] = info.value.problems
    assert problem.line == 0
    assert "not UTF-8 text (byte 16 cannot be decoded): save it as UTF-8" in problem.message


# -- round trip -------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
labels = st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True)
dns_names = st.lists(labels, min_size=1, max_size=3).map(".".join)
host_patterns = st.tuples(st.booleans(), dns_names).map(lambda t: ("*." if t[0] else "") + t[1])


def _network(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, prefixlen: int) -> IPNetwork:
    return ipaddress.ip_network((addr, prefixlen % (addr.max_prefixlen + 1)), strict=False)


def _not_mapped(n: IPNetwork) -> bool:
    return not (n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped)


any_networks = st.builds(_network, st.ip_addresses(), st.integers(0, 128)).filter(_not_mapped)
port_ranges = st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(
    lambda t: PortRange(first=min(t), last=max(t))
)
seconds = st.one_of(st.integers(1, 60), st.floats(0, 60, exclude_min=True, allow_nan=False))


def _port_yaml(p: PortRange) -> int | str:
    return p.first if p.first == p.last else f"{p.first}-{p.last}"


@st.composite
def policy_documents(draw: st.DrawFn) -> tuple[dict[str, Any], Policy]:
    """A random valid policy as a YAML-ready document and as the model it means."""
    wl_names = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    nets = draw(st.lists(any_networks, min_size=len(wl_names), max_size=8, unique=True))
    workloads = []
    for i, name in enumerate(wl_names):
        cidrs = tuple(nets[j] for j in range(i, len(nets), len(wl_names)))
        interfaces = tuple(
            draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.-]{0,14}", fullmatch=True), max_size=2))
        )
        workloads.append(Workload(name=name, cidrs=cidrs, interfaces=interfaces))
    sources = st.lists(st.sampled_from(wl_names), min_size=1, max_size=3).map(tuple)
    intercept = tuple(
        InterceptRule(
            index=i,
            sources=draw(sources),
            ports=tuple(draw(st.lists(port_ranges, max_size=3))),
            except_cidrs=tuple(draw(st.lists(any_networks, max_size=2))),
            to_cidrs=tuple(draw(st.lists(any_networks, max_size=2))),
        )
        for i in range(draw(st.integers(0, 3)))
    )
    rule_names = draw(st.lists(names.filter(lambda n: n != "default"), max_size=4, unique=True))
    egress = tuple(
        EgressRule(
            name=name,
            action=draw(st.sampled_from(Action)),
            sources=draw(st.one_of(st.none(), sources)),
            hosts=tuple(draw(st.lists(host_patterns, max_size=3))),
            cidrs=tuple(draw(st.lists(any_networks, max_size=2))),
            ports=tuple(draw(st.lists(port_ranges, max_size=3))),
        )
        for name in rule_names
    )
    proxy = ProxySettings(
        port=draw(st.integers(1, 65535)),
        address_v4=ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1))),
        address_v6=ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1))),
        upstream_mark=draw(st.integers(1, 0xFFFFFFFF)),
        peek_bytes=draw(st.integers(512, 65536)),
        peek_timeout=draw(seconds),
        connect_timeout=draw(seconds),
        idle_timeout=draw(seconds),
        max_connections=(total := draw(st.integers(1, 1_000_000))),
        max_connections_per_workload=draw(st.integers(1, total)),
        relay=draw(st.sampled_from(["kernel", "userspace"])),
    )
    policy = Policy(
        version=1,
        proxy=proxy,
        workloads=tuple(workloads),
        intercept=intercept,
        egress=egress,
        default=draw(st.sampled_from(Action)),
    )

    def host_yaml(h: str) -> str:  # any case and a trailing dot load the same
        return draw(st.sampled_from([h, h.upper(), h + "."]))

    doc: dict[str, Any] = {
        "version": 1,
        "proxy": {
            "port": proxy.port,
            "address_v4": str(proxy.address_v4),
            "address_v6": str(proxy.address_v6),
            "upstream_mark": proxy.upstream_mark,
            "peek_bytes": proxy.peek_bytes,
            "peek_timeout": proxy.peek_timeout,
            "connect_timeout": proxy.connect_timeout,
            "idle_timeout": proxy.idle_timeout,
            "max_connections": proxy.max_connections,
            "max_connections_per_workload": proxy.max_connections_per_workload,
            "relay": proxy.relay,
        },
        "workloads": {
            w.name: {"cidrs": [str(n) for n in w.cidrs]}
            | ({"interfaces": list(w.interfaces)} if w.interfaces else {})
            for w in workloads
        },
        "intercept": [
            {
                "from": list(r.sources),
                "ports": [_port_yaml(p) for p in r.ports],
                "except_cidrs": [str(n) for n in r.except_cidrs],
                "to_cidrs": [str(n) for n in r.to_cidrs],
            }
            for r in intercept
        ],
        "egress": [
            {"name": r.name}
            | ({"from": list(r.sources)} if r.sources is not None else {})
            | {
                "to": {
                    "hosts": [host_yaml(h) for h in r.hosts],
                    "cidrs": [str(n) for n in r.cidrs],
                    "ports": [_port_yaml(p) for p in r.ports],
                },
                "action": r.action.value,
            }
            for r in egress
        ],
        "default": policy.default.value,
    }
    return doc, policy


@settings(max_examples=200, deadline=None)
@given(policy_documents(), st.booleans())
def test_any_valid_policy_round_trips(generated: tuple[dict[str, Any], Policy], flow: bool) -> None:
    doc, expected = generated
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=flow)
    assert parse_policy(text) == expected


@pytest.mark.parametrize(("value", "close"), [("keep", False), ("close", True)])
def test_on_reload_denied_connections(value: str, close: bool) -> None:
    base = "version: 1\nworkloads: {}\ndefault: deny\n"
    text = base + f"on_reload: {{denied_connections: {value}}}\n"
    assert parse_policy(text).close_denied_on_reload is close
    assert parse_policy(base).close_denied_on_reload is False


def test_on_reload_bad_value_names_the_choices() -> None:
    text = "version: 1\nworkloads: {}\ndefault: deny\non_reload: {denied_connections: drop}\n"
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source_name="p.yaml")
    (problem,) = err.value.problems
    assert (problem.line, problem.path) == (4, "on_reload.denied_connections")
    assert "expected keep" in problem.message and "close" in problem.message


@pytest.mark.parametrize(("value", "fail_open"), [("open", True), ("closed", False)])
def test_fail_mode(value: str, fail_open: bool) -> None:
    base = "version: 1\nworkloads: {}\ndefault: deny\n"
    assert parse_policy(base + f"fail: {value}\n").fail_open is fail_open
    assert parse_policy(base).fail_open is False


@pytest.mark.parametrize("value", ["opened", "true", "[open]"])
def test_fail_mode_bad_value_says_what_each_choice_does(value: str) -> None:
    text = f"version: 1\nworkloads: {{}}\ndefault: deny\nfail: {value}\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text)
    (problem,) = exc.value.problems
    assert (problem.line, problem.path) == (4, "fail")
    assert "closed" in problem.message and "open" in problem.message
    if not value.startswith("["):
        assert "direct" in problem.message  # says what each choice does
