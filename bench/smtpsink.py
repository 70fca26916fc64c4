"""A real SMTP server (aiosmtpd) that accepts every message and logs a digest.

    python -m bench.smtpsink --listen ADDR:PORT [--listen ...] --log FILE

It speaks first, as every SMTP server does (the ``220`` greeting), which is
the point: a transparent proxy must not mistake the greeting for client
bytes. Per message it appends one JSON line to ``--log``::

    {"subject": str, "peer": "ip:port", "sha256": hex of the body, "bytes": n}

``READY`` is printed once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from egress_agent.lab.servers import format_addr, parse_listen


class Sink:
    def __init__(self, log: str) -> None:
        self.log = open(log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        head, _, body = content.partition(b"\r\n\r\n")
        subject = ""
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"subject":
                subject = value.strip().decode("latin-1")
        record = {
            "subject": subject,
            "peer": format_addr(session.peer),
            "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body),
        }
        self.log.write(json.dumps(record) + "\n")
        return "250 OK"


async def _serve(listen: Sequence[str], log: str) -> None:
    sink = Sink(log)
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    for item in listen:
        host, port = parse_listen(item)
        servers.append(
            await loop.create_server(
                lambda: SMTP(sink, hostname="mail.test", ident="soak sink"), host, port
            )
        )
    print("READY", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtpsink")
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
