"""The VM deployment path (vagrant/, deploy/systemd/), checked without a VM.

No box can be downloaded here and no real service may start, so each piece is
checked by the tool that owns its format: ``vagrant validate`` for the
Vagrantfile, ``systemd-analyze verify`` for the unit, and provision.sh in its
dry-run mode, which writes what it would install under a scratch root and
prints the commands it would run. Stub ``systemctl``/``apt-get``/``journalctl``
first on PATH prove that a dry run runs none of them.

provision.sh's real path runs as root in tests/netns/test_vm_provision.py.

Needs Debian's ``vagrant`` and ``vagrant-libvirt`` (``sudo ./run setup``),
systemd's ``systemd-analyze`` and util-linux's ``unshare``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from egress_agent.agent.cli import _parser
from egress_agent.policy.load import load_policy

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
PROVISION = VAGRANT_DIR / "provision.sh"
DEMO_POLICY = VAGRANT_DIR / "policy.yaml"
GATEWAY_POLICY = VAGRANT_DIR / "gateway-policy.yaml"
UNIT_SOURCE = REPO / "deploy" / "systemd" / "egress-agent.service"
GUARD_SOURCE = REPO / "deploy" / "systemd" / "egress-agent-guard.service"

# Paths on the VM: the repository is synced to /opt/egress-agent.
VM_AGENT = "/opt/egress-agent/.venv/bin/egress-agent"
UNIT_PATH = "/etc/systemd/system/egress-agent.service"
GUARD_PATH = "/etc/systemd/system/egress-agent-guard.service"
STATE_FILE = "/var/lib/egress-agent/state.json"
POLICY_PATH = "/etc/egress-agent/policy.yaml"
# The BPF datapath's: NET_ADMIN (nftables, tc), BPF (programs, maps), PERFMON
# (verifier pointer rules); systemd mounts bpffs at boot, so no SYS_ADMIN.
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"}

CHECK_CMD = f"{REPO}/.venv/bin/egress-agent check {POLICY_PATH}"
FIRST_RUN_COMMANDS = [
    f"{REPO}/run setup",
    CHECK_CMD,
    "systemctl daemon-reload",
    "systemctl try-restart egress-agent.service",
    "systemctl enable --now egress-agent.service",
]
# Nothing changed: no restart of a running agent.
AGAIN_COMMANDS = [c for c in FIRST_RUN_COMMANDS if "try-restart" not in c]


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} (sudo ./run setup does)")
    return path


# --- the unit -------------------------------------------------------------------


def _unit_fields(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value given, in order; enough of systemd's syntax
    for this file (it uses no line continuations, which is checked)."""
    fields: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line continuation in the unit: {line}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        fields.setdefault((section, key), []).append(value)
    return fields


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as installed, except that their commands point at this
    checkout's agent (verify insists that the binary exists). Any output is a
    failure: verify reports unknown keys and unparsable values as warnings
    and still exits 0."""
    analyze = _tool("systemd-analyze", "systemd")
    agent = Path(sys.executable).with_name("egress-agent")
    assert agent.is_file(), f"no {agent}: run ./run setup"
    text = UNIT_SOURCE.read_text()
    assert text.count(VM_AGENT) == 2  # ExecStart, ExecStopPost
    unit = tmp_path / "egress-agent.service"
    unit.write_text(text.replace(VM_AGENT, str(agent)))
    guard_text = GUARD_SOURCE.read_text()
    assert guard_text.count(VM_AGENT) == 1
    guard = tmp_path / "egress-agent-guard.service"
    guard.write_text(guard_text.replace(VM_AGENT, str(agent)))

    result = subprocess.run(
        [analyze, "verify", str(unit), str(guard)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_says_what_the_service_needs() -> None:
    fields = _unit_fields(UNIT_SOURCE.read_text())

    def one(section: str, key: str) -> str:
        values = fields.get((section, key), [])
        assert len(values) == 1, f"[{section}] {key}: {values}"
        return values[0]

    exec_start = one("Service", "ExecStart").split()
    assert exec_start == [
        VM_AGENT, "run", "--policy", POLICY_PATH,
        "--audit-log", "/var/log/egress-agent/audit.jsonl",
        "--on-stop", "keep", "--state-file", STATE_FILE,
    ]  # fmt: skip
    # The agent's own CLI accepts exactly these arguments.
    args = _parser().parse_args(exec_start[1:])
    assert (args.command, args.policy, args.audit_log) == ("run", POLICY_PATH, exec_start[5])
    assert (args.on_stop, args.state_file) == ("keep", STATE_FILE)
    # The audit log lives in the directory systemd creates for the service,
    # the saved state in its state directory.
    assert Path(args.audit_log).parent == Path("/var/log") / one("Service", "LogsDirectory")
    assert Path(STATE_FILE).parent == Path("/var/lib") / one("Service", "StateDirectory")
    # The cleanup after every end of the agent removes only on a real stop.
    stop_post = one("Service", "ExecStopPost").split()
    assert stop_post[0] == VM_AGENT
    cleanup = _parser().parse_args(stop_post[1:])
    assert (cleanup.command, cleanup.systemd_unit, cleanup.state_file) == (
        "cleanup", "egress-agent.service", STATE_FILE,
    )  # fmt: skip

    # Started means enforcing: units ordered after it start once it is ready.
    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"
    assert one("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service", "Restart") == "on-failure"
    assert one("Service", "RestartSec") == "2"
    assert one("Service", "RestartPreventExitStatus") == "2"  # bad policy: permanent
    assert one("Service", "KillSignal") == "SIGTERM"
    assert 5 <= int(one("Service", "TimeoutStopSec")) <= 60
    assert "network-online.target" in one("Unit", "After").split()
    assert "network-online.target" in one("Unit", "Wants").split()
    assert one("Install", "WantedBy") == "multi-user.target"

    assert set(one("Service", "CapabilityBoundingSet").split()) == CAPABILITIES
    assert set(one("Service", "AmbientCapabilities").split()) == CAPABILITIES
    assert one("Service", "NoNewPrivileges") == "yes"
    assert one("Service", "ProtectSystem") == "full"
    assert one("Service", "ProtectHome") == "yes"
    # bcc compiles against /lib/modules/*/build and mounts bpffs under /sys.
    assert ("Service", "ProtectKernelModules") not in fields
    assert ("Service", "ProtectKernelTunables") not in fields
    assert int(one("Service", "LimitNOFILE")) >= 65536
    assert ("Service", "User") not in fields  # `run` checks for uid 0


def test_the_boot_guard_runs_before_the_network_and_the_agent() -> None:
    """At boot the guard's table is in place before any interface is
    configured (network-pre.target) and after Debian's nftables.service
    (whose `flush ruleset` would remove it); the agent starts after it and
    pulls it in, so it runs at boot exactly when the agent is enabled."""
    guard = _unit_fields(GUARD_SOURCE.read_text())
    agent = _unit_fields(UNIT_SOURCE.read_text())

    def words(fields: dict[tuple[str, str], list[str]], section: str, key: str) -> set[str]:
        return {w for value in fields.get((section, key), []) for w in value.split()}

    assert guard[("Unit", "DefaultDependencies")] == ["no"]  # early boot, before sysinit
    assert {"network-pre.target", "egress-agent.service"} <= words(guard, "Unit", "Before")
    assert "network-pre.target" in words(guard, "Unit", "Wants")
    assert {"nftables.service", "local-fs.target"} <= words(guard, "Unit", "After")
    assert "shutdown.target" in words(guard, "Unit", "Conflicts")
    assert guard[("Service", "Type")] == ["oneshot"]
    assert guard[("Service", "RemainAfterExit")] == ["yes"]
    assert ("Install", "WantedBy") not in guard  # pulled in by the agent
    exec_start = guard[("Service", "ExecStart")][0].split()
    args = _parser().parse_args(exec_start[1:])
    assert (args.command, args.state_file, args.policy) == ("boot-guard", STATE_FILE, POLICY_PATH)

    assert "egress-agent-guard.service" in words(agent, "Unit", "Wants")
    assert "egress-agent-guard.service" in words(agent, "Unit", "After")
    assert "nftables.service" in words(agent, "Unit", "After")


# --- the Vagrantfile ------------------------------------------------------------


def _vagrant(tmp_path: Path, *args: str, provider: str | None = None) -> str:
    """Run vagrant offline with its state (~/.vagrant.d, .vagrant) in tmp_path."""
    vagrant = _tool("vagrant", "vagrant")
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    result = subprocess.run(
        [vagrant, *args, "--no-color"],
        cwd=VAGRANT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_vagrantfile_validates(tmp_path: Path) -> None:
    """Everything but the provider blocks: box, synced folder, provisioner
    (its script must exist)."""
    output = _vagrant(tmp_path, "validate", "--ignore-provider")
    assert "Vagrantfile validated successfully." in output


def test_vagrantfile_libvirt_settings_validate(tmp_path: Path) -> None:
    """The libvirt block too: vagrant-libvirt refuses unknown settings (a typo
    like ``lv.cpuz``) without a libvirt daemon. VirtualBox's block cannot be
    checked here: its provider refuses to validate without VBoxManage."""
    output = _vagrant(tmp_path, "validate", provider="libvirt")
    assert "Vagrantfile validated successfully." in output


def test_vagrantfile_networks_are_the_policys_vm_workload() -> None:
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    pinned = {
        ipaddress.ip_network(m)
        for m in re.findall(r'^[A-Z_]+_NETWORK = "([^"]+)"$', text, flags=re.MULTILINE)
    }
    assert len(pinned) == 2
    policy = load_policy(str(DEMO_POLICY))
    assert set(policy.workload("this-vm").cidrs) == pinned
    assert 'config.vm.box = "debian/bookworm64"' in text


def test_vagrantfile_gateway_role_matches_the_gateway_policy() -> None:
    """The gateway VM listens where the node's `via` points, and knows the
    node VM as its workload."""
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    addresses = dict(re.findall(r'^([A-Z_]+) = "(192\.168\.[0-9.]+)"$', text, flags=re.MULTILINE))
    policy = load_policy(str(GATEWAY_POLICY))
    assert str(policy.proxy.address_v4) == addresses["GATEWAY_LISTENER"]
    assert policy.connect is not None and policy.connect.port == 3128
    [nodes] = policy.workloads
    assert ipaddress.ip_address(addresses["NODE_ADDRESS"]) in nodes.cidrs[0]
    assert ipaddress.ip_address(addresses["GATEWAY_ADDRESS"]) in nodes.cidrs[0]
    assert '"EGRESS_AGENT_ROLE" => "gateway"' in text
    assert f'via: {{connect: "{addresses["GATEWAY_LISTENER"]}:3128"}}' in text


# --- provision.sh in dry-run mode ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DryRun:
    root: Path
    output: str

    @property
    def commands(self) -> list[str]:
        return [
            line.removeprefix("would run: ")
            for line in self.output.splitlines()
            if line.startswith("would run: ")
        ]

    def files(self) -> dict[str, Path]:
        """Every file under the root, by its path on the target system."""
        return {"/" + str(p.relative_to(self.root)): p for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture
def stub_bin(tmp_path: Path) -> Path:
    """systemctl, apt-get and journalctl that only record being called."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir()
    for name in ("systemctl", "apt-get", "journalctl"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/called"\nexit 1\n')
        stub.chmod(0o755)
    return bin_dir


def _provision(root: Path, stub_bin: Path, *args: str, env: dict[str, str] | None = None) -> DryRun:
    result = subprocess.run(
        ["bash", str(PROVISION), *args],
        env={
            **os.environ,
            "PATH": f"{stub_bin}:{os.environ['PATH']}",
            "EGRESS_AGENT_REPO": str(REPO),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (stub_bin.parent / "called").exists(), (stub_bin.parent / "called").read_text()
    return DryRun(root=root, output=result.stdout)


def _agent_check(policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egress_agent.agent.cli", "check", str(policy)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_dry_run_installs_the_unit_and_the_demo_policy(tmp_path: Path, stub_bin: Path) -> None:
    root = tmp_path / "root"
    run = _provision(root, stub_bin, "--dry-run", "--root", str(root))

    files = run.files()
    assert sorted(files) == [POLICY_PATH, GUARD_PATH, UNIT_PATH]
    assert files[UNIT_PATH].read_bytes() == UNIT_SOURCE.read_bytes()
    assert files[GUARD_PATH].read_bytes() == GUARD_SOURCE.read_bytes()
    assert files[POLICY_PATH].read_bytes() == DEMO_POLICY.read_bytes()
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644

    check = _agent_check(files[POLICY_PATH])
    assert check.returncode == 0, check.stderr
    assert "ok (1 workloads" in check.stderr

    assert run.commands == FIRST_RUN_COMMANDS


def test_second_dry_run_keeps_an_edited_policy_and_rewrites_nothing(
    tmp_path: Path, stub_bin: Path
) -> None:
    root = tmp_path / "root"
    _provision(root, stub_bin, "--dry-run", "--root", str(root))
    policy = root / POLICY_PATH.lstrip("/")
    unit = root / UNIT_PATH.lstrip("/")
    edited = policy.read_text().replace("pypi.org, files.pythonhosted.org", "pypi.org")
    policy.write_text(edited)
    unit_written = unit.stat().st_mtime_ns

    again = _provision(root, stub_bin, "--dry-run", "--root", str(root))

    assert policy.read_text() == edited
    assert unit.stat().st_mtime_ns == unit_written
    assert sorted(again.files()) == [POLICY_PATH, GUARD_PATH, UNIT_PATH]
    assert f"{POLICY_PATH} exists: kept as it is" in again.output
    assert again.commands == AGAIN_COMMANDS


def test_changed_unit_is_replaced_and_the_agent_restarted(tmp_path: Path, stub_bin: Path) -> None:
    root = tmp_path / "root"
    _provision(root, stub_bin, "--dry-run", "--root", str(root))
    unit = root / UNIT_PATH.lstrip("/")
    unit.write_text("[Service]\nExecStart=/bin/true\n")  # an older unit

    again = _provision(root, stub_bin, "--dry-run", "--root", str(root))

    assert unit.read_bytes() == UNIT_SOURCE.read_bytes()
    assert again.commands == FIRST_RUN_COMMANDS


def test_an_upgrade_that_brings_the_boot_guard_installs_it_and_restarts(
    tmp_path: Path, stub_bin: Path
) -> None:
    """An older installation had no guard unit: provisioning adds it and
    restarts the agent (a restart keeps the rules in place)."""
    root = tmp_path / "root"
    _provision(root, stub_bin, "--dry-run", "--root", str(root))
    guard = root / GUARD_PATH.lstrip("/")
    guard.unlink()

    again = _provision(root, stub_bin, "--dry-run", "--root", str(root))

    assert guard.read_bytes() == GUARD_SOURCE.read_bytes()
    assert f"installed {GUARD_PATH}" in again.output
    assert again.commands == FIRST_RUN_COMMANDS


def test_provision_root_alone_means_a_dry_run(tmp_path: Path, stub_bin: Path) -> None:
    root = tmp_path / "root"
    run = _provision(root, stub_bin, env={"PROVISION_ROOT": str(root)})
    assert sorted(run.files()) == [POLICY_PATH, GUARD_PATH, UNIT_PATH]
    assert run.commands == FIRST_RUN_COMMANDS


def test_dry_run_of_the_gateway_role_installs_the_gateway_policy(
    tmp_path: Path, stub_bin: Path
) -> None:
    root = tmp_path / "root"
    run = _provision(root, stub_bin, "--dry-run", "--root", str(root), "--role", "gateway")

    files = run.files()
    assert files[POLICY_PATH].read_bytes() == GATEWAY_POLICY.read_bytes()
    assert run.commands == FIRST_RUN_COMMANDS
    check = _agent_check(files[POLICY_PATH])
    assert check.returncode == 0, check.stderr
    assert "1 workloads, 0 intercept rules, 2 egress rules" in check.stderr


def test_provision_refuses_an_unknown_role(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(PROVISION), "--dry-run", "--root", str(tmp_path), "--role", "router"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown role 'router': node (the default) or gateway" in result.stderr
