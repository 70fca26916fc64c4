"""The compile cache's pure parts: the key, map references in bytecode, the
entry format, and which folders and entries it trusts."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

from egress_agent.bpf import cache

INSN = struct.Struct("<BBhi")


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return INSN.pack(code, (src << 4) | dst, off, imm)


def ld_map(dst: int, fd: int, *, kind: int = 1) -> bytes:
    return insn(0x18, dst, kind, 0, fd) + insn(0, 0, 0, 0, 0)


def ld_imm64(dst: int, value: int) -> bytes:
    return insn(0x18, dst, 0, 0, value & 0xFFFFFFFF) + insn(0, 0, 0, 0, value >> 32)


EXIT = insn(0x95)
MOV_R0_0 = insn(0xB7, 0, 0, 0, 0)


def entry(insns: bytes, *fds: int) -> cache.Entry:
    return cache.Entry(
        name="egress_test",
        prog_type=3,
        attach_type=0,
        license="GPL",
        insns=insns,
        maps=tuple(
            cache.MapSpec(
                name=f"m{fd}",
                map_type=1,
                key_size=4,
                value_size=8,
                max_entries=16,
                flags=0,
                fd=fd,
            )
            for fd in fds
        ),
    )


def test_map_references_are_relocated_and_nothing_else_changes() -> None:
    # An ld_imm64 of a plain 64-bit constant whose low half equals a map
    # descriptor number must stay as it is; map references (fd and value
    # kinds) get the new numbers.
    program = (
        ld_map(1, 7)
        + MOV_R0_0
        + ld_imm64(2, 7)
        + ld_map(3, 9, kind=2)
        + insn(0x85, imm=1)  # call map_lookup_elem
        + ld_map(1, 7)
        + EXIT
    )
    assert cache.map_references(program) == [7, 9, 7]
    moved = cache.relocate(program, {7: 41, 9: 42})
    assert cache.map_references(moved) == [41, 42, 41]
    assert len(moved) == len(program)
    changed = [i // 8 for i in range(0, len(program), 8) if program[i : i + 8] != moved[i : i + 8]]
    assert changed == [0, 5, 8]  # the first halves of the three map loads only


def test_bytecode_the_cache_cannot_relocate_is_refused() -> None:
    with pytest.raises(cache.CacheUnusable, match="kind 3"):
        cache.map_references(ld_map(1, 5, kind=3) + EXIT)  # a BTF id
    with pytest.raises(cache.CacheUnusable, match="whole number"):
        cache.map_references(EXIT + b"\0\0\0")


def test_an_entry_refers_only_to_maps_it_describes(tmp_path: Path) -> None:
    with pytest.raises(cache.CacheUnusable, match=r"\[12\]"):
        cache.write(tmp_path / "e.json", entry(ld_map(1, 11) + ld_map(2, 12) + EXIT, 11))
    assert not list(tmp_path.iterdir())


def test_an_entry_round_trips_and_is_private(tmp_path: Path) -> None:
    written = entry(ld_map(1, 11) + MOV_R0_0 + EXIT, 11)
    path = tmp_path / "egress_test-abc.json"
    cache.write(path, written)
    assert cache.read(path) == written
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_a_corrupt_entry_is_ignored_and_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "egress_test-abc.json"
    path.write_text('{"name": "egress_test", "insns": "zz"}')
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert cache.read(path) is None
    assert not path.exists()
    assert "unreadable" in caplog.text


def test_only_the_newest_entries_of_a_program_are_kept(tmp_path: Path) -> None:
    for i in range(cache.KEEP_ENTRIES + 3):
        path = tmp_path / f"egress_test-{i:04d}.json"
        cache.write(path, entry(MOV_R0_0 + EXIT))
        os.utime(path, ns=(i * 10**9, i * 10**9))
    cache.write(tmp_path / "egress_test-new.json", entry(MOV_R0_0 + EXIT))
    cache.write(tmp_path / "other-0001.json", entry(MOV_R0_0 + EXIT))
    kept = sorted(p.name for p in tmp_path.glob("egress_test-*.json"))
    assert len(kept) == cache.KEEP_ENTRIES
    assert "egress_test-new.json" in kept and "egress_test-0000.json" not in kept
    assert (tmp_path / "other-0001.json").exists()


@pytest.mark.parametrize(
    ("mode", "trusted"),
    [(0o700, True), (0o755, True), (0o770, False), (0o777, False), (0o1777, False)],
)
def test_a_folder_others_may_write_is_not_used(
    tmp_path: Path, mode: int, trusted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(mode)
    with caplog.at_level(logging.WARNING):
        assert cache.prepare_folder(folder) is trusted
    if not trusted:
        assert "writable by others" in caplog.text and "--bpf-cache-dir" in caplog.text


def test_a_missing_folder_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "cache"
    assert cache.prepare_folder(folder)
    assert folder.stat().st_mode & 0o777 == 0o700


def test_entries_behind_links_or_writable_by_others_are_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "real.json"
    cache.write(real, entry(MOV_R0_0 + EXIT))
    link = tmp_path / "egress_test-link.json"
    link.symlink_to(real)
    with caplog.at_level(logging.WARNING):
        assert cache.read(link) is None
        assert "symbolic link" in caplog.text
        real.chmod(0o666)
        assert cache.read(real) is None
        assert "writable by others" in caplog.text
    real.chmod(0o600)
    assert cache.read(real) is not None
    assert cache.read(tmp_path / "absent.json") is None


def test_a_folder_linked_elsewhere_is_not_used(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    assert cache.prepare_folder(tmp_path / "link") is False


def _key(source: Path, **changes: object) -> str:
    args: dict[str, object] = {
        "name": "egress_test",
        "source": source,
        "cflags": ("-DA=1",),
        "prog_type": "SCHED_CLS",
        "attach_type": None,
    }
    args.update(changes)
    return cache.cache_key(**args)  # type: ignore[arg-type]


def test_the_key_changes_with_everything_the_bytecode_depends_on(tmp_path: Path) -> None:
    source = tmp_path / "p.bpf.c"
    source.write_text("int x;\n")
    header = tmp_path / "p.h"
    header.write_text("#define A 1\n")
    base = _key(source)
    assert _key(source) == base
    assert _key(source, cflags=("-DA=2",)) != base
    assert _key(source, cflags=("-DA=1", "")) != base
    assert _key(source, prog_type="CGROUP_SOCK") != base
    assert _key(source, attach_type="CGROUP_INET_SOCK_CREATE") != base
    assert _key(source, name="egress_other") != base
    header.write_text("#define A 2\n")
    assert _key(source) != base
    header.write_text("#define A 1\n")
    assert _key(source) == base
    source.write_text("int y;\n")
    assert _key(source) != base


def test_the_folder_comes_from_the_flag_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache.cache_dir_from(None) == Path(cache.DEFAULT_CACHE_DIR)
    monkeypatch.setenv(cache.CACHE_ENV, "/srv/c")
    assert cache.cache_dir_from(None) == Path("/srv/c")
    assert cache.cache_dir_from("/x") == Path("/x")
    for off in ("none", "NONE", "", "off"):
        assert cache.cache_dir_from(off) is None
    monkeypatch.setenv(cache.CACHE_ENV, "none")
    assert cache.cache_dir_from(None) is None
