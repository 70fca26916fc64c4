"""Build the topology, measure each path, check nothing was lost, report.

    python -m bench [--quick] [--results-dir DIR] [--seconds S] [--idle N] [--userspace-relay]

Topology (``lab.netns.Lab``): the node, a pod ``client`` (198.19.1.2,
fd00:19:1::2) and an external host ``server`` (198.18.1.2). The same
measurements run on each path in turn, the proxy being the only difference:

* iperf3, 1 and 4 streams (``sum_received``);
* new connections per second and their latency (``bench.loadgen rate``
  against ``bench.sink``), plain (``ping``, allowed by address) and TLS by
  name (a ClientHello whose SNI a host rule allows, and HAProxy checks with
  ``req_ssl_sni``);
* the proxy's RSS before and with N idle connections held through it
  (``bench.loadgen hold``), and per connection.

``--profile`` also records a py-spy flame graph of egress-agent during each
connection-rate run (SVG next to the JSON) and puts its top frames in the
JSON and the report.

Checks, any of which makes the exit status 1: no client-side failure on any
path, the server saw every connection the client made, and egress-agent's
audit log holds exactly one ``closed`` record per connection made through it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import paths, profile, report
from bench.paths import (
    CLIENT_V4,
    CLIENT_V6,
    IPERF_PORT,
    ROOT,
    SERVER_NAME,
    SERVER_V4,
    SERVER_V6,
    SINK_PORT,
    TLS_PORT,
    Running,
)
from egress_agent.lab.netns import Lab

log = logging.getLogger("bench")

CLIENT, SERVER = "client", "server"
NOFILE = 65536  # 1000 idle connections are 2000 descriptors in a proxy
RESULTS_DIR = ROOT / "bench" / "results"

PathFactory = Callable[[Lab, Path], AbstractContextManager[Running]]
PATHS: list[PathFactory] = [paths.direct, paths.haproxy, paths.egress_agent]
# --userspace-relay: the agent once more with the proxy copying the bytes
# itself (proxy.relay: userspace), to compare with the kernel relay in one run.
USERSPACE_RELAY: PathFactory = paths.egress_agent_userspace


@dataclass(frozen=True, kw_only=True)
class Settings:
    seconds: int  # each iperf3 run and the connection-rate run
    workers: int  # concurrent connection-rate workers
    idle: int  # idle connections held for the memory measurement
    quick: bool
    profile: bool = False  # py-spy flame graphs of egress-agent's connection-rate runs
    userspace_relay: bool = False  # also measure the agent with proxy.relay: userspace


class BenchError(RuntimeError):
    """A measurement could not be made at all."""


# -- helpers -----------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise our RLIMIT_NOFILE; every process the lab starts (agent, HAProxy,
    clients, servers) inherits it through ``ip netns exec``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, NOFILE), max(hard, NOFILE)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE (a container): up to the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"{proc.args!r}: no output line after {timeout}s")
        chunk = os.read(fd, 1)  # one byte at a time: leave the rest for the next call
        if not chunk:
            raise BenchError(f"{proc.args!r} exited ({proc.poll()}) without a line: {buf!r}")
        buf += chunk
    return buf.decode().strip()


def python_in(lab: Lab, host: str, module: str, args: Sequence[str], timeout: float) -> Any:
    proc = lab.run(
        host, [sys.executable, "-m", module, *args], cwd=ROOT, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{module} in {host} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def start_sink(lab: Lab) -> subprocess.Popen[bytes]:
    proc = lab.popen(
        SERVER,
        [
            sys.executable,
            "-m",
            "bench.sink",
            "--listen",
            f"{SERVER_V4}:{SINK_PORT}",
            "--also-port",
            str(TLS_PORT),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    line = read_line(proc, 10.0)
    if line != "READY":
        raise BenchError(f"bench.sink did not start: {line}")
    return proc


def stop_sink(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    proc.send_signal(signal.SIGTERM)
    counters: dict[str, int] = json.loads(read_line(proc, 10.0))
    proc.wait(5.0)
    return counters


# -- measurements ---------------------------------------------------------------------


def iperf(lab: Lab, *, streams: int, seconds: int) -> dict[str, Any]:
    server = lab.popen(
        SERVER,
        ["iperf3", "-s", "-1", "-B", SERVER_V4, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        paths.wait_listening(lab, SERVER, IPERF_PORT, server)
        argv = ["iperf3", "-c", SERVER_V4, "-p", str(IPERF_PORT), "-t", str(seconds)]
        argv += ["-P", str(streams), "-J", "--connect-timeout", "3000"]
        proc = lab.run(CLIENT, argv, timeout=seconds + 30, check=False)
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()}"}
        if doc.get("error") or proc.returncode != 0:
            return {"ok": False, "error": doc.get("error", f"exit {proc.returncode}")}
        end = doc["end"]
        return {
            "ok": True,
            "streams": streams,
            "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits"),
            "connections": len(doc["start"]["connected"]) + 1,  # + the control connection
        }
    finally:
        paths.stop_process(server, timeout=3.0)


def connection_rate(
    lab: Lab, settings: Settings, *, tls: bool = False, profile_to: Path | None = None,
    pid: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Short connections for ``settings.seconds``: ``ping`` to the sink's
    port, or with ``tls`` a ClientHello naming the server to its TLS port.
    With ``profile_to`` (and the proxy's ``pid``), py-spy records the proxy
    meanwhile into that SVG and the result gets its top frames."""
    args = [
        "rate",
        SERVER_V4,
        str(TLS_PORT if tls else SINK_PORT),
        "--seconds",
        str(settings.seconds),
        "--workers",
        str(settings.workers),
    ]
    if tls:
        args += ["--tls-name", SERVER_NAME]
    spy = None
    if profile_to is not None and pid is not None:
        spy = profile.start(pid, profile_to, seconds=settings.seconds)
    try:
        result: dict[str, Any] = python_in(
            lab, CLIENT, "bench.loadgen", args, settings.seconds + 60
        )
    finally:
        if spy is not None:
            profile.finish(spy)
    if spy is not None and profile_to is not None:
        result["profile"] = {"svg": str(profile_to), **profile.summary(profile_to)}
    return result


def idle_memory(lab: Lab, settings: Settings, pid: int | None) -> dict[str, Any]:
    before = rss_kib(pid)
    args = ["hold", SERVER_V4, str(SINK_PORT), "--count", str(settings.idle), "--max-hold", "60"]
    proc = lab.popen(
        CLIENT,
        [sys.executable, "-m", "bench.loadgen", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        held = json.loads(read_line(proc, 60.0))
        time.sleep(0.5)  # let the proxy settle (buffers freed, records not yet due)
        during = rss_kib(pid)
        assert proc.stdin is not None
        proc.stdin.write(b"close\n")
        proc.stdin.flush()
        closed = json.loads(read_line(proc, 30.0))
        proc.wait(10.0)
    finally:
        paths.stop_process(proc)
    time.sleep(0.3)
    after = rss_kib(pid)
    out: dict[str, Any] = {
        "attempts": held["attempts"],
        "held": held["held"],
        "failed": held["failed"] + closed["failed"],
        "failures": dict(Counter(held["failures"]) + Counter(closed["failures"])),
        "open_seconds": held["seconds"],
        "rss_kib_before": before,
        "rss_kib_held": during,
        "rss_kib_after_close": after,
    }
    if before is not None and during is not None and held["held"]:
        out["rss_kib_delta"] = during - before
        out["rss_kib_per_connection"] = (during - before) / held["held"]
    return out


def audit_check(audit: Path, expected: int, timeout: float = 15.0) -> dict[str, Any]:
    """Wait for one record per connection, then compare."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, Any]] = []
    while True:
        text = audit.read_text() if audit.exists() else ""
        records = [json.loads(line) for line in text.split("\n")[:-1] if line]
        if len(records) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # anything beyond the expected count would show up now
    text = audit.read_text()
    records = [json.loads(line) for line in text.split("\n")[:-1] if line]
    events = Counter(r["event"] for r in records)
    errors = Counter(
        f"port {r['dst'].rpartition(':')[2]}: {r['error']}"
        for r in records
        if r["error"] is not None
    )
    return {
        "expected": expected,
        "records": len(records),
        "events": dict(events),
        "errors": dict(errors),
        "ok": len(records) == expected and events == Counter({"closed": expected}),
    }


def measure(
    lab: Lab, work: Path, settings: Settings, factory: PathFactory, profile_dir: Path
) -> dict[str, Any]:
    path_dir = work / factory.__name__
    path_dir.mkdir()
    with factory(lab, path_dir) as running:
        log.info("measuring %s", running.name)
        result: dict[str, Any] = {"facts": running.facts}
        sink = start_sink(lab)
        try:
            # Memory first, on the freshly started proxy: after the other loads a
            # Python heap would partly reuse freed memory and hide the real cost.
            result["idle"] = idle_memory(lab, settings, running.pid)
            result["iperf_1"] = iperf(lab, streams=1, seconds=settings.seconds)
            result["iperf_4"] = iperf(lab, streams=4, seconds=settings.seconds)
            spy = settings.profile and running.name == "egress-agent"
            for key, tls in (("rate", False), ("tls_rate", True)):
                result[key] = connection_rate(
                    lab,
                    settings,
                    tls=tls,
                    profile_to=profile_dir / f"profile-{key.replace('_', '-')}.svg"
                    if spy
                    else None,
                    pid=running.pid,
                )
        finally:
            result["server"] = stop_sink(sink)
        made = sum(result[k]["attempts"] for k in ("rate", "tls_rate", "idle"))
        iperf_conns = sum(result[k].get("connections", 0) for k in ("iperf_1", "iperf_4"))
        result["lost"] = {
            "client_failures": sum(result[k]["failed"] for k in ("rate", "tls_rate", "idle")),
            "iperf_failures": sum(not result[k]["ok"] for k in ("iperf_1", "iperf_4")),
            "server_missing": made - result["server"]["accepted"],
            "server_resets": result["server"]["resets"],
        }
        if running.name == "egress-agent":
            result["audit"] = audit_check(Path(running.facts["audit"]), made + iperf_conns)
        if running.name == "haproxy":
            result["haproxy_log"] = paths.haproxy_log_summary(Path(running.facts["log"]))
            result["haproxy_log"]["expected"] = made + iperf_conns
    return result


def bpf_scale(lab: Lab, settings: Settings) -> dict[str, Any]:
    """Map scale (10,000 workloads and CIDRs: full apply, one-entry change),
    the classifier's time per packet (kernel test runs, in bench.bpfscale), and
    iperf3 throughput with and without it attached, side by side (no proxy,
    no nftables: only the classifier differs)."""

    result: dict[str, Any] = {"without": iperf(lab, streams=1, seconds=settings.seconds)}
    proc = lab.popen(
        "node",
        [
            sys.executable,
            "-m",
            "bench.bpfscale",
            "--pin-dir",
            f"/sys/fs/bpf/egress-bench-{lab.prefix.rstrip('-')}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        result["maps"] = json.loads(read_line(proc, 120))
        result["with"] = iperf(lab, streams=1, seconds=settings.seconds)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
    result["without_again"] = iperf(lab, streams=1, seconds=settings.seconds)
    rates = [result[k].get("gbit_s") for k in ("without", "with", "without_again")]
    if all(rates):
        result["throughput_ratio"] = round(2 * rates[1] / (rates[0] + rates[2]), 3)
    return result


def failures(results: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for name, r in results.items():
        for what, count in r["lost"].items():
            if count:
                problems.append(f"{name}: {what} = {count}")
        audit = r.get("audit")
        if audit is not None and not audit["ok"]:
            problems.append(
                f"{name}: audit log has {audit['records']} records {audit['events']}, "
                f"expected {audit['expected']} closed"
            )
    return problems


# -- entry point ----------------------------------------------------------------------


def stamp_of(started: float) -> str:
    return datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def run_all(
    settings: Settings, started: float, results_dir: Path, keep_logs: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str]:
    """One topology, every path measured in turn; returns the results and the
    lab's namespace prefix. The lab is gone when this returns or raises."""
    results: dict[str, dict[str, Any]] = {}
    profile_dir = results_dir / f"{stamp_of(started)}-profile"
    if settings.profile:
        profile_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="egress-bench-") as tmp, Lab() as lab:
        work = Path(tmp)
        os.chmod(work, 0o755)
        lab.add_pod(CLIENT, CLIENT_V4, CLIENT_V6)
        lab.add_external(SERVER, SERVER_V4, SERVER_V6, hostnames=[SERVER_NAME])
        complete = False
        try:
            for factory in [*PATHS, *([USERSPACE_RELAY] if settings.userspace_relay else [])]:
                results[factory.__name__.replace("_", "-")] = measure(
                    lab, work, settings, factory, profile_dir
                )
            bpf_result = bpf_scale(lab, settings)
            complete = True
        finally:
            if not complete or failures(results) or keep_logs:
                # The agent's and HAProxy's logs and the audit log, for a look.
                keep = results_dir / f"{stamp_of(started)}-logs"
                shutil.copytree(work, keep, dirs_exist_ok=True)
                print(f"bench: logs kept in {keep}", file=sys.stderr)
        return results, bpf_result, lab.prefix


_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM in the bench itself: unwind like Ctrl-C, so the lab is torn down.

    pyroute2 forks short-lived children (to open netlink sockets inside a
    namespace) and stops them with SIGTERM; they inherit this handler. A child
    must simply die: unwinding would run *our* ``with Lab()`` exit in the child
    and delete the namespaces under the parent's feet.
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 s runs and 50 idle connections")
    p.add_argument("--seconds", type=int, help="each iperf3 and connection-rate run (5)")
    p.add_argument("--idle", type=int, help="idle connections for the RSS measurement (1000)")
    p.add_argument("--workers", type=int, default=8, help="connection-rate workers (8)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--keep-logs", action="store_true", help="keep policies, logs and the audit log")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy flame graphs of egress-agent during the connection-rate runs",
    )
    p.add_argument(
        "--userspace-relay",
        action="store_true",
        help="also measure the agent with proxy.relay: userspace (the proxy copies the bytes)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="bench: %(message)s",
    )
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, nftables): sudo ./run bench", file=sys.stderr)
        return 1
    settings = Settings(
        seconds=args.seconds or (1 if args.quick else 5),
        workers=args.workers,
        idle=args.idle or (50 if args.quick else 1000),
        quick=args.quick,
        profile=args.profile,
        userspace_relay=args.userspace_relay,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # tear the lab down on SIGTERM too
    nofile = raise_nofile()
    if nofile[0] < 2 * settings.idle + 1000:
        print(
            f"bench: open-files limit {nofile[0]} is too low for {settings.idle} idle "
            "connections through a proxy (2 descriptors each): raise `ulimit -Hn`",
            file=sys.stderr,
        )
        return 1
    started = time.time()
    t0 = time.monotonic()
    try:
        results, bpf_result, lab_prefix = run_all(
            settings, started, args.results_dir, args.keep_logs
        )
    except KeyboardInterrupt:
        print("bench: interrupted; the lab and everything in it were removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    problems = failures(results)
    elapsed = time.monotonic() - t0
    doc = {
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "elapsed_seconds": round(elapsed, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "nofile": f"{nofile[0]}/{nofile[1]}",
        },
        "settings": asdict(settings),
        "lab_prefix": lab_prefix,
        "paths": results,
        "bpf": bpf_result,
        "problems": problems,
        "ok": not problems,
    }
    print(report.table(doc))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp_of(started)}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0 if not problems else 1
