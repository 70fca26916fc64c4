"""The BPF maps decide like the reference model, and change by small diffs.

``bpf.maps.classify`` and ``classify_non_tcp`` re-do the classifier's lookups
over the map contents; hypothesis draws policies with overlapping CIDRs (IPv4
and IPv6), port ranges, except lists, interface bindings and ``non_tcp:
drop`` rules, and every flow of the lab's address plan must get
``policy.decide.should_divert``'s and ``non_tcp_drop``'s answer.
The netns tests then check the kernel does what these maps say.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from egress_agent.bpf import layout
from egress_agent.bpf.maps import (
    IncrementalMaps,
    MapDiff,
    UnsupportedPolicy,
    assign_ids,
    classify,
    classify_non_tcp,
    desired_maps,
    diff,
)
from egress_agent.policy.decide import identify, non_tcp_drop, should_divert
from egress_agent.policy.load import parse_policy
from egress_agent.policy.model import InterceptRule, NonTcp, Policy, Workload
from tests.lab import policygen

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "egress.h"
IFINDEX = {policygen.pod_ifname(i, p[0]): 10 + i for i, p in enumerate(policygen.PODS)}


def test_python_mirror_matches_the_c_header() -> None:
    defines = dict(re.findall(r"#define (EGRESS_\w+) (\d+)", HEADER.read_text()))
    reasons = {
        k[len("EGRESS_REASON_") :]: int(v)
        for k, v in defines.items()
        if k.startswith("EGRESS_REASON_") and k != "EGRESS_REASON_COUNT"
    }
    assert reasons == {r.name: r.value for r in layout.Reason}
    assert int(defines["EGRESS_REASON_COUNT"]) == layout.REASON_COUNT == len(layout.Reason)
    verdicts = {
        k[len("EGRESS_VERDICT_") :]: int(v)
        for k, v in defines.items()
        if k.startswith("EGRESS_VERDICT_")
    }
    assert verdicts == {v.name: v.value for v in layout.Verdict}
    # Each reason's comment names the verdict it gives, as REASON_VERDICT does.
    commented = dict(
        re.findall(r"#define EGRESS_REASON_(\w+) \d+ +/\* \[(\w+)\]", HEADER.read_text())
    )
    assert commented == {r.name: v.name.lower() for r, v in layout.REASON_VERDICT.items()}
    assert int(defines["EGRESS_WORKLOAD_BOUND"]) == layout.WORKLOAD_BOUND
    assert int(defines["EGRESS_MAX_RULES"]) == layout.MAX_RULES


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_maps_decide_like_the_model(seed: int) -> None:
    policy = policygen.random_policy(random.Random(seed))
    ids = assign_ids(policy, {})
    maps = desired_maps(policy, ids=ids, ifindexes=IFINDEX)
    for flow in policygen.all_flows():
        for interface in (flow.interface, policygen.pod_ifname(2, "pc")):
            src, dst = ipaddress.ip_address(flow.src), ipaddress.ip_address(flow.dst)
            want = should_divert(policy, src=src, dst=dst, dst_port=flow.port, interface=interface)
            got, reason, _ = classify(
                maps, src=src, dst=dst, dst_port=flow.port, ifindex=IFINDEX[interface]
            )
            assert (got == layout.Verdict.MARK) == want, (flow, interface, reason, policy)


def with_non_tcp(rng: random.Random, policy: Policy) -> Policy:
    """Some of the policy's intercept rules made ``non_tcp: drop``."""
    rules = tuple(
        dataclasses.replace(r, non_tcp=NonTcp.DROP) if rng.random() < 0.5 else r
        for r in policy.intercept
    )
    return dataclasses.replace(policy, intercept=rules)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_maps_drop_non_tcp_like_the_model(seed: int) -> None:
    rng = random.Random(seed)
    policy = with_non_tcp(rng, policygen.random_policy(rng))
    maps = desired_maps(policy, ids=assign_ids(policy, {}), ifindexes=IFINDEX)
    flows = {(f.src, f.dst, f.interface) for f in policygen.all_flows()}
    for src_text, dst_text, own in sorted(flows):
        for interface in (own, policygen.pod_ifname(2, "pc")):
            src, dst = ipaddress.ip_address(src_text), ipaddress.ip_address(dst_text)
            want = non_tcp_drop(policy, src=src, dst=dst, interface=interface)
            got, reason, bit = classify_non_tcp(maps, src=src, dst=dst, ifindex=IFINDEX[interface])
            if (
                identify(policy, src) is not None
                and identify(policy, src, interface=interface) is None
            ):
                assert (got, reason) == (layout.Verdict.DROP, layout.Reason.WRONG_INTERFACE)
            elif want is None:
                assert got == layout.Verdict.PASS, (src, dst, interface, reason, policy)
            else:
                assert got == layout.Verdict.MARK, (src, dst, interface, reason, policy)
                assert bit is not None and policy.intercept[bit] is want


def test_settings_hold_the_non_tcp_drop_rules() -> None:
    policy = parse_policy(
        "version: 1\n"
        "workloads:\n  w: {cidrs: [10.0.0.0/8]}\n"
        "intercept:\n"
        "  - {from: [w], ports: [443]}\n"
        "  - {from: [w], to_cidrs: [192.0.2.0/24], non_tcp: drop}\n"
        "  - {from: [w], non_tcp: drop, except_cidrs: [10.96.0.10/32]}\n"
        "default: deny\n"
    )
    maps = desired_maps(policy, ids=assign_ids(policy, {}), ifindexes={})
    raw = maps[layout.SETTINGS][layout.u32(0)]
    assert layout.unpack_settings(raw) == (0b101, 0b110, 0b110)  # any_dst, any_port, non_tcp
    cases = {
        "192.0.2.7": (layout.Verdict.MARK, 1),  # the first non_tcp rule covering it
        "198.51.100.1": (layout.Verdict.MARK, 2),
        "10.96.0.10": (layout.Verdict.PASS, None),  # the cluster resolver, excepted
    }
    for dst, (verdict, bit) in cases.items():
        got, _, got_bit = classify_non_tcp(
            maps,
            src=ipaddress.ip_address("10.1.2.3"),
            dst=ipaddress.ip_address(dst),
            ifindex=1,
        )
        assert (got, got_bit) == (verdict, bit), dst


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=0, max_value=2**32))
def test_a_diff_turns_one_policy_into_another(seed_a: int, seed_b: int) -> None:
    a = policygen.random_policy(random.Random(seed_a))
    b = policygen.random_policy(random.Random(seed_b))
    ids_a = assign_ids(a, {})
    ids_b = assign_ids(b, ids_a)
    have = desired_maps(a, ids=ids_a, ifindexes=IFINDEX)
    want = desired_maps(b, ids=ids_b, ifindexes=IFINDEX)
    change = diff(have, want)
    for name, entries in change.upserts.items():
        have[name].update(entries)
    for name, keys in change.deletes.items():
        for key in keys:
            del have[name][key]
    assert have == want
    assert diff(have, want).size == 0


def test_ids_stay_put_so_one_workload_change_is_a_few_entries() -> None:
    policy = parse_policy(
        "version: 1\n"
        "workloads:\n"
        + "".join(f"  w{i}: {{cidrs: [10.{i // 250}.{i % 250}.0/24]}}\n" for i in range(500))
        + "intercept:\n  - from: [w0, w7]\n    ports: [443]\ndefault: deny\n"
    )
    ids = assign_ids(policy, {})
    before = desired_maps(policy, ids=ids, ifindexes={})
    # Remove a workload in the middle and add one: names keep their ids.
    workloads = [w for w in policy.workloads if w.name != "w100"]
    workloads.append(Workload(name="new", cidrs=(ipaddress.ip_network("10.99.0.0/16"),)))
    changed = dataclasses.replace(policy, workloads=tuple(workloads))
    ids2 = assign_ids(changed, ids)
    assert ids2["new"] == ids["w100"] and ids2["w7"] == ids["w7"]
    change = diff(before, desired_maps(changed, ids=ids2, ifindexes={}))
    assert change.size <= 4  # src entry out, src in, workload value overwritten


def test_more_than_64_intercept_rules_is_refused_with_the_way_out() -> None:
    policy = policygen.random_policy(random.Random(1))
    rule = policy.intercept[0]
    many = tuple(dataclasses.replace(rule, index=i) for i in range(65))
    with pytest.raises(UnsupportedPolicy, match=r"at most 64.*--datapath nft"):
        desired_maps(dataclasses.replace(policy, intercept=many), ids={}, ifindexes={})


def test_bound_workload_without_its_interface_has_no_binding() -> None:
    policy = dataclasses.replace(
        policygen.random_policy(random.Random(3)),
        workloads=(
            Workload(
                name="w0", cidrs=(ipaddress.ip_network("198.19.1.2/32"),), interfaces=("gone0",)
            ),
        ),
        intercept=(InterceptRule(index=0, sources=("w0",)),),
    )
    maps = desired_maps(policy, ids={"w0": 1}, ifindexes={})
    assert maps[layout.BIND] == {}
    verdict, reason, _ = classify(
        maps,
        src=ipaddress.ip_address("198.19.1.2"),
        dst=ipaddress.ip_address("198.18.1.2"),
        dst_port=443,
        ifindex=10,
    )
    assert verdict == layout.Verdict.DROP and reason == layout.Reason.WRONG_INTERFACE


def test_ten_thousand_entries_compute_in_well_under_a_second() -> None:
    text = (
        "version: 1\nworkloads:\n"
        + "".join(f"  w{i}: {{cidrs: [10.{i // 250}.{i % 250}.0/24]}}\n" for i in range(10_000))
        + "intercept:\n  - from: [w0]\n    except_cidrs: ["
        + ", ".join(
            f"172.{16 + i // 250 % 16}.{i % 250}.0/24" if i < 4000 else f'"fd00:{i:x}::/32"'
            for i in range(10_000)
        )
        + "]\ndefault: deny\n"
    )
    policy = parse_policy(text)
    started = time.perf_counter()
    maps = desired_maps(policy, ids=assign_ids(policy, {}), ifindexes={})
    assert time.perf_counter() - started < 1.5
    assert len(maps[layout.SRC_V4]) == 10_000
    assert len(maps[layout.DST_V4]) + len(maps[layout.DST_V6]) == 10_000


def _mutate(rng: random.Random, policy: Policy) -> Policy:
    """One small change of the kind the agent sees: a CIDR added to or taken
    from a workload, a workload added or removed, interfaces changed, or
    other intercept rules."""
    workloads = list(policy.workloads)
    choice = rng.randrange(8)
    if choice >= 5 and policy.intercept:
        # One destination prefix more or less in one rule's to or except list
        # (nested prefixes in the pool: the unions below it change too).
        rules = list(policy.intercept)
        i = rng.randrange(len(rules))
        field_ = rng.choice(("to_cidrs", "except_cidrs"))
        nets = list(getattr(rules[i], field_))
        if choice == 5 and nets:
            nets.pop(rng.randrange(len(nets)))
        else:
            nets.append(rng.choice(policygen.DEST_POOL))
        rules[i] = dataclasses.replace(rules[i], **{field_: tuple(dict.fromkeys(nets))})
        return dataclasses.replace(policy, intercept=tuple(rules))
    if choice == 0 and workloads:
        i = rng.randrange(len(workloads))
        extra = rng.choice(policygen.SOURCE_POOL)
        cidrs = tuple(dict.fromkeys((*workloads[i].cidrs, extra)))
        workloads[i] = dataclasses.replace(workloads[i], cidrs=cidrs)
    elif choice == 1 and workloads and len(workloads[0].cidrs) > 1:
        workloads[0] = dataclasses.replace(workloads[0], cidrs=workloads[0].cidrs[1:])
    elif choice == 2:
        name = f"n{rng.randrange(1000)}"
        if name not in {w.name for w in workloads}:
            net = rng.choice(policygen.SOURCE_POOL)
            workloads.insert(rng.randrange(len(workloads) + 1), Workload(name=name, cidrs=(net,)))
    elif choice == 3 and len(workloads) > 1:
        gone = workloads.pop(rng.randrange(len(workloads)))
        rules = [
            dataclasses.replace(r, sources=tuple(s for s in r.sources if s != gone.name))
            for r in policy.intercept
        ]
        return dataclasses.replace(
            policy,
            workloads=tuple(workloads),
            intercept=tuple(r for r in rules if r.sources),
        )
    elif choice == 4:
        other = policygen.random_policy(rng)
        names = [w.name for w in workloads]
        rules = [
            dataclasses.replace(r, sources=tuple(s for s in r.sources if s in names) or (names[0],))
            for r in other.intercept
        ]
        return dataclasses.replace(policy, intercept=tuple(rules))
    return dataclasses.replace(policy, workloads=tuple(workloads))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
# Two workloads shared a prefix, and one gave it up while the other changed
# only its interfaces: the prefix kept the first one's id.
@example(1_150_529_676)
def test_incremental_diffs_keep_the_maps_equal_to_the_whole_computation(seed: int) -> None:
    rng = random.Random(seed)
    policy = policygen.random_policy(rng)
    planner = IncrementalMaps()
    kernel: dict[str, dict[bytes, bytes]] = {name: {} for name in layout.CONFIG_MAPS}
    ifindexes = dict(IFINDEX)
    for _ in range(12):
        change = planner.update(policy, ifindexes)
        for name, entries in change.upserts.items():
            kernel[name].update(entries)
        for name, keys in change.deletes.items():
            for key in keys:
                del kernel[name][key]
        want = desired_maps(policy, ids=planner.ids, ifindexes=ifindexes)
        assert kernel == want
        assert planner.contents() == want
        # Workloads may end up sharing a prefix (as discovered pods can).
        policy = _mutate(rng, policy)
        if rng.random() < 0.2:  # a pod veth re-made: new ifindex
            ifname = rng.choice(list(ifindexes))
            ifindexes[ifname] += 100


def test_divert_mark_is_a_proxy_setting() -> None:
    text = "version: 1\nproxy: {divert_mark: 0x10000}\nworkloads: {}\ndefault: deny\n"
    assert parse_policy(text).proxy.divert_mark == 0x10000
    assert parse_policy("version: 1\nworkloads: {}\ndefault: deny\n").proxy.divert_mark == (
        0x800000
    )


def _random_delta(
    rng: random.Random, workloads: list[Workload]
) -> tuple[list[Workload], list[str]]:
    """A few workloads changed, added (last) or removed, as pod discovery
    reports them; addresses drawn from a small pool, so shared prefixes come up."""
    upserts: dict[str, Workload] = {}
    removals: list[str] = []
    names = [w.name for w in workloads]
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(4)
        cidrs = tuple(dict.fromkeys(rng.sample(policygen.SOURCE_POOL, rng.randint(0, 2))))
        interfaces: tuple[str, ...] = ()
        if rng.random() < 0.3:
            interfaces = (rng.choice(list(IFINDEX)),)
        if choice == 0 and names:  # a workload's pods changed
            name = rng.choice(names)
        elif choice == 1 and names:  # a workload's last pod went
            name = rng.choice(names)
            if name not in upserts and name not in removals:
                removals.append(name)
            continue
        else:  # a new one
            name = f"d{rng.randrange(10_000)}"
        if name in removals:
            continue
        upserts[name] = Workload(name=name, cidrs=cidrs, interfaces=interfaces)
    return list(upserts.values()), removals


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_delta_updates_keep_the_maps_equal_to_the_whole_computation(seed: int) -> None:
    # A pod added, changed or gone reaches the maps by apply_delta, touching
    # only the workloads named; after any sequence of deltas (and full updates
    # between them) the kernel's maps equal the maps computed from scratch.
    rng = random.Random(seed)
    policy = policygen.random_policy(rng)
    planner = IncrementalMaps()
    kernel: dict[str, dict[bytes, bytes]] = {name: {} for name in layout.CONFIG_MAPS}

    def apply(change: MapDiff) -> None:
        for name, entries in change.upserts.items():
            kernel[name].update(entries)
        for name, keys in change.deletes.items():
            for key in keys:
                del kernel[name][key]

    apply(planner.update(policy, IFINDEX))
    workloads = list(policy.workloads)
    for _ in range(15):
        if rng.random() < 0.15:
            apply(planner.update(dataclasses.replace(policy, workloads=tuple(workloads)), IFINDEX))
        upserts, removals = _random_delta(rng, workloads)
        apply(planner.apply_delta(upserts=upserts, removals=removals, ifindexes=IFINDEX))
        by_name = {w.name: w for w in upserts}
        workloads = [by_name.pop(w.name, w) for w in workloads if w.name not in removals]
        workloads += by_name.values()  # new names go last
        now = dataclasses.replace(policy, workloads=tuple(workloads))
        assert sorted(planner.ids) == sorted(w.name for w in workloads)
        assert len(set(planner.ids.values())) == len(planner.ids) and 0 not in planner.ids.values()
        want = desired_maps(now, ids=planner.ids, ifindexes=IFINDEX)
        assert kernel == want
        assert planner.contents() == want
        # What the capacity check counts: the source maps' entries.
        assert planner.source_entries == {
            name: len(want[name]) for name in (layout.SRC_V4, layout.SRC_V6)
        }


def test_a_delta_names_each_workload_once() -> None:
    planner = IncrementalMaps()
    planner.update(policygen.random_policy(random.Random(1)), IFINDEX)
    w = Workload(name="x", cidrs=(ipaddress.ip_network("10.9.9.9/32"),))
    with pytest.raises(ValueError, match="named twice"):
        planner.apply_delta(upserts=[w], removals=["x"], ifindexes=IFINDEX)
