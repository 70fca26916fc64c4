"""provision.sh's real path (vagrant/), as root in a sandbox, without a VM.

Inside a private mount namespace with an overlay on /etc and /opt and stub
systemctl/journalctl, so that the machine's /etc and services stay as they
are. The dry-run path and the other VM files are checked without root in
tests/unit/test_vm.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
UNIT_PATH = "/etc/systemd/system/egress-agent.service"
GUARD_PATH = "/etc/systemd/system/egress-agent-guard.service"
POLICY_PATH = "/etc/egress-agent/policy.yaml"


# --- provision.sh for real, in a sandbox (root) ----------------------------------
#
# The real path -- root and repository checks, the commands actually run, the
# refusal of a bad policy, the wait for "ready:" -- runs as root in a private
# mount namespace where /etc is an overlay whose writes land in the test's
# folder, /opt is such an overlay too, holding a stand-in repository at
# /opt/egress-agent (the real policy and unit, a `run` that records being
# called, an `egress-agent` that is this checkout's), and systemctl/journalctl
# are stubs that record their arguments. Neither /etc nor any service of the
# machine is touched. The script runs from a copy outside any checkout, as
# Vagrant runs it.

SYSTEMCTL_STUB = """#!/bin/sh
echo "systemctl $*" >> "$STUB_LOG"
[ "$1" = show ] && echo 5e1f0c0ffee
exit 0
"""
JOURNALCTL_STUB = """#!/bin/sh
echo "journalctl $*" >> "$STUB_LOG"
[ -e "$STUB_READY" ] && echo "egress-agent: INFO ready: policy /etc/egress-agent/policy.yaml"
exit 0
"""

SANDBOX = r"""
set -euo pipefail
mount -t overlay egress-test-opt -o "lowerdir=/opt,upperdir=$T/opt-upper,workdir=$T/opt-work" /opt
mount -t overlay egress-test-etc -o "lowerdir=/etc,upperdir=$T/etc-upper,workdir=$T/etc-work" /etc
r=/opt/egress-agent
mkdir -p "$r/vagrant" "$r/deploy/systemd" "$r/.venv/bin"
cp "$SRC/vagrant/policy.yaml" "$r/vagrant/"
cp "$SRC/deploy/systemd/egress-agent.service" "$SRC/deploy/systemd/egress-agent-guard.service" \
    "$r/deploy/systemd/"
printf '#!/bin/sh\necho "run $*" >> "$STUB_LOG"\n' > "$r/run"
printf '#!/bin/sh\nexec %s -m egress_agent.agent.cli "$@"\n' "$PYTHON" > "$r/.venv/bin/egress-agent"
chmod +x "$r/run" "$r/.venv/bin/egress-agent"
cp "$SRC/vagrant/provision.sh" "$T/vagrant-shell"
PATH="$T/stub-bin:$PATH" exec bash "$T/vagrant-shell"
"""


@dataclass(frozen=True, kw_only=True)
class RealRun:
    returncode: int
    output: str
    called: list[str]
    etc: Path  # what the script wrote to /etc

    def written(self) -> list[str]:
        return sorted(
            "/etc/" + str(p.relative_to(self.etc)) for p in self.etc.rglob("*") if p.is_file()
        )


def _provision_for_real(
    tmp_path: Path,
    *,
    ready: bool = True,
    existing_policy: str | None = None,
    env: dict[str, str] | None = None,
) -> RealRun:
    for d in ("etc-upper", "etc-work", "opt-upper", "opt-work", "stub-bin"):
        (tmp_path / d).mkdir()
    for name, text in (("systemctl", SYSTEMCTL_STUB), ("journalctl", JOURNALCTL_STUB)):
        (tmp_path / "stub-bin" / name).write_text(text)
        (tmp_path / "stub-bin" / name).chmod(0o755)
    if ready:
        (tmp_path / "ready").touch()
    if existing_policy is not None:
        (tmp_path / "etc-upper" / "egress-agent").mkdir()
        (tmp_path / "etc-upper" / "egress-agent" / "policy.yaml").write_text(existing_policy)
    log = tmp_path / "called"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVISION_", "EGRESS_"))}
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", SANDBOX],
        env={
            **clean_env,
            "T": str(tmp_path),
            "SRC": str(REPO),
            "PYTHON": shlex.quote(sys.executable),
            "STUB_LOG": str(log),
            "STUB_READY": str(tmp_path / "ready"),
            "PROVISION_READY_TIMEOUT": "2",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    called = log.read_text().splitlines() if log.exists() else []
    return RealRun(
        returncode=result.returncode,
        output=result.stdout + result.stderr,
        called=called,
        etc=tmp_path / "etc-upper",
    )


def test_provisioning_installs_enables_and_waits_for_ready(
    require_root: None, tmp_path: Path
) -> None:
    machine = [Path(UNIT_PATH), Path(POLICY_PATH)]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in machine]
    done = _provision_for_real(tmp_path)
    assert done.returncode == 0, done.output
    # The machine's own files were not touched.
    assert [p.stat().st_mtime_ns if p.exists() else None for p in machine] == before
    assert done.written() == [POLICY_PATH, GUARD_PATH, UNIT_PATH]
    assert (done.etc / "systemd/system/egress-agent.service").read_bytes() == (
        REPO / "deploy/systemd/egress-agent.service"
    ).read_bytes()
    assert (done.etc / "egress-agent/policy.yaml").read_bytes() == (
        REPO / "vagrant/policy.yaml"
    ).read_bytes()
    assert [c for c in done.called if not c.startswith(("journalctl", "systemctl show"))] == [
        "run setup",
        "systemctl daemon-reload",
        "systemctl try-restart egress-agent.service",
        "systemctl enable --now egress-agent.service",
    ]
    assert "/etc/egress-agent/policy.yaml: ok" in done.output
    assert "INFO ready:" in done.output


def test_a_bad_policy_in_place_stops_before_the_service(require_root: None, tmp_path: Path) -> None:
    bad = "version: 1\nworkloads: {vm: {cidrs: [10.0.2.15/24]}}\nintercept: []\negress: []\n"
    done = _provision_for_real(tmp_path, existing_policy=bad)
    assert done.returncode == 2, done.output
    assert "policy.yaml:2:" in done.output  # the loader's file:line:col
    assert "fix it and provision again" in done.output
    assert done.called == ["run setup"]  # no systemctl at all
    assert (done.etc / "egress-agent/policy.yaml").read_text() == bad  # kept
    assert not (done.etc / "systemd").exists()


def test_an_agent_that_never_gets_ready_fails_provisioning(
    require_root: None, tmp_path: Path
) -> None:
    done = _provision_for_real(tmp_path, ready=False)
    assert done.returncode == 1, done.output
    assert "did not report ready in 2s" in done.output
    assert "systemctl enable --now egress-agent.service" in done.called


def test_a_repository_elsewhere_is_refused(require_root: None, tmp_path: Path) -> None:
    """The unit runs /opt/egress-agent/.venv/bin/egress-agent: provisioning a
    checkout elsewhere would enable a service that cannot start."""
    done = _provision_for_real(tmp_path, env={"EGRESS_AGENT_REPO": str(REPO)})
    assert done.returncode == 1, done.output
    assert "put it at /opt/egress-agent" in done.output
    assert done.called == []
    assert done.written() == []
