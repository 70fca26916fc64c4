"""Node processes selected by their cgroup: a process on the node (not in a
pod) placed in a workload's cgroup is diverted and audited under the
workload's name; the same program outside the cgroup goes direct.

Each test makes a cgroup of its own under the machine's cgroup2 mount (a
unique name, removed at the end also on failure) and the agent attaches only
there. ``ip netns exec`` gives the agent a /sys of its own without the cgroup
mounts, so it is given the test's view of the mount through /proc/PID/root.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_agent.bpf.cgroup import PROGRAM, attached_programs, default_root
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from tests.harness import Agent, Audit, wait_until
from tests.lab.fakekube import pod_object, start_fakekube, write_kubeconfig, write_state

pytestmark = pytest.mark.netns

POLICY = """
version: 1
workloads:
  backup: {{cgroups: [{path}]}}
intercept:
  - from: [backup]
    ports: [9000]
egress:
  - name: backup-sink
    from: [backup]
    to: {{ports: [9000]}}
    action: allow
default: deny
"""

# Connects to the lab server, prints its own address and the server's answer
# ("ext <local> saw <peer>"): the peer the server saw is the client itself
# when direct, the proxy's upstream socket when diverted.
CLIENT = (
    "import json,socket,sys;"
    "s=socket.create_connection((sys.argv[1],9000),timeout=5);"
    "s.sendall(b'hi\\n');s.shutdown(socket.SHUT_WR);"
    "r=b''.join(iter(lambda:s.recv(4096),b''));"
    "a=s.getsockname();h=a[0] if s.family==socket.AF_INET else '['+a[0]+']';"
    "print(json.dumps({'local':'%s:%d'%(h,a[1]),'reply':r.decode().strip()}))"
)


@pytest.fixture
def cgroup_root() -> str:
    root = default_root()
    assert root is not None, "this machine has no cgroup2 mount"
    return root


@pytest.fixture
def make_cgroup(cgroup_root: str) -> Iterator[list[str]]:
    """Names (relative paths) of cgroups the test made; removed at the end."""
    made: list[str] = []
    yield made
    for name in reversed(made):
        path = Path(cgroup_root, name)
        if not path.is_dir():
            continue
        if Path(path, "cgroup.kill").exists():
            Path(path, "cgroup.kill").write_text("1")  # only the test's clients live here
        _rmdir(path)


def _rmdir(path: Path) -> None:
    # A client that just exited may still be counted in the cgroup briefly.
    def removed() -> bool:
        try:
            path.rmdir()
        except OSError:
            return False
        return True

    wait_until(removed, timeout=5, what=f"{path} empty and removed")


def _new_name() -> str:
    return f"egress-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Node:
    def __init__(self, lab: Lab, work: Path, root: str, path: str, datapath: str) -> None:
        self.lab, self.work, self.root, self.path = lab, work, root, path
        (work / "policy.yaml").write_text(POLICY.format(path=path))
        self.log = Audit(work / "audit.jsonl")
        # The agent's view of the test's cgroup2 mount (see the module docstring).
        self.agent = Agent(
            lab,
            policy=work / "policy.yaml",
            audit=work / "audit.jsonl",
            log=work / "agent.log",
            extra_args=(
                "--datapath",
                datapath,
                "--cgroup-root",
                f"/proc/{os.getpid()}/root{root}",
                "--bpf-pin-dir",
                str(work / "bpffs" / "egress"),
            ),
        )

    def connect(self, *, in_cgroup: bool, to: str = "198.18.1.2") -> tuple[str, str]:
        """(client's own ip:port, the peer the server saw)."""
        procs = f"/proc/{os.getpid()}/root{self.root}/{self.path}/cgroup.procs"
        enter = f"echo $$ > {procs} && " if in_cgroup else ""
        out = self.lab.run(
            "node", ["sh", "-c", f'{enter}exec {sys.executable} -c "{CLIENT}" {to}']
        ).stdout
        answer = json.loads(out)
        return str(answer["local"]), str(answer["reply"]).rsplit(" saw ", 1)[1]

    def ours_attached(self) -> list[int]:
        return [i for i, name in attached_programs(self.root, self.path) if name == PROGRAM]


def test_a_node_process_in_the_cgroup_is_diverted_and_named(
    pod_and_sink: Lab, tmp_path: Path, cgroup_root: str, make_cgroup: list[str]
) -> None:
    name = _new_name()
    make_cgroup.append(name)
    Path(cgroup_root, name).mkdir()
    start_server(
        pod_and_sink,
        "ext",
        name="ext6",
        listen=["[fd00:18:1::2]:9000"],
        tls=None,
        log=tmp_path / "server6.jsonl",
    )
    node = Node(pod_and_sink, tmp_path, cgroup_root, name, "nft")
    node.agent.start()
    try:
        assert len(node.ours_attached()) == 1

        local, seen = node.connect(in_cgroup=True)
        assert seen != local  # the server saw the proxy's upstream socket
        [record] = node.log.wait(1)
        assert record["workload"] == "backup" and record["verdict"] == "allow"
        assert record["rule"] == "backup-sink" and record["src"] == local
        assert record["dst"] == "198.18.1.2:9000"

        local, seen = node.connect(in_cgroup=True, to="fd00:18:1::2")
        assert seen != local
        record = node.log.wait(2)[-1]
        assert record["workload"] == "backup" and record["src"] == local

        local, seen = node.connect(in_cgroup=False)
        assert seen == local  # direct
        # A barrier: one more diverted connection. Once its record is there,
        # a record of the direct one would be too; there is none.
        barrier, _ = node.connect(in_cgroup=True)
        assert [r["src"] for r in node.log.wait(3)[2:]] == [barrier]
    finally:
        assert node.agent.stop() == 0
    assert node.ours_attached() == []
    local, seen = node.connect(in_cgroup=True)
    assert seen == local  # no agent: the cgroup's processes go direct again


def test_a_cgroup_made_later_is_attached_and_a_crash_leaves_nothing_after_restart(
    pod_and_sink: Lab, tmp_path: Path, cgroup_root: str, make_cgroup: list[str]
) -> None:
    name = _new_name()
    make_cgroup.append(name)
    node = Node(pod_and_sink, tmp_path, cgroup_root, name, "auto")
    node.agent.start()
    try:
        assert "does not exist (yet)" in (tmp_path / "agent.log").read_text()
        status = pod_and_sink.run(
            "node", [sys.executable, "-m", "egress_agent.agent.cli", "status"], check=False
        ).stdout
        assert f"cgroups:      socket marker on none; not there yet: {name}" in status
        Path(cgroup_root, name).mkdir()
        wait_until(node.ours_attached, timeout=5, what="the new cgroup attached")
        local, seen = node.connect(in_cgroup=True)
        assert seen != local
        assert node.log.wait(1)[0]["workload"] == "backup"

        # A restarted service's cgroup is a new cgroup (new id, no programs).
        _rmdir(Path(cgroup_root, name))
        Path(cgroup_root, name).mkdir()
        wait_until(node.ours_attached, timeout=5, what="the re-made cgroup attached")
        local, seen = node.connect(in_cgroup=True)
        assert seen != local
        assert node.log.wait(2)[-1]["workload"] == "backup"

        node.agent.kill()
        # An attachment outlives the process that made it: still there.
        crashed = node.ours_attached()
        assert len(crashed) == 1
        node.agent.start()
        # The restart removed the crashed run's program and attached its own.
        restarted = node.ours_attached()
        assert len(restarted) == 1 and restarted != crashed
        local, seen = node.connect(in_cgroup=True)
        assert seen != local
        assert node.log.wait(3)[-1]["workload"] == "backup"
    finally:
        node.agent.stop()
    assert node.ours_attached() == []


def test_without_cgroup2_the_cgroup_workloads_are_refused_and_the_rest_runs(
    pod_and_sink: Lab, tmp_path: Path, cgroup_root: str, make_cgroup: list[str]
) -> None:
    name = _new_name()
    make_cgroup.append(name)
    Path(cgroup_root, name).mkdir()
    node = Node(pod_and_sink, tmp_path, cgroup_root, name, "nft")
    (tmp_path / "policy.yaml").write_text(
        POLICY.format(path=name)
        .replace("workloads:\n", "workloads:\n  pod: {cidrs: [198.19.1.2/32]}\n")
        .replace("from: [backup]\n    ports", "from: [backup, pod]\n    ports")
        .replace("from: [backup]\n    to", "from: [backup, pod]\n    to")
    )
    # Not a cgroup2 mount: the marker cannot attach anywhere.
    not_cgroup2 = tmp_path / "not-cgroup2"
    not_cgroup2.mkdir()
    args = list(node.agent.extra_args)
    args[args.index("--cgroup-root") + 1] = str(not_cgroup2)
    node.agent.extra_args = tuple(args)
    node.agent.start()
    try:
        log = (tmp_path / "agent.log").read_text()
        assert "cgroup workloads backup refused:" in log
        assert f"{not_cgroup2} is not a cgroup v2 mount" in log
        out = pod_and_sink.run(
            "node", [sys.executable, "-m", "egress_agent.agent.cli", "status", "--json"]
        ).stdout
        assert "is not a cgroup v2 mount" in json.loads(out)["cgroups"]["refused"]
        text = pod_and_sink.run(
            "node", [sys.executable, "-m", "egress_agent.agent.cli", "status"], check=False
        ).stdout
        assert "cgroups:      REFUSED: " in text
        # The pod is still diverted; the cgroup's processes go direct.
        client = [sys.executable, "-m", "egress_agent.lab.client", "198.18.1.2", "9000"]
        assert json.loads(pod_and_sink.run("pod", client).stdout)["ok"]
        assert [r["workload"] for r in node.log.wait(1)] == ["pod"]
        local, seen = node.connect(in_cgroup=True)
        assert seen == local
        assert node.ours_attached() == []
    finally:
        assert node.agent.stop() == 0


def test_reloads_add_and_remove_a_cgroup_workload(
    pod_and_sink: Lab, tmp_path: Path, cgroup_root: str, make_cgroup: list[str]
) -> None:
    name = _new_name()
    make_cgroup.append(name)
    Path(cgroup_root, name).mkdir()
    node = Node(pod_and_sink, tmp_path, cgroup_root, name, "auto")
    with_cgroup = (tmp_path / "policy.yaml").read_text()
    without = with_cgroup.replace(f"{{cgroups: [{name}]}}", "{cidrs: [198.19.1.2/32]}")
    (tmp_path / "policy.yaml").write_text(without)
    node.agent.start()
    try:
        assert node.ours_attached() == []
        local, seen = node.connect(in_cgroup=True)
        assert seen == local

        def reload_to(text: str, attached: int) -> None:
            generation = node.agent.generation()
            (tmp_path / "policy.yaml").write_text(text)
            # The new policy in force (its table committed), then the cgroup
            # attachments, which come after the table in the same commit.
            node.agent.wait_generation(generation, timeout=10)
            wait_until(
                lambda: len(node.ours_attached()) == attached,
                timeout=10,
                what=f"{attached} attachment(s) after the reload",
            )

        reload_to(with_cgroup, 1)
        # The output rules come with the same reload: new sockets are diverted.
        local, seen = node.connect(in_cgroup=True)
        assert seen != local, "not diverted after the reload"
        assert node.log.wait(1)[-1]["workload"] == "backup"

        reload_to(without, 0)
        local, seen = node.connect(in_cgroup=True)
        assert seen == local
    finally:
        assert node.agent.stop() == 0
    assert node.ours_attached() == []


HOST_NETWORK_POLICY = """
version: 1
workloads:
  exporter: {pods: {namespace: mon, labels: {app: exporter}, hostNetwork: true}}
intercept:
  - from: [exporter]
    ports: [9000]
egress:
  - name: exporter-sink
    from: [exporter]
    to: {ports: [9000]}
    action: allow
default: deny
"""


def test_a_host_network_pod_is_found_by_its_cgroup(
    pod_and_sink: Lab,
    tmp_path: Path,
    cgroup_root: str,
    make_cgroup: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kubelet's tree (systemd driver) inside a cgroup of the test's own,
    # which the agent takes as its cgroup root.
    base = _new_name()
    node_name, api_port = "node-a", 16444
    state = {
        "namespaces": [{"name": "mon", "labels": {}}],
        "pods": [
            {
                "namespace": "mon",
                "name": "exporter-1",
                "labels": {"app": "exporter"},
                "nodeName": node_name,
                "hostNetwork": True,
                "phase": "Running",
            }
        ],
    }
    uid = pod_object(state["pods"][0])["metadata"]["uid"]
    qos = "kubepods.slice/kubepods-besteffort.slice"
    pod_dir = f"{qos}/kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    make_cgroup += [base, f"{base}/kubepods.slice", f"{base}/{qos}", f"{base}/{pod_dir}"]
    Path(cgroup_root, base).mkdir()
    write_state(tmp_path / "state.json", state)
    start_fakekube(
        pod_and_sink,
        "node",
        port=api_port,
        state=tmp_path / "state.json",
        log=tmp_path / "fakekube.log",
    )
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{api_port}")
    monkeypatch.setenv("NODE_NAME", node_name)
    node = Node(pod_and_sink, tmp_path, cgroup_root, f"{base}/{pod_dir}", "auto")
    (tmp_path / "policy.yaml").write_text(HOST_NETWORK_POLICY)
    args = list(node.agent.extra_args)
    args[args.index("--cgroup-root") + 1] = f"/proc/{os.getpid()}/root{cgroup_root}/{base}"
    node.agent.extra_args = (*args, "--kubeconfig", str(kubeconfig))
    node.agent.start()
    try:
        # The pod is listed before its cgroup exists (the kubelet makes it
        # later): found by the drift round's scan.
        for rel in ("kubepods.slice", qos, pod_dir):
            Path(cgroup_root, base, rel).mkdir()
        # Drift rounds are 2 s apart; under load a round, or the pod's listing
        # before it, can take several times that.
        wait_until(node.ours_attached, timeout=20, what="the pod's cgroup attached")
        local, seen = node.connect(in_cgroup=True)
        assert seen != local
        [record] = node.log.wait(1)
        assert record["workload"] == "exporter" and record["src"] == local
        local, seen = node.connect(in_cgroup=False)
        assert seen == local
    finally:
        assert node.agent.stop() == 0
    assert node.ours_attached() == []


def test_a_handover_leaves_the_successors_marker_alone_on_the_cgroup(
    pod_and_sink: Lab, tmp_path: Path, cgroup_root: str, make_cgroup: list[str]
) -> None:
    name = _new_name()
    make_cgroup.append(name)
    Path(cgroup_root, name).mkdir()
    node = Node(pod_and_sink, tmp_path, cgroup_root, name, "auto")
    old = node.agent
    new = Agent(
        pod_and_sink,
        policy=old.policy,
        audit=old.audit,
        log=tmp_path / "new.log",
        extra_args=old.extra_args,
    )
    old.start()
    try:
        before = node.ours_attached()
        assert len(before) == 1
        new.start()
        assert old.proc is not None and old.proc.wait(timeout=10) == 0  # handed over, left
        after = node.ours_attached()
        assert len(after) == 1 and after != before
        node.agent = new
        local, seen = node.connect(in_cgroup=True)
        assert seen != local
        assert node.log.wait(1)[-1]["workload"] == "backup"
    finally:
        if new.proc is not None:
            new.stop()
        if old.proc is not None and old.proc.poll() is None:
            old.kill()
    assert node.ours_attached() == []
