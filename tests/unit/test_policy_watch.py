"""Which edits the policy file watch notices: the file itself, through a
symlink to a file elsewhere, through a swapped checkout link, through the
kubelet's ``..data`` swap; and which it leaves alone."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egress_agent.agent.watch import PolicyFileWatch, resolution
from tests.lab.edits import rename_over, swap_link, write_in_place


@pytest.fixture
def watches() -> Iterator[Callable[[Path], PolicyFileWatch]]:
    opened: list[PolicyFileWatch] = []

    def make(path: Path) -> PolicyFileWatch:
        opened.append(PolicyFileWatch(str(path)))
        return opened[-1]

    yield make
    for w in opened:
        w.close()


def _noticed(watch: PolicyFileWatch) -> bool:
    time.sleep(0.05)  # inotify events are queued synchronously; be generous
    return watch.changed()


def test_resolution_lists_every_link_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "releases" / "v1").mkdir(parents=True)
    (tmp_path / "deploy" / "releases" / "v1" / "policy.yaml").write_text("x")
    os.symlink("releases/v1", tmp_path / "deploy" / "current")
    (tmp_path / "etc").mkdir()
    os.symlink(tmp_path / "deploy" / "current" / "policy.yaml", tmp_path / "etc" / "policy.yaml")
    t = str(tmp_path)
    assert resolution(str(tmp_path / "etc" / "policy.yaml")) == [
        (f"{t}/etc", "policy.yaml"),
        (f"{t}/deploy", "current"),
        (f"{t}/deploy/releases/v1", "policy.yaml"),
    ]
    # A relative link with "..", and a plain file.
    os.symlink("../deploy/releases/v1/policy.yaml", tmp_path / "etc" / "rel.yaml")
    assert resolution(str(tmp_path / "etc" / "rel.yaml"))[-1] == (
        f"{t}/deploy/releases/v1",
        "policy.yaml",
    )
    assert resolution(str(tmp_path / "etc" / "none.yaml")) == [(f"{t}/etc", "none.yaml")]
    # A loop ends instead of spinning.
    os.symlink("loop", tmp_path / "etc" / "loop")
    assert len(resolution(str(tmp_path / "etc" / "loop"))) <= 41


def test_edits_of_a_symlinked_file_elsewhere(
    tmp_path: Path, watches: Callable[[Path], PolicyFileWatch]
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "srv").mkdir()
    target = tmp_path / "srv" / "egress.yaml"
    target.write_text("a")
    os.symlink(target, tmp_path / "etc" / "policy.yaml")
    watch = watches(tmp_path / "etc" / "policy.yaml")
    write_in_place(target, "b")
    assert _noticed(watch)
    rename_over(target, "c")
    assert _noticed(watch)
    (tmp_path / "srv" / "unrelated.log").write_text("noise")
    (tmp_path / "etc" / "audit.jsonl").write_text("noise")
    assert not _noticed(watch)


def test_a_link_pointed_elsewhere_brings_the_new_folder_in(
    tmp_path: Path, watches: Callable[[Path], PolicyFileWatch]
) -> None:
    for d in ("etc", "old", "new"):
        (tmp_path / d).mkdir()
    (tmp_path / "old" / "p.yaml").write_text("a")
    (tmp_path / "new" / "p.yaml").write_text("b")
    link = tmp_path / "etc" / "policy.yaml"
    os.symlink(tmp_path / "old" / "p.yaml", link)
    watch = watches(link)
    swap_link(link, str(tmp_path / "new" / "p.yaml"))
    assert _noticed(watch)
    assert str(tmp_path / "new") in watch.folders and str(tmp_path / "old") not in watch.folders
    write_in_place(tmp_path / "new" / "p.yaml", "c")
    assert _noticed(watch)
    write_in_place(tmp_path / "old" / "p.yaml", "no longer the policy")
    assert not _noticed(watch)


def test_a_swapped_checkout_link_and_edits_of_the_new_release(
    tmp_path: Path, watches: Callable[[Path], PolicyFileWatch]
) -> None:
    deploy = tmp_path / "deploy"
    for v in ("v1", "v2"):
        (deploy / "releases" / v).mkdir(parents=True)
        (deploy / "releases" / v / "policy.yaml").write_text(v)
    os.symlink("releases/v1", deploy / "current")
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "policy.yaml"
    os.symlink(deploy / "current" / "policy.yaml", link)
    watch = watches(link)
    swap_link(deploy / "current", "releases/v2")
    assert _noticed(watch)
    rename_over(deploy / "releases" / "v2" / "policy.yaml", "v2 edited")
    assert _noticed(watch)
    write_in_place(deploy / "releases" / "v1" / "policy.yaml", "the old release")
    assert not _noticed(watch)


def test_the_configmap_swap_again_and_again(
    tmp_path: Path, watches: Callable[[Path], PolicyFileWatch]
) -> None:
    cm = tmp_path / "configmap"
    (cm / "..v1").mkdir(parents=True)
    (cm / "..v1" / "policy.yaml").write_text("v1")
    os.symlink("..v1", cm / "..data")
    os.symlink("..data/policy.yaml", cm / "policy.yaml")
    watch = watches(cm / "policy.yaml")
    for old, new in (("..v1", "..v2"), ("..v2", "..v3")):
        (cm / new).mkdir()
        (cm / new / "policy.yaml").write_text(new)
        swap_link(cm / "..data", new)
        # The kubelet removes the old version afterwards.
        (cm / old / "policy.yaml").unlink()
        (cm / old).rmdir()
        assert _noticed(watch)
        assert str(cm / new) in watch.folders and str(cm / old) not in watch.folders
