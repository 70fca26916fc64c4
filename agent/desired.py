"""The agent's desired state: what the kernel and the proxy should hold.

One pure function, :func:`desired_state`, computes it from the policy file's
content and what the agent observed on the node (:class:`Observed`: the
discovered pods, the node's interface towards each pod address, the
hostNetwork pods' cgroups) and the datapath that selects traffic. Start-up,
reload, pod changes and drift repair all compute it here and hand the result
to one commit path (``agent.reconcile``); nothing else derives the resolved
policy or the ruleset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from egress_agent.agent.discovery import resolve
from egress_agent.agent.pods import FrozenMap, Snapshot
from egress_agent.policy.model import IPAddress, Policy
from egress_agent.rules.nft import Json
from egress_agent.rules.render import Selection, render_ruleset


def content_hash(text: str) -> str:
    """The policy file's identity in logs, status and audit records."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class Observed:
    """What the agent found on the node, besides the policy file."""

    # Discovery's last view of the pods on this node; None before its first list.
    pods: Snapshot | None = None
    # Pod address -> the node's interface routing to it (pod workloads are
    # bound to these: see discovery.resolve).
    host_interfaces: FrozenMap[IPAddress, str] = field(default_factory=FrozenMap)
    # hostNetwork pods' uid -> cgroup path, for pod selectors with hostNetwork.
    pod_cgroups: FrozenMap[str, str] = field(default_factory=FrozenMap)

    def with_(
        self,
        *,
        pods: Snapshot | None = None,
        host_interfaces: Mapping[IPAddress, str] | None = None,
        pod_cgroups: Mapping[str, str] | None = None,
    ) -> Observed:
        """A copy with what was looked up again (None: keep what was known)."""
        return Observed(
            pods=self.pods if pods is None else pods,
            host_interfaces=self.host_interfaces
            if host_interfaces is None
            else FrozenMap(host_interfaces),
            pod_cgroups=self.pod_cgroups if pod_cgroups is None else FrozenMap(pod_cgroups),
        )


@dataclass(frozen=True, kw_only=True)
class Desired:
    """The policy in force and everything derived from it. Never changed in
    place: a change is a new value, committed as a whole or not at all."""

    # The file's policy, and its content hash.
    source: Policy
    policy_hash: str
    observed: Observed
    selection: Selection
    # The policy the datapath and the proxy enforce: pod workloads resolved
    # to the observed addresses, interfaces and cgroups.
    policy: Policy
    # The nftables ruleset for ``policy`` and ``selection``.
    doc: Json

    def same_effect(self, other: Desired) -> bool:
        """Whether committing ``other`` over this one would change nothing
        the kernel or the proxy holds."""
        return self.policy == other.policy and self.doc == other.doc


def desired_state(
    source: Policy,
    *,
    policy_hash: str,
    observed: Observed,
    selection: Selection,
) -> Desired:
    """The desired state for the file's policy ``source`` on a node where
    ``observed`` was found, with traffic selected by ``selection``."""
    policy = resolve(
        source,
        observed.pods,
        host_interfaces=observed.host_interfaces,
        pod_cgroups=observed.pod_cgroups,
    )
    return Desired(
        source=source,
        policy_hash=policy_hash,
        observed=observed,
        selection=selection,
        policy=policy,
        doc=render_ruleset(policy, selection=selection),
    )
