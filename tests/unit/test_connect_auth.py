"""Proxy authentication for the CONNECT listener: Basic credentials, users
files, re-reading changed files, and never a secret in a message."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from egress_agent.policy.model import ProxyAuth
from egress_agent.proxy.connect_auth import (
    CredentialFiles,
    basic_credentials,
    check_basic,
    parse_users,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


USERS = {b"backup": b"pa:ss word", b"ci": b"\xc3\xa9t\xc3\xa9"}


@pytest.mark.parametrize(
    ("header", "ok", "reason"),
    [
        (basic("backup", "pa:ss word"), True, ""),
        ("basic " + base64.b64encode(b"backup:pa:ss word").decode(), True, ""),
        (basic("ci", "été"), True, ""),
        (None, False, "proxy authentication required: no Proxy-Authorization"),
        (basic("backup", "pa:ss"), False, "proxy credentials not accepted"),
        (basic("Backup", "pa:ss word"), False, "proxy credentials not accepted"),
        (basic("ci", "pa:ss word"), False, "proxy credentials not accepted"),  # another's password
        (basic("nobody", ""), False, "proxy credentials not accepted"),
        ("Bearer abc", False, "Proxy-Authorization is not Basic"),
        ("Basic !!!!", False, "Proxy-Authorization Basic value is not base64"),
        ("Basic " + base64.b64encode(b"nocolon").decode(), False, "no ':'"),
        ("Basic", False, "no ':'"),
    ],
)
def test_check_basic(header: str | None, ok: bool, reason: str) -> None:
    result = check_basic(header, USERS)
    assert result.ok is ok
    assert reason in result.reason
    assert not result.unavailable


def test_basic_credentials_split_at_the_first_colon() -> None:
    assert basic_credentials(basic("u", "a:b:c")) == (b"u", b"a:b:c")


def test_users_file_format_and_errors_never_quote_the_line() -> None:
    text = b"# users\n\nbackup:pa:ss word\nci:\xc3\xa9t\xc3\xa9\n"
    assert parse_users(text, source="/f") == USERS
    with pytest.raises(ValueError) as bad:
        parse_users(b"just-a-secret-without-name\n", source="/f")
    assert str(bad.value) == "/f:1: expected name:password"
    with pytest.raises(ValueError, match="/f:2: user listed twice"):
        parse_users(b"a:x\na:secret2\n", source="/f")


def test_files_are_read_again_when_they_change(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("backup:one\n")
    files = CredentialFiles()
    auth = ProxyAuth(users_file=str(users))
    assert files.check(auth, basic("backup", "one")).ok
    users.write_text("backup:two-longer\n")
    assert not files.check(auth, basic("backup", "one")).ok
    assert files.check(auth, basic("backup", "two-longer")).ok
    # A Kubernetes Secret update: a new file swapped in by rename.
    new = tmp_path / "users.new"
    new.write_text("backup:three\n")
    os.replace(new, users)
    assert files.check(auth, basic("backup", "three")).ok


def test_single_user_with_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")  # as `echo hunter2 > password` writes it
    auth = ProxyAuth(username="backup", password_file=str(secret))
    files = CredentialFiles()
    assert files.check(auth, basic("backup", "hunter2")).ok
    assert not files.check(auth, basic("backup", "hunter2\n")).ok
    assert not files.check(auth, basic("other", "hunter2")).ok


def test_unreadable_credentials_fail_closed_without_quoting_them(tmp_path: Path) -> None:
    files = CredentialFiles()
    missing = files.check(ProxyAuth(users_file=str(tmp_path / "nope")), basic("a", "b"))
    assert not missing.ok and missing.unavailable
    assert "cannot read" in missing.reason and "nope" in missing.reason
    bad = tmp_path / "bad"
    bad.write_text("topsecretvalue\n")
    result = files.check(ProxyAuth(users_file=str(bad)), basic("a", "b"))
    assert not result.ok and result.unavailable
    assert "topsecretvalue" not in result.reason
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = files.check(ProxyAuth(username="u", password_file=str(empty)), basic("u", ""))
    assert not result.ok and result.unavailable and "is empty" in result.reason
