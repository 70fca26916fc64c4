"""``egress-agent cleanup``: remove everything the agent installs, after it
has stopped -- or, as the systemd unit's ``ExecStopPost=``, only when the
service is really being stopped.

Under ``fail: closed`` the unit runs the agent with ``--on-stop keep``: its
SIGTERM leaves the table, the proxy addresses, the BPF filters and pins and
the cgroup socket marker in place, so that diverted traffic is refused (no
proxy listens) until the next start replaces them in one transaction. systemd
runs ``ExecStopPost=`` after every end of the process, though: a ``stop``, a
``restart``, a crash before an automatic restart. Which one it is shows in
the unit's job (``systemctl list-jobs``): ``stop`` for ``systemctl stop`` and
``disable --now``, ``restart`` for a restart (also ``try-restart``, as a
package upgrade's provisioning runs), none after a crash (the automatic
restart comes later, from the unit's own state). With ``--systemd-unit``
this command removes the state only for a ``stop`` job, and keeps it while
the system shuts down (a reboot clears the kernel anyway, and workloads not
ordered after the agent may still be sending). When it cannot tell, it
keeps the state: refused, never direct.

What to remove comes from the state the agent saved (``--state-file``, see
``saved``): the proxy addresses, the BPF pin folder, the cgroups carrying
the marker; without it, the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egress_agent.agent.addresses import remove_proxy_addresses
from egress_agent.agent.saved import DEFAULT_STATE_FILE, SavedStateError, read_saved
from egress_agent.bpf import attach as bpf_attach
from egress_agent.bpf.cgroup import default_root, detach_stale
from egress_agent.bpf.classifier import DEFAULT_PIN_DIR
from egress_agent.bpf.pins import remove_pins
from egress_agent.policy.model import ProxySettings
from egress_agent.rules.apply import remove_table

log = logging.getLogger(__name__)

# Targets whose start job means the machine is going down.
SHUTDOWN_TARGETS = frozenset(
    {"shutdown.target", "reboot.target", "poweroff.target", "halt.target", "kexec.target"}
)


@dataclass(frozen=True, kw_only=True)
class Job:
    unit: str
    type: str


def parse_jobs(text: str) -> list[Job]:
    """``systemctl list-jobs --no-legend`` rows: JOB UNIT TYPE STATE."""
    jobs = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].isdigit():
            jobs.append(Job(unit=fields[1], type=fields[2]))
    return jobs


def stop_reason(unit: str, jobs: list[Job]) -> str | None:
    """Why ``unit``'s state should go (a stop job), or None to keep it,
    given the jobs systemd has queued."""
    if any(j.unit in SHUTDOWN_TARGETS and j.type == "start" for j in jobs):
        return None
    if any(j.unit == unit and j.type == "stop" for j in jobs):
        return f"systemd is stopping {unit}"
    return None


def _jobs() -> list[Job]:
    result = subprocess.run(
        ["systemctl", "list-jobs", "--no-legend", "--no-pager", "--full"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise OSError(f"systemctl list-jobs failed ({result.returncode}): {result.stderr.strip()}")
    return parse_jobs(result.stdout)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove the table, proxy addresses and BPF state a stopped agent left in place",
    )
    p.add_argument(
        "--state-file",
        default=DEFAULT_STATE_FILE,
        help=f"the state the agent saved (--state-file of run; default {DEFAULT_STATE_FILE})",
    )
    p.add_argument(
        "--systemd-unit",
        metavar="UNIT",
        help="as ExecStopPost= of UNIT: remove only when systemd is stopping UNIT (not a"
        " restart, not an automatic restart after a failure, not a shutdown)",
    )


def run_cleanup(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        log.error("cleanup needs root (CAP_NET_ADMIN for nftables and addresses): try sudo")
        return 1
    if args.systemd_unit:
        result = os.environ.get("SERVICE_RESULT", "?")
        status = os.environ.get("EXIT_STATUS", "?")
        try:
            reason = stop_reason(args.systemd_unit, _jobs())
        except (OSError, subprocess.SubprocessError) as exc:
            log.error(
                "cannot tell whether %s is being stopped (%s): leaving table inet egress_agent"
                " in place, diverted connections are refused; run `egress-agent cleanup` to"
                " remove it",
                args.systemd_unit,
                exc,
            )
            return 0
        if reason is None:
            log.info(
                "%s ended (result %s, exit status %s) and is not being stopped (a restart,"
                " a crash before an automatic restart, or a shutdown): leaving table inet"
                " egress_agent, the proxy addresses and the datapath in place; diverted"
                " connections are refused until the agent starts again",
                args.systemd_unit,
                result,
                status,
            )
            return 0
        log.info("%s: removing everything the agent installed", reason)
    return 0 if remove_everything(args.state_file) else 1


def remove_everything(state_file: str) -> bool:
    """Remove the table, the BPF datapath, the cgroup marker and the proxy
    addresses, each step even if another failed; says what was done."""
    proxy = ProxySettings()
    pin_dir = DEFAULT_PIN_DIR
    cgroups: tuple[str, ...] = ()
    cgroup_root: str | None = None
    try:
        saved = read_saved(state_file)
        proxy = saved.proxy_settings()
        pin_dir, cgroups, cgroup_root = saved.bpf_pin_dir, saved.cgroups, saved.cgroup_root
    except SavedStateError as exc:
        log.warning("%s; removing what the defaults name", exc)
    ok = True
    done: list[str] = []

    def step(what: str, action: Callable[[], str]) -> None:
        nonlocal ok
        try:
            said = action()
            if said:
                done.append(str(said))
        except Exception as exc:
            ok = False
            log.error("cleanup: could not remove %s: %s", what, exc)

    def table() -> str:
        remove_table()
        return "table inet egress_agent"

    def filters() -> str:
        links = bpf_attach.detach_everywhere()
        pins = remove_pins(Path(pin_dir))
        parts = []
        if links:
            parts.append("BPF filters on " + ", ".join(links))
        if pins:
            parts.append(f"BPF pins in {pin_dir}")
        return "; ".join(parts)

    def marker() -> str:
        root = cgroup_root or default_root()
        if not cgroups or root is None:
            return ""
        detached = detach_stale(root, list(cgroups))
        return ("the socket marker on " + ", ".join(detached)) if detached else ""

    def addresses() -> str:
        remove_proxy_addresses(proxy)
        return f"the proxy addresses {proxy.address_v4} and {proxy.address_v6} on lo"

    step("table inet egress_agent", table)
    step("the BPF datapath", filters)
    step("the cgroup socket marker", marker)
    step("the proxy addresses", addresses)
    if ok:
        log.info("cleanup: removed %s; nothing is diverted any more", "; ".join(done))
    return ok
