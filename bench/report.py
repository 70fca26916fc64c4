"""The human-readable table of one benchmark run (the JSON document is the data).

Each line is one measurement on the three paths, absolute, with the ratio to
the direct path in parentheses, e.g.::

    throughput 1 stream   direct 21.3 Gbit/s | haproxy 9.8 (0.46x) | egress-agent 6.1 (0.29x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


def _num(value: float, unit: str) -> str:
    if unit == "conn/s" or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _dig(r: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(r, dict) or r.get(key) is None:
            return None
        r = r[key]
    return r


def line(label: str, doc: dict[str, Any], get: Getter, unit: str, *, ratio: bool = True) -> str:
    """``label  direct V unit | haproxy V (R x) | egress-agent V (R x)``.

    The first path with a value carries the unit; the others carry their ratio
    to direct when ``ratio`` is set and direct has a value, else the unit too.
    """
    results = doc["paths"]
    base = get(results["direct"]) if "direct" in results else None
    cells = []
    unit_shown = False
    for name, r in results.items():
        value = get(r)
        if value is None:
            cells.append(f"{name} n/a")
            continue
        text = _num(value, unit)
        if ratio and base and name != "direct":
            text += f" ({value / base:.2f}x)"
        elif not ratio or not unit_shown:
            text += f" {unit}"
            unit_shown = True
        cells.append(f"{name} {text}")
    return f"{label:<32} " + " | ".join(cells)


def table(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    m = doc["machine"]
    paths = doc["paths"]
    out = [
        f"egress-agent benchmark: {' vs '.join(paths)}  "
        f"({m['cpus']} CPUs shared by client, proxy and server; kernel {m['kernel']}; "
        f"{s['seconds']} s runs; {s['workers']} connection workers; {s['idle']} idle connections; "
        f"took {doc['elapsed_seconds']:.0f} s)",
    ]
    for name, r in paths.items():
        facts = r.get("facts", {})
        extra = f"; open files {facts['nofile']}" if "nofile" in facts else ""
        out.append(f"  {name + ':':<14} {facts.get('what', '')}{extra}")
    out.append("")

    def gbit(key: str) -> Getter:
        return lambda r: _dig(r, key, "gbit_s")

    def kib_to_mib(*keys: str) -> Getter:
        def get(r: dict[str, Any]) -> float | None:
            v = _dig(r, *keys)
            return None if v is None else v / 1024

        return get

    idle = s["idle"]
    out += [
        line("throughput 1 stream", doc, gbit("iperf_1"), "Gbit/s"),
        line("throughput 4 streams", doc, gbit("iperf_4"), "Gbit/s"),
        line("new connections/s", doc, lambda r: _dig(r, "rate", "per_second"), "conn/s"),
        line(
            "connection latency p50",
            doc,
            lambda r: _dig(r, "rate", "latency_ms", "p50"),
            "ms",
        ),
        line(
            "connection latency p99",
            doc,
            lambda r: _dig(r, "rate", "latency_ms", "p99"),
            "ms",
        ),
        line(
            "proxy RSS, no connections",
            doc,
            kib_to_mib("idle", "rss_kib_before"),
            "MiB",
            ratio=False,
        ),
        line(
            f"proxy RSS, {idle} idle conns",
            doc,
            kib_to_mib("idle", "rss_kib_held"),
            "MiB",
            ratio=False,
        ),
        line(
            "proxy RSS after closing them",
            doc,
            kib_to_mib("idle", "rss_kib_after_close"),
            "MiB",
            ratio=False,
        ),
        line(
            "proxy RSS per idle connection",
            doc,
            lambda r: _dig(r, "idle", "rss_kib_per_connection"),
            "KiB",
            ratio=False,
        ),
        "",
    ]
    cells = []
    for name, r in paths.items():
        made = r["rate"]["attempts"] + r["idle"]["attempts"]
        lost = r["lost"]
        cells.append(
            f"{name} {lost['client_failures']} failed of {made}, "
            f"server saw {r['server']['accepted']}"
            + (f", {lost['iperf_failures']} iperf3 errors" if lost["iperf_failures"] else "")
            + (f", {lost['server_resets']} resets" if lost["server_resets"] else "")
        )
    out.append(f"{'lost connections':<32} " + " | ".join(cells))
    for name, r in paths.items():
        fails = merge_counts(r["rate"].get("failures", {}), r["idle"].get("failures", {}))
        if fails:
            out.append(f"  {name} failures: {fails}")
    audit = _dig(paths, "egress-agent", "audit")
    if audit is not None:
        verdict = "ok" if audit["ok"] else "MISMATCH"
        errors = f", errors {audit['errors']}" if audit["errors"] else ""
        out.append(
            f"{'egress-agent audit log':<32} {audit['records']} records for "
            f"{audit['expected']} connections made, events {audit['events']}{errors}: {verdict}"
        )
    hlog = _dig(paths, "haproxy", "haproxy_log")
    if hlog is not None:
        out.append(
            f"{'haproxy log':<32} {hlog['records']} records for {hlog['expected']} "
            f"connections made, termination states {hlog['states']} ('--' = normal)"
        )
    bpf = doc.get("bpf")
    if bpf is not None:
        maps = bpf.get("maps", {})
        out += [
            "",
            "BPF datapath (10,000 workloads and 10,000 except CIDRs in the maps):",
            f"  compile and load {maps.get('compile_and_load_s')} s; full apply "
            f"{maps.get('full_apply_s')} s ({maps.get('full_entries')} entries); one-entry change "
            f"{maps.get('one_change_ms')} ms ({maps.get('one_change_entries')} entries); "
            f"one except CIDR changed {maps.get('one_cidr_change_ms')} ms"
            f" ({maps.get('one_cidr_change_entries')} entries);",
            f"  verify against the kernel {maps.get('verify_s')} s; the agent's whole step for one"
            f" pod among 10,000 pod workloads (render, compare, maps):"
            f" {maps.get('agent_pod_change_ms')} ms, table untouched:"
            f" {maps.get('agent_pod_change_same_table')}",
        ]
        rates = [_dig(bpf, k, "gbit_s") or 0 for k in ("without", "with", "without_again")]
        cost = maps.get("ns_per_packet", {})
        out += [
            f"  iperf3 1 stream without / with / without the classifier attached:"
            f" {rates[0]:.1f} / {rates[1]:.1f} / {rates[2]:.1f} Gbit/s;"
            f" ratio {bpf.get('throughput_ratio')}",
            "  classifier per packet (BPF_PROG_TEST_RUN, 200,000 runs): "
            + ", ".join(f"{k.replace('_', ' ')} {v['ns']:.0f} ns" for k, v in cost.items()),
        ]
    out += [
        "",
        "notes: the CPUs are shared freely by client, proxy and server, so compare ratios within",
        "  one run (absolute numbers drift between runs). Connection latency runs from connect()",
        f"  to the server's FIN after the reply, with {s['workers']} workers always busy, so it",
        "  includes queueing (p50 ~ workers / rate). RSS is the proxy's VmRSS, the idle",
        "  connections being opened first, on the freshly started proxy; per connection =",
        "  (with - before) / connections. Resets on port 5201 are iperf3's server ending its",
        "  data streams, seen the same way by both proxies.",
        "",
    ]
    if doc["ok"]:
        out.append("result: OK (nothing lost, audit log complete)")
    else:
        out.append("result: FAILED")
        out += [f"  {p}" for p in doc["problems"]]
    return "\n".join(out)


def merge_counts(*parts: dict[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + value
    return merged
