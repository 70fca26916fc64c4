"""What the first bytes of a connection say (:class:`Peeked`), and the
contract of the parsers that learn it from bytes fed as they arrive
(:class:`Incremental`; see ``peek``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Protocol(enum.Enum):
    TLS = "tls"
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True, kw_only=True)
class Peeked:
    """What the first bytes of a connection say.

    ``server_name`` is the TLS SNI or the HTTP Host: lower-case, without port
    or trailing dot, an IPv6 literal without its brackets; None when the client
    named no server. ``method`` and ``target`` are set for HTTP only; the
    target is the request-target as sent (origin-, absolute-, authority- or
    asterisk-form).
    """

    protocol: Protocol
    server_name: str | None
    method: str | None = None
    target: str | None = None


class Incremental:
    """A parser fed the bytes of one stream as they arrive. :meth:`feed`
    answers ``None`` (more bytes needed), a :class:`Peeked`, or raises
    ``ValueError``; once it has answered with a value or an error, it keeps
    that answer whatever comes after."""

    __slots__ = ("_outcome",)

    def __init__(self) -> None:
        self._outcome: Peeked | ValueError | None = None

    def feed(self, data: bytes) -> Peeked | None:
        if self._outcome is None:
            try:
                self._outcome = self._advance(data)
            except ValueError as exc:
                self._outcome = exc
        if isinstance(self._outcome, ValueError):
            raise self._outcome
        return self._outcome

    def _advance(self, data: bytes) -> Peeked | None:
        raise NotImplementedError
