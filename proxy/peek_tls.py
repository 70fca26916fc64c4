"""The server name in a TLS ClientHello (RFC 8446 section 4.1.2, RFC 5246
section 7.4.1.2, RFC 6066 section 3), parsed as its bytes arrive.

Decisions (where the RFCs leave room): the ClientHello may be fragmented over
several handshake records (RFC 8446 section 5.1); its body may be up to
:data:`MAX_CLIENT_HELLO` bytes, room for post-quantum key shares
(X25519MLKEM768 adds about 1.2 KB). A record that carries bytes beyond the end
of the ClientHello is refused: the client has nothing else to say in a
handshake record before the server answers. See ``peek`` for the contract
every parser here keeps.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from egress_agent.proxy.hostnames import hostname
from egress_agent.proxy.peek_result import Incremental, Peeked, Protocol

_T = TypeVar("_T")

# Largest ClientHello body (the handshake message without its 4-byte header)
# we wait for. 16 KiB holds today's hellos with hybrid post-quantum key shares
# several times over; a declared length above it is refused at once rather
# than buffered.
MAX_CLIENT_HELLO = 16384

# Largest TLS record payload accepted: 2^14 (RFC 8446 section 5.1) plus the
# 256 bytes of slack RFC 8446 section 5.2 allows protected records.
MAX_TLS_RECORD = 16384 + 256


# The first byte of a handshake record: what tells TLS apart (see peek.Sniffer).
CONTENT_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4

# What a body parsing step yields while it waits: the length the handshake
# bytes must reach before it can go on.
_Steps = Generator[int, None, _T]


def parse_client_hello(buf: bytes) -> Peeked | None:
    """The SNI of the TLS ClientHello at the start of ``buf``.

    ``buf`` starts with TLS records. Returns a :class:`Peeked` (TLS, with
    ``server_name`` None when the hello has no server_name extension), None when
    the hello is not complete yet, or raises ValueError when it is malformed.
    One-shot form of :class:`ClientHelloParser`.
    """
    return ClientHelloParser().feed(buf)


class ClientHelloParser(Incremental):
    """Incremental :func:`parse_client_hello`: :meth:`feed` takes the bytes
    that arrived since the last call and answers as ``parse_client_hello``
    would for everything fed so far.

    Each byte is looked at once: the record layer is followed as a stream
    (a record header, then its payload, then the next header), and the
    ClientHello body is parsed by a generator that waits where the bytes
    end and resumes there. A hello trickled in 1-byte records thus costs
    work in proportion to its length, where parsing the whole buffer again
    at every wake-up cost its square.
    """

    __slots__ = (
        "_body",
        "_declared",
        "_first",
        "_handshake",
        "_header",
        "_message_end",
        "_need",
        "_payload_left",
        "examined",
    )

    def __init__(self) -> None:
        super().__init__()
        self._header = bytearray()  # the record header being received (< 5 bytes)
        self._payload_left = 0  # bytes of the current record's payload still to come
        self._first = True  # no record header complete yet
        self._declared = 0  # sum of the records' declared payload lengths
        self._message_end: int | None = None  # handshake header + body length
        self._handshake = bytearray()  # the handshake message so far
        self._body: _Steps[str | None] | None = None
        self._need = 0  # handshake length the body parser waits for
        self.examined = 0  # bytes taken in (for tests of the parsing cost)

    def _advance(self, data: bytes) -> Peeked | None:
        self._read_records(data)
        if self._message_end is None:
            return None
        if self._body is None:
            self._body = _hello_body(self._handshake, self._message_end - _HANDSHAKE_HEADER)
        available = len(self._handshake)
        try:
            while self._need <= available:
                self._need = next(self._body)
        except StopIteration as done:
            return Peeked(protocol=Protocol.TLS, server_name=done.value)
        return None

    def _read_records(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._payload_left:
                take = min(self._payload_left, end - pos)
                self._handshake += data[pos : pos + take]
                self.examined += take
                self._payload_left -= take
                pos += take
                self._check_handshake()
                continue
            if self._message_end is not None and self._declared >= self._message_end:
                return  # bytes after the ClientHello are never looked at
            take = min(_RECORD_HEADER - len(self._header), end - pos)
            self._header += data[pos : pos + take]
            self.examined += take
            pos += take
            _check_record_header(bytes(self._header), first=self._first)
            if len(self._header) < _RECORD_HEADER:
                return
            length = int.from_bytes(self._header[3:5], "big")
            if length == 0:
                # RFC 8446 section 5.1, RFC 5246 section 6.2.1.
                raise ValueError("zero-length TLS handshake record")
            if length > MAX_TLS_RECORD:
                raise ValueError(f"TLS record length {length} exceeds {MAX_TLS_RECORD}")
            self._header.clear()
            self._first = False
            self._declared += length
            self._payload_left = length
            self._check_handshake()

    def _check_handshake(self) -> None:
        if self._message_end is None:
            body_length = _check_handshake_header(self._handshake)
            if body_length is not None:
                self._message_end = _HANDSHAKE_HEADER + body_length
        if self._message_end is not None and self._declared > self._message_end:
            raise ValueError("TLS record carries bytes after the ClientHello")


def _check_record_header(header: bytes, *, first: bool) -> None:
    """Validate as much of a TLSPlaintext header as has arrived."""
    if header and header[0] != CONTENT_HANDSHAKE:
        # Handshake messages must not be interleaved with other record types
        # (RFC 8446 section 5.1); the first record of a client is a handshake.
        where = "first" if first else "a ClientHello fragment"
        raise ValueError(f"TLS record type 0x{header[0]:02x} for {where}, expected handshake 0x16")
    # legacy_record_version: 0x0300 (SSLv3) .. 0x0304; RFC 8446 section 5.1
    # has clients send 0x0301 or 0x0303 in the first hello.
    if len(header) >= 2 and header[1] != 0x03:
        raise ValueError(f"TLS record version major byte 0x{header[1]:02x}, expected 0x03")
    if len(header) >= 3 and header[2] > 0x04:
        raise ValueError(f"TLS record version 0x03{header[2]:02x} is not 0x0300-0x0304")


def _check_handshake_header(handshake: bytearray) -> int | None:
    """The ClientHello body length once the 4-byte handshake header is in."""
    if handshake and handshake[0] != _HANDSHAKE_CLIENT_HELLO:
        raise ValueError(f"TLS handshake type {handshake[0]}, expected ClientHello (1)")
    if len(handshake) < _HANDSHAKE_HEADER:
        return None
    length = int.from_bytes(handshake[1:4], "big")
    if length > MAX_CLIENT_HELLO:
        raise ValueError(f"ClientHello length {length} exceeds the {MAX_CLIENT_HELLO}-byte cap")
    return length


class _Cursor:
    """A cursor over a length-delimited TLS structure inside a buffer that is
    still filling up: going past the structure's declared end is malformed
    (ValueError, at once), going past the bytes received so far means
    waiting (the step yields the length it needs and resumes there)."""

    __slots__ = ("_data", "_end", "_pos", "_what")

    def __init__(self, data: bytearray, start: int, end: int, what: str) -> None:
        self._data = data
        self._pos = start
        self._end = end
        self._what = what

    @property
    def at_end(self) -> bool:
        return self._pos == self._end

    @property
    def left(self) -> int:
        return self._end - self._pos

    def _advance(self, n: int, what: str) -> int:
        if self._pos + n > self._end:
            raise ValueError(f"{what} overruns {self._what}")
        start = self._pos
        self._pos += n
        return start

    def take(self, n: int, what: str) -> _Steps[bytes]:
        start = self._advance(n, what)
        while start + n > len(self._data):
            yield start + n
        return bytes(self._data[start : start + n])

    def uint(self, size: int, what: str) -> _Steps[int]:
        return int.from_bytes((yield from self.take(size, what)), "big")

    def vector(self, size: int, what: str) -> _Steps[_Cursor]:
        """The vector behind a ``size``-byte length prefix; the cursor moves
        past it whether or not its bytes have arrived yet."""
        length = yield from self.uint(size, f"length of {what}")
        start = self._advance(length, what)
        return _Cursor(self._data, start, start + length, what)

    def rest(self) -> _Steps[bytes]:
        return (yield from self.take(self.left, self._what))

    def wait_for_end(self) -> _Steps[None]:
        while self._end > len(self._data):
            yield self._end


def _hello_body(handshake: bytearray, length: int) -> _Steps[str | None]:
    """The host_name in a ClientHello body (RFC 8446 section 4.1.2, RFC 5246
    section 7.4.1.2): the ``length`` bytes after the handshake header in
    ``handshake``, which may still be arriving."""
    hello = _Cursor(handshake, _HANDSHAKE_HEADER, _HANDSHAKE_HEADER + length, "ClientHello")
    version = yield from hello.uint(2, "legacy_version")
    if version >> 8 != 0x03 or version & 0xFF > 0x04:
        raise ValueError(f"ClientHello version 0x{version:04x} is not 0x0300-0x0304")
    yield from hello.take(32, "random")
    session_id = yield from hello.vector(1, "legacy_session_id")
    if session_id.left > 32:
        raise ValueError(f"session id of {session_id.left} bytes, at most 32 allowed")
    suites = yield from hello.vector(2, "cipher_suites")
    if suites.left < 2 or suites.left % 2:
        raise ValueError(f"cipher_suites of {suites.left} bytes, expected an even number >= 2")
    compression = yield from hello.vector(1, "legacy_compression_methods")
    # The list must offer null (0) (RFC 5246 section 7.4.1.2); TLS 1.3 clients
    # send exactly that one byte (RFC 8446 section 4.1.2).
    if 0 not in (yield from compression.rest()):
        raise ValueError("compression methods do not offer null (0)")
    name = None
    # An SSLv3-style hello ends here; extensions are recognised by there being
    # bytes after the compression methods (RFC 5246 section 7.4.1.2).
    if not hello.at_end:
        extensions = yield from hello.vector(2, "extensions")
        if not hello.at_end:
            raise ValueError(f"{hello.left} bytes after the ClientHello extensions")
        seen: set[int] = set()
        while not extensions.at_end:
            kind = yield from extensions.uint(2, "extension type")
            data = yield from extensions.vector(2, f"extension {kind}")
            if kind in seen:
                # RFC 8446 section 4.2, RFC 5246 section 7.4.1.4.
                raise ValueError(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                name = yield from _server_name(data)
    yield from hello.wait_for_end()
    return name


def _server_name(ext: _Cursor) -> _Steps[str]:
    """The host_name in a server_name extension (RFC 6066 section 3)."""
    names = yield from ext.vector(2, "server_name_list")
    if not ext.at_end:
        raise ValueError(f"{ext.left} bytes after server_name_list")
    name = None
    while not names.at_end:
        kind = yield from names.uint(1, "name_type")
        if kind != _NAME_TYPE_HOST_NAME:
            # host_name is the only type defined, and the entry of an unknown
            # type cannot be delimited (RFC 6066 section 3).
            raise ValueError(f"server name type {kind}, only host_name (0) is defined")
        host = yield from names.vector(2, "host_name")
        if name is not None:
            # "MUST NOT contain more than one name of the same name_type".
            raise ValueError("more than one host_name in server_name")
        name = hostname((yield from host.rest()), "server name")
    if name is None:
        raise ValueError("empty server_name_list")
    return name
