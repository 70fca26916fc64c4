"""``egress-agent boot-guard``: at boot, before the network is up and before
any workload runs, install the table the agent last put in force, so that
diverted traffic is refused until the agent has started and replaced it.

A reboot clears the kernel state a ``fail: closed`` agent leaves behind;
the agent itself starts late (after the network, it compiles its BPF
classifier, it may wait for the API server). The systemd unit
``egress-agent-guard.service`` runs this command before
``network-pre.target``: it adds the proxy's addresses and installs the saved
ruleset (``saved``: the nftables selection, which needs no BPF) in one
transaction, and exits. Nothing listens on the proxy's port until the agent
starts, so every connection the policy diverts is refused; the rest of the
traffic is untouched. The agent's start replaces the table in one
transaction, as after a crash. If the agent cannot start (an unreadable
policy, say), the table stays: refused, not direct.

Where no state was saved yet (the agent never ran on this machine), the
ruleset is rendered from the policy file instead. Under ``fail: open``
nothing is installed: that mode sends diverted traffic direct while no agent
runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from egress_agent.agent.addresses import ensure_proxy_addresses
from egress_agent.agent.desired import Observed, content_hash, desired_state
from egress_agent.agent.saved import DEFAULT_STATE_FILE, SavedStateError, read_saved
from egress_agent.policy.load import PolicyError, parse_policy, read_policy_text
from egress_agent.policy.model import ProxySettings
from egress_agent.rules.apply import NftablesError, Table, read_table, verify_applied
from egress_agent.rules.nft import Json

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "boot-guard",
        help="at boot: install the last ruleset in force so that diverted traffic is refused"
        " until the agent starts",
    )
    p.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        help=f"the state the agent saved (--state-file of run; default {DEFAULT_STATE_FILE})",
    )
    p.add_argument(
        "--policy",
        help="the policy file to render from when no state was saved yet",
    )


def _from_policy(path: str) -> tuple[Json, ProxySettings, bool, str]:
    text = read_policy_text(path)
    policy = parse_policy(text, source_name=path)
    desired = desired_state(
        policy, policy_hash=content_hash(text), observed=Observed(), selection="nft"
    )
    return desired.doc, policy.proxy, policy.fail_open, f"the policy {path}"


def run_boot_guard(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        log.error("boot-guard needs root (CAP_NET_ADMIN for nftables and addresses): try sudo")
        return 1
    try:
        if read_table() is not None:
            log.info("boot guard: table inet egress_agent is already in place; nothing to do")
            return 0
    except NftablesError as exc:
        log.error("boot guard: %s", exc)
        return 1
    try:
        saved = read_saved(args.state_file)
        doc, proxy, fail_open = saved.ruleset, saved.proxy_settings(), saved.fail_open
        age = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(saved.saved_at))
        source = (
            f"{args.state_file} (generation {saved.generation} of {saved.policy_path}, saved {age})"
        )
    except SavedStateError as saved_error:
        if not args.policy:
            log.error(
                "boot guard: %s, and no --policy to render from: nothing is installed, diverted"
                " traffic goes direct until the agent starts",
                saved_error,
            )
            return 1
        try:
            doc, proxy, fail_open, source = _from_policy(args.policy)
        except PolicyError as exc:
            log.error(
                "boot guard: %s, and the policy cannot be used either:\n  %s\nnothing is"
                " installed: diverted traffic goes direct until the agent starts",
                saved_error,
                "\n  ".join(str(p) for p in exc.problems),
            )
            return 1
        log.info("boot guard: %s; rendering from %s instead", saved_error, args.policy)
    if fail_open:
        log.info(
            "boot guard: the policy fails open: nothing installed, diverted traffic goes direct"
            " until the agent starts"
        )
        return 0
    try:
        ensure_proxy_addresses(proxy)
        Table(owned=False).apply(doc)
        problems = verify_applied(doc)
        if problems:
            raise NftablesError("the kernel does not hold the ruleset: " + "; ".join(problems))
    except (OSError, NftablesError) as exc:
        log.error("boot guard: cannot install the saved ruleset from %s: %s", source, exc)
        return 1
    log.info(
        "boot guard: installed table inet egress_agent from %s: diverted connections are"
        " refused until the agent starts",
        source,
    )
    return 0
