"""The proxy's own addresses on the node's loopback interface.

Diverted connections are DNAT-ed to these addresses (see ``rules.render``), so
they must be local to the node. The kernel here has no ``dummy`` links, and a
loopback address is enough: a DNAT-ed packet whose destination is local is
delivered to the listening proxy from whichever interface it came in on.
169.254.0.0/16 (RFC 3927) and a ULA are never routed off the node.

The addresses belong to the agent by configuration (``proxy.address_v4`` and
``proxy.address_v6``): start-up adds them if missing and stop removes them.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egress_agent.policy.model import IPAddress, ProxySettings

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02
LOOPBACK = "lo"


@dataclass(frozen=True, kw_only=True)
class AddressChange:
    address: IPAddress
    added: bool


def _lo_index(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname=LOOPBACK)
    if not found:
        raise OSError(errno.ENODEV, "no loopback interface in this network namespace")
    return int(found[0])


def ensure_proxy_addresses(settings: ProxySettings) -> list[AddressChange]:
    """Add the proxy addresses to ``lo`` where missing; returns what was done."""
    changes = []
    with IPRoute() as ipr:
        index = _lo_index(ipr)
        for address in (settings.address_v4, settings.address_v6):
            prefix = 32 if address.version == 4 else 128
            try:
                if address.version == 4:
                    ipr.addr("add", index=index, address=str(address), prefixlen=prefix)
                else:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(address),
                        prefixlen=prefix,
                        flags=IFA_F_NODAD,
                    )
                changes.append(AddressChange(address=address, added=True))
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    changes.append(AddressChange(address=address, added=False))
                elif address.version == 6 and exc.code in (errno.EACCES, errno.EADDRNOTAVAIL):
                    log.warning(
                        "IPv6 looks disabled here; IPv6 traffic will not be diverted: %s", exc
                    )
                else:
                    raise OSError(exc.code, f"cannot add {address} to {LOOPBACK}: {exc}") from exc
    return changes


def remove_proxy_addresses(settings: ProxySettings) -> None:
    """Remove the proxy addresses from ``lo``; absent ones are fine."""
    with IPRoute() as ipr:
        index = _lo_index(ipr)
        for address in (settings.address_v4, settings.address_v6):
            prefix = 32 if address.version == 4 else 128
            try:
                ipr.addr("del", index=index, address=str(address), prefixlen=prefix)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                    raise OSError(
                        exc.code, f"cannot remove {address} from {LOOPBACK}: {exc}"
                    ) from exc


def missing_proxy_addresses(settings: ProxySettings) -> list[IPAddress]:
    """The proxy addresses that are not on ``lo`` (someone removed them)."""
    with IPRoute() as ipr:
        index = _lo_index(ipr)
        present = {a.get("address") for a in ipr.get_addr(index=index)}
    return [a for a in (settings.address_v4, settings.address_v6) if str(a) not in present]


def host_interfaces(addresses: list[IPAddress]) -> dict[IPAddress, str]:
    """The node's interface that routes to each address (``ip route get``):
    for a pod on this node, its host-side veth (or the bridge it sits behind).
    Addresses routed through a gateway are not a local pod's and are left out,
    as are those with no route."""
    found: dict[IPAddress, str] = {}
    if not addresses:
        return found
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for address in addresses:
            try:
                (route,) = ipr.route("get", dst=str(address))[:1]
            except (NetlinkError, ValueError):
                continue
            if route.get_attr("RTA_GATEWAY") is not None:
                continue
            name = names.get(route.get_attr("RTA_OIF"))
            if name and name != "lo":
                found[address] = name
    return found
