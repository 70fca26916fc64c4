"""Random policies and flows over the lab's fixed address plan, for the
property tests that hold the three deciders to one answer: the reference
model (``policy.decide``), the nftables datapath and the BPF datapath.

Everything is drawn from small pools so that overlaps are common: nested
CIDRs of several lengths (IPv4 and IPv6) over the pods' and the external
hosts' addresses, port ranges that cut through the servers' ports, except
lists inside to lists, workloads bound to a pod's interface or not.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from egress_agent.policy.model import (
    Action,
    InterceptRule,
    IPNetwork,
    Policy,
    PortRange,
    ProxySettings,
    Workload,
)

# (name, ipv4, ipv6) of the pods and the external hosts the lab builds.
PODS = (
    ("pa", "198.19.1.2", "fd00:19:1::2"),
    ("pb", "198.19.1.3", "fd00:19:1::3"),
    ("pc", "198.19.2.2", "fd00:19:2::2"),
)
EXTERNALS = (
    ("xa", "198.18.1.2", "fd00:18:1::2"),
    ("xb", "198.18.2.2", "fd00:18:2::2"),
)
PORTS = (80, 443, 8080, 9000)


def pod_ifname(index: int, name: str) -> str:
    """The node-side veth name ``Lab.add_pod`` gives the index-th host (from 0)."""
    return f"pod{index + 1}-{name}"[:15]


@dataclass(frozen=True, kw_only=True)
class Flow:
    pod: str
    src: str
    external: str
    dst: str
    port: int
    interface: str


def _prefixes(address: str, lengths: tuple[int, ...]) -> list[IPNetwork]:
    addr = ipaddress.ip_address(address)
    return [ipaddress.ip_network(f"{addr}/{n}", strict=False) for n in lengths]


SOURCE_POOL: list[IPNetwork] = sorted(
    {
        net
        for _, v4, v6 in PODS
        for net in _prefixes(v4, (32, 31, 24, 16)) + _prefixes(v6, (128, 127, 64, 48))
    },
    key=str,
)
DEST_POOL: list[IPNetwork] = sorted(
    {
        net
        for _, v4, v6 in EXTERNALS
        for net in _prefixes(v4, (32, 24, 16)) + _prefixes(v6, (128, 64, 32))
    },
    key=str,
)


def random_policy(rng: random.Random) -> Policy:
    pool = list(SOURCE_POOL)
    rng.shuffle(pool)
    workloads = []
    for i in range(rng.randint(1, 4)):
        take, pool = pool[: rng.randint(1, 3)], pool[rng.randint(1, 3) :]
        cidrs = tuple(dict.fromkeys(take))
        if not cidrs:
            break
        interfaces: tuple[str, ...] = ()
        if rng.random() < 0.3:
            picks = rng.sample(range(len(PODS)), rng.randint(1, 2))
            interfaces = tuple(pod_ifname(j, PODS[j][0]) for j in sorted(picks))
        workloads.append(Workload(name=f"w{i}", cidrs=cidrs, interfaces=interfaces))
    # No CIDR in two workloads (the loader refuses that).
    seen: set[IPNetwork] = set()
    unique = []
    for w in workloads:
        cidrs = tuple(c for c in w.cidrs if c not in seen)
        seen.update(cidrs)
        if cidrs:
            unique.append(Workload(name=w.name, cidrs=cidrs, interfaces=w.interfaces))
    workloads = unique
    names = [w.name for w in workloads]
    rules = []
    for i in range(rng.randint(1, 3)):
        sources = tuple(rng.sample(names, rng.randint(1, len(names))))
        ports: list[PortRange] = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            first = rng.choice((79, 80, 443, 444, 1000, 8080, 9000))
            last = first + rng.choice((0, 0, 1, 400, 8000))
            ports.append(PortRange(first=first, last=min(last, 65535)))
        to = tuple(rng.sample(DEST_POOL, rng.choice((0, 0, 1, 2))))
        except_ = tuple(rng.sample(DEST_POOL, rng.choice((0, 1, 2))))
        rules.append(
            InterceptRule(
                index=i, sources=sources, ports=tuple(ports), to_cidrs=to, except_cidrs=except_
            )
        )
    return Policy(
        version=1,
        proxy=ProxySettings(),
        workloads=tuple(workloads),
        intercept=tuple(rules),
        egress=(),
        default=Action.ALLOW,
    )


def all_flows(family: int | None = None) -> list[Flow]:
    """Every pod x external x port (x family) combination."""
    flows = []
    for i, (pod, p4, p6) in enumerate(PODS):
        for ext, e4, e6 in EXTERNALS:
            for port in PORTS:
                for fam, src, dst in ((4, p4, e4), (6, p6, e6)):
                    if family in (None, fam):
                        flows.append(
                            Flow(
                                pod=pod,
                                src=src,
                                external=ext,
                                dst=dst,
                                port=port,
                                interface=pod_ifname(i, pod),
                            )
                        )
    return flows


def to_yaml(policy: Policy, *, proxy_extra: str = "") -> str:
    """The policy as a file ``policy.load`` reads back to an equal model."""
    lines = ["version: 1"]
    if proxy_extra:
        lines.append(f"proxy: {{{proxy_extra}}}")
    lines.append("workloads:")
    for w in policy.workloads:
        cidrs = ", ".join(f'"{c}"' for c in w.cidrs)
        extra = f", interfaces: [{', '.join(w.interfaces)}]" if w.interfaces else ""
        lines.append(f"  {w.name}: {{cidrs: [{cidrs}]{extra}}}")
    lines.append("intercept:")
    for r in policy.intercept:
        lines.append(f"  - from: [{', '.join(r.sources)}]")
        if r.ports:
            ports = [str(p) if p.first == p.last else repr(str(p)) for p in r.ports]
            lines.append(f"    ports: [{', '.join(ports)}]")
        if r.to_cidrs:
            lines.append(f"    to_cidrs: [{', '.join(map(repr, map(str, r.to_cidrs)))}]")
        if r.except_cidrs:
            lines.append(f"    except_cidrs: [{', '.join(map(repr, map(str, r.except_cidrs)))}]")
    lines.append("default: allow")
    return "\n".join(lines) + "\n"
