"""``--log-format json``: the agent's own log lines as one JSON object each."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from egress_agent.agent.logformat import JsonFormatter


def _line(record: logging.LogRecord) -> dict[str, object]:
    text = JsonFormatter().format(record)
    assert "\n" not in text
    out: dict[str, object] = json.loads(text)
    return out


def _record(msg: str, *args: object, **kw: object) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "egress_agent.agent.agent",
            "levelno": logging.ERROR,
            "levelname": "ERROR",
            "msg": msg,
            "args": args,
            "created": 1796000000.25,
            **kw,
        }
    )


def test_a_line_has_time_level_event_and_fields() -> None:
    line = _line(_record("reload (%s): keeping generation %d: %s", "SIGHUP", 3, ValueError("x")))
    assert line == {
        "time": "2026-11-30T00:53:20.250000Z",
        "level": "error",
        "event": "reload (SIGHUP): keeping generation 3: x",
        "fields": {
            "logger": "egress_agent.agent.agent",
            "template": "reload (%s): keeping generation %d: %s",
            "args": ["SIGHUP", 3, "x"],
        },
    }


def test_extra_values_and_a_traceback_are_fields() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        exc_info = sys.exc_info()
    line = _line(_record("task failed", exc_info=exc_info, problems=["a.yaml:3:1: x"]))
    fields = line["fields"]
    assert isinstance(fields, dict)
    assert line["event"] == "task failed" and "template" not in fields
    assert fields["problems"] == ["a.yaml:3:1: x"]
    assert "RuntimeError: boom\nsecond line" in fields["exception"]


def test_the_command_logs_json_lines(tmp_path: Path) -> None:
    """A policy the agent refuses at start: one JSON line that says where."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nworkloads: {}\negress:\n  - {name: x, action: alow}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "egress_agent.agent.cli",
            "run",
            "--log-format",
            "json",
            "--policy",
            str(policy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [json.loads(x) for x in proc.stderr.splitlines()]
    assert lines and all(set(x) == {"time", "level", "event", "fields"} for x in lines)
    refused = lines[-1]
    assert refused["level"] == "error" and "the policy is not valid" in refused["event"]
    assert any(f"{policy}:4:" in p and "alow" in p for p in refused["fields"]["problems"])
