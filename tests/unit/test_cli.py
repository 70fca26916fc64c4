"""The CLI's offline commands: check and explain, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_agent.agent.cli import main
from egress_agent.agent.cli_status import describe_relay
from egress_agent.proxy.kernel_relay import RelayStats

POLICY = """
version: 1
workloads:
  pg-main: {pods: {namespace: db, labels: {cnpg.io/cluster: pg-main}}}
  vm: {cidrs: [10.0.5.0/24]}
intercept:
  - from: [pg-main, vm]
    ports: [443]
egress:
  - name: azure-backups
    to: {hosts: [pgbackups.blob.core.windows.net], ports: [443]}
    action: allow
default: deny
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_explain_a_static_workload(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["explain", "--policy", str(policy), "--from", "10.0.5.9", "--to", "20.60.1.4:443"]
    blob = ["--server-name", "pgbackups.blob.core.windows.net"]
    owns = ["--address", "pgbackups.blob.core.windows.net=20.60.1.4,2603:1000::4"]
    assert main([*args, *blob, *owns]) == 0
    out = capsys.readouterr().out
    assert "workload:  vm" in out and "verdict:   allow (rule azure-backups)" in out
    assert (
        "names:     pgbackups.blob.core.windows.net -> 20.60.1.4, 2603:1000::4"
        " (given with --address)" in out
    )
    assert main([*args, "--server-name", "evil.example"]) == 0
    assert "verdict:   deny (rule default)" in capsys.readouterr().out


def test_explain_says_when_a_name_does_not_own_the_destination(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["explain", "--policy", str(policy), "--from", "10.0.5.9", "--to", "198.51.100.7:443"]
    blob = ["--server-name", "pgbackups.blob.core.windows.net"]
    assert main([*args, *blob, "--address", "pgbackups.blob.core.windows.net=20.60.1.4"]) == 0
    out = capsys.readouterr().out
    assert "verdict:   deny (rule default)" in out
    assert (
        "because:   rule azure-backups allows pgbackups.blob.core.windows.net only at its own"
        " addresses (20.60.1.4): the destination 198.51.100.7 is not one of them" in out
    )
    assert main([*args, *blob, "--no-resolve"]) == 0
    out = capsys.readouterr().out
    assert "-> none (not resolved: --no-resolve)" in out
    assert "verdict:   deny (rule default)" in out
    assert main([*args, *blob, "--address", "nonsense"]) == 2
    assert "expected NAME=ADDR[,ADDR...]" in capsys.readouterr().err


def test_explain_a_pod_workload_needs_its_name(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["explain", "--policy", str(policy), "--from", "10.244.1.7", "--to", "20.60.1.4:443"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "diverted:  no" in out and "--workload NAME (pg-main)" in out
    assert main([*args, "--workload", "pg-main"]) == 0
    out = capsys.readouterr().out
    assert "workload:  pg-main" in out and "diverted:  yes" in out
    assert main([*args, "--workload", "vm"]) == 2
    assert "not a pods-selected workload" in capsys.readouterr().err


def test_check_reports_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        POLICY.replace("from: [pg-main, vm]", "from: [pg-mian, vm]").replace(
            "action: allow", "action: alow"
        )
    )
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7:" in err and "unknown workload 'pg-mian'" in err
    assert "egress[0].action" in err and "(2 problems)" in err


def test_bpf_dump_prints_the_program_its_flags_and_a_policys_entries(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bpf", "dump", "--policy", str(policy), "--bpf-pin-dir", "/sys/fs/bpf/x"]) == 0
    out = capsys.readouterr().out
    assert "// program egress_classify (tc clsact ingress" in out
    assert "-DDIVERT_MARK=0x800000" in out and "-DUPSTREAM_MARK=0x6567" in out
    assert "// pinned  /sys/fs/bpf/x/{egress_classify," in out
    assert "int egress_classify(struct __sk_buff *skb)" in out  # the source itself
    assert "// workload ids: pg-main=1, vm=2" in out
    # vm's 10.0.5.0/24 as an LPM key (prefix length 24, then the address).
    assert "//   180000000a000500 -> 02000000" in out


NON_TCP = """
version: 1
workloads:
  web: {cidrs: [10.0.1.0/24], interfaces: [veth-web]}
intercept:
  - from: [web]
    ports: [443]
    except_cidrs: [10.96.0.10/32]
    non_tcp: drop
reverse_path: {interfaces: ["cali*"]}
default: deny
"""


def test_explain_says_whether_non_tcp_is_dropped_and_by_which_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(NON_TCP)
    base = ["explain", "--policy", str(path), "--from", "10.0.1.5"]
    assert main([*base, "--to", "8.8.8.8:53"]) == 0
    out = capsys.readouterr().out
    assert "non-tcp:   dropped by intercept[0] (non_tcp: drop)" in out
    assert "diverted:  no" in out  # port 53 is not intercepted for TCP
    assert main([*base, "--to", "10.96.0.10:53"]) == 0
    assert "non-tcp:   passes" in capsys.readouterr().out
    # From the wrong interface the source is no workload: nothing to say.
    assert main([*base, "--to", "8.8.8.8:53", "--interface", "veth-other"]) == 0
    out = capsys.readouterr().out
    assert "workload:  (none)" in out and "non-tcp" not in out


def test_check_lists_what_the_kernel_drops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(NON_TCP)
    assert main(["check", str(path), "--show-rules", "--datapath", "bpf"]) == 0
    captured = capsys.readouterr()
    assert "intercept[0]: non-TCP from web to any destination except 10.96.0.10/32" in (
        captured.err
    )
    assert "reverse-path check on: veth-web, cali*" in captured.err
    assert '"non-TCP marked by the BPF classifier"' in captured.out


def test_status_lines_for_counters() -> None:
    from egress_agent.agent.cli_status import describe_counters

    snap = {
        "counters_error": None,
        "diverted": {"packets": 12, "bytes": 900, "rules": []},
        "drops": {
            "by_reason": {"non_tcp": 3, "ah": 0, "reverse_path": 1},
            "rules": [
                {"rule": "intercept[0] from web non_tcp", "packets": 3},
                {"rule": "AH from workloads (ipv4)", "packets": 0},
                {"rule": "reverse-path check: source not routed back", "packets": 1},
            ],
        },
    }
    assert describe_counters(snap) == [
        "diverted:     12 packets DNAT-ed to the proxy (900 bytes)",
        "drops:        non_tcp 3, reverse_path 1",
        "                       3  intercept[0] from web non_tcp",
        "                       1  reverse-path check: source not routed back",
    ]


def test_explain_shows_the_mode_and_what_audit_mode_lets_through(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["explain", "--policy", str(policy), "--from", "10.0.5.9", "--to", "198.51.100.7:443"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mode:      enforce\n" in out and "verdict:   deny (rule default)" in out
    policy.write_text(POLICY.replace("default: deny", "default: deny\nenforce: false"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mode:      audit (enforce: false)" in out
    assert "verdict:   would be denied (audit mode): allowed (rule default)" in out
    policy.write_text(POLICY.replace("default: deny", "default: {action: deny, mode: audit}"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mode:      enforce, except in audit mode (allowed, logged): default" in out
    assert "would be denied (audit mode): allowed (rule default)" in out
    assert main(["check", str(policy)]) == 0
    assert "default deny, audit mode for default" in capsys.readouterr().err


def test_status_says_which_relay_moves_the_bytes() -> None:
    stats = RelayStats(started=12, kernel=9, open=2, fallbacks={"EINVAL": 1})
    assert describe_relay(stats.snapshot(mode="kernel")) == (
        "relay:        kernel (splice), 2 open in the kernel; relayed so far: 9 kernel,"
        " 3 userspace; fallbacks: EINVAL 1"
    )
    off = RelayStats(started=4).snapshot(mode="userspace")
    assert off["method"] is None
    assert describe_relay(off) == (
        "relay:        userspace (proxy.relay: userspace); relayed so far: 0 kernel, 4 userspace"
    )
