"""Attach the classifier at tc ingress (clsact) through netlink, and detach it.

Which interfaces: every Ethernet-type link of the node's network namespace
except ``lo`` and those the operator excludes. nftables' prerouting hook sees
traffic from every interface, so attaching everywhere is what makes the two
datapaths decide alike; a packet whose source is no workload costs one LPM
lookup. (L3 devices such as WireGuard carry no Ethernet header and are
skipped: their traffic is not classified by BPF; use --datapath nft there.)

Our filter is recognised by its name and priority. A clsact qdisc is removed
when the last filter on it was ours: one that carries someone else's filters
stays. That rule needs no memory of who created the qdisc, so it also repairs
what a killed run left behind.
"""

from __future__ import annotations

import errno
import fnmatch
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

FILTER_NAME = "egress_classify"
FILTER_PRIO = 0xC000  # well clear of tc's auto-allocated priorities (0xC000 - n)
INGRESS_PARENT = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
EGRESS_PARENT = 0xFFFFFFF3
ARPHRD_ETHER = 1


def candidate_links(exclude: Iterable[str] = ()) -> dict[str, int]:
    """Interfaces the classifier belongs on: name -> ifindex."""
    patterns = list(exclude)
    out = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name == "lo" or link["ifi_type"] != ARPHRD_ETHER:
                continue
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            out[name] = int(link["index"])
    return out


def all_links() -> dict[str, int]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): int(link["index"]) for link in ipr.get_links()}


def _ours(flt: Any) -> bool:
    if flt.get_attr("TCA_KIND") != "bpf" or (flt["info"] >> 16) != FILTER_PRIO:
        return False
    options = flt.get_attr("TCA_OPTIONS")
    return options is not None and options.get_attr("TCA_BPF_NAME") == FILTER_NAME


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    try:
        # A listing without a handle also returns a per-priority header entry.
        return [f for f in ipr.get_filters(index=index, parent=parent) if f["handle"]]
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []  # no clsact qdisc, or the link just went away
        raise


def attached(index: int) -> bool:
    with IPRoute() as ipr:
        return any(_ours(f) for f in _filters(ipr, index, INGRESS_PARENT))


def attach(index: int, prog_fd: int) -> None:
    """Ensure clsact on ``index`` and our filter on its ingress. An old
    filter of ours (a predecessor's, a crashed run's) is replaced in place,
    in one netlink request: removing it first and adding ours after would
    leave a moment in which packets are not classified, and an unmarked
    packet of a diverted workload is not diverted."""
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise OSError(
                    exc.code, f"cannot add clsact qdisc on ifindex {index}: {exc}"
                ) from exc
        old = [flt for flt in _filters(ipr, index, INGRESS_PARENT) if _ours(flt)]
        command, handle, extra = "add-filter", ":1", {}
        if old:
            # Same priority, handle and protocol: the kernel swaps the program.
            command, handle = "replace-filter", old[0]["handle"]
            extra = {"protocol": socket.ntohs(old[0]["info"] & 0xFFFF)}
        try:
            ipr.tc(
                command,
                "bpf",
                index,
                handle,
                fd=prog_fd,
                name=FILTER_NAME,
                parent=INGRESS_PARENT,
                prio=FILTER_PRIO,
                classid=1,
                direct_action=True,
                **extra,
            )
        except NetlinkError as exc:
            raise OSError(
                exc.code, f"cannot attach {FILTER_NAME} at tc ingress of ifindex {index}: {exc}"
            ) from exc


def _remove_ours(ipr: Any, index: int) -> int:
    removed = 0
    for flt in _filters(ipr, index, INGRESS_PARENT):
        if not _ours(flt):
            continue
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                index,
                flt["handle"],
                parent=INGRESS_PARENT,
                prio=FILTER_PRIO,
                # tcm_info carries the protocol in network byte order;
                # pyroute2 wants it in host order.
                protocol=socket.ntohs(flt["info"] & 0xFFFF),
            )
            removed += 1
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                raise
    return removed


def detach(index: int) -> bool:
    """Remove our filter from ``index``; remove clsact too if nothing else uses it.
    Returns whether anything of ours was there."""
    with IPRoute() as ipr:
        removed = _remove_ours(ipr, index)
        if (
            removed
            and not _filters(ipr, index, INGRESS_PARENT)
            and not _filters(ipr, index, EGRESS_PARENT)
        ):
            try:
                ipr.tc("del", "clsact", index)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise
        return bool(removed)


def detach_everywhere() -> list[str]:
    """Remove our filter from every link (start-up cleanup after a crash, stop)."""
    cleaned = []
    for name, index in all_links().items():
        if detach(index):
            cleaned.append(name)
    return cleaned


def clsact_links() -> list[str]:
    """Links that have a clsact qdisc (for tests checking cleanup)."""
    out = []
    with IPRoute() as ipr:
        names = {int(lk["index"]): lk.get_attr("IFLA_IFNAME") for lk in ipr.get_links()}
        for q in ipr.get_qdiscs():
            if q.get_attr("TCA_KIND") == "clsact":
                out.append(names.get(int(q["index"]), str(q["index"])))
    return out
