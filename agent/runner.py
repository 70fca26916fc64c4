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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from egress_agent.agent.addresses import (
    ensure_proxy_addresses,
    host_interfaces,
    missing_proxy_addresses,
    remove_proxy_addresses,
)
from egress_agent.agent.cgroups import CgroupWorkloads
from egress_agent.agent.counters import Count, RuleCounters
from egress_agent.agent.counters import summary as counter_summary
from egress_agent.agent.discovery import pod_addresses, resolve, uses_pods
from egress_agent.agent.handover import (
    HandoverError,
    HandoverServer,
    Inherited,
    abandon,
    announce_accepting,
    predecessor_running,
    request_handover,
)
from egress_agent.agent.kubernetes import (
    PodWatcher,
    Snapshot,
    make_api,
    node_name_from_env,
)
from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS, StatusServer
from egress_agent.agent.watch import PolicyFileWatch
from egress_agent.bpf import attach as bpf_attach
from egress_agent.bpf.datapath import BpfDatapath
from egress_agent.bpf.loader import DEFAULT_PIN_DIR, BpfConfig, BpfError
from egress_agent.bpf.maps import UnsupportedPolicy
from egress_agent.policy.load import PolicyError, parse_policy, read_policy_text
from egress_agent.policy.model import IPAddress, NonTcp, Policy
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.connect import ConnectListener
from egress_agent.proxy.server import FDS_PER_CONNECTION, ProxyServer
from egress_agent.rules.apply import (
    NftablesError,
    RuleCounter,
    Table,
    read_counters,
    render_output_update,
    verify_applied,
)
from egress_agent.rules.apply import context as nft_context
from egress_agent.rules.render import Json, Selection, render_ruleset

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


class DatapathError(Exception):
    """--datapath bpf was asked for and the BPF datapath cannot run."""


# How long start-up waits for the first list of pods before applying anyway
# (pod workloads then have no addresses and the agent reports not ready).
FIRST_SYNC_TIMEOUT = 30.0


@dataclass(frozen=True, kw_only=True)
class ReloadResult:
    applied: bool
    generation: int
    policy_hash: str
    error: str | None = None


def summary(policy: Policy) -> str:
    return (
        f"{len(policy.workloads)} workloads, {len(policy.intercept)} intercept rules, "
        f"{len(policy.egress)} egress rules, default {policy.default.value}"
    )


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Agent:
    """The running agent: the policy in force, the proxy, the kernel state."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.path = options.policy_path
        text = read_policy_text(self.path)  # PolicyError reaches the CLI: exit 2
        # The file's policy, and the one in force: pod workloads resolved to
        # the addresses discovery last reported.
        self.source_policy = parse_policy(text, source_name=self.path)
        self.pods: Snapshot | None = None
        self.watcher: PodWatcher | None = None
        self.policy = resolve(self.source_policy, None)
        # Pod address -> the node's interface routing to it (pod workloads are
        # bound to these: see discovery.resolve); refreshed as pods and links change.
        self.host_ifs: dict[IPAddress, str] = {}
        self.policy_hash = content_hash(text)
        self.generation = 1
        self.selection: Selection = "nft"
        self.bpf: BpfDatapath | None = None
        self.bpf_fallback: str | None = None
        self._datapath_ready = False  # loaded by prepare(), before start()
        self.cgroups = CgroupWorkloads(root=options.cgroup_root, bpf_pin_dir=options.bpf_pin_dir)
        # hostNetwork pods' uid -> cgroup path, for pod selectors with hostNetwork.
        self.pod_cgroups: dict[str, str] = {}
        self.doc = self._render(self.policy)
        # The one libnftables context, made now while file descriptors are
        # plentiful (see rules.apply): no later call makes another.
        nft_context()
        self.counters = RuleCounters(read=self._read_counters)
        # fail: open makes the table the kernel's to remove when we end.
        self.table = Table(owned=self.policy.fail_open)
        self.audit = AuditLog(options.audit_path)
        self.proxy: ProxyServer | None = None
        self.connect: ConnectListener | None = None
        self.last_reload: ReloadResult | None = None
        self.in_sync = False
        self.drift_problems: list[str] = []
        self.repairs = 0
        self.reloads = {"applied": 0, "failed": 0}
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        self.handed_over = asyncio.Event()
        # Set while a successor takes over (and for good once it has): the
        # kernel state is the successor's to change, not ours to repair.
        self.handing_over = False
        self.successor: int | None = None

    async def start(self, inherited: Inherited | None = None) -> None:
        async with self._reload_lock:
            await self._start(inherited)

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
            await self._start_datapath()
            self._datapath_ready = True

    def _render(self, policy: Policy) -> Json:
        return render_ruleset(policy, selection=self.selection)

    def _bpf_config(self) -> BpfConfig:
        proxy = self.policy.proxy
        return BpfConfig(
            divert_mark=proxy.divert_mark,
            upstream_mark=proxy.upstream_mark,
            proxy_v4=proxy.address_v4,
            proxy_v6=proxy.address_v6,
            pin_dir=self.options.bpf_pin_dir,
        )

    async def _start_datapath(self) -> None:
        wanted = self.options.datapath
        if wanted == "nft":
            # A crashed BPF-mode run's filters would only set an unused mark;
            # remove them anyway: the agent leaves nothing behind.
            await asyncio.to_thread(bpf_attach.detach_everywhere)
            return
        datapath = BpfDatapath(
            config=self._bpf_config(), exclude_interfaces=self.options.bpf_exclude_interfaces
        )
        try:
            await asyncio.to_thread(datapath.start, self.policy)
        except (BpfError, UnsupportedPolicy, OSError) as exc:
            reason = str(exc) if isinstance(exc, BpfError) else str(BpfError(str(exc)))
            if wanted == "bpf":
                raise DatapathError(
                    f"{reason}; --datapath bpf does not fall back (use --datapath auto or nft)"
                ) from exc
            self.bpf_fallback = reason
            log.warning(
                "BPF datapath unavailable: %s; falling back to the nftables selection"
                " (--datapath nft to skip trying)",
                reason,
            )
            return
        self.bpf, self.selection = datapath, "bpf"
        log.info(
            "BPF datapath: %s attached to %s",
            datapath.status()["program_id"],
            ", ".join(sorted(datapath.attached)) or "no interface yet",
        )

    async def _update_bpf(self, policy: Policy) -> None:
        if self.bpf is not None:
            result = await asyncio.to_thread(self.bpf.update, policy)
            if result.changed_entries:
                log.info(
                    "BPF maps: %d entries changed in %.1f ms",
                    result.changed_entries,
                    result.seconds * 1000,
                )

    def _apply_doc(self, doc: Json) -> None:
        """Replace the table, or in BPF mode change only output rules and sets
        when that is all that differs (the table and prerouting stay)."""
        if doc == self.doc:
            return
        partial = render_output_update(self.doc, doc) if self.selection == "bpf" else None
        with self.counters.around_change():
            if partial is not None:
                self.table.change(partial)
            else:
                self.table.apply(doc)

    def _read_counters(self) -> list[RuleCounter]:
        chains = [
            c["add"]["chain"]["name"] for c in self.doc["nftables"] if "chain" in c.get("add", {})
        ]
        return read_counters(chains)

    async def links_changed(self) -> None:
        """An interface appeared, went or changed: attach where it belongs."""
        if self.bpf is None or self.handing_over:
            return  # after a handover the successor's program is the one to attach
        async with self._reload_lock:
            added = await asyncio.to_thread(self.bpf.sync_links)
            if added:
                log.info("BPF classifier attached to %s", ", ".join(added))

    async def _start(self, inherited: Inherited | None) -> None:
        if self.pods is not None:
            await self._refresh_host_interfaces(self.pods)
            await self._refresh_pod_cgroups()
            self.policy = resolve(
                self.source_policy,
                self.pods,
                host_interfaces=self.host_ifs,
                pod_cgroups=self.pod_cgroups,
            )
        # pyroute2 drives its own asyncio loop internally: keep it off ours.
        await asyncio.to_thread(ensure_proxy_addresses, self.policy.proxy)
        if not self._datapath_ready:
            await self._start_datapath()
        elif self.bpf is not None:
            await self._update_bpf(self.policy)  # pods may have been resolved since
        await self._sync_cgroups(self.policy)
        self.doc = self._render(self.policy)
        self.proxy = ProxyServer(
            policy=self.policy,
            audit=self.audit,
            generation=self.generation,
            policy_hash=self.policy_hash,
        )
        spare = list(inherited.sockets) if inherited else []
        if self.policy.connect is not None:
            # First: it takes its own inherited sockets out of `spare`, and
            # the proxy closes whatever is left there.
            self.connect = ConnectListener(self.proxy, self.policy.connect.port)
            await self.connect.start(spare)
        await self.proxy.start(spare)
        log_connection_caps(self.policy, self.proxy)
        self.table.apply(self.doc)
        problems = verify_applied(self.doc)
        if problems:
            raise NftablesError(
                "the kernel does not hold the ruleset that was applied: " + "; ".join(problems)
            )
        self.in_sync = True

    async def _sync_cgroups(self, policy: Policy) -> None:
        try:
            await asyncio.to_thread(self.cgroups.sync, policy)
        except OSError as exc:
            log.error("cgroup workloads: %s", exc)

    async def repair_drift(self) -> bool:
        """Compare the kernel with the desired state; restore what someone
        removed or changed. Returns whether anything had drifted."""
        async with self._reload_lock:
            if self.handing_over:
                return False
            # Cgroups that appeared or were made again since the last round.
            await self._sync_cgroups(self.policy)
            problems = verify_applied(self.doc)
            try:
                missing = await asyncio.to_thread(missing_proxy_addresses, self.policy.proxy)
            except OSError as exc:
                # Not knowing is no reason to leave the table unrepaired.
                log.error("drift: cannot check the proxy addresses on lo: %s", exc)
                missing = []
            problems += [f"proxy address {a} missing from lo" for a in missing]
            bpf_problems: list[str] = []
            if self.bpf is not None:
                bpf_problems = await asyncio.to_thread(self.bpf.verify)
                problems += bpf_problems
            self.drift_problems = problems
            if not problems:
                self.in_sync = True
                return False
            self.in_sync = False
            log.warning("drift: %s; restoring", "; ".join(problems))
            if missing:
                await asyncio.to_thread(ensure_proxy_addresses, self.policy.proxy)
            if self.bpf is not None and bpf_problems:
                await asyncio.to_thread(self.bpf.repair)
            with self.counters.around_change():
                self.table.apply(self.doc)
            self.repairs += 1
            self.in_sync = not verify_applied(self.doc)
            if self.bpf is not None:
                self.in_sync = self.in_sync and not await asyncio.to_thread(self.bpf.verify)
            return True

    def snapshot(self) -> dict[str, Any]:
        """What ``egress-agent status`` shows."""
        reasons = []
        if not self.in_sync:
            reasons.append(
                "kernel state differs from the policy: " + "; ".join(self.drift_problems)
            )
        if self.proxy is None or not self.proxy.listening:
            reasons.append("proxy not listening")
        discovery: dict[str, Any] | None = None
        if self.watcher is not None:
            pods = self.pods
            if pods is None or not pods.synced:
                reasons.append("pod discovery has not listed the pods on this node yet")
            discovery = {
                "node": self.watcher.node_name,
                "synced": bool(pods and pods.synced),
                "pods_on_node": len(pods.pods) if pods else 0,
                "error": self.watcher.last_error,
                "addresses": {
                    w.name: [str(n) for n in w.cidrs]
                    for w in self.policy.workloads
                    if w.pods is not None
                },
                # The pods' host-side interfaces each pod workload is bound to
                # (empty: not bound, some pod's interface is unknown).
                "interfaces": {
                    w.name: list(w.interfaces) for w in self.policy.workloads if w.pods is not None
                },
            }
        counts: dict[str, int] = {}
        for cmd in self.doc["nftables"]:
            rule = cmd.get("add", {}).get("rule")
            if rule is not None:
                counts[rule["chain"]] = counts.get(rule["chain"], 0) + 1
        counted, counters_error = self._counts()
        counters = counter_summary(counted, bpf_drops=self._bpf_drops())
        if counters_error is not None:
            counters["error"] = counters_error
        return {
            "policy": {
                "path": self.path,
                "generation": self.generation,
                "hash": self.policy_hash,
                "workloads": len(self.policy.workloads),
                "intercept_rules": len(self.policy.intercept),
                "egress_rules": len(self.policy.egress),
                "default": self.policy.default.value,
                # Intercept rules that drop their workloads' non-TCP traffic.
                "non_tcp_drop": [
                    f"intercept[{r.index}]"
                    for r in self.policy.intercept
                    if r.non_tcp is NonTcp.DROP
                ],
                "reverse_path_interfaces": list(self.policy.reverse_path_interfaces()),
            },
            "diverted": counters["diverted"],
            "drops": counters["drops"],
            "counters_error": counters_error,
            "last_reload": asdict(self.last_reload) if self.last_reload else None,
            "datapath": "bpf" if self.bpf is not None else "nftables",
            "datapath_requested": self.options.datapath,
            "bpf": self._bpf_snapshot(),
            "cgroups": self.cgroups.status(),
            "fail": "open" if self.policy.fail_open else "closed",
            "discovery": discovery,
            "nft_rules_per_chain": counts,
            "kernel_in_sync": self.in_sync,
            "drift_repairs": self.repairs,
            "dns": self.proxy.resolver.status() if self.proxy else None,
            "connections_open": len(self.proxy.connections) if self.proxy else 0,
            "connection_caps": {
                "max_connections": self.proxy.max_connections,
                "max_connections_per_workload": min(
                    self.policy.proxy.max_connections_per_workload, self.proxy.max_connections
                ),
                "open_by_workload": {
                    (w or "-"): n
                    for w, n in sorted(
                        self.proxy.open_by_workload.items(), key=lambda i: i[0] or ""
                    )
                },
                "refused": sum(self.proxy.refused.values()),
            }
            if self.proxy
            else None,
            "audit_records_written": self.audit.written,
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": not reasons,
            "not_ready_because": reasons,
        }

    def _counts(self) -> tuple[list[Count], str | None]:
        """The rule counters, or none and why they could not be read."""
        try:
            return self.counters.read(), None
        except NftablesError as exc:
            return [], str(exc)

    def _bpf_drops(self) -> dict[str, int]:
        """The classifier's own drops by reason (BPF datapath only)."""
        if self.bpf is None:
            return {}
        return {r.name.lower(): n for r, n in self.bpf.counters().dropped().items()}

    def _bpf_snapshot(self) -> dict[str, Any] | None:
        if self.bpf is None:
            return {"fallback_reason": self.bpf_fallback} if self.bpf_fallback else None
        counters = self.bpf.counters()
        return {
            **self.bpf.status(),
            "in_sync": not self.bpf.last_problems,
            "problems": self.bpf.last_problems,
            # Non-TCP the classifier marked for each non_tcp: drop rule (replies
            # among them pass in nftables; what was dropped is in `drops`).
            "non_tcp_marked": {
                f"intercept[{index}]": traffic.packets
                for index, traffic in sorted(counters.non_tcp.items())
            },
        }

    async def reload(self, reason: str) -> ReloadResult:
        """Validate the file, then apply it as one change; keep the old on any error."""
        async with self._reload_lock:
            if self.handing_over:  # the successor applies the file now
                return self._failed("handed over to a successor")
            result = await self._reload(reason)
            self.last_reload = result
            return result

    async def _reload(self, reason: str) -> ReloadResult:
        try:
            text = read_policy_text(self.path)
            digest = content_hash(text)
            if digest == self.policy_hash:
                return ReloadResult(applied=False, generation=self.generation, policy_hash=digest)
            source = parse_policy(text, source_name=self.path)
            _check_restart_only_settings(self.policy, source)
            policy = resolve(
                source, self.pods, host_interfaces=self.host_ifs, pod_cgroups=self.pod_cgroups
            )
            doc = self._render(policy)
        except PolicyError as exc:
            log.error(
                "reload (%s): keeping policy generation %d; the new file is not valid:\n  %s",
                reason,
                self.generation,
                "\n  ".join(str(p) for p in exc.problems),
            )
            return self._failed(str(exc))
        except ValueError as exc:
            log.error("reload (%s): keeping generation %d: %s", reason, self.generation, exc)
            return self._failed(str(exc))
        try:
            await self._update_bpf(policy)
        except (UnsupportedPolicy, OSError) as exc:
            log.error("reload (%s): BPF maps refused the policy, old one stays: %s", reason, exc)
            if self.bpf is not None:
                await self._update_bpf(self.policy)
            return self._failed(str(exc))
        try:
            self._apply_doc(doc)
        except NftablesError as exc:
            log.error("reload (%s): kernel refused the ruleset, old one stays: %s", reason, exc)
            if self.bpf is not None:
                await self._update_bpf(self.policy)
            return self._failed(str(exc))
        self.generation += 1
        self.source_policy = source
        caps_before = (
            self.policy.proxy.max_connections,
            self.policy.proxy.max_connections_per_workload,
        )
        self.policy, self.policy_hash, self.doc = policy, digest, doc
        await self._sync_cgroups(policy)
        assert self.proxy is not None
        closed = self.proxy.update_policy(policy, generation=self.generation, policy_hash=digest)
        if caps_before != (policy.proxy.max_connections, policy.proxy.max_connections_per_workload):
            log_connection_caps(policy, self.proxy)  # open connections over a new cap stay
        log.info(
            "reloaded (%s): generation %d, sha256 %s (%s)%s",
            reason,
            self.generation,
            digest,
            summary(policy),
            f"; closed {closed} open connections it denies" if closed else "",
        )
        self.reloads["applied"] += 1
        return ReloadResult(applied=True, generation=self.generation, policy_hash=digest)

    def adopt_pods(self, pods: Snapshot) -> None:
        """Before start: take discovery's first view into the policy to apply."""
        self.pods = pods
        self.policy = resolve(self.source_policy, pods)
        self.doc = self._render(self.policy)

    async def _refresh_host_interfaces(self, pods: Snapshot) -> bool:
        """Look up the node's interface towards each pod address; whether
        anything changed. A failed lookup keeps what was known."""
        try:
            found = await asyncio.to_thread(host_interfaces, pod_addresses(pods))
        except OSError as exc:
            log.warning("cannot look up the pods' host-side interfaces: %s", exc)
            return False
        changed = found != self.host_ifs
        self.host_ifs = found
        return changed

    async def recheck_host_interfaces(self) -> None:
        """A pod's route can appear after its address was published: bind it
        once it does (called from the drift loop)."""
        if self.pods is None or self.handing_over or not uses_pods(self.source_policy):
            return
        known = dict(self.host_ifs)
        if await self._refresh_host_interfaces(self.pods):
            self.host_ifs = known  # pods_changed looks again and applies
            await self.pods_changed(self.pods)
        elif await self._refresh_pod_cgroups():
            await self.pods_changed(self.pods)

    async def _refresh_pod_cgroups(self) -> bool:
        """Find the cgroups of hostNetwork pods (a pod's cgroup appears after
        the API server lists it); whether anything changed."""
        try:
            found = await asyncio.to_thread(self.cgroups.scan_pods, self.source_policy)
        except OSError as exc:
            log.warning("cannot scan the kubelet's pod cgroups: %s", exc)
            return False
        changed = found != self.pod_cgroups
        self.pod_cgroups = found
        return changed

    async def pods_changed(self, pods: Snapshot) -> None:
        """Discovery saw pods come, go or change labels: apply the new addresses
        as one change (nothing happens when the ruleset would be the same)."""
        async with self._reload_lock:
            if self.handing_over:
                return
            self.pods = pods
            await self._refresh_host_interfaces(pods)
            await self._refresh_pod_cgroups()
            policy = resolve(
                self.source_policy,
                pods,
                host_interfaces=self.host_ifs,
                pod_cgroups=self.pod_cgroups,
            )
            doc = self._render(policy)
            if doc == self.doc and policy == self.policy:
                return
            try:
                await self._update_bpf(policy)
                self._apply_doc(doc)
            except (NftablesError, UnsupportedPolicy, OSError) as exc:
                log.error("pods changed but the kernel refused the change: %s", exc)
                return
            self.generation += 1
            self.policy, self.doc = policy, doc
            await self._sync_cgroups(policy)
            assert self.proxy is not None
            closed = self.proxy.update_policy(
                policy, generation=self.generation, policy_hash=self.policy_hash
            )
            counts = ", ".join(
                f"{w.name} {len(w.cidrs)}" for w in policy.workloads if w.pods is not None
            )
            log.info(
                "pods changed: generation %d (addresses per pod workload: %s)%s",
                self.generation,
                counts,
                f"; closed {closed} open connections it denies" if closed else "",
            )

    def _failed(self, error: str) -> ReloadResult:
        self.reloads["failed"] += 1
        return ReloadResult(
            applied=False, generation=self.generation, policy_hash=self.policy_hash, error=error
        )

    async def give_listeners(self) -> tuple[list[socket.socket], dict[str, Any]]:
        """A successor asks for the listening sockets (agent.handover)."""
        async with self._reload_lock:
            assert self.proxy is not None
            self.handing_over = True
            if self.table.owned:
                # Only the owning process may change an owned table, and the
                # kernel removes it with us anyway: the successor installs its own.
                await asyncio.to_thread(self.table.remove)
            sockets = self.proxy.listening_sockets()
            if self.connect is not None:
                sockets += self.connect.listening_sockets()
            return sockets, {"generation": self.generation}

    async def settle_handover(self, confirmed: bool, pid: int) -> None:
        assert self.proxy is not None
        if not confirmed:
            # We never stopped accepting. The successor may have changed the
            # kernel state before it failed: ours again, repaired at once.
            async with self._reload_lock:
                if self.table.owned:
                    self.table.apply(self.doc)
                self.handing_over = False
            try:
                await self.repair_drift()
            except Exception as exc:  # the drift loop tries again
                log.error("after the failed handover: drift check failed: %s", exc)
            return
        self.proxy.stop_accepting()
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
        if self.proxy is not None:
            try:
                await self.proxy.close()
            except Exception as exc:
                log.error("teardown: could not close the proxy: %s", exc)
        bpf = self.bpf
        for step, action in (
            ("remove nftables table", self.table.remove),
            ("remove the BPF datapath", bpf.stop if bpf is not None else lambda: None),
            ("detach the cgroup socket marker", self.cgroups.stop),
            ("remove proxy addresses", lambda: remove_proxy_addresses(self.policy.proxy)),
        ):
            if not teardown:
                break
            try:
                await asyncio.to_thread(action)
            except Exception as exc:
                log.error("teardown: could not %s: %s", step, exc)
        self.audit.close()

    def metrics(self) -> str:
        """The agent's counters and gauges in the Prometheus text format."""
        snap = self.snapshot()
        last = self.last_reload
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP egress_agent_{name} {help_}")
            lines.append(f"# TYPE egress_agent_{name} {kind}")
            lines.extend(f"egress_agent_{name}{labels} {value:g}" for labels, value in samples)

        metric(
            "policy_generation",
            "gauge",
            "Generation of the policy in force.",
            [("", self.generation)],
        )
        metric(
            "reloads_total",
            "counter",
            "Policy reloads by result.",
            [(f'{{result="{k}"}}', v) for k, v in sorted(self.reloads.items())],
        )
        metric(
            "last_reload_failed",
            "gauge",
            "1 when the last reload was refused and an older policy is in force.",
            [("", 1 if last is not None and last.error else 0)],
        )
        metric(
            "kernel_in_sync",
            "gauge",
            "1 when the kernel holds the desired ruleset.",
            [("", 1 if self.in_sync else 0)],
        )
        metric(
            "drift_repairs_total",
            "counter",
            "Times the kernel state was restored.",
            [("", self.repairs)],
        )
        metric(
            "ready",
            "gauge",
            "1 when ready (rules, proxy and discovery in place).",
            [("", 1 if snap["ready"] else 0)],
        )
        # The rule counters as the snapshot read them (one read per scrape).
        for unit in ("packets", "bytes"):
            metric(
                f"diverted_{unit}_total",
                "counter",
                f"{unit.capitalize()} DNAT-ed to the proxy, by nftables chain and rule.",
                [
                    (f'{{chain="{row["chain"]}",rule="{_label(row["rule"])}"}}', row[unit])
                    for row in snap["diverted"]["rules"]
                ],
            )
        for unit in ("packets", "bytes"):
            samples = [
                (f'{{reason="{row["reason"]}",rule="{_label(row["rule"])}"}}', row[unit])
                for row in snap["drops"]["rules"]
            ]
            if unit == "packets":
                samples += [
                    (f'{{reason="{reason}",rule="BPF classifier"}}', n)
                    for reason, n in snap["drops"]["by_reason"].items()
                    if reason.startswith("bpf_")
                ]
            metric(
                f"dropped_{unit}_total",
                "counter",
                f"{unit.capitalize()} the datapath dropped, by reason and rule"
                " (nftables rule comments; the BPF classifier's own drops have bpf_ reasons).",
                samples,
            )
        if self.bpf is not None:
            classified = self.bpf.counters()
            for unit in ("packets", "bytes"):
                metric(
                    f"bpf_non_tcp_marked_{unit}_total",
                    "counter",
                    f"Non-TCP {unit} the BPF classifier marked for an intercept rule with"
                    " non_tcp: drop (replies among them pass in nftables).",
                    [
                        (f'{{rule="intercept[{index}]"}}', getattr(traffic, unit))
                        for index, traffic in sorted(classified.non_tcp.items())
                    ],
                )
            metric(
                "bpf_verdicts_total",
                "counter",
                "Packets the BPF classifier saw, by the reason of its verdict.",
                [
                    (f'{{reason="{reason.name.lower()}"}}', n)
                    for reason, n in sorted(classified.reasons.items())
                ],
            )
            counters = self.bpf.workload_counters()
            for i, (kind, what) in enumerate(
                (
                    ("packets", "marked"),
                    ("bytes", "marked"),
                    ("packets", "bypassed"),
                    ("bytes", "bypassed"),
                )
            ):
                metric(
                    f"bpf_{what}_{kind}_total",
                    "counter",
                    f"TCP {kind} of a workload the BPF classifier {what}"
                    + (
                        " for the proxy (diverted_* counts what was DNAT-ed)."
                        if what == "marked"
                        else "."
                    ),
                    [(f'{{workload="{w}"}}', v[i]) for w, v in sorted(counters.items())],
                )
        metric(
            "connections_open",
            "gauge",
            "Connections the proxy holds.",
            [("", snap["connections_open"])],
        )
        metric(
            "connections_total",
            "counter",
            "Finished connections by audit event and verdict.",
            [
                (f'{{event="{e}",verdict="{v}"}}', n)
                for (e, v), n in sorted(self.audit.by_outcome.items())
            ],
        )
        metric(
            "bytes_total",
            "counter",
            "Bytes relayed by direction (up: client to upstream).",
            [
                ('{direction="up"}', self.audit.bytes_up),
                ('{direction="down"}', self.audit.bytes_down),
            ],
        )
        if self.proxy is not None:
            metric(
                "connections_refused_total",
                "counter",
                "Connections refused because a cap on open connections was reached, by the"
                " setting (proxy.max_connections, proxy.max_connections_per_workload) and"
                " workload.",
                [
                    (f'{{cap="{c}",workload="{w}"}}', n)
                    for (c, w), n in sorted(self.proxy.refused.items())
                ],
            )
            metric(
                "connections_max",
                "gauge",
                "The cap on open connections in force (the policy's, or lower to fit the"
                " file descriptor limit).",
                [("", self.proxy.max_connections)],
            )
            metric(
                "listener_restarts_total",
                "counter",
                "Times a listening socket was served again after the event loop stopped"
                " accepting on it.",
                [("", sum(lst.restarts for lst in self.proxy.listeners))],
            )
        metric(
            "connect_connections_total",
            "counter",
            "Finished connections of the explicit CONNECT listener by audit event and verdict.",
            [
                (f'{{event="{e}",verdict="{v}"}}', n)
                for (e, v), n in sorted(self.audit.connect_by_outcome.items())
            ],
        )
        metric(
            "http_requests_total",
            "counter",
            "HTTP requests served by http rules (and plain HTTP allowed by hosts), by rule"
            " and status class.",
            [
                (f'{{rule="{r}",status="{c}"}}', n)
                for (r, c), n in sorted(self.audit.requests_by_outcome.items())
            ],
        )
        if self.proxy is not None:
            resolver = self.proxy.resolver
            metric(
                "dns_queries_total",
                "counter",
                "Names asked of the resolver (A and AAAA together) by outcome: answer,"
                " nodata (no addresses), nxdomain, failed (timeout, unreachable, SERVFAIL).",
                [(f'{{result="{k}"}}', v) for k, v in sorted(resolver.queries.items())],
            )
            metric(
                "dns_lookups_total",
                "counter",
                "Names the proxy needed for a decision, by what it got: cached, queried,"
                " stale (an expired answer while the resolver fails), failed (no address).",
                [(f'{{result="{k}"}}', v) for k, v in sorted(resolver.lookups.items())],
            )
            metric(
                "dns_cache_names",
                "gauge",
                "Names in the proxy's DNS cache.",
                [("", len(resolver.cache))],
            )
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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


def log_connection_caps(policy: Policy, proxy: ProxyServer) -> None:
    settings = policy.proxy
    if proxy.max_connections < settings.max_connections:
        log.warning(
            "proxy.max_connections %d needs up to %d file descriptors, more than the limit"
            " leaves (%d): new connections are refused once the open ones hold them, at"
            " %d relayed connections or more (raise the hard RLIMIT_NOFILE, e.g."
            " LimitNOFILE= in the unit, or lower proxy.max_connections)",
            settings.max_connections,
            settings.max_connections * FDS_PER_CONNECTION,
            proxy.fd_room,
            proxy.max_connections,
        )
    log.info(
        "connection caps: %d open in total, %d per workload",
        proxy.max_connections,
        min(settings.max_connections_per_workload, proxy.max_connections),
    )


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
    pending: list[asyncio.TimerHandle] = []
    tasks: set[asyncio.Task[Any]] = set()

    def reload_done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reload failed unexpectedly", exc_info=task.exception())

    reasons: list[str] = []

    def request_reload(reason: str) -> None:
        # Coalesce a burst: one reload RELOAD_DEBOUNCE after its first event.
        # It is logged with the first event's reason, a file change or SIGHUP
        # taking precedence over the periodic check it coincided with.
        reasons.append(reason)
        if pending:
            return

        def fire() -> None:
            pending.clear()
            named = [r for r in reasons if r != "periodic check"] or reasons
            why = named[0]
            reasons.clear()
            task = loop.create_task(agent.reload(why), name=f"reload ({why})")
            tasks.add(task)
            task.add_done_callback(reload_done)

        pending.append(loop.call_later(RELOAD_DEBOUNCE, fire))

    loop.add_signal_handler(signal.SIGHUP, request_reload, "SIGHUP")
    watch = PolicyFileWatch(options.policy_path)

    def on_watch() -> None:
        if watch.changed():
            request_reload("file changed")

    loop.add_reader(watch.fileno(), on_watch)

    async def poll() -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            request_reload("periodic check")

    async def watch_drift() -> None:
        while True:
            await asyncio.sleep(DRIFT_INTERVAL)
            try:
                await agent.recheck_host_interfaces()
                await agent.repair_drift()
            except Exception as exc:  # keep checking; say why this round failed
                agent.in_sync = False
                log.error("drift check failed: %s", exc)

    poller = loop.create_task(poll(), name="policy poll")
    links = LinkEvents()
    links_pending: list[asyncio.TimerHandle] = []

    def on_links() -> None:
        links.drain()
        if links_pending or not started:
            return

        def fire() -> None:
            links_pending.clear()
            task = loop.create_task(agent.links_changed(), name="links changed")
            tasks.add(task)
            task.add_done_callback(reload_done)

        links_pending.append(loop.call_later(LINK_DEBOUNCE, fire))

    loop.add_reader(links.fileno(), on_links)
    status = StatusServer(
        snapshot=agent.snapshot, address=options.status_address, metrics=agent.metrics
    )
    drift: asyncio.Task[None] | None = None
    discovery: asyncio.Task[None] | None = None
    first_sync = asyncio.Event()
    started = False
    handover: HandoverServer | None = None
    inherited: Inherited | None = None
    abandoned = False

    def on_pods(pods: Snapshot) -> None:
        if not started:
            agent.adopt_pods(pods)
            first_sync.set()
            return
        task = loop.create_task(agent.pods_changed(pods), name="pods changed")
        tasks.add(task)
        task.add_done_callback(reload_done)

    try:
        # With a predecessor, its status server holds the address until the
        # handover: ours starts right after it (below).
        predecessor = options.handover and await asyncio.to_thread(predecessor_running)
        if not predecessor:
            await status.start()
        if uses_pods(agent.source_policy):
            # Permanent configuration errors (KubernetesConfigError) end the run.
            api = make_api(options.kubeconfig)
            agent.watcher = PodWatcher(api, node_name=node_name_from_env(), on_change=on_pods)
            discovery = loop.create_task(agent.watcher.run(), name="pod discovery")
            try:
                await asyncio.wait_for(first_sync.wait(), FIRST_SYNC_TIMEOUT)
            except TimeoutError:
                log.error(
                    "pod discovery: no list of pods after %gs (%s); applying without pod"
                    " addresses and reporting not ready until it arrives",
                    FIRST_SYNC_TIMEOUT,
                    agent.watcher.last_error or "no answer",
                )
        # From here on, discovery changes queue behind start-up on the reload lock.
        started = True
        try:
            await agent.prepare()
        except BaseException:
            if predecessor:
                # Nothing was taken over: the predecessor serves on with the
                # kernel state it owns (no teardown below).
                abandoned = True
            raise
        if predecessor:
            inherited = await _take_over()
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
        drift = loop.create_task(watch_drift(), name="drift repair")
        if options.handover:
            handover = HandoverServer(give=agent.give_listeners, settle=agent.settle_handover)
            await handover.start()
        log.info("ready: policy %s (%s)", options.policy_path, summary(agent.policy))
        waits = [
            loop.create_task(agent.handed_over.wait(), name="handed over"),
            loop.create_task(stop.wait(), name="stop"),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if agent.handed_over.is_set():
            await _drain(agent, status, stop, options, [poller, drift, discovery])
            return 0
        log.info("stopping: removing table inet egress_agent and the proxy addresses")
        return 0
    finally:
        poller.cancel()
        for task_ in (drift, discovery):
            if task_ is not None:
                task_.cancel()
        await status.close()
        for handle in pending:
            handle.cancel()
        loop.remove_reader(watch.fileno())
        watch.close()
        loop.remove_reader(links.fileno())
        links.close()
        for handle in links_pending:
            handle.cancel()
        for task in list(tasks):
            task.cancel()
        if handover is not None:
            await handover.close()
        await agent.stop(teardown=not agent.handed_over.is_set() and not abandoned)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _take_over() -> Inherited | None:
    try:
        inherited = await asyncio.to_thread(request_handover)
    except HandoverError as exc:
        log.error("%s; starting on fresh sockets", exc)
        return None
    if inherited is not None:
        log.info(
            "took over %d listening sockets from the agent with pid %d (generation %d)",
            len(inherited.sockets),
            inherited.pid,
            inherited.generation,
        )
    return inherited


# After a SIGTERM during a drain, connections still open get this long to end.
DRAIN_GRACE = 20.0


async def _drain(
    agent: Agent,
    status: StatusServer,
    stop: asyncio.Event,
    options: RunOptions,
    background: list[asyncio.Task[None] | None],
) -> None:
    """Handed over: the successor enforces the policy now. Stop every
    background duty, let the connections we relay end, then exit (or wait
    for SIGTERM), leaving the kernel state to the successor."""
    assert agent.proxy is not None
    for task in background:
        if task is not None:
            task.cancel()
    await status.close()
    log.info(
        "handed over to pid %s: no longer accepting; draining %d open connections",
        agent.successor,
        len(agent.proxy.connections),
    )
    grace_end: float | None = None
    while agent.proxy.connections:
        if stop.is_set() and grace_end is None:
            grace_end = time.monotonic() + DRAIN_GRACE
            log.info(
                "stop requested: %d connections get %gs to end",
                len(agent.proxy.connections),
                DRAIN_GRACE,
            )
        if grace_end is not None and time.monotonic() > grace_end:
            log.warning(
                "closing %d connections still open after the grace", len(agent.proxy.connections)
            )
            break
        await asyncio.sleep(0.1)
    else:
        log.info("drained: every connection has ended")
    if options.after_handover == "wait" and not stop.is_set():
        await stop.wait()
    log.info("exiting after the handover; the kernel state stays with pid %s", agent.successor)
