"""``egress-agent flows``: the connections the running agent holds open now
(from its status endpoint's ``/flows``), and with ``--follow`` the audit
records written from then on, as they are written.

Filters (``--workload``, ``--rule``, ``--verdict``, ``--name``; each
repeatable, any value of one filter matches, all filters must match) apply
to both. ``--name`` takes shell-style wildcards (``*.example.com``) and
matches the server name (TLS SNI or HTTP Host; a request record's host);
``--workload -`` matches connections of no workload.

Following is like ``tail -F``: it starts at the end of the file, and when the
file is rotated (renamed and created again, or truncated in place) it reads
what is left of the old one, then the new one from its start. The open
flows are listed after the file was opened, so a connection that ends
meanwhile is in one or the other, never in neither.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from egress_agent.agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from egress_agent.agent.status import DEFAULT_STATUS_ADDRESS, parse_address

FOLLOW_INTERVAL = 0.2  # seconds between looks at a quiet audit log


class FlowsError(Exception):
    """What went wrong and what to do about it."""


def add_parser(sub: Any) -> None:
    flows = sub.add_parser(
        "flows",
        help="show the connections open now; --follow: then the audit records as written",
    )
    flows.add_argument("--status-address", default=DEFAULT_STATUS_ADDRESS)
    flows.add_argument("--json", action="store_true", help="one JSON object per line")
    flows.add_argument(
        "--follow",
        action="store_true",
        help="then print each audit record as it is written, until interrupted",
    )
    flows.add_argument(
        "--audit-log",
        metavar="FILE",
        help="the audit log to follow (default: the file the running agent writes)",
    )
    for option, what in (
        ("--workload", "only this workload (- for none)"),
        ("--rule", "only connections decided by this rule"),
        ("--verdict", "only this verdict (allow, deny, ...)"),
        ("--name", "only this server name (wildcards: '*.example.com')"),
    ):
        flows.add_argument(option, action="append", default=[], metavar="VALUE", help=what)


@dataclass(frozen=True, kw_only=True)
class FlowFilter:
    workloads: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    verdicts: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def matches(self, item: dict[str, Any]) -> bool:
        """Whether a flow or an audit record passes every filter given."""
        if self.workloads and (item.get("workload") or "-") not in self.workloads:
            return False
        if self.rules and item.get("rule") not in self.rules:
            return False
        if self.verdicts and item.get("verdict") not in self.verdicts:
            return False
        if self.names:
            name = (item.get("server_name") or item.get("host") or "").lower()
            if not any(fnmatch.fnmatchcase(name, n.lower()) for n in self.names):
                return False
        return True


def flows_command(args: argparse.Namespace) -> int:
    keep = FlowFilter(
        workloads=tuple(args.workload),
        rules=tuple(args.rule),
        verdicts=tuple(args.verdict),
        names=tuple(args.name),
    )
    out = sys.stdout
    try:
        if not args.follow:
            answer = fetch_flows(args.status_address)
            show_flows(answer["flows"], keep, as_json=args.json, out=out)
            return EXIT_OK
        return _follow(args, keep, out)
    except FlowsError as exc:
        print(f"egress-agent flows: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, BadInput) else EXIT_FAILURE


class BadInput(FlowsError):
    """A wrong argument or file name."""


def _follow(args: argparse.Namespace, keep: FlowFilter, out: IO[str]) -> int:
    answer: dict[str, Any] | None = None
    path = args.audit_log
    if path is None:
        answer = fetch_flows(args.status_address)
        path = answer.get("audit_log")
        if path is None:
            raise BadInput(
                "the agent writes its audit records to stdout, not to a file: follow them in"
                " its output (journalctl -fu egress-agent, kubectl logs -f), or run it with"
                " --audit-log FILE"
            )
    tail = AuditTail(path)  # opened before the flows are listed: nothing falls between
    try:
        if answer is None:
            try:
                answer = fetch_flows(args.status_address)
            except FlowsError as exc:
                print(f"egress-agent flows: {exc}; following {path} only", file=sys.stderr)
        if answer is not None:
            show_flows(answer["flows"], keep, as_json=args.json, out=out)
        if not args.json:
            print(f"-- following {path} (interrupt to stop)", file=out, flush=True)
        for record in tail.records():
            if keep.matches(record):
                print(json.dumps(record) if args.json else describe_record(record), file=out)
                out.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        tail.close()
    return EXIT_OK


def fetch_flows(address: str) -> dict[str, Any]:
    """The running agent's ``/flows`` answer."""
    import http.client

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise BadInput(f"--status-address {exc}") from exc
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/flows")
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise FlowsError(
            f"no agent answers on {address}: {exc} (is `egress-agent run` running in this"
            " network namespace? If it serves elsewhere, give its --status-address)"
        ) from exc
    if response.status == 404:
        raise FlowsError(
            f"the agent on {address} does not serve /flows: it is older than this command;"
            " restart it with this version"
        )
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("flows"), list):
        raise FlowsError(
            f"{address} answered /flows with HTTP {response.status} and no flows"
            " (is that the agent's --status-address?)"
        )
    return answer


def show_flows(
    flows: Sequence[dict[str, Any]], keep: FlowFilter, *, as_json: bool, out: IO[str]
) -> None:
    shown = [f for f in flows if keep.matches(f)]
    if as_json:
        for flow in shown:
            print(json.dumps(flow), file=out)
    else:
        print(flows_table(shown, total=len(flows)), file=out)
    out.flush()


_COLUMNS = ("WORKLOAD", "SOURCE", "DESTINATION", "NAME", "RULE", "VERDICT", "UP", "DOWN", "AGE")


def flows_table(flows: Sequence[dict[str, Any]], *, total: int) -> str:
    """The flows as an aligned table, and a line with how many."""
    rows = [
        (
            f.get("workload") or "-",
            f.get("src") or "-",
            f.get("dst") or "-",
            f.get("server_name") or "-",
            f.get("rule") or "-",
            f.get("verdict") or ("deciding" if f.get("state") == "deciding" else "-"),
            format_bytes(int(f.get("bytes_up") or 0)),
            format_bytes(int(f.get("bytes_down") or 0)),
            format_age(float(f.get("age_s") or 0)),
        )
        for f in flows
    ]
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    right = {6, 7, 8}  # numbers
    lines = [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [_COLUMNS, *rows]
    ]
    hidden = total - len(flows)
    lines.append(
        f"{len(flows)} open" + (f" ({hidden} more not matching the filters)" if hidden else "")
    )
    return "\n".join(lines)


def describe_record(r: dict[str, Any]) -> str:
    """One audit record as a line of text."""
    when = str(r.get("time", ""))[11:19]
    who = r.get("workload") or "-"
    if r.get("event") == "request":
        status = r.get("status") if r.get("status") is not None else "-"
        text = (
            f"{when} request {who} {r.get('src')} -> {r.get('dst')} {r.get('method') or '-'}"
            f" {r.get('host') or '-'}{r.get('path') or ''} {status} rule {r.get('rule')}"
            f" up {format_bytes(int(r.get('bytes_up') or 0))}"
            f" down {format_bytes(int(r.get('bytes_down') or 0))}"
        )
    else:
        text = (
            f"{when} {r.get('event')} {who} {r.get('src')} -> {r.get('dst')}"
            f" {r.get('server_name') or '-'} rule {r.get('rule') or '-'}"
            f" {r.get('verdict') or '-'} up {format_bytes(int(r.get('bytes_up') or 0))}"
            f" down {format_bytes(int(r.get('bytes_down') or 0))}"
            f" {format_age(float(r.get('duration_ms') or 0) / 1000)}"
        )
    if r.get("error"):
        text += f": {r['error']}"
    return text


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}{unit}"


def format_age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class AuditTail:
    """The records appended to an audit log from now on, across rotations."""

    def __init__(
        self,
        path: str,
        *,
        interval: float = FOLLOW_INTERVAL,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self._interval = interval
        self._sleep = sleep
        try:
            self._file = open(path, "rb")  # noqa: SIM115 -- kept open while following
        except OSError as exc:
            raise BadInput(
                f"cannot read the audit log {path}: {exc.strerror} (give the file the agent"
                " writes with `run --audit-log`, or leave out --audit-log to ask the agent)"
            ) from exc
        self._file.seek(0, os.SEEK_END)
        self._partial = b""

    def close(self) -> None:
        self._file.close()

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record as it is written; forever."""
        while True:
            got = False
            for line in self._read_lines():
                got = True
                record = _parse(line)
                if record is not None:
                    yield record
            if not got and not self._reopen_if_rotated():
                self._sleep(self._interval)

    def _read_lines(self) -> list[bytes]:
        data = self._file.read()
        if not data:
            return []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        return [line for line in lines if line.strip()]

    def _reopen_if_rotated(self) -> bool:
        """Whether the file was replaced or truncated (and is now read anew)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away, not created again yet
        ours = os.fstat(self._file.fileno())
        if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
            # Everything of the old file was read (our read found nothing).
            try:
                new = open(self.path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                return False
            self._file.close()
            self._file, self._partial = new, b""
            return True
        if now.st_size < self._file.tell():  # truncated in place (copytruncate)
            self._file.seek(0)
            self._partial = b""
            return True
        return False


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # not a record (a line the log got from elsewhere)
    return record if isinstance(record, dict) else None
