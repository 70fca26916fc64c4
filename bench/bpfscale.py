"""BPF datapath at scale, run inside the lab's node namespace.

    python -m bench.bpfscale --workloads N --cidrs M --pin-dir DIR

Loads the classifier, then times (a) writing the maps from scratch for N
workloads and M except CIDRs (half IPv4, half IPv6), (b) a change of one
workload's CIDR, (c) the same change through a full verify (reading every
entry back from the kernel). Then it attaches the classifier to every
interface and prints one JSON line; it keeps the classifier attached until
its stdin closes, so the caller can measure throughput with it in place
(the bench client's address is a workload whose rules never match its port:
every packet runs the whole lookup chain and none is diverted).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import sys
import time

from egress_agent.bpf.datapath import BpfDatapath, entry_counts
from egress_agent.bpf.loader import BpfConfig
from egress_agent.policy.model import (
    Action,
    InterceptRule,
    Policy,
    PortRange,
    ProxySettings,
    Workload,
)


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
                    "verify_s": round(verify_s, 3),
                    "verify_problems": problems,
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
