"""desired_state(): one pure function from the policy and what was observed
on the node to what the kernel and the proxy should hold."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from egress_agent.agent.desired import Desired, Observed, content_hash, desired_state
from egress_agent.agent.pods import FrozenMap, PodInfo, Snapshot
from egress_agent.policy.load import parse_policy

TEXT = """
version: 1
workloads:
  pg: {pods: {namespace: db, labels: {app: pg}}}
  team: {pods: {namespaceLabels: {team: data}}}
  static: {cidrs: [10.9.0.0/16]}
intercept:
  - from: [pg, team, static]
    ports: [443]
default: deny
"""
POLICY = parse_policy(TEXT)
HASH = content_hash(TEXT)


def _pod(name: str, ns: str, ip: str, **labels: str) -> PodInfo:
    return PodInfo(
        namespace=ns,
        name=name,
        uid=name,
        labels=FrozenMap(labels),
        ips=(ipaddress.ip_address(ip),),
        phase="Running",
    )


def _snapshot(*pods: PodInfo, version: str = "1") -> Snapshot:
    return Snapshot(
        pods=pods,
        namespace_labels=FrozenMap({"db": FrozenMap({"team": "data"}), "web": FrozenMap()}),
        pods_resource_version=version,
        namespaces_resource_version="1",
        synced=True,
    )


PG1 = _pod("pg-1", "db", "10.244.1.5", app="pg")
WEB = _pod("web-1", "web", "10.244.1.9", app="web")


def _state(observed: Observed, selection: Any = "nft") -> Desired:
    return desired_state(POLICY, policy_hash=HASH, observed=observed, selection=selection)


def _workload(state: Desired, name: str) -> Any:
    (found,) = [w for w in state.policy.workloads if w.name == name]
    return found


def _changed_sets(a: Desired, b: Desired) -> set[str]:
    """Names of the nftables sets whose commands differ; fails on any other change."""
    before, after = a.doc["nftables"], b.doc["nftables"]
    assert len(before) == len(after)
    changed = set()
    for old, new in zip(before, after, strict=True):
        if old != new:
            assert "set" in old.get("add", {}), f"not a set changed: {old} -> {new}"
            changed.add(old["add"]["set"]["name"])
    return changed


def test_same_inputs_give_the_same_state() -> None:
    observed = Observed(pods=_snapshot(PG1, WEB))
    first, second = _state(observed), _state(Observed(pods=_snapshot(PG1, WEB)))
    assert first == second
    assert first.same_effect(second)
    # Nothing is shared that a later change could alter in place.
    assert first.doc is not second.doc


def test_before_discovery_pod_workloads_have_no_addresses() -> None:
    state = _state(Observed())
    assert _workload(state, "pg").cidrs == ()
    assert _workload(state, "team").cidrs == ()
    assert [str(n) for n in _workload(state, "static").cidrs] == ["10.9.0.0/16"]
    assert state.source is POLICY and state.policy_hash == HASH


def test_a_new_pod_changes_only_its_workload_and_the_union_of_workloads() -> None:
    before = _state(Observed(pods=_snapshot(PG1, WEB)))
    pg2 = _pod("pg-2", "db", "10.244.1.6", app="pg")
    after = _state(before.observed.with_(pods=_snapshot(PG1, pg2, WEB, version="2")))
    # pg-2 is in namespace db, labelled team=data: both pod workloads select
    # it, and the first listed keeps the address.
    assert [str(n) for n in _workload(after, "pg").cidrs] == ["10.244.1.5/32", "10.244.1.6/32"]
    assert _workload(after, "team").cidrs == ()
    for name in ("static", "team"):
        assert _workload(after, name) == _workload(before, name)
    assert after.policy.intercept == before.policy.intercept
    assert after.policy.egress == before.policy.egress
    assert _changed_sets(before, after) == {"wl0_v4", "workloads_v4"}
    assert not before.same_effect(after)


def test_a_pod_update_that_changes_no_address_has_the_same_effect() -> None:
    before = _state(Observed(pods=_snapshot(PG1, WEB)))
    relabelled = dataclasses.replace(WEB, labels=FrozenMap({"app": "web", "tier": "front"}))
    after = _state(before.observed.with_(pods=_snapshot(PG1, relabelled, version="2")))
    assert after != before  # what was observed differs ...
    assert before.same_effect(after)  # ... what is enforced does not


def test_known_host_interfaces_bind_the_pod_workload() -> None:
    unbound = _state(Observed(pods=_snapshot(PG1)))
    bound = _state(
        unbound.observed.with_(host_interfaces={ipaddress.ip_address("10.244.1.5"): "veth-pg1"})
    )
    assert _workload(unbound, "pg").interfaces == ()
    assert _workload(bound, "pg").interfaces == ("veth-pg1",)
    assert _workload(bound, "pg").cidrs == _workload(unbound, "pg").cidrs
    assert _workload(bound, "static") == _workload(unbound, "static")


def test_the_selection_changes_the_ruleset_not_the_policy() -> None:
    observed = Observed(pods=_snapshot(PG1))
    nft, bpf = _state(observed, "nft"), _state(observed, "bpf")
    assert nft.policy == bpf.policy
    assert nft.doc != bpf.doc


def test_the_state_is_frozen() -> None:
    state = _state(Observed())
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.policy = POLICY  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.observed.pods = None  # type: ignore[misc]
