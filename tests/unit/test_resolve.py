"""resolve(): discovered pods become workload addresses."""

from __future__ import annotations

import ipaddress

from egress_agent.agent.discovery import resolve
from egress_agent.agent.pods import FrozenMap, PodInfo, Snapshot
from egress_agent.policy.decide import identify, should_divert
from egress_agent.policy.load import parse_policy

POLICY = parse_policy(
    """
version: 1
workloads:
  pg: {pods: {namespace: db, labels: {app: pg}}}
  team: {pods: {namespaceLabels: {team: data}}}
  static: {cidrs: [10.9.0.0/16]}
intercept:
  - from: [pg, team]
    ports: [443]
default: deny
"""
)


def _pod(name: str, ns: str, ip: str, *, labels: dict[str, str], **kw: object) -> PodInfo:
    return PodInfo(
        namespace=ns,
        name=name,
        uid=name,
        labels=labels,
        ips=(ipaddress.ip_address(ip),),
        phase="Running",
        **kw,  # type: ignore[arg-type]
    )


def _snapshot(*pods: PodInfo) -> Snapshot:
    return Snapshot(
        pods=pods,
        namespace_labels=FrozenMap({"db": FrozenMap({"team": "data"}), "web": FrozenMap()}),
        pods_resource_version="1",
        namespaces_resource_version="1",
        synced=True,
    )


def _cidrs(policy: object, name: str) -> list[str]:
    return [str(n) for w in policy.workloads if w.name == name for n in w.cidrs]  # type: ignore[attr-defined]


def test_selected_pods_become_host_networks_and_identities() -> None:
    snap = _snapshot(
        _pod("pg-1", "db", "10.244.1.5", labels={"app": "pg"}),
        _pod("pg-2", "db", "fd00::5", labels={"app": "pg"}),
        _pod("web-1", "web", "10.244.1.9", labels={"app": "pg"}),  # wrong namespace
        _pod("etl", "db", "10.244.1.7", labels={"app": "etl"}),  # namespace has team=data
        _pod("host", "db", "10.0.0.1", labels={"app": "pg"}, host_network=True),
    )
    resolved = resolve(POLICY, snap)
    assert _cidrs(resolved, "pg") == ["10.244.1.5/32", "fd00::5/128"]
    # pg-1 also matches team's namespaceLabels: the first workload keeps it.
    assert _cidrs(resolved, "team") == ["10.244.1.7/32"]
    assert _cidrs(resolved, "static") == ["10.9.0.0/16"]
    assert identify(resolved, ipaddress.ip_address("10.244.1.5")) == "pg"
    assert should_divert(
        resolved,
        src=ipaddress.ip_address("10.244.1.5"),
        dst=ipaddress.ip_address("1.2.3.4"),
        dst_port=443,
    )
    assert not should_divert(
        resolved,
        src=ipaddress.ip_address("10.244.1.9"),
        dst=ipaddress.ip_address("1.2.3.4"),
        dst_port=443,
    )


def test_before_the_first_sync_pod_workloads_have_no_addresses() -> None:
    resolved = resolve(POLICY, None)
    assert _cidrs(resolved, "pg") == [] and _cidrs(resolved, "static") == ["10.9.0.0/16"]


def test_a_policy_without_pod_workloads_is_returned_unchanged() -> None:
    static = parse_policy("version: 1\nworkloads: {a: {cidrs: [10.0.0.0/8]}}\ndefault: deny\n")
    assert resolve(static, _snapshot()) is static


def test_pod_workloads_are_bound_to_their_pods_host_interfaces() -> None:
    snap = _snapshot(
        _pod("pg-1", "db", "10.244.1.5", labels={"app": "pg"}),
        _pod("pg-2", "db", "10.244.1.6", labels={"app": "pg"}),
        _pod("etl", "db", "10.244.1.7", labels={"app": "etl"}),
    )
    ip = ipaddress.ip_address
    known = {ip("10.244.1.5"): "cali1", ip("10.244.1.6"): "cali2", ip("10.244.1.7"): "cali3"}
    policy = resolve(POLICY, snap, host_interfaces=known)
    assert policy.workload("pg").interfaces == ("cali1", "cali2")
    # A pod's identity holds only on its own side of the node.
    assert identify(policy, ip("10.244.1.5"), interface="cali1") == "pg"
    assert identify(policy, ip("10.244.1.5"), interface="cali3") is None
    assert policy.workload("static").interfaces == ()  # static workloads: as the file says
    # One pod whose interface is unknown: binding would take its identity, so none.
    partial = resolve(POLICY, snap, host_interfaces={ip("10.244.1.5"): "cali1"})
    assert partial.workload("pg").interfaces == ()
    assert identify(partial, ip("10.244.1.6"), interface="eth0") == "pg"
    # Without lookups (or before any), nothing changes.
    assert resolve(POLICY, snap).workload("pg").interfaces == ()
