"""HTTP/1.1 parsing and rewriting for http rules: tables of accepted and
refused heads, framing, chunk lines, and fuzzing of the three-way contract
(a value, None for "need more", or ValueError -- nothing else, and the same
answer once more bytes arrive)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_agent.proxy import httpmessage
from egress_agent.proxy.httpmessage import Framing

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOST = b"Host: a.example\r\n"


def req(*lines: bytes, start: bytes = b"POST /x HTTP/1.1") -> bytes:
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n"


# ---------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("buf", "framing", "keep_alive"),
    [
        (req(b"Host: a"), Framing(), True),
        (req(b"Host: a", b"Content-Length: 10"), Framing(length=10), True),
        (req(b"Host: a", b"Content-Length: 10", b"content-length: 10"), Framing(length=10), True),
        (req(b"Host: a", b"Content-Length: 7, 7"), Framing(length=7), True),
        (req(b"Host: a", b"Transfer-Encoding: chunked"), Framing(chunked=True), True),
        (req(b"Host: a", b"Transfer-Encoding: Chunked"), Framing(chunked=True), True),
        (req(b"Host: a", b"Connection: close"), Framing(), False),
        (req(b"Host: a", start=b"GET / HTTP/1.0"), Framing(), False),
        (req(b"Host: a", b"Connection: keep-alive", start=b"GET / HTTP/1.0"), Framing(), True),
    ],
)
def test_request_framing(buf: bytes, framing: Framing, keep_alive: bool) -> None:
    got = httpmessage.parse_request(buf + b"BODY")
    assert got is not None
    head, used = got
    assert used == len(buf)
    assert head.framing == framing and head.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("buf", "why"),
    [
        (req(b"Host: a", b"Content-Length: 3", b"Transfer-Encoding: chunked"), "both"),
        (req(b"Host: a", b"Content-Length: 3", b"Content-Length: 4"), "different values"),
        (req(b"Host: a", b"Content-Length: 3, 4"), "different values"),
        (req(b"Host: a", b"Content-Length: -1"), "not a number"),
        (req(b"Host: a", b"Content-Length: 0x10"), "not a number"),
        (req(b"Host: a", b"Content-Length: 1" + b"0" * 18), "not a number"),
        (req(b"Host: a", b"Transfer-Encoding: chunked, identity"), "exactly 'chunked'"),
        (req(b"Host: a", b"Transfer-Encoding: gzip, chunked"), "exactly 'chunked'"),
        (
            req(b"Host: a", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
            "exactly 'chunked'",
        ),
        (req(b"Host: a", b"Transfer-Encoding: identity"), "exactly 'chunked'"),
        (req(b"Host: a", b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"), "HTTP/1.0"),
        (req(b"Host: a", b"Expect: something"), "Expect"),
        (req(b"Host: a", b"X: a", b" folded"), "folding"),
        (req(b"Host: a", b"Host: b"), "Host"),
        (b"GET / HTTP/1.1\nHost: a\n\n", "bare LF"),
        (req(b"Host: a", start=b"GET /  HTTP/1.1"), "request"),
        (req(b"Host: a", start=b"CONNECT a:443 HTTP/1.1"), "CONNECT"),
        (req(b"Host: a", start=b"GET / HTTP/2.0"), "version"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * httpmessage.MAX_HEAD, "16384"),
    ],
)
def test_refused_requests(buf: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        httpmessage.parse_request(buf)


def test_request_path_drops_the_query() -> None:
    got = httpmessage.parse_request(req(b"Host: a", start=b"GET /c/b?sig=SECRET&x=1 HTTP/1.1"))
    assert got is not None and got[0].path == "/c/b"
    got = httpmessage.parse_request(req(start=b"GET http://a.example/c?sig=S HTTP/1.1"))
    assert got is not None and got[0].path == "/c" and got[0].host == "a.example"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a?b", "/a?b"),
        ("http://h.example/a/b?c=d", "/a/b?c=d"),
        ("http://h.example", "/"),
        ("http://h.example?x=1", "/?x=1"),
        ("https://h.example:8443/p#frag", "/p"),
    ],
)
def test_origin_form(target: str, expected: str) -> None:
    assert httpmessage.origin_form(target) == expected


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("head", "method", "framing", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", "GET", Framing(length=5), True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "GET", Framing(chunked=True), True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", "GET", Framing(until_close=True), False),
        (b"HTTP/1.1 200 OK", "GET", Framing(until_close=True), False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", "HEAD", Framing(), True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5", "GET", Framing(), True),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked", "GET", Framing(), True),
        (b"HTTP/1.1 100 Continue", "PUT", Framing(), True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close", "GET", Framing(), False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1", "GET", Framing(length=1), False),
    ],
)
def test_response_framing(head: bytes, method: str, framing: Framing, keep_alive: bool) -> None:
    got = httpmessage.parse_response(head + b"\r\n\r\nxyz", request_method=method)
    assert got is not None
    response, used = got
    assert used == len(head) + 4
    assert response.framing == framing and response.keep_alive is keep_alive


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2",
        b"HTTP/1.1 200 OK\r\nX: a\nY: b",
    ],
)
def test_refused_responses(head: bytes) -> None:
    with pytest.raises(ValueError):
        httpmessage.parse_response(head + b"\r\n\r\n", request_method="GET")


# ---------------------------------------------------------------- chunks


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (b"1a\r\n", (26, 4)),
        (b"0\r\n", (0, 3)),
        (b"A;name=value\r\n", (10, 14)),
        (b"10 ; ext\r\n", (16, 10)),
        (b"1a", None),
        (b"1a\r", None),
        (b"1 ", None),
        (b"1 ;", None),
        (b"", None),
    ],
)
def test_chunk_lines(buf: bytes, expected: tuple[int, int] | None) -> None:
    assert httpmessage.parse_chunk_line(buf) == expected


@pytest.mark.parametrize(
    "buf", [b"zz\r\n", b"\r\n", b"1a\n", b"-1\r\n", b"1 a\r\n", b"1" * 16 + b"\r\n", b"1\x00\r\n"]
)
def test_refused_chunk_lines(buf: bytes) -> None:
    with pytest.raises(ValueError):
        httpmessage.parse_chunk_line(buf)


def test_trailers() -> None:
    assert httpmessage.parse_trailers(b"\r\nnext") == ((), 2)
    assert httpmessage.parse_trailers(b"X-A: 1\r\nX-B: 2\r\n\r\n") == (
        ((b"X-A", b"1"), (b"X-B", b"2")),
        18,
    )
    assert httpmessage.parse_trailers(b"X-A: 1\r\n") is None
    with pytest.raises(ValueError):
        httpmessage.parse_trailers(b"X-A: 1\nX\r\n\r\n")


# ---------------------------------------------------------------- fuzzing


def _outcome(parse: Callable[[bytes], Any], buf: bytes) -> Any:
    try:
        return parse(buf)
    except ValueError as exc:
        assert 0 < len(str(exc)) <= 160
        return ValueError


def _check_stable(parse: Callable[[bytes], Any], buf: bytes) -> None:
    """Every prefix's answer holds for all longer buffers once it is not None."""
    final = _outcome(parse, buf)
    for cut in range(len(buf)):
        got = _outcome(parse, buf[:cut])
        if got is None:
            continue
        if got is ValueError:
            assert final is ValueError, (buf[:cut], buf)
        else:
            assert final == got, (buf[:cut], buf)


_head_lines = st.lists(
    st.sampled_from(
        [
            b"Host: a.example",
            b"Content-Length: 5",
            b"Content-Length: 6",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Connection: close",
            b"Expect: 100-continue",
            b"X-A: b",
            b" fold",
            b"X-B:\x01",
            b"",
        ]
    ),
    max_size=6,
)


@FUZZ
@given(
    start=st.sampled_from([b"GET / HTTP/1.1", b"PUT /a?b=c HTTP/1.1", b"POST * HTTP/1.0", b"GE"]),
    lines=_head_lines,
    tail=st.binary(max_size=20),
)
def test_fuzz_request_heads(start: bytes, lines: list[bytes], tail: bytes) -> None:
    buf = b"\r\n".join([start, *lines]) + b"\r\n\r\n" + tail
    _check_stable(httpmessage.parse_request, buf)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_request_bytes(buf: bytes) -> None:
    _check_stable(httpmessage.parse_request, buf)


@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_chunk_lines(buf: bytes) -> None:
    _check_stable(httpmessage.parse_chunk_line, buf)


@FUZZ
@given(st.binary(max_size=120), st.sampled_from(["GET", "HEAD"]))
def test_fuzz_responses(buf: bytes, method: str) -> None:
    _check_stable(lambda b: httpmessage.parse_response(b, request_method=method), buf)


@FUZZ
@given(st.binary(max_size=80))
def test_fuzz_trailers(buf: bytes) -> None:
    _check_stable(httpmessage.parse_trailers, buf)


# ---------------------------------------------------------------- rewriting


def test_build_request_head_drops_hop_by_hop_and_applies_header_ops() -> None:
    got = httpmessage.parse_request(
        req(
            b"Host: a",
            b"Connection: keep-alive, X-Secret-Hop",
            b"X-Secret-Hop: 1",
            b"Keep-Alive: timeout=5",
            b"TE: trailers",
            b"x-debug: 1",
            b"X-Team: client",
            b"Content-Length: 3",
            b"Content-Length: 3",
        )
    )
    assert got is not None
    headers = httpmessage.build_request_head(
        got[0], set_headers=[("X-Team", "db")], remove_headers=["X-Debug"]
    )
    assert headers == [(b"Host", b"a"), (b"Content-Length", b"3"), (b"X-Team", b"db")]
    wire = httpmessage.serialize_request("POST", "/x", headers, close=False)
    assert wire == b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-Team: db\r\n\r\n"


def test_error_responses_close() -> None:
    out = httpmessage.error_response(400, "malformed HTTP request: x")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head


def test_serialize_response_drops_hop_by_hop_and_can_dechunk() -> None:
    got = httpmessage.parse_response(
        b"HTTP/1.1 200 Whatever\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: t=5\r\n"
        b'Transfer-Encoding: chunked\r\nETag: "e"\r\n\r\n',
        request_method="GET",
    )
    assert got is not None
    head = got[0]
    assert httpmessage.serialize_response(head, close=False) == (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: "e"\r\n\r\n'
    )
    assert httpmessage.serialize_response(head, close=True, dechunk=True) == (
        b'HTTP/1.1 200 OK\r\nETag: "e"\r\nConnection: close\r\n\r\n'
    )
