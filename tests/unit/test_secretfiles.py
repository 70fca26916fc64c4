"""Secret files: re-read when they change (in place, rename-over, the
kubelet's ..data symlink swap), and errors that name the file, never the
content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egress_agent.proxy.secretfiles import SecretError, Secrets


def test_rereads_after_each_kind_of_change(tmp_path: Path) -> None:
    secrets = Secrets()
    path = tmp_path / "token"
    path.write_text("one\n")
    assert secrets.text(str(path)) == "one"
    path.write_text("two, longer\n")  # in place
    assert secrets.text(str(path)) == "two, longer"
    (tmp_path / "new").write_text("three\n")
    os.rename(tmp_path / "new", path)  # rename-over
    assert secrets.text(str(path)) == "three"
    for n in (1, 2):
        (tmp_path / f"..v{n}").mkdir()
        (tmp_path / f"..v{n}" / "token").write_text(f"k8s-{n}\n")
    os.symlink("..v1", tmp_path / "..data")
    path.unlink()
    os.symlink("..data/token", path)
    assert secrets.text(str(path)) == "k8s-1"
    os.symlink("..v2", tmp_path / "..tmp")
    os.rename(tmp_path / "..tmp", tmp_path / "..data")  # the kubelet's atomic swap
    assert secrets.text(str(path)) == "k8s-2"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"top-secret\nsecond line\n", "control characters"),
        (b"top-secret\xff", "not UTF-8"),
    ],
)
def test_errors_name_the_file_not_the_content(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "s"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SecretError) as info:
        Secrets().text(str(path))
    assert problem in str(info.value) and str(path) in str(info.value)
    assert "top-secret" not in str(info.value)


def test_trailing_newlines_only_are_stripped(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(b"  value with spaces \r\n")
    assert Secrets().text(str(path)) == "  value with spaces "
