"""The relay delivers every byte to the side it was meant for, whoever speaks
first and whatever the interleaving of connect, first bytes, half-close and
reset: hypothesis drives a real client and a real server through the real
proxy on loopback.

The proxy's seam for tests is ``original_dst``: here it names the test's own
server instead of reading SO_ORIGINAL_DST (nothing is NAT-ed on loopback).
A wiring delay after the upstream connect widens the window in which a
server that speaks first (SMTP, SSH) sends, half-closes or closes before
the relay is wired: the window where its bytes once went back upstream.

Client bytes are lower-case letters, server bytes upper-case: a byte that
comes back to the side that sent it shows up as a foreign letter.
Needs root only for the upstream socket mark (SO_MARK needs CAP_NET_ADMIN);
everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_agent.policy.load import parse_policy
from egress_agent.proxy import connection as proxy_connection
from egress_agent.proxy import relay as proxy_relay
from egress_agent.proxy import server as proxy_server
from egress_agent.proxy.audit import AuditLog
from egress_agent.proxy.original_dst import Endpoint

pytestmark = pytest.mark.netns

End = Literal["eof", "close", "reset"]
Step = tuple[Literal["send"], int] | tuple[Literal["pause"], float]


@dataclass(frozen=True)
class Script:
    """What one side does: sends and pauses in order, then ends."""

    steps: tuple[Step, ...]
    end: End


@dataclass
class Side:
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    ended: str = "open"  # how its reading ended: "eof" or "reset"


def scripts(*, speaks_first: bool) -> st.SearchStrategy[Script]:
    step = st.one_of(
        st.tuples(st.just("send"), st.integers(1, 70_000)),
        st.tuples(st.just("pause"), st.sampled_from([0.0, 0.001, 0.01, 0.05])),
    )
    steps = st.lists(step, max_size=5)
    if speaks_first:
        steps = st.builds(lambda n, rest: [("send", n), *rest], st.integers(1, 600), steps)
    return st.builds(
        lambda s, end: Script(steps=tuple(s), end=end),
        steps,
        st.sampled_from(["eof", "eof", "close", "reset"]),
    )


def _payload(n: int, offset: int, alphabet: bytes) -> bytes:
    return bytes(alphabet[(offset + i) % len(alphabet)] for i in range(n))


CLIENT_BYTES = b"abcdefghijklmnopqrstuvwxyz"
SERVER_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


async def _play(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    script: Script,
    side: Side,
    alphabet: bytes,
) -> None:
    async def read_all() -> None:
        try:
            while chunk := await reader.read(65536):
                side.received += chunk
            side.ended = "eof"
        except ConnectionError:
            side.ended = "reset"

    reading = asyncio.create_task(read_all())
    try:
        for kind, value in script.steps:
            if kind == "send":
                data = _payload(int(value), len(side.sent), alphabet)
                side.sent += data
                writer.write(data)
                await writer.drain()
            else:
                await asyncio.sleep(value)
        if script.end == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            reading.cancel()
            return
        if script.end == "eof":
            writer.write_eof()
            await reading  # the other side's end
        else:  # close: end of stream, then wait for the peer's, like a polite close
            writer.write_eof()
            await reading
        writer.close()
    # Reset by the peer (ECONNRESET, EPIPE, ENOTCONN); uvloop raises
    # RuntimeError for a write to a transport a reset has already closed.
    except (OSError, RuntimeError):
        side.ended = "reset"
        writer.transport.abort()
    finally:
        if not reading.done():
            reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


POLICIES = {
    # No rule's verdict depends on the server name: connect upstream at once.
    "cidr": """
version: 1
proxy: {{port: {port}, address_v4: 127.0.0.1, address_v6: "::1", peek_timeout: 0.2}}
workloads: {{lo: {{cidrs: [127.0.0.0/8]}}}}
egress:
  - {{name: lo-allowed, from: [lo], to: {{cidrs: [127.0.0.0/8]}}, action: allow}}
default: deny
""",
    # A name rule first, and the flow allowed without a name (by the
    # default): the proxy connects at once, the server's bytes flow to the
    # client, and the client's are held until its first message has been
    # sniffed (it names no server here), then relayed: the early-connect path.
    "name": """
version: 1
proxy: {{port: {port}, address_v4: 127.0.0.1, address_v6: "::1", peek_timeout: 0.2}}
workloads: {{lo: {{cidrs: [127.0.0.0/8]}}}}
egress:
  - {{name: by-name, from: [lo], to: {{hosts: [example.org]}}, action: deny}}
default: allow
""",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _scenario(
    tmp: Path, policy_kind: str, client_script: Script, server_script: Script, wiring: Wiring
) -> tuple[Side, Side, list[dict[str, Any]]]:
    client, server = Side(), Side()
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _play(reader, writer, server_script, server, SERVER_BYTES)
        finally:
            served.set()

    upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
    wiring.port = upstream.sockets[0].getsockname()[1]
    audit_path = tmp / "audit.jsonl"
    audit_path.unlink(missing_ok=True)
    audit = AuditLog(str(audit_path))
    port = _free_port()
    policy = parse_policy(POLICIES[policy_kind].format(port=port))
    proxy = proxy_server.ProxyServer(policy=policy, audit=audit)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(
            _play(reader, writer, client_script, client, CLIENT_BYTES), timeout=10
        )
        await asyncio.wait_for(served.wait(), timeout=10)
        for _ in range(200):  # the record is written once both sides are gone
            if not proxy.connections:
                break
            await asyncio.sleep(0.01)
    finally:
        await proxy.close()
        audit.close()
        upstream.close()
        await upstream.wait_closed()
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    return client, server, records


@dataclass
class Wiring:
    delay: float = 0.0  # after the upstream connect, before the relay is wired
    port: int = 0  # the test server's port: the "original destination"
    sndbuf: int = 0  # if set: the upstream socket's SO_SNDBUF (no autotuning)


@pytest.fixture
def wiring(monkeypatch: pytest.MonkeyPatch) -> Wiring:
    """Point every connection at the test's server and hold the relay's
    wiring back by ``delay``."""
    wiring = Wiring()
    connect = proxy_connection.Connection._connect_upstream

    async def slow_connect(
        self: proxy_connection.Connection, mark: int, timeout: float, **kw: Any
    ) -> None:
        await connect(self, mark, timeout, **kw)
        if wiring.sndbuf and self.upstream is not None and self.upstream.transport is not None:
            sock = self.upstream.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wiring.sndbuf)
        if wiring.delay:
            await asyncio.sleep(wiring.delay)

    def test_server(sock: socket.socket) -> Endpoint:
        return Endpoint(address=ipaddress.ip_address("127.0.0.1"), port=wiring.port)

    monkeypatch.setattr(proxy_connection.Connection, "_connect_upstream", slow_connect)
    monkeypatch.setattr(proxy_connection, "original_dst", test_server)
    return wiring


def _check(
    client: Side, server: Side, records: list[dict[str, Any]], cs: Script, ss: Script
) -> None:
    # Never a byte back to where it came from.
    assert set(server.received) <= set(CLIENT_BYTES), "server bytes were sent back upstream"
    assert set(client.received) <= set(SERVER_BYTES), "client bytes came back to the client"
    # In order, without loss, as far as the connection lived.
    assert bytes(server.sent).startswith(bytes(client.received))
    assert bytes(client.sent).startswith(bytes(server.received))
    assert len(records) == 1, records
    record = records[0]
    # Counted as relayed: what a reset destroyed in flight may be counted.
    assert len(server.received) <= record["bytes_up"] <= len(client.sent), record
    assert len(client.received) <= record["bytes_down"] <= len(server.sent), record
    if cs.end != "reset" and ss.end != "reset":
        assert bytes(client.received) == bytes(server.sent)
        assert bytes(server.received) == bytes(client.sent)
        assert client.ended == server.ended == "eof"
        assert record["event"] == "closed" and record["error"] is None, record
        assert record["bytes_up"] == len(client.sent), record
        assert record["bytes_down"] == len(server.sent), record


# The agent runs on uvloop, whose transports are not asyncio's: both.
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("policy_kind", ["cidr", "name"])
@given(
    client_script=scripts(speaks_first=False),
    server_script=scripts(speaks_first=True),
    delay=st.sampled_from([0.0, 0.0, 0.005, 0.05]),
)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_every_byte_reaches_the_other_side_in_order(
    require_root: None,
    wiring: Wiring,
    tmp_path: Path,
    loop: str,
    policy_kind: str,
    client_script: Script,
    server_script: Script,
    delay: float,
) -> None:
    wiring.delay = delay
    client, server, records = LOOPS[loop](
        _scenario(tmp_path, policy_kind, client_script, server_script, wiring)
    )
    _check(client, server, records, client_script, server_script)


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("delay", [0.0, 0.05])
@pytest.mark.parametrize("policy_kind", ["cidr", "name"])
def test_a_server_that_writes_a_line_and_closes(
    require_root: None, wiring: Wiring, tmp_path: Path, loop: str, policy_kind: str, delay: float
) -> None:
    """The "whoami" server: one line, then close, before the client says
    anything. The line reaches the client, nothing goes upstream, and the
    record counts it."""
    wiring.delay = delay
    for _ in range(20):
        client, server, records = LOOPS[loop](
            _scenario(
                tmp_path,
                policy_kind,
                Script(steps=(), end="eof"),
                Script(steps=(("send", 45),), end="close"),
                wiring,
            )
        )
        assert bytes(client.received) == bytes(server.sent)
        assert server.received == b""
        assert [(r["bytes_up"], r["bytes_down"], r["event"]) for r in records] == [
            (0, 45, "closed")
        ]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_wiring_keeps_back_pressure_on_a_client_that_floods(
    require_root: None,
    wiring: Wiring,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    loop: str,
) -> None:
    """What the client sent while the connection was decided is written
    upstream when the relay is wired. If that alone fills the upstream write
    buffer, the client stays paused until it drains: a client flooding a
    server that does not read never grows the proxy's buffers without bound."""
    # A high-water mark below the peek cap: the replayed bytes cross it.
    monkeypatch.setattr(proxy_relay, "WRITE_HIGH_WATER", 16 * 1024)
    wiring.delay = 0.1  # the client's bytes pile up until the peek cap meanwhile
    wiring.sndbuf = 4096  # and the kernel holds little of what goes upstream
    LOOPS[loop](_flood(tmp_path, wiring))


async def _flood(tmp: Path, wiring: Wiring) -> None:
    server_reads = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_reads.wait()
        while await reader.read(1 << 20):
            pass
        writer.close()

    # A server with a small receive window (accepted sockets inherit it): the
    # kernel holds little of what it does not read, the proxy the rest.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    upstream = await asyncio.start_server(serve, sock=listener)
    wiring.port = upstream.sockets[0].getsockname()[1]
    audit = AuditLog(str(tmp / "audit.jsonl"))
    port = _free_port()
    proxy = proxy_server.ProxyServer(
        policy=parse_policy(POLICIES["cidr"].format(port=port)), audit=audit
    )
    await proxy.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = b"x" * (1 << 20)

        async def flood() -> None:
            for _ in range(64):
                writer.write(chunk)
                await writer.drain()

        flooding = asyncio.create_task(flood())
        largest = 0
        for _ in range(100):  # one second of a server that does not read
            await asyncio.sleep(0.01)
            for conn in proxy.connections:
                if conn.upstream is not None and conn.upstream.transport is not None:
                    size = conn.upstream.transport.get_write_buffer_size()
                    largest = max(largest, size)
        assert largest < 4 << 20, f"{largest} bytes held for a server that does not read"
        server_reads.set()
        await asyncio.wait_for(flooding, 30)
        writer.close()
    finally:
        await proxy.close()
        audit.close()
        upstream.close()
