"""The BPF datapath in real namespaces: it decides like the model and like
the nftables datapath, changes live by map diffs, keeps spoofers out, repairs
a removed filter, attaches to new pod veths, and leaves nothing behind.

What counts as "diverted" is what a user sees: the external server saw the
node's address (the proxy connected for the pod) instead of the pod's own.
A flow the classifier drops (a bound workload's address on another pod's
interface) never reaches the server.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import start_server
from egress_agent.policy.decide import should_divert, spoofed
from egress_agent.policy.load import parse_policy
from tests import harness
from tests.harness import Agent, status_page, wait_until
from tests.lab import policygen

pytestmark = pytest.mark.netns

# One client process per pod tries every flow (at once: a dropped flow costs
# its whole timeout) and reports whom the server saw.
CLIENT = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def attempt(flow):
    dst, port = flow
    try:
        with socket.create_connection((dst, port), timeout=3) as s:
            s.sendall(b"hi\\n")
            reply = s.makefile().readline()
        return [dst, port, reply.split(" saw ")[1].rsplit(":", 1)[0].strip("[]")]
    except OSError as exc:
        return [dst, port, "error: %s" % exc]
with ThreadPoolExecutor(16) as pool:
    print(json.dumps(list(pool.map(attempt, json.loads(sys.argv[1])))))
"""


@dataclass
class BpfWorld(harness.World):
    def agent(
        self, datapath: str, policy: Path, name: str = "agent", pin_dir: Path | None = None
    ) -> Agent:
        pins = pin_dir or f"/sys/fs/bpf/egress-{self.lab.prefix.rstrip('-')}"
        return Agent(
            self.lab,
            policy=policy,
            audit=self.work / f"{name}-audit.jsonl",
            log=self.work / f"{name}.log",
            extra_args=(
                "--datapath",
                datapath,
                "--bpf-pin-dir",
                str(pins),
            ),
        ).start()

    def seen_by_server(
        self, pod: str, targets: list[tuple[str, int]]
    ) -> dict[tuple[str, int], str]:
        proc = self.lab.run(pod, [sys.executable, "-c", CLIENT, json.dumps(targets)], timeout=120)
        return {(dst, port): saw for dst, port, saw in json.loads(proc.stdout)}

    def seen_by_servers(
        self, targets: dict[str, list[tuple[str, int]]]
    ) -> dict[str, dict[tuple[str, int], str]]:
        """``seen_by_server`` for several pods at once: a flow that is dropped
        costs its whole timeout, so the pods' clients wait side by side."""
        procs = {
            pod: self.lab.popen(
                pod,
                [sys.executable, "-c", CLIENT, json.dumps(flows)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for pod, flows in targets.items()
        }
        seen = {}
        for pod, proc in procs.items():
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"the client in {pod} failed"
            seen[pod] = {(dst, port): saw for dst, port, saw in json.loads(out)}
        return seen

    def http_text(self, path: str) -> str:
        return status_page(self.lab, path)

    def status(self) -> dict[str, Any]:
        return json.loads(status_page(self.lab, "/status"))

    def nft(self, *args: str) -> Any:
        return json.loads(self.lab.run("node", ["nft", "-j", *args]).stdout)

    def table_handle(self) -> int:
        for item in self.nft("-a", "list", "table", "inet", "egress_agent")["nftables"]:
            if "table" in item:
                return int(item["table"]["handle"])
        raise AssertionError("no table")

    def prerouting_rules(self) -> list[tuple[int, str]]:
        """(handle, comment) of the prerouting rules: counters aside, unchanged
        rules keep both."""
        listing = self.nft("-a", "list", "chain", "inet", "egress_agent", "prerouting")
        return [
            (item["rule"]["handle"], item["rule"].get("comment", ""))
            for item in listing["nftables"]
            if "rule" in item
        ]

    def tc(self, *args: str) -> str:
        return self.lab.run("node", ["tc", *args]).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BpfWorld]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("bpf")
    with Lab() as lab:
        for name, v4, v6 in policygen.PODS:
            lab.add_pod(name, v4, v6)
        for name, v4, v6 in policygen.EXTERNALS:
            lab.add_external(name, v4, v6)
            listen = [f"{v4}:{p}" for p in policygen.PORTS] + [
                f"[{v6}]:{p}" for p in policygen.PORTS
            ]
            start_server(lab, name, name=name, listen=listen, tls=None, log=work / f"{name}.jsonl")
        yield BpfWorld(lab=lab, work=work)


def _reload(world: BpfWorld, agent: Agent, policy: Path, text: str) -> None:
    generation = world.status()["policy"]["generation"]
    policy.write_text(text)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: world.status()["policy"]["generation"] > generation,
        timeout=5,
        what="the agent applied the new policy",
    )


@pytest.mark.timeout(400)
@pytest.mark.parametrize("datapath", ["bpf", "nft"])
def test_both_datapaths_divert_exactly_what_the_model_says(world: BpfWorld, datapath: str) -> None:
    seeds = [11, 23, 37, 41, 59, 61, 73, 89, 97, 101]
    outcomes: set[bool] = set()
    spoofs = 0
    policy_file = world.work / f"prop-{datapath}.yaml"
    first = policygen.random_policy(random.Random(seeds[0]))
    policy_file.write_text(policygen.to_yaml(first))
    agent = world.agent(datapath, policy_file, name=f"prop-{datapath}")
    try:
        assert world.status()["datapath"] == ("bpf" if datapath == "bpf" else "nftables")
        for i, seed in enumerate(seeds):
            policy = policygen.random_policy(random.Random(seed))
            text = policygen.to_yaml(policy)
            assert parse_policy(text) == parse_policy(policygen.to_yaml(policy))
            if i:
                _reload(world, agent, policy_file, text)
            mismatches = []
            flows_of = {
                pod: [f for f in policygen.all_flows() if f.pod == pod]
                for pod, _, _ in policygen.PODS
            }
            seen_by = world.seen_by_servers(
                {pod: [(f.dst, f.port) for f in flows] for pod, flows in flows_of.items()}
            )
            for p_index, (pod, _, _) in enumerate(policygen.PODS):
                flows, seen = flows_of[pod], seen_by[pod]
                interface = policygen.pod_ifname(p_index, pod)
                for f in flows:
                    saw = seen[(f.dst, f.port)]
                    src = ip_address(f.src)
                    # A bound workload's address arriving on another
                    # interface is dropped (the classifier at tc ingress,
                    # nftables before conntrack).
                    if spoofed(policy, src, interface=interface):
                        spoofs += 1
                        if not saw.startswith("error"):
                            mismatches.append((f.src, f.dst, f.port, f"not dropped: {saw}"))
                        continue
                    assert not saw.startswith("error"), (f, saw)
                    diverted = saw != f.src
                    want = should_divert(
                        policy,
                        src=src,
                        dst=ip_address(f.dst),
                        dst_port=f.port,
                        interface=interface,
                    )
                    outcomes.add(diverted)
                    if diverted != want:
                        mismatches.append(
                            (f.src, f.dst, f.port, "diverted" if diverted else "direct")
                        )
            assert not mismatches, f"seed {seed}:\n{text}\n{mismatches}"
        assert outcomes == {True, False}  # the policies did divert some flows, not all
        assert spoofs > 0
    finally:
        assert agent.stop() == 0


LIVE = """\
version: 1
proxy: {{port: 15001}}
workloads:
  pa: {{cidrs: [{cidrs}]}}
  pc: {{cidrs: [198.19.2.2/32]}}
intercept:
  - from: [pa, pc]
    ports: [9000]
default: allow
"""


@pytest.mark.timeout(120)
def test_workload_changes_apply_within_a_second_without_touching_the_table(
    world: BpfWorld,
) -> None:
    policy = world.work / "live.yaml"
    policy.write_text(LIVE.format(cidrs='"fd00:19:1::2/128"'))
    agent = world.agent("bpf", policy, name="live")
    try:
        handle = world.table_handle()
        prerouting = world.prerouting_rules()
        target = ("198.18.1.2", 9000)
        assert world.seen_by_server("pa", [target])[target] == "198.19.1.2"
        # A direct connection open before the change is cut by it: its
        # packets are now marked, and forward drops marked TCP whose entry
        # was not DNAT-ed (an undiverted entry is what a pre-seed leaves).
        code = textwrap.dedent(
            """
            import socket, sys, time
            s = socket.create_connection(("198.18.1.2", 9000), timeout=5)
            s.sendall(b"first\\n"); print(s.recv(200).decode().strip(), flush=True)
            sys.stdin.readline()
            s.settimeout(2)
            s.sendall(b"again\\n")
            try:
                print(s.recv(200).decode().strip(), flush=True)
            except TimeoutError:
                print("no answer", flush=True)
            """
        )
        held = world.lab.popen("pa", [sys.executable, "-c", code], stdin=-1, stdout=-1, text=True)
        assert held.stdout is not None and held.stdin is not None
        assert "saw 198.19.1.2" in held.stdout.readline()

        started = time.monotonic()
        policy.write_text(LIVE.format(cidrs='"fd00:19:1::2/128", 198.19.1.2/32'))
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: world.seen_by_server("pa", [target])[target] == "198.18.1.1",
            timeout=3,
            what="pa's new connections diverted",
        )
        took = time.monotonic() - started
        assert took < 1.0, f"{took:.2f} s"  # about 0.3 s here, 0.2 s of it the debounce
        assert world.table_handle() == handle
        assert world.prerouting_rules() == prerouting

        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "no answer"
        held.wait(10)
        dropped = [
            float(line.rsplit(" ", 1)[1])
            for line in world.http_text("/metrics").splitlines()
            if line.startswith("egress_agent_dropped_packets_total")
            and 'reason="tcp_not_diverted"' in line
        ]
        assert sum(dropped) > 0

        # Removing the CIDR again: direct within a second, same table.
        policy.write_text(LIVE.format(cidrs='"fd00:19:1::2/128"'))
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: world.seen_by_server("pa", [target])[target] == "198.19.1.2",
            timeout=3,
            what="pa's new connections direct again",
        )
        assert world.table_handle() == handle
        counters = world.status()["bpf"]
        assert counters["in_sync"] and counters["reasons"]["marked"] > 0
        metrics = world.http_text("/metrics")
        diverted = [
            line
            for line in metrics.splitlines()
            if line.startswith('egress_agent_bpf_marked_packets_total{workload="pa"}')
        ]
        assert diverted and float(diverted[0].split()[-1]) > 0
        text = world.lab.run("node", [sys.executable, "-m", "egress_agent.agent.cli", "status"])
        assert "datapath:     bpf" in text.stdout and "maps in sync" in text.stdout
    finally:
        assert agent.stop() == 0


SPOOF = """\
version: 1
workloads:
  pa: {{cidrs: [198.19.1.2/32], interfaces: [{ifname}]}}
intercept:
  - from: [pa]
    ports: [443]
default: allow
"""


def _syn(world: BpfWorld, pod: str, src: str) -> None:
    code = f"""
    from scapy.all import IP, TCP, conf, send
    conf.verb = 0
    send(IP(src="{src}", dst="198.18.1.2") / TCP(sport=40001, dport=443, flags="S"), iface="eth0")
    """
    world.lab.run(pod, [sys.executable, "-c", textwrap.dedent(code)], timeout=60)


def _divert_rule_packets(world: BpfWorld) -> int:
    listing = world.nft("list", "chain", "inet", "egress_agent", "prerouting")
    return sum(
        e["counter"]["packets"]
        for item in listing["nftables"]
        if "rule" in item and "BPF" in item["rule"].get("comment", "")
        for e in item["rule"]["expr"]
        if "counter" in e
    )


@pytest.mark.timeout(120)
def test_a_spoofed_source_from_another_interface_is_dropped(world: BpfWorld) -> None:
    policy = world.work / "spoof.yaml"
    policy.write_text(SPOOF.format(ifname=policygen.pod_ifname(0, "pa")))
    agent = world.agent("bpf", policy, name="spoof")
    try:
        before = world.status()["bpf"]["reasons"]
        _syn(world, "pc", "198.19.1.2")  # pc claims pa's address: dropped, not just unmarked
        after = world.status()["bpf"]["reasons"]
        assert after["wrong_interface"] == before["wrong_interface"] + 1
        assert after["marked"] == before["marked"]
        assert _divert_rule_packets(world) == 0
        _syn(world, "pa", "198.19.1.2")  # the real pa
        assert world.status()["bpf"]["reasons"]["marked"] == before["marked"] + 1
        assert _divert_rule_packets(world) == 1
    finally:
        assert agent.stop() == 0


def _map_alive(map_id: int) -> bool:
    import bcc

    lib = bcc.libbcc.lib
    lib.bpf_map_get_fd_by_id.restype = ct.c_int
    lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint]
    fd = lib.bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        return False
    os.close(fd)
    return True


def _our_filters(world: BpfWorld) -> list[str]:
    found = []
    for name in [h.node_ifname for h in world.lab.hosts.values()]:
        if "egress_classify" in world.tc("filter", "show", "dev", name, "ingress"):
            found.append(name)
    return found


def _clsact(world: BpfWorld) -> bool:
    return "clsact" in world.tc("qdisc", "show")


@pytest.mark.timeout(180)
def test_drift_new_links_and_cleanup_after_stop_and_after_a_crash(world: BpfWorld) -> None:
    # A bpffs of the test's own, mounted before the agent starts, so that the
    # agent's pins outlive its process (its own mount namespace) and the test
    # can see what a crash leaves and what a restart removes. Only a
    # filesystem mount under /run, removed below; no network state.
    bpffs = Path(f"/run/{world.lab.prefix}bpffs")
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        _drift_and_cleanup(world, bpffs / "egress_agent")
    finally:
        subprocess.run(["umount", str(bpffs)], check=False)
        bpffs.rmdir()


def _drift_and_cleanup(world: BpfWorld, pin_dir: Path) -> None:
    policy = world.work / "drift.yaml"
    policy.write_text(LIVE.format(cidrs="198.19.1.2/32"))
    agent = world.agent("bpf", policy, name="drift", pin_dir=pin_dir)
    status = world.status()
    ids = list(status["bpf"]["map_ids"].values())
    assert all(_map_alive(i) for i in ids)
    assert sorted(_our_filters(world)) == sorted(status["bpf"]["attached"])
    pins = {p.name for p in pin_dir.iterdir()}
    assert pins == {"egress_classify", *status["bpf"]["map_ids"]}
    # Someone removes the filter: back within 5 s, reported as a repair.
    ifname = policygen.pod_ifname(0, "pa")
    world.tc("filter", "del", "dev", ifname, "ingress")
    wait_until(lambda: ifname in _our_filters(world), timeout=5, what="the classifier re-attached")
    wait_until(lambda: world.status()["drift_repairs"] >= 1, timeout=3, what="the repair reported")
    assert world.status()["ready"]
    # Someone deletes a map entry: restored within 5 s.
    code = textwrap.dedent(
        f"""
        import ctypes as ct
        lib = ct.CDLL("libbpf.so.1")
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        fd = lib.bpf_obj_get({str(pin_dir / "egress_src_v4")!r}.encode())
        assert fd >= 0, "no pinned map"
        key = ct.create_string_buffer(8)
        assert lib.bpf_map_get_next_key(fd, None, key) == 0
        assert lib.bpf_map_delete_elem(fd, key) == 0
        """
    )
    repairs = world.status()["drift_repairs"]
    world.lab.run("node", [sys.executable, "-c", code])
    wait_until(
        lambda: world.status()["drift_repairs"] > repairs, timeout=5, what="the map entry restored"
    )
    assert world.status()["bpf"]["in_sync"]
    assert "BPF maps differ from the policy in 1 entries" in (world.work / "drift.log").read_text()
    # A pod that appears later gets the classifier at once.
    late = world.lab.add_pod("late", "198.19.9.2", "fd00:19:9::2")
    wait_until(
        lambda: late.node_ifname in _our_filters(world), timeout=2, what="the new veth attached"
    )

    # Crash: filters and pins stay (fail closed); the next start removes them first.
    agent.kill()
    assert _our_filters(world) and {p.name for p in pin_dir.iterdir()} == pins
    agent = world.agent("bpf", policy, name="drift-restart", pin_dir=pin_dir)
    new_ids = list(world.status()["bpf"]["map_ids"].values())
    assert not any(_map_alive(i) for i in ids)  # the old run's maps are gone
    assert agent.stop() == 0
    assert _our_filters(world) == []
    assert not _clsact(world)
    assert not any(_map_alive(i) for i in new_ids)
    assert not pin_dir.exists()


def _many_rules_policy() -> str:
    rules = "".join(f"  - from: [pa]\n    ports: [{1000 + i}]\n" for i in range(65))
    head = "version: 1\nworkloads:\n  pa: {cidrs: [198.19.1.2/32]}\nintercept:\n"
    return f"{head}{rules}default: allow\n"


@pytest.mark.timeout(120)
def test_auto_falls_back_to_nftables_and_says_why(world: BpfWorld) -> None:
    policy = world.work / "many.yaml"
    policy.write_text(_many_rules_policy())
    agent = world.agent("auto", policy, name="fallback")
    try:
        snap = world.status()
        assert snap["datapath"] == "nftables" and snap["ready"]
        reason = snap["bpf"]["fallback_reason"]
        assert "egress_classify" in reason and "at most 64" in reason
        log = (world.work / "fallback.log").read_text()
        assert "falling back to the nftables selection" in log
        # The nftables selection is in place instead, and no classifier is.
        comments = [c for _, c in world.prerouting_rules()]
        assert sum(c.startswith("intercept[") for c in comments) == 65
        assert not _our_filters(world)
    finally:
        assert agent.stop() == 0


@pytest.mark.timeout(120)
def test_datapath_bpf_refuses_to_start_when_it_cannot_load(world: BpfWorld) -> None:
    policy = world.work / "many-bpf.yaml"
    policy.write_text(_many_rules_policy())
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        world.agent("bpf", policy, name="refused")
    text = str(info.value)
    assert "BPF program egress_classify" in text and "does not fall back" in text
    assert not _our_filters(world) and not _clsact(world)


def test_a_kernel_rejection_names_the_program_and_the_reason(world: BpfWorld) -> None:
    # Maps of size 0 are refused by the kernel when the program is loaded.
    code = textwrap.dedent(
        """
        import ipaddress
        from egress_agent.bpf.classifier import BpfConfig, Classifier
        from egress_agent.bpf.libbpf import BpfError
        config = BpfConfig(
            divert_mark=0x800000, upstream_mark=0x6567,
            proxy_v4=ipaddress.IPv4Address("169.254.99.1"),
            proxy_v6=ipaddress.IPv6Address("fd65:6772:6573::1"),
            pin_dir="/sys/fs/bpf/never", max_sources=0,
        )
        try:
            Classifier(config)
        except BpfError as exc:
            print(exc)
        """
    )
    out = world.lab.run("node", [sys.executable, "-c", code], timeout=60).stdout
    assert out.startswith("BPF program egress_classify (classifier.bpf.c): ")
    assert "refused" in out or "failed" in out


@pytest.mark.timeout(120)
def test_a_reload_the_maps_cannot_hold_keeps_the_running_policy(world: BpfWorld) -> None:
    policy = world.work / "keep.yaml"
    policy.write_text(LIVE.format(cidrs="198.19.1.2/32"))
    agent = world.agent("bpf", policy, name="keep")
    try:
        target = ("198.18.1.2", 9000)
        assert world.seen_by_server("pa", [target])[target] == "198.18.1.1"
        policy.write_text(_many_rules_policy())
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: world.status()["last_reload"] is not None,
            timeout=5,
            what="the reload attempted",
        )
        snap = world.status()
        assert snap["policy"]["generation"] == 1 and "at most 64" in snap["last_reload"]["error"]
        assert snap["bpf"]["in_sync"] and snap["kernel_in_sync"]
        assert world.seen_by_server("pa", [target])[target] == "198.18.1.1"
    finally:
        assert agent.stop() == 0
