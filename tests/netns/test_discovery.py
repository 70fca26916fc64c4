"""Pod discovery end to end: a workload named by a pod selector is diverted
while the pod carries the labels, stops being diverted within seconds of a
label change, comes back when the labels do, and stays enforced when the API
server goes away.

The agent runs in the node namespace with ``--kubeconfig`` pointing at the
fake API server (``tests/lab/fakekube.py``) on the node's loopback, whose
pods and namespaces come from a state file the test rewrites. Whether a
connection was diverted is read from the server's answer (``... saw IP:PORT``):
the node's address 198.18.1.1 means through the proxy, the pod's 198.19.1.2
means direct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from tests.harness import Audit
from tests.lab.fakekube import start_fakekube, write_kubeconfig, write_state

pytestmark = pytest.mark.netns

NODE = "node-a"
API_PORT = 16443
POD = "198.19.1.2"
PROXY_SIDE = "198.18.1.1"  # the node's address towards ext: what the server sees when diverted
SINK = ("198.18.1.2", 9000)
SINK_ARGS = (SINK[0], str(SINK[1]))

POLICY = """\
version: 1
workloads:
  pg: {pods: {namespace: db, labels: {app: pg}}}
intercept:
  - from: [pg]
    ports: [9000]
egress:
  - name: pg-9000
    from: [pg]
    to: {ports: [9000]}
    action: allow
default: deny
"""

# Runs in the pod: connect until the server says it saw WANT (or LIMIT passes),
# then print one JSON line. "started" first, so that the caller changes the
# state only once the loop is already polling.
POLL = """
import json, socket, sys, time
host, port, want = sys.argv[1], int(sys.argv[2]), sys.argv[3]
limit, every = float(sys.argv[4]), float(sys.argv[5])
print("started", flush=True)
end, tries = time.time() + limit, 0
while time.time() < end:
    tries += 1
    try:
        s = socket.create_connection((host, port), timeout=1)
        local = s.getsockname()[1]
        s.sendall(b"x\\n")
        saw = s.recv(200).decode().rsplit(" saw ", 1)[-1].rpartition(":")[0]
        s.close()
    except OSError:
        saw = None
    if saw == want:
        print(json.dumps({"at": time.time(), "local": local, "tries": tries}), flush=True)
        break
    time.sleep(every)
else:
    print(json.dumps({"at": None, "tries": tries}), flush=True)
"""

# Runs in the pod: N connections, one after the other; prints [{local, saw}].
PROBE = """
import json, socket, sys
out = []
host, port = sys.argv[1], int(sys.argv[2])
for _ in range(int(sys.argv[3])):
    s = socket.create_connection((host, port), timeout=5)
    local = s.getsockname()[1]
    s.sendall(b"x\\n")
    saw = s.recv(200).decode().rsplit(" saw ", 1)[-1].rpartition(":")[0]
    s.close()
    out.append({"local": local, "saw": saw})
print(json.dumps(out))
"""


def state(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "namespaces": [{"name": "db", "labels": {"team": "data"}}],
        "pods": [
            {
                "namespace": "db",
                "name": "pg-1",
                "labels": labels,
                "nodeName": NODE,
                "ip": POD,
                "ip6": "fd00:19:1::2",
                "hostNetwork": False,
                "phase": "Running",
            },
            # Same labels on another node: never this agent's business.
            {
                "namespace": "db",
                "name": "pg-2",
                "labels": {"app": "pg"},
                "nodeName": "node-b",
                "ip": "198.19.9.2",
                "phase": "Running",
            },
        ],
    }


class DiscoveryAgent(AgentProcess):
    """``egress-agent run`` with ``--kubeconfig`` and ``NODE_NAME`` set, as the
    DaemonSet runs it."""

    def __init__(
        self, lab: Lab, *, kubeconfig: Path, work: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        super().__init__(
            lab,
            policy=work / "policy.yaml",
            audit=work / "audit.jsonl",
            log=work / "agent.log",
            extra_args=("--kubeconfig", str(kubeconfig), *extra_args),
            env={**os.environ, "NODE_NAME": NODE},
        )


class Scene:
    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab, self.work = lab, work
        self.state = work / "state.json"
        self.audit_path = work / "audit.jsonl"

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return Audit(self.audit_path).all()

    def audit_for(self, local_port: int, timeout: float = 3.0) -> dict[str, Any] | None:
        """The audit record of the pod's connection from ``local_port`` (written
        when the proxy has closed it), or None."""
        src = f"{POD}:{local_port}"
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.audit() if r["src"] == src]
            if found or time.monotonic() >= deadline:
                return found[-1] if found else None
            time.sleep(0.05)

    def probe(self, n: int = 3) -> list[dict[str, Any]]:
        out = self.lab.run("pod", [sys.executable, "-c", PROBE, *SINK_ARGS, str(n)])
        result: list[dict[str, Any]] = json.loads(out.stdout)
        return result

    def flip(self, labels: dict[str, str], want: str, limit: float) -> tuple[float, int]:
        """Write the state with ``labels`` while the pod polls; seconds from the
        write until the server first saw ``want``, and that connection's port."""
        return self.change(state(labels), want, limit)

    def change(self, new_state: dict[str, Any], want: str, limit: float) -> tuple[float, int]:
        """Write ``new_state`` while the pod polls; seconds from the write until
        the server first saw ``want``, and that connection's port."""
        poller = self.lab.popen(
            "pod",
            [sys.executable, "-c", POLL, *SINK_ARGS, want, str(limit), "0.02"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert poller.stdout is not None
        assert poller.stdout.readline().strip() == "started"
        t0 = time.time()
        write_state(self.state, new_state)
        line = poller.stdout.readline()
        poller.wait(10)
        result = json.loads(line)
        assert result["at"] is not None, f"server never saw {want} within {limit}s of the change"
        return result["at"] - t0, result["local"]

    def status(self) -> dict[str, Any]:
        out = self.lab.run(
            "node",
            [sys.executable, "-m", "egress_agent.agent.cli", "status", "--json"],
            check=False,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def assert_diverted(self, conns: list[dict[str, Any]]) -> None:
        for conn in conns:
            assert conn["saw"] == PROXY_SIDE, conn
            rec = self.audit_for(conn["local"])
            assert rec is not None, f"no audit record for {conn}"
            assert rec["workload"] == "pg" and rec["verdict"] == "allow", rec
            assert rec["dst"] == f"{SINK[0]}:{SINK[1]}", rec

    def assert_direct(self, conns: list[dict[str, Any]]) -> None:
        for conn in conns:
            assert conn["saw"] == POD, conn
        time.sleep(0.3)  # a diverted connection's record would be there by now
        srcs = {f"{POD}:{c['local']}" for c in conns}
        assert not [r for r in self.audit() if r["src"] in srcs]


def test_pod_selector_follows_labels_and_survives_the_api_server(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    scene = Scene(pod_and_sink, tmp_path)
    lab = pod_and_sink
    write_state(scene.state, state({"app": "pg"}))
    api = start_fakekube(
        lab, "node", port=API_PORT, state=scene.state, log=tmp_path / "fakekube.log"
    )
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{API_PORT}")
    (tmp_path / "policy.yaml").write_text(POLICY)
    agent = DiscoveryAgent(lab, kubeconfig=kubeconfig, work=tmp_path).start()
    windows: dict[str, float] = {}
    try:
        # 1. The pod carries app=pg: diverted, audited as workload pg.
        scene.assert_diverted(scene.probe())
        status = scene.status()
        assert status["discovery"]["addresses"] == {"pg": [f"{POD}/32", "fd00:19:1::2/128"]}

        # 2. Labels change to app=other: new connections go direct within 2 s.
        windows["undivert"], local = scene.flip({"app": "other"}, POD, limit=2.0)
        assert windows["undivert"] < 2.0
        scene.assert_direct([{"local": local, "saw": POD}, *scene.probe()])

        # 3. Labels back: diverted again.
        windows["divert"], local = scene.flip({"app": "pg"}, PROXY_SIDE, limit=5.0)
        scene.assert_diverted([{"local": local, "saw": PROXY_SIDE}, *scene.probe()])

        # 4. The API server goes away: the last known pods stay enforced, and
        # status says discovery is failing while the policy is still in force.
        generation = scene.status()["policy"]["generation"]
        t0 = time.time()
        api.terminate()
        api.wait(5)
        deadline = time.monotonic() + 10
        while not (status := scene.status())["discovery"]["error"]:
            assert time.monotonic() < deadline, f"no discovery error in status: {status}"
            time.sleep(0.1)
        windows["error_in_status"] = time.time() - t0
        scene.assert_diverted(scene.probe())
        assert status["discovery"]["synced"] is True
        assert status["discovery"]["addresses"] == {"pg": [f"{POD}/32", "fd00:19:1::2/128"]}
        assert status["policy"]["generation"] == generation
        assert status["kernel_in_sync"] is True
        print(
            f"\nstatus after the API server stopped: ready={status['ready']} "
            f"error={status['discovery']['error'][:160]!r}"
        )
    finally:
        assert agent.stop() == 0
    print(
        "label -> not diverted: {undivert:.3f}s; label -> diverted: {divert:.3f}s; "
        "API server stopped -> error in status: {error_in_status:.3f}s".format(**windows)
    )
    # The agent's log tells the story too.
    log = (tmp_path / "agent.log").read_text()
    assert "pods changed: generation" in log


def test_an_address_reused_while_its_pod_terminates_follows_the_new_pod(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    """The network plugin gave the terminating pg-1's address to web-1 before
    pg-1 was gone from the API: the address is web-1's, so its traffic is not
    taken for pg's."""
    scene = Scene(pod_and_sink, tmp_path)
    lab = pod_and_sink
    reused = state({"app": "pg"})
    reused["pods"][0].update(created="2026-11-25T09:00:00Z", deleting="2026-11-25T10:00:00Z")
    web = {
        "namespace": "db",
        "name": "web-1",
        "labels": {"app": "web"},
        "nodeName": NODE,
        "ip": POD,
        "phase": "Running",
        "created": "2026-11-25T10:00:01Z",
    }
    reused["pods"].append(web)
    write_state(scene.state, reused)
    start_fakekube(lab, "node", port=API_PORT, state=scene.state, log=tmp_path / "fakekube.log")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{API_PORT}")
    (tmp_path / "policy.yaml").write_text(POLICY)
    agent = DiscoveryAgent(lab, kubeconfig=kubeconfig, work=tmp_path).start()
    try:
        scene.assert_direct(scene.probe())
        # pg-1 keeps its IPv6 address, which nobody else lists.
        assert scene.status()["discovery"]["addresses"] == {"pg": ["fd00:19:1::2/128"]}
        # web-1 goes away: the address is pg-1's again (terminating, but alone).
        reused["pods"].remove(web)
        write_state(scene.state, reused)
        deadline = time.monotonic() + 5
        while scene.status()["discovery"]["addresses"]["pg"] != [f"{POD}/32", "fd00:19:1::2/128"]:
            assert time.monotonic() < deadline, scene.status()
            time.sleep(0.1)
        scene.assert_diverted(scene.probe())
    finally:
        assert agent.stop() == 0
    log = (tmp_path / "agent.log").read_text()
    assert (
        f"address {POD} is listed by db/web-1 and db/pg-1 (terminating): it identifies db/web-1"
        in log
    )


def test_a_new_pod_is_diverted_once_the_api_lists_it(pod_and_sink: Lab, tmp_path: Path) -> None:
    """The window a new pod has before it is diverted: from the moment the API
    server lists it with its address until its connections reach the proxy.
    (A real pod's own window also includes the kubelet's status update, which
    publishes the address after the network plugin assigned it: see README.)"""
    scene = Scene(pod_and_sink, tmp_path)
    lab = pod_and_sink
    empty = state({"app": "pg"})
    empty["pods"] = empty["pods"][1:]  # only the pod on another node
    write_state(scene.state, empty)
    start_fakekube(lab, "node", port=API_PORT, state=scene.state, log=tmp_path / "fakekube.log")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{API_PORT}")
    (tmp_path / "policy.yaml").write_text(POLICY)
    agent = DiscoveryAgent(lab, kubeconfig=kubeconfig, work=tmp_path).start()
    windows = []
    try:
        scene.assert_direct(scene.probe())
        for _ in range(3):
            window, local = scene.change(state({"app": "pg"}), PROXY_SIDE, limit=5.0)
            windows.append(window)
            scene.assert_diverted([{"local": local, "saw": PROXY_SIDE}])
            back, _ = scene.change(empty, POD, limit=5.0)
            assert back < 5.0
    finally:
        assert agent.stop() == 0
    assert max(windows) < 2.0
    print("new pod listed -> diverted: " + ", ".join(f"{w * 1000:.0f} ms" for w in windows))


SPOOF = """
from scapy.all import IP, TCP, conf, send
conf.verb = 0
send(IP(src="198.19.1.2", dst="198.18.1.2") / TCP(sport=40000, dport=9000, flags="S"), iface="eth0")
"""


def _pg_diversions(lab: Lab) -> int:
    listing = json.loads(
        lab.run("node", ["nft", "-j", "list", "chain", "inet", "egress_agent", "prerouting"]).stdout
    )
    return sum(
        e["counter"]["packets"]
        for item in listing["nftables"]
        if (rule := item.get("rule")) and rule.get("comment") == "intercept[0] from pg"
        for e in rule["expr"]
        if "counter" in e
    )


def test_a_pod_workload_is_bound_to_its_pods_host_side_interface(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    """Discovery finds the node's interface towards each selected pod and binds
    the workload to it: another pod sending with pg-1's address is not pg."""
    scene = Scene(pod_and_sink, tmp_path)
    lab = pod_and_sink
    pod_if = lab.hosts["pod"].node_ifname
    lab.add_pod("other", "198.19.2.2", "fd00:19:2::2")
    write_state(scene.state, state({"app": "pg"}))
    start_fakekube(lab, "node", port=API_PORT, state=scene.state, log=tmp_path / "fakekube.log")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{API_PORT}")
    (tmp_path / "policy.yaml").write_text(POLICY)
    agent = DiscoveryAgent(
        lab, kubeconfig=kubeconfig, work=tmp_path, extra_args=("--datapath", "nft")
    ).start()
    try:
        assert scene.status()["discovery"]["interfaces"] == {"pg": [pod_if]}
        scene.assert_diverted(scene.probe(1))
        before = _pg_diversions(lab)
        lab.run("other", [sys.executable, "-c", SPOOF], timeout=60)
        assert _pg_diversions(lab) == before  # pretending to be pg-1 from elsewhere: not pg
        lab.run("pod", [sys.executable, "-c", SPOOF], timeout=60)
        assert _pg_diversions(lab) == before + 1  # pg-1 itself, from its own veth
    finally:
        assert agent.stop() == 0
