"""``egress-agent status``: ask the running agent's status endpoint and
print what it says, in words (or as JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from egress_agent.agent.exitcodes import EXIT_FAILURE, EXIT_OK
from egress_agent.agent.status import parse_address


def status_command(args: argparse.Namespace) -> int:
    import http.client

    try:
        host, port = parse_address(args.status_address)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/status")
        snap = json.loads(conn.getresponse().read())
    except (OSError, ValueError) as exc:
        print(
            f"egress-agent: no agent answers on {args.status_address}: {exc} "
            "(is `egress-agent run` running in this network namespace?)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(snap, indent=2, sort_keys=True))
        return EXIT_OK
    pol, last = snap["policy"], snap["last_reload"]
    print(f"policy:       {pol['path']} generation {pol['generation']} sha256 {pol['hash']}")
    print(
        f"              {pol['workloads']} workloads, {pol['intercept_rules']} intercept rules, "
        f"{pol['egress_rules']} egress rules, default {pol['default']}"
    )
    audited = pol.get("audited") or []
    if pol.get("mode") == "audit":
        print("mode:         audit (enforce: false): denies are allowed and logged as audit-deny")
    elif audited:
        print(
            "mode:         enforce; audit mode (allowed, logged as audit-deny): "
            + ", ".join(audited)
        )
    else:
        print("mode:         enforce")
    if last is None:
        print("last reload:  none since start")
    elif last["error"]:
        print(f"last reload:  FAILED, still enforcing generation {last['generation']}:")
        for line in str(last["error"]).splitlines():
            print(f"                {line}")
    else:
        print(f"last reload:  ok (generation {last['generation']})")
    rules = ", ".join(f"{k} {v}" for k, v in snap["nft_rules_per_chain"].items())
    print(f"datapath:     {snap['datapath']} ({rules})")
    bpf = snap.get("bpf")
    if bpf and "program_id" in bpf:
        state = "maps in sync" if bpf["in_sync"] else "DRIFTED: " + "; ".join(bpf["problems"])
        where = ", ".join(bpf["attached"]) or "no interface"
        print(f"bpf:          program {bpf['program_id']} on {where}; {state}")
    elif bpf and bpf.get("fallback_reason"):
        print(f"bpf:          not used: {bpf['fallback_reason']}")
    cgroups = snap.get("cgroups")
    if cgroups and cgroups.get("refused"):
        print(f"cgroups:      REFUSED: {cgroups['refused']}")
    elif cgroups:
        attached = ", ".join(cgroups["attached"]) or "none"
        missing = f"; not there yet: {', '.join(cgroups['missing'])}" if cgroups["missing"] else ""
        print(f"cgroups:      socket marker on {attached}{missing}")
    print(
        f"kernel:       {'in sync' if snap['kernel_in_sync'] else 'DRIFTED'}, "
        f"{snap['drift_repairs']} repairs since start"
    )
    for line in [
        *describe_counters(snap),
        *describe_dns(snap.get("dns")),
        *describe_traffic(snap.get("traffic")),
    ]:
        print(line)
    relay = snap.get("relay")
    if relay:
        print(describe_relay(relay))
    print(
        f"connections:  {snap['connections_open']} open, "
        f"{snap['audit_records_written']} audit records written"
    )
    print(
        f"ready:        {'yes' if snap['ready'] else 'no: ' + '; '.join(snap['not_ready_because'])}"
    )
    return EXIT_OK if snap["ready"] else EXIT_FAILURE


def describe_relay(relay: dict[str, Any]) -> str:
    """The ``relay:`` line of ``status``: who moves relayed bytes."""
    counts = relay["connections"]
    if relay["mode"] == "kernel":
        head = (
            f"relay:        kernel ({relay['method']}), {relay['kernel_open']} open in the kernel"
        )
    else:
        head = "relay:        userspace (proxy.relay: userspace)"
    line = f"{head}; relayed so far: {counts['kernel']} kernel, {counts['userspace']} userspace"
    fallbacks = relay.get("fallbacks") or {}
    if fallbacks:
        line += "; fallbacks: " + ", ".join(f"{k} {v}" for k, v in fallbacks.items())
    return line


# Cache entries `status` prints (all of them are in `status --json`).
STATUS_DNS_ENTRIES = 20


def describe_dns(dns: dict[str, Any] | None) -> list[str]:
    """The proxy's resolver and DNS cache, as `status` prints them."""
    if not dns:
        return []
    servers = ", ".join(dns["nameservers"]) or "none"
    queries = dns["queries"]
    head = f"dns:          nameservers {servers} ({dns['resolv_conf']})"
    if dns.get("error"):
        head += f"; ERROR: {dns['error']}"
    lines = [
        head,
        f"              {dns['names']} names cached; queries: {queries['answer']} answered,"
        f" {queries['nodata']} without addresses, {queries['nxdomain']} NXDOMAIN,"
        f" {queries['failed']} failed",
    ]
    entries = dns["entries"]
    width = max((len(e["name"]) for e in entries[:STATUS_DNS_ENTRIES]), default=0)
    for entry in entries[:STATUS_DNS_ENTRIES]:
        addresses = ", ".join(entry["addresses"]) or "-"
        state = entry["state"]
        if state in ("fresh", "stale"):
            state += f", asks again in {max(entry['expires_in'], 0):g}s"
        if entry["error"]:
            state += f": {entry['error']}"
        pinned = " (policy)" if entry["pinned"] else ""
        lines.append(f"  {entry['name']:<{width}}  {addresses}  [{state}]{pinned}")
    if len(entries) > STATUS_DNS_ENTRIES:
        lines.append(f"  ... {len(entries) - STATUS_DNS_ENTRIES} more (status --json)")
    return lines


def describe_counters(snap: dict[str, object]) -> list[str]:
    """The ``diverted:`` and ``drops:`` lines of ``status``."""
    lines = []
    error = snap.get("counters_error")
    if error:
        lines.append(f"counters:     cannot be read: {error}")
    diverted = snap.get("diverted")
    if isinstance(diverted, dict):
        lines.append(
            f"diverted:     {diverted['packets']} packets DNAT-ed to the proxy"
            f" ({diverted['bytes']} bytes)"
        )
    drops = snap.get("drops")
    if isinstance(drops, dict):
        by_reason = {k: v for k, v in drops["by_reason"].items() if v}
        if not by_reason:
            lines.append("drops:        none")
        else:
            lines.append(
                "drops:        " + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items()))
            )
            for row in drops["rules"]:
                if row["packets"]:
                    lines.append(f"                {row['packets']:>8}  {row['rule']}")
    return lines


def describe_traffic(traffic: dict[str, Any] | None) -> list[str]:
    """The egress rules' limits and circuit breakers, as `status` prints them."""
    if not traffic or not (traffic["limits"] or traffic["breakers"]):
        return []
    lines = []
    for rule, lim in traffic["limits"].items():
        set_ = [
            f"{key} {lim[key]}"
            for key in ("connections", "rate", "requests")
            if lim[key] is not None
        ]
        open_ = sum(lim["open"].values())
        refused = sum(lim["refused"].values())
        lines.append(
            f"limits:       {rule}: {', '.join(set_)} per {lim['per']}; {open_} open,"
            f" {refused} refused"
        )
    for b in traffic["breakers"]:
        state = b["state"]
        if state == "open":
            state += f", probe in {b['probe_in_s']:g}s"
        elif state == "closed":
            state += f", {b['failures']} failures in a row"
        lines.append(f"breaker:      {b['rule']} -> {b['destination']}: {state}")
    return lines
