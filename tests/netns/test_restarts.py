"""Restarts on a VM, driven the way systemd drives them: under ``fail:
closed`` no diverted connection goes direct across a restart (SIGTERM, then
the successor's ExecStart), a crash (SIGKILL, then a start), a reload
(SIGHUP), the unit's ExecStopPost cleanup (a fake ``systemctl`` reports a
restart job or a stop job), and a boot (the guard with no agent, then the
agent; or a policy the agent cannot read).

Each is judged from the workload's side: a pod connects continuously across
the event and counts what answered -- the sink saw the proxy (proxied), the
sink saw the pod itself (direct), or nothing answered (refused) -- and the
sink's own log must hold no connection from the pod's address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from shlex import quote as shlex_quote
from typing import Any

import pytest

from egress_agent.bpf.cgroup import PROGRAM, attached_programs, default_root
from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log
from tests.harness import wait_until

pytestmark = pytest.mark.netns

POD = "198.19.1.2"

POLICY = f"""
version: 1
workloads:
  pod: {{cidrs: [{POD}/32]}}
intercept:
  - from: [pod]
    ports: [9000]
egress:
  - name: sink
    to: {{ports: [9000]}}
    action: allow
default: deny
"""

# One connection at a time until the file STOP exists: who answered each.
PROBE = """
import json, os, socket, time
counts = {"direct": 0, "proxied": 0, "refused": 0}
errors = []
end = time.time() + 120
while time.time() < end and not os.path.exists(STOP):
    try:
        with socket.create_connection(("198.18.1.2", 9000), timeout=3) as s:
            s.sendall(b"probe\\n")
            reply = s.recv(200).decode()
        if " saw " not in reply:
            raise ConnectionError("closed without an answer")
        counts["direct" if " saw POD:" in reply else "proxied"] += 1
    except OSError as exc:
        counts["refused"] += 1
        if len(errors) < 3:
            errors.append(repr(exc))
    time.sleep(0.01)
print(json.dumps({**counts, "errors": errors}))
"""

# What `systemctl list-jobs --no-legend` prints, per scenario.
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "{log}"
[ "$1" = list-jobs ] && cat "{jobs}"
exit 0
"""


def _agent(lab: Lab, work: Path, name: str, *args: str, **kw: Any) -> AgentProcess:
    return AgentProcess(
        lab,
        policy=work / "policy.yaml",
        audit=work / "audit.jsonl",
        log=work / f"{name}.log",
        # A pin folder of the lab's own: cleanup removes the one the state names.
        extra_args=(
            "--on-stop",
            "keep",
            "--state-file",
            str(work / "state.json"),
            "--bpf-pin-dir",
            f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}",
            *args,
        ),
        **kw,
    )


def _across(
    lab: Lab, work: Path, event: Callable[[], None], *, after: float = 1.5
) -> dict[str, Any]:
    """Probe from a second before ``event`` until ``after`` seconds past its
    end; the counts, and the sink's connections from the pod itself."""
    stop = work / "probe-stop"
    stop.unlink(missing_ok=True)
    sink_log = work / "server.jsonl"
    before = len(read_log(sink_log))
    script = f"STOP = {str(stop)!r}\n" + textwrap.dedent(PROBE).replace("POD", POD)
    probe = lab.popen("pod", [sys.executable, "-c", script], stdout=-1, stderr=-1, text=True)
    try:
        time.sleep(1.0)
        event()
        time.sleep(after)
        stop.touch()
        out, err = probe.communicate(timeout=30)
        assert probe.returncode == 0, err
    finally:
        if probe.poll() is None:
            probe.kill()
    counts: dict[str, Any] = json.loads(out)
    # The sink logs a connection when it ends: wait for every answered one.
    answered = before + counts["direct"] + counts["proxied"]
    wait_until(
        lambda: len(read_log(sink_log, timeout=0)) >= answered,
        timeout=10,
        what=f"the sink's records of the {answered - before} answered probe connections",
    )
    sink = read_log(sink_log, timeout=0)
    counts["sink_saw_pod"] = sum(1 for r in sink if str(r.get("peer", "")).startswith(POD + ":"))
    return counts


def _table(lab: Lab) -> bool:
    return "egress_agent" in lab.run("node", ["nft", "list", "tables"]).stdout


def _proxy_addresses(lab: Lab) -> bool:
    return "169.254." in lab.run("node", ["ip", "-4", "addr", "show", "dev", "lo"]).stdout


def _cleanup(lab: Lab, work: Path, jobs: str) -> str:
    """Run the unit's ExecStopPost with a systemctl that lists ``jobs``."""
    fake = work / "fake-bin"
    fake.mkdir(exist_ok=True)
    (work / "jobs").write_text(jobs)
    systemctl = fake / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL.format(log=work / "systemctl.log", jobs=work / "jobs"))
    systemctl.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SERVICE_RESULT": "success",
        "EXIT_STATUS": "0",
    }
    done = lab.run(
        "node",
        [
            sys.executable,
            "-m",
            "egress_agent.agent.cli",
            "cleanup",
            "--systemd-unit",
            "egress-agent.service",
            "--state-file",
            str(work / "state.json"),
        ],
        env=env,
    )
    assert "systemctl list-jobs" in (work / "systemctl.log").read_text()
    return done.stderr


def _report(what: str, counts: dict[str, Any]) -> None:
    print(
        f"{what}: direct {counts['direct']}, proxied {counts['proxied']},"
        f" refused {counts['refused']}; the sink saw the pod {counts['sink_saw_pod']} times"
    )


def _probe_around(
    lab: Lab, work: Path, what: str, event: Callable[[], None], *, then_stop: AgentProcess
) -> dict[str, Any]:
    """Probe across ``event``, stop the agent left running, print the counts."""
    try:
        counts = _across(lab, work, event)
    finally:
        then_stop.stop()
    _report(what, counts)
    return counts


def _never_direct(counts: dict[str, Any]) -> None:
    assert counts["direct"] == 0 and counts["sink_saw_pod"] == 0, counts
    assert counts["proxied"] > 20, counts


@pytest.fixture
def work(pod_and_sink: Lab, tmp_path: Path) -> Path:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return tmp_path


def _bpf_args(lab: Lab, datapath: str) -> tuple[str, ...]:
    return ("--datapath", datapath, "--bpf-pin-dir", f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}")


@pytest.mark.parametrize("datapath", ["nft", "bpf"])
def test_a_restart_refuses_for_a_moment_and_never_sends_direct(
    pod_and_sink: Lab, work: Path, datapath: str
) -> None:
    """`systemctl restart`: SIGTERM, the agent exits leaving its state, then
    the successor's ExecStart adopts it. Type=notify: READY=1 comes with
    "ready:"."""
    lab = pod_and_sink
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(work / "notify"))
    notify.settimeout(0)
    env = {**os.environ, "NOTIFY_SOCKET": str(work / "notify")}
    args = _bpf_args(lab, datapath)
    old = _agent(lab, work, "old", *args, env=env).start(timeout=60)
    assert notify.recv(200).startswith(b"READY=1")
    new = _agent(lab, work, "new", *args, env=env)

    def restart() -> None:
        assert old.stop() == 0
        assert _table(lab) and _proxy_addresses(lab)  # kept while no agent runs
        new.start(timeout=60)

    try:
        counts = _across(lab, work, restart)
    finally:
        new.stop()
        notify.close()
    _report(f"restart ({datapath})", counts)
    _never_direct(counts)
    assert "leaving table inet egress_agent" in (work / "old.log").read_text()
    state = json.loads((work / "state.json").read_text())
    assert state["fail_open"] is False and state["policy_path"] == str(work / "policy.yaml")


def test_a_crash_and_restart_never_sends_direct(pod_and_sink: Lab, work: Path) -> None:
    lab = pod_and_sink
    old = _agent(lab, work, "old", "--datapath", "nft").start()
    new = _agent(lab, work, "new", "--datapath", "nft")

    def crash() -> None:
        old.kill()
        time.sleep(1.0)  # systemd's RestartSec, shortened
        new.start()

    counts = _probe_around(lab, work, "crash (SIGKILL) and start", crash, then_stop=new)
    _never_direct(counts)
    assert counts["refused"] > 0, counts  # the moment with no agent


def test_a_reload_neither_refuses_nor_sends_direct(pod_and_sink: Lab, work: Path) -> None:
    """`systemctl reload`: SIGHUP with a changed file is one transaction."""
    lab = pod_and_sink
    agent = _agent(lab, work, "agent", "--datapath", "nft").start()

    def reload() -> None:
        (work / "policy.yaml").write_text(POLICY.replace("name: sink", "name: sink-v2"))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)

    counts = _probe_around(lab, work, "reload (SIGHUP)", reload, then_stop=agent)
    _never_direct(counts)
    assert counts["refused"] == 0, counts
    assert "reloaded (" in (work / "agent.log").read_text()


def test_exec_stop_post_keeps_the_state_for_a_restart_and_removes_it_on_stop(
    pod_and_sink: Lab, work: Path
) -> None:
    """The unit's ExecStopPost runs after every end of the agent: with a
    restart job queued it leaves everything in place; with a stop job it
    removes everything and says so."""
    lab = pod_and_sink
    old = _agent(lab, work, "old", "--datapath", "nft").start()
    new = _agent(lab, work, "new", "--datapath", "nft")
    said: list[str] = []

    def restart() -> None:
        assert old.stop() == 0
        said.append(_cleanup(lab, work, "41 egress-agent.service restart running\n"))
        assert _table(lab)
        new.start()

    counts = _probe_around(
        lab, work, "restart with ExecStopPost (restart job)", restart, then_stop=new
    )
    _never_direct(counts)
    assert "is not being stopped" in said[0], said
    assert _table(lab) and _proxy_addresses(lab)

    # A crash before systemd's automatic restart: no job at all.
    assert "is not being stopped" in _cleanup(lab, work, "")
    assert _table(lab)
    # The machine shutting down: the kernel state goes with it.
    shutdown = "7 reboot.target start waiting\n9 egress-agent.service stop running\n"
    assert "is not being stopped" in _cleanup(lab, work, shutdown)
    assert _table(lab)

    # `systemctl stop` (or disable --now): everything goes, and the log says so.
    stopped = _cleanup(lab, work, "42 egress-agent.service stop running\n")
    assert "systemd is stopping egress-agent.service" in stopped, stopped
    assert "removed table inet egress_agent" in stopped, stopped
    assert "nothing is diverted any more" in stopped, stopped
    assert not _table(lab) and not _proxy_addresses(lab)
    out = lab.run("pod", [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", "9000"])
    assert f"saw {POD}:" in out.stdout  # stopped means direct, as asked


def _boot(lab: Lab, work: Path) -> None:
    """A machine where the agent ran once (its state saved), then rebooted:
    the kernel state is gone, the saved state is not."""
    first = _agent(lab, work, "first", "--datapath", "nft").start()
    first.stop()
    _cleanup(lab, work, "1 egress-agent.service stop running\n")
    assert not _table(lab) and (work / "state.json").exists()


def _guard(lab: Lab, work: Path, *args: str) -> str:
    done = lab.run(
        "node",
        [
            sys.executable,
            "-m",
            "egress_agent.agent.cli",
            "boot-guard",
            "--state-file",
            str(work / "state.json"),
            *args,
        ],
    )
    return done.stderr


def test_at_boot_the_guard_refuses_until_the_agent_has_started(
    pod_and_sink: Lab, work: Path
) -> None:
    lab = pod_and_sink
    _boot(lab, work)
    said = _guard(lab, work)
    assert "installed table inet egress_agent from" in said, said
    assert "generation 1 of" in said, said
    agent = _agent(lab, work, "agent", "--datapath", "nft")

    def start() -> None:
        time.sleep(2.0)  # the network comes up, workloads send, the agent is not there yet
        agent.start()

    counts = _probe_around(lab, work, "boot: guard, then the agent", start, then_stop=agent)
    _never_direct(counts)
    assert counts["refused"] > 10, counts
    # The guard sees a table in place and leaves it.
    _boot(lab, work)
    _guard(lab, work)
    assert "already in place" in _guard(lab, work)


def test_at_boot_an_unreadable_policy_leaves_the_workloads_refused(
    pod_and_sink: Lab, work: Path
) -> None:
    lab = pod_and_sink
    _boot(lab, work)
    _guard(lab, work)
    (work / "policy.yaml").unlink()  # the agent cannot read it
    agent = _agent(lab, work, "agent", "--datapath", "nft")
    said: list[str] = []

    def start() -> None:
        with pytest.raises(RuntimeError, match="exited with 2"):
            agent.start()
        # ExecStopPost after the failed start: its start job, no stop job.
        said.append(_cleanup(lab, work, "3 egress-agent.service start running\n"))

    counts = _across(lab, work, start)
    _report("boot with an unreadable policy", counts)
    assert counts["direct"] == 0 and counts["sink_saw_pod"] == 0, counts
    assert counts["proxied"] == 0 and counts["refused"] > 20, counts
    assert "is not being stopped" in said[0]
    assert _table(lab)


def test_on_first_boot_the_guard_renders_the_policy(pod_and_sink: Lab, work: Path) -> None:
    """No state saved yet (the agent never ran here): the policy file is used."""
    lab = pod_and_sink
    said = _guard(lab, work, "--policy", str(work / "policy.yaml"))
    assert "rendering from" in said and "installed table inet egress_agent" in said, said
    counts = _across(lab, work, lambda: None)
    _report("first boot: guard from the policy, no agent", counts)
    assert counts["direct"] == 0 and counts["sink_saw_pod"] == 0, counts
    assert counts["proxied"] == 0 and counts["refused"] > 20, counts


def test_under_fail_open_a_stop_with_keep_still_removes_everything(
    pod_and_sink: Lab, work: Path
) -> None:
    """fail: open keeps its meaning: the table goes with the process, and
    the guard installs nothing."""
    lab = pod_and_sink
    (work / "policy.yaml").write_text(POLICY + "fail: open\n")
    agent = _agent(lab, work, "agent", "--datapath", "nft").start()
    agent.stop()
    assert not _table(lab)
    assert "removing table inet egress_agent" in (work / "agent.log").read_text()
    assert "fails open: nothing installed" in _guard(lab, work)
    assert not _table(lab)


# A node process in a cgroup workload, one connection at a time until STOP:
# direct when the sink saw the client's own address and port.
CGROUP_PROBE = """
import json, os, socket, time
counts = {"direct": 0, "proxied": 0, "refused": 0}
end = time.time() + 120
while time.time() < end and not os.path.exists(STOP):
    try:
        with socket.create_connection(("198.18.1.2", 9000), timeout=3) as s:
            s.sendall(b"probe\\n")
            reply = s.recv(200).decode()
            local = "%s:%d" % s.getsockname()[:2]
        if " saw " not in reply:
            raise ConnectionError("closed without an answer")
        counts["direct" if reply.strip().endswith(" saw " + local) else "proxied"] += 1
    except OSError:
        counts["refused"] += 1
    time.sleep(0.005)
print(json.dumps(counts))
"""


def test_a_cgroup_workload_is_never_direct_across_a_restart(pod_and_sink: Lab, work: Path) -> None:
    """A node process selected by its cgroup (a backup service on a VM): the
    socket marker stays attached while no agent runs, so its connections are
    refused, and the successor attaches its own before it detaches the old
    one, so no socket is ever created unmarked."""
    lab = pod_and_sink
    root = default_root()
    assert root is not None, "this machine has no cgroup2 mount"
    name = f"egress-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cgroup = Path(root, name)
    cgroup.mkdir()
    (work / "policy.yaml").write_text(
        POLICY.replace(f"{{cidrs: [{POD}/32]}}", f"{{cgroups: [{name}]}}")
    )
    # `ip netns exec` mounts a /sys of its own: reach the cgroup2 mount through ours.
    seen_root = f"/proc/{os.getpid()}/root{root}"
    args = ("--datapath", "nft", "--cgroup-root", seen_root)
    args += ("--bpf-pin-dir", str(work / "bpffs" / "egress"))
    old = _agent(lab, work, "old", *args).start(timeout=60)
    new = _agent(lab, work, "new", *args)
    stop = work / "probe-stop"
    script = f"STOP = {str(stop)!r}\n" + textwrap.dedent(CGROUP_PROBE)
    enter = f"echo $$ > {seen_root}/{name}/cgroup.procs && exec "
    probe = lab.popen(
        "node",
        ["sh", "-c", f"{enter}{sys.executable} -c {shlex_quote(script)}"],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    try:
        time.sleep(1.0)
        before = {i for i, n in attached_programs(root, name) if n == PROGRAM}
        assert old.stop() == 0
        assert {i for i, n in attached_programs(root, name) if n == PROGRAM} == before  # kept
        new.start(timeout=60)
        time.sleep(1.5)
        stop.touch()
        out, err = probe.communicate(timeout=30)
        assert probe.returncode == 0, err
        after = {i for i, n in attached_programs(root, name) if n == PROGRAM}
    finally:
        if probe.poll() is None:
            probe.kill()
        new.stop()
        if Path(cgroup, "cgroup.kill").exists():
            Path(cgroup, "cgroup.kill").write_text("1")
        for _ in range(50):
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    counts = json.loads(out)
    print(
        f"restart, cgroup workload: direct {counts['direct']}, proxied {counts['proxied']},"
        f" refused {counts['refused']}"
    )
    assert counts["direct"] == 0, counts
    assert counts["proxied"] > 20 and counts["refused"] > 0, counts
    assert len(after) == 1 and after != before  # the successor's, the old one detached
