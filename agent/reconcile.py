"""The one path by which a desired state reaches the kernel and the proxy.

:class:`Reconciler` holds the state in force (a :class:`~egress_agent.agent.
desired.Desired` and its generation) and the kernel seams that enforce it:
the nftables table, the BPF datapath, the cgroup socket marker and the
proxy's addresses. Everything the agent writes to the kernel goes through it:

* :meth:`Reconciler.start` installs the first state: addresses, datapath,
  cgroups, the proxy (started by the caller), then the table, read back.
* :meth:`Reconciler.commit` replaces the state in force by a new one, in this
  order: BPF maps, nftables table, generation, cgroups, proxy policy. A step
  the kernel refuses raises :class:`CommitRefused` and leaves the previous
  generation enforcing (the BPF maps are restored to it).
* :meth:`Reconciler.repair` compares the kernel with the state in force and
  restores what drifted.
* :meth:`Reconciler.teardown` removes it all, each step even if another failed.

The caller serialises these calls (the agent's reload lock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from egress_agent.agent.addresses import (
    ensure_proxy_addresses,
    missing_proxy_addresses,
    remove_proxy_addresses,
)
from egress_agent.agent.cgroups import CgroupWorkloads
from egress_agent.agent.counters import RuleCounters
from egress_agent.agent.desired import Desired, desired_state
from egress_agent.bpf import attach as bpf_attach
from egress_agent.bpf.cache import cache_dir_from
from egress_agent.bpf.classifier import BpfConfig, program_error
from egress_agent.bpf.datapath import BpfDatapath
from egress_agent.bpf.libbpf import BpfError
from egress_agent.bpf.maps import UnsupportedPolicy
from egress_agent.policy.model import Policy
from egress_agent.proxy.limits import FDS_PER_CONNECTION
from egress_agent.proxy.server import ProxyServer
from egress_agent.rules.apply import (
    NftablesError,
    RuleCounter,
    Table,
    read_counters,
    render_output_update,
    verify_applied,
)
from egress_agent.rules.apply import context as nft_context
from egress_agent.rules.nft import Json
from egress_agent.rules.render import Selection

log = logging.getLogger(__name__)


class DatapathError(Exception):
    """--datapath bpf was asked for and the BPF datapath cannot run."""


class CommitRefused(Exception):
    """The kernel refused a step of a commit; the previous state stays in force."""

    def __init__(self, step: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.step = step  # "bpf" (the maps) or "nftables" (the table)
        self.cause = cause


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


class Reconciler:
    """The state in force and the kernel seams that hold it."""

    def __init__(
        self,
        desired: Desired,
        *,
        datapath: str,
        bpf_pin_dir: str,
        bpf_cache_dir: str | None = None,
        bpf_exclude_interfaces: tuple[str, ...],
        cgroup_root: str | None,
    ) -> None:
        self.desired = desired
        self.generation = 1
        # How forwarded traffic is selected: by the ruleset, or by the BPF
        # classifier's mark once it is loaded.
        self.selection: Selection = desired.selection
        self.datapath = datapath  # requested: nft | bpf | auto
        self.bpf_pin_dir = bpf_pin_dir
        cache_dir = cache_dir_from(bpf_cache_dir)
        self.bpf_cache_dir = str(cache_dir) if cache_dir is not None else None
        self.bpf_exclude_interfaces = bpf_exclude_interfaces
        self.bpf: BpfDatapath | None = None
        self.bpf_fallback: str | None = None
        self.datapath_ready = False  # loaded by load_datapath(), before start()
        self.cgroups = CgroupWorkloads(
            root=cgroup_root, bpf_pin_dir=bpf_pin_dir, bpf_cache_dir=self.bpf_cache_dir
        )
        # The one libnftables context, made now while file descriptors are
        # plentiful (see rules.apply): no later call makes another.
        nft_context()
        self.counters = RuleCounters(read=self._read_counters)
        # fail: open makes the table the kernel's to remove when we end.
        self.table = Table(owned=desired.policy.fail_open)
        self.proxy: ProxyServer | None = None
        self.in_sync = False
        self.drift_problems: list[str] = []
        self.repairs = 0
        # Called after the first state and every commit are in force (the
        # agent saves them for the next boot, see ``saved``).
        self.on_commit: Callable[[], Awaitable[None]] | None = None

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self.desired.policy

    def _read_counters(self) -> list[RuleCounter]:
        chains = [
            c["add"]["chain"]["name"]
            for c in self.desired.doc["nftables"]
            if "chain" in c.get("add", {})
        ]
        return read_counters(chains)

    def _bpf_config(self) -> BpfConfig:
        proxy = self.policy.proxy
        return BpfConfig(
            divert_mark=proxy.divert_mark,
            upstream_mark=proxy.upstream_mark,
            proxy_v4=proxy.address_v4,
            proxy_v6=proxy.address_v6,
            pin_dir=self.bpf_pin_dir,
            cache_dir=self.bpf_cache_dir,
        )

    async def load_datapath(self) -> None:
        """Load the datapath asked for (with ``auto``, BPF where it loads)
        for the state in force; the ruleset then selects by its mark."""
        wanted = self.datapath
        self.datapath_ready = True
        if wanted == "nft":
            return  # a previous BPF-mode run's filters go once our table is in (start)
        datapath = BpfDatapath(
            config=self._bpf_config(), exclude_interfaces=self.bpf_exclude_interfaces
        )
        try:
            await asyncio.to_thread(datapath.start, self.policy)
        except (BpfError, UnsupportedPolicy, OSError) as exc:
            reason = str(exc) if isinstance(exc, BpfError) else str(program_error(str(exc)))
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
        self.desired = self.restate(self.desired)
        log.info(
            "BPF datapath: %s attached to %s",
            datapath.status()["program_id"],
            ", ".join(sorted(datapath.attached)) or "no interface yet",
        )

    async def _remove_stale_filters(self) -> None:
        """A previous BPF-mode run's filters (a crash, a kept stop) would only
        set a mark our table ignores; remove them anyway: the agent leaves
        nothing behind."""
        removed = await asyncio.to_thread(bpf_attach.detach_everywhere)
        if removed:
            log.info("removed a previous run's BPF filters from %s", ", ".join(removed))

    def restate(self, desired: Desired) -> Desired:
        """``desired`` with the traffic selection of the datapath in force."""
        if desired.selection == self.selection:
            return desired
        return desired_state(
            desired.source,
            policy_hash=desired.policy_hash,
            observed=desired.observed,
            selection=self.selection,
        )

    async def start(
        self,
        desired: Desired,
        start_proxy: Callable[[Desired, int], Awaitable[ProxyServer]],
    ) -> None:
        """Install the first state: the proxy's addresses, the datapath, the
        cgroups, the proxy (``start_proxy``), then the table, read back."""
        self.desired = desired
        # pyroute2 drives its own asyncio loop internally: keep it off ours.
        await asyncio.to_thread(ensure_proxy_addresses, desired.policy.proxy)
        if not self.datapath_ready:
            await self.load_datapath()
        elif self.bpf is not None:
            await self._update_bpf(desired.policy)  # pods may have been resolved since
        await self._sync_cgroups(desired.policy)
        self.desired = self.restate(self.desired)
        self.proxy = await start_proxy(self.desired, self.generation)
        log_connection_caps(self.policy, self.proxy)
        self.table.apply(self.desired.doc)
        problems = verify_applied(self.desired.doc)
        if problems:
            raise NftablesError(
                "the kernel does not hold the ruleset that was applied: " + "; ".join(problems)
            )
        self.in_sync = True
        if self.bpf is None:
            # Only now: a previous BPF-mode run's table, kept until ours
            # replaced it, selected by the marks these filters set.
            await self._remove_stale_filters()
        if self.on_commit is not None:
            await self.on_commit()

    async def commit(self, desired: Desired) -> int:
        """Put ``desired`` in force as the next generation; the number of open
        connections the proxy closed because the new policy denies them.
        :class:`CommitRefused` when the kernel refuses it: the previous
        generation keeps enforcing."""
        assert self.proxy is not None
        desired = self.restate(desired)
        try:
            await self._update_bpf(desired.policy)
        except (UnsupportedPolicy, OSError) as exc:
            await self._restore_bpf()
            raise CommitRefused("bpf", exc) from exc
        try:
            self._apply_doc(desired.doc)
        except NftablesError as exc:
            await self._restore_bpf()
            raise CommitRefused("nftables", exc) from exc
        before = self.policy.proxy
        self.generation += 1
        self.desired = desired
        await self._sync_cgroups(desired.policy)
        closed = self.proxy.update_policy(
            desired.policy, generation=self.generation, policy_hash=desired.policy_hash
        )
        after = desired.policy.proxy
        if (before.max_connections, before.max_connections_per_workload) != (
            after.max_connections,
            after.max_connections_per_workload,
        ):
            log_connection_caps(desired.policy, self.proxy)  # open connections over a new cap stay
        if self.on_commit is not None:
            await self.on_commit()
        return closed

    async def _update_bpf(self, policy: Policy) -> None:
        if self.bpf is not None:
            result = await asyncio.to_thread(self.bpf.update, policy)
            if result.changed_entries:
                log.info(
                    "BPF maps: %d entries changed in %.1f ms",
                    result.changed_entries,
                    result.seconds * 1000,
                )

    async def _restore_bpf(self) -> None:
        """The maps back to the state in force, after a refused commit."""
        if self.bpf is not None:
            await self._update_bpf(self.policy)

    def _apply_doc(self, doc: Json) -> None:
        """Replace the table, or in BPF mode change only output rules and sets
        when that is all that differs (the table and prerouting stay)."""
        current = self.desired.doc
        if doc == current:
            return
        partial = render_output_update(current, doc) if self.selection == "bpf" else None
        with self.counters.around_change():
            if partial is not None:
                self.table.change(partial)
            else:
                self.table.apply(doc)

    async def _sync_cgroups(self, policy: Policy) -> None:
        try:
            await asyncio.to_thread(self.cgroups.sync, policy)
        except OSError as exc:
            log.error("cgroup workloads: %s", exc)

    async def sync_links(self) -> None:
        """An interface appeared, went or changed: attach where it belongs."""
        if self.bpf is None:
            return
        added = await asyncio.to_thread(self.bpf.sync_links)
        if added:
            log.info("BPF classifier attached to %s", ", ".join(added))

    async def repair(self) -> bool:
        """Compare the kernel with the state in force; restore what someone
        removed or changed. Returns whether anything had drifted."""
        # Cgroups that appeared or were made again since the last round.
        await self._sync_cgroups(self.policy)
        doc = self.desired.doc
        problems = verify_applied(doc)
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
            self.table.apply(doc)
        self.repairs += 1
        self.in_sync = not verify_applied(doc)
        if self.bpf is not None:
            self.in_sync = self.in_sync and not await asyncio.to_thread(self.bpf.verify)
        return True

    def reinstall_table(self) -> None:
        """An owned table removed for a successor that then failed: ours again."""
        if self.table.owned:
            self.table.apply(self.desired.doc)

    async def release_table(self) -> None:
        """Before a handover: only the owning process may change an owned
        table, and the kernel removes it with us anyway, so the successor
        installs its own."""
        if self.table.owned:
            await asyncio.to_thread(self.table.remove)

    async def teardown(self) -> None:
        """Remove the table, the BPF datapath, the cgroup marker and the
        proxy's addresses; each step runs even if another failed."""
        bpf = self.bpf
        for step, action in (
            ("remove nftables table", self.table.remove),
            ("remove the BPF datapath", bpf.stop if bpf is not None else lambda: None),
            ("detach the cgroup socket marker", self.cgroups.stop),
            ("remove proxy addresses", lambda: remove_proxy_addresses(self.policy.proxy)),
        ):
            try:
                await asyncio.to_thread(action)
            except Exception as exc:
                log.error("teardown: could not %s: %s", step, exc)
