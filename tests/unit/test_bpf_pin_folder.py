"""Where BPF objects are pinned: bpffs is never mounted over a folder's contents."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_agent.bpf.loader import BpfError, ensure_bpffs


def test_a_pin_folder_whose_parent_has_contents_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("must stay visible")
    with pytest.raises(BpfError, match=r"not on bpffs .*\(--bpf-pin-dir under /sys/fs/bpf\)"):
        ensure_bpffs(tmp_path / "pins")
    assert (tmp_path / "kept.txt").read_text() == "must stay visible"
