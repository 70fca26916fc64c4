"""The nftables JSON vocabulary the renderer writes in: the table, sets,
chains, rules and the expressions they are made of (``libnftables-json(5)``).

Pure constructors of plain dicts, nothing else: what the rules say is the
renderer's (``render``) and the checks' (``checks``) business.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from egress_agent.policy.model import IPNetwork, Policy, PortRange

TABLE = "egress_agent"
FAMILY = "inet"

Json = dict[str, Any]

# nftables address families and their names in ``meta nfproto``.
PROTO = {"ip": "ipv4", "ip6": "ipv6"}


def suffix(fam: str) -> str:
    """The set name suffix of an address family: ``v4`` or ``v6``."""
    return "v4" if fam == "ip" else "v6"


def addr_type(fam: str) -> str:
    return "ipv4_addr" if fam == "ip" else "ipv6_addr"


def nft_set(name: str, type_: str, elems: list[Any]) -> Json:
    s: Json = {"family": FAMILY, "table": TABLE, "name": name, "type": type_, "flags": ["interval"]}
    if elems:
        s["elem"] = elems
    return s


def base_chain(name: str, type_: str, hook: str, prio: int) -> Json:
    return {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": type_,
        "hook": hook,
        "prio": prio,
        "policy": "accept",
    }


def regular_chain(name: str) -> Json:
    """A chain without a hook: only reached by ``jump`` from the base chains."""
    return {"family": FAMILY, "table": TABLE, "name": name}


def rule(chain: str, exprs: list[Json], comment: str) -> Json:
    return {"chain": chain, **rule_body(exprs, comment)}


def rule_body(exprs: list[Json], comment: str) -> Json:
    return {"expr": exprs, "comment": comment}


def in_table(r: Json) -> Json:
    return {"family": FAMILY, "table": TABLE, **r}


def match(left: Json, right: Any, *, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def ct(key: str) -> Json:
    return {"ct": {"key": key}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def marked(mark: int) -> Json:
    """The packet mark has all of ``mark``'s bits."""
    return match({"&": [meta("mark"), mark]}, mark)


def proxy_addr(policy: Policy, fam: str) -> str:
    return str(policy.proxy.address_v4 if fam == "ip" else policy.proxy.address_v6)


def divert(policy: Policy, fam: str) -> Json:
    return {"dnat": {"family": fam, "addr": proxy_addr(policy, fam), "port": policy.proxy.port}}


def prefix_elems(nets: Iterable[IPNetwork]) -> list[Any]:
    elems: list[Any] = []
    for n in nets:
        if n.prefixlen == n.max_prefixlen:
            elems.append(str(n.network_address))
        else:
            elems.append({"prefix": {"addr": str(n.network_address), "len": n.prefixlen}})
    return elems


def port_elems(ports: Iterable[PortRange]) -> list[Any]:
    merged: list[PortRange] = []
    for r in sorted(ports):
        if merged and r.first <= merged[-1].last + 1:
            last = merged[-1]
            merged[-1] = PortRange(first=last.first, last=max(last.last, r.last))
        else:
            merged.append(r)
    return [r.first if r.first == r.last else {"range": [r.first, r.last]} for r in merged]


def interface_elems(names: Iterable[str]) -> list[str]:
    """Interface names and ``prefix*`` patterns for an interval set: one a
    pattern covers is left out (the set would refuse it as an overlapping
    interval: ``pod*`` holds ``pod1-pa``), and so is a pattern a shorter one
    covers."""
    names = list(dict.fromkeys(names))
    prefixes = [n[:-1] for n in names if n.endswith("*")]

    def covered(name: str) -> bool:
        own = name[:-1] if name.endswith("*") else None
        return any(name.startswith(p) and p != own for p in prefixes)

    return [n for n in names if not covered(n)]


def split_families(
    nets: Iterable[IPNetwork],
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    """IPv4 and IPv6 networks apart, each collapsed."""
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))
