"""Cgroup workloads, pure parts: the policy loader, mark assignment, the
output-chain rules (golden), the sock_diag codec, mountinfo parsing."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import textwrap
from pathlib import Path

import pytest

from egress_agent.agent.cgroups import marks_by_path
from egress_agent.agent.discovery import resolve
from egress_agent.agent.podcgroups import pod_uid, scan
from egress_agent.agent.pods import PodInfo, Snapshot
from egress_agent.bpf.cgroup import (
    cgroup2_mount,
    decode_entry,
    desired_marks,
    encode_entry,
)
from egress_agent.policy.load import PolicyError, parse_policy
from egress_agent.policy.model import PodSelector, Workload, cgroup_marks
from egress_agent.proxy.sockdiag import SockDiagError, decode_mark, encode_request
from egress_agent.rules.render import render_ruleset

GOLDEN = Path(__file__).parent / "golden"

POLICY = """\
version: 1
workloads:
  web: {cidrs: [10.0.0.0/24]}
  backup: {cgroups: [system.slice/backup.service, backup.slice/]}
  cron: {cgroups: [system.slice/cron.service]}
intercept:
  - from: [backup, web]
    ports: [443, 8000-8080]
    to_cidrs: [192.0.2.0/24, 2001:db8::/32]
    except_cidrs: [192.0.2.7/32]
  - from: [cron]
egress:
  - {name: b, from: [backup], to: {hosts: [x.example]}, action: allow}
default: deny
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(textwrap.dedent(text), source_name="p.yaml")
    return [str(p) for p in info.value.problems]


def test_cgroup_workloads_load_with_normalised_paths_and_marks() -> None:
    policy = parse_policy(POLICY)
    backup = policy.workload("backup")
    assert backup.cgroups == ("system.slice/backup.service", "backup.slice")
    assert backup.cidrs == () and backup.pods is None
    assert policy.cgroup_marks() == {"backup": 0x01000000, "cron": 0x02000000}
    assert marks_by_path(policy) == {
        "system.slice/backup.service": 0x01000000,
        "backup.slice": 0x01000000,
        "system.slice/cron.service": 0x02000000,
    }
    assert policy.workload_for_mark(0x02000000 | 0x6567) == "cron"
    assert policy.workload_for_mark(0x00800000) is None
    assert policy.workload_for_mark(0x05000000) is None


@pytest.mark.parametrize(
    ("entry", "line", "message"),
    [
        ("{cgroups: [/system.slice/x.service]}", 3, "without the leading slash"),
        ("{cgroups: [system.slice/../x]}", 3, "'..'"),
        ("{cgroups: ['/']}", 3, "names the cgroup root"),
        ("{cgroups: []}", 3, "at least one cgroup path"),
        ("{cgroups: [a//b]}", 3, "empty components"),
        ("{cgroups: [a], cidrs: [10.0.0.0/8]}", 3, "both cgroups and cidrs"),
        ("{cgroups: [a], interfaces: [eth0]}", 3, "both cgroups and interfaces"),
        ("{cgroups: system.slice}", 3, "expected a list of cgroup paths"),
    ],
)
def test_bad_cgroup_paths_are_reported_where_they_are(entry: str, line: int, message: str) -> None:
    text = f"version: 1\nworkloads:\n  w: {entry}\ndefault: deny\n"
    [problem] = _problems(text)
    assert problem.startswith(f"p.yaml:{line}:"), problem
    assert "workloads.w.cgroups" in problem and message in problem, problem


def test_the_mark_mask_must_be_clear_of_the_other_marks_and_hold_every_workload() -> None:
    [problem] = _problems(
        "version: 1\nproxy: {cgroup_mark_mask: 0x00ff0000}\n"
        "workloads:\n  w: {cgroups: [a]}\ndefault: deny\n"
    )
    assert "proxy.cgroup_mark_mask" in problem and "divert_mark 0x800000" in problem
    names = "".join(f"  w{i}: {{cgroups: [c{i}]}}\n" for i in range(4))
    [problem] = _problems(
        f"version: 1\nproxy: {{cgroup_mark_mask: 0x03000000}}\nworkloads:\n{names}default: deny\n"
    )
    assert "4 cgroup workloads do not fit in cgroup_mark_mask 0x3000000" in problem


def test_marks_number_cgroup_workloads_in_file_order_from_the_masks_lowest_bit() -> None:
    ws = (
        Workload(name="a", cidrs=(), cgroups=("x",)),
        Workload(name="b", cidrs=(ipaddress.ip_network("10.0.0.0/8"),)),
        Workload(name="c", cidrs=(), cgroups=("y",)),
    )
    assert cgroup_marks(ws, 0x7F000000) == {"a": 0x01000000, "c": 0x02000000}
    assert cgroup_marks(ws, 0x00000F00) == {"a": 0x100, "c": 0x200}
    many = tuple(Workload(name=f"w{i}", cidrs=(), cgroups=(f"p{i}",)) for i in range(127))
    assert max(cgroup_marks(many, 0x7F000000).values()) == 0x7F000000
    with pytest.raises(ValueError, match="128 cgroup workloads"):
        cgroup_marks((*many, Workload(name="x", cidrs=(), cgroups=("q",))), 0x7F000000)


def _golden(name: str, doc: object) -> None:
    path = GOLDEN / name
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1)"


@pytest.mark.parametrize("selection", ["nft", "bpf"])
def test_cgroup_workloads_render_mark_rules_in_output_only(selection: str) -> None:
    doc = render_ruleset(parse_policy(POLICY), selection=selection)  # type: ignore[arg-type]
    _golden(f"cgroup-ruleset-{selection}.json", doc)
    rules = [c["add"]["rule"] for c in doc["nftables"] if "rule" in c.get("add", {})]
    marked = [r for r in rules if "(cgroup mark)" in r["comment"]]
    assert {r["chain"] for r in marked} == {"output"}
    # backup: IPv4 and IPv6 destinations; cron: any destination, both families.
    assert sorted(r["comment"] for r in marked) == [
        "intercept[0] from backup (cgroup mark)",
        "intercept[0] from backup (cgroup mark)",
        "intercept[1] from cron (cgroup mark)",
        "intercept[1] from cron (cgroup mark)",
    ]
    first = marked[0]["expr"][0]["match"]
    assert first["left"] == {"&": [{"meta": {"key": "mark"}}, 0x7F000000]}
    assert first["right"] == 0x01000000


# -- sock_diag ---------------------------------------------------------------


def test_the_request_is_an_exact_inet_diag_req_v2() -> None:
    req = encode_request(
        ipaddress.ip_address("10.1.2.3"), 40000, ipaddress.ip_address("198.18.1.2"), 443, seq=7
    )
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, pid) == (len(req), 20, 1, 7, 0) and len(req) == 72
    family, proto, ext, pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (family, proto, ext, pad, states) == (socket.AF_INET, 6, 0, 0, 0xFFFFFFFF)
    sport, dport = struct.unpack_from("!HH", req, 24)
    assert (sport, dport) == (40000, 443)
    assert req[28:44] == bytes([10, 1, 2, 3]) + bytes(12)
    assert req[44:60] == bytes([198, 18, 1, 2]) + bytes(12)
    assert struct.unpack_from("=III", req, 60) == (0, 0xFFFFFFFF, 0xFFFFFFFF)
    v6 = encode_request(ipaddress.ip_address("fd00::1"), 1, ipaddress.ip_address("2001:db8::2"), 2)
    assert v6[16] == socket.AF_INET6 and v6[28:44] == ipaddress.ip_address("fd00::1").packed
    with pytest.raises(ValueError, match="address families differ"):
        encode_request(ipaddress.ip_address("10.0.0.1"), 1, ipaddress.ip_address("::1"), 2)


def _reply(attrs: list[tuple[int, bytes]]) -> bytes:
    msg = struct.pack("=BBBB", socket.AF_INET, 1, 0, 0) + bytes(48) + bytes(20)
    for kind, payload in attrs:
        a = struct.pack("=HH", 4 + len(payload), kind) + payload
        msg += a + bytes((-len(a)) % 4)
    return struct.pack("=IHHII", 16 + len(msg), 20, 0, 1, 0) + msg


def test_the_mark_is_read_from_the_reply_attributes() -> None:
    # As the kernel sends it: INET_DIAG_SHUTDOWN (u8, padded), then
    # INET_DIAG_MARK and others.
    reply = _reply([(8, b"\x00"), (15, struct.pack("=I", 0x01006567)), (16, b"\x00\x00\x00\x00")])
    assert decode_mark(reply) == 0x01006567
    assert decode_mark(_reply([(8, b"\x00")])) is None  # no CAP_NET_ADMIN: no mark


def test_error_and_broken_replies() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    with pytest.raises(SockDiagError) as info:
        decode_mark(err)
    assert info.value.errno == 2
    with pytest.raises(ValueError, match="shorter than its header"):
        decode_mark(b"\x00" * 8)
    with pytest.raises(ValueError, match="does not fit"):
        decode_mark(struct.pack("=IHHII", 500, 20, 0, 1, 0))
    with pytest.raises(ValueError, match="truncated"):
        decode_mark(struct.pack("=IHHII", 20, 20, 0, 1, 0) + bytes(4))
    broken = bytearray(_reply([(15, struct.pack("=I", 1))]))
    struct.pack_into("=H", broken, 16 + 72, 200)
    with pytest.raises(ValueError, match="overruns"):
        decode_mark(bytes(broken))


# -- cgroup ids and mounts ------------------------------------------------------


MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
88 31 0:38 /kubepods /var/lib/x rw,relatime - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw
"""


def test_the_cgroup2_mount_is_the_one_of_the_hierarchy_root() -> None:
    assert cgroup2_mount(MOUNTINFO) == "/sys/fs/cgroup/uni fied"
    assert cgroup2_mount(MOUNTINFO.splitlines()[0]) is None


def test_desired_marks_skip_missing_cgroups_and_keep_the_first_of_one_id() -> None:
    paths = {"a": 0x100, "b": 0x200, "c": 0x300}
    assert desired_marks(paths, {"a": 11, "b": None, "c": 11}) == {11: 0x100}
    key, value = encode_entry(2**40 + 5, 0x01000000)
    assert (len(key), len(value)) == (8, 8)
    assert decode_entry(key, value) == (2**40 + 5, 0x01000000)


# -- hostNetwork pods by cgroup -------------------------------------------------

UID = "1f2e3d4c-5b6a-4789-9abc-def012345678"
UID_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("dirname", "uid"),
    [
        (f"kubepods-besteffort-pod{UID_}.slice", UID),
        (f"kubepods-burstable-pod{UID_}.slice", UID),
        (f"kubepods-pod{UID_}.slice", UID),
        (f"pod{UID}", UID),
        ("kubepods-besteffort.slice", None),
        (f"cri-containerd-{UID_}.scope", None),
        (f"pod{UID}x", None),
        ("podnotauid", None),
    ],
)
def test_pod_uid_from_the_kubelets_cgroup_names(dirname: str, uid: str | None) -> None:
    assert pod_uid(dirname) == uid


def test_the_scan_finds_pods_under_either_driver(tmp_path: Path) -> None:
    systemd = f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
    other = "0a1b2c3d-0000-4000-8000-000000000001"
    cgroupfs = f"kubepods/burstable/pod{other}"
    for rel in (systemd, f"{systemd}/cri-containerd-abc.scope", cgroupfs, "system.slice/x"):
        (tmp_path / rel).mkdir(parents=True)
    assert scan(str(tmp_path)) == {UID: systemd, other: cgroupfs}
    assert scan(str(tmp_path / "nothing-here")) == {}


def test_host_network_selectors_resolve_to_their_pods_cgroups() -> None:
    text = """\
version: 1
workloads:
  agent: {pods: {namespace: mon, labels: {app: node-exporter}, hostNetwork: true}}
  backup: {cgroups: [system.slice/backup.service]}
intercept:
  - from: [agent]
default: deny
"""
    policy = parse_policy(text)
    assert policy.workload("agent").pods == PodSelector(
        namespace="mon", labels=(("app", "node-exporter"),), host_network=True
    )
    # Marked from the start, before any pod is found: marks never shift.
    assert policy.cgroup_marks() == {"agent": 0x01000000, "backup": 0x02000000}

    def pod(name: str, uid: str, *, host: bool, phase: str = "Running") -> PodInfo:
        return PodInfo(
            namespace="mon",
            name=name,
            uid=uid,
            labels={"app": "node-exporter"},
            host_network=host,
            phase=phase,
        )

    snapshot = Snapshot(
        pods=(
            pod("a", UID, host=True),
            pod("b", "u-not-hostnet", host=False),
            pod("c", "u-done", host=True, phase="Succeeded"),
            pod("d", "u-no-cgroup-yet", host=True),
        ),
        namespace_labels={"mon": {}},
        pods_resource_version="1",
        namespaces_resource_version="1",
        synced=True,
    )
    cgroups = {UID: "kubepods.slice/x", "u-not-hostnet": "y", "u-done": "z"}
    resolved = resolve(policy, snapshot, pod_cgroups=cgroups)
    agent = resolved.workload("agent")
    assert agent.cgroups == ("kubepods.slice/x",) and agent.cidrs == ()
    assert marks_by_path(resolved) == {
        "kubepods.slice/x": 0x01000000,
        "system.slice/backup.service": 0x02000000,
    }
    assert resolve(policy, snapshot).workload("agent").cgroups == ()
    [problem] = _problems(
        "version: 1\nworkloads:\n  w: {pods: {hostNetwork: true}}\ndefault: deny\n"
    )
    assert "empty pod selector" in problem
    [problem] = _problems(
        "version: 1\nworkloads:\n  w: {pods: {namespace: a, hostNetwork: 1}}\ndefault: deny\n"
    )
    assert "workloads.w.pods.hostNetwork" in problem and "true or false" in problem
