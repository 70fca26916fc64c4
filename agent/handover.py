"""Hand the proxy's listening sockets from a running agent to its successor.

Restarting the agent (an upgrade, a new DaemonSet pod) must neither refuse
new connections nor cut the ones being relayed, and must not leave the node
unenforced in between. So a starting agent first asks a running one for its
listening sockets; the running one passes them over (``SCM_RIGHTS``, see
unix(7)), keeps relaying what it holds until those connections end, and
leaves the kernel state (table, addresses) in place for its successor, which
installs its own ruleset over it in one transaction. The listening sockets
never close, so no connection arriving during the switch is refused.

Nor does one wait for the successor's start-up (loading the policy,
compiling and attaching its BPF program, installing the table: seconds). A
listening socket held by two processes hands each new connection to
whichever accepts it, so the predecessor goes on accepting and serving on
its own descriptors after passing them, until the successor says it accepts
too (``{"op": "accepting"}``); only then does it stop and drain. A successor
that fails or dies before that closes the rendezvous without saying so, and
the predecessor simply carries on as before, kernel state included. (A
successor that does not ask for this, by ``"until_accepting"`` in its
request, gets the older answer: the predecessor stops once the descriptors
have arrived.)

The rendezvous is an abstract unix socket: its name lives in the network
namespace (unix(7), "abstract sockets are ... scoped to the network
namespace"), which is exactly what an agent owns — its nftables table and
proxy addresses are per namespace too. Two agents on one node (hostNetwork
pods, or a VM) find each other with no shared folder, agents in different
namespaces never meet, and nothing is left on disk after a crash. Only a
peer running as root (SO_PEERCRED) may take the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from egress_agent.proxy.server import ProxyServer

log = logging.getLogger(__name__)

HANDOVER_NAME = b"\0egress-agent/handover"
MAX_SOCKETS = 16
TIMEOUT = 10.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandoverError(Exception):
    """The running agent answered but the handover did not complete."""


@dataclass(frozen=True, kw_only=True)
class Inherited:
    """What a predecessor handed over: its listening sockets and who it was.

    ``channel`` is the rendezvous, kept open while the predecessor still
    accepts: :func:`announce_accepting` tells it to stop, closing it without
    that tells it to carry on."""

    sockets: list[socket.socket] = field(default_factory=list)
    pid: int = 0
    generation: int = 0
    channel: socket.socket | None = None


def announce_accepting(inherited: Inherited) -> None:
    """Tell the predecessor that we accept on the inherited sockets now, so
    it stops accepting (and drains). A predecessor that is gone already, or
    stopped without waiting for this, does not need to hear it."""
    channel = inherited.channel
    if channel is None:
        return
    try:
        channel.send(json.dumps({"op": "accepting", "pid": os.getpid()}).encode())
    except OSError as exc:
        log.debug("predecessor pid %d did not hear that we accept: %s", inherited.pid, exc)
    finally:
        channel.close()


def abandon(inherited: Inherited) -> None:
    """We will not serve after all (start-up failed): the predecessor, still
    accepting, carries on and owns the kernel state again."""
    for sock in inherited.sockets:
        sock.close()
    if inherited.channel is not None:
        inherited.channel.close()


def predecessor_running(name: bytes = HANDOVER_NAME) -> bool:
    """Whether an agent in this network namespace would answer a takeover."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(name)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def request_handover(name: bytes = HANDOVER_NAME, *, timeout: float = TIMEOUT) -> Inherited | None:
    """Ask a running agent in this network namespace for its listening
    sockets. None when no agent runs here. Blocking: run it off the loop.
    The predecessor keeps accepting until :func:`announce_accepting`."""
    sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert sock is not None
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        sock.send(
            json.dumps({"op": "takeover", "pid": os.getpid(), "until_accepting": True}).encode()
        )
        msg, fds, _, _ = socket.recv_fds(sock, 65536, MAX_SOCKETS)
        inherited = [socket.socket(fileno=fd) for fd in fds]
        try:
            answer = json.loads(msg) if msg else {}
        except ValueError:
            answer = {"error": f"unreadable answer {msg[:80]!r}"}
        if "error" in answer or not inherited:
            for s in inherited:
                s.close()
            raise HandoverError(
                f"the running agent refused the handover: {answer.get('error', 'no sockets')}"
            )
        sock.send(b'{"op": "ok"}')
        sock.settimeout(None)
        kept, sock = sock, None  # open until we accept: see announce_accepting
        return Inherited(
            sockets=inherited,
            pid=int(answer.get("pid", 0)),
            generation=int(answer.get("generation", 0)),
            channel=kept,
        )
    except (OSError, TimeoutError) as exc:
        raise HandoverError(f"the handover from the running agent failed: {exc}") from exc
    finally:
        if sock is not None:
            sock.close()


Give = Callable[[], Awaitable[tuple[list[socket.socket], dict[str, Any]]]]
Settle = Callable[[bool, int], Awaitable[None]]


class HandoverServer:
    """Answers a successor's takeover request, once.

    ``give`` returns the listening sockets and facts to send; ``settle`` is
    told whether the successor took over (True: it accepts now, stop
    accepting and drain; False: keep serving as before) and its pid.
    Between the two the predecessor goes on accepting.
    """

    def __init__(self, *, give: Give, settle: Settle, name: bytes = HANDOVER_NAME) -> None:
        self.name = name
        self._give, self._settle = give, settle
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A predecessor that just handed over releases the name right after
        # the successor's confirmation: allow it a moment.
        deadline = time.monotonic() + 3.0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.bind(self.name)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise OSError(
                        exc.errno,
                        "cannot listen for a successor's handover request: another "
                        f"egress-agent holds the name in this network namespace ({exc.strerror})",
                    ) from exc
                await asyncio.sleep(0.05)
        sock.listen(4)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="handover")

    async def _serve(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            try:
                if await self._answer(conn):
                    return  # handed over: accept no more requests
            except Exception as exc:  # one bad request never ends the agent
                log.error("handover request failed: %s", exc)
            finally:
                conn.close()

    async def _answer(self, conn: socket.socket) -> bool:
        loop = asyncio.get_running_loop()
        pid, uid, _ = _CRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
        )
        if uid != 0:
            conn.send(json.dumps({"error": "only root may take over"}).encode())
            log.warning("refused a handover request from pid %d (uid %d, not root)", pid, uid)
            return False
        conn.setblocking(False)
        request = await asyncio.wait_for(loop.sock_recv(conn, 4096), TIMEOUT)
        if not request:
            return False  # a probe (predecessor_running): it just looked
        asked = json.loads(request)
        if asked.get("op") != "takeover":
            conn.send(json.dumps({"error": "expected a takeover request"}).encode())
            return False
        log.info("pid %d asks to take over: handing over the listening sockets", pid)
        sockets, facts = await self._give()
        try:
            conn.setblocking(True)
            conn.settimeout(TIMEOUT)
            await asyncio.to_thread(
                socket.send_fds,
                conn,
                [json.dumps({**facts, "pid": os.getpid()}).encode()],
                [s.fileno() for s in sockets],
            )
            conn.setblocking(False)
            confirmed = await asyncio.wait_for(loop.sock_recv(conn, 4096), TIMEOUT)
            ok = bool(json.loads(confirmed or b"{}").get("op") == "ok")
            if ok and asked.get("until_accepting"):
                log.info("pid %d has the listening sockets; serving until it accepts", pid)
                # No time limit: however long the successor takes to start,
                # we serve meanwhile; its exit closes the rendezvous.
                said = await loop.sock_recv(conn, 4096)
                ok = bool(json.loads(said or b"{}").get("op") == "accepting")
                if not ok:
                    log.error(
                        "pid %d took the listening sockets but stopped before accepting:"
                        " serving on",
                        pid,
                    )
        except (OSError, ValueError, TimeoutError) as exc:
            log.error("handover to pid %d failed (%s): serving on", pid, exc)
            ok = False
        finally:
            for sock in sockets:
                sock.close()  # our duplicates; the successor holds its own
        if ok:
            self._release()
        await self._settle(ok, pid)
        return ok

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._release()


async def take_over() -> Inherited | None:
    """Take the listening sockets of the agent running in this network
    namespace; None when none runs or the handover failed (then start on
    fresh sockets)."""
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


async def drain(
    proxy: ProxyServer,
    *,
    stop: asyncio.Event,
    successor: int | None,
    wait_for_stop: bool,
) -> None:
    """Handed over: the successor enforces the policy now. Let the
    connections the proxy relays end, then return (with ``wait_for_stop``,
    once ``stop`` is set too), leaving the kernel state to the successor."""
    log.info(
        "handed over to pid %s: no longer accepting; draining %d open connections",
        successor,
        len(proxy.connections),
    )
    grace_end: float | None = None
    while proxy.connections:
        if stop.is_set() and grace_end is None:
            grace_end = time.monotonic() + DRAIN_GRACE
            log.info(
                "stop requested: %d connections get %gs to end",
                len(proxy.connections),
                DRAIN_GRACE,
            )
        if grace_end is not None and time.monotonic() > grace_end:
            log.warning("closing %d connections still open after the grace", len(proxy.connections))
            break
        await asyncio.sleep(0.1)
    else:
        log.info("drained: every connection has ended")
    if wait_for_stop and not stop.is_set():
        await stop.wait()
    log.info("exiting after the handover; the kernel state stays with pid %s", successor)
