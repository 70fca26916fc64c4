"""``egress-agent check`` (validate a policy file, show what the kernel will
do) and ``egress-agent bpf dump`` (what the BPF datapath would load)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from egress_agent.agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from egress_agent.policy.load import load_policy
from egress_agent.policy.model import NonTcp, Policy


def check_command(args: argparse.Namespace) -> int:
    from egress_agent.agent.agent import summary
    from egress_agent.rules.render import render_ruleset

    policy = load_policy(args.policy)
    doc = render_ruleset(policy, selection=args.datapath)
    if args.dry_run:
        from egress_agent.rules.apply import NftablesError, check_ruleset

        if os.geteuid() != 0:
            print(
                "egress-agent: --dry-run needs root (libnftables checks with the kernel)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        try:
            check_ruleset(doc)
        except NftablesError as exc:
            print(f"egress-agent: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if args.show_rules:
        print(json.dumps(doc, indent=2))
    print(f"{args.policy}: ok ({summary(policy)})", file=sys.stderr)
    for line in describe_kernel_checks(policy):
        print(f"  {line}", file=sys.stderr)
    return EXIT_OK


def describe_kernel_checks(policy: Policy) -> list[str]:
    """What the kernel drops besides diverting, in words (for ``check``)."""
    lines = []
    for rule in policy.intercept:
        if rule.non_tcp is NonTcp.DROP:
            to = ", ".join(map(str, rule.to_cidrs)) or "any destination"
            ex = ", ".join(map(str, rule.except_cidrs))
            lines.append(
                f"intercept[{rule.index}]: non-TCP from {', '.join(rule.sources)} to {to}"
                + (f" except {ex}" if ex else "")
                + " is dropped (replies and related ICMP errors pass)"
            )
    interfaces = policy.reverse_path_interfaces()
    if interfaces:
        lines.append("reverse-path check on: " + ", ".join(interfaces))
    return lines


def bpf_dump_command(args: argparse.Namespace) -> int:
    from egress_agent.bpf import layout
    from egress_agent.bpf.classifier import BpfConfig, dump
    from egress_agent.bpf.maps import UnsupportedPolicy, assign_ids, desired_maps
    from egress_agent.policy.model import ProxySettings

    policy = load_policy(args.policy) if args.policy else None
    proxy = policy.proxy if policy is not None else ProxySettings()
    config = BpfConfig(
        divert_mark=proxy.divert_mark,
        upstream_mark=proxy.upstream_mark,
        proxy_v4=proxy.address_v4,
        proxy_v6=proxy.address_v6,
        pin_dir=args.bpf_pin_dir,
    )
    print(dump(config))
    if policy is None:
        return EXIT_OK
    try:
        ids = assign_ids(policy, {})
        maps = desired_maps(policy, ids=ids, ifindexes={})
    except UnsupportedPolicy as exc:
        print(f"egress-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("// workload ids: " + ", ".join(f"{n}={i}" for n, i in ids.items()))
    print("// (interface bindings are filled with the node's ifindexes at run time)")
    for name in layout.CONFIG_MAPS:
        print(f"// {name}: {len(maps[name])} entries")
        for key, value in sorted(maps[name].items()):
            print(f"//   {key.hex()} -> {value.hex()}")
    return EXIT_OK
