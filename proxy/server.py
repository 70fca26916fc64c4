"""The transparent proxy's server: its listeners, the connections they
accept, and their lifecycle.

:class:`ProxyServer` listens on the proxy's addresses (new sockets, or a
predecessor's handed over, see ``agent.handover``) and makes a
:class:`~egress_agent.proxy.connection.Connection` for each diverted
connection (see there for the pipeline each one runs). It owns what the
connections share: the policy in force and its swap on reload, the caps on
open connections and descriptors, the resolver, the audit log, and a sweeper
that ends idle connections, serves a listener again that the event loop
dropped (see ``listener``) and gives memory back after a flood. Stopping is
in two steps: stop accepting (a successor takes over the sockets), then
close what is left.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import socket
import time
from collections.abc import Callable, Sequence

from egress_agent.policy.decide import decide, identify, names_to_keep_warm, names_to_resolve
from egress_agent.policy.model import Action, Policy
from egress_agent.proxy import httprelay
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.connection import Connection
from egress_agent.proxy.conntrack import Conntrack
from egress_agent.proxy.kernel_relay import RelayStats
from egress_agent.proxy.limits import (
    CAP_TOTAL,
    CAP_WARNING_INTERVAL,
    CAP_WORKLOAD,
    FDS_PER_CONNECTION,
    TRIM_AFTER_DROP,
    descriptor_room,
    malloc_trim,
)
from egress_agent.proxy.listener import SWEEP_INTERVAL, Listener, bind_listener, take_listening
from egress_agent.proxy.original_dst import Endpoint
from egress_agent.proxy.resolver import Resolver
from egress_agent.proxy.tasks import TaskSet
from egress_agent.proxy.traffic import LocalTraffic, TrafficState

log = logging.getLogger(__name__)


class ProxyServer:
    """Listens on the proxy's addresses and serves diverted connections."""

    def __init__(
        self,
        *,
        policy: Policy,
        audit: AuditLog,
        generation: int = 1,
        policy_hash: str = "",
        resolver: Resolver | None = None,
    ) -> None:
        self.policy = policy
        # Names are bound to addresses with the proxy's own lookups.
        self.resolver = resolver if resolver is not None else Resolver(policy.dns)
        self.generation = generation
        self.policy_hash = policy_hash
        self.audit = audit
        self.loop = asyncio.get_running_loop()
        self.tasks = TaskSet()
        self.connections: set[Connection] = set()
        # Connection ids: unique within this process, and across restarts by
        # the start time.
        self.id_prefix = f"{int(time.time()):x}"
        self.ids = itertools.count(1)
        self.http = httprelay.HttpResources()
        self.conntrack = Conntrack()
        self._listeners: list[Listener] = []  # ours first, then the CONNECT listener's
        self._own: set[tuple[str, int]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.listening = False
        # Connection caps: open connections counted against them, in total
        # and by workload (None: no workload identified); refusals by
        # (cap, workload) for the metrics.
        self.fd_room = descriptor_room()
        self.admitted = 0
        self.upstreams = 0  # upstream sockets open (the other descriptor of a relay)
        self.relays = RelayStats()  # who moved the relayed connections' bytes
        self.open_by_workload: dict[str | None, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self._cap_warned = 0.0
        self._peak_open = 0  # most connections open since memory was last given back
        # The egress rules' limits and breakers (see ``traffic``).
        self.traffic: TrafficState = LocalTraffic()
        self.traffic.configure(policy.egress, self.loop.time())

    async def start(self, inherited: Sequence[socket.socket] = ()) -> None:
        """Listen on the proxy's addresses: on ``inherited`` sockets that are
        bound there (a predecessor's, see ``agent.handover``), else on new
        ones. Inherited sockets that do not fit are closed."""
        settings = self.policy.proxy
        spare = list(inherited)
        for address in (settings.address_v4, settings.address_v6):
            sock = take_listening(spare, address, settings.port) or bind_listener(
                address, settings.port
            )
            await self.listen(sock, lambda: Connection(self).client, backlog=4096)
            self._own.add((str(address), settings.port))
        for sock in spare:
            sock.close()
        self._sweeper = self.tasks.spawn(self._sweep(), name="idle-sweeper")
        self.resolver.keep_warm(names_to_keep_warm(self.policy))
        self.tasks.spawn(self.resolver.run(), name="dns-refresh")
        self.listening = True
        log.info(
            "proxy listening on %s:%d and [%s]:%d",
            settings.address_v4,
            settings.port,
            settings.address_v6,
            settings.port,
        )

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    def listening_sockets(self) -> list[socket.socket]:
        """The listening sockets, for handing over to a successor (the caller
        sends their descriptors; they stay ours until ``stop_accepting``)."""
        return [listener.duplicate() for listener in self._listeners if listener.owner is self]

    async def listen(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], *, backlog: int,
        owner: object = None,
    ) -> Listener:  # fmt: skip
        """Serve ``sock`` (a listening socket, now ours) with ``factory``'s
        protocols, watched by the sweeper (see :class:`Listener`)."""
        listener = Listener(self.loop, sock, factory, backlog)
        listener.owner = owner if owner is not None else self
        try:
            await listener.serve()
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)
        return listener

    def stop_accepting(self) -> None:
        """Stop accepting; connections being relayed go on until they end."""
        self.listening = False
        for listener in self._listeners:
            if listener.owner is self:
                listener.close()

    def update_policy(self, policy: Policy, *, generation: int, policy_hash: str) -> int:
        """Swap the policy for new connections; returns how many open ones it closed.

        Open connections keep running unless the policy says
        ``on_reload: {denied_connections: close}``: then each relayed
        connection is decided again under the new policy, and those it denies
        are reset; their audit record's error names the generation and rule.
        The listening addresses and port cannot change here (the caller
        refuses such a reload); timeouts and caps apply to new connections.
        """
        self.policy = policy
        self.generation = generation
        self.policy_hash = policy_hash
        self.resolver.configure(policy.dns)
        self.resolver.keep_warm(names_to_keep_warm(policy))
        self.traffic.configure(policy.egress, self.loop.time())
        if not policy.close_denied_on_reload:
            return 0
        closed = 0
        for conn in list(self.connections):
            relayed = conn.upstream is not None or conn.requests is not None
            if not relayed or conn.src is None or conn.dst is None:
                continue  # still being decided, under the policy it arrived with
            workload = identify(policy, conn.src.address) or (
                policy.workload_for_mark(conn.socket_mark) if conn.socket_mark is not None else None
            )
            name = conn.peeked.server_name if conn.peeked else None
            names = names_to_resolve(
                policy, workload=workload, dst=conn.dst.address, dst_port=conn.dst.port,
                server_name=name,
            )  # fmt: skip
            # What the cache knows now: a reload does not wait for the resolver.
            verdict = decide(
                policy,
                workload=workload,
                dst=conn.dst.address,
                dst_port=conn.dst.port,
                server_name=name,
                resolved=self.resolver.known(names),
            )
            if verdict.action is Action.DENY:
                conn.abort_both(
                    f"closed by reload to policy generation {generation}: "
                    f"rule {verdict.rule} denies it"
                )
                closed += 1
        return closed

    def is_own_endpoint(self, ep: Endpoint) -> bool:
        return (str(ep.address), ep.port) in self._own

    @property
    def max_connections(self) -> int:
        """The cap on open connections: the policy's, or as many relayed
        connections (two descriptors each) as the descriptor limit holds."""
        return min(self.policy.proxy.max_connections, self.fd_room // FDS_PER_CONNECTION)

    def admit(self, conn: Connection) -> tuple[str, str] | None:
        """Count ``conn`` as open, or say which cap refuses it and why."""
        settings = conn.policy.proxy
        workload = conn.workload
        total_cap = settings.max_connections
        per_cap = min(settings.max_connections_per_workload, total_cap)
        held = self.open_by_workload.get(workload, 0)
        in_use = self.admitted + self.upstreams
        refused: tuple[str, str] | None = None
        if self.admitted >= total_cap:
            refused = (
                CAP_TOTAL,
                f"refused: {self.admitted} connections open, the cap ({CAP_TOTAL})",
            )
        elif in_use + FDS_PER_CONNECTION > self.fd_room:
            # Below the policy's cap, the descriptor limit is the cap.
            refused = (
                CAP_TOTAL,
                f"refused: {self.admitted} connections open hold {in_use} of the {self.fd_room}"
                f" file descriptors the limit leaves them ({CAP_TOTAL} is more than fits)",
            )
        elif held >= per_cap:
            who = f"workload {workload}" if workload else "sources with no workload"
            refused = (
                CAP_WORKLOAD,
                f"refused: {held} connections open for {who}, the cap ({CAP_WORKLOAD})",
            )
        if refused is None:
            self.admitted += 1
            self.open_by_workload[workload] = held + 1
            conn.counted_as = workload
            return None
        key = (refused[0], workload or "")
        self.refused[key] = self.refused.get(key, 0) + 1
        now = self.loop.time()
        if now - self._cap_warned >= CAP_WARNING_INTERVAL:
            self._cap_warned = now
            log.warning(
                "connection cap reached, refusing new connections: %s (connections"
                " refused so far by cap: %s)",
                refused[1],
                ", ".join(f"{c} {w or '-'}: {n}" for (c, w), n in sorted(self.refused.items())),
            )
        return refused

    def release(self, conn: Connection) -> None:
        self.admitted -= 1
        held = self.open_by_workload.get(conn.counted_as, 0) - 1
        if held > 0:
            self.open_by_workload[conn.counted_as] = held
        else:
            self.open_by_workload.pop(conn.counted_as, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            idle = self.policy.proxy.idle_timeout
            now = self.loop.time()
            for conn in list(self.connections):
                if now - conn.last_activity > idle:
                    conn.abort_both(f"idle for more than {idle:g}s")
            for listener in list(self._listeners):
                await listener.check()
            self._give_memory_back()

    def _give_memory_back(self) -> None:
        """After a flood of connections has ended, hand the memory it took
        back to the system: glibc keeps freed heap memory for reuse (and
        Python's small-object arenas go back only when empty), so the agent's
        RSS would otherwise stay at the flood's peak."""
        open_now = len(self.connections)
        self._peak_open = max(self._peak_open, open_now)
        if self._peak_open - open_now < TRIM_AFTER_DROP or open_now > self._peak_open // 2:
            return
        self._peak_open = open_now
        # A connection's objects refer to each other (the connection, its
        # halves, their transports): only the cycle collector frees them,
        # and its oldest generation may not run for a long while.
        gc.collect()
        trim = malloc_trim()
        if trim is not None:
            trim(0)

    async def close(self) -> None:
        self.listening = False
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.abort_both("proxy stopping")
        await self.tasks.cancel_all()
        await self.resolver.close()
        self.conntrack.close()
        await asyncio.sleep(0)  # let aborted transports report connection_lost
        for conn in list(self.connections):
            conn.finish()
        for listener in self._listeners:
            await listener.wait_closed()
