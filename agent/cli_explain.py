"""``egress-agent explain``: how the policy decides one flow -- its
workload, whether the kernel diverts it, the names the decision needs and
their addresses, the verdict, and what an http rule does to its requests."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import sys
from collections.abc import Sequence

from egress_agent.agent.exitcodes import EXIT_BAD_INPUT, EXIT_OK
from egress_agent.policy.decide import (
    decide,
    format_addresses,
    identify,
    names_to_resolve,
    non_tcp_drop,
    should_divert,
)
from egress_agent.policy.load import load_policy
from egress_agent.policy.model import (
    Action,
    AzureSas,
    AzureSharedKey,
    Bearer,
    HttpRule,
    Policy,
    Resolution,
)


def explain_command(args: argparse.Namespace) -> int:
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
    print(f"mode:      {mode_of(policy)}")
    if verdict.audit:
        print(f"verdict:   would be denied (audit mode): allowed (rule {verdict.rule})")
    else:
        print(f"verdict:   {verdict.action.value} (rule {verdict.rule})")
    if verdict.reason:
        print(f"because:   {verdict.reason}")
    if verdict.upstream is not None:
        print(
            f"connects:  {verdict.upstream} port {port}, not {dst} (the rule has resolve: connect)"
        )
    if verdict.source is not None:
        sources = ", ".join(str(a) for a in verdict.source.addresses)
        if verdict.via is not None:
            print(f"leaves:    from {sources} (the connection to the gateway)")
        elif verdict.source.for_version(dst.version) is None:
            print(
                f"leaves:    refused: the rule's source ({sources}) has no IPv{dst.version} address"
            )
        else:
            print(f"leaves:    from {verdict.source.for_version(dst.version)}")
    if verdict.via is not None:
        name = args.server_name or (f"[{dst}]" if dst.version == 6 else str(dst))
        print(f"through:   gateway {verdict.via}: CONNECT {name}:{port}")
    if verdict.http is not None:
        for line in describe_http(verdict.http, dst_port=port):
            print(f"http:      {line}")
    elif verdict.by_name and verdict.action is Action.ALLOW:
        print("http:      plain HTTP: every request's Host is checked the same way (else 421)")
    if verdict.action is Action.ALLOW and not verdict.audit:
        for line in describe_traffic(policy, verdict.rule):
            print(line)
    return EXIT_OK


def describe_traffic(policy: Policy, rule_name: str) -> list[str]:
    """The ``limits:`` and ``breaker:`` lines for the allowing rule."""
    rule = next((r for r in policy.egress if r.name == rule_name), None)
    lines = []
    if rule is not None and rule.limits is not None:
        lim = rule.limits
        parts = []
        if lim.connections is not None:
            parts.append(f"{lim.connections} connections open at once")
        if lim.rate is not None:
            parts.append(f"new connections {lim.rate} (burst {lim.connection_burst()})")
        if lim.requests is not None:
            parts.append(f"requests {lim.requests} (burst {lim.request_burst()})")
        lines.append(f"limits:    {', '.join(parts)}, per {lim.per.value}; over them: reset or 429")
    if rule is not None and rule.breaker is not None:
        b = rule.breaker
        lines.append(
            f"breaker:   {b.consecutive_failures} failures in a row to a destination fail its"
            f" flows fast for {b.open_for:g}s, then one probe decides"
        )
    return lines


def mode_of(policy: Policy) -> str:
    """The policy's mode in words: enforce, audit, or which denies are audited."""
    if not policy.enforce:
        return "audit (enforce: false): every deny is logged as audit-deny and allowed"
    audited = policy.audited()
    if audited:
        return "enforce, except in audit mode (allowed, logged): " + ", ".join(audited)
    return "enforce"


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
