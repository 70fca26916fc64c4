"""The ``egress-agent`` command line.

Exit codes: 0 success, 1 a runtime failure (permissions, kernel refused),
2 bad input (policy file or arguments) -- with every problem printed as
``file:line:col: field: what was expected``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS, parse_address
from egress_agent.bpf.classifier import DEFAULT_PIN_DIR
from egress_agent.policy.decide import (
    decide,
    format_addresses,
    identify,
    names_to_resolve,
    non_tcp_drop,
    should_divert,
)
from egress_agent.policy.load import PolicyError, load_policy
from egress_agent.policy.model import (
    Action,
    AzureSas,
    AzureSharedKey,
    Bearer,
    HttpRule,
    NonTcp,
    Policy,
    Resolution,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egress-agent",
        description="Divert chosen workloads' outbound TCP into a local policy proxy.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="apply the policy on this node and run the proxy until stopped"
    )
    run.add_argument("--policy", required=True, help="policy file (YAML)")
    run.add_argument(
        "--audit-log", default="-", help="audit records as JSON lines (default: - for stdout)"
    )
    run.add_argument(
        "--status-address",
        default=DEFAULT_STATUS_ADDRESS,
        help=f"loopback HOST:PORT of /status, /healthz, /readyz (default {DEFAULT_STATUS_ADDRESS})",
    )

    run.add_argument(
        "--kubeconfig",
        help="kubeconfig for pod discovery (default: the in-cluster service account);"
        " used only when a workload selects pods",
    )

    run.add_argument(
        "--no-handover",
        dest="handover",
        action="store_false",
        help="do not take over from an agent already running in this network namespace"
        " (start fails if one holds the proxy's port), nor hand over to a successor",
    )
    run.add_argument(
        "--after-handover",
        choices=["exit", "wait"],
        default="exit",
        help="once a successor took over and our connections ended: exit (default), or wait"
        " for SIGTERM (in a DaemonSet, so that the old container is not restarted)",
    )

    run.add_argument(
        "--datapath",
        choices=["nft", "bpf", "auto"],
        default="auto",
        help="who selects diverted traffic: nft (nftables sets), bpf (a tc classifier reading"
        " maps updated live; nftables only redirects), auto (bpf when it loads, else nft;"
        " says why). Default auto",
    )
    run.add_argument(
        "--bpf-pin-dir",
        default=DEFAULT_PIN_DIR,
        help=f"bpffs folder of the agent's own for its pinned program and maps"
        f" (default {DEFAULT_PIN_DIR}); removed at stop, and at start if a crash left it",
    )
    run.add_argument(
        "--cgroup-root",
        default=None,
        metavar="DIR",
        help="the cgroup v2 mount that cgroup workloads' paths are relative to"
        " (default: found in /proc/self/mountinfo)",
    )
    run.add_argument(
        "--bpf-exclude-interface",
        action="append",
        default=[],
        metavar="GLOB",
        help="never attach the classifier to interfaces matching GLOB (repeatable);"
        " traffic arriving there is then never diverted in the bpf datapath",
    )

    bpf = sub.add_parser("bpf", help="the BPF datapath: show what would be loaded")
    bpf_sub = bpf.add_subparsers(dest="bpf_command", required=True)
    bpf_dump = bpf_sub.add_parser(
        "dump", help="print the program source and flags, and the map entries for a policy"
    )
    bpf_dump.add_argument("--policy", help="also print the map entries this policy gives")
    bpf_dump.add_argument("--bpf-pin-dir", default=DEFAULT_PIN_DIR)

    status = sub.add_parser("status", help="show the running agent's state")
    status.add_argument("--status-address", default=DEFAULT_STATUS_ADDRESS)
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    check = sub.add_parser("check", help="validate a policy file; exit 2 when it is bad")
    check.add_argument("policy", help="policy file (YAML)")
    check.add_argument(
        "--show-rules", action="store_true", help="print the nftables JSON it renders to"
    )
    check.add_argument(
        "--datapath",
        choices=["nft", "bpf"],
        default="nft",
        help="render the ruleset of this datapath for --show-rules and --dry-run (default nft)",
    )
    check.add_argument(
        "--dry-run",
        action="store_true",
        help="also ask libnftables whether the ruleset would apply (root; changes nothing)",
    )

    explain = sub.add_parser(
        "explain", help="say whether a flow is diverted and what the proxy decides"
    )
    explain.add_argument("--policy", required=True)
    explain.add_argument("--from", dest="src", required=True, help="source address")
    explain.add_argument(
        "--to", dest="dst", required=True, help="destination ADDR:PORT or [V6]:PORT"
    )
    explain.add_argument("--server-name", help="TLS SNI or HTTP Host the client sends")
    explain.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR...]",
        help="take these as NAME's addresses instead of resolving it (repeatable)",
    )
    explain.add_argument(
        "--no-resolve",
        action="store_true",
        help="resolve no name: names without --address then own no address",
    )
    explain.add_argument("--interface", help="ingress interface (for interface-bound workloads)")
    explain.add_argument(
        "--workload",
        help="treat the source as a pod of this pods-selected workload (their addresses"
        " are only known on the node)",
    )

    demo = sub.add_parser("demo", help="run the demo on network namespaces on this machine")
    demo.add_argument("--keep-going", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="egress-agent: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 logs every netlink message at debug level.
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.root.level))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "status":
            return _status(args)
        if args.command == "bpf":
            return _bpf_dump(args)
        if args.command == "demo":
            from egress_agent.agent.demo import run_demo

            return run_demo()
    except PolicyError as exc:
        print(
            f"egress-agent: the policy is not valid ({len(exc.problems)} problems):",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def _run(args: argparse.Namespace) -> int:
    import uvloop

    from egress_agent.agent.agent import RunOptions
    from egress_agent.agent.kubernetes import KubernetesConfigError
    from egress_agent.agent.reconcile import DatapathError
    from egress_agent.agent.runner import run_agent
    from egress_agent.rules.apply import NftablesError

    options = RunOptions(
        policy_path=args.policy,
        audit_path=args.audit_log,
        status_address=args.status_address,
        kubeconfig=args.kubeconfig,
        handover=args.handover,
        after_handover=args.after_handover,
        datapath=args.datapath,
        bpf_pin_dir=args.bpf_pin_dir,
        bpf_exclude_interfaces=tuple(args.bpf_exclude_interface),
        cgroup_root=args.cgroup_root,
    )
    try:
        return uvloop.run(run_agent(options))
    except DatapathError as exc:
        logging.getLogger("egress_agent").error("%s", exc)
        return EXIT_FAILURE
    except KubernetesConfigError as exc:
        logging.getLogger("egress_agent").error("pod discovery cannot start: %s", exc)
        return EXIT_BAD_INPUT
    except NftablesError as exc:
        logging.getLogger("egress_agent").error("%s", exc)
        return EXIT_FAILURE
    except OSError as exc:
        logging.getLogger("egress_agent").error("%s", exc)
        return EXIT_FAILURE


def _check(args: argparse.Namespace) -> int:
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


def _bpf_dump(args: argparse.Namespace) -> int:
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


def _status(args: argparse.Namespace) -> int:
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
    for line in [*describe_counters(snap), *describe_dns(snap.get("dns"))]:
        print(line)
    print(
        f"connections:  {snap['connections_open']} open, "
        f"{snap['audit_records_written']} audit records written"
    )
    print(
        f"ready:        {'yes' if snap['ready'] else 'no: ' + '; '.join(snap['not_ready_because'])}"
    )
    return EXIT_OK if snap["ready"] else EXIT_FAILURE


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


def _explain(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    try:
        src = ipaddress.ip_address(args.src)
        host, _, port_text = args.dst.rpartition(":")
        dst = ipaddress.ip_address(host.strip("[]"))
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
    except ValueError as exc:
        print(
            f"egress-agent: explain: bad address: {exc} (use --from 10.0.0.5 --to 1.2.3.4:443)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    pod_workloads = [w.name for w in policy.workloads if w.pods is not None]
    if args.workload is not None:
        if args.workload not in pod_workloads:
            print(
                f"egress-agent: explain: --workload {args.workload!r} is not a pods-selected"
                f" workload (those are: {', '.join(pod_workloads) or 'none'})",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        host = ipaddress.ip_network(src)  # the /32 or /128 discovery would give it
        policy = dataclasses.replace(
            policy,
            workloads=tuple(
                dataclasses.replace(w, cidrs=(host,)) if w.name == args.workload else w
                for w in policy.workloads
            ),
        )
    workload = identify(policy, src, interface=args.interface)
    if workload is None and pod_workloads and args.workload is None:
        print(
            "note:      pods-selected workloads have no addresses here; add"
            f" --workload NAME ({', '.join(pod_workloads)}) to explain a pod's flow"
        )
    diverted = should_divert(policy, src=src, dst=dst, dst_port=port, interface=args.interface)
    print(f"workload:  {workload or '(none)'}")
    dropping = non_tcp_drop(policy, src=src, dst=dst, interface=args.interface)
    if dropping is not None:
        print(
            f"non-tcp:   dropped by intercept[{dropping.index}] (non_tcp: drop); replies to"
            " flows opened from outside and related ICMP errors pass"
        )
    elif workload is not None:
        print("non-tcp:   passes (no intercept rule with non_tcp: drop covers this destination)")
    if not diverted:
        print("diverted:  no (the kernel sends this flow directly; the proxy never sees it)")
        return EXIT_OK
    print("diverted:  yes")
    try:
        given = _given_addresses(args.address)
    except ValueError as exc:
        print(f"egress-agent: explain: --address: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = names_to_resolve(
        policy, workload=workload, dst=dst, dst_port=port, server_name=args.server_name
    )
    resolved, how = _explain_names(policy, names, given, resolve=not args.no_resolve)
    for i, name in enumerate(names):
        got = resolved[name]
        shown = format_addresses(got.addresses) if got.addresses else f"none ({got.error})"
        label = "names:    " if i == 0 else "          "
        print(f"{label} {name} -> {shown} {how[name]}")
    verdict = decide(
        policy,
        workload=workload,
        dst=dst,
        dst_port=port,
        server_name=args.server_name,
        resolved=resolved,
    )
    print(f"verdict:   {verdict.action.value} (rule {verdict.rule})")
    if verdict.reason:
        print(f"because:   {verdict.reason}")
    if verdict.upstream is not None:
        print(
            f"connects:  {verdict.upstream} port {port}, not {dst} (the rule has resolve: connect)"
        )
    if verdict.http is not None:
        for line in describe_http(verdict.http, dst_port=port):
            print(f"http:      {line}")
    elif verdict.by_name and verdict.action is Action.ALLOW:
        print("http:      plain HTTP: every request's Host is checked the same way (else 421)")
    return EXIT_OK


def _given_addresses(items: Sequence[str]) -> dict[str, Resolution]:
    out: dict[str, Resolution] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{item!r}: expected NAME=ADDR[,ADDR...]")
        try:
            addresses = frozenset(ipaddress.ip_address(a.strip()) for a in text.split(",") if a)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
        out[name.strip().lower().rstrip(".")] = Resolution(addresses=addresses)
    return out


def _explain_names(
    policy: Policy, names: Sequence[str], given: dict[str, Resolution], *, resolve: bool
) -> tuple[dict[str, Resolution], dict[str, str]]:
    """The addresses of the names a decision needs, and where each came from."""
    resolved: dict[str, Resolution] = {}
    how: dict[str, str] = {}
    ask = [n for n in names if n not in given]
    for name in names:
        if name in given:
            resolved[name], how[name] = given[name], "(given with --address)"
    if ask and not resolve:
        for name in ask:
            resolved[name] = Resolution(error="not resolved: --no-resolve")
            how[name] = ""
    elif ask:
        from egress_agent.proxy.resolver import Resolver

        async def lookup() -> tuple[dict[str, Resolution], list[str]]:
            resolver = Resolver(policy.dns)
            try:
                return await resolver.resolve_many(ask), resolver.nameservers()
            finally:
                await resolver.close()

        answers, servers = asyncio.run(lookup())
        note = (
            f"(resolved by this command with {', '.join(servers) or 'no nameserver'} from"
            " /etc/resolv.conf; the agent resolves with its own, and caches by TTL)"
        )
        for name in ask:
            resolved[name], how[name] = answers[name], note
    return resolved, how


def describe_http(rule: HttpRule, *, dst_port: int) -> list[str]:
    """What the proxy does to requests under an http rule, in words (file
    paths, never their content)."""
    lines = []
    if rule.client_tls is not None:
        lines.append(f"client TLS terminated with {rule.client_tls.cert} (plain HTTP also served)")
    else:
        lines.append("client must speak plain HTTP (TLS from the client is denied)")
    up = rule.upstream
    port = up.port or dst_port
    if up.tls:
        name = up.server_name or "the request's Host"
        ca = up.ca_file or "the system trust store"
        lines.append(f"upstream TLS to port {port}, verifying {name} with {ca}")
    else:
        lines.append(f"upstream plain HTTP to port {port}")
    for name, value in rule.set_headers:
        source = repr(value.value) if value.file is None else f"from {value.file}"
        lines.append(f"set header {name} {source}")
    for name in rule.remove_headers:
        lines.append(f"remove header {name}")
    auth = rule.auth
    if isinstance(auth, AzureSas):
        lines.append(f"auth: the client's SAS replaced by the one in {auth.file}")
    elif isinstance(auth, AzureSharedKey):
        lines.append(f"auth: SharedKey for account {auth.account}, key from {auth.key_file}")
    elif isinstance(auth, Bearer):
        lines.append(f"auth: Authorization: Bearer from {auth.file}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
