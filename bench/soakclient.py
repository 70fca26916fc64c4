"""The soak's client, run inside a pod: many concurrent sessions of mixed
protocols for a fixed time, each checked end to end.

    python -m bench.soakclient --targets JSON --seconds S --workers N --out FILE

``--targets`` names, per protocol, where to go (the pod dials the real
addresses; the node diverts them to the proxy). Each worker loops over the
protocols in turn until the time is up:

* ``tls``: TLS to the echo server by name (SNI), verified against the lab CA;
  one line, the server's answer, then a random payload echoed back.
* ``raw``: the same without TLS, to a destination allowed by CIDR.
* ``smtp``: smtplib against a server that speaks first (its 220 greeting),
  EHLO, one message, QUIT; the server logs the SHA-256 of each message body
  by the message's Subject, which the soak compares afterwards.
* ``http``: one to three keep-alive POSTs to the HTTP server; each answer
  carries the SHA-256 of the body the server received.

Every session writes one JSON line to ``--out``: protocol, the client's own
address (the audit record's ``src``), whether it was correct, the digest
the other side must have seen, bytes each way and the error if any. Random
sizes make every session different; a seed makes a run repeatable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import smtplib
import ssl
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

PROTOCOLS = ("tls", "raw", "smtp", "http")
MAX_PAYLOAD = 256 * 1024
TIMEOUT = 30.0


@dataclass
class Session:
    proto: str
    id: str
    src: str = "?"
    dst: str = "?"
    ok: bool = False
    digest: str = ""  # what the far side must have received (smtp, http)
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None


def _addr(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _echo(session: Session, target: dict[str, Any], rng: random.Random) -> None:
    """tls or raw: hello line, the server's answer, then a payload echoed back."""
    ctx = None
    if session.proto == "tls":
        ctx = ssl.create_default_context(cafile=target["ca"])
    host, port = target["address"], target["port"]
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=target.get("name") if ctx else None
    )
    try:
        session.src = _addr(writer.get_extra_info("sockname"))
        session.dst = _addr(writer.get_extra_info("peername"))
        hello = f"hello {session.id}\n".encode()
        writer.write(hello)
        answer = await reader.readline()
        if b" saw " not in answer:
            raise RuntimeError(f"unexpected answer {answer[:80]!r}")
        payload = rng.randbytes(rng.randint(1, MAX_PAYLOAD))
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        session.bytes_up = len(hello) + len(payload)
        session.bytes_down = len(answer) + len(got)
        if hashlib.sha256(got).digest() != hashlib.sha256(payload).digest():
            raise RuntimeError("echoed payload differs from what was sent")
        session.ok = True
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def _smtp(session: Session, target: dict[str, Any], seed: int) -> None:
    """One SMTP session; runs in a thread (smtplib is blocking)."""
    rng = random.Random(seed)
    lines = [rng.randbytes(rng.randint(1, 60)).hex() for _ in range(rng.randint(1, 300))]
    body = "\r\n".join(lines) + "\r\n"
    message = f"From: soak@pod.test\r\nTo: sink@mail.test\r\nSubject: {session.id}\r\n\r\n{body}"
    with smtplib.SMTP(timeout=TIMEOUT) as smtp:
        code, banner = smtp.connect(target["address"], target["port"])
        session.src = _addr(smtp.sock.getsockname())
        session.dst = _addr(smtp.sock.getpeername())
        if code != 220:
            raise RuntimeError(f"greeting {code} {banner!r}, expected 220")
        smtp.ehlo("soak.pod.test")
        refused = smtp.sendmail("soak@pod.test", ["sink@mail.test"], message)
        if refused:
            raise RuntimeError(f"recipients refused: {refused}")
    session.digest = hashlib.sha256(body.encode()).hexdigest()
    session.bytes_up = len(message)
    session.ok = True


async def _http(session: Session, target: dict[str, Any], rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection(target["address"], target["port"])
    try:
        session.src = _addr(writer.get_extra_info("sockname"))
        session.dst = _addr(writer.get_extra_info("peername"))
        digests = []
        count = rng.randint(1, 3)
        for i in range(count):
            body = rng.randbytes(rng.randint(0, MAX_PAYLOAD))
            last = i == count - 1
            head = (
                f"POST /soak/{session.id}/{i} HTTP/1.1\r\nHost: {target['name']}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if last else "")
                + "\r\n"
            ).encode()
            writer.write(head + body)
            session.bytes_up += len(head) + len(body)
            status = await reader.readline()
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"request {i}: {status.strip()[:80]!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            answer = json.loads(await reader.readexactly(length))
            want = hashlib.sha256(body).hexdigest()
            if answer["sha256"] != want:
                raise RuntimeError(f"request {i}: the server got other bytes than were sent")
            digests.append(want)
            session.requests += 1
        session.digest = ",".join(digests)
        session.ok = True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _worker(
    index: int,
    targets: dict[str, list[dict[str, Any]]],
    deadline: float,
    seed: int,
    pool: ThreadPoolExecutor,
    out: list[Session],
) -> None:
    rng = random.Random(seed * 1000 + index)
    n = 0
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        proto = PROTOCOLS[(index + n) % len(PROTOCOLS)]
        options = targets[proto]
        target = options[rng.randrange(len(options))]  # IPv4 or IPv6
        session = Session(proto=proto, id=f"w{index}-s{n}")
        n += 1
        try:
            async with asyncio.timeout(TIMEOUT):
                if proto in ("tls", "raw"):
                    await _echo(session, target, rng)
                elif proto == "http":
                    await _http(session, target, rng)
                else:
                    await loop.run_in_executor(pool, _smtp, session, target, rng.getrandbits(32))
        except Exception as exc:  # every failure is a finding, recorded
            session.ok = False
            session.error = f"{type(exc).__name__}: {exc}"
        out.append(session)


async def _main(args: argparse.Namespace) -> int:
    targets = json.loads(args.targets)
    deadline = time.monotonic() + args.seconds
    sessions: list[Session] = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        await asyncio.gather(
            *(_worker(i, targets, deadline, args.seed, pool, sessions) for i in range(args.workers))
        )
    with open(args.out, "w", encoding="utf-8") as f:
        for s in sessions:
            f.write(json.dumps(asdict(s)) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soakclient")
    parser.add_argument("--targets", required=True, help="JSON: protocol -> [target, ...]")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
