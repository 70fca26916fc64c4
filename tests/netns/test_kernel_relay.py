"""The kernel relay (splice) moves a decided connection's bytes exactly as
the proxy's own relay does: every byte, in order, counted exactly in the
audit record, half-closes passed on both ways, a reader that does not read
holding the proxy to one pipe, the flow's counters growing while it is
open -- and when splice cannot be used, the proxy relay takes over by itself.

Judged from the ends: what the test's server received and sent, what the
client received, the audit record written; and the proxy's relay counters
(what ``status`` shows) to know which relay moved the bytes.

Like ``test_relay_interleavings``: a real proxy on loopback, its
``original_dst`` pointed at the test's server. Needs root for the upstream
socket mark (SO_MARK needs CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_agent.policy.load import parse_policy
from egress_agent.proxy import connection as proxy_connection
from egress_agent.proxy import kernel_relay
from egress_agent.proxy import server as proxy_server
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.flows import open_flows
from egress_agent.proxy.original_dst import Endpoint
from tests.netns import test_relay_interleavings as interleavings
from tests.netns.test_relay_interleavings import wiring  # noqa: F401 (a fixture)

pytestmark = pytest.mark.netns

POLICY = """
version: 1
proxy: {{port: {port}, address_v4: 127.0.0.1, address_v6: "::1", relay: {relay}}}
workloads: {{lo: {{cidrs: [127.0.0.0/8]}}}}
egress:
  - {{name: lo-allowed, from: [lo], to: {{cidrs: [127.0.0.0/8]}}, action: allow}}
default: deny
"""

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Run:
    """A proxy on loopback in front of one test server (``serve``)."""

    def __init__(self, tmp: Path, serve: Serve, *, relay: str = "kernel") -> None:
        self.tmp = tmp
        self.serve = serve
        self.relay = relay
        self.audit_path = tmp / "audit.jsonl"
        self.port = 0

    async def __aenter__(self) -> Run:
        self.upstream = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        server_port = self.upstream.sockets[0].getsockname()[1]
        self.audit_path.unlink(missing_ok=True)
        self.audit = AuditLog(str(self.audit_path))
        self.port = _free_port()
        policy = parse_policy(POLICY.format(port=self.port, relay=self.relay))
        self.proxy = proxy_server.ProxyServer(policy=policy, audit=self.audit)

        def test_server(sock: socket.socket) -> Endpoint:
            return Endpoint(address=ipaddress.ip_address("127.0.0.1"), port=server_port)

        self._saved = proxy_connection.original_dst
        proxy_connection.original_dst = test_server  # type: ignore[assignment]
        await self.proxy.start()
        return self

    async def ended(self) -> None:
        """Until the proxy has written the record of every connection."""
        for _ in range(1000):
            if not self.proxy.connections:
                self.audit.flush()  # records are written in groups, per loop turn
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.proxy.connections)} connections still open")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def __aexit__(self, *exc: object) -> None:
        proxy_connection.original_dst = self._saved
        await self.proxy.close()
        self.audit.close()
        self.upstream.close()
        await self.upstream.wait_closed()


def _pattern(n: int, seed: int) -> bytes:
    block = bytes((seed + i * 7) % 251 for i in range(65521))
    return (block * (n // len(block) + 1))[:n]


async def _exchange(
    tmp: Path, up: int, down: int, relay: str, *, fd_room: int | None = None
) -> tuple[Run, dict[str, bytes]]:
    """The client sends ``up`` bytes and ends; the server reads them all,
    then sends ``down`` bytes and ends (after the client's end: both
    half-closes pass)."""
    seen: dict[str, bytes] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["server"] = await reader.read()  # to the client's end of stream
        writer.write(_pattern(down, 3))
        await writer.drain()
        writer.write_eof()
        writer.close()

    async with Run(tmp, serve, relay=relay) as run:
        if fd_room is not None:
            run.proxy.fd_room = fd_room
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        writer.write(_pattern(up, 1))
        await writer.drain()
        writer.write_eof()
        seen["client"] = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        await run.ended()
    return run, seen


@pytest.fixture
def at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel takes each direction over as soon as the relay is wired,
    not after its first KERNEL_AFTER bytes: every byte goes through it."""
    monkeypatch.setattr(kernel_relay, "KERNEL_AFTER", 0)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    ("up", "down"), [(1, 1), (65536, 65536), (16 << 20, 1), (1, 16 << 20)], ids=str
)
def test_exact_bytes_and_counts(
    require_root: None, at_once: None, tmp_path: Path, loop: str, up: int, down: int
) -> None:
    run, seen = LOOPS[loop](_exchange(tmp_path, up, down, "kernel"))
    assert seen["server"] == _pattern(up, 1)
    assert seen["client"] == _pattern(down, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (up, down), record
    assert record["event"] == "closed" and record["error"] is None, record
    stats = run.proxy.relays
    assert (stats.kernel, stats.userspace, stats.open, stats.fallbacks) == (1, 0, 0, {})


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(("up", "down", "kernel"), [(1000, 5000, 0), (3000, 16 << 20, 1)], ids=str)
def test_short_exchanges_stay_with_the_proxy_relay(
    require_root: None, tmp_path: Path, loop: str, up: int, down: int, kernel: int
) -> None:
    """A direction goes to the kernel after its first KERNEL_AFTER bytes: a
    short exchange never pays for the handover, a bulk one does, and the
    counts are exact either way."""
    run, seen = LOOPS[loop](_exchange(tmp_path, up, down, "kernel"))
    assert seen["server"] == _pattern(up, 1) and seen["client"] == _pattern(down, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (up, down), record
    stats = run.proxy.relays
    assert (stats.kernel, stats.userspace, stats.open) == (kernel, 1 - kernel, 0)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_userspace_setting_keeps_the_proxy_relay(
    require_root: None, tmp_path: Path, loop: str
) -> None:
    run, seen = LOOPS[loop](_exchange(tmp_path, 1 << 20, 1 << 20, "userspace"))
    assert seen["server"] == _pattern(1 << 20, 1) and seen["client"] == _pattern(1 << 20, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (1 << 20, 1 << 20)
    assert (run.proxy.relays.kernel, run.proxy.relays.userspace) == (0, 1)
    assert run.proxy.relays.snapshot(mode="userspace")["method"] is None


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_splice_refused_falls_back_to_the_proxy_relay(
    require_root: None, tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket splice does not support (EINVAL): the proxy relays the bytes
    itself, every one of them, and counts the fallback."""

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(kernel_relay, "splice", refuse)
    run, seen = LOOPS[loop](_exchange(tmp_path, 4 << 20, 3 << 20, "kernel"))
    assert seen["server"] == _pattern(4 << 20, 1) and seen["client"] == _pattern(3 << 20, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (4 << 20, 3 << 20), record
    assert record["event"] == "closed" and record["error"] is None, record
    stats = run.proxy.relays
    assert (stats.kernel, stats.userspace) == (0, 1)
    assert stats.fallbacks == {"EINVAL": 2}  # one per direction


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_no_descriptors_to_spare_falls_back(require_root: None, tmp_path: Path, loop: str) -> None:
    """The descriptor limit leaves room for the connection's two sockets
    (and a few), not for the kernel relay's six more: the proxy relays it."""
    run, seen = LOOPS[loop](_exchange(tmp_path, 1 << 20, 1 << 20, "kernel", fd_room=7))
    assert seen["server"] == _pattern(1 << 20, 1) and seen["client"] == _pattern(1 << 20, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (1 << 20, 1 << 20), record
    stats = run.proxy.relays
    assert (stats.kernel, stats.userspace) == (0, 1)
    assert stats.fallbacks == {kernel_relay.NO_DESCRIPTORS: 2}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_fallback_after_bytes_moved_keeps_them(
    require_root: None, tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """splice fails on writing out of the pipe, with bytes in it: those are
    written by the proxy relay first, then the rest."""
    real = kernel_relay.splice
    pipes_out: set[int] = set()

    def refuse_writes(src: int, dst: int, count: int, **kwargs: Any) -> int:
        if src in pipes_out:
            raise OSError(errno.EINVAL, "Invalid argument")
        n = real(src, dst, count, **kwargs)
        return n

    begin = kernel_relay._Direction.begin

    def remember(self: kernel_relay._Direction) -> None:
        begin(self)
        if self.pipe is not None:
            pipes_out.add(self.pipe[0])

    monkeypatch.setattr(kernel_relay, "splice", refuse_writes)
    monkeypatch.setattr(kernel_relay._Direction, "begin", remember)
    run, seen = LOOPS[loop](_exchange(tmp_path, 2 << 20, 2 << 20, "kernel"))
    assert seen["server"] == _pattern(2 << 20, 1) and seen["client"] == _pattern(2 << 20, 3)
    [record] = run.records()
    assert (record["bytes_up"], record["bytes_down"]) == (2 << 20, 2 << 20), record
    assert run.proxy.relays.fallbacks == {"EINVAL": 2}


async def _half_close(tmp: Path, *, server_ends_first: bool) -> tuple[Run, dict[str, Any]]:
    """One side ends its sending; the other keeps sending after it has seen
    that end, then ends too. Both reads see everything, then the end."""
    got: dict[str, Any] = {}
    first, later = _pattern(300_000, 5), _pattern(700_000, 9)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server_ends_first:
            writer.write(first)
            writer.write_eof()
            got["server"] = await reader.read()
        else:
            got["server"] = await reader.read()
            writer.write(later)
            writer.write_eof()
        await writer.drain()
        writer.close()

    async with Run(tmp, serve) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        if server_ends_first:
            got["client"] = await asyncio.wait_for(reader.read(), 30)
            got["flows"] = open_flows(run.proxy.connections, now=run.proxy.loop.time())
            writer.write(later)
            writer.write_eof()
            await writer.drain()
        else:
            writer.write(first)
            writer.write_eof()
            await writer.drain()
            got["client"] = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await run.ended()
    return run, got


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("server_ends_first", [False, True])
def test_half_close_passes_both_ways(
    require_root: None, tmp_path: Path, loop: str, server_ends_first: bool
) -> None:
    run, got = LOOPS[loop](_half_close(tmp_path, server_ends_first=server_ends_first))
    first, later = _pattern(300_000, 5), _pattern(700_000, 9)
    if server_ends_first:
        assert got["client"] == first and got["server"] == later
        # After the server's end the connection is open: the kernel moved the
        # server's bytes; the client's direction waits for its first bytes
        # (sniffed for the audit record) before the kernel takes it.
        [flow] = got["flows"]
        assert flow["relay"] == "kernel down, userspace up", flow
        assert flow["bytes_down"] == len(first), flow
    else:
        assert got["server"] == first and got["client"] == later
    [record] = run.records()
    up, down = (len(later), len(first)) if server_ends_first else (len(first), len(later))
    assert (record["bytes_up"], record["bytes_down"], record["event"]) == (up, down, "closed")
    assert run.proxy.relays.kernel == 1


async def _slow_reader(tmp: Path) -> dict[str, Any]:
    """A client floods a server that does not read for a while; the proxy
    holds at most a pipe of it; once the server reads, all of it arrives and
    the flow's counter has grown on the way."""
    total = 64 << 20
    reading = asyncio.Event()
    got: dict[str, Any] = {"held": 0, "counts": []}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        n = 0
        while chunk := await reader.read(1 << 20):
            n += len(chunk)
        got["server"] = n
        writer.close()

    async with Run(tmp, serve) as run:
        _, writer = await asyncio.open_connection("127.0.0.1", run.port)
        chunk = b"y" * (1 << 20)

        async def flood() -> None:
            for _ in range(total >> 20):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        flooding = asyncio.create_task(flood())
        for _ in range(100):  # one second of a server that does not read
            await asyncio.sleep(0.01)
            for conn in run.proxy.connections:
                if conn.kernel is not None:
                    got["held"] = max(got["held"], conn.kernel.up.in_pipe)
                if conn.upstream is not None and conn.upstream.transport is not None:
                    size = conn.upstream.transport.get_write_buffer_size()
                    got["held"] = max(got["held"], size)
        reading.set()
        while not flooding.done():
            await asyncio.sleep(0.02)
            flows = open_flows(run.proxy.connections, now=run.proxy.loop.time())
            got["counts"] += [f["bytes_up"] for f in flows]
        await asyncio.wait_for(flooding, 60)
        writer.close()
        await run.ended()
        got["record"] = run.records()[0]
        got["kernel"] = run.proxy.relays.kernel
    return got


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_slow_reader_holds_the_proxy_to_one_pipe(
    require_root: None, tmp_path: Path, loop: str
) -> None:
    got = LOOPS[loop](_slow_reader(tmp_path))
    assert got["kernel"] == 1
    assert 0 < got["held"] <= kernel_relay.PIPE_SIZE, got["held"]
    assert got["server"] == 64 << 20
    assert got["record"]["bytes_up"] == 64 << 20
    counts = got["counts"]
    assert len(set(counts)) > 2 and counts == sorted(counts), counts[:20]


async def _reset(tmp: Path) -> dict[str, Any]:
    """The server resets the connection in the middle of the kernel relay:
    the client's connection ends too, and the record names the side."""
    got: dict[str, Any] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1000)
        writer.write(b"Z" * 5000)
        await writer.drain()
        await asyncio.sleep(0.2)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.transport.abort()

    async with Run(tmp, serve) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        writer.write(b"a" * 1000)
        await writer.drain()
        received = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                received += chunk
            got["ended"] = "eof"
        except ConnectionError:
            got["ended"] = "reset"
        got["received"] = len(received)
        writer.close()
        await run.ended()
        got["record"] = run.records()[0]
        got["kernel"] = run.proxy.relays.kernel
    return got


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_reset_ends_both_sides(
    require_root: None, at_once: None, tmp_path: Path, loop: str
) -> None:
    got = LOOPS[loop](_reset(tmp_path))
    assert got["kernel"] == 1
    assert got["received"] == 5000 and got["ended"] in ("eof", "reset")
    record = got["record"]
    assert record["error"] == "upstream: ECONNRESET (Connection reset by peer)", record
    assert (record["bytes_up"], record["bytes_down"]) == (1000, 5000), record


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy_kind", ["cidr", "name"])
@given(
    client_script=interleavings.scripts(speaks_first=False),
    server_script=interleavings.scripts(speaks_first=True),
    delay=st.sampled_from([0.0, 0.005, 0.05]),
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_every_interleaving_through_the_kernel_at_once(
    require_root: None,
    at_once: None,
    wiring: interleavings.Wiring,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    policy_kind: str,
    client_script: interleavings.Script,
    server_script: interleavings.Script,
    delay: float,
) -> None:
    """The relay interleavings (whoever speaks first, early greetings,
    half-close, close, reset, wiring delays), with the kernel taking each
    direction over the moment nothing of it is left in the proxy."""
    wiring.delay = delay
    client, server, records = uvloop.run(
        interleavings._scenario(tmp_path, policy_kind, client_script, server_script, wiring)
    )
    interleavings._check(client, server, records, client_script, server_script)
