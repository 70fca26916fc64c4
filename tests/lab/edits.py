"""How people and tools change a file: write it in place, rename a new one
over it, point a symlink somewhere else atomically. Tests of the policy
file watch use each."""

from __future__ import annotations

import os
from pathlib import Path


def write_in_place(path: Path, text: str) -> None:
    """Truncate and write the same inode (``>``, most editors' save)."""
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)


def rename_over(path: Path, text: str) -> None:
    """Write a temporary file beside it and rename it over (vim, Ansible)."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.rename(tmp, path)


def swap_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (``ln -s`` + rename, as a
    deployment's ``current`` link or the kubelet's ``..data``)."""
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.rename(tmp, link)
