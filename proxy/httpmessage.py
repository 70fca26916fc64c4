"""HTTP/1.1 for rules with an ``http:`` section: parsing, framing and rewriting.

An allow rule with ``http:`` makes the proxy an HTTP/1.1 intermediary: it
reads each request head, rewrites it (headers set and removed, credentials
injected by :mod:`.credentials`), forwards it, and streams the body and the
response with their framing checked. Everything here is pure -- bytes in,
values out -- so that the rules about what is accepted can be tested and
fuzzed without sockets; :mod:`egress_agent.proxy.httprelay` does the I/O.

Parsers follow the project's three-way contract (see :mod:`.peek`): a value
(with the number of bytes it used), ``None`` for "need more bytes", or
``ValueError`` with a short reason that never quotes more than a few input
bytes. What is refused, and why (RFC 9112 unless said otherwise):

* anything :func:`~egress_agent.proxy.peek.parse_http_request_head` refuses
  (bare CR or LF, obs-fold, bad request line, more than one Host, a head over
  :data:`MAX_HEAD` bytes);
* ``Transfer-Encoding`` other than exactly ``chunked`` (section 6.1: a coding
  the proxy cannot frame, and ``chunked, identity``-style lists are the usual
  smuggling shapes), or on an HTTP/1.0 request;
* ``Transfer-Encoding`` together with ``Content-Length`` (section 6.3 allows
  dropping the length, but a message that carries both is a smuggling attempt
  more often than not, and a 400 is always safe);
* ``Content-Length`` that is not digits, or that appears with different values
  (section 6.3; equal repeated values are taken once, as RFC 9110 section 8.6
  allows);
* chunk sizes that are not hex, too long, or chunk lines without CRLF.

Requests are forwarded with their own framing (a chunked body stays chunked,
re-emitted with normalised chunk lines and no extensions), so the proxy never
buffers a body. Hop-by-hop headers (RFC 9110 section 7.6.1) are not forwarded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from egress_agent.proxy.peek import MAX_HTTP_HEAD, parse_http_request_head

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "Framing",
    "RequestHead",
    "ResponseHead",
    "build_request_head",
    "error_response",
    "origin_form",
    "parse_chunk_line",
    "parse_request",
    "parse_response",
    "parse_trailers",
]

MAX_HEAD = MAX_HTTP_HEAD
# A chunk-size line with extensions; real clients send a few bytes.
MAX_CHUNK_LINE = 4096
# 16 hex digits would overflow 64 bits; 15 is 1 EiB per chunk, plenty.
_MAX_CHUNK_DIGITS = 15
_MAX_LENGTH_DIGITS = 18

# RFC 9110 section 7.6.1, plus the pre-standard Keep-Alive and Proxy-Connection,
# and Proxy-Authorization: credentials meant for a proxy, never the server.
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"upgrade",
        b"trailer",
    )
)
_FIELD_VALUE = b" \t" + bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_HEX = b"0123456789abcdefABCDEF"
_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

Header = tuple[bytes, bytes]  # (name as sent, value without surrounding whitespace)


@dataclass(frozen=True, kw_only=True)
class Framing:
    """How a message body is delimited: ``length`` bytes, chunked, until the
    connection closes (responses only), or none (length 0)."""

    chunked: bool = False
    length: int = 0
    until_close: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or self.until_close or self.length > 0


def origin_form(target: str) -> str:
    """``http://host/p?q`` as ``/p?q``; other targets unchanged."""
    if target.startswith("/") or "://" not in target:
        return target
    rest = target.partition("://")[2]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[cut:].partition("#")[0]
    return path if path.startswith("/") else "/" + path


@dataclass(frozen=True, kw_only=True)
class RequestHead:
    method: str
    target: str  # as sent (origin- or absolute-form)
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: tuple[Header, ...]
    host: str | None  # server name: lower case, no port (None if not given)
    framing: Framing
    keep_alive: bool  # whether the client lets the connection carry another request
    expect_continue: bool
    # The Upgrade header's value when Connection lists "upgrade" (a WebSocket
    # handshake); only a pass-through relay forwards it.
    upgrade: bytes | None = None

    @property
    def path(self) -> str:
        """The target's path without query or fragment (for audit records: a
        query may carry credentials)."""
        return origin_form(self.target).partition("?")[0].partition("#")[0] or "/"


@dataclass(frozen=True, kw_only=True)
class ResponseHead:
    status: int
    version: str
    headers: tuple[Header, ...]
    framing: Framing
    keep_alive: bool  # whether the server keeps the connection open after it

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200


# ---------------------------------------------------------------- parsing


def parse_request(buf: bytes) -> tuple[RequestHead, int] | None:
    """The request head at the start of ``buf`` and its length in bytes."""
    peeked = parse_http_request_head(buf)
    if peeked is None:
        return None
    end = buf.index(b"\r\n\r\n") + 4
    lines = buf[: end - 4].split(b"\r\n")
    version = lines[0].rsplit(b" ", 1)[1].decode("ascii")
    headers = tuple(_split_field(line) for line in lines[1:])
    assert peeked.method is not None and peeked.target is not None
    if peeked.method == "CONNECT":
        raise ValueError("CONNECT is not forwarded by an http rule")
    if peeked.target.startswith("*"):
        raise ValueError("asterisk-form request-target is not forwarded by an http rule")
    framing = _request_framing(headers, version)
    tokens = _connection_tokens(headers)
    keep_alive = b"close" not in tokens if version == "HTTP/1.1" else b"keep-alive" in tokens
    expect = _values(headers, b"expect")
    if any(v.lower() != b"100-continue" for v in expect):
        raise ValueError("Expect other than 100-continue (RFC 9110 section 10.1.1)")
    head = RequestHead(
        method=peeked.method,
        target=peeked.target,
        version=version,
        headers=headers,
        host=peeked.server_name,
        framing=framing,
        keep_alive=keep_alive,
        expect_continue=bool(expect),
        upgrade=_upgrade(headers, tokens, version),
    )
    return head, end


def _upgrade(headers: Sequence[Header], tokens: set[bytes], version: str) -> bytes | None:
    """The protocols a request asks to switch to (RFC 9110 section 7.8): an
    Upgrade header that the Connection header names, on HTTP/1.1 only."""
    values = _values(headers, b"upgrade")
    if version != "HTTP/1.1" or b"upgrade" not in tokens or not values:
        return None
    return b", ".join(values)


def parse_response(
    buf: bytes, *, request_method: str, upgrade: bool = False
) -> tuple[ResponseHead, int] | None:
    """The response head at the start of ``buf`` (from the upstream server).
    ``upgrade``: the request asked to switch protocols and the relay can
    follow, so ``101 Switching Protocols`` is a valid answer."""
    end = _head_end(
        buf, "response head", too_long=f"no end of the response head within {MAX_HEAD} bytes"
    )
    if end is None:
        return None
    lines = buf[:end].split(b"\r\n")
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise ValueError("status line is not 'HTTP/1.x SP status-code SP reason'")
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or code[:1] == b"0":
        raise ValueError("status code is not three digits 100-999")
    status = int(code)
    headers = tuple(_field(line) for line in lines[1:])
    version = parts[0].decode("ascii")
    tokens = _connection_tokens(headers)
    keep_alive = b"close" not in tokens if version == "HTTP/1.1" else b"keep-alive" in tokens
    if status < 200 or status in (204, 304) or request_method == "HEAD":
        # RFC 9112 section 6.3 items 1-2: no content whatever the headers say.
        framing = Framing()
        if status == 101 and not upgrade:
            raise ValueError("101 Switching Protocols: upgrades are not forwarded")
        if status == 101:
            keep_alive = False  # the connection is no longer HTTP
    else:
        framing = _response_framing(headers)
        if framing.until_close:
            keep_alive = False
    return (
        ResponseHead(
            status=status, version=version, headers=headers, framing=framing,
            keep_alive=keep_alive,
        ),
        end + 4,
    )  # fmt: skip


def parse_chunk_line(buf: bytes) -> tuple[int, int] | None:
    """``chunk-size [chunk-ext] CRLF`` at the start of ``buf``: the size and the
    line's length (RFC 9112 section 7.1). Extensions are checked and dropped."""
    end = buf.find(b"\r\n", 0, MAX_CHUNK_LINE)
    line = buf[:end] if end >= 0 else buf
    digits = len(line) - len(line.lstrip(_HEX))
    size_text, rest = line[:digits], line[digits:]
    if digits > _MAX_CHUNK_DIGITS:
        raise ValueError(f"chunk size of more than {_MAX_CHUNK_DIGITS} hex digits")
    if end < 0:
        if b"\n" in line or (b"\r" in line[:-1]):
            raise ValueError("chunk line does not end in CRLF")
        if len(buf) >= MAX_CHUNK_LINE:
            raise ValueError(f"chunk line longer than {MAX_CHUNK_LINE} bytes")
        partial_ext = rest.rstrip(b"\r").lstrip(b" \t")
        if partial_ext:
            _check_chunk_ext(partial_ext)
        return None
    if not size_text:
        raise ValueError("chunk size is not hexadecimal")
    if rest:
        _check_chunk_ext(rest)
    return int(size_text, 16), end + 2


def parse_trailers(buf: bytes) -> tuple[tuple[Header, ...], int] | None:
    """The trailer section after the last chunk, up to and including the empty
    line (RFC 9112 section 7.1.2)."""
    if buf.startswith(b"\r\n"):
        return (), 2
    end = _head_end(
        buf, "trailer section", too_long=f"trailer section longer than {MAX_HEAD} bytes"
    )
    if end is None:
        return None
    return tuple(_field(line) for line in buf[:end].split(b"\r\n")), end + 4


def _head_end(buf: bytes, what: str, *, too_long: str) -> int | None:
    """Where the empty line that ends the head (or trailer section) at the
    start of ``buf`` begins; None for "need more bytes". Bare CR or LF in
    what has arrived is refused at once, as is no end within MAX_HEAD."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        if len(buf) >= MAX_HEAD:
            raise ValueError(too_long)
        _check_crlf(buf[:-1] if buf.endswith(b"\r") else buf, what)
        return None
    _check_crlf(buf[:end], what)
    return end


def _check_chunk_ext(ext: bytes) -> None:
    # chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ); any visible
    # bytes after the first ';' are let through the check and then dropped.
    if not ext.lstrip(b" \t").startswith(b";") or ext.translate(None, _FIELD_VALUE):
        raise ValueError("bytes after the chunk size are not a chunk extension")


def _check_crlf(region: bytes, what: str) -> None:
    rest = region.replace(b"\r\n", b"")
    if b"\r" in rest or b"\n" in rest:
        raise ValueError(f"bare CR or LF in the {what}")


def _field(line: bytes) -> Header:
    if line[:1] in (b" ", b"\t"):
        raise ValueError("header line starts with whitespace (obsolete line folding)")
    name, colon, value = line.partition(b":")
    if not colon or not name or name.translate(None, _TCHAR):
        raise ValueError("header line is not 'name: value'")
    value = value.strip(b" \t")
    if value.translate(None, _FIELD_VALUE):
        raise ValueError("control byte in a header value")
    return name, value


def _split_field(line: bytes) -> Header:
    name, _, value = line.partition(b":")
    return name, value.strip(b" \t")


def _values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def _list_items(values: Iterable[bytes]) -> list[bytes]:
    return [item.strip(b" \t").lower() for v in values for item in v.split(b",")]


def _connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    return {t for t in _list_items(_values(headers, b"connection")) if t}


def _content_length(headers: Sequence[Header]) -> int | None:
    values = _list_items(_values(headers, b"content-length"))
    if not values:
        return None
    if any(not v.isdigit() or len(v) > _MAX_LENGTH_DIGITS for v in values):
        raise ValueError("Content-Length is not a number")
    if len({int(v) for v in values}) != 1:
        raise ValueError("Content-Length given more than once with different values")
    return int(values[0])


def _request_framing(headers: Sequence[Header], version: str) -> Framing:
    te = _values(headers, b"transfer-encoding")
    length = _content_length(headers)
    if te:
        if version == "HTTP/1.0":
            raise ValueError("Transfer-Encoding in an HTTP/1.0 request")
        if _list_items(te) != [b"chunked"]:
            raise ValueError("Transfer-Encoding other than exactly 'chunked'")
        if length is not None:
            raise ValueError("both Transfer-Encoding and Content-Length")
        return Framing(chunked=True)
    return Framing(length=length or 0)


def _response_framing(headers: Sequence[Header]) -> Framing:
    te = _values(headers, b"transfer-encoding")
    if te:
        # Section 6.3 item 4: chunked last means chunked, else read until close.
        items = _list_items(te)
        return Framing(chunked=True) if items[-1] == b"chunked" else Framing(until_close=True)
    length = _content_length(headers)
    if length is None:
        return Framing(until_close=True)
    return Framing(length=length)


# ---------------------------------------------------------------- rewriting


def hop_by_hop(headers: Sequence[Header]) -> set[bytes]:
    """Lower-case names that end at this hop: the standard ones and those the
    Connection header lists."""
    return set(_HOP_BY_HOP) | _connection_tokens(headers)


def build_request_head(
    head: RequestHead,
    *,
    set_headers: Sequence[tuple[str, str]],
    remove_headers: Iterable[str],
) -> list[Header]:
    """The header list to forward: hop-by-hop headers dropped, ``remove_headers``
    and the names of ``set_headers`` dropped, then ``set_headers`` appended.
    Framing headers are kept as the client sent them (one Content-Length)."""
    drop = hop_by_hop(head.headers)
    drop |= {n.lower().encode("ascii") for n in remove_headers}
    drop |= {n.lower().encode("ascii") for n, _ in set_headers}
    out: list[Header] = []
    length_seen = False
    for name, value in head.headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"content-length":
            if length_seen:
                continue
            length_seen = True
            value = str(head.framing.length).encode("ascii")
        out.append((name, value))
    out.extend((n.encode("ascii"), v.encode("utf-8")) for n, v in set_headers)
    return out


def serialize_request(method: str, target: str, headers: Iterable[Header], *, close: bool) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("ascii")]
    lines += [name + b": " + value for name, value in headers]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def serialize_response(head: ResponseHead, *, close: bool, dechunk: bool = False) -> bytes:
    """The response head for the client: hop-by-hop headers dropped and the
    proxy's own Connection header; with ``dechunk`` also Transfer-Encoding
    (the body then goes out bare, ended by the close). A 101 keeps its
    Upgrade and says ``Connection: Upgrade``."""
    drop = hop_by_hop(head.headers)
    if dechunk:
        drop.add(b"transfer-encoding")
    switching = head.status == 101
    if switching:
        drop.discard(b"upgrade")
    reason = _REASONS.get(head.status, "Status")
    lines = [f"HTTP/1.1 {head.status} {reason}".encode("ascii")]
    lines += [n + b": " + v for n, v in head.headers if n.lower() not in drop]
    if switching:
        lines.append(b"Connection: Upgrade")
    if close and not head.interim:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


_REASONS = {
    100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 307: "Temporary Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
    412: "Precondition Failed", 413: "Content Too Large", 416: "Range Not Satisfiable",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}  # fmt: skip


def error_response(status: int, message: str) -> bytes:
    """A complete response the proxy itself sends, always closing the connection.
    ``message`` must never hold a secret: it is shown to the client."""
    body = (f"egress-agent: {message}\n").encode("utf-8", "replace")
    reason = _REASONS.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body
