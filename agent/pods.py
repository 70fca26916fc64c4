"""The pods on this node as plain data, and which of them a selector names.

A policy on a Kubernetes node names workloads by selector (namespace, pod
labels, namespace labels: the policy model's
:class:`~egress_agent.policy.model.PodSelector`), but the datapath diverts by
source address. This module is the pure half of the bridge between the two:
the discovered state (:class:`Snapshot` of :class:`PodInfo` and namespaces'
labels), reading it from the API's JSON objects (:func:`pod_info`,
:func:`namespace_info`), and deciding which pods, and so which addresses, a
selector names (:func:`matches`, :func:`selected_networks`,
:func:`address_owners`). Nothing here does I/O; keeping the state current is
:mod:`egress_agent.agent.reflector`'s job.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from egress_agent.policy.model import IPAddress, IPNetwork, PodSelector

log = logging.getLogger(__name__)

# Pods that have finished keep status.podIPs, but the kubelet has released the
# addresses (the sandbox is gone) and may already have given them to a new pod.
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """An immutable mapping that hashes by value (labels, namespaces' labels),
    so that pods and snapshots are hashable plain data."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        data: dict[K, V] = dict(items.items()) if isinstance(items, Mapping) else dict(items)
        self._data = data

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def _frozen(items: Mapping[str, str]) -> FrozenMap[str, str]:
    return items if isinstance(items, FrozenMap) else FrozenMap(items)


@dataclass(frozen=True, kw_only=True)
class PodInfo:
    """What the datapath needs to know of one pod on this node."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())
    # status.podIPs (IPv4 and IPv6); empty until the network plugin has assigned them.
    ips: tuple[IPAddress, ...] = ()
    host_network: bool = False
    phase: str = "Pending"
    # metadata.deletionTimestamp is set: the pod is shutting down and its
    # address may already have been given to a new pod.
    terminating: bool = False
    created: str = ""  # metadata.creationTimestamp (RFC 3339, sorts as text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "ips", tuple(self.ips))


@dataclass(frozen=True, kw_only=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The discovered state at one moment: plain data, safe to keep and compare."""

    pods: tuple[PodInfo, ...]  # sorted by (namespace, name)
    namespace_labels: Mapping[str, Mapping[str, str]]
    pods_resource_version: str | None
    namespaces_resource_version: str | None
    # True once pods and namespaces have each been listed; stays true while the
    # API server is unreachable (the last known state is still the best one).
    synced: bool

    def labels_of_namespace(self, namespace: str) -> Mapping[str, str]:
        """The namespace's labels; empty when the namespace is not (yet) known."""
        return self.namespace_labels.get(namespace, FrozenMap())


def matches(selector: PodSelector, pod: PodInfo, namespace_labels: Mapping[str, str]) -> bool:
    """Whether ``selector`` names ``pod`` for its addresses (``pod``'s namespace
    has ``namespace_labels``).

    The answer is about the pod's own addresses, since those are what the
    datapath matches on, hence two exceptions:

    * a hostNetwork pod never matches: its IPs are the node's, shared with the
      kubelet and every other hostNetwork pod, so they cannot identify it;
    * a pod in phase Succeeded or Failed never matches: its IPs have been
      released and may already belong to another pod.

    A pod that has no IP yet does match; it contributes no address until its
    IPs are known (see :func:`selected_networks`).
    """
    if pod.host_network or pod.phase in TERMINAL_PHASES:
        return False
    return selects(selector, pod, namespace_labels)


def selects(selector: PodSelector, pod: PodInfo, namespace_labels: Mapping[str, str]) -> bool:
    """Whether the selector's own fields (namespace, labels, namespace labels)
    name ``pod``; every field set must match, and an empty selector names
    every pod, as in Kubernetes. Says nothing of whether the pod's addresses
    identify it (see :func:`matches`)."""
    if selector.namespace is not None and pod.namespace != selector.namespace:
        return False
    return _subset(selector.labels, pod.labels) and _subset(
        selector.namespace_labels, namespace_labels
    )


def _subset(wanted: Iterable[tuple[str, str]], have: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in wanted)


def address_owners(snapshot: Snapshot) -> dict[IPAddress, PodInfo]:
    """Which pod each address identifies, when several pods list it.

    The network plugin may give a terminating pod's address to a new pod
    before the API server has forgotten the old one, so for a while two pods
    claim one address. The address then belongs to the pod that is not
    terminating; between two such, to the newer one (the older one's entry is
    stale); ties go to the first by namespace and name, so every agent
    decides alike. hostNetwork pods and finished pods claim nothing.
    """
    owners: dict[IPAddress, PodInfo] = {}
    for pod in snapshot.pods:
        if pod.host_network or pod.phase in TERMINAL_PHASES:
            continue
        for ip in pod.ips:
            held = owners.get(ip)
            if held is None or _claim(pod) > _claim(held):
                owners[ip] = pod
    return owners


def _claim(pod: PodInfo) -> tuple[bool, str]:
    return (not pod.terminating, pod.created)


def address_conflicts(snapshot: Snapshot) -> list[str]:
    """One line per address that several pods list, saying which keeps it."""
    lines = []
    for ip, owner in address_owners(snapshot).items():
        others = [
            f"{p.namespace}/{p.name}{' (terminating)' if p.terminating else ''}"
            for p in snapshot.pods
            if p is not owner
            and ip in p.ips
            and not p.host_network
            and p.phase not in TERMINAL_PHASES
        ]
        if others:
            lines.append(
                f"address {ip} is listed by {owner.namespace}/{owner.name} and "
                f"{', '.join(others)}: it identifies {owner.namespace}/{owner.name}"
            )
    return lines


def selected_networks(selector: PodSelector, snapshot: Snapshot) -> tuple[IPNetwork, ...]:
    """The host networks (/32, /128) of the pods ``selector`` names: a workload's
    ``cidrs`` for the renderer. Sorted, IPv4 first, without duplicates. An
    address several pods list counts only for its owner (:func:`address_owners`)."""
    owners = address_owners(snapshot)
    addresses = {
        ip
        for pod in snapshot.pods
        if matches(selector, pod, snapshot.labels_of_namespace(pod.namespace))
        for ip in pod.ips
        if owners.get(ip) is pod
    }
    ordered = sorted(addresses, key=lambda a: (a.version, int(a)))
    return tuple(ipaddress.ip_network(a) for a in ordered)


# --- Reading the API's objects -------------------------------------------------


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """A PodInfo from a Pod object as the API serves it (JSON); ``ValueError``
    when it lacks what identifies a pod."""
    metadata = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    namespace, name = _required(metadata, "namespace"), _required(metadata, "name")
    entries = status.get("podIPs") or []
    texts = [e.get("ip") for e in entries if isinstance(e, Mapping)]
    if not texts and status.get("podIP"):  # servers before dual-stack set podIP only
        texts = [status["podIP"]]
    ips: list[IPAddress] = []
    for text in texts:
        try:
            ips.append(ipaddress.ip_address(str(text)))
        except ValueError:
            log.warning("pod %s/%s: ignoring podIPs entry %r: not an IP", namespace, name, text)
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=str(metadata.get("uid") or ""),
        labels=_labels(metadata),
        ips=tuple(dict.fromkeys(ips)),
        host_network=bool(spec.get("hostNetwork", False)),
        phase=str(status.get("phase") or "Pending"),
        terminating=bool(metadata.get("deletionTimestamp")),
        created=str(metadata.get("creationTimestamp") or ""),
    )


def namespace_info(obj: Mapping[str, Any]) -> NamespaceInfo:
    metadata = _mapping(obj.get("metadata"), "metadata")
    return NamespaceInfo(name=_required(metadata, "name"), labels=_labels(metadata))


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is {type(value).__name__}, expected an object")
    return value


def _required(metadata: Mapping[str, Any], key: str) -> str:
    value = metadata.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"metadata.{key} is missing")
    return value


def _labels(metadata: Mapping[str, Any]) -> FrozenMap[str, str]:
    labels = _mapping(metadata.get("labels"), "metadata.labels")
    return FrozenMap((str(k), str(v)) for k, v in labels.items())


def resource_version(obj: object) -> str | None:
    if isinstance(obj, Mapping):
        metadata = obj.get("metadata")
        if isinstance(metadata, Mapping):
            rv = metadata.get("resourceVersion")
            if isinstance(rv, str) and rv:
                return rv
    return None
