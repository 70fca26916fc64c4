"""Moving HTTP messages between two streams with their framing checked
(proxy/httpbody.py), over in-memory streams: what reaches the other side,
what is counted, and how a body that breaks off or is malformed ends."""

from __future__ import annotations

import asyncio

import pytest

from egress_agent.proxy import httpbody, httpmessage


class Memory:
    """A stream that yields ``chunks`` one read at a time, then ends, and
    keeps what is written to it."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.written = bytearray()
        self.aborted = False

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        pass

    async def linger_close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def request(raw: bytes) -> httpmessage.RequestHead:
    parsed = httpmessage.parse_request(raw)
    assert parsed is not None
    return parsed[0]


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n"


@pytest.mark.parametrize(
    ("reframe", "expected"),
    [
        (True, b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n"),
        (False, b"hello world"),
    ],
)
def test_chunked_body_is_reframed_or_dechunked(reframe: bool, expected: bytes) -> None:
    src = Memory(CHUNKED[:7], CHUNKED[7:20], CHUNKED[20:])
    dst = Memory()
    counter = httpbody.Counter()
    asyncio.run(
        httpbody.copy_chunked(src, bytearray(), dst, counter, upstream=False, reframe=reframe)
    )
    assert bytes(dst.written) == expected
    assert counter.bytes == len(CHUNKED)  # what came in, extensions included


def test_a_body_cut_short_is_broken_and_counted_as_far_as_it_came() -> None:
    dst = Memory()
    counter = httpbody.Counter()
    with pytest.raises(httpbody.Broken, match="4 body bytes still to come"):
        asyncio.run(httpbody.copy_length(Memory(b"abcdef"), bytearray(), dst, 10, counter))
    assert bytes(dst.written) == b"abcdef" and counter.bytes == 6


def test_a_malformed_chunk_cuts_the_upstream_connection() -> None:
    head = request(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    client = Memory(b"5\r\nhelloXX")
    upstream = Memory()
    sent: list[bool] = []
    why = asyncio.run(
        httpbody.send_request(
            client, bytearray(), upstream, b"HEAD\r\n\r\n", head, httpbody.Counter(),
            sent=lambda: sent.append(True),
        )
    )  # fmt: skip
    assert why is not None and why.startswith("client: malformed request body")
    assert sent == [True] and upstream.aborted
    assert bytes(upstream.written) == b"HEAD\r\n\r\n5\r\nhello"  # never a "complete" body


def test_interim_and_final_responses_reach_an_http10_client_dechunked() -> None:
    head = request(b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n")
    upstream = Memory(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    client = Memory()
    starts: list[bool] = []
    response, down, close = asyncio.run(
        httpbody.relay_response(
            upstream, bytearray(), client, head, upgrade=False,
            starting=lambda: starts.append(True),
        )
    )  # fmt: skip
    assert response.status == 200 and close
    assert bytes(client.written) == (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    )
    assert down == len(client.written) - 3 + len(b"3\r\nabc\r\n0\r\n\r\n")
    assert starts == [True, True]


def test_an_upstream_that_closes_before_answering_is_broken() -> None:
    head = request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(httpbody.Broken, match="upstream closed before a response"):
        asyncio.run(
            httpbody.relay_response(
                Memory(), bytearray(), Memory(), head, upgrade=False, starting=lambda: None
            )
        )
