"""The pure parts of restarts: which systemd jobs mean a real stop, the
saved state's format, and the readiness message to systemd."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from egress_agent.agent.cleanup import parse_jobs, stop_reason
from egress_agent.agent.saved import (
    SavedState,
    SavedStateError,
    parse_saved,
    read_saved,
    write_saved,
)
from egress_agent.agent.sdnotify import notify

UNIT = "egress-agent.service"


@pytest.mark.parametrize(
    ("jobs", "removes"),
    [
        ("", False),  # a crash: the automatic restart comes later
        (f"12 {UNIT} restart running\n", False),  # systemctl restart, try-restart
        (f"12 {UNIT} start running\n", False),  # ExecStopPost after a failed start
        (f"12 {UNIT} stop running\n", True),  # systemctl stop, disable --now
        ("12 other.service stop running\n", False),
        (f"3 reboot.target start waiting\n12 {UNIT} stop running\n", False),  # shutdown
        (f"3 poweroff.target start waiting\n12 {UNIT} stop running\n", False),
        ("No jobs running.\n", False),
    ],
)
def test_only_a_stop_job_outside_a_shutdown_removes(jobs: str, removes: bool) -> None:
    assert (stop_reason(UNIT, parse_jobs(jobs)) is not None) is removes


def _state() -> SavedState:
    return SavedState(
        policy_path="/etc/egress-agent/policy.yaml",
        policy_hash="abc",
        generation=3,
        fail_open=False,
        address_v4=ipaddress.IPv4Address("169.254.99.1"),
        address_v6=ipaddress.IPv6Address("fd00::1"),
        bpf_pin_dir="/sys/fs/bpf/egress_agent",
        cgroup_root=None,
        cgroups=("system.slice/backup.service",),
        ruleset={"nftables": [{"add": {"table": {"family": "inet", "name": "egress_agent"}}}]},
        saved_at=1.0,
    )


def test_the_saved_state_reads_back_as_written(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    write_saved(str(path), _state())
    assert read_saved(str(path)) == _state()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not JSON"),
        ('{"format": 99}', "not a saved state of format 1"),
        ('{"format": 1}', "bad or missing field"),
    ],
)
def test_a_bad_saved_state_says_which_file_and_what_to_do(text: str, says: str) -> None:
    with pytest.raises(SavedStateError, match=says) as exc:
        parse_saved(text, source="/var/lib/egress-agent/state.json")
    assert "/var/lib/egress-agent/state.json" in str(exc.value)
    assert "delete it" in str(exc.value)


def test_a_missing_saved_state_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(SavedStateError, match=r"cannot read .*missing\.json"):
        read_saved(str(tmp_path / "missing.json"))


def test_readiness_goes_to_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # outside systemd: nothing sent
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("READY=1") is True
        assert server.recv(100) == b"READY=1"
