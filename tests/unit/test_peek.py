"""The first-bytes parsers: real ClientHellos from OpenSSL, fabricated and
fragmented ones, tables of HTTP heads, and fuzzing of the three-way contract
(a Peeked, None for "need more", or ValueError -- nothing else, and never a
different answer once more bytes arrive)."""

from __future__ import annotations

import itertools
import random
import ssl
import string
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_agent.proxy.peek import (
    HTTP_METHODS,
    MAX_CLIENT_HELLO,
    MAX_HTTP_HEAD,
    MAX_TLS_RECORD,
    ClientHelloParser,
    HttpHeadParser,
    Peeked,
    Protocol,
    Sniffer,
    parse_client_hello,
    parse_http_request_head,
    sniff,
)

Parser: TypeAlias = Callable[[bytes], Peeked | None]
Outcome: TypeAlias = Peeked | None | type[ValueError]

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tls(name: str | None) -> Peeked:
    return Peeked(protocol=Protocol.TLS, server_name=name)


def http(name: str | None, method: str, target: str) -> Peeked:
    return Peeked(protocol=Protocol.HTTP, server_name=name, method=method, target=target)


TCP = Peeked(protocol=Protocol.TCP, server_name=None)


# ---------------------------------------------------------------- helpers


def outcome(parse: Parser, buf: bytes) -> Outcome:
    """What ``parse`` makes of ``buf``; ValueError (the class) when it raises
    one, after checking the message stays short and does not echo the input."""
    try:
        result = parse(buf)
    except ValueError as exc:
        message = str(exc)
        assert 0 < len(message) <= 120, message
        text = buf.decode("latin-1")
        window = 12
        assert not any(message[i : i + window] in text for i in range(len(message) - window + 1)), (
            f"error message echoes input: {message!r}"
        )
        return ValueError
    assert result is None or isinstance(result, Peeked)
    return result


def assert_stable(parse: Parser, buf: bytes, cuts: Sequence[int]) -> Outcome:
    """Once a prefix is decided (value or error), the whole buffer is decided alike."""
    final = outcome(parse, buf)
    for cut in cuts:
        early = outcome(parse, buf[:cut])
        assert early is None or early == final, (cut, early, final)
    return final


def spread(n: int, count: int = 24) -> list[int]:
    return sorted({*range(0, n + 1, max(1, n // count)), max(0, n - 1)})


def u8(n: int) -> bytes:
    return struct.pack("!B", n)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u24(n: int) -> bytes:
    return struct.pack("!I", n)[1:]


def real_hello(server_hostname: str | None, *, tls12_only: bool = False) -> bytes:
    """The first flight of Python's ssl module (OpenSSL), through memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def handshake_of(records: bytes) -> bytes:
    """The concatenated payloads of a sequence of TLS records."""
    out, pos = b"", 0
    while pos < len(records):
        (length,) = struct.unpack("!H", records[pos + 3 : pos + 5])
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def frame(
    handshake: bytes, cuts: Sequence[int] = (), *, content: int = 22, version: int = 0x0301
) -> bytes:
    """``handshake`` in TLS records, a new record starting at each cut."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(handshake))), len(handshake)]
    return b"".join(
        u8(content) + u16(version) + u16(b - a) + handshake[a:b]
        for a, b in itertools.pairwise(bounds)
    )


def sni(name: bytes) -> tuple[int, bytes]:
    entry = u8(0) + u16(len(name)) + name
    return 0, u16(len(entry)) + entry


def hello_body(
    extensions: Sequence[tuple[int, bytes]] | None = (),
    *,
    version: int = 0x0303,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    body = u16(version) + bytes(range(32))
    body += u8(len(session_id)) + session_id
    body += u16(len(suites)) + suites
    body += u8(len(compression)) + compression
    if extensions is not None:
        block = b"".join(u16(kind) + u16(len(data)) + data for kind, data in extensions)
        body += u16(len(block)) + block
    return body


def client_hello(body: bytes, *, kind: int = 1) -> bytes:
    """The handshake message around a ClientHello body."""
    return u8(kind) + u24(len(body)) + body


def key_share(*shares: tuple[int, int]) -> tuple[int, bytes]:
    """A key_share extension (51) with (group, key size) entries of filler keys."""
    entries = b"".join(u16(group) + u16(size) + bytes([7]) * size for group, size in shares)
    return 51, u16(len(entries)) + entries


SUPPORTED_VERSIONS = (43, b"\x04\x03\x04\x03\x03")
X25519MLKEM768 = (0x11EC, 1184 + 32)
X25519 = (0x001D, 32)


REAL_HELLOS = {
    "tls13": (real_hello("Example.COM."), "example.com"),
    "tls13-no-sni": (real_hello(None), None),
    "tls12": (real_hello("api.internal.example", tls12_only=True), "api.internal.example"),
    "tls12-no-sni": (real_hello(None, tls12_only=True), None),
    # CPython sends no SNI for an IP address.
    "ip-address": (real_hello("192.0.2.7"), None),
}


# ---------------------------------------------------------------- real ClientHellos


@pytest.mark.parametrize("case", sorted(REAL_HELLOS))
def test_real_hello_parses_and_every_prefix_needs_more(case: str) -> None:
    raw, name = REAL_HELLOS[case]
    assert parse_client_hello(raw) == tls(name)
    assert sniff(raw) == tls(name)
    for cut in range(len(raw)):
        assert parse_client_hello(raw[:cut]) is None, cut
        assert sniff(raw[:cut]) is None, cut


@pytest.mark.parametrize("case", sorted(REAL_HELLOS))
def test_bytes_after_the_hello_are_not_looked_at(case: str) -> None:
    raw, name = REAL_HELLOS[case]
    early_data = frame(b"\x00" * 40, content=23, version=0x0303)
    assert parse_client_hello(raw + early_data) == tls(name)
    assert parse_client_hello(raw + b"\xff garbage") == tls(name)


@pytest.mark.parametrize("case", sorted(REAL_HELLOS))
def test_real_hello_reframed_into_many_records(case: str) -> None:
    raw, name = REAL_HELLOS[case]
    handshake = handshake_of(raw)
    rng = random.Random(case)
    for _ in range(20):
        cuts = rng.sample(range(1, len(handshake)), rng.randint(1, 12))
        assert parse_client_hello(frame(handshake, cuts)) == tls(name), cuts
    # One byte per record, the handshake header itself split four ways.
    one_by_one = frame(handshake, range(len(handshake)))
    assert parse_client_hello(one_by_one) == tls(name)
    for cut in range(len(one_by_one)):
        assert parse_client_hello(one_by_one[:cut]) is None


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_any_record_split_parses_identically(data: st.DataObject) -> None:
    raw, name = REAL_HELLOS[data.draw(st.sampled_from(sorted(REAL_HELLOS)))]
    handshake = handshake_of(raw)
    cuts = data.draw(st.lists(st.integers(1, len(handshake) - 1), max_size=20))
    version = data.draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303, 0x0304]))
    assert parse_client_hello(frame(handshake, cuts, version=version)) == tls(name)


def test_a_record_carrying_bytes_after_the_hello_is_refused() -> None:
    handshake = handshake_of(REAL_HELLOS["tls13"][0])
    with pytest.raises(ValueError, match="after the ClientHello"):
        parse_client_hello(frame(handshake + b"\x00"))
    # Known from the record header alone, before the hello is complete.
    header_only = frame(handshake + b"\x00")[:9]
    with pytest.raises(ValueError, match="after the ClientHello"):
        parse_client_hello(header_only)


# ---------------------------------------------------------------- fabricated ClientHellos


def test_post_quantum_key_share() -> None:
    body = hello_body([sni(b"pq.example"), SUPPORTED_VERSIONS, key_share(X25519MLKEM768, X25519)])
    assert len(body) > 1250
    assert parse_client_hello(frame(client_hello(body))) == tls("pq.example")


def test_extra_8k_extension_fragmented() -> None:
    extensions = [
        key_share((0x0202, 8192), X25519MLKEM768),  # a fabricated, larger hybrid group
        sni(b"big.example"),
        SUPPORTED_VERSIONS,
    ]
    handshake = client_hello(hello_body(extensions))
    assert len(handshake) > 9400
    assert parse_client_hello(frame(handshake)) == tls("big.example")
    raw = frame(handshake, [1000, 5000, 9000])
    assert parse_client_hello(raw) == tls("big.example")
    for cut in spread(len(raw), 200):
        if cut < len(raw):
            assert parse_client_hello(raw[:cut]) is None


def padded_to(size: int) -> bytes:
    """A ClientHello body of exactly ``size`` bytes (a padding extension, 21)."""
    base = len(hello_body([sni(b"cap.example"), (21, b"")]))
    return hello_body([sni(b"cap.example"), (21, bytes(size - base))])


def test_hello_at_the_cap_parses() -> None:
    body = padded_to(MAX_CLIENT_HELLO)
    assert len(body) == MAX_CLIENT_HELLO
    assert parse_client_hello(frame(client_hello(body))) == tls("cap.example")
    assert parse_client_hello(frame(client_hello(body), [4, 16384])) == tls("cap.example")


def test_hello_over_the_cap_is_refused_from_its_header() -> None:
    handshake = client_hello(padded_to(MAX_CLIENT_HELLO + 1))
    with pytest.raises(ValueError, match="exceeds"):
        parse_client_hello(frame(handshake, [4000, 8000, 12000]))
    with pytest.raises(ValueError, match="exceeds"):
        parse_client_hello(frame(handshake, [4000])[:9])
    with pytest.raises(ValueError, match="exceeds"):
        parse_client_hello(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")


def fab(
    extensions: Sequence[tuple[int, bytes]] | None = (),
    *,
    version: int = 0x0303,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A fabricated ClientHello in one record."""
    body = hello_body(
        extensions, version=version, session_id=session_id, suites=suites, compression=compression
    )
    return frame(client_hello(body))


GOOD_FABRICATED: list[tuple[str, bytes, str | None]] = [
    ("sslv3-style, no extensions", fab(None, version=0x0300), None),
    ("empty extension block", fab([]), None),
    ("other extensions only", fab([SUPPORTED_VERSIONS, (10, b"\x00\x02\x00\x1d")]), None),
    ("sni upper case, trailing dot", fab([sni(b"WWW.Example.ORG.")]), "www.example.org"),
    ("sni with underscore", fab([sni(b"_acme.example")]), "_acme.example"),
    ("sni ip literal passes as-is", fab([sni(b"192.0.2.1")]), "192.0.2.1"),
    ("sni single label", fab([sni(b"localhost")]), "localhost"),
    ("sni 63-byte label", fab([sni(b"a" * 63 + b".example")]), "a" * 63 + ".example"),
    ("session id 32", fab([sni(b"a.example")], session_id=bytes(32)), "a.example"),
    ("deflate and null", fab([sni(b"z.example")], compression=b"\x01\x00"), "z.example"),
    ("sni last", fab([SUPPORTED_VERSIONS, sni(b"late.example")]), "late.example"),
    ("tls 1.0 legacy version", fab([sni(b"old.example")], version=0x0301), "old.example"),
]


@pytest.mark.parametrize(
    ("raw", "name"), [c[1:] for c in GOOD_FABRICATED], ids=[c[0] for c in GOOD_FABRICATED]
)
def test_fabricated_hellos(raw: bytes, name: str | None) -> None:
    assert parse_client_hello(raw) == tls(name)
    assert sniff(raw) == tls(name)
    for cut in range(len(raw)):
        assert parse_client_hello(raw[:cut]) is None


def replace_record(
    raw: bytes, *, content: int | None = None, version: bytes | None = None
) -> bytes:
    out = bytearray(raw)
    if content is not None:
        out[0] = content
    if version is not None:
        out[1:3] = version
    return bytes(out)


HELLO = fab([sni(b"ok.example")])
# Record and handshake headers of a 1000-byte ClientHello, whose body is to come.
OPENING = b"\x16\x03\x01" + u16(1004) + b"\x01" + u24(1000)
HANDSHAKE = handshake_of(HELLO)

BAD_HELLOS: list[tuple[str, bytes]] = [
    ("application data first", replace_record(HELLO, content=23)),
    ("alert first", b"\x15"),
    ("record version 3.5", replace_record(HELLO, version=b"\x03\x05")),
    ("record version 2.0", replace_record(HELLO, version=b"\x02\x00")),
    ("record too long", b"\x16\x03\x01" + u16(MAX_TLS_RECORD + 1)),
    ("zero-length record", b"\x16\x03\x01\x00\x00" + HELLO),
    ("alert between fragments", frame(HANDSHAKE[:50]) + b"\x15\x03\x03\x00\x02\x02\x28"),
    ("server hello", frame(client_hello(hello_body([]), kind=2))),
    ("legacy_version 2.0", fab([], version=0x0200)),
    ("legacy_version 3.5", fab([], version=0x0305)),
    ("session id 33", fab([], session_id=bytes(33))),
    ("odd cipher suites", fab([], suites=b"\x13\x01\x13")),
    ("no cipher suites", fab([], suites=b"")),
    ("no compression", fab([], compression=b"")),
    ("no null compression", fab([], compression=b"\x01")),
    ("hello shorter than random", frame(client_hello(b"\x03\x03" + bytes(20)))),
    ("extensions overrun body", frame(client_hello(hello_body(None) + b"\x00\x10\x00\x00"))),
    ("bytes after extensions", frame(client_hello(hello_body([]) + b"\x00"))),
    ("half an extension header", frame(client_hello(hello_body(None) + b"\x00\x01\x00"))),
    (
        "extension overruns block",
        frame(client_hello(hello_body(None) + b"\x00\x06\x00\x0a\x00\x05\x00\x00")),
    ),
    ("duplicate extension", fab([SUPPORTED_VERSIONS, (10, b""), SUPPORTED_VERSIONS])),
    ("duplicate sni", fab([sni(b"a.example"), sni(b"b.example")])),
    ("empty sni extension", fab([(0, b"")])),
    ("empty server_name_list", fab([(0, b"\x00\x00")])),
    ("name list overruns", fab([(0, b"\x00\x09\x00\x00\x03abc")])),
    ("bytes after name list", fab([(0, b"\x00\x06\x00\x00\x03abc\x00")])),
    ("name type 1", fab([(0, b"\x00\x06\x01\x00\x03abc")])),
    ("two host names", fab([(0, b"\x00\x0c\x00\x00\x03abc\x00\x00\x03def")])),
    ("empty host name", fab([sni(b"")])),
    ("space in host name", fab([sni(b"a b.example")])),
    ("wildcard host name", fab([sni(b"*.example")])),
    ("utf-8 host name", fab([sni("bücher.example".encode())])),
    ("nul in host name", fab([sni(b"a\x00.example")])),
    ("empty label", fab([sni(b"a..example")])),
    ("leading dot", fab([sni(b".example")])),
    ("only a dot", fab([sni(b".")])),
    ("64-byte label", fab([sni(b"a" * 64 + b".example")])),
    ("256-byte name", fab([sni(b"a." * 128)])),
]


@pytest.mark.parametrize("raw", [c[1] for c in BAD_HELLOS], ids=[c[0] for c in BAD_HELLOS])
def test_malformed_hellos(raw: bytes) -> None:
    assert outcome(parse_client_hello, raw) is ValueError
    assert outcome(sniff, raw) == (ValueError if raw[:2] == b"\x16\x03" else TCP)


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"\x17", "record type"),
        (b"\x16\x02", "major"),
        (b"\x16\x03\x05", "0x0300-0x0304"),
        (b"\x16\x03\x01\x00\x00", "zero-length"),
        (b"\x16\x03\x01\x02\x00\x02", "handshake type 2"),
        (OPENING + b"\x03\x03" + bytes(32) + b"\x21", "session id of 33"),
        (OPENING + b"\x03\x03" + bytes(32) + b"\x00\x00\x03", "cipher_suites of 3"),
        (OPENING + b"\x03\x03" + bytes(32) + b"\x00\xff\xff", "overruns"),
        (HELLO[:9] + b"\x03\x03" + bytes(32) + b"\x21", "overruns"),
    ],
)
def test_malformed_hello_refused_before_it_is_complete(prefix: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_client_hello(prefix)


# ---------------------------------------------------------------- HTTP

GOOD_HEADS: list[tuple[str, bytes, Peeked]] = [
    (
        "origin-form",
        b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
        http("example.com", "GET", "/index.html?q=1"),
    ),
    (
        "host with port",
        b"POST /api HTTP/1.1\r\nHost: api.example.com:8080\r\nContent-Length: 2\r\n\r\n{}",
        http("api.example.com", "POST", "/api"),
    ),
    (
        "mixed-case host and header name",
        b"GET / HTTP/1.1\r\nhOsT: WWW.Example.COM.\r\n\r\n",
        http("www.example.com", "GET", "/"),
    ),
    (
        "host with OWS",
        b"GET / HTTP/1.1\r\nHost: \t example.com \t\r\n\r\n",
        http("example.com", "GET", "/"),
    ),
    ("ipv6 literal", b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", http("::1", "GET", "/")),
    (
        "ipv6 literal without port",
        b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]\r\n\r\n",
        http("2001:db8::1", "GET", "/"),
    ),
    (
        "ipv4 literal",
        b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n",
        http("192.0.2.1", "GET", "/"),
    ),
    (
        "empty port",
        b"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n",
        http("example.com", "GET", "/"),
    ),
    ("http/1.0 without host", b"GET / HTTP/1.0\r\n\r\n", http(None, "GET", "/")),
    (
        "http/1.0 with host",
        b"HEAD /x HTTP/1.0\r\nHost: example.com\r\n\r\n",
        http("example.com", "HEAD", "/x"),
    ),
    ("empty host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", http(None, "GET", "/")),
    (
        "absolute-form without host",
        b"GET http://Example.com:8080/a/b?c#d HTTP/1.1\r\n\r\n",
        http("example.com", "GET", "http://Example.com:8080/a/b?c#d"),
    ),
    (
        "absolute-form with matching host",
        b"GET https://example.com/ HTTP/1.1\r\nHost: EXAMPLE.com:443\r\n\r\n",
        http("example.com", "GET", "https://example.com/"),
    ),
    (
        "absolute-form with empty host",
        b"GET http://example.com HTTP/1.1\r\nHost:\r\n\r\n",
        http("example.com", "GET", "http://example.com"),
    ),
    (
        "absolute-form ipv6",
        b"GET http://[2001:db8::5]:8080/ HTTP/1.1\r\n\r\n",
        http("2001:db8::5", "GET", "http://[2001:db8::5]:8080/"),
    ),
    (
        "connect",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        http("example.com", "CONNECT", "example.com:443"),
    ),
    (
        "connect without host",
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nUser-Agent: x\r\n\r\n",
        http("2001:db8::1", "CONNECT", "[2001:db8::1]:443"),
    ),
    (
        "options asterisk",
        b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n",
        http("a.example", "OPTIONS", "*"),
    ),
    (
        "unknown token method",
        b"PROPFIND /dav HTTP/1.1\r\nHost: dav.example\r\n\r\n",
        http("dav.example", "PROPFIND", "/dav"),
    ),
    (
        "obs-text and empty values",
        b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\nX-Empty:\r\nHost: h.example\r\n\r\n",
        http("h.example", "GET", "/"),
    ),
    (
        "underscore host",
        b"GET / HTTP/1.1\r\nHost: my_service.internal\r\n\r\n",
        http("my_service.internal", "GET", "/"),
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in GOOD_HEADS], ids=[c[0] for c in GOOD_HEADS]
)
def test_http_heads(raw: bytes, expected: Peeked) -> None:
    assert parse_http_request_head(raw) == expected
    end = raw.index(b"\r\n\r\n") + 4
    for cut in range(end):
        assert parse_http_request_head(raw[:cut]) is None, cut
    assert sniff(raw) == (expected if expected.method in HTTP_METHODS else TCP)


NEED_MORE_HEADS = [
    b"",
    b"G",
    b"GET",
    b"GET ",
    b"GET /",
    b"GET / HTTP/1.",
    b"GET / HTTP/1.1",
    b"GET / HTTP/1.1\r",
    b"GET / HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\nHo",
    b"GET / HTTP/1.1\r\nHost: a.example",
    b"GET / HTTP/1.1\r\nHost: a.example\r\n",
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r",
    b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HTTP_HEAD - 30),
]


@pytest.mark.parametrize("raw", NEED_MORE_HEADS, ids=lambda b: repr(b[:40]))
def test_http_heads_that_need_more(raw: bytes) -> None:
    assert parse_http_request_head(raw) is None


BAD_HEADS: list[tuple[str, bytes]] = [
    ("bad method char", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bad method char, early", b"G(T"),
    ("empty method", b" / HTTP/1.1\r\n\r\n"),
    ("missing version", b"GET /\r\nHost: a\r\n\r\n"),
    ("http/2.0", b"GET / HTTP/2.0\r\n\r\n"),
    ("lower-case version", b"GET / http/1.1\r\n\r\n"),
    ("version typo, early", b"GET / HTTP/1.2"),
    ("double space", b"GET  / HTTP/1.1\r\n\r\n"),
    ("trailing space", b"GET / HTTP/1.1 \r\n\r\n"),
    ("control in target", b"GET /\x01 HTTP/1.1\r\n\r\n"),
    ("target not a form", b"GET example.com HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("asterisk for get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("connect origin-form", b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("connect without port", b"CONNECT example.com HTTP/1.1\r\n\r\n"),
    ("userinfo", b"GET http://user@example.com/ HTTP/1.1\r\n\r\n"),
    ("absolute-form without host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("host disagrees with target", b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"),
    ("connect host disagrees", b"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n"),
    ("two host headers", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n"),
    ("two host headers, early", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\nX-Partial"),
    ("obs-fold", b"GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\nHost: a\r\n\r\n"),
    ("obs-fold, early", b"GET / HTTP/1.1\r\nHost: a\r\n\t"),
    ("whitespace before first field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
    ("header without colon", b"GET / HTTP/1.1\r\nHost a\r\n\r\n"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
    ("empty header name", b"GET / HTTP/1.1\r\n: a\r\n\r\n"),
    ("nul in value", b"GET / HTTP/1.1\r\nX-A: a\x00b\r\nHost: a\r\n\r\n"),
    ("del in value", b"GET / HTTP/1.1\r\nX-A: a\x7f\r\n\r\n"),
    ("bare lf", b"GET / HTTP/1.1\nHost: a\n\n"),
    ("bare lf, early", b"GET / HTTP/1.1\n"),
    ("bare lf in field", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n"),
    ("bare cr", b"GET / HTTP/1.1\rHost: a\r\n\r\n"),
    ("leading empty line", b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("empty head", b"\r\n\r\n"),
    ("host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ("host list", b"GET / HTTP/1.1\r\nHost: a.example, b.example\r\n\r\n"),
    ("host empty label", b"GET / HTTP/1.1\r\nHost: a..example\r\n\r\n"),
    ("host percent-encoded", b"GET / HTTP/1.1\r\nHost: a%2eexample\r\n\r\n"),
    ("host utf-8", "GET / HTTP/1.1\r\nHost: bücher.example\r\n\r\n".encode()),
    ("host bad port", b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n"),
    ("host port too big", b"GET / HTTP/1.1\r\nHost: a.example:65536\r\n\r\n"),
    ("host two colons", b"GET / HTTP/1.1\r\nHost: a.example:1:2\r\n\r\n"),
    ("bare ipv6", b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n"),
    ("unclosed ipv6", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n"),
    ("not ipv6", b"GET / HTTP/1.1\r\nHost: [1:2:3]\r\n\r\n"),
    ("ipv6 zone", b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n"),
    ("ipvfuture", b"GET / HTTP/1.1\r\nHost: [v1.x]\r\n\r\n"),
    ("junk after ipv6", b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n"),
    ("oversize head", b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HTTP_HEAD + b"\r\n\r\n"),
    ("oversize request line", b"GET /" + b"a" * MAX_HTTP_HEAD),
]


@pytest.mark.parametrize("raw", [c[1] for c in BAD_HEADS], ids=[c[0] for c in BAD_HEADS])
def test_malformed_http_heads(raw: bytes) -> None:
    assert outcome(parse_http_request_head, raw) is ValueError


def test_http_head_size_cap() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX: "
    fits = start + b"a" * (MAX_HTTP_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(fits) == MAX_HTTP_HEAD
    assert parse_http_request_head(fits + b"body") == http("a.example", "GET", "/")
    too_big = start + b"a" * (MAX_HTTP_HEAD - len(start) - 3) + b"\r\n\r\n"
    assert parse_http_request_head(too_big[:-2]) is None
    # One byte short of the terminator, and already too long to be a head.
    with pytest.raises(ValueError, match="within 16384 bytes"):
        parse_http_request_head(too_big[:-1])
    with pytest.raises(ValueError, match="within 16384 bytes"):
        parse_http_request_head(too_big)


# ---------------------------------------------------------------- sniff

POSTGRES_STARTUP = u16(0) + u16(41) + u16(3) + u16(0) + b"user\x00app\x00database\x00orders\x00\x00"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", None),
        (b"\x16", None),
        (b"\x16\x03", None),
        (b"\x16\x03\x01\x02", None),
        (b"\x16\x01", TCP),
        (b"\x80\x2e\x01\x03\x01", TCP),  # SSLv2-compatible hello
        (b"G", None),
        (b"GE", None),
        (b"GET", None),
        (b"GET ", None),
        (b"P", None),
        (b"PAT", None),
        (b"CONNECT", None),
        (b"GETX", TCP),
        (b"GET/", TCP),
        (b"get / HTTP/1.1\r\n\r\n", TCP),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", TCP),
        (b"PROPFIND / HTTP/1.1\r\n\r\n", TCP),
        (b"SSH-2.0-OpenSSH_9.6\r\n", TCP),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", TCP),  # PostgreSQL SSLRequest
        (POSTGRES_STARTUP, TCP),
        (b"*1\r\n$4\r\nPING\r\n", TCP),  # Redis
        (b"\x00", TCP),
        (b"GET / HTTP/1.1\r\nHost: Example.com\r\n\r\n", http("example.com", "GET", "/")),
        (b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n", http("a", "DELETE", "/x")),
        (b"TRACE / HTTP/1.1\r\nHost: a", None),
    ],
    ids=lambda v: repr(v)[:30] if isinstance(v, bytes) else None,
)
def test_sniff(raw: bytes, expected: Peeked | None) -> None:
    assert sniff(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
        b"\x16\x03\x09",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
)
def test_sniff_malformed_tls_or_http_raises(raw: bytes) -> None:
    with pytest.raises(ValueError):
        sniff(raw)


# ---------------------------------------------------------------- fuzzing

TLS_SEEDS = (
    [raw for raw, _ in REAL_HELLOS.values()]
    + [raw for _, raw, _ in GOOD_FABRICATED]
    + [
        frame(handshake_of(REAL_HELLOS["tls13"][0]), [3, 100, 300]),
        frame(client_hello(hello_body([sni(b"pq.example"), key_share(X25519MLKEM768)])), [700]),
    ]
)
HTTP_SEEDS = [raw for _, raw, _ in GOOD_HEADS]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with a few byte flips, overwrites, truncations, insertions, deletions."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x0D, 0x0A, 0x20, 0x3A, 0x7F, 0xFF]))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


def arbitrary_or_mutated(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), mutated(seeds))


@FUZZ
@given(arbitrary_or_mutated(TLS_SEEDS))
def test_fuzz_parse_client_hello(buf: bytes) -> None:
    result = assert_stable(parse_client_hello, buf, spread(len(buf)))
    if isinstance(result, Peeked):
        assert result.protocol is Protocol.TLS and result.method is None


@FUZZ
@given(arbitrary_or_mutated(HTTP_SEEDS))
def test_fuzz_parse_http_request_head(buf: bytes) -> None:
    result = assert_stable(parse_http_request_head, buf, spread(len(buf)))
    if isinstance(result, Peeked):
        assert result.protocol is Protocol.HTTP and result.method and result.target


OPENINGS = st.sampled_from([b"GET ", b"\x16\x03\x01", b"CONNECT ", b"\x16\x03\x03\x00\x10\x01"])


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(TLS_SEEDS + HTTP_SEEDS),
        st.tuples(OPENINGS, st.binary(max_size=40)).map(b"".join),
    )
)
def test_fuzz_sniff(buf: bytes) -> None:
    assert_stable(sniff, buf, spread(len(buf)))


LABEL = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


@settings(max_examples=400, deadline=None)
@given(
    name=st.one_of(st.none(), HOSTNAME),
    others=st.dictionaries(st.integers(1, 0xFFFF), st.binary(max_size=200), max_size=8),
    session_id=st.binary(max_size=32),
    data=st.data(),
)
def test_generated_hellos(
    name: str | None, others: dict[int, bytes], session_id: bytes, data: st.DataObject
) -> None:
    extensions = list(others.items())
    if name is not None:
        extensions.insert(data.draw(st.integers(0, len(extensions))), sni(name.encode()))
    handshake = client_hello(hello_body(extensions, session_id=session_id))
    cuts = data.draw(st.lists(st.integers(1, len(handshake) - 1), max_size=6))
    raw = frame(handshake, cuts)
    expected = tls(name.lower() if name else None)
    assert parse_client_hello(raw) == expected
    assert sniff(raw) == expected
    for cut in spread(len(raw)):
        if cut < len(raw):
            assert parse_client_hello(raw[:cut]) is None


TCHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
FIELD_NAME = st.text(TCHARS, min_size=1, max_size=16).filter(lambda n: n.lower() != "host")
FIELD_VALUE = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 0x20 <= c != 0x7F).strip(b" \t")
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
    path=st.text("abcxyz0189/-._~%!$&'()*+,;=:@?", max_size=30).map(lambda p: "/" + p),
    host=st.one_of(st.none(), HOSTNAME),
    port=st.one_of(st.none(), st.integers(0, 65535)),
    fields=st.lists(st.tuples(FIELD_NAME, FIELD_VALUE), max_size=8),
    data=st.data(),
)
def test_generated_http_heads(
    method: str,
    path: str,
    host: str | None,
    port: int | None,
    fields: list[tuple[str, bytes]],
    data: st.DataObject,
) -> None:
    lines = [f"{method} {path} HTTP/1.1".encode()]
    lines += [name.encode() + b": " + value for name, value in fields]
    if host is not None:
        host_value = host if port is None else f"{host}:{port}"
        lines.insert(data.draw(st.integers(1, len(lines))), b"Host: " + host_value.encode())
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    expected = http(host.lower() if host else None, method, path)
    assert parse_http_request_head(raw) == expected
    assert sniff(raw) == expected
    for cut in range(len(raw)):
        assert parse_http_request_head(raw[:cut]) is None


# ---------------------------------------------------------------- incremental parsing

# The parsers as they were before they became incremental (a whole pass per
# call): the reference the incremental ones must agree with, and the
# quadratic baseline below.
import peek_reference  # noqa: E402


def _kind(outcome: object) -> object:
    """An outcome comparable across the two implementations' Peeked classes."""
    if outcome is None or outcome is ValueError:
        return outcome
    return (outcome.protocol.value, outcome.server_name, outcome.method, outcome.target)  # type: ignore[attr-defined]


def _reference(parse: Callable[[bytes], object], buf: bytes) -> object:
    try:
        return _kind(parse(buf))
    except ValueError:
        return ValueError


def _fed(parser: object, pieces: Sequence[bytes]) -> list[object]:
    """The answer after each piece, fed one by one."""
    answers: list[object] = []
    for piece in pieces:
        try:
            answers.append(_kind(parser.feed(piece)))  # type: ignore[attr-defined]
        except ValueError:
            answers.append(ValueError)
    return answers


@st.composite
def chopped(draw: st.DrawFn, bufs: st.SearchStrategy[bytes]) -> list[bytes]:
    """A buffer cut into pieces at random places (1-byte pieces included)."""
    buf = draw(bufs)
    if draw(st.booleans()):
        cuts = list(range(1, len(buf)))  # byte by byte
    else:
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(buf) - 1)), max_size=12)))
    bounds = [0, *(c for c in cuts if 0 < c < len(buf)), len(buf)]
    return [buf[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


INCREMENTAL = [
    ("sniff", Sniffer, peek_reference.sniff, TLS_SEEDS + HTTP_SEEDS),
    ("tls", ClientHelloParser, peek_reference.parse_client_hello, TLS_SEEDS),
    ("http", HttpHeadParser, peek_reference.parse_http_request_head, HTTP_SEEDS),
]


@pytest.mark.parametrize(("what", "parser", "reference", "seeds"), INCREMENTAL)
@FUZZ
@given(data=st.data())
def test_incremental_parsers_answer_like_the_whole_buffer_parsers(
    what: str,
    parser: Callable[[], object],
    reference: Callable[[bytes], object],
    seeds: Sequence[bytes],
    data: st.DataObject,
) -> None:
    """Fed in any pieces, after every piece the incremental parser says what
    the reference says of everything fed so far: the same value, None, or
    ValueError."""
    pieces = data.draw(chopped(st.one_of(arbitrary_or_mutated(seeds), st.sampled_from(seeds))))
    answers = _fed(parser(), pieces)
    prefix = b""
    for piece, answer in zip(pieces, answers, strict=True):
        prefix += piece
        assert answer == _reference(reference, prefix), (what, prefix)


def test_incremental_parsers_on_real_hellos_and_heads_byte_by_byte() -> None:
    for raw, name in REAL_HELLOS.values():
        for reframed in (raw, frame(handshake_of(raw), range(1, len(handshake_of(raw))))):
            answers = _fed(Sniffer(), [reframed[i : i + 1] for i in range(len(reframed))])
            assert answers[:-1] == [None] * (len(reframed) - 1)
            assert answers[-1] == ("tls", name, None, None)
    for raw in HTTP_SEEDS:
        answers = _fed(Sniffer(), [raw[i : i + 1] for i in range(len(raw))])
        assert answers[-1] == _reference(peek_reference.sniff, raw)


def _line_events(parse: Callable[[], None], module_file: str) -> int:
    """How many lines of ``module_file`` run while ``parse`` runs: the work
    done, counted by the interpreter rather than timed."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != module_file:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        parse()
    finally:
        sys.settrace(None)
    return count


def _trickled_hello(padding: int) -> bytes:
    """A ClientHello with ``padding`` bytes of extension, one byte per TLS record."""
    handshake = client_hello(hello_body([sni(b"example.org"), (21, bytes(padding))]))
    return frame(handshake, range(1, len(handshake)))


def test_a_hello_trickled_in_1_byte_records_costs_work_linear_in_its_bytes() -> None:
    """Each wake-up of the proxy feeds what arrived (here: one record). The
    work, in lines of the parser run, grows with the hello's length; the
    whole-buffer reference's grows with its square."""
    import egress_agent.proxy.peek as peek_module

    def incremental(buf: bytes) -> Callable[[], None]:
        def run() -> None:
            sniffer = Sniffer()
            for i in range(0, len(buf), 6):  # a 1-byte record is 6 bytes on the wire
                sniffer.feed(buf[i : i + 6])
            assert sniffer.feed(b"") == tls("example.org")

        return run

    def whole_buffer(buf: bytes) -> Callable[[], None]:
        def run() -> None:
            for i in range(6, len(buf) + 1, 6):
                peek_reference.sniff(buf[:i])

        return run

    sizes = (250, 500, 1000)
    ours = [_line_events(incremental(_trickled_hello(n)), peek_module.__file__) for n in sizes]
    theirs = [
        _line_events(whole_buffer(_trickled_hello(n)), peek_reference.__file__) for n in sizes
    ]
    # Sizes double: linear work adds twice as much from one size to the next
    # as from the one before (fixed costs cancel out), quadratic work four times.
    assert _growth(ours) < 2.2, ours
    assert _growth(theirs) > 3.5, theirs


def _growth(work: Sequence[int]) -> float:
    """For work measured at sizes n, 2n, 4n: how much the second step adds
    compared with the first (2 for linear work, 4 for quadratic)."""
    return (work[2] - work[1]) / (work[1] - work[0])


def test_an_http_head_trickled_byte_by_byte_costs_work_linear_in_its_bytes() -> None:
    import egress_agent.proxy.peek as peek_module

    def head(n: int) -> bytes:
        fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 20) for i in range(n))
        return b"GET / HTTP/1.1\r\nHost: example.org\r\n" + fields + b"\r\n"

    def run(buf: bytes) -> Callable[[], None]:
        def go() -> None:
            sniffer = Sniffer()
            for i in range(len(buf)):
                sniffer.feed(buf[i : i + 1])
            assert sniffer.feed(b"") == http("example.org", "GET", "/")

        return go

    work = [_line_events(run(head(n)), peek_module.__file__) for n in (25, 50, 100)]
    assert _growth(work) < 2.2, work
    reference = [
        _line_events(
            (lambda buf: lambda: [peek_reference.sniff(buf[:i]) for i in range(1, len(buf) + 1)])(
                head(n)
            ),
            peek_reference.__file__,
        )
        for n in (25, 50, 100)
    ]
    assert _growth(reference) > 3.5, reference
