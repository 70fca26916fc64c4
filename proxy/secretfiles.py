"""Credentials and certificates read from files, re-read when the files change.

Secrets live in files (a Kubernetes Secret volume, a systemd credential) so
that they can rotate without a restart and never pass through the policy or
the command line. Each use costs one ``os.stat`` of the path: it follows
symlinks, so a rename-over write (new inode) and the kubelet's ``..data``
symlink swap (a different target file) are both seen, as is an in-place
write (new size or mtime). Only on a change is the file read again.

Errors carry the path and what went wrong, never the content: the messages go
into logs, audit records and error pages.
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from egress_agent.policy.model import ClientTls

T = TypeVar("T")

# A secret is a header value or a token: anything larger is a mistake.
MAX_SECRET_BYTES = 64 * 1024


class SecretError(Exception):
    """A secret or certificate file is missing, unreadable or unusable.

    ``str()`` names the file and the problem, never the content."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class _Stamp:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretError(path, _os_problem(exc)) from None
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file (not mounted yet, or the path in the policy is wrong)"
    if exc.errno == errno.EACCES:
        return "permission denied: make it readable by the user running the agent"
    if exc.errno == errno.EISDIR:
        return "is a directory, expected a file"
    return f"cannot read: {exc.strerror or exc}"


class FileCache(Generic[T]):
    """Values derived from files, recomputed when a file changes.

    ``load`` turns the files' paths into a value (reading them itself) and
    raises :class:`SecretError` or ``ValueError`` (the message must not quote
    the content)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], tuple[tuple[_Stamp, ...], T]] = {}

    def get(self, paths: tuple[str, ...], load: Callable[[tuple[str, ...]], T]) -> T:
        stamps = tuple(_stamp(p) for p in paths)
        cached = self._entries.get(paths)
        if cached is not None and cached[0] == stamps:
            return cached[1]
        value = load(paths)
        # Kept with the stamps taken before reading: a file replaced while it
        # was being read has a newer stamp, so the next use reads it again.
        self._entries[paths] = (stamps, value)
        return value


def read_secret_text(path: str) -> str:
    """A secret file's text: UTF-8, trailing newline(s) stripped, and no
    control characters (it goes into a header line or a query string)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(path, _os_problem(exc)) from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretError(path, f"larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(path, "not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text:
        raise SecretError(path, "is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise SecretError(
            path, "contains control characters (a newline inside?): one line of text expected"
        )
    return text


class Secrets:
    """The proxy's view of secret files: text by path, checked on every use."""

    def __init__(self) -> None:
        self._text: FileCache[str] = FileCache()

    def text(self, path: str) -> str:
        return self._text.get((path,), lambda paths: read_secret_text(paths[0]))


class TlsContexts:
    """TLS contexts made from certificate files, each made again when its
    files change: the server side that terminates a client's TLS
    (``client_tls``: certificate chain and key) and the client side that
    verifies an upstream server (``upstream.ca_file``, or the system store)."""

    def __init__(self) -> None:
        self._server: FileCache[ssl.SSLContext] = FileCache()
        self._client: FileCache[ssl.SSLContext] = FileCache()
        self._default_client: ssl.SSLContext | None = None

    def server_context(self, tls: ClientTls) -> ssl.SSLContext:
        return self._server.get((tls.cert, tls.key), _load_server_context)

    def client_context(self, ca_file: str | None) -> ssl.SSLContext:
        if ca_file is None:
            if self._default_client is None:
                self._default_client = ssl.create_default_context()
            return self._default_client
        return self._client.get((ca_file,), _load_client_context)


def _load_server_context(paths: tuple[str, ...]) -> ssl.SSLContext:
    cert, key = paths
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except OSError as exc:
        raise SecretError(cert, f"cannot load the certificate and key {key}: {exc}") from None
    except ssl.SSLError as exc:
        raise SecretError(
            cert, f"certificate or key {key} is not valid PEM, or they do not match: {exc.reason}"
        ) from None
    return ctx


def _load_client_context(paths: tuple[str, ...]) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=paths[0])
    except (OSError, ssl.SSLError) as exc:
        raise SecretError(paths[0], f"cannot load CA certificates: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
