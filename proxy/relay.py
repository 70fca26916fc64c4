"""The raw relay: two asyncio protocols, one per side, wired to each other.

Bytes go from one transport's ``data_received`` straight into the other's
``write`` with ``pause_reading``/``resume_reading`` as back-pressure, which is
several times cheaper per chunk than stream readers and writers, and each
side's end of stream is passed on as a half-close.

Until the connection is decided the two sides are not wired: what each sends
is kept (see :class:`Half`) and replayed, in order, when they are
(:func:`start_relay`; :func:`wire_downstream` first for a connection made
early whose client is still held).
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from egress_agent.proxy.connection import Connection

# Write-buffer high-water mark per direction before the other side is paused.
WRITE_HIGH_WATER = 256 * 1024


class Half(asyncio.Protocol):
    """One side of a relayed connection; forwards what it reads to its peer.

    Until the relay is wired (``peer`` set), nothing is forwarded: the client
    side's bytes are kept for the peek and replayed upstream, and the upstream
    side's bytes, end of stream and loss are kept for the client. A server that
    speaks first (SMTP's greeting, SSH's banner) may send them before the
    proxy has finished connecting; they must reach the client, never go back
    upstream. :func:`start_relay` replays what was kept, in order.
    """

    # Bytes this side has sent after which the kernel takes its direction
    # over (see ``kernel_relay``); None: the proxy relays it to the end.
    kernel_after: int | None = None

    def __init__(self, conn: Connection, *, upstream: bool) -> None:
        self.conn = conn
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.eof = False
        self.lost = False
        self.reset = False  # lost by an error (a reset), not an orderly close
        # Upstream side only: what arrived before the relay was wired.
        self.early = bytearray()
        self.paused_early = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.upstream:
            self.conn.accepted(self.transport)

    def data_received(self, data: bytes) -> None:
        self.conn.last_activity = self.conn.loop.time()
        peer = self.peer
        if peer is None or peer.transport is None:
            if self.upstream:
                self._keep_early(data)
            else:
                # Still deciding: keep the bytes for the peek and for replay upstream.
                self.conn.buffer_client_bytes(data)
            return
        if self.upstream:
            self.conn.bytes_down += len(data)
            sent = self.conn.bytes_down
        else:
            self.conn.bytes_up += len(data)
            sent = self.conn.bytes_up
            if self.conn.sniff_buf is not None:
                self.conn.sniff_more(data)
        peer.transport.write(data)
        if self.kernel_after is not None and sent >= self.kernel_after:
            self.kernel_after = None
            self.conn.to_kernel(self)

    def _keep_early(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= WRITE_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.paused_early = True

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            if not self.upstream:
                self.conn.client_eof_while_deciding()
            return True  # replayed when the relay is wired
        self.pass_eof()
        return True  # keep our sending side open: half-close

    def pass_eof(self) -> None:
        """Our end of stream, to the peer: half-close its sending side."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if not peer.transport.is_closing():
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                # A TLS session of the proxy's own (a gateway reached over
                # TLS) carries no half-close: end it once what it holds is
                # sent, or both ends would wait for each other.
                peer.transport.close()
        if peer.eof and not self.conn.holding:
            # Both ways are done; not while the client's bytes are still held.
            self.conn.close_both()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.conn.kernel is not None:
            self.conn.kernel.stop()
        self.reset = exc is not None
        if self.upstream:
            self.conn.server.upstreams -= 1
        if exc is not None and self.conn.error is None:
            side = "upstream" if self.upstream else "client"
            self.conn.error = f"{side}: {describe(exc)}"
        peer = self.peer
        if peer is not None and peer.transport is not None:
            self.pass_loss()
        self.conn.half_lost()

    def pass_loss(self) -> None:
        """We are gone: close the peer (after what it still has to send), or
        reset it if we were reset."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.lost:
            return
        if self.reset:
            peer.transport.abort()  # pass a reset on
        else:
            peer.transport.close()

    def _source(self) -> Half | None:
        """The side whose bytes we are writing: our peer, or, while the
        client's bytes are held and only the server's flow, the upstream."""
        if self.peer is not None:
            return self.peer
        return self.conn.upstream if not self.upstream else None

    def pause_writing(self) -> None:
        source = self._source()
        if source is not None and source.transport is not None:
            source.transport.pause_reading()

    def resume_writing(self) -> None:
        kernel = self.conn.kernel
        if kernel is not None and kernel.drained(self):
            return  # the kernel moves this direction now: its source stays paused
        source = self._source()
        if source is not None and source.transport is not None:
            source.transport.resume_reading()


def wire_downstream(conn: Connection) -> None:
    """From now on the server's bytes go straight to the client (also
    what it sent, and its end, while the connection was being made);
    the client's bytes stay held until :func:`start_relay`."""
    upstream, client = conn.upstream, conn.client
    assert upstream is not None and upstream.transport is not None
    assert client.transport is not None
    upstream.peer = client
    conn.downstream_wired = True
    if upstream.early:
        replay_early(conn, upstream, client)
    if upstream.eof:
        upstream.pass_eof()
    if upstream.lost:
        upstream.pass_loss()
        return
    if upstream.paused_early:
        upstream.paused_early = False
        if client.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            upstream.transport.resume_reading()


def replay_early(conn: Connection, upstream: Half, client: Half) -> None:
    """Send the client what the server sent before the relay was wired."""
    assert client.transport is not None
    data = bytes(upstream.early)
    upstream.early.clear()
    conn.bytes_down += len(data)
    client.transport.write(data)


def start_relay(conn: Connection) -> None:
    """Wire the two sides together and replay what each side sent while
    the connection was decided: data first (both ways), then ends of
    stream, then a loss. A server that spoke first (a greeting) and even
    closed already still gets its bytes to the client. Then the kernel
    may take the relay over (see ``kernel_relay``)."""
    _wire(conn)
    conn.relay_started()


def _wire(conn: Connection) -> None:
    client, upstream = conn.client, conn.upstream
    assert upstream is not None and upstream.transport is not None
    assert client.transport is not None
    client.peer, upstream.peer = upstream, client
    if conn.buffer and not upstream.lost:
        data = bytes(conn.buffer)  # already in sniff_buf, if sniffing
        conn.bytes_up += len(data)
        upstream.transport.write(data)
    conn.buffer.clear()
    # Connected early, the server's side was wired already (its bytes,
    # end and loss passed on): see wire_downstream.
    wired = conn.downstream_wired
    if upstream.early and not wired:
        replay_early(conn, upstream, client)
    if conn.client_eof:
        client.pass_eof()
    if upstream.eof and not wired:
        upstream.pass_eof()
    if upstream.lost:
        if not wired:
            upstream.pass_loss()
        return
    if upstream.paused_early and not wired:
        upstream.paused_early = False
        if client.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            upstream.transport.resume_reading()
        # else: the client side's resume_writing resumes it once drained
    if not conn.client_eof and upstream.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
        client.transport.resume_reading()
    # else: the replay filled the upstream write buffer (its pause_writing
    # paused the client already); the upstream side's resume_writing
    # resumes the client once it drains. Resuming here would let the
    # client fill it without bound: the transport reports crossing the
    # high-water mark only once.


def describe(exc: BaseException) -> str:
    """A socket error as audit records and logs show it: its errno's name
    and text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return str(exc) or type(exc).__name__
