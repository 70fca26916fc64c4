"""Learn the server name a client asks for from the first bytes it sends.

The proxy decides some connections by name (``*.example.com``), but a
transparently diverted client never told us a name: it only dialled an address.
What it sends first does name the server -- the SNI in a TLS ClientHello, or the
Host of an HTTP/1 request head -- so the proxy holds the first bytes back, asks
:func:`sniff` what they are, decides, and only then relays them upstream.

Everything here is a pure function over bytes the client controls, with the
three-way contract every parser of untrusted bytes in this project keeps:

* a :class:`Peeked` when the bytes are enough to decide;
* ``None`` when they are a prefix of something that may still turn out valid
  (read more and call again with the longer buffer);
* ``ValueError`` with a short reason when they are malformed. No other
  exception escapes, and messages never quote more than a few input bytes.

Malformed input is refused as early as the bytes allow, and answers are stable:
once a buffer yields a value or an error, every longer buffer starting with it
yields the same. Bytes after the ClientHello or after the HTTP head (early data,
a request body) are never looked at.

Decisions (where the RFCs leave room):

* TLS: the ClientHello may be fragmented over several handshake records
  (RFC 8446 section 5.1); its body may be up to :data:`MAX_CLIENT_HELLO` bytes,
  room for post-quantum key shares (X25519MLKEM768 adds about 1.2 KB). A record
  that carries bytes beyond the end of the ClientHello is refused: the client
  has nothing else to say in a handshake record before the server answers.
* HTTP: lines must end in CRLF. RFC 9112 section 2.2 lets a recipient accept a
  bare LF, but a proxy that frames a head differently from the server behind it
  invites request smuggling, and refusing is always safe here. Obsolete line
  folding, leading empty lines and more than one Host are refused as well.
* HTTP names: when the request-target carries an authority (absolute-form, or
  CONNECT's authority-form) it names the server (RFC 9112 section 3.2.2); a
  Host that names another server is refused rather than guessed at. A request
  with no name at all (HTTP/1.0, or an empty Host) gives ``server_name=None``.
* :func:`sniff` only takes bytes for HTTP when they start with one of the
  methods in :data:`HTTP_METHODS` followed by a space, so binary protocols
  (PostgreSQL, SSH, HTTP/2 prior knowledge ``PRI *``) are plain TCP.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")

__all__ = [
    "HTTP_METHODS",
    "MAX_CLIENT_HELLO",
    "MAX_HTTP_HEAD",
    "MAX_TLS_RECORD",
    "ClientHelloParser",
    "HttpHeadParser",
    "Peeked",
    "Protocol",
    "Sniffer",
    "parse_client_hello",
    "parse_http_request_head",
    "sniff",
]

# Largest ClientHello body (the handshake message without its 4-byte header)
# we wait for. 16 KiB holds today's hellos with hybrid post-quantum key shares
# several times over; a declared length above it is refused at once rather
# than buffered.
MAX_CLIENT_HELLO = 16384

# Largest TLS record payload accepted: 2^14 (RFC 8446 section 5.1) plus the
# 256 bytes of slack RFC 8446 section 5.2 allows protected records.
MAX_TLS_RECORD = 16384 + 256

# Largest HTTP request head (request line, fields, and the empty line ending
# them, CRLFs included) we wait for.
MAX_HTTP_HEAD = 16384

# The methods that make sniff() read the bytes as HTTP: RFC 9110 section 9 and
# PATCH (RFC 5789). Methods are case-sensitive (RFC 9110 section 9.1).
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


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


# ---------------------------------------------------------------- TLS

_CONTENT_HANDSHAKE = 0x16
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


class _Incremental:
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


class ClientHelloParser(_Incremental):
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
    if header and header[0] != _CONTENT_HANDSHAKE:
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
        name = _hostname((yield from host.rest()), "server name")
    if name is None:
        raise ValueError("empty server_name_list")
    return name


# ---------------------------------------------------------------- names

_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_IPV6_BYTES = b"0123456789abcdefABCDEF:."


def _hostname(raw: bytes, what: str) -> str:
    """A DNS name as the policy compares it: lower-case, no trailing dot.

    Only letters, digits, '-', '.' and '_' are accepted (RFC 6066 section 3
    wants an ASCII host name, IDNs in A-label form), so a name can never smuggle
    a wildcard or an empty label past the policy's suffix match. IPv4 literals
    pass as they are: RFC 6066 keeps them out of SNI, but refusing them gains
    nothing -- they are compared with the policy's names like any other text.
    """
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} of {len(raw)} bytes, expected 1-255")
    stray = raw.translate(None, _HOST_BYTES)
    if stray:
        raise ValueError(
            f"{what} contains byte 0x{stray[0]:02x}; only letters, digits, '-', '.', '_' allowed"
        )
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if not all(labels) or any(len(label) > 63 for label in labels):
        raise ValueError(f"{what} has an empty label or one longer than 63 bytes")
    return name


def _authority_host(authority: bytes, *, port_required: bool, what: str) -> str:
    """The host of ``uri-host [ ":" port ]`` (RFC 9110 section 7.2, RFC 3986
    section 3.2), bracketed IPv6 literals without their brackets."""
    if authority.startswith(b"["):
        close = authority.find(b"]")
        if close < 0:
            raise ValueError(f"{what}: IPv6 literal without closing ']'")
        literal, rest = authority[1:close], authority[close + 1 :]
        # Zone ids (RFC 6874) and IPvFuture have no business in an egress name.
        if not literal or literal.translate(None, _IPV6_BYTES):
            raise ValueError(f"{what}: bracketed host is not an IPv6 address")
        text = literal.decode("ascii")
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{what}: bracketed host is not an IPv6 address") from None
        host = text.lower()
    else:
        colon = authority.find(b":")
        if colon < 0:
            colon = len(authority)
        host, rest = _hostname(authority[:colon], what), authority[colon:]
    if rest and not rest.startswith(b":"):
        raise ValueError(f"{what}: unexpected bytes after the host")
    port = rest[1:]
    if port_required and not port:
        raise ValueError(f"{what}: port required")
    # RFC 3986 allows an empty port after ':'; a present one must fit 16 bits.
    if port and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{what}: port is not a number 0-65535")
    return host


# ---------------------------------------------------------------- HTTP

_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VCHAR = bytes(range(0x21, 0x7F))
# field-value bytes: SP, HTAB, VCHAR and obs-text (RFC 9110 section 5.5).
_FIELD_VALUE = b" \t" + _VCHAR + bytes(range(0x80, 0x100))
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
_SCHEME_FIRST = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SCHEME = _SCHEME_FIRST + b"0123456789+-."


def parse_http_request_head(buf: bytes) -> Peeked | None:
    """Method, request-target and server name of the HTTP/1.0 or HTTP/1.1
    request head at the start of ``buf`` (RFC 9112 sections 2-5).

    Returns a :class:`Peeked` (HTTP) once the head's closing empty line has
    arrived, None while ``buf`` is a valid prefix of a head shorter than
    :data:`MAX_HTTP_HEAD`, and raises ValueError otherwise. One-shot form of
    :class:`HttpHeadParser`.
    """
    return HttpHeadParser().feed(buf)


class HttpHeadParser(_Incremental):
    """Incremental :func:`parse_http_request_head`: :meth:`feed` takes the
    bytes that arrived since the last call and answers as
    ``parse_http_request_head`` would for everything fed so far.

    Each complete line is parsed once, when its CRLF arrives; the line still
    arriving is checked as it grows, only its new bytes each time. A head
    trickled byte by byte thus costs work in proportion to its length.
    """

    __slots__ = (
        "_buf",
        "_checked",
        "_host_name",
        "_host_seen",
        "_in_value",
        "_line_start",
        "_name_len",
        "_part_len",
        "_parts",
        "_request",
        "_scan",
        "_total",
        "_version",
    )

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()  # the first MAX_HTTP_HEAD bytes
        self._total = 0  # bytes fed, also past the cap
        self._line_start = 0  # where the line being received starts in _buf
        self._scan = 0  # where the search for the next CRLF goes on
        self._request: tuple[bytes, bytes] | None = None  # method, request-target
        self._host_seen = False
        self._host_name: str | None = None
        self._new_line()

    def _new_line(self) -> None:
        """State of the checks of the line being received, so far."""
        self._checked = 0  # its bytes checked already
        self._parts = 0  # request line: spaces seen
        self._part_len = 0  # request line: bytes of the current part
        self._version = b""  # request line: the HTTP-version part
        self._in_value = False  # field line: past the colon
        self._name_len = 0  # field line: bytes of the name

    def _advance(self, data: bytes) -> Peeked | None:
        buf = self._buf
        buf += data[: MAX_HTTP_HEAD - len(buf)]
        self._total += len(data)
        while (end := buf.find(b"\r\n", self._scan)) >= 0:
            line = bytes(buf[self._line_start : end])
            self._line_start = self._scan = end + 2
            self._new_line()
            if self._complete_line(line):
                return self._result()
        # The line still arriving; a CR at its end may be the first half of a CRLF.
        self._scan = max(self._line_start, len(buf) - 1)
        end = len(buf)
        if end > self._line_start and buf[end - 1] == 0x0D:
            end -= 1
        start = self._line_start + self._checked
        if end > start:
            self._check_partial(bytes(buf[start:end]))
            self._checked = end - self._line_start
        if self._total >= MAX_HTTP_HEAD:
            raise ValueError(f"no end of the HTTP request head within {MAX_HTTP_HEAD} bytes")
        return None

    def _complete_line(self, line: bytes) -> bool:
        """Parse one complete line; True when it is the empty line ending the head."""
        # RFC 9112 section 2.2: a bare CR is invalid; a bare LF we refuse too
        # (see the module docstring).
        if b"\r" in line:
            raise ValueError("bare CR in HTTP request head")
        if b"\n" in line:
            raise ValueError("bare LF in HTTP request head, lines must end in CRLF")
        if self._request is None:
            self._request = _parse_request_line(line)
            return False
        if not line:
            return True
        name, value = _parse_field_line(line)
        if name.lower() == b"host":
            if self._host_seen:
                raise ValueError("more than one Host header (RFC 9112 section 3.2)")
            self._host_seen = True
            self._host_name = _host_header(value)
        return False

    def _result(self) -> Peeked:
        assert self._request is not None
        method, target = self._request
        target_name = _target_host(method, target)
        host_name = self._host_name
        if target_name is not None and host_name is not None and target_name != host_name:
            raise ValueError("Host header names another server than the request-target")
        return Peeked(
            protocol=Protocol.HTTP,
            server_name=target_name or host_name,
            method=method.decode("ascii"),
            target=target.decode("ascii"),
        )

    def _check_partial(self, new: bytes) -> None:
        """Refuse the line being received, from its ``new`` bytes, as soon as
        it cannot become a valid line (what ``_check_request_line_prefix``
        and ``_check_field_line_prefix`` check, one piece at a time)."""
        if b"\n" in new:
            raise ValueError("bare LF in HTTP request head, lines must end in CRLF")
        if b"\r" in new:
            raise ValueError("bare CR in HTTP request head")
        if self._request is None:
            self._check_request_line_piece(new)
        else:
            self._check_field_line_piece(new)

    def _check_request_line_piece(self, new: bytes) -> None:
        for i, piece in enumerate(new.split(b" ")):
            if i:  # a space ends the current part
                if self._parts == 0 and self._part_len == 0:
                    raise ValueError("HTTP method b'' is not a token")
                if self._parts == 1 and self._part_len == 0:
                    raise ValueError(
                        "request-target is empty or has bytes other than visible ASCII"
                    )
                self._parts += 1
                self._part_len = 0
                if self._parts > 2:
                    raise ValueError("request line has more than two spaces")
            if not piece:
                continue
            if self._parts == 0 and piece.translate(None, _TCHAR):
                raise ValueError(f"HTTP method {_excerpt(piece)} is not a token")
            if self._parts == 1 and piece.translate(None, _VCHAR):
                raise ValueError("request-target is empty or has bytes other than visible ASCII")
            if self._parts == 2:
                self._version += piece
                if not any(v.startswith(self._version) for v in _VERSIONS):
                    raise ValueError("HTTP version is not HTTP/1.0 or HTTP/1.1")
            self._part_len += len(piece)

    def _check_field_line_piece(self, new: bytes) -> None:
        if self._checked == 0 and new[:1] in (b" ", b"\t"):
            # obs-fold, or whitespace before the first field (RFC 9112 sections
            # 5.2 and 2.2): both may be rejected, and we do.
            raise ValueError("header line starts with whitespace (obsolete line folding)")
        value = new
        if not self._in_value:
            name, colon, value = new.partition(b":")
            self._name_len += len(name)
            if name.translate(None, _TCHAR) or (colon and not self._name_len):
                # Includes whitespace before the colon (RFC 9112 section 5.1).
                raise ValueError("header name is empty or not a token")
            self._in_value = bool(colon)
        if self._in_value and value.translate(None, _FIELD_VALUE):
            raise ValueError("control byte in a header value")


def _check_line_endings(region: bytes) -> None:
    # RFC 9112 section 2.2: a bare CR is invalid; a bare LF we refuse too
    # (see the module docstring).
    rest = region.replace(b"\r\n", b"")
    if b"\r" in rest:
        raise ValueError("bare CR in HTTP request head")
    if b"\n" in rest:
        raise ValueError("bare LF in HTTP request head, lines must end in CRLF")


def _parse_request_line(line: bytes) -> tuple[bytes, bytes]:
    """``method SP request-target SP HTTP-version`` (RFC 9112 section 3)."""
    _check_request_line_prefix(line)
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise ValueError("request line is not 'method SP request-target SP HTTP-version'")
    if parts[2] not in _VERSIONS:
        raise ValueError("HTTP version is not HTTP/1.0 or HTTP/1.1")
    return parts[0], parts[1]


def _check_request_line_prefix(line: bytes) -> None:
    """Refuse a request line, complete or not, as soon as it cannot be one."""
    parts = line.split(b" ")
    if len(parts) > 3:
        raise ValueError("request line has more than two spaces")
    method = parts[0]
    if method.translate(None, _TCHAR) or (len(parts) > 1 and not method):
        raise ValueError(f"HTTP method {_excerpt(method)} is not a token")
    if len(parts) > 1:
        target = parts[1]
        if target.translate(None, _VCHAR) or (len(parts) > 2 and not target):
            raise ValueError("request-target is empty or has bytes other than visible ASCII")
    if len(parts) > 2 and not any(v.startswith(parts[2]) for v in _VERSIONS):
        raise ValueError("HTTP version is not HTTP/1.0 or HTTP/1.1")


def _parse_field_line(line: bytes) -> tuple[bytes, bytes]:
    """``field-name ":" OWS field-value OWS`` (RFC 9112 section 5)."""
    _check_field_line_prefix(line)
    name, colon, value = line.partition(b":")
    if not colon:
        raise ValueError("header line without ':'")
    return name, value.strip(b" \t")


def _check_field_line_prefix(line: bytes) -> None:
    """Refuse a field line, complete or not, as soon as it cannot be one."""
    if line[:1] in (b" ", b"\t"):
        # obs-fold, or whitespace before the first field (RFC 9112 sections
        # 5.2 and 2.2): both may be rejected, and we do.
        raise ValueError("header line starts with whitespace (obsolete line folding)")
    name, colon, value = line.partition(b":")
    if name.translate(None, _TCHAR) or (colon and not name):
        # Includes whitespace before the colon (RFC 9112 section 5.1).
        raise ValueError("header name is empty or not a token")
    if value.translate(None, _FIELD_VALUE):
        raise ValueError("control byte in a header value")


def _host_header(value: bytes) -> str | None:
    if not value:
        # An empty Host is what a client sends when the target URI has no
        # authority (RFC 9112 section 3.2): no name.
        return None
    return _authority_host(value, port_required=False, what="Host header")


def _target_host(method: bytes, target: bytes) -> str | None:
    """The host named by the request-target, if its form carries one
    (RFC 9112 section 3.2)."""
    if method == b"CONNECT":
        # authority-form, and only for CONNECT (section 3.2.3).
        return _authority_host(target, port_required=True, what="CONNECT target")
    if target == b"*":
        if method != b"OPTIONS":
            raise ValueError("asterisk-form request-target is only for OPTIONS")
        return None
    if target.startswith(b"/"):
        return None  # origin-form
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme[:1] and scheme[:1] in _SCHEME_FIRST and not scheme.translate(None, _SCHEME):
        authority = rest
        for delimiter in (b"/", b"?", b"#"):
            authority = authority.partition(delimiter)[0]
        if b"@" in authority:
            # RFC 9110 section 4.2.4: userinfo is likely used to obscure the
            # authority and should be treated as an error.
            raise ValueError("request-target has userinfo")
        if not authority:
            raise ValueError("absolute-form request-target without a host")
        return _authority_host(authority, port_required=False, what="request-target")
    raise ValueError("request-target is not origin-, absolute-, authority- or asterisk-form")


def _excerpt(data: bytes) -> str:
    """At most a few input bytes, for an error message."""
    return repr(data[:8]) + ("..." if len(data) > 8 else "")


# ---------------------------------------------------------------- sniff

_HTTP_STARTS = tuple(m.encode("ascii") + b" " for m in HTTP_METHODS)


def sniff(buf: bytes) -> Peeked | None:
    """Classify the first bytes of a connection and learn its server name.

    ``0x16 0x03`` starts a TLS handshake record (:func:`parse_client_hello`);
    a method from :data:`HTTP_METHODS` and a space start an HTTP/1 request
    (:func:`parse_http_request_head`); anything else is plain TCP with no name.
    None while too few bytes have arrived to tell, or to finish the parse;
    ValueError for a malformed ClientHello or request head. One-shot form of
    :class:`Sniffer`.
    """
    return Sniffer().feed(buf)


_TCP = Peeked(protocol=Protocol.TCP, server_name=None)


class Sniffer(_Incremental):
    """Incremental :func:`sniff` for the bytes of one connection as they
    arrive: :meth:`feed` takes what arrived since the last call and answers
    as ``sniff`` would for everything fed so far, at a cost in proportion to
    the new bytes (see :class:`ClientHelloParser` and :class:`HttpHeadParser`).
    Once it has answered with a value or an error, it keeps that answer."""

    __slots__ = ("_parser", "_start")

    def __init__(self) -> None:
        super().__init__()
        self._start = b""  # the first bytes, until they tell the protocol (a few)
        self._parser: ClientHelloParser | HttpHeadParser | None = None

    def _advance(self, data: bytes) -> Peeked | None:
        if self._parser is not None:
            return self._parser.feed(data)
        buf = self._start = self._start + data
        if not buf:
            return None
        if buf[0] == _CONTENT_HANDSHAKE:
            if len(buf) < 2:
                return None
            if buf[1] != 0x03:
                return _TCP
            self._parser = ClientHelloParser()
        elif buf.startswith(_HTTP_STARTS):
            self._parser = HttpHeadParser()
        elif any(start.startswith(buf) for start in _HTTP_STARTS):
            return None
        else:
            return _TCP
        self._start = b""
        return self._parser.feed(buf)
