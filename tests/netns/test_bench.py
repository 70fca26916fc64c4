"""The benchmark runs end to end in its quick mode (1 s runs, 50 idle connections).

No timing thresholds: numbers depend on the machine. What must hold anywhere:
it completes, measures all three paths with positive numbers, loses no
connection, the egress-agent audit log has one record per connection made,
and it leaves no namespace behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PATHS = ("direct", "haproxy", "egress-agent")


@pytest.mark.timeout(120)
def test_quick_benchmark_measures_every_path_and_loses_nothing(
    require_root: None, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result_file,) = tmp_path.glob("*.json")
    doc = json.loads(result_file.read_text())
    assert doc["ok"] and doc["problems"] == []
    assert tuple(doc["paths"]) == PATHS
    for name, r in doc["paths"].items():
        assert r["iperf_1"]["ok"] and r["iperf_1"]["gbit_s"] > 0, name
        assert r["iperf_4"]["ok"] and r["iperf_4"]["gbit_s"] > 0, name
        assert r["rate"]["ok"] > 0 and r["rate"]["per_second"] > 0, name
        assert r["rate"]["latency_ms"]["p50"] > 0, name
        assert r["idle"]["held"] == r["idle"]["attempts"] == 50, name
        assert all(count == 0 for count in r["lost"].values()), (name, r["lost"])
        # TLS by name: every ClientHello reached the server (through a host
        # rule on egress-agent, an SNI check on HAProxy).
        assert r["tls_rate"]["ok"] > 0 and r["tls_rate"]["per_second"] > 0, name
        assert r["server"]["hellos"] == r["tls_rate"]["ok"], name
        made = r["rate"]["attempts"] + r["tls_rate"]["attempts"] + 50
        assert r["server"]["accepted"] == made, name
    for name in ("haproxy", "egress-agent"):
        idle = doc["paths"][name]["idle"]
        assert idle["rss_kib_before"] > 0 and idle["rss_kib_held"] > 0, name
    assert doc["paths"]["direct"]["idle"]["rss_kib_before"] is None
    audit = doc["paths"]["egress-agent"]["audit"]
    assert audit["ok"] and audit["records"] == audit["expected"] > 0
    # The BPF datapath at 10,000 workloads and CIDRs: loaded, changed by one
    # entry, read back equal; the classifier measured attached and detached.
    bpf = doc["bpf"]
    assert bpf["maps"]["full_entries"] == 30_002 and bpf["maps"]["verify_problems"] == []
    assert bpf["maps"]["one_change_entries"] == 2 and bpf["maps"]["one_change_ms"] > 0
    assert bpf["with"]["ok"] and bpf["without"]["ok"] and bpf["throughput_ratio"] > 0
    # One pod workload through the delta path: its id and its address only.
    delta = bpf["maps"]["delta"]
    assert delta["entries"] == {"add": 2, "move": 2, "remove": 2}, delta
    assert all(delta[what]["median_ms"] > 0 for what in ("add", "move", "remove"))
    # The test runs decide like the policy: only the matching port is diverted.
    cost = bpf["maps"]["ns_per_packet"]
    assert [k for k, v in cost.items() if v["diverted"]] == ["workload_diverted"]
    assert all(v["ns"] > 0 for v in cost.values())
    assert "BPF datapath" in proc.stdout
    # The table names every path; nothing of the lab is left.
    for name in PATHS:
        assert f"{name} " in proc.stdout
    assert "result: OK" in proc.stdout
    assert not [ns for ns in netns.listnetns() if ns.startswith(doc["lab_prefix"])]
