"""The agent's own HTTP endpoint on loopback: status, liveness, readiness.

``GET /status`` returns the agent's state as JSON (what ``egress-agent
status`` prints); ``GET /metrics`` its counters as Prometheus text;
``GET /healthz`` answers 200 while the event loop runs; ``GET /readyz``
answers 200 only when the kernel holds the ruleset of the current policy and
the proxy is listening, 503 otherwise. It binds to
loopback only: on a node with hostNetwork that is reachable by the kubelet's
probes and nothing else. A deliberately tiny HTTP/1.0 responder: one request
per connection, no bodies, so it needs no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STATUS_ADDRESS = "127.0.0.1:15021"
_MAX_REQUEST = 8192
_REASONS = {200: "OK", 404: "Not Found", 400: "Bad Request", 503: "Service Unavailable"}


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT such as {DEFAULT_STATUS_ADDRESS}")
    return host.strip("[]"), int(port)


class StatusServer:
    def __init__(
        self,
        *,
        snapshot: Callable[[], dict[str, Any]],
        address: str,
        metrics: Callable[[], str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        self._host, self._port = parse_address(address)
        self._server: asyncio.Server | None = None

    async def start(self, *, retry_for: float = 0.0) -> None:
        """Listen; ``retry_for`` seconds of retries while the address is in use
        (a predecessor that handed over is closing its own status server)."""
        deadline = time.monotonic() + retry_for
        try:
            while True:
                try:
                    self._server = await asyncio.start_server(self._handle, self._host, self._port)
                    return
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve status on {self._host}:{self._port}: {exc.strerror} "
                "(choose another with --status-address)",
            ) from exc

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            content_type = "application/json"
            body: str | dict[str, Any]
            if len(parts) != 3 or parts[0] != "GET":
                code, body = 400, {"error": "only GET /status, /metrics, /healthz, /readyz"}
            elif parts[1] == "/metrics" and self._metrics is not None:
                code, body = 200, self._metrics()
                content_type = "text/plain; version=0.0.4"
            else:
                code, body = self._route(parts[1])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            code, body = 400, {"error": "incomplete request"}
        if isinstance(body, str):
            payload = body.encode()
        else:
            payload = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
        writer.write(
            f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    def _route(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/healthz":
            return 200, {"alive": True}
        snap = self._snapshot()
        if path == "/readyz":
            return (200 if snap["ready"] else 503), {
                "ready": snap["ready"],
                "reasons": snap["not_ready_because"],
            }
        if path == "/status":
            return 200, snap
        return 404, {
            "error": f"no such endpoint {path!r}: try /status, /metrics, /healthz, /readyz"
        }
