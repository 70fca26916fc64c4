"""The nftables renderer: golden output, and agreement with the reference model."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from importlib import resources
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.policy.decide import identify
from egress_agent.policy.load import parse_policy
from egress_agent.rules.render import identity_networks, render_ruleset, render_teardown

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
