"""The ``egress-agent`` command line.

Exit codes: 0 success, 1 a runtime failure (permissions, kernel refused),
2 bad input (policy file or arguments) -- with every problem printed as
``file:line:col: field: what was expected``.

This module holds the arguments and ``run``; the other commands live beside
it: ``check`` and ``bpf dump`` in ``cli_check``, ``status`` in ``cli_status``,
``flows`` in ``cli_flows``, ``explain`` in ``cli_explain``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from egress_agent.agent import bootguard, cleanup, cli_flows
from egress_agent.agent.cli_check import bpf_dump_command, check_command
from egress_agent.agent.cli_explain import explain_command
from egress_agent.agent.cli_status import status_command
from egress_agent.agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE
from egress_agent.agent.logformat import LOG_FORMATS, configure_logging
from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS
from egress_agent.bpf.cache import CACHE_ENV, DEFAULT_CACHE_DIR
from egress_agent.bpf.classifier import DEFAULT_PIN_DIR
from egress_agent.policy.load import PolicyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egress-agent",
        description="Divert chosen workloads' outbound TCP into a local policy proxy.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="the agent's own log lines: text, or json (one object per line)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="apply the policy on this node and run the proxy until stopped"
    )
    run.add_argument("--policy", required=True, help="policy file (YAML)")
    # Also after "run", where service definitions put the run's options.
    run.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS)
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
        "--bpf-cache-dir",
        default=None,
        metavar="DIR",
        help=f"folder for compiled BPF programs, so that the next start skips the compiler"
        f" (default ${CACHE_ENV} or {DEFAULT_CACHE_DIR}; 'none' to compile every time);"
        " owned by the agent's user and writable by no one else, or it is not used",
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

    run.add_argument(
        "--on-stop",
        choices=["remove", "keep"],
        default="remove",
        help="on SIGTERM/SIGINT under fail: closed: remove the table, addresses and datapath"
        " (default), or keep them so that diverted traffic is refused until the next start"
        " (the systemd unit's choice; `egress-agent cleanup` removes them)",
    )
    run.add_argument(
        "--state-file",
        metavar="FILE",
        help="save the state in force here after every change, for boot-guard and cleanup"
        " (the systemd unit's: /var/lib/egress-agent/state.json)",
    )
    bootguard.add_parser(sub)
    cleanup.add_parser(sub)

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

    cli_flows.add_parser(sub)

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

    suggest = sub.add_parser(
        "suggest", help="print a policy that allows what the audit log saw and nothing else"
    )
    suggest.add_argument(
        "--audit-log", required=True, help="the agent's audit log (rotated files beside it too)"
    )
    suggest.add_argument("--policy", help="the current policy: keep its workloads and settings")
    suggest.add_argument(
        "--wildcards", action="store_true", help="one *.parent entry for sibling names"
    )

    demo = sub.add_parser("demo", help="run the demo on network namespaces on this machine")
    demo.add_argument("--keep-going", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(level=args.log_level, log_format=args.log_format)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return check_command(args)
        if args.command == "explain":
            return explain_command(args)
        if args.command == "status":
            return status_command(args)
        if args.command == "flows":
            return cli_flows.flows_command(args)
        if args.command == "bpf":
            return bpf_dump_command(args)
        if args.command == "boot-guard":
            return bootguard.run_boot_guard(args)
        if args.command == "cleanup":
            return cleanup.run_cleanup(args)
        if args.command == "suggest":
            from egress_agent.agent.suggest import run_suggest

            return run_suggest(args.audit_log, policy=args.policy, wildcards=args.wildcards)
        if args.command == "demo":
            from egress_agent.agent.demo import run_demo

            return run_demo()
    except PolicyError as exc:
        if args.log_format == "json":
            logging.getLogger("egress_agent").error(
                "the policy is not valid (%d problems): %s",
                len(exc.problems),
                "; ".join(map(str, exc.problems)),
                extra={"problems": [str(p) for p in exc.problems]},
            )
            return EXIT_BAD_INPUT
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
    from egress_agent.agent.kubeapi import KubernetesConfigError
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
        bpf_cache_dir=args.bpf_cache_dir,
        bpf_exclude_interfaces=tuple(args.bpf_exclude_interface),
        cgroup_root=args.cgroup_root,
        on_stop=args.on_stop,
        state_file=args.state_file,
    )
    try:
        return uvloop.run(run_agent(options))
    except KubernetesConfigError as exc:
        logging.getLogger("egress_agent").error("pod discovery cannot start: %s", exc)
        return EXIT_BAD_INPUT
    except (DatapathError, NftablesError, OSError) as exc:
        logging.getLogger("egress_agent").error("%s", exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
