"""``egress-agent run``: put the policy in force on this node until told to stop.

Start-up: load and validate the policy, render the ruleset (nothing touched
yet), add the proxy's addresses, start the proxy, then replace the agent's
nftables table in one transaction and read it back. Stop (SIGTERM/SIGINT):
remove the table first so nothing more is diverted, then the addresses, then
close the proxy; each step runs even if another failed.

Reload (the policy file changed -- noticed through inotify, see ``watch`` --
or SIGHUP): validate-then-swap. The new file is read, validated and rendered
completely before anything is touched; a bad file keeps the running policy and
logs every problem with file:line. A good one replaces the table in one
transaction and then swaps the proxy's policy for new connections.
Established connections are not touched: their conntrack NAT bindings survive
a table replacement, and the proxy keeps relaying them.

A crash (``kill -9``) leaves the table and addresses in place: diverted
traffic is then refused by the kernel (nothing listens), never sent direct.
The next start replaces the stale table whole. ``--on-stop keep`` (the
systemd unit's) makes a stop under ``fail: closed`` do the same, so that a
restart is a refused moment and never a direct one; the unit's
``ExecStopPost=egress-agent cleanup`` removes the state when systemd is
really stopping the service (see ``cleanup``). ``--state-file`` saves the
state in force after every commit for the boot guard (see ``saved``).

Datapath (``--datapath``): with ``bpf`` (or ``auto`` where it loads) a tc
classifier selects forwarded traffic from maps, and the table's prerouting
chain only matches its mark. Start-up first removes a previous run's filters
and pins, then loads, fills the maps and attaches, before the table goes in.
Reloads and pod changes then change map entries by diff and, only when the
locally generated traffic's selection changed, the output chain and its
sets, never the table as a whole. New interfaces are noticed through a
netlink link subscription; drift repair also re-attaches removed filters
and rewrites edited map entries. Stop removes the table, then the filters,
qdiscs and pins.

Who does what: ``desired.desired_state`` computes the state to enforce from
the file and what was observed on the node; ``reconcile.Reconciler`` is the
one path that puts it in force (start, commit, drift repair, teardown).
``agent.Agent`` observes (pods, interfaces, cgroups), reads the file and
asks for commits, under one lock. Here, :class:`Duties` starts that work on
events and :func:`run_agent` supervises start-up, the handover and the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket

from egress_agent.agent.agent import Agent, RunOptions, summary
from egress_agent.agent.discovery import uses_pods
from egress_agent.agent.handover import (
    HandoverServer,
    abandon,
    announce_accepting,
    drain,
    predecessor_running,
    take_over,
)
from egress_agent.agent.kubeapi import make_api, node_name_from_env
from egress_agent.agent.pods import Snapshot
from egress_agent.agent.reflector import PodWatcher
from egress_agent.agent.sdnotify import notify
from egress_agent.agent.status import StatusServer
from egress_agent.agent.watch import PolicyFileWatch
from egress_agent.proxy.tasks import Debouncer, TaskSet

log = logging.getLogger(__name__)

# Editors write in several steps (truncate, write, rename): a burst of events
# becomes one reload this long after its first event.
RELOAD_DEBOUNCE = 0.2
# Safety net for file systems without inotify events (e.g. some network mounts).
POLL_INTERVAL = 10.0


# How often the kernel state is compared with the desired state (drift repair).
DRIFT_INTERVAL = 2.0
# A new pod veth comes with a burst of link messages (create, rename, up).
LINK_DEBOUNCE = 0.05
RTMGRP_LINK = 1  # include/uapi/linux/rtnetlink.h


class LinkEvents:
    """A netlink socket subscribed to link changes. The agent only needs to
    know *that* something changed (it then lists links), so messages are
    read and dropped, never parsed."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._sock.recv(65536):
                pass

    def close(self) -> None:
        self._sock.close()


# How long start-up waits for the first list of pods before applying anyway
# (pod workloads then have no addresses and the agent reports not ready).
FIRST_SYNC_TIMEOUT = 30.0


def raise_fd_limit() -> int:
    """Raise the soft file descriptor limit to the hard one (each proxied
    connection holds two descriptors); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.info("file descriptors: soft limit raised from %d to %d (the hard limit)", soft, hard)
        return hard
    log.info("file descriptors: limit %d", soft)
    return soft


class Duties:
    """What the agent does besides serving, as named tasks of one set:
    reloads (SIGHUP, the file watch, a periodic check; a burst becomes one),
    pod discovery and its changes, link changes, drift repair."""

    def __init__(self, agent: Agent, options: RunOptions) -> None:
        self.agent = agent
        self.tasks = TaskSet()
        # Until start-up has applied the policy, discovery's view is adopted
        # (no task) and link changes are left to start-up.
        self.started = False
        self._first_sync = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.reload = Debouncer(RELOAD_DEBOUNCE, self._reload)
        self._links_changed = Debouncer[None](LINK_DEBOUNCE, self._links)
        self._watch = PolicyFileWatch(options.policy_path)
        self._links_events = LinkEvents()
        self._loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        self._loop.add_reader(self._watch.fileno(), self._on_watch)
        self._loop.add_reader(self._links_events.fileno(), self._on_links)
        self.tasks.spawn(self._poll(), name="policy poll")

    def _reload(self, reasons: list[str]) -> None:
        # Logged with the burst's first reason, a file change or SIGHUP
        # taking precedence over the periodic check it coincided with.
        why = ([r for r in reasons if r != "periodic check"] or reasons)[0]

        async def reload() -> None:
            await self.agent.reload(why)

        self.tasks.spawn(reload(), name=f"reload ({why})")

    def _on_watch(self) -> None:
        if self._watch.changed():
            self.reload("file changed")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self.reload("periodic check")

    def _on_links(self) -> None:
        self._links_events.drain()
        if self.started:
            self._links_changed(None)

    def _links(self, _: list[None]) -> None:
        self.tasks.spawn(self.agent.links_changed(), name="links changed")

    def _on_pods(self, pods: Snapshot) -> None:
        if not self.started:
            self.agent.adopt_pods(pods)
            self._first_sync.set()
            return
        self.tasks.spawn(self.agent.pods_changed(pods), name="pods changed")

    async def discover_pods(self, kubeconfig: str | None) -> None:
        """With pod workloads, watch the pods on this node and wait (a
        while) for the first list of them."""
        if not uses_pods(self.agent.source_policy):
            return
        # Permanent configuration errors (KubernetesConfigError) end the run.
        node_name = node_name_from_env()
        api = await make_api(kubeconfig)
        watcher = PodWatcher(api, node_name=node_name, on_change=self._on_pods)
        self.agent.watcher = watcher

        async def discover() -> None:
            try:
                await watcher.run()
            finally:
                await api.close()

        self.tasks.spawn(discover(), name="pod discovery")
        try:
            await asyncio.wait_for(self._first_sync.wait(), FIRST_SYNC_TIMEOUT)
        except TimeoutError:
            log.error(
                "pod discovery: no list of pods after %gs (%s); applying without pod"
                " addresses and reporting not ready until it arrives",
                FIRST_SYNC_TIMEOUT,
                watcher.last_error or "no answer",
            )

    def repair_drift(self) -> None:
        """From now on compare the kernel with the state in force, every
        DRIFT_INTERVAL."""

        async def watch_drift() -> None:
            while True:
                await asyncio.sleep(DRIFT_INTERVAL)
                try:
                    await self.agent.recheck_host_interfaces()
                    await self.agent.repair_drift()
                except Exception as exc:  # keep checking; say why this round failed
                    self.agent.reconciler.in_sync = False
                    log.error("drift check failed: %s", exc)

        self.tasks.spawn(watch_drift(), name="drift repair")

    def close(self) -> None:
        """Stop every duty and what starts them (SIGHUP stays handled)."""
        self.reload.cancel()
        self._links_changed.cancel()
        self._loop.remove_reader(self._watch.fileno())
        self._watch.close()
        self._loop.remove_reader(self._links_events.fileno())
        self._links_events.close()
        self.tasks.cancel()


async def run_agent(options: RunOptions) -> int:
    if os.geteuid() != 0:
        log.error("run needs root (CAP_NET_ADMIN for nftables and addresses): try sudo")
        return 1
    raise_fd_limit()
    agent = Agent(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    duties = Duties(agent, options)
    status = StatusServer(
        snapshot=agent.snapshot,
        address=options.status_address,
        metrics=agent.metrics,
        flows=agent.flows,
    )
    handover: HandoverServer | None = None
    abandoned = False
    try:
        # With a predecessor, its status server holds the address until the
        # handover: ours starts right after it (below).
        predecessor = options.handover and await asyncio.to_thread(predecessor_running)
        if not predecessor:
            await status.start()
        await duties.discover_pods(options.kubeconfig)
        # From here on, discovery changes queue behind start-up on the reload lock.
        duties.started = True
        try:
            await agent.prepare()
        except BaseException:
            if predecessor:
                # Nothing was taken over: the predecessor serves on with the
                # kernel state it owns (no teardown below).
                abandoned = True
            raise
        inherited = await take_over() if predecessor else None
        try:
            await agent.start(inherited)
        except BaseException:
            if inherited is not None:
                # The predecessor never stopped accepting: it carries on, and
                # the kernel state stays its own (no teardown below).
                abandon(inherited)
                abandoned = True
            raise
        if inherited is not None:
            # Only now does the predecessor stop accepting (agent.handover):
            # it served every connection while we started.
            await asyncio.to_thread(announce_accepting, inherited)
        if predecessor:
            # Its status server holds the address until it drains.
            await status.start(retry_for=5.0)
        duties.repair_drift()
        if options.handover:
            handover = HandoverServer(give=agent.give_listeners, settle=agent.settle_handover)
            await handover.start()
        log.info("ready: policy %s (%s)", options.policy_path, summary(agent.reconciler.policy))
        notify(f"READY=1\nSTATUS=enforcing policy generation {agent.reconciler.generation}")
        await _first_set(agent.handed_over, stop)
        if agent.handed_over.is_set():
            # The successor enforces the policy now: no more duties, no
            # status; the connections we relay end, the kernel state stays.
            duties.tasks.cancel()
            await status.close()
            assert agent.reconciler.proxy is not None
            await drain(
                agent.reconciler.proxy,
                stop=stop,
                successor=agent.successor,
                wait_for_stop=options.after_handover == "wait",
            )
            return 0
        notify("STOPPING=1")
        if keeps_state(options, agent):
            log.info(
                "stopping: leaving table inet egress_agent, the proxy addresses and the"
                " datapath in place (fail: closed, --on-stop keep): diverted connections are"
                " refused until the next start replaces them or `egress-agent cleanup`"
                " removes them"
            )
        else:
            log.info("stopping: removing table inet egress_agent and the proxy addresses")
        return 0
    finally:
        duties.close()
        await status.close()
        if handover is not None:
            await handover.close()
        await agent.stop(
            teardown=not agent.handed_over.is_set()
            and not abandoned
            and not keeps_state(options, agent)
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def keeps_state(options: RunOptions, agent: Agent) -> bool:
    """Whether stopping leaves the kernel state in place: asked for, and the
    policy fails closed (a fail: open table goes with the process anyway,
    and fail open means direct while no agent runs)."""
    return options.on_stop == "keep" and not agent.reconciler.policy.fail_open


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.get_running_loop().create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
