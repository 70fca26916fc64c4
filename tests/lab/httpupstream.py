"""An HTTP/1.1 origin server for the lab that records every request head.

Run inside a lab host (``start_http_upstream`` below)::

    python tests/lab/httpupstream.py --listen ADDR:PORT [--tls CERT KEY] --log FILE

It serves keep-alive connections, reads request bodies framed by
Content-Length or chunked encoding while hashing them (never holding a body in
memory), answers ``Expect: 100-continue`` with ``100 Continue``, and replies
``200`` with a JSON body ``{"bytes": n, "sha256": hex}``. ``HEAD`` gets the
same head without a body; a target starting with ``/chunked`` gets its
response chunked, one starting with ``/bye`` gets ``Connection: close`` and
the server closes the connection after it. One JSON line per request goes to ``--log`` before the
response is sent::

    {"peer": "ip:port", "tls": bool, "sni": str|null, "method": str,
     "target": str, "headers": [[name, value], ...], "body_bytes": n,
     "body_sha256": hex}

so a test sees exactly what reached the server (and that nothing did).
With ``--status-file FILE``, a status code written in that file (``500``)
replaces ``200`` in the responses that follow, until the file is emptied:
a server that fails on demand. A target starting with ``/slow`` is answered
after two seconds.
``READY`` is printed once the listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_agent.lab.servers import format_addr, parse_listen, read_log, wait_ready

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

READ_SIZE = 64 * 1024
IDLE = 30.0
SLOW = 2.0  # seconds before answering /slow...


class _Server:
    def __init__(self, log: Path, status_file: Path | None = None) -> None:
        self.log = open(log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.status_file = status_file

    def status(self) -> str:
        """The status line's code and reason to answer with now."""
        if self.status_file is None:
            return "200 OK"
        try:
            code = self.status_file.read_text().strip()
        except FileNotFoundError:
            code = ""
        return f"{int(code)} Failing On Demand" if code else "200 OK"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = format_addr(writer.get_extra_info("peername"))
        ssl_obj = writer.get_extra_info("ssl_object")
        sni = getattr(ssl_obj, "sni", None) if ssl_obj is not None else None
        try:
            while await self.one(reader, writer, peer=peer, tls=ssl_obj is not None, sni=sni):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError, OSError):
            pass
        finally:
            writer.close()

    async def one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        tls: bool,
        sni: str | None,
    ) -> bool:
        async with asyncio.timeout(IDLE):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return False
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = [
            [name, value.strip()] for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        lower = {n.lower(): v for n, v in headers}
        if lower.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        digest = hashlib.sha256()
        size = 0
        if lower.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                n = int(line.split(b";")[0].strip(), 16)
                if n == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                left = n
                while left:
                    data = await reader.read(min(left, READ_SIZE))
                    if not data:
                        raise ConnectionError("closed mid-chunk")
                    digest.update(data)
                    left -= len(data)
                size += n
                await reader.readexactly(2)
        elif "content-length" in lower:
            left = int(lower["content-length"])
            while left:
                data = await reader.read(min(left, READ_SIZE))
                if not data:
                    raise ConnectionError("closed mid-body")
                digest.update(data)
                size += len(data)
                left -= len(data)
        record = {
            "peer": peer,
            "tls": tls,
            "sni": sni,
            "method": method,
            "target": target,
            "headers": headers,
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
        self.log.write(json.dumps(record) + "\n")
        body = json.dumps({"bytes": size, "sha256": digest.hexdigest()}).encode()
        if target.startswith("/slow"):
            await asyncio.sleep(SLOW)
        status = self.status()
        if target.startswith("/chunked"):
            out = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            if method != "HEAD":
                out += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        else:
            out = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n".encode()
            if target.startswith("/bye"):
                out += b"Connection: close\r\n"
            out += b"Content-Type: application/json\r\n\r\n"
            if method != "HEAD":
                out += body
        writer.write(out)
        await writer.drain()
        return lower.get("connection", "").lower() != "close" and not target.startswith("/bye")


async def _serve(
    listen: Sequence[str], tls: tuple[str, str] | None, log: Path, status_file: Path | None
) -> None:
    ctx: ssl.SSLContext | None = None
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls[0], tls[1])

        def remember_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            obj.sni = name  # type: ignore[attr-defined]

        ctx.sni_callback = remember_sni
    server = _Server(log, status_file)
    servers = []
    for item in listen:
        host, port = parse_listen(item)
        servers.append(await asyncio.start_server(server.handle, host, port, ssl=ctx))
    print("READY", flush=True)
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="httpupstream")
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--status-file", type=Path)
    args = parser.parse_args(argv)
    tls = tuple(args.tls) if args.tls else None
    try:
        asyncio.run(_serve(args.listen, tls, args.log, args.status_file))
    except OSError as exc:
        print(f"cannot listen: {exc}", flush=True)
        return 1
    return 0


def start_http_upstream(
    lab: Lab,
    host: str,
    *,
    listen: Sequence[str],
    tls: tuple[os.PathLike[str] | str, os.PathLike[str] | str] | None,
    log: Path,
    timeout: float = 10.0,
    status_file: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the server in lab host ``host``; the lab stops it at teardown."""
    argv = [sys.executable, __file__, "--log", str(log)]
    if status_file is not None:
        argv += ["--status-file", str(status_file)]
    for item in listen:
        parse_listen(item)
        argv += ["--listen", item]
    if tls is not None:
        argv += ["--tls", os.fspath(tls[0]), os.fspath(tls[1])]
    proc: subprocess.Popen[bytes] = lab.popen(host, argv, stdout=subprocess.PIPE)
    wait_ready(proc, f"http upstream in {host}", timeout)
    return proc


def requests_seen(log: Path) -> list[dict[str, Any]]:
    return read_log(log)


if __name__ == "__main__":
    sys.exit(main())
