"""``egress-agent run``: put the policy in force on this node until told to stop.

Start-up: load and validate the policy, render the ruleset (nothing touched
yet), add the proxy's addresses, start the proxy, then replace the agent's
nftables table in one transaction and read it back. Stop (SIGTERM/SIGINT):
remove the table first so nothing more is diverted, then the addresses, then
close the proxy; each step runs even if another failed.

A crash (``kill -9``) leaves the table and addresses in place: diverted
traffic is then refused by the kernel (nothing listens), never sent direct.
The next start replaces the stale table whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

from egress_agent.agent.addresses import ensure_proxy_addresses, remove_proxy_addresses
from egress_agent.policy.load import load_policy
from egress_agent.policy.model import Policy
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.server import ProxyServer
from egress_agent.rules.apply import apply_ruleset, remove_table, verify_applied
from egress_agent.rules.render import render_ruleset

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    policy_path: str
    audit_path: str | None


def summary(policy: Policy) -> str:
    return (
        f"{len(policy.workloads)} workloads, {len(policy.intercept)} intercept rules, "
        f"{len(policy.egress)} egress rules, default {policy.default.value}"
    )


async def run_agent(options: RunOptions) -> int:
    if os.geteuid() != 0:
        log.error("run needs root (CAP_NET_ADMIN for nftables and addresses): try sudo")
        return 1
    policy = load_policy(options.policy_path)  # PolicyError reaches the CLI: exit 2
    doc = render_ruleset(policy)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    audit = AuditLog(options.audit_path)
    proxy: ProxyServer | None = None
    try:
        # pyroute2 drives its own asyncio loop internally: keep it off ours.
        await asyncio.to_thread(ensure_proxy_addresses, policy.proxy)
        proxy = ProxyServer(policy=policy, audit=audit)
        await proxy.start()
        apply_ruleset(doc)
        problems = verify_applied(doc)
        if problems:
            log.error(
                "the kernel does not hold the ruleset that was applied: %s", "; ".join(problems)
            )
            return 1
        log.info("ready: policy %s (%s)", options.policy_path, summary(policy))
        await stop.wait()
        log.info("stopping: removing table inet egress_agent and the proxy addresses")
        return 0
    finally:
        for step, action in (
            ("remove nftables table", remove_table),
            ("remove proxy addresses", lambda: remove_proxy_addresses(policy.proxy)),
        ):
            try:
                await asyncio.to_thread(action)
            except Exception as exc:
                log.error("teardown: could not %s: %s", step, exc)
        if proxy is not None:
            try:
                await proxy.close()
            except Exception as exc:
                log.error("teardown: could not close the proxy: %s", exc)
        audit.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
