"""The compile cache against the kernel: a cached load is the compiled
program (the kernel's own tag over its instructions, map references
blanked, is the same; the maps have the same type, sizes and flags), an
entry the kernel refuses costs one compile, an untrusted folder is not
read, and an agent's second start loads from the cache and diverts."""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_agent.bpf import build, cache, cgroup, classifier
from egress_agent.bpf.libbpf import fdinfo
from egress_agent.lab.netns import Lab
from tests.harness import Agent, Audit, client

pytestmark = pytest.mark.netns

CLASSIFIER = classifier.program(
    classifier.BpfConfig(
        divert_mark=0x1000,
        upstream_mark=0x2000,
        proxy_v4=ipaddress.IPv4Address("169.254.77.1"),
        proxy_v6=ipaddress.IPv6Address("fd00:77::1"),
    )
)
MARKER = cgroup.program(cgroup.CgroupMarkConfig(mark_mask=0x7F000000, pin_dir="unused"))


@pytest.fixture
def bpffs(tmp_path: Path, require_root: None) -> Iterator[Path]:
    folder = tmp_path / "bpffs"
    folder.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _load(
    program: build.Program, pins: Path, folder: Path | None
) -> tuple[str, dict[str, tuple[int, ...]]]:
    """Load, and return the program's tag and each map's creation parameters."""
    loaded = build.load(program, pins, keep_pins=False, cache_dir=folder)
    try:
        specs = {
            name: (s.map_type, s.key_size, s.value_size, s.max_entries, s.flags)
            for name, m in loaded.maps.items()
            for s in [cache.map_spec(name, m.fd)]
        }
        return fdinfo(loaded.prog_fd)["prog_tag"], specs
    finally:
        loaded.close()


@pytest.mark.parametrize("program", [CLASSIFIER, MARKER], ids=["classifier", "cgroup-marker"])
def test_a_cached_load_is_the_compiled_program(
    program: build.Program, bpffs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        compiled = _load(program, bpffs / "a", folder)
    assert "compiled in" in caplog.text and "cached in" in caplog.text
    (entry_file,) = folder.glob(f"{program.name}-*.json")
    assert entry_file.stat().st_mode & 0o777 == 0o600
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cached = _load(program, bpffs / "b", folder)
    assert "loaded from the compile cache" in caplog.text and "compiled in" not in caplog.text
    assert cached == compiled
    assert sorted(compiled[1]) == sorted(program.maps)
    # Without a cache, the same program again: the tag depends only on the
    # source and flags.
    assert _load(program, bpffs / "c", None) == compiled


def test_an_entry_the_kernel_refuses_costs_one_compile(
    bpffs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    good = _load(MARKER, bpffs / "a", folder)
    (entry_file,) = folder.glob(f"{MARKER.name}-*.json")
    raw = json.loads(entry_file.read_text())
    # Bytecode the verifier rejects: r0 = *(u64 *)(r9 + 0), r9 never set.
    raw["insns"] = "79900000000000009500000000000000"
    entry_file.write_text(json.dumps(raw))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _load(MARKER, bpffs / "b", folder) == good
    assert "the cached build did not load" in caplog.text and "compiled in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _load(MARKER, bpffs / "c", folder) == good
    assert "loaded from the compile cache" in caplog.text


def test_an_untrusted_folder_is_not_read(
    bpffs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    good = _load(MARKER, bpffs / "a", folder)
    folder.chmod(0o777)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _load(MARKER, bpffs / "b", folder) == good
    assert "writable by others" in caplog.text and "compiled in" in caplog.text
    assert "loaded from the compile cache" not in caplog.text


POLICY = """
version: 1
workloads:
  pod: {cidrs: [198.19.1.2/32]}
intercept:
  - from: [pod]
    ports: [9000]
egress:
  - name: sink
    to: {cidrs: [198.18.1.2/32], ports: [9000]}
    action: allow
default: deny
"""


def test_an_agents_second_start_loads_from_the_cache_and_diverts(
    pod_and_sink: Lab, tmp_path: Path
) -> None:
    lab = pod_and_sink
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    folder = tmp_path / "agent-cache"
    audit = Audit(tmp_path / "audit.jsonl")
    took = []
    for start in ("first", "second"):
        log = tmp_path / f"agent-{start}.log"
        agent = Agent(
            lab,
            policy=policy,
            audit=audit.path,
            log=log,
            extra_args=("--datapath", "bpf", "--bpf-cache-dir", str(folder)),
        )
        began = time.monotonic()
        agent.start()
        took.append(time.monotonic() - began)
        try:
            mark = audit.mark()
            assert client(lab, "pod", "198.18.1.2", 9000, args=["--send", "hello\n"])["ok"]
            (record,) = audit.wait(1, after=mark)
            assert (record["verdict"], record["rule"]) == ("allow", "sink"), record
        finally:
            assert agent.stop() == 0
        text = log.read_text()
        if start == "first":
            assert "egress_classify (classifier.bpf.c) compiled in" in text, text
        else:
            assert "egress_classify (classifier.bpf.c) loaded from the compile cache" in text, text
            assert "compiled in" not in text, text
    print(
        f"start to ready: compiled {took[0]:.2f} s, from the cache {took[1]:.2f} s", file=sys.stderr
    )
