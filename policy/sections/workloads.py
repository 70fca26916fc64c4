"""``workloads:``, the named sources the rules speak of (by CIDRs, Kubernetes
pods, host-side interfaces or cgroups), and the references to them from the
rules and the CONNECT listener."""

from __future__ import annotations

import re

from yaml.nodes import Node

from egress_agent.policy import fields
from egress_agent.policy.model import IPNetwork, PodSelector, Workload
from egress_agent.policy.yamlnodes import Reader, did_you_mean, join, line_of

_WORKLOAD_KEYS = ("cidrs", "pods", "interfaces", "cgroups")
_PODS_KEYS = ("namespace", "labels", "namespaceLabels", "hostNetwork")
# Kubernetes label syntax: an optional DNS-subdomain prefix and a name of at
# most 63 characters; values at most 63 characters, possibly empty.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY_RE = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _LABEL_NAME
)
_LABEL_VALUE_RE = re.compile(f"({_LABEL_NAME})?")
_namespace = fields.text_like(
    re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"),
    what="a namespace name",
    kind="a namespace name",
    rule="expected lower-case letters, digits and '-', at most 63 characters",
)

# Workloads by name, as the rules check their references against them; None
# when the section itself is unusable and references cannot be checked.
Known = dict[str, Workload] | None


def workloads(r: Reader, node: Node, path: str) -> dict[str, Workload] | None:
    """The workloads by name (also those with invalid contents, so that
    references to them are not reported twice); None when the section
    itself is unusable and references cannot be checked."""
    entries = fields.named_entries(r, node, path, what="workloads (name: {cidrs: [...]})")
    if entries is None:
        return None
    result: dict[str, Workload] = {}
    owners: dict[IPNetwork, tuple[str, Node]] = {}
    for name, _key_node, value_node in entries:
        w_path = join(path, name)
        w = r.mapping(value_node, w_path, what=f"workload {name!r}", allowed=_WORKLOAD_KEYS)
        cidrs: list[IPNetwork] = []
        interfaces: tuple[str, ...] = ()
        pods: PodSelector | None = None
        cgroups: tuple[str, ...] = ()
        if w is not None and "cgroups" in w:
            others = [k for k in ("cidrs", "pods", "interfaces") if k in w]
            if others:
                r.problem(
                    w["cgroups"][0],
                    join(w_path, "cgroups"),
                    f"workload {name!r} has both cgroups and {others[0]}: a workload is"
                    " recognised either by its cgroups (node processes) or by addresses",
                )
            cgroups = tuple(
                r.items(
                    w["cgroups"][1],
                    join(w_path, "cgroups"),
                    what="a list of cgroup paths",
                    read=fields.cgroup_path,
                    empty="needs at least one cgroup path like system.slice/backup.service",
                )
            )
        elif w is not None:
            if "pods" in w and "cidrs" in w:
                r.problem(
                    w["pods"][0],
                    join(w_path, "pods"),
                    f"workload {name!r} has both cidrs and pods: give one of them"
                    " (addresses, or Kubernetes pods whose addresses the agent discovers)",
                )
            elif "pods" in w:
                pods = pod_selector(r, w["pods"][1], join(w_path, "pods"))
            else:
                r.require(
                    value_node,
                    w_path,
                    w,
                    {"cidrs": "expected a non-empty list of CIDRs like 10.0.0.0/24"},
                )
            if "cidrs" in w:
                cidrs = _cidrs(r, w["cidrs"][1], join(w_path, "cidrs"), name, owners)
            interfaces = tuple(r.field(w, w_path, "interfaces", _interfaces, default=[]))
        result[name] = Workload(
            name=name, cidrs=tuple(cidrs), interfaces=interfaces, pods=pods, cgroups=cgroups
        )
    return result


def _cidrs(
    r: Reader, node: Node, path: str, name: str, owners: dict[IPNetwork, tuple[str, Node]]
) -> list[IPNetwork]:
    """Workload ``name``'s CIDRs; ``owners`` remembers which workload gave
    each network first, so that no address identifies two."""

    def owned(r: Reader, item: Node, i_path: str) -> IPNetwork | None:
        net = fields.network(r, item, i_path)
        if net is None:
            return None
        owner = owners.setdefault(net, (name, item))
        if owner[0] != name:
            r.problem(
                item,
                i_path,
                f"{net} is also a CIDR of workload {owner[0]!r} (line"
                f" {line_of(owner[1])}): an address must identify one"
                " workload; give this network to only one of them (a longer or"
                " shorter prefix may overlap: the longest prefix wins)",
            )
        return net

    return r.items(
        node,
        path,
        what="a list of CIDRs",
        read=owned,
        empty=f"workload {name!r} needs at least one CIDR: a workload is"
        " recognised by its source addresses",
    )


def _interfaces(r: Reader, node: Node, path: str) -> list[str]:
    return r.items(node, path, what="a list of interface names", read=fields.interface_name)


def pod_selector(r: Reader, node: Node, path: str) -> PodSelector | None:
    selector = r.mapping(node, path, what="a pod selector", allowed=_PODS_KEYS)
    if selector is None:
        return None
    if not set(selector) - {"hostNetwork"}:
        r.problem(
            node,
            path,
            "an empty pod selector would select every pod on the node: give a"
            " namespace, labels or namespaceLabels",
        )
        return None
    host_network = False
    if "hostNetwork" in selector:
        host_network = fields.boolean(
            r, selector["hostNetwork"][1], join(path, "hostNetwork"), default=False
        )
    return PodSelector(
        namespace=r.field(selector, path, "namespace", _namespace, default=None),
        labels=r.field(selector, path, "labels", labels, default=()),
        namespace_labels=r.field(selector, path, "namespaceLabels", labels, default=()),
        host_network=host_network,
    )


def labels(r: Reader, node: Node, path: str) -> tuple[tuple[str, str], ...]:
    entries = r.entries(node, path, what="labels (a mapping of key: value)")
    pairs: list[tuple[str, str]] = []
    for key, key_node, value_node in entries or ():
        k_path = join(path, key)
        if not _LABEL_KEY_RE.fullmatch(key) or len(key.rpartition("/")[2]) > 63:
            r.problem(
                key_node,
                k_path,
                f"{key!r} is not a label key: expected [prefix/]name, the name at most"
                " 63 letters, digits, '-', '_' or '.'",
            )
            continue
        value = r.scalar(value_node, k_path, what="a label value")
        if not isinstance(value, str):
            if value is not None:
                r.problem(
                    value_node,
                    k_path,
                    f"expected a label value as a string, found {r.describe(value_node)}:"
                    ' quote it, e.g. "true" or "5"',
                )
            continue
        if not _LABEL_VALUE_RE.fullmatch(value):
            r.problem(
                value_node,
                k_path,
                f"{value!r} is not a label value: at most 63 letters, digits, '-', '_'"
                " or '.', starting and ending with a letter or digit",
            )
            continue
        pairs.append((key, value))
    return tuple(sorted(pairs))


def is_known(r: Reader, node: Node, path: str, name: str, known: Known) -> bool:
    """Whether ``name`` is a defined workload; reported (with the closest
    name and the defined ones) when it is not."""
    if known is None or name in known:
        return True
    existing = ", ".join(sorted(known)) if known else "none are defined"
    r.problem(
        node,
        path,
        f"unknown workload {name!r}{did_you_mean(name, known)}; workloads: {existing}",
    )
    return False


def sources(
    r: Reader, node: Node, path: str, known: Known, *, empty_hint: bool = False
) -> tuple[str, ...]:
    """A rule's ``from``: a non-empty list of defined workload names."""

    def source(r: Reader, item: Node, i_path: str) -> str | None:
        name = r.text(item, i_path, what="a workload name")
        if name is None or not is_known(r, item, i_path, name, known):
            return None
        return name

    hint = "; leave out `from` to match traffic from any workload" if empty_hint else ""
    return tuple(
        r.items(
            node,
            path,
            what="a list of workload names",
            read=source,
            empty=f"expected at least one workload name{hint}",
        )
    )
