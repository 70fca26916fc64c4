"""A test client run inside a namespace: connect (optionally with TLS), send a
line, read the server's answer, and print one JSON object describing what
happened. Used by the demo, the integration tests and the benchmark, so that
each flow is observed from the client's end as well as the server's.

    python -m egress_agent.lab.client HOST PORT [--tls --ca CA --sni NAME]
        [--send TEXT] [--timeout S] [--source ADDR]

Output: {"ok": bool, "reply": str, "error": str|null, "peer": "ip:port"}.
Exit status 0 when a reply arrived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="egress_agent.lab.client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca")
    p.add_argument("--sni")
    p.add_argument("--send", default="hello\n")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--source")
    args = p.parse_args(argv)
    result: dict[str, object] = {"ok": False, "reply": "", "error": None, "peer": None}
    try:
        source = (args.source, 0) if args.source else None
        raw = socket.create_connection(
            (args.host, args.port), timeout=args.timeout, source_address=source
        )
        peer = raw.getpeername()
        result["peer"] = f"{peer[0]}:{peer[1]}"
        sock: socket.socket = raw
        if args.tls:
            ctx = ssl.create_default_context(cafile=args.ca)
            sock = ctx.wrap_socket(raw, server_hostname=args.sni or args.host)
        sock.sendall(args.send.encode())
        if not args.tls:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            if args.tls and b"\n" in data:
                break
        result["reply"] = b"".join(chunks).decode(errors="replace").strip()
        result["ok"] = bool(chunks)
        sock.close()
    except (OSError, ssl.SSLError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
