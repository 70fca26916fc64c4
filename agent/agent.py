"""The agent: what it observed on the node, the state in force (its
:class:`~egress_agent.agent.reconcile.Reconciler`), and the work that
changes it -- start-up, reload, pod and link changes, drift repair, the
handover -- serialised by one lock. ``runner`` starts that work on events.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from egress_agent.agent.addresses import host_interfaces
from egress_agent.agent.cgroups import marks_by_path
from egress_agent.agent.desired import Desired, Observed, content_hash, desired_state
from egress_agent.agent.discovery import pod_addresses, uses_pods
from egress_agent.agent.handover import Inherited
from egress_agent.agent.metrics import Metrics
from egress_agent.agent.pods import Snapshot
from egress_agent.agent.reconcile import CommitRefused, Reconciler
from egress_agent.agent.reflector import PodWatcher
from egress_agent.agent.saved import SavedState, write_saved
from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS, ReloadResult
from egress_agent.agent.status import flows as status_flows
from egress_agent.agent.status import snapshot as status_snapshot
from egress_agent.bpf.classifier import DEFAULT_PIN_DIR
from egress_agent.policy.load import PolicyError, parse_policy, read_policy_text
from egress_agent.policy.model import IPAddress, Policy
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.connect import ConnectListener
from egress_agent.proxy.server import ProxyServer

log = logging.getLogger(__name__)


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
    # Compiled BPF programs are kept here for the next start (bpf.cache);
    # None: $EGRESS_AGENT_BPF_CACHE_DIR or the default; "none": no cache.
    bpf_cache_dir: str | None = None
    bpf_exclude_interfaces: tuple[str, ...] = ()
    # cgroup2 mount for cgroup workloads; None: found in /proc/self/mountinfo.
    cgroup_root: str | None = None
    # On SIGTERM/SIGINT under fail: closed: "remove" the kernel state, or
    # "keep" it (diverted traffic refused until the next start replaces it,
    # or ``egress-agent cleanup`` removes it; see ``runner``).
    on_stop: str = "remove"
    # Where the state in force is saved after each commit, for the boot
    # guard and cleanup (``saved``); None: not saved.
    state_file: str | None = None


def summary(policy: Policy) -> str:
    return (
        f"{len(policy.workloads)} workloads, {len(policy.intercept)} intercept rules, "
        f"{len(policy.egress)} egress rules, default {policy.default.value}"
        + _audit_summary(policy)
    )


def _audit_summary(policy: Policy) -> str:
    # Said on every load: a policy left in audit mode enforces nothing it audits.
    if not policy.enforce:
        return ", audit mode (enforce: false): denies are allowed and logged as audit-deny"
    audited = policy.audited()
    return f", audit mode for {', '.join(audited)}" if audited else ""


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
            bpf_cache_dir=options.bpf_cache_dir,
            bpf_exclude_interfaces=options.bpf_exclude_interfaces,
            cgroup_root=options.cgroup_root,
        )
        if options.state_file is not None:
            self.reconciler.on_commit = self._save_state
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
        self._metrics: Metrics | None = None

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

    async def _save_state(self) -> None:
        """Save the state just put in force for the next boot (``saved``).
        A failure is logged, never fatal: enforcement is in the kernel."""
        assert self.options.state_file is not None
        desired = self.reconciler.desired
        policy = desired.policy
        state = SavedState(
            policy_path=self.path,
            policy_hash=desired.policy_hash,
            generation=self.reconciler.generation,
            fail_open=policy.fail_open,
            address_v4=policy.proxy.address_v4,
            address_v6=policy.proxy.address_v6,
            bpf_pin_dir=self.options.bpf_pin_dir,
            cgroup_root=self.options.cgroup_root,
            cgroups=tuple(sorted(marks_by_path(policy))),
            # The nftables selection: a boot guard installs it with no BPF.
            ruleset=desired.doc if desired.selection == "nft" else self._desired_nft().doc,
        )
        try:
            await asyncio.to_thread(write_saved, self.options.state_file, state)
        except OSError as exc:
            log.error(
                "cannot save the state in force to %s: %s; a reboot before the next save"
                " leaves the workloads unguarded until the agent starts",
                self.options.state_file,
                exc,
            )

    def _desired_nft(self) -> Desired:
        current = self.reconciler.desired
        return desired_state(
            current.source,
            policy_hash=current.policy_hash,
            observed=current.observed,
            selection="nft",
        )

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

    def flows(self) -> dict[str, Any]:
        """What ``egress-agent flows`` shows: the connections open now."""
        return status_flows(self)

    def metrics(self) -> str:
        """The agent's counters and gauges in the Prometheus text format."""
        if self._metrics is None:
            self._metrics = Metrics(self)
        return self._metrics.text()

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
