"""Hand the proxy's listening sockets from a running agent to its successor.

Restarting the agent (an upgrade, a new DaemonSet pod) must neither refuse
new connections nor cut the ones being relayed, and must not leave the node
unenforced in between. So a starting agent first asks a running one for its
listening sockets; the running one passes them over (``SCM_RIGHTS``, see
unix(7)), stops accepting, keeps relaying what it holds until those
connections end, and leaves the kernel state (table, addresses) in place for
its successor, which installs its own ruleset over it in one transaction.
The listening sockets never close, so connections arriving during the switch
wait in their accept queue instead of being refused.

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

log = logging.getLogger(__name__)

HANDOVER_NAME = b"\0egress-agent/handover"
MAX_SOCKETS = 16
TIMEOUT = 10.0
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandoverError(Exception):
    """The running agent answered but the handover did not complete."""


@dataclass(frozen=True, kw_only=True)
class Inherited:
    """What a predecessor handed over: its listening sockets and who it was."""

    sockets: list[socket.socket] = field(default_factory=list)
    pid: int = 0
    generation: int = 0


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
    sockets. None when no agent runs here. Blocking: run it off the loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        sock.send(json.dumps({"op": "takeover", "pid": os.getpid()}).encode())
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
        return Inherited(
            sockets=inherited,
            pid=int(answer.get("pid", 0)),
            generation=int(answer.get("generation", 0)),
        )
    except (OSError, TimeoutError) as exc:
        raise HandoverError(f"the handover from the running agent failed: {exc}") from exc
    finally:
        sock.close()


Give = Callable[[], Awaitable[tuple[list[socket.socket], dict[str, Any]]]]
Settle = Callable[[bool, int], Awaitable[None]]


class HandoverServer:
    """Answers a successor's takeover request, once.

    ``give`` returns the listening sockets and facts to send; ``settle`` is
    told whether the successor confirmed (True: stop accepting and drain;
    False: keep serving as before) and the successor's pid.
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
        if json.loads(request).get("op") != "takeover":
            conn.send(json.dumps({"error": "expected a takeover request"}).encode())
            return False
        log.info("pid %d asks to take over: handing over the listening sockets", pid)
        sockets, facts = await self._give()
        conn.setblocking(True)
        conn.settimeout(TIMEOUT)
        try:
            await asyncio.to_thread(
                socket.send_fds,
                conn,
                [json.dumps({**facts, "pid": os.getpid()}).encode()],
                [s.fileno() for s in sockets],
            )
            confirmed = json.loads(await asyncio.to_thread(conn.recv, 4096) or b"{}")
            ok = bool(confirmed.get("op") == "ok")
        except (OSError, ValueError) as exc:
            log.error("handover to pid %d failed (%s): serving on", pid, exc)
            ok = False
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
