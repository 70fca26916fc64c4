"""Method, request-target and server name of an HTTP/1 request head
(RFC 9112 sections 2-5), parsed as its bytes arrive; the line checks are
shared with the CONNECT listener's head (``connect_head``).

Decisions (where the RFCs leave room):

* Lines must end in CRLF. RFC 9112 section 2.2 lets a recipient accept a bare
  LF, but a proxy that frames a head differently from the server behind it
  invites request smuggling, and refusing is always safe here. Obsolete line
  folding, leading empty lines and more than one Host are refused as well.
* When the request-target carries an authority (absolute-form, or CONNECT's
  authority-form) it names the server (RFC 9112 section 3.2.2); a Host that
  names another server is refused rather than guessed at. A request with no
  name at all (HTTP/1.0, or an empty Host) gives ``server_name=None``.

See ``peek`` for the contract every parser here keeps.
"""

from __future__ import annotations

from egress_agent.proxy.hostnames import authority_host
from egress_agent.proxy.peek_result import Incremental, Peeked, Protocol

# Largest HTTP request head (request line, fields, and the empty line ending
# them, CRLFs included) we wait for.
MAX_HTTP_HEAD = 16384

# The methods that make sniff() read the bytes as HTTP: RFC 9110 section 9 and
# PATCH (RFC 5789). Methods are case-sensitive (RFC 9110 section 9.1).
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")

# What an HTTP/1 request starts with: a method and a space.
HTTP_STARTS = tuple(m.encode("ascii") + b" " for m in HTTP_METHODS)

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


class HttpHeadParser(Incremental):
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
            self._request = parse_request_line(line)
            return False
        if not line:
            return True
        name, value = parse_field_line(line)
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
        it cannot become a valid line (what ``check_request_line_prefix``
        and ``check_field_line_prefix`` check, one piece at a time)."""
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


def check_line_endings(region: bytes) -> None:
    # RFC 9112 section 2.2: a bare CR is invalid; a bare LF we refuse too
    # (see the module docstring).
    rest = region.replace(b"\r\n", b"")
    if b"\r" in rest:
        raise ValueError("bare CR in HTTP request head")
    if b"\n" in rest:
        raise ValueError("bare LF in HTTP request head, lines must end in CRLF")


def parse_request_line(line: bytes) -> tuple[bytes, bytes]:
    """``method SP request-target SP HTTP-version`` (RFC 9112 section 3)."""
    check_request_line_prefix(line)
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise ValueError("request line is not 'method SP request-target SP HTTP-version'")
    if parts[2] not in _VERSIONS:
        raise ValueError("HTTP version is not HTTP/1.0 or HTTP/1.1")
    return parts[0], parts[1]


def check_request_line_prefix(line: bytes) -> None:
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


def parse_field_line(line: bytes) -> tuple[bytes, bytes]:
    """``field-name ":" OWS field-value OWS`` (RFC 9112 section 5)."""
    check_field_line_prefix(line)
    name, colon, value = line.partition(b":")
    if not colon:
        raise ValueError("header line without ':'")
    return name, value.strip(b" \t")


def check_field_line_prefix(line: bytes) -> None:
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
    return authority_host(value, port_required=False, what="Host header")


def _target_host(method: bytes, target: bytes) -> str | None:
    """The host named by the request-target, if its form carries one
    (RFC 9112 section 3.2)."""
    if method == b"CONNECT":
        # authority-form, and only for CONNECT (section 3.2.3).
        return authority_host(target, port_required=True, what="CONNECT target")
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
        return authority_host(authority, port_required=False, what="request-target")
    raise ValueError("request-target is not origin-, absolute-, authority- or asterisk-form")


def _excerpt(data: bytes) -> str:
    """At most a few input bytes, for an error message."""
    return repr(data[:8]) + ("..." if len(data) > 8 else "")
