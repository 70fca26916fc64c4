"""The first-bytes parsers as they were before they became incremental: one
pass over the whole buffer per call. Kept as the reference model that the
incremental parsers (egress_agent.proxy.peek) must agree with, value for
value, None for None and ValueError for ValueError, on every input and every
way of cutting it into pieces (tests/unit/test_peek.py), and as the
quadratic baseline of the work-counting test."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

__all__ = [
    "HTTP_METHODS",
    "MAX_CLIENT_HELLO",
    "MAX_HTTP_HEAD",
    "MAX_TLS_RECORD",
    "Peeked",
    "Protocol",
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


class _NeedMore(Exception):
    """The buffer ends inside the message (internal; becomes ``None``)."""


# ---------------------------------------------------------------- TLS

_CONTENT_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4


def parse_client_hello(buf: bytes) -> Peeked | None:
    """The SNI of the TLS ClientHello at the start of ``buf``.

    ``buf`` starts with TLS records. Returns a :class:`Peeked` (TLS, with
    ``server_name`` None when the hello has no server_name extension), None when
    the hello is not complete yet, or raises ValueError when it is malformed.
    """
    try:
        body, length = _reassemble_handshake(buf)
        name = _parse_hello_body(body, length)
    except _NeedMore:
        return None
    return Peeked(protocol=Protocol.TLS, server_name=name)


def _reassemble_handshake(buf: bytes) -> tuple[bytes, int]:
    """The ClientHello body received so far (maybe truncated) and its declared
    length, collected from as many handshake records as it spans."""
    handshake = bytearray()
    declared = 0  # sum of the records' declared payload lengths
    message_end: int | None = None
    pos = 0
    while message_end is None or declared < message_end:
        header = buf[pos : pos + _RECORD_HEADER]
        _check_record_header(header, first=pos == 0)
        if len(header) < _RECORD_HEADER:
            break
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            # RFC 8446 section 5.1, RFC 5246 section 6.2.1.
            raise ValueError("zero-length TLS handshake record")
        if length > MAX_TLS_RECORD:
            raise ValueError(f"TLS record length {length} exceeds {MAX_TLS_RECORD}")
        payload = buf[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        handshake += payload
        declared += length
        pos += _RECORD_HEADER + length
        if message_end is None:
            body_length = _check_handshake_header(handshake)
            if body_length is not None:
                message_end = _HANDSHAKE_HEADER + body_length
        if message_end is not None and declared > message_end:
            raise ValueError("TLS record carries bytes after the ClientHello")
        if len(payload) < length:
            break
    body_length = _check_handshake_header(handshake)
    if body_length is None:
        raise _NeedMore
    body = bytes(handshake[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + body_length])
    return body, body_length


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


class _Reader:
    """A cursor over a length-delimited TLS structure whose bytes may not all
    have arrived: going past the declared end is malformed (ValueError), going
    past the received bytes only means "need more" (_NeedMore)."""

    __slots__ = ("_data", "_end", "_pos", "_what")

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
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

    def take(self, n: int, what: str) -> bytes:
        start = self._advance(n, what)
        if start + n > len(self._data):
            raise _NeedMore
        return self._data[start : start + n]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, what: str) -> _Reader:
        """The vector behind a ``size``-byte length prefix; the cursor moves
        past it whether or not its bytes have arrived yet."""
        length = self.uint(size, f"length of {what}")
        start = self._advance(length, what)
        return _Reader(self._data, start, start + length, what)

    def rest(self) -> bytes:
        return self.take(self.left, self._what)


def _parse_hello_body(body: bytes, length: int) -> str | None:
    """The host_name in a ClientHello body (RFC 8446 section 4.1.2, RFC 5246
    section 7.4.1.2); ``body`` may be a prefix of the ``length`` bytes."""
    hello = _Reader(body, 0, length, "ClientHello")
    version = hello.uint(2, "legacy_version")
    if version >> 8 != 0x03 or version & 0xFF > 0x04:
        raise ValueError(f"ClientHello version 0x{version:04x} is not 0x0300-0x0304")
    hello.take(32, "random")
    session_id = hello.vector(1, "legacy_session_id")
    if session_id.left > 32:
        raise ValueError(f"session id of {session_id.left} bytes, at most 32 allowed")
    suites = hello.vector(2, "cipher_suites")
    if suites.left < 2 or suites.left % 2:
        raise ValueError(f"cipher_suites of {suites.left} bytes, expected an even number >= 2")
    compression = hello.vector(1, "legacy_compression_methods")
    # The list must offer null (0) (RFC 5246 section 7.4.1.2); TLS 1.3 clients
    # send exactly that one byte (RFC 8446 section 4.1.2).
    if 0 not in compression.rest():
        raise ValueError("compression methods do not offer null (0)")
    name = None
    # An SSLv3-style hello ends here; extensions are recognised by there being
    # bytes after the compression methods (RFC 5246 section 7.4.1.2).
    if not hello.at_end:
        extensions = hello.vector(2, "extensions")
        if not hello.at_end:
            raise ValueError(f"{hello.left} bytes after the ClientHello extensions")
        seen: set[int] = set()
        while not extensions.at_end:
            kind = extensions.uint(2, "extension type")
            data = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                # RFC 8446 section 4.2, RFC 5246 section 7.4.1.4.
                raise ValueError(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                name = _parse_server_name(data)
    if len(body) < length:
        raise _NeedMore
    return name


def _parse_server_name(ext: _Reader) -> str:
    """The host_name in a server_name extension (RFC 6066 section 3)."""
    names = ext.vector(2, "server_name_list")
    if not ext.at_end:
        raise ValueError(f"{ext.left} bytes after server_name_list")
    name = None
    while not names.at_end:
        kind = names.uint(1, "name_type")
        if kind != _NAME_TYPE_HOST_NAME:
            # host_name is the only type defined, and the entry of an unknown
            # type cannot be delimited (RFC 6066 section 3).
            raise ValueError(f"server name type {kind}, only host_name (0) is defined")
        host = names.vector(2, "host_name")
        if name is not None:
            # "MUST NOT contain more than one name of the same name_type".
            raise ValueError("more than one host_name in server_name")
        name = _hostname(host.rest(), "server name")
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
    :data:`MAX_HTTP_HEAD`, and raises ValueError otherwise.
    """
    end = buf.find(b"\r\n\r\n", 0, MAX_HTTP_HEAD)
    complete = end >= 0
    region = buf[:end] if complete else buf[:MAX_HTTP_HEAD]
    if not complete and region.endswith(b"\r"):
        region = region[:-1]  # may be the first half of a CRLF
    _check_line_endings(region)
    lines = region.split(b"\r\n")
    partial = b"" if complete else lines.pop()

    if not lines:
        # Still inside the request line.
        _check_request_line_prefix(partial)
        _check_head_size(buf)
        return None
    method, target = _parse_request_line(lines[0])
    host_seen = False
    host_name: str | None = None
    for line in lines[1:]:
        name, value = _parse_field_line(line)
        if name.lower() == b"host":
            if host_seen:
                raise ValueError("more than one Host header (RFC 9112 section 3.2)")
            host_seen = True
            host_name = _host_header(value)
    if not complete:
        _check_field_line_prefix(partial)
        _check_head_size(buf)
        return None

    target_name = _target_host(method, target)
    if target_name is not None and host_name is not None and target_name != host_name:
        raise ValueError("Host header names another server than the request-target")
    return Peeked(
        protocol=Protocol.HTTP,
        server_name=target_name or host_name,
        method=method.decode("ascii"),
        target=target.decode("ascii"),
    )


def _check_head_size(buf: bytes) -> None:
    """An unfinished head may still become valid only below the cap."""
    if len(buf) >= MAX_HTTP_HEAD:
        raise ValueError(f"no end of the HTTP request head within {MAX_HTTP_HEAD} bytes")


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
    ValueError for a malformed ClientHello or request head.
    """
    if not buf:
        return None
    if buf[0] == _CONTENT_HANDSHAKE:
        if len(buf) < 2:
            return None
        if buf[1] == 0x03:
            return parse_client_hello(buf)
        return Peeked(protocol=Protocol.TCP, server_name=None)
    if buf.startswith(_HTTP_STARTS):
        return parse_http_request_head(buf)
    if any(start.startswith(buf) for start in _HTTP_STARTS):
        return None
    return Peeked(protocol=Protocol.TCP, server_name=None)
