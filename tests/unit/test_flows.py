"""``egress-agent flows`` without an agent's namespaces: its filters, its
table and record lines, following a rotated audit log, and the errors a
user can cause (the live view is tested in tests/netns/test_flows_live.py)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from egress_agent.agent.cli import main
from egress_agent.agent.cli_flows import (
    AuditTail,
    FlowFilter,
    describe_record,
    flows_table,
    format_age,
    format_bytes,
)

TLS_FLOW: dict[str, Any] = {
    "workload": "app", "src": "198.19.1.2:40000", "dst": "198.18.1.2:443",
    "server_name": "a.blob.example.com", "rule": "blobs", "verdict": "allow",
    "bytes_up": 1536, "bytes_down": 5 * 1024 * 1024, "age_s": 75.2, "state": "open",
}  # fmt: skip
RAW_FLOW: dict[str, Any] = {
    "workload": None, "src": "10.0.0.7:40001", "dst": "198.18.1.2:9000",
    "server_name": None, "rule": "default", "verdict": "allow",
    "bytes_up": 12, "bytes_down": 0, "age_s": 3.25, "state": "open",
}  # fmt: skip
NEW_FLOW: dict[str, Any] = {
    "workload": "app", "src": "198.19.1.2:40002", "dst": "198.18.1.3:443",
    "server_name": None, "rule": None, "verdict": None,
    "bytes_up": 0, "bytes_down": 0, "age_s": 0.01, "state": "deciding",
}  # fmt: skip


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (FlowFilter(), [TLS_FLOW, RAW_FLOW, NEW_FLOW]),
        (FlowFilter(workloads=("app",)), [TLS_FLOW, NEW_FLOW]),
        (FlowFilter(workloads=("-",)), [RAW_FLOW]),
        (FlowFilter(workloads=("app", "-")), [TLS_FLOW, RAW_FLOW, NEW_FLOW]),
        (FlowFilter(rules=("default",)), [RAW_FLOW]),
        (FlowFilter(verdicts=("allow",)), [TLS_FLOW, RAW_FLOW]),
        (FlowFilter(verdicts=("deny",)), []),
        (FlowFilter(names=("a.blob.example.com",)), [TLS_FLOW]),
        (FlowFilter(names=("*.EXAMPLE.com",)), [TLS_FLOW]),  # names ignore case
        (FlowFilter(names=("*.example.org",)), []),
        (FlowFilter(workloads=("app",), verdicts=("allow",)), [TLS_FLOW]),  # all must match
    ],
)
def test_filters(keep: FlowFilter, expected: list[dict[str, Any]]) -> None:
    assert [f for f in (TLS_FLOW, RAW_FLOW, NEW_FLOW) if keep.matches(f)] == expected


def test_name_filter_matches_a_request_records_host() -> None:
    request = {"event": "request", "host": "api.example.com", "rule": "api"}
    assert FlowFilter(names=("*.example.com",)).matches(request)


def test_the_table() -> None:
    lines = flows_table([TLS_FLOW, RAW_FLOW, NEW_FLOW], total=5).splitlines()
    assert lines[0].split() == [
        "WORKLOAD", "SOURCE", "DESTINATION", "NAME", "RULE", "VERDICT", "UP", "DOWN", "AGE"
    ]  # fmt: skip
    assert lines[1].split() == [
        "app", "198.19.1.2:40000", "198.18.1.2:443", "a.blob.example.com", "blobs", "allow",
        "1.5KiB", "5.0MiB", "1m15s",
    ]  # fmt: skip
    assert lines[2].split() == [
        "-", "10.0.0.7:40001", "198.18.1.2:9000", "-", "default", "allow", "12B", "0B", "3.2s"
    ]  # fmt: skip
    assert lines[3].split()[4:6] == ["-", "deciding"]
    assert lines[4] == "3 open (2 more not matching the filters)"
    # Columns line up: every row's destination starts where the header's does.
    at = lines[0].index("DESTINATION")
    assert all(line[at:].startswith("198.18.1.") for line in lines[1:4])


def test_an_empty_table() -> None:
    assert flows_table([], total=0).splitlines()[-1] == "0 open"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (3 * 1024**3, "3.0GiB"),
        (2**60, "1048576.0TiB"),
    ],
)
def test_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [(0.25, "0.2s"), (42.9, "42s"), (3599, "59m59s"), (7260, "2h01m"), (90000, "1d01h")],
)
def test_ages(s: float, text: str) -> None:
    assert format_age(s) == text


def test_record_lines() -> None:
    closed = {
        "time": "2026-12-07T22:31:05.123456Z", "event": "closed", "workload": "app",
        "src": "198.19.1.2:40000", "dst": "198.18.1.2:443", "server_name": "a.example.com",
        "rule": "blobs", "verdict": "allow", "bytes_up": 10, "bytes_down": 2048,
        "duration_ms": 1500.0, "error": None,
    }  # fmt: skip
    assert describe_record(closed) == (
        "22:31:05 closed app 198.19.1.2:40000 -> 198.18.1.2:443 a.example.com rule blobs"
        " allow up 10B down 2.0KiB 1.5s"
    )
    denied = {**closed, "event": "denied", "verdict": "deny", "rule": "default",
              "error": "no rule allows it", "bytes_down": 0, "duration_ms": 1.0}  # fmt: skip
    assert describe_record(denied).endswith(
        "rule default deny up 10B down 0B 0.0s: no rule allows it"
    )
    request = {
        "time": "2026-12-07T22:31:06.0Z", "event": "request", "workload": None,
        "src": "10.0.0.7:1", "dst": "198.18.1.2:80", "method": "GET", "host": "h.example.com",
        "path": "/x", "status": 200, "rule": "api", "bytes_up": 1, "bytes_down": 2,
    }  # fmt: skip
    assert describe_record(request) == (
        "22:31:06 request - 10.0.0.7:1 -> 198.18.1.2:80 GET h.example.com/x 200 rule api"
        " up 1B down 2B"
    )


class _Script:
    """Stands in for the pause between looks at the log: each pause runs the
    next step of what the agent and logrotate do, and stops after the last."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)

    def __call__(self, _seconds: float) -> None:
        if not self.steps:
            raise KeyboardInterrupt
        self.steps.pop(0)()


def _append(path: Path, *records: dict[str, Any], tail: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_following_starts_at_the_end_and_survives_both_kinds_of_rotation(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _append(log, {"n": 0})  # written before: not shown
    script = _Script(
        lambda: _append(log, {"n": 1}, tail='{"n": 2'),  # a line half written
        lambda: _append(log, tail='}\n{"n": 3}\nnot json\n[4]\n'),
        # Renamed away, the agent still writes to the old file, then a new one.
        lambda: (
            os.rename(log, tmp_path / "audit.jsonl.1"),
            _append(tmp_path / "audit.jsonl.1", {"n": 4}),
        ),
        lambda: None,  # no file there for a while
        lambda: _append(log, {"n": 5}),
        # Truncated in place (copytruncate), then written again.
        lambda: log.write_text(""),
        lambda: _append(log, {"n": 6}),
    )
    tail = AuditTail(str(log), sleep=script)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for record in tail.records():
            seen.append(record.get("n"))
    tail.close()
    assert seen == [1, 2, 3, 4, 5, 6]


def test_a_missing_audit_log_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert main(["flows", "--follow", "--audit-log", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the audit log {missing}: No such file or directory" in err
    assert "run --audit-log" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_no_agent_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{_free_port()}"
    assert main(["flows", "--status-address", address]) == 1
    err = capsys.readouterr().err
    assert f"no agent answers on {address}" in err and "egress-agent run" in err


def test_a_malformed_status_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flows", "--status-address", "localhost"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


@pytest.fixture
def endpoint() -> Iterator[tuple[str, dict[str, Any]]]:
    """Something answering HTTP on loopback like the agent (``answer`` is what
    it serves for /flows; other paths get a 404)."""
    answer: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answer).encode() if self.path == "/flows" else b"{}"
            self.send_response(200 if self.path == "/flows" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


def test_listing_with_filters_and_json(
    endpoint: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    address, answer = endpoint
    answer.update(flows=[TLS_FLOW, RAW_FLOW, NEW_FLOW], audit_log=None)
    assert main(["flows", "--status-address", address, "--json", "--workload", "app"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line) for line in out.splitlines()] == [TLS_FLOW, NEW_FLOW]
    assert main(["flows", "--status-address", address, "--rule", "default"]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.7:40001" in out and "198.19.1.2" not in out
    assert out.splitlines()[-1] == "1 open (2 more not matching the filters)"


def test_following_an_agent_that_logs_to_stdout_says_where_to_look(
    endpoint: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    address, answer = endpoint
    answer.update(flows=[], audit_log=None)
    assert main(["flows", "--status-address", address, "--follow"]) == 2
    err = capsys.readouterr().err
    assert "writes its audit records to stdout" in err and "--audit-log FILE" in err


def test_something_else_on_the_status_address(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer() -> None:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n<html>hello</html>")
            conn.close()

        thread = threading.Thread(target=answer)
        thread.start()
        assert main(["flows", "--status-address", address]) == 1
        thread.join()
    assert "answered /flows with HTTP 200 and no flows" in capsys.readouterr().err


def test_the_status_server_serves_flows() -> None:
    import asyncio
    import http.client

    from egress_agent.agent.status import StatusServer

    answer = {"flows": [RAW_FLOW], "audit_log": "/var/log/audit.jsonl"}
    address = f"127.0.0.1:{_free_port()}"

    def get(path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(*address.split(":"), timeout=5)
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    async def run() -> list[tuple[int, Any]]:
        server = StatusServer(
            snapshot=lambda: {"ready": True, "not_ready_because": []},
            address=address,
            flows=lambda: answer,
        )
        await server.start()
        try:
            return [await asyncio.to_thread(get, p) for p in ("/flows", "/nope")]
        finally:
            await server.close()

    (code, body), (missing, error) = asyncio.run(run())
    assert (code, body) == (200, answer)
    assert missing == 404 and "/flows" in error["error"]
