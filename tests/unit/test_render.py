"""The nftables renderer: golden output, and agreement with the reference model."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.decide import identify
from egress_agent.policy.load import parse_policy
from egress_agent.rules.checks import counted_rule
from egress_agent.rules.identity import identity_networks
from egress_agent.rules.render import render_ruleset, render_teardown

GOLDEN = Path(__file__).parent / "golden"


def _demo_policy_text() -> str:
    return resources.files("egress_agent.agent").joinpath("demo-policy.yaml").read_text()


def _check_golden(name: str, doc: object) -> None:
    path = GOLDEN / name
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), (
        f"{name} differs from the golden file (UPDATE_GOLDEN=1 to accept)"
    )


def test_demo_policy_renders_to_golden_ruleset() -> None:
    _check_golden("demo-ruleset.json", render_ruleset(parse_policy(_demo_policy_text())))


def test_bpf_mode_prerouting_only_matches_the_mark() -> None:
    # Forwarded traffic is chosen by the classifier; output keeps the local selection.
    doc = render_ruleset(parse_policy(_demo_policy_text()), selection="bpf")
    _check_golden("demo-ruleset-bpf.json", doc)
    prerouting = [
        c["add"]["rule"]
        for c in doc["nftables"]
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "prerouting"
    ]
    assert [r["comment"] for r in prerouting][-2:] == [
        "marked by the BPF classifier (ipv4)",
        "marked by the BPF classifier (ipv6)",
    ]
    assert "@" not in json.dumps(prerouting)


def test_interfaces_overlaps_and_ranges_render_to_golden_ruleset() -> None:
    policy = parse_policy(
        """
version: 1
proxy: {port: 15999, address_v4: 169.254.7.7, upstream_mark: 0x10}
workloads:
  pods: {cidrs: [10.10.0.0/16, "fd00:10::/32"], interfaces: [veth-a, veth-b]}
  pg-main: {cidrs: [10.10.1.2/32]}
intercept:
  - from: [pods, pg-main]
    ports: [443, "8000-8100", 8050, 80]
    except_cidrs: [10.10.0.0/16]
  - from: [pg-main]
    to_cidrs: ["2001:db8::/32"]
egress: []
default: allow
"""
    )
    _check_golden("overlap-ruleset.json", render_ruleset(policy))


def test_rendering_is_deterministic() -> None:
    text = _demo_policy_text()
    assert render_ruleset(parse_policy(text)) == render_ruleset(parse_policy(text))


def test_replace_whole_table_in_one_transaction() -> None:
    cmds = render_ruleset(parse_policy(_demo_policy_text()))["nftables"]
    table = {"family": "inet", "name": "egress_agent"}
    # add (so delete works on a first run), delete, add: all in one document.
    assert cmds[1:4] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    for cmd in cmds[4:]:
        (obj,) = cmd["add"].values()
        assert obj["table"] == "egress_agent" and obj["family"] == "inet"


def test_teardown_touches_only_our_table() -> None:
    cmds = render_teardown()["nftables"]
    assert cmds[1:] == [
        {"add": {"table": {"family": "inet", "name": "egress_agent"}}},
        {"delete": {"table": {"family": "inet", "name": "egress_agent"}}},
    ]


def test_upstream_mark_is_excluded_before_any_divert_in_output() -> None:
    policy = parse_policy(_demo_policy_text())
    rules = [
        c["add"]["rule"] for c in render_ruleset(policy)["nftables"] if "rule" in c.get("add", {})
    ]
    output = [r for r in rules if r["chain"] == "output"]
    first_divert = next(i for i, r in enumerate(output) if any("dnat" in e for e in r["expr"]))
    mark_rule = next(
        i for i, r in enumerate(output) if r["comment"] == "proxy upstream connections"
    )
    assert mark_rule < first_divert


_octet = st.integers(0, 255)


@st.composite
def _overlapping_policies(draw: st.DrawFn) -> str:
    """Policies whose workloads overlap heavily inside 10.0.0.0/16."""
    nets: set[str] = set()
    lines = []
    for w in range(draw(st.integers(1, 4))):
        cidrs = []
        for _ in range(draw(st.integers(1, 3))):
            plen = draw(st.integers(16, 32))
            addr = ipaddress.IPv4Address(f"10.0.{draw(_octet)}.{draw(_octet)}")
            net = str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
            if net not in nets:
                nets.add(net)
                cidrs.append(net)
        if cidrs:
            lines.append(f"  w{w}: {{cidrs: [{', '.join(cidrs)}]}}")
    return "version: 1\nworkloads:\n" + "\n".join(lines) + "\ndefault: deny\n"


@settings(max_examples=150, deadline=None)
@given(
    text=_overlapping_policies(),
    probes=st.lists(st.tuples(_octet, _octet), min_size=20, max_size=20),
)
def test_identity_sets_are_disjoint_and_agree_with_longest_prefix(
    text: str, probes: list[tuple[int, int]]
) -> None:
    policy = parse_policy(text)
    sets = identity_networks(policy)
    for a, b in probes:
        addr = ipaddress.IPv4Address(f"10.0.{a}.{b}")
        owners = [name for name, (v4, _) in sets.items() if any(addr in n for n in v4)]
        expected = identify(policy, addr)
        assert owners == ([expected] if expected else [])


def test_bpf_mode_changes_of_workloads_touch_only_output_and_sets() -> None:
    from egress_agent.rules.apply import render_output_update

    text = _demo_policy_text()
    old = render_ruleset(parse_policy(text), selection="bpf")
    changed = parse_policy(text.replace("198.19.1.2/32", "198.19.1.2/32, 198.19.7.0/24"))
    new = render_ruleset(changed, selection="bpf")
    assert new != old
    partial = render_output_update(old, new)
    assert partial is not None
    kinds = [next(iter(cmd)) for cmd in partial["nftables"][1:]]
    assert kinds[0] == "flush" and "delete" not in json.dumps(partial).split('"table"')[0]
    assert not any("table" in cmd.get("add", {}) for cmd in partial["nftables"])
    assert all(
        cmd["add"]["rule"]["chain"] == "output"
        for cmd in partial["nftables"]
        if "rule" in cmd.get("add", {})
    )
    # A change outside output and the sets (here the mark prerouting matches)
    # replaces the table whole.
    remarked = dataclasses.replace(
        changed, proxy=dataclasses.replace(changed.proxy, divert_mark=0x10)
    )
    assert render_output_update(old, render_ruleset(remarked, selection="bpf")) is None


NON_TCP_POLICY = """
version: 1
workloads:
  pods: {cidrs: [10.10.0.0/16, "fd00:10::/32"], interfaces: [veth-a]}
  vm: {cidrs: [10.20.0.0/24]}
  job: {cgroups: [system.slice/job.service]}
intercept:
  - from: [pods, vm, job]
    to_cidrs: [0.0.0.0/0, "::/0"]
    except_cidrs: [10.96.0.10/32, "fd00:96::a/128"]
    non_tcp: drop
  - from: [vm]
    ports: [443]
reverse_path: {interfaces: ["cali*"]}
egress: []
default: deny
"""


def _rules(doc: dict[str, object], chain: str | None = None) -> list[dict[str, object]]:
    cmds = doc["nftables"]
    assert isinstance(cmds, list)
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    return [r for r in rules if chain is None or r["chain"] == chain]


def _chains(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    cmds = doc["nftables"]
    assert isinstance(cmds, list)
    return {
        c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})
    }


@pytest.mark.parametrize("selection", ["nft", "bpf"])
def test_non_tcp_and_reverse_path_render_to_golden_rulesets(selection: str) -> None:
    doc = render_ruleset(parse_policy(NON_TCP_POLICY), selection=selection)  # type: ignore[arg-type]
    _check_golden(f"non-tcp-ruleset-{selection}.json", doc)


@pytest.mark.parametrize("selection", ["nft", "bpf"])
def test_reverse_path_check_runs_before_conntrack_on_bound_and_named_interfaces(
    selection: str,
) -> None:
    doc = render_ruleset(parse_policy(NON_TCP_POLICY), selection=selection)  # type: ignore[arg-type]
    chain = _chains(doc)["reverse_path"]
    assert (chain["type"], chain["hook"], chain["prio"]) == ("filter", "prerouting", -300)
    rule, *rest = _rules(doc, "reverse_path")
    spoofs = [r for r in rest if r["comment"].startswith("spoofed source")]
    towards = [r for r in rest if r not in spoofs]
    # A bound workload's address from another interface (nft selection; the
    # BPF classifier drops those itself).
    assert [r["comment"] for r in spoofs] == (
        ["spoofed source: an address of pods from another interface"] * 2
        if selection == "nft"
        else []
    )
    assert rule["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@rp_interfaces"}},
        {
            "match": {
                "op": "==",
                "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}},
                "right": False,
            }
        },
        {"counter": None},
        {"drop": None},
    ]
    [rp_set] = [
        c["add"]["set"]
        for c in doc["nftables"]
        if c.get("add", {}).get("set", {}).get("name") == "rp_interfaces"
    ]
    assert rp_set["type"] == "ifname" and rp_set["elem"] == ["veth-a", "cali*"]
    # On every interface: packets towards a workload (a forged "server" packet
    # would open an entry whose reply direction is the workload's connection).
    assert [r["comment"] for r in towards] == [
        "reverse-path check towards workloads (ipv4)",
        "reverse-path check towards workloads (ipv6)",
    ]
    assert towards[0]["expr"][0] == {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": "@workloads_v4",
        }
    }
    # Nothing bound, nothing named: only the check towards workloads.
    demo = render_ruleset(parse_policy(_demo_policy_text()))
    assert [r["comment"] for r in _rules(demo, "reverse_path")] == [
        "reverse-path check towards workloads (ipv4)",
        "reverse-path check towards workloads (ipv6)",
    ]
    assert "rp_interfaces" not in json.dumps(demo)


def test_forward_checks_come_in_order_and_only_for_workloads() -> None:
    doc = render_ruleset(parse_policy(NON_TCP_POLICY))
    comments = [r["comment"] for r in _rules(doc, "forward")]
    assert comments == [
        "diverted traffic never leaves the node (fail closed)",
        "diverted traffic never leaves the node (fail closed)",
        "invalid conntrack state from workloads (ipv4)",
        "invalid conntrack state from workloads (ipv6)",
        "workload TCP without NAT (ipv4)",
        "workload TCP SYN in a reply direction (ipv4)",
        "untracked workload TCP (ipv4)",
        "workload TCP without NAT (ipv6)",
        "workload TCP SYN in a reply direction (ipv6)",
        "untracked workload TCP (ipv6)",
        "AH from workloads (ipv4)",
        "AH from workloads (ipv6)",
        "non-TCP from workloads (ipv4)",
        "non-TCP from workloads (ipv6)",
    ]
    # The not-DNAT-ed check repeats prerouting's selection, rule for rule.
    prerouting = [r for r in _rules(doc, "prerouting") if "intercept" in str(r["comment"])]
    undiverted = _rules(doc, "undiverted_tcp")
    assert [f"{r['comment']}: TCP not diverted" for r in prerouting] == [
        r["comment"] for r in undiverted
    ]
    for p, u in zip(prerouting, undiverted, strict=True):
        assert p["expr"][:-2] == u["expr"][:-2] and u["expr"][-1] == {"drop": None}
    # workloads_v4 holds the intercepted workloads' addresses.
    [union] = [
        c["add"]["set"]
        for c in doc["nftables"]
        if c.get("add", {}).get("set", {}).get("name") == "workloads_v4"
    ]
    assert union["elem"] == [
        {"prefix": {"addr": "10.10.0.0", "len": 16}},
        {"prefix": {"addr": "10.20.0.0", "len": 24}},
    ]


def test_non_tcp_lets_replies_and_related_errors_pass_before_the_drops() -> None:
    doc = render_ruleset(parse_policy(NON_TCP_POLICY))
    comments = [r["comment"] for r in _rules(doc, "non_tcp")]
    assert comments[:2] == [
        "non-TCP: ICMP errors about allowed flows pass",
        "non-TCP: replies to flows opened from elsewhere pass",
    ]
    # Each address workload's rule twice: by the entry's original
    # destination (before kube-proxy's DNAT), and by the headers of untracked
    # packets (neighbour discovery has no entry).
    assert comments[2:] == [
        "intercept[0] from pods non_tcp",
        "intercept[0] from pods non_tcp",
        "intercept[0] from vm non_tcp",
        "intercept[0] from vm non_tcp",
        "intercept[0] from job non_tcp (cgroup mark)",
        "intercept[0] from pods non_tcp",
        "intercept[0] from pods non_tcp",
        "intercept[0] from job non_tcp (cgroup mark)",
    ]
    tracked, untracked = _rules(doc, "non_tcp")[4:6]
    lefts = [e["match"]["left"] for e in tracked["expr"] if "match" in e]
    assert {"ct": {"key": "ip daddr", "dir": "original"}} in lefts
    lefts = [e["match"] for e in untracked["expr"] if "match" in e]
    assert {"op": "in", "left": {"ct": {"key": "state"}}, "right": "untracked"} in lefts
    # Locally generated traffic reaches the chain through output_filter.
    chain = _chains(doc)["output_filter"]
    assert (chain["type"], chain["hook"], chain["prio"]) == ("filter", "output", 0)
    [jump] = _rules(doc, "output_filter")
    assert jump["comment"] == "non-TCP of local workloads"
    # The node's own neighbour discovery (untracked) never enters the chain.
    assert {"match": {"op": "!=", "left": {"ct": {"key": "state"}}, "right": "untracked"}} in (
        jump["expr"]
    )
    # No rule with non_tcp: drop, no chain.
    assert "non_tcp" not in _chains(render_ruleset(parse_policy(_demo_policy_text())))


def test_bpf_mode_drops_marked_traffic_and_keeps_local_selections() -> None:
    doc = render_ruleset(parse_policy(NON_TCP_POLICY), selection="bpf")
    forward = [r["comment"] for r in _rules(doc, "forward")]
    assert "TCP marked by the BPF classifier: not diverted" in forward
    assert "TCP SYN marked by the BPF classifier in a reply direction" in forward
    assert forward[-1] == "non-TCP marked by the BPF classifier"
    assert "undiverted_tcp" not in _chains(doc)
    comments = [r["comment"] for r in _rules(doc, "non_tcp")]
    assert comments[2:] == [
        "non-TCP marked by the BPF classifier",
        "intercept[0] from vm non_tcp",
        "intercept[0] from job non_tcp (cgroup mark)",
        "intercept[0] from job non_tcp (cgroup mark)",
    ]


POLICIES = {
    "demo": _demo_policy_text(),
    "non-tcp": NON_TCP_POLICY,
}


@pytest.mark.parametrize("selection", ["nft", "bpf"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_counted_rule_says_what_it_counts(name: str, selection: str) -> None:
    doc = render_ruleset(parse_policy(POLICIES[name]), selection=selection)  # type: ignore[arg-type]
    for rule in _rules(doc):
        exprs = rule["expr"]
        assert isinstance(exprs, list)
        counted = counted_rule(str(rule["chain"]), str(rule["comment"]), exprs)
        if any("counter" in e for e in exprs):
            assert counted is not None and counted.reason != "other", rule["comment"]


@pytest.mark.parametrize("selection", ["nft", "bpf"])
def test_no_rule_needs_an_interface_index_lookup(selection: str) -> None:
    # libnftables resolves interface names to indexes through a netlink
    # socket it opens on demand, and exits the process when it cannot:
    # names are matched with iifname only (see rules.apply).
    for text in POLICIES.values():
        doc = json.dumps(render_ruleset(parse_policy(text), selection=selection))  # type: ignore[arg-type]
        assert '"key": "iif"' not in doc and '"key": "oif"' not in doc


def test_bpf_mode_workload_changes_with_non_tcp_stay_in_place() -> None:
    from egress_agent.rules.apply import render_output_update

    old = render_ruleset(parse_policy(NON_TCP_POLICY), selection="bpf")
    moved = NON_TCP_POLICY.replace("vm: {cidrs: [10.20.0.0/24]}", 'vm: {cidrs: ["fd00:20::/64"]}')
    new = render_ruleset(parse_policy(moved), selection="bpf")
    partial = render_output_update(old, new)
    assert partial is not None
    flushed = [
        c["flush"]["chain"]["name"] for c in partial["nftables"] if "chain" in c.get("flush", {})
    ]
    assert flushed == ["output", "non_tcp"]
    chains = {c["add"]["rule"]["chain"] for c in partial["nftables"] if "rule" in c.get("add", {})}
    assert chains == {"output", "non_tcp"}


def test_interfaces_a_pattern_covers_are_left_out_of_the_reverse_path_set() -> None:
    """An interval set of interface names refuses ``pod1-pa`` beside ``pod*``
    (overlapping intervals): the pattern alone covers both."""
    policy = parse_policy(
        "version: 1\nworkloads:\n"
        "  a: {cidrs: [10.1.0.2/32], interfaces: [pod1-pa, eth1]}\n"
        "  b: {cidrs: [10.1.0.3/32], interfaces: [pod2-pb]}\n"
        "intercept: [{from: [a, b]}]\n"
        'reverse_path: {interfaces: ["pod*", "pod1*", "eth1"]}\n'
        "default: deny\n"
    )
    doc = render_ruleset(policy)
    [rp_set] = [
        c["add"]["set"]
        for c in doc["nftables"]
        if c.get("add", {}).get("set", {}).get("name") == "rp_interfaces"
    ]
    assert rp_set["elem"] == ["eth1", "pod*"]
