"""The human-readable report of one benchmark run (the JSON document is the data).

First one table, a row per path and a column per measurement: direct in
absolute numbers, every other path as its ratio to direct (the absolute
number after it), e.g.::

    path                     1 stream          new conn/s       ...
    direct                   21.3 Gbit/s       12,034           ...
    HAProxy, 1 thread        0.46x (9.8)       0.55x (6,619)    ...

Rows follow the paths measured (``bench.run.PATHS``), so a path added there
(HAProxy with 2 threads, the agent with 2 workers) is a row more. Then the
proxies' memory lines, one measurement on every path per line, e.g.::

    proxy RSS, no connections   direct n/a | haproxy 8.1 MiB | egress-agent 40.2 MiB
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


# Row labels for the paths' keys in the results (``bench.run.PATHS``).
PATH_LABELS = {
    "direct": "direct",
    "haproxy": "HAProxy, 1 thread",
    "egress-agent": "egress-agent, 1 worker",
}

# (column head, getter, unit)
COLUMNS: list[tuple[str, Getter, str]] = [
    ("1 stream", lambda r: _dig(r, "iperf_1", "gbit_s"), "Gbit/s"),
    ("4 streams", lambda r: _dig(r, "iperf_4", "gbit_s"), "Gbit/s"),
    ("new conn/s", lambda r: _dig(r, "rate", "per_second"), "conn/s"),
    ("p99", lambda r: _dig(r, "rate", "latency_ms", "p99"), "ms"),
    ("TLS by name conn/s", lambda r: _dig(r, "tls_rate", "per_second"), "conn/s"),
    ("TLS p99", lambda r: _dig(r, "tls_rate", "latency_ms", "p99"), "ms"),
    ("KiB per idle conn", lambda r: _dig(r, "idle", "rss_kib_per_connection"), "KiB"),
]


def paths_table(doc: dict[str, Any]) -> list[str]:
    """A row per path, a column per measurement; ratios to direct."""
    results = doc["paths"]
    base = results.get("direct", {})
    head = ["path"] + [c[0] for c in COLUMNS]
    rows = [head]
    for name, r in results.items():
        row = [PATH_LABELS.get(name, name)]
        for _, get, unit in COLUMNS:
            value, ref = get(r), get(base)
            if value is None:
                row.append("-")
            elif name == "direct" or not ref:
                row.append(f"{_num(value, unit)} {unit}" if name == "direct" else _num(value, unit))
            else:
                row.append(f"{value / ref:.2f}x ({_num(value, unit)})")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    agent, peer = results.get("egress-agent"), results.get("haproxy")
    if agent is not None and peer is not None:
        cells = []
        for label, get, _unit in COLUMNS[2:6]:
            a, h = get(agent), get(peer)
            if a is not None and h:
                cells.append(f"{label} {a / h:.2f}x")
        out.append("egress-agent / HAProxy: " + ", ".join(cells))
    return out


def profile_lines(doc: dict[str, Any]) -> list[str]:
    out = []
    for key, what in (("rate", "new connections"), ("tls_rate", "TLS by name")):
        prof = _dig(doc["paths"], "egress-agent", key, "profile")
        if prof is None:
            continue
        if "error" in prof:
            out.append(f"  profile, {what}: {prof['error']}")
            continue
        own = ", ".join(f"{f['frame']} {f['percent']}%" for f in prof["self"][:8])
        under = ", ".join(f"{f['frame']} {f['percent']}%" for f in prof["total"][:12])
        out += [
            f"egress-agent profile, {what} ({prof['samples']} samples, {prof['svg']}):",
            f"  self:  {own}",
            f"  total: {under}",
        ]
    return out


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

    def kib_to_mib(*keys: str) -> Getter:
        def get(r: dict[str, Any]) -> float | None:
            v = _dig(r, *keys)
            return None if v is None else v / 1024

        return get

    idle = s["idle"]
    out += paths_table(doc)
    out += ["", *profile_lines(doc)]
    out += [
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
        made = sum(r[k]["attempts"] for k in ("rate", "tls_rate", "idle") if k in r)
        lost = r["lost"]
        cells.append(
            f"{name} {lost['client_failures']} failed of {made}, "
            f"server saw {r['server']['accepted']}"
            + (f", {lost['iperf_failures']} iperf3 errors" if lost["iperf_failures"] else "")
            + (f", {lost['server_resets']} resets" if lost["server_resets"] else "")
        )
    out.append(f"{'lost connections':<32} " + " | ".join(cells))
    for name, r in paths.items():
        fails = merge_counts(
            *(r[k].get("failures", {}) for k in ("rate", "tls_rate", "idle") if k in r)
        )
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
        delta = maps.get("delta")
        if delta is not None:
            out.append(
                f"  delta path, one pod workload among 10,000 ({delta['count']} changes):"
                + "; ".join(
                    f" {what} median {delta[what]['median_ms']} ms, slowest"
                    f" {delta[what]['max_ms']} ms ({delta['entries'].get(what)} entries)"
                    for what in ("add", "move", "remove")
                )
            )
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
