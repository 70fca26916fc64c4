"""Where BPF objects are pinned: bpffs is never mounted over a folder's
contents; and errors name what they are about (the pin folder, the cgroup
root), not a program they have nothing to do with."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_agent.bpf.cgroup import CgroupMarkConfig, CgroupMarker
from egress_agent.bpf.libbpf import BpfError
from egress_agent.bpf.pins import ensure_bpffs


def test_a_pin_folder_whose_parent_has_contents_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("must stay visible")
    with pytest.raises(BpfError, match=r"not on bpffs .*\(--bpf-pin-dir under /sys/fs/bpf\)"):
        ensure_bpffs(tmp_path / "pins")
    assert (tmp_path / "kept.txt").read_text() == "must stay visible"


def test_a_pin_folder_error_names_the_folder_not_a_program(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("")
    with pytest.raises(BpfError) as info:
        ensure_bpffs(tmp_path / "pins")
    text = str(info.value)
    assert text.startswith(f"BPF pin folder {tmp_path / 'pins'}: not on bpffs"), text
    assert "egress_classify" not in text and "BPF program" not in text


def test_a_cgroup_root_error_names_the_root(tmp_path: Path) -> None:
    config = CgroupMarkConfig(mark_mask=0xFF0000, pin_dir=str(tmp_path / "pins"))
    with pytest.raises(BpfError) as info:
        CgroupMarker(config, str(tmp_path))
    text = str(info.value)
    assert text.startswith(f"cgroup root: {tmp_path} is not a cgroup v2 mount"), text
    assert text.endswith("give the cgroup2 mount point with --cgroup-root"), text
