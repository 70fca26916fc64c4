"""Audit records are written in groups (one write per loop turn), in order,
whole lines only, and none is lost when the agent stops or hands over."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from egress_agent.proxy import audit as audit_module
from egress_agent.proxy.audit import AuditLog, AuditRecord


def _record(n: int) -> AuditRecord:
    return AuditRecord(
        time="2026-01-01T00:00:00.000000Z",
        event="closed",
        src=f"10.0.0.2:{40000 + n}",
        workload="app",
        dst="192.0.2.10:443",
        server_name="api.example.com",
        protocol="tls",
        rule="api",
        verdict="allow",
        bytes_up=n,
        bytes_down=2 * n,
        duration_ms=1.0,
        error=None,
        policy_generation=1,
        policy_hash="0" * 16,
        id=f"x-{n}",
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a partial line at the end"
    return [json.loads(line) for line in text.splitlines()]


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every write(2) the audit log makes."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real(fd, data)

    monkeypatch.setattr(audit_module.os, "write", write)
    return sizes


def test_connections_ending_in_one_loop_turn_are_one_write_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    writes = _count_writes(monkeypatch)

    async def scenario() -> None:
        audit = AuditLog(str(path))
        try:
            for n in range(100):  # 100 connections closing in the same turn
                audit.write(_record(n))
            assert path.read_text() == ""  # queued, not yet written
            await asyncio.sleep(audit_module.FLUSH_DELAY * 5)
            assert len(writes) == 1
            # The next turn's records are a group of their own, after these.
            for n in range(100, 110):
                audit.write(_record(n))
            await asyncio.sleep(audit_module.FLUSH_DELAY * 5)
            assert len(writes) == 2
        finally:
            audit.close()

    asyncio.run(scenario())
    records = _lines(path)
    assert [r["id"] for r in records] == [f"x-{n}" for n in range(110)]
    assert [r["bytes_up"] for r in records] == list(range(110))


def test_a_full_group_is_written_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    writes = _count_writes(monkeypatch)

    async def scenario() -> None:
        audit = AuditLog(str(path), delay=3600.0)  # only size ends a group here
        try:
            for n in range(audit_module.FLUSH_LINES):
                audit.write(_record(n))
            assert len(writes) == 1 and len(_lines(path)) == audit_module.FLUSH_LINES
        finally:
            audit.close()

    asyncio.run(scenario())


def test_records_pending_when_the_agent_stops_are_written(tmp_path: Path) -> None:
    # What SIGTERM does: the proxy closes its connections (each writes its
    # record) and the audit log is closed right after, before the group's
    # delay has passed.
    path = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        audit = AuditLog(str(path), delay=3600.0)
        for n in range(37):
            audit.write(_record(n))
        assert path.read_text() == ""
        audit.close()

    asyncio.run(scenario())
    assert [r["id"] for r in _lines(path)] == [f"x-{n}" for n in range(37)]


def test_a_handover_loses_no_record_and_splits_no_line(tmp_path: Path) -> None:
    # Predecessor and successor append to one file; their groups alternate
    # while both serve connections, and the predecessor closes with records
    # still queued when its last connection ends.
    path = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        old = AuditLog(str(path))
        new = AuditLog(str(path))
        try:
            n = 0
            for _turn in range(20):
                for log in (old, new, old):
                    log.write(_record(n))
                    n += 1
                await asyncio.sleep(0)
            old.write(_record(n))  # the predecessor's last connection
            n += 1
            old.close()
            for _ in range(5):
                new.write(_record(n))
                n += 1
        finally:
            new.close()

    asyncio.run(scenario())
    ids = [r["id"] for r in _lines(path)]
    assert sorted(ids, key=lambda i: int(i[2:])) == [f"x-{n}" for n in range(66)]
    assert len(set(ids)) == len(ids)


def test_without_an_event_loop_each_record_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    try:
        audit.write(_record(1))
        assert [r["id"] for r in _lines(path)] == ["x-1"]
    finally:
        audit.close()


def test_a_record_after_close_is_counted_not_raised(tmp_path: Path) -> None:
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit.close()
    audit.write(_record(1))
    assert audit.write_errors == 1 and audit.written == 0
