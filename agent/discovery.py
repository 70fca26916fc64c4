"""From discovered pods to workload addresses: a pure step between the policy
file and the renderer.

A workload given by ``pods: {namespace, labels, namespaceLabels}`` has no
addresses in the file; :func:`resolve` fills its ``cidrs`` with the /32 and
/128 of the pods on this node that the selector names, as the last
:class:`~egress_agent.agent.pods.Snapshot` shows them. The rendered
ruleset and the proxy then see an ordinary policy, so identity, diversion and
decisions work exactly as for static CIDRs.

When two workloads select the same pod, the one listed first in the file keeps
its addresses (an address identifies one workload); the others are told so in
the log. When two pods list the same address (a terminating pod's address
given to a new one), it identifies only one of them
(:func:`~egress_agent.agent.pods.address_owners`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from egress_agent.agent.pods import (
    TERMINAL_PHASES,
    Snapshot,
    address_conflicts,
    selected_networks,
    selects,
)
from egress_agent.policy.model import IPAddress, IPNetwork, PodSelector, Policy, Workload

log = logging.getLogger(__name__)


def pod_addresses(snapshot: Snapshot | None) -> list[IPAddress]:
    """Every address a pod on this node lists: what ``host_interfaces`` should cover."""
    if snapshot is None:
        return []
    return sorted(
        {ip for pod in snapshot.pods for ip in pod.ips}, key=lambda a: (a.version, int(a))
    )


def uses_pods(policy: Policy) -> bool:
    return any(w.pods is not None for w in policy.workloads)


def host_network_uids(pods: PodSelector, snapshot: Snapshot) -> list[str]:
    """Uids of the running hostNetwork pods on this node that ``pods`` names
    (the selector's own fields; :func:`~egress_agent.agent.pods.matches` leaves
    hostNetwork pods out on purpose, as their addresses identify nothing)."""
    return [
        pod.uid
        for pod in snapshot.pods
        if pod.host_network
        and pod.phase not in TERMINAL_PHASES
        and selects(pods, pod, snapshot.labels_of_namespace(pod.namespace))
    ]


def resolve(
    policy: Policy,
    snapshot: Snapshot | None,
    *,
    host_interfaces: Mapping[IPAddress, str] | None = None,
    pod_cgroups: Mapping[str, str] | None = None,
) -> Policy:
    """``policy`` with every pod workload's CIDRs set from ``snapshot`` (none
    before the first sync).

    ``host_interfaces`` maps pod addresses to the node's interface that
    routes to them (the pod's host-side veth, from
    :func:`~egress_agent.agent.addresses.host_interfaces`). A pod
    workload without ``interfaces`` in the file is then bound to its pods'
    interfaces, so that another pod cannot claim its identity by spoofing an
    address; only when every one of its addresses has a known interface, as
    binding to some would take the identity from the pods whose interface is
    unknown.

    A selector with ``hostNetwork: true`` gets no addresses: its workload's
    ``cgroups`` are the selected hostNetwork pods' cgroups found in
    ``pod_cgroups`` (pod uid -> cgroup path, see ``agent.podcgroups``).
    """
    if not uses_pods(policy):
        return policy
    for line in address_conflicts(snapshot) if snapshot else ():
        log.warning("pod discovery: %s", line)
    claimed: dict[IPNetwork, str] = {
        net: w.name for w in policy.workloads if w.pods is None for net in w.cidrs
    }
    workloads: list[Workload] = []
    for w in policy.workloads:
        if w.pods is None:
            workloads.append(w)
            continue
        if w.pods.host_network:
            uids = host_network_uids(w.pods, snapshot) if snapshot else []
            paths = sorted({pod_cgroups[u] for u in uids if pod_cgroups and u in pod_cgroups})
            workloads.append(dataclasses.replace(w, cidrs=(), cgroups=tuple(paths)))
            continue
        found = selected_networks(w.pods, snapshot) if snapshot else ()
        mine: list[IPNetwork] = []
        for net in found:
            owner = claimed.setdefault(net, w.name)
            if owner != w.name:
                log.warning(
                    "pod address %s is selected by workloads %r and %r: it stays with %r",
                    net.network_address,
                    owner,
                    w.name,
                    owner,
                )
                continue
            mine.append(net)
        interfaces = w.interfaces
        if not interfaces and host_interfaces is not None and mine:
            found_ifs = [host_interfaces.get(net.network_address) for net in mine]
            if all(found_ifs):
                interfaces = tuple(sorted({i for i in found_ifs if i}))
        workloads.append(dataclasses.replace(w, cidrs=tuple(mine), interfaces=interfaces))
    return dataclasses.replace(policy, workloads=tuple(workloads))
