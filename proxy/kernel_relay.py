"""The kernel relay: once a plain connection is decided and what the proxy
held of it is forwarded, its bytes move socket to socket inside the kernel.

Each direction gets a pipe and moves bytes with splice(2): socket to pipe,
pipe to socket, ``SPLICE_F_MOVE | SPLICE_F_NONBLOCK``, driven by the event
loop's readers and writers on duplicates of the two sockets (the relay's
transports keep their own descriptors, paused). The bytes are never copied
into the process, and splice's return values count them exactly.

A direction is handed over only when nothing of it is left in the proxy:
the bytes the relay kept while the connection was decided (the client's held
first message, a server's early greeting) have been written, its side has
not ended yet, and for the client's direction the first bytes have been
sniffed for the audit record. Until then the proxy's relay (``relay``) moves
it, and a direction whose destination still has bytes queued in its
transport is handed over the moment that queue drains (the transport's
write-buffer limits are set to zero: its protocol hears ``resume_writing``
exactly then). So a server that speaks first, a client whose bytes were held,
or a CONNECT tunnel's ``200`` always arrive first and in order.

The semantics are the proxy relay's: an end of stream is passed on as a
half-close once what came before it is delivered; both ends passed, both
sockets close; a side that fails (a reset) ends the connection, its error
in the audit record; the byte counts and the activity time the idle sweep
reads grow as bytes are delivered. A pipe holds at most :data:`PIPE_SIZE`
bytes, and a direction reads nothing more while its pipe is not empty: a
slow reader holds the proxy to that much per direction.

Where splice cannot be used (``EINVAL`` from a socket kind it does not
support, or no descriptors left for the pipes), the direction goes back to
the proxy relay, with whatever its pipe held written first: the fallback is
automatic and counted by reason (:class:`RelayStats`, shown by ``status``
and ``/metrics``). ``proxy.relay: userspace`` turns the kernel relay off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from egress_agent.policy.model import RELAY_KERNEL
from egress_agent.proxy.relay import WRITE_HIGH_WATER, Half, describe

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection

log = logging.getLogger(__name__)

METHOD = "splice"
# Bytes a direction moves through the proxy relay before the kernel takes it
# over. Handing a connection over costs a few system calls (duplicates, a
# pipe, their registration and closing): for a short request and answer that
# is more than the copying it saves, and it would cut the rate of new
# connections; a bulk transfer crosses this in its first moments.
KERNEL_AFTER = 64 * 1024
# Bytes one direction holds in the kernel at most (its pipe's size): the
# back-pressure bound, as the proxy relay's write high-water mark is.
PIPE_SIZE = WRITE_HIGH_WATER
# Moves per readiness callback before the loop serves others.
ROUNDS = 16
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Descriptors a kernel-relayed connection holds besides the two sockets the
# proxy's caps count (see proxy.limits): two socket duplicates, two pipes.
EXTRA_FDS = 6
# A fallback for want of descriptors, by this name.
NO_DESCRIPTORS = "descriptors"
# A connection one of whose sides is a TLS session the proxy holds (a
# gateway reached over TLS): its socket carries records, not the relayed
# bytes, and splicing it would move bytes past the encryption.
TLS_SIDE = "tls"
# The splice call itself: a seam that tests replace to force the fallback.
splice = os.splice


@dataclass(kw_only=True)
class RelayStats:
    """What ``status`` and ``/metrics`` show about the relays: connections
    relayed (each counted once, when its relay starts), those of them at
    least one of whose directions the kernel moved, and why a direction went
    back to the proxy relay."""

    started: int = 0
    kernel: int = 0
    open: int = 0  # kernel relays running now (holding their pipes)
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def userspace(self) -> int:
        return self.started - self.kernel

    def snapshot(self, *, mode: str) -> dict[str, object]:
        return {
            "mode": mode,
            "method": METHOD if mode == RELAY_KERNEL else None,
            "connections": {"kernel": self.kernel, "userspace": self.userspace},
            "kernel_open": self.open,
            "fallbacks": dict(sorted(self.fallbacks.items())),
        }


def start(conn: Connection, stats: RelayStats) -> None:
    """The proxy relay of ``conn`` is wired: hand each direction to the
    kernel once it has moved :data:`KERNEL_AFTER` bytes (counting what was
    replayed) and nothing of it is left in the proxy."""
    stats.started += 1
    if conn.policy.proxy.relay != RELAY_KERNEL:
        return
    upstream = conn.upstream
    assert upstream is not None
    if not (_plain(conn.client) and _plain(upstream)):
        stats.fallbacks[TLS_SIDE] = stats.fallbacks.get(TLS_SIDE, 0) + 1
        return
    for source, sent in ((upstream, conn.bytes_down), (conn.client, conn.bytes_up)):
        if sent >= KERNEL_AFTER:
            want(conn, source, stats)
        else:
            source.kernel_after = KERNEL_AFTER


def _plain(half: Half) -> bool:
    """Whether ``half``'s transport writes its bytes to its socket as they
    are (not through a TLS session of the proxy's own)."""
    transport = half.transport
    return transport is not None and transport.get_extra_info("sslcontext") is None


def want(conn: Connection, source: Half, stats: RelayStats) -> None:
    """Hand ``source``'s direction to the kernel as soon as nothing of it is
    left in the proxy."""
    if not (_plain(conn.client) and conn.upstream is not None and _plain(conn.upstream)):
        return
    relay = conn.kernel
    if relay is None:
        relay = conn.kernel = KernelRelay(conn, stats)
    direction = relay.down if source.upstream else relay.up
    direction.wanted = True
    direction.try_take_over()


class KernelRelay:
    """The two directions of one connection and the socket duplicates
    their splices use."""

    def __init__(self, conn: Connection, stats: RelayStats) -> None:
        assert conn.upstream is not None
        self.conn = conn
        self.stats = stats
        self.loop = conn.loop
        self.up: _Direction = _Direction(self, conn.client, conn.upstream, up=True)
        self.down: _Direction = _Direction(self, conn.upstream, conn.client, up=False)
        self._socks: dict[bool, socket.socket] = {}  # by "is upstream"
        self.counted = False  # in stats.kernel: the kernel moved bytes or an end
        self.holding = False  # in stats.open: pipes and duplicates made
        self.stopped = False

    def sock(self, half: Half) -> socket.socket:
        """A duplicate of ``half``'s socket (made once): the event loop
        refuses readers on a descriptor a transport owns."""
        dup = self._socks.get(half.upstream)
        if dup is None:
            assert half.transport is not None
            original = half.transport.get_extra_info("socket")
            dup = socket.socket(fileno=os.dup(original.fileno()))
            self._socks[half.upstream] = dup
        return dup

    @property
    def kind(self) -> str:
        """Who moves the bytes, as ``/flows`` shows it."""
        up, down = self.up.in_kernel, self.down.in_kernel
        if up and down:
            return "kernel"
        if up or down:
            return f"kernel {'up' if up else 'down'}, userspace {'down' if up else 'up'}"
        return "userspace"

    def sniffed(self) -> None:
        """The client's first bytes are known: its direction may go (once
        the proxy relay has written them, hence not now)."""
        if self.up.wanted:
            self.loop.call_soon(self.up.try_take_over)

    def drained(self, half: Half) -> bool:
        """``half``'s transport has written all it held; True when the
        kernel moves the bytes into it, so its source stays paused."""
        direction = self.up if half is self.up.dst else self.down
        if direction.state == _DRAINING:
            direction.begin()
            return direction.in_kernel
        return direction.in_kernel

    def fds_left(self) -> bool:
        """Whether the descriptors a kernel relay adds fit below the limit
        the proxy's caps leave for relayed connections (the caps count two
        per connection, see ``ProxyServer.admit``)."""
        server = self.conn.server
        in_use = server.admitted + server.upstreams + EXTRA_FDS * self.stats.open
        return in_use + EXTRA_FDS <= server.fd_room

    def took_over(self) -> None:
        if not self.counted:
            self.counted = True
            self.stats.kernel += 1

    def stop(self) -> None:
        """Stop moving bytes and let go of the pipes and duplicates (what
        the pipes held is dropped: the connection is being closed or
        aborted, as the proxy relay drops its write buffers)."""
        if self.stopped:
            return
        self.stopped = True
        for direction in (self.up, self.down):
            direction.release()
        for dup in self._socks.values():
            dup.close()
        self._socks.clear()
        if self.holding:
            self.stats.open -= 1

    def ended(self) -> None:
        """A direction passed its end of stream on: when both have, close."""
        conn = self.conn
        if conn.client.eof and conn.upstream is not None and conn.upstream.eof:
            conn.close_both()

    def failed(self, half: Half, exc: OSError) -> None:
        """``half``'s socket failed (a reset): end the connection as the
        proxy relay does when a transport is lost to an error."""
        conn = self.conn
        if conn.error is None:
            conn.error = f"{'upstream' if half.upstream else 'client'}: {describe(exc)}"
        self.stop()
        for side in (half, half.peer):
            if side is not None and side.transport is not None:
                side.transport.abort()


_PROXY, _DRAINING, _KERNEL, _DONE = "proxy", "draining", "kernel", "done"


class _Direction:
    """Bytes from ``src`` to ``dst`` through one pipe."""

    def __init__(self, relay: KernelRelay, src: Half, dst: Half, *, up: bool) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.up = up
        self.state = _PROXY
        self.pipe: tuple[int, int] | None = None
        self.capacity = PIPE_SIZE
        self.in_pipe = 0
        self.src_fd = -1
        self.dst_fd = -1
        self.reading = False
        self.writing = False
        self.src_eof = False
        self.wanted = False  # the source has sent enough (see KERNEL_AFTER)
        self.used = False  # the kernel moved bytes or an end of stream

    @property
    def in_kernel(self) -> bool:
        return self.state == _KERNEL or (self.state == _DONE and self.used)

    def try_take_over(self) -> None:
        """Hand this direction to the kernel now, or once what the proxy
        relay holds of it is written."""
        relay, src, dst = self.relay, self.src, self.dst
        if self.state != _PROXY or relay.stopped:
            return
        if src.eof or src.lost or dst.lost or src.transport is None or dst.transport is None:
            return  # ended already, or ending: the proxy relay finishes it
        if src.transport.is_closing() or dst.transport.is_closing():
            return
        conn = relay.conn
        if self.up and conn.sniff_buf is not None:
            if conn.sniff_buf:
                conn.sniff_more(b"")  # what arrived with the decision
            if conn.sniff_buf is not None:
                return  # the first bytes are not known yet: Connection.sniff_more calls back
        src.transport.pause_reading()
        self.state = _DRAINING
        # The destination's protocol hears resume_writing when its write
        # buffer is empty (at once pause_writing if it is not): see drained().
        dst.transport.set_write_buffer_limits(high=0, low=0)
        if dst.transport.get_write_buffer_size() == 0:
            self.begin()

    def begin(self) -> None:
        """Nothing of this direction is left in the proxy: splice from now on."""
        relay, src, dst = self.relay, self.src, self.dst
        if self.state != _DRAINING:
            return
        if relay.stopped or src.lost or dst.lost:
            self.state = _DONE
            return
        if not relay.holding and not relay.fds_left():
            self._give_back(None)
            return
        try:
            self.src_fd = relay.sock(src).fileno()
            self.dst_fd = relay.sock(dst).fileno()
            self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._give_back(exc)
            return
        try:
            self.capacity = fcntl.fcntl(self.pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Above fs.pipe-max-size or the user's pipe pages: keep the default.
            self.capacity = fcntl.fcntl(self.pipe[1], fcntl.F_GETPIPE_SZ)
        self.state = _KERNEL
        if not relay.holding:
            relay.holding = True
            relay.stats.open += 1
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        if on and not self.reading:
            self.relay.loop.add_reader(self.src_fd, self._readable)
        elif not on and self.reading:
            self.relay.loop.remove_reader(self.src_fd)
        self.reading = on

    def _want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.relay.loop.add_writer(self.dst_fd, self._writable)
        elif not on and self.writing:
            self.relay.loop.remove_writer(self.dst_fd)
        self.writing = on

    def _readable(self) -> None:
        if self.pipe is None:
            # Released while this call was due: the descriptor numbers may
            # belong to another connection already.
            return
        for _ in range(ROUNDS):
            try:
                n = splice(self.src_fd, self.pipe[1], self.capacity, flags=_FLAGS)
            except BlockingIOError:
                return  # a wake-up with nothing to read
            except OSError as exc:
                if exc.errno == errno.EINVAL and not self.used:
                    self._give_back(exc)
                else:
                    self.relay.failed(self.src, exc)
                return
            assert self.pipe is not None
            if n == 0:
                self.src_eof = True
                self._want_read(False)
                self._flush()
                return
            self.in_pipe += n
            if not self._flush():
                return

    def _writable(self) -> None:
        if self.pipe is None:
            return  # released while this call was due (see _readable)
        if self._flush() and self.state == _KERNEL and not self.src_eof:
            self._readable()

    def _flush(self) -> bool:
        """Write what the pipe holds; True when it is empty. Reads wait
        while it is not (the back-pressure); at the end of stream, pass it on."""
        assert self.pipe is not None
        conn = self.relay.conn
        while self.in_pipe:
            try:
                n = splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._want_read(False)
                self._want_write(True)
                return False
            except OSError as exc:
                if exc.errno == errno.EINVAL and not self.used:
                    self._give_back(exc)
                else:
                    self.relay.failed(self.dst, exc)
                return False
            self._use()
            self.in_pipe -= n
            if self.up:
                conn.bytes_up += n
            else:
                conn.bytes_down += n
            conn.last_activity = self.relay.loop.time()
        self._want_write(False)
        if self.src_eof:
            self._pass_eof()
            return False
        self._want_read(True)
        return True

    def _pass_eof(self) -> None:
        """The source ended and all it sent is delivered: half-close the
        destination's sending side, as the proxy relay's ``pass_eof``."""
        self._use()
        with contextlib.suppress(OSError):  # gone already: its own side reports that
            self.relay.sock(self.dst).shutdown(socket.SHUT_WR)
        self.release()
        self.state = _DONE
        self.src.eof = True
        self.relay.conn.last_activity = self.relay.loop.time()
        self.relay.ended()

    def _use(self) -> None:
        if not self.used:
            self.used = True
            self.relay.took_over()

    def release(self) -> None:
        """Let go of the readers, writers and the pipe."""
        if self.reading or self.writing:
            self._want_read(False)
            self._want_write(False)
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
        if self.state in (_KERNEL, _DRAINING):
            self.state = _DONE

    def _give_back(self, exc: OSError | None) -> None:
        """The kernel cannot move this direction (``exc``; None: no
        descriptors to spare): the proxy relay does, starting with what the
        pipe holds."""
        relay, src, dst = self.relay, self.src, self.dst
        if exc is None:
            reason = NO_DESCRIPTORS
        else:
            reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        relay.stats.fallbacks[reason] = relay.stats.fallbacks.get(reason, 0) + 1
        log.debug(
            "kernel relay not used for %s: %s",
            relay.conn.id,
            "no descriptors to spare" if exc is None else describe(exc),
        )
        held = bytearray()
        if self.pipe is not None:
            while self.in_pipe:
                chunk = os.read(self.pipe[0], self.in_pipe)
                if not chunk:
                    break
                held += chunk
                self.in_pipe -= len(chunk)
        self.release()
        self.state = _DONE
        assert src.transport is not None and dst.transport is not None
        dst.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if held:
            if self.up:
                relay.conn.bytes_up += len(held)
            else:
                relay.conn.bytes_down += len(held)
            dst.transport.write(bytes(held))
        if dst.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            src.transport.resume_reading()
