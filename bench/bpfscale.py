"""BPF datapath at scale, run inside the lab's node namespace.

    python -m bench.bpfscale --workloads N --cidrs M --pin-dir DIR

Loads the classifier, then times (a) writing the maps from scratch for N
workloads and M except CIDRs (half IPv4, half IPv6), (b) a change of one
workload's CIDR, (c) the same change through a full verify (reading every
entry back from the kernel), (d) one pod workload added, moved or removed
through the delta path (``BpfDatapath.update_workloads``: no pass over the
10,000 others), DELTAS times, with the median and the slowest. Then it
attaches the classifier to every interface and prints one JSON line; it
keeps the classifier attached until
its stdin closes, so the caller can measure throughput with it in place
(the bench client's address is a workload whose rules never match its port:
every packet runs the whole lookup chain and none is diverted).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import struct
import sys
import time
from typing import Any

from egress_agent.bpf.classifier import BpfConfig
from egress_agent.bpf.datapath import BpfDatapath, entry_counts
from egress_agent.policy.model import (
    Action,
    InterceptRule,
    PodSelector,
    Policy,
    PortRange,
    ProxySettings,
    Workload,
)
from egress_agent.rules.render import render_ruleset
from tests.lab.bpfrun import run_classifier


def scale_policy(workloads: int, cidrs: int, client: str) -> Policy:
    ws = [
        Workload(
            name=f"w{i}",
            cidrs=(ipaddress.ip_network(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32"),),
        )
        for i in range(workloads - 1)
    ]
    ws.append(Workload(name="client", cidrs=(ipaddress.ip_network(f"{client}/32"),)))
    half = cidrs // 2
    except_v4 = tuple(
        ipaddress.ip_network(f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}/32")
        for i in range(half)
    )
    except_v6 = tuple(ipaddress.ip_network(f"fd00:aa:{i:x}::/48") for i in range(cidrs - half))
    rule = InterceptRule(
        index=0,
        sources=tuple(w.name for w in ws),
        ports=(PortRange(first=443, last=443),),
        except_cidrs=except_v4 + except_v6,
    )
    return Policy(
        version=1,
        proxy=ProxySettings(),
        workloads=tuple(ws),
        intercept=(rule,),
        egress=(),
        default=Action.DENY,
    )


def tcp_syn(src: str, dst: str, dport: int) -> bytes:
    """Ethernet + IPv4 + TCP SYN, as the classifier sees it at tc ingress."""
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 40, 1, 0, 64, 6, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    return eth + ip + tcp


def udp(src: str, dst: str, dport: int) -> bytes:
    """Ethernet + IPv4 + UDP with 8 bytes of payload."""
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 36, 1, 0, 64, 17, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return eth + ip + struct.pack("!HHHH", 40000, dport, 16, 0) + b"x" * 8


def ns_per_packet(prog_fd: int, packet: bytes, repeat: int) -> tuple[float, int]:
    """The kernel runs the program ``repeat`` times on ``packet`` and reports
    the mean time per run (BPF_PROG_TEST_RUN); also returns the mark it set."""
    run = run_classifier(prog_fd, packet, repeat=repeat)
    return run.ns, run.mark


def pod_workloads(policy: Policy) -> Policy:
    """The same workloads as Kubernetes pod workloads (one address each)."""
    selector = PodSelector(namespace="bench")
    return dataclasses.replace(
        policy,
        workloads=tuple(dataclasses.replace(w, pods=selector) for w in policy.workloads),
    )


DELTAS = 300


def delta_changes(dp: BpfDatapath, pods: Policy) -> dict[str, Any]:
    """One pod workload at a time through the delta path, among the 10,000
    pod workloads of ``pods`` (in force): added, its address moved, removed,
    DELTAS times in turn. Times in ms: the median and the slowest of each."""
    times: dict[str, list[float]] = {"add": [], "move": [], "remove": []}
    entries: dict[str, int] = {}
    selector = PodSelector(namespace="bench")
    workloads = pods.workloads
    for i in range(DELTAS // 3):
        name = f"delta{i}"
        steps = (
            ("add", f"10.251.{i // 256}.{i % 256}/32"),
            ("move", f"10.252.{i // 256}.{i % 256}/32"),
            ("remove", None),
        )
        for what, cidr in steps:
            if cidr is None:
                upserts: tuple[Workload, ...] = ()
                removals: tuple[str, ...] = (name,)
                now = pods
            else:
                w = Workload(name=name, cidrs=(ipaddress.ip_network(cidr),), pods=selector)
                upserts, removals = (w,), ()
                now = dataclasses.replace(pods, workloads=(*workloads, w))
            result = dp.update_workloads(now, upserts=upserts, removals=removals)
            times[what].append(result.seconds * 1000)
            entries[what] = result.changed_entries
    out: dict[str, Any] = {"count": DELTAS, "entries": entries}
    for what, ms in times.items():
        ms.sort()
        out[what] = {"median_ms": round(ms[len(ms) // 2], 3), "max_ms": round(ms[-1], 3)}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", type=int, default=10_000)
    p.add_argument("--cidrs", type=int, default=10_000)
    p.add_argument("--client", default="198.19.1.2")
    p.add_argument("--pin-dir", required=True)
    args = p.parse_args()
    proxy = ProxySettings()
    config = BpfConfig(
        divert_mark=proxy.divert_mark,
        upstream_mark=proxy.upstream_mark,
        proxy_v4=proxy.address_v4,
        proxy_v6=proxy.address_v6,
        pin_dir=args.pin_dir,
    )
    policy = scale_policy(args.workloads, args.cidrs, args.client)
    dp = BpfDatapath(config=config)
    t0 = time.perf_counter()
    dp.start(dataclasses.replace(policy, workloads=(), intercept=()))
    load_s = time.perf_counter() - t0
    try:
        full = dp.update(policy)
        counts = entry_counts(dp.planner.contents())
        # One entry: w5's address moves.
        moved = list(policy.workloads)
        moved[5] = Workload(name="w5", cidrs=(ipaddress.ip_network("10.250.0.5/32"),))
        changed = dataclasses.replace(policy, workloads=tuple(moved))
        one = dp.update(changed)
        back = dp.update(policy)
        # One destination CIDR: the rules' maps are recomputed whole.
        rule = policy.intercept[0]
        one_cidr = dataclasses.replace(
            policy,
            intercept=(
                dataclasses.replace(
                    rule,
                    except_cidrs=(*rule.except_cidrs[1:], ipaddress.ip_network("192.0.2.0/24")),
                ),
            ),
        )
        cidr = dp.update(one_cidr)
        dp.update(policy)
        # What the agent does for one pod coming or going, with 10,000 pod
        # workloads (Kubernetes): render the BPF-mode ruleset (no output rules
        # for pods), compare it, and update the maps.
        pods = pod_workloads(policy)
        dp.update(pods)
        doc = render_ruleset(pods, selection="bpf")
        moved_pods = list(pods.workloads)
        moved_pods[7] = dataclasses.replace(
            moved_pods[7], cidrs=(ipaddress.ip_network("10.250.0.7/32"),)
        )
        t2 = time.perf_counter()
        pod_change = dataclasses.replace(pods, workloads=tuple(moved_pods))
        same_table = render_ruleset(pod_change, selection="bpf") == doc
        pod_update = dp.update(pod_change)
        agent_pod_change_s = time.perf_counter() - t2
        deltas = delta_changes(dp, pod_change)
        dp.update(policy)
        assert dp.classifier is not None
        fd = dp.classifier.prog_fd
        cost = {}
        for label, packet in (
            ("no_identity", tcp_syn("198.51.100.7", "198.18.1.2", 443)),
            ("workload_not_diverted", tcp_syn(args.client, "198.18.1.2", 5201)),
            ("workload_diverted", tcp_syn(args.client, "198.18.1.2", 443)),
            ("workload_excepted", tcp_syn(args.client, "172.16.0.9", 443)),
            ("no_identity_udp", udp("198.51.100.7", "198.18.1.2", 443)),
            ("workload_udp", udp(args.client, "198.18.1.2", 443)),
        ):
            ns, mark = ns_per_packet(fd, packet, 200_000)
            cost[label] = {"ns": ns, "diverted": bool(mark & proxy.divert_mark)}
        t1 = time.perf_counter()
        problems = dp.verify(full=True)
        verify_s = time.perf_counter() - t1
        print(
            json.dumps(
                {
                    "compile_and_load_s": round(load_s, 3),
                    "full_apply_s": round(full.seconds, 3),
                    "full_entries": full.changed_entries,
                    "one_change_ms": round(one.seconds * 1000, 2),
                    "one_change_entries": one.changed_entries,
                    "one_change_back_ms": round(back.seconds * 1000, 2),
                    "one_cidr_change_ms": round(cidr.seconds * 1000, 2),
                    "one_cidr_change_entries": cidr.changed_entries,
                    "agent_pod_change_ms": round(agent_pod_change_s * 1000, 2),
                    "agent_pod_change_entries": pod_update.changed_entries,
                    "agent_pod_change_same_table": same_table,
                    "delta": deltas,
                    "verify_s": round(verify_s, 3),
                    "verify_problems": problems,
                    "ns_per_packet": cost,
                    "map_entries": counts,
                    "attached": sorted(dp.attached),
                }
            ),
            flush=True,
        )
        sys.stdin.read()  # attached until the caller is done measuring
    finally:
        dp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
