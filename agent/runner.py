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
The next start replaces the stale table whole.

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
Here, :class:`Agent` observes (pods, interfaces, cgroups), reads the file
and asks for commits, under one lock; :class:`Duties` starts that work on
events; :func:`run_agent` supervises start-up, the handover and the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from egress_agent.agent.addresses import host_interfaces
from egress_agent.agent.desired import Desired, Observed, content_hash, desired_state
from egress_agent.agent.discovery import pod_addresses, uses_pods
from egress_agent.agent.handover import (
    HandoverServer,
    Inherited,
    abandon,
    announce_accepting,
    drain,
    predecessor_running,
    take_over,
)
from egress_agent.agent.kubernetes import (
    PodWatcher,
    Snapshot,
    make_api,
    node_name_from_env,
)
from egress_agent.agent.reconcile import CommitRefused, Reconciler
from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS, ReloadResult, StatusServer
from egress_agent.agent.status import metrics as status_metrics
from egress_agent.agent.status import snapshot as status_snapshot
from egress_agent.agent.watch import PolicyFileWatch
from egress_agent.bpf.loader import DEFAULT_PIN_DIR
from egress_agent.policy.load import PolicyError, parse_policy, read_policy_text
from egress_agent.policy.model import IPAddress, Policy
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.connect import ConnectListener
from egress_agent.proxy.server import ProxyServer
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


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    policy_path: str
    audit_path: str | None
    status_address: str = DEFAULT_STATUS_ADDRESS
    kubeconfig: str | None = None  # None: in-cluster service account
    # Take over from an agent already running in this network namespace
    # (agent.handover), and hand over to a successor.
    handover: bool = True
    # After handing over and draining: "exit", or "wait" for SIGTERM (in a
    # DaemonSet, so that the kubelet does not restart the old container).
    after_handover: str = "exit"
    datapath: str = "auto"  # nft | bpf | auto
    bpf_pin_dir: str = DEFAULT_PIN_DIR
    bpf_exclude_interfaces: tuple[str, ...] = ()
    # cgroup2 mount for cgroup workloads; None: found in /proc/self/mountinfo.
    cgroup_root: str | None = None


# How long start-up waits for the first list of pods before applying anyway
# (pod workloads then have no addresses and the agent reports not ready).
FIRST_SYNC_TIMEOUT = 30.0


def summary(policy: Policy) -> str:
    return (
        f"{len(policy.workloads)} workloads, {len(policy.intercept)} intercept rules, "
        f"{len(policy.egress)} egress rules, default {policy.default.value}"
    )


class Agent:
    """The running agent: what it observed, the state in force (its
    ``reconciler``), the proxy, the reload and handover bookkeeping."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.path = options.policy_path
        text = read_policy_text(self.path)  # PolicyError reaches the CLI: exit 2
        # The pods, interfaces and cgroups last found; the state in force is
        # computed from them and the file by desired_state().
        self.observed = Observed()
        self.watcher: PodWatcher | None = None
        self.reconciler = Reconciler(
            desired_state(
                parse_policy(text, source_name=self.path),
                policy_hash=content_hash(text),
                observed=self.observed,
                selection="nft",
            ),
            datapath=options.datapath,
            bpf_pin_dir=options.bpf_pin_dir,
            bpf_exclude_interfaces=options.bpf_exclude_interfaces,
            cgroup_root=options.cgroup_root,
        )
        self.audit = AuditLog(options.audit_path)
        self.connect: ConnectListener | None = None
        self.last_reload: ReloadResult | None = None
        self.reloads = {"applied": 0, "failed": 0}
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        self.handed_over = asyncio.Event()
        # Set while a successor takes over (and for good once it has): the
        # kernel state is the successor's to change, not ours to repair.
        self.handing_over = False
        self.successor: int | None = None

    @property
    def source_policy(self) -> Policy:
        """The policy file's, as last applied."""
        return self.reconciler.desired.source

    def _desired(self, source: Policy | None = None, policy_hash: str | None = None) -> Desired:
        """The desired state for ``source`` (default: the file's policy in
        force) and what was last observed."""
        current = self.reconciler.desired
        return desired_state(
            current.source if source is None else source,
            policy_hash=current.policy_hash if policy_hash is None else policy_hash,
            observed=self.observed,
            selection=self.reconciler.selection,
        )

    async def prepare(self) -> None:
        """Load the BPF classifier (compiling takes seconds) before anything
        else: before a predecessor's listening sockets are taken over, which
        stops it accepting, so that no connection waits for the compiler.
        Loading changes nothing the predecessor serves with: the new
        classifier replaces its filters with the same decisions, and its
        table stays until ours replaces it. (The nftables datapath's removal
        of BPF filters waits for ``start``: a BPF-mode predecessor's table
        still needs its marks.)"""
        if self.options.datapath == "nft":
            return
        async with self._reload_lock:
            await self.reconciler.load_datapath()

    async def start(self, inherited: Inherited | None = None) -> None:
        async with self._reload_lock:
            if self.observed.pods is not None:
                self.observed = await self._observe(self.observed.pods)
            spare = list(inherited.sockets) if inherited else []

            async def start_proxy(desired: Desired, generation: int) -> ProxyServer:
                proxy = ProxyServer(
                    policy=desired.policy,
                    audit=self.audit,
                    generation=generation,
                    policy_hash=desired.policy_hash,
                )
                self.reconciler.proxy = proxy
                if desired.policy.connect is not None:
                    # First: it takes its own inherited sockets out of `spare`,
                    # and the proxy closes whatever is left there.
                    self.connect = ConnectListener(proxy, desired.policy.connect.port)
                    await self.connect.start(spare)
                await proxy.start(spare)
                return proxy

            await self.reconciler.start(self._desired(), start_proxy)

    async def links_changed(self) -> None:
        """An interface appeared, went or changed: attach where it belongs."""
        if self.reconciler.bpf is None or self.handing_over:
            return  # after a handover the successor's program is the one to attach
        async with self._reload_lock:
            await self.reconciler.sync_links()

    async def repair_drift(self) -> bool:
        """Compare the kernel with the desired state; restore what someone
        removed or changed. Returns whether anything had drifted."""
        async with self._reload_lock:
            if self.handing_over:
                return False
            return await self.reconciler.repair()

    def snapshot(self) -> dict[str, Any]:
        """What ``egress-agent status`` shows."""
        return status_snapshot(self)

    def metrics(self) -> str:
        """The agent's counters and gauges in the Prometheus text format."""
        return status_metrics(self)

    async def reload(self, reason: str) -> ReloadResult:
        """Validate the file, then apply it as one change; keep the old on any error."""
        async with self._reload_lock:
            if self.handing_over:  # the successor applies the file now
                return self._failed("handed over to a successor")
            result = await self._reload(reason)
            self.last_reload = result
            return result

    async def _reload(self, reason: str) -> ReloadResult:
        generation = self.reconciler.generation
        try:
            text = read_policy_text(self.path)
            digest = content_hash(text)
            if digest == self.reconciler.desired.policy_hash:
                return ReloadResult(applied=False, generation=generation, policy_hash=digest)
            source = parse_policy(text, source_name=self.path)
            _check_restart_only_settings(self.reconciler.policy, source)
            desired = self._desired(source, digest)
        except PolicyError as exc:
            log.error(
                "reload (%s): keeping policy generation %d; the new file is not valid:\n  %s",
                reason,
                generation,
                "\n  ".join(str(p) for p in exc.problems),
            )
            return self._failed(str(exc))
        except ValueError as exc:
            log.error("reload (%s): keeping generation %d: %s", reason, generation, exc)
            return self._failed(str(exc))
        try:
            closed = await self.reconciler.commit(desired)
        except CommitRefused as exc:
            if exc.step == "bpf":
                log.error(
                    "reload (%s): BPF maps refused the policy, old one stays: %s", reason, exc
                )
            else:
                log.error("reload (%s): kernel refused the ruleset, old one stays: %s", reason, exc)
            return self._failed(str(exc))
        log.info(
            "reloaded (%s): generation %d, sha256 %s (%s)%s",
            reason,
            self.reconciler.generation,
            digest,
            summary(desired.policy),
            f"; closed {closed} open connections it denies" if closed else "",
        )
        self.reloads["applied"] += 1
        return ReloadResult(applied=True, generation=self.reconciler.generation, policy_hash=digest)

    def adopt_pods(self, pods: Snapshot) -> None:
        """Before start: take discovery's first view into the policy to apply."""
        self.observed = self.observed.with_(pods=pods)
        self.reconciler.desired = self._desired()

    async def _observe(self, pods: Snapshot) -> Observed:
        """What was observed, with ``pods`` and the node's interfaces and
        cgroups looked up again for them (a failed look-up keeps what was known)."""
        return self.observed.with_(
            pods=pods,
            host_interfaces=await self._look_up_host_interfaces(pods),
            pod_cgroups=await self._scan_pod_cgroups(),
        )

    async def _look_up_host_interfaces(self, pods: Snapshot) -> dict[IPAddress, str] | None:
        """The node's interface towards each pod address; None when the
        look-up failed."""
        try:
            return await asyncio.to_thread(host_interfaces, pod_addresses(pods))
        except OSError as exc:
            log.warning("cannot look up the pods' host-side interfaces: %s", exc)
            return None

    async def _scan_pod_cgroups(self) -> dict[str, str] | None:
        """The cgroups of hostNetwork pods (a pod's cgroup appears after the
        API server lists it); None when the scan failed."""
        try:
            return await asyncio.to_thread(self.reconciler.cgroups.scan_pods, self.source_policy)
        except OSError as exc:
            log.warning("cannot scan the kubelet's pod cgroups: %s", exc)
            return None

    async def recheck_host_interfaces(self) -> None:
        """A pod's route can appear after its address was published, a
        hostNetwork pod's cgroup after the pod: bind them once they do
        (called from the drift loop)."""
        pods = self.observed.pods
        if pods is None or self.handing_over or not uses_pods(self.source_policy):
            return
        found = await self._look_up_host_interfaces(pods)
        if found is not None and found != self.observed.host_interfaces:
            await self.pods_changed(pods)  # looks again and applies
            return
        cgroups = await self._scan_pod_cgroups()
        if cgroups is not None and cgroups != self.observed.pod_cgroups:
            await self.pods_changed(pods)

    async def pods_changed(self, pods: Snapshot) -> None:
        """Discovery saw pods come, go or change labels: apply the new addresses
        as one change (nothing happens when the ruleset would be the same)."""
        async with self._reload_lock:
            if self.handing_over:
                return
            self.observed = await self._observe(pods)
            desired = self._desired()
            if desired.same_effect(self.reconciler.desired):
                return
            try:
                closed = await self.reconciler.commit(desired)
            except CommitRefused as exc:
                log.error("pods changed but the kernel refused the change: %s", exc)
                return
            counts = ", ".join(
                f"{w.name} {len(w.cidrs)}" for w in desired.policy.workloads if w.pods is not None
            )
            log.info(
                "pods changed: generation %d (addresses per pod workload: %s)%s",
                self.reconciler.generation,
                counts,
                f"; closed {closed} open connections it denies" if closed else "",
            )

    def _failed(self, error: str) -> ReloadResult:
        self.reloads["failed"] += 1
        return ReloadResult(
            applied=False,
            generation=self.reconciler.generation,
            policy_hash=self.reconciler.desired.policy_hash,
            error=error,
        )

    async def give_listeners(self) -> tuple[list[socket.socket], dict[str, Any]]:
        """A successor asks for the listening sockets (agent.handover)."""
        async with self._reload_lock:
            proxy = self.reconciler.proxy
            assert proxy is not None
            self.handing_over = True
            await self.reconciler.release_table()
            sockets = proxy.listening_sockets()
            if self.connect is not None:
                sockets += self.connect.listening_sockets()
            return sockets, {"generation": self.reconciler.generation}

    async def settle_handover(self, confirmed: bool, pid: int) -> None:
        proxy = self.reconciler.proxy
        assert proxy is not None
        if not confirmed:
            # We never stopped accepting. The successor may have changed the
            # kernel state before it failed: ours again, repaired at once.
            async with self._reload_lock:
                self.reconciler.reinstall_table()
                self.handing_over = False
            try:
                await self.repair_drift()
            except Exception as exc:  # the drift loop tries again
                log.error("after the failed handover: drift check failed: %s", exc)
            return
        proxy.stop_accepting()
        if self.connect is not None:
            self.connect.stop_accepting()
        self.successor = pid
        self.handed_over.set()

    async def stop(self, *, teardown: bool = True) -> None:
        """Close the proxy and the audit log; with ``teardown`` (not after a
        handover, when the successor owns them) remove the table and addresses."""
        # First the listeners and their connections, while the proxy's
        # addresses still exist: the resets that tell the clients their
        # connections ended are sent from those addresses. Then the table and
        # the addresses; new connections arriving meanwhile are refused.
        if self.connect is not None:
            try:
                await self.connect.close()
            except Exception as exc:
                log.error("teardown: could not close the CONNECT listener: %s", exc)
        if self.reconciler.proxy is not None:
            try:
                await self.reconciler.proxy.close()
            except Exception as exc:
                log.error("teardown: could not close the proxy: %s", exc)
        if teardown:
            await self.reconciler.teardown()
        self.audit.close()


def _check_restart_only_settings(old: Policy, new: Policy) -> None:
    if old.fail_open != new.fail_open:
        raise ValueError(
            f"fail changed to {'open' if new.fail_open else 'closed'}: the failure mode "
            "applies at start only; restart the agent to change it"
        )
    keys = ("port", "address_v4", "address_v6", "cgroup_mark_mask")
    changed = [k for k in keys if getattr(old.proxy, k) != getattr(new.proxy, k)]
    old_port = old.connect.port if old.connect else None
    new_port = new.connect.port if new.connect else None
    if old_port != new_port:
        raise ValueError(
            f"connect.port changed ({old_port or 'none'} -> {new_port or 'none'}): the CONNECT"
            " listener starts and stops with the agent; restart the agent to change it"
        )
    if changed:
        raise ValueError(
            f"proxy.{', proxy.'.join(changed)} changed: the proxy's listening address "
            "and port apply at start only; restart the agent to change them"
        )


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
        api = make_api(kubeconfig)
        watcher = PodWatcher(api, node_name=node_name_from_env(), on_change=self._on_pods)
        self.agent.watcher = watcher
        self.tasks.spawn(watcher.run(), name="pod discovery")
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
        snapshot=agent.snapshot, address=options.status_address, metrics=agent.metrics
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
        await agent.prepare()
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
        log.info("stopping: removing table inet egress_agent and the proxy addresses")
        return 0
    finally:
        duties.close()
        await status.close()
        if handover is not None:
            await handover.close()
        await agent.stop(teardown=not agent.handed_over.is_set() and not abandoned)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.get_running_loop().create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
