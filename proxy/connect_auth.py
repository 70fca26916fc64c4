"""Proxy authentication for the CONNECT listener: HTTP Basic, per workload.

Identity on the explicit path is by source address, as on the transparent
path; a workload can additionally be made to present a user name and password
(``Proxy-Authorization: Basic``, RFC 9110 section 11.7.2, RFC 7617), so that a
process in a pod that does not know the secret cannot use the proxy.

Secrets live in files the policy names (Kubernetes Secrets mounted as files,
or files readable only by root): a users file of ``name:password`` lines, or
one password file for a single user name. Files are looked at on every
request (one ``stat``) and read again when they changed, so a rotated secret
applies without a reload. Comparisons take the same time whatever the input.
Nothing here ever puts a password or an Authorization value into a message.
"""

from __future__ import annotations

import binascii
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from egress_agent.policy.model import ProxyAuth

__all__ = ["AuthResult", "CredentialFiles", "basic_credentials", "check_basic", "parse_users"]

# Larger credential files are refused rather than read.
MAX_CREDENTIAL_FILE = 1 << 20


@dataclass(frozen=True, kw_only=True)
class AuthResult:
    """``ok``, or why not: ``reason`` is safe to log and audit."""

    ok: bool
    reason: str = ""
    # The credential files could not be read: the proxy fails closed but says
    # it is its own fault (503), not the client's (407).
    unavailable: bool = False


def basic_credentials(value: str) -> tuple[bytes, bytes]:
    """User and password of a ``Basic`` credentials value; ValueError if malformed."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("Proxy-Authorization is not Basic")
    try:
        raw = binascii.a2b_base64(token.strip().encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("Proxy-Authorization Basic value is not base64") from None
    user, colon, password = raw.partition(b":")
    if not colon:
        raise ValueError("Proxy-Authorization Basic value has no ':' between user and password")
    return user, password


def check_basic(header: str | None, users: Mapping[bytes, bytes]) -> AuthResult:
    """Whether ``header`` (the Proxy-Authorization value) names one of ``users``."""
    if header is None:
        return AuthResult(ok=False, reason="proxy authentication required: no Proxy-Authorization")
    try:
        user, password = basic_credentials(header)
    except ValueError as exc:
        return AuthResult(ok=False, reason=str(exc))
    # Compare with every entry, so the time taken says nothing about which
    # user names exist or how much of a password was right.
    matched = False
    for known_user, known_password in users.items():
        same_user = hmac.compare_digest(user, known_user)
        same_password = hmac.compare_digest(password, known_password)
        matched |= same_user & same_password
    if not matched:
        return AuthResult(ok=False, reason="proxy credentials not accepted")
    return AuthResult(ok=True)


def parse_users(text: bytes, *, source: str) -> dict[bytes, bytes]:
    """``name:password`` lines; empty lines and lines starting with '#' are skipped."""
    users: dict[bytes, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith(b"#"):
            continue
        user, colon, password = line.partition(b":")
        if not colon or not user:
            # The line may hold a password: say where, never what.
            raise ValueError(f"{source}:{number}: expected name:password")
        if user in users:
            raise ValueError(f"{source}:{number}: user listed twice")
        users[user] = password
    return users


class CredentialFiles:
    """Reads the files a :class:`ProxyAuth` names, again whenever they change."""

    def __init__(self) -> None:
        # path -> (identity of the file when read, its bytes)
        self._cache: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}

    def check(self, auth: ProxyAuth, header: str | None) -> AuthResult:
        try:
            users = self.users(auth)
        except (OSError, ValueError) as exc:
            return AuthResult(
                ok=False, reason=f"proxy credentials unavailable: {exc}", unavailable=True
            )
        return check_basic(header, users)

    def users(self, auth: ProxyAuth) -> dict[bytes, bytes]:
        """The accepted users; OSError or ValueError saying which file is wrong."""
        if auth.users_file is not None:
            return parse_users(self._read(auth.users_file), source=auth.users_file)
        assert auth.username is not None and auth.password_file is not None
        password = self._read(auth.password_file)
        # `echo secret > file` adds a newline that is not part of the password.
        if password.endswith(b"\n"):
            password = password[:-1]
            if password.endswith(b"\r"):
                password = password[:-1]
        if not password:
            raise ValueError(f"{auth.password_file} is empty")
        return {auth.username.encode(): password}

    def _read(self, path: str) -> bytes:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read {path}: {exc.strerror}") from None
        # A Kubernetes Secret update swaps a symlink: the inode changes.
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == identity:
            return cached[1]
        if st.st_size > MAX_CREDENTIAL_FILE:
            raise ValueError(f"{path} is larger than {MAX_CREDENTIAL_FILE} bytes")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CREDENTIAL_FILE + 1)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read {path}: {exc.strerror}") from None
        self._cache[path] = (identity, data)
        return data
