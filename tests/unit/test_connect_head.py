"""The CONNECT request head parser: a table of heads, every prefix of the
valid ones, and fuzzing of the three-way contract (a value, None for "need
more", or ValueError -- nothing else, and never another answer once more bytes
arrive)."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egress_agent.proxy.connect_head import (
    MAX_CONNECT_HEAD,
    ProxyRequest,
    parse_proxy_request,
)

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CURL = (
    b"CONNECT pgbackups.blob.core.windows.net:443 HTTP/1.1\r\n"
    b"Host: pgbackups.blob.core.windows.net:443\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Proxy-Connection: Keep-Alive\r\n\r\n"
)


def outcome(buf: bytes, max_head: int = MAX_CONNECT_HEAD) -> ProxyRequest | None | type:
    try:
        result = parse_proxy_request(buf, max_head=max_head)
    except ValueError as exc:
        message = str(exc)
        assert 0 < len(message) <= 120, message
        return ValueError
    assert result is None or isinstance(result, ProxyRequest)
    return result


def connect(host: str, port: int, *, address: str | None = None, auth: str | None = None,
            length: int, target: str | None = None) -> ProxyRequest:  # fmt: skip
    return ProxyRequest(
        method="CONNECT",
        target=target or f"{host}:{port}",
        host=host,
        port=port,
        address=ipaddress.ip_address(address) if address else None,
        proxy_authorization=auth,
        head_length=length,
    )


def test_curl_head_parses_and_every_prefix_needs_more() -> None:
    expected = connect("pgbackups.blob.core.windows.net", 443, length=len(CURL))
    assert parse_proxy_request(CURL) == expected
    for cut in range(len(CURL)):
        assert parse_proxy_request(CURL[:cut]) is None, cut


def test_bytes_after_the_head_belong_to_the_tunnel() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    got = parse_proxy_request(CURL + hello)
    assert got is not None and got.head_length == len(CURL)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"CONNECT Example.COM.:8443 HTTP/1.0\r\n\r\n", ("example.com", 8443, None)),
        (b"CONNECT 198.51.100.7:443 HTTP/1.1\r\n\r\n", ("198.51.100.7", 443, "198.51.100.7")),
        (b"CONNECT [2001:DB8::1]:443 HTTP/1.1\r\n\r\n", ("2001:db8::1", 443, "2001:db8::1")),
        (b"CONNECT [::ffff:10.0.0.1]:22 HTTP/1.1\r\n\r\n", ("::ffff:a00:1", 22, "::ffff:a00:1")),
        (b"CONNECT a_b-c.test:65535 HTTP/1.1\r\nHost: other\r\n\r\n", ("a_b-c.test", 65535, None)),
    ],
)
def test_connect_targets(head: bytes, expected: tuple[str, int, str | None]) -> None:
    got = parse_proxy_request(head)
    assert got is not None and got.method == "CONNECT"
    host, port, address = expected
    assert (got.host, got.port) == (host, port)
    assert got.address == (ipaddress.ip_address(address) if address else None)


def test_proxy_authorization_is_kept_as_sent() -> None:
    head = b"CONNECT a.test:443 HTTP/1.1\r\nproxy-AUTHORIZATION:  Basic dTpw \r\n\r\n"
    got = parse_proxy_request(head)
    assert got is not None and got.proxy_authorization == "Basic dTpw"


def test_other_methods_parse_without_a_target_host() -> None:
    head = b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n"
    got = parse_proxy_request(head)
    assert got == ProxyRequest(
        method="GET",
        target="http://a.test/x",
        host=None,
        port=None,
        address=None,
        proxy_authorization=None,
        head_length=len(head),
    )


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT a.test HTTP/1.1\r\n\r\n",  # no port
        b"CONNECT a.test: HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:0 HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:65536 HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:44x HTTP/1.1\r\n\r\n",
        b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n",  # IPv6 without brackets
        b"CONNECT [2001:db8::1 HTTP/1.1\r\n\r\n",
        b"CONNECT [fe80::1%eth0]:443 HTTP/1.1\r\n\r\n",  # zone id
        b"CONNECT [v1.x]:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [a.test]:443 HTTP/1.1\r\n\r\n",
        b"CONNECT 0x7f.1:443 HTTP/1.1\r\n\r\n",  # the resolver would read a number
        b"CONNECT 10.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT 010.0.0.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a..test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT *.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT user@a.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT http://a.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT " + b"a" * 64 + b".test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:443 HTTP/2\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\n\n",  # bare LF
        b"CONNECT a.test:443 HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"CONNECT  a.test:443 HTTP/1.1\r\n\r\n",
        b"\r\nCONNECT a.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\n folded\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nNo colon\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nX: \x01\r\n\r\n",
        b"CONNECT a.test:443 HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n",
        b"\x16\x03\x01\x00\x05",  # TLS straight to the proxy port
    ],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    assert outcome(head) is ValueError


def test_a_head_that_does_not_end_within_the_cap_is_refused() -> None:
    start = b"CONNECT a.test:443 HTTP/1.1\r\nX-Filler: "
    assert parse_proxy_request(start + b"x" * 100) is None
    assert outcome(start + b"x" * (MAX_CONNECT_HEAD - len(start))) is ValueError
    assert outcome(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n", max_head=20) is ValueError


# ---------------------------------------------------------------- fuzzing

SEEDS = [
    CURL,
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\n\r\n\x16\x03",
    b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"CONNECT 198.51.100.7:22 HTTP/1.0\r\n\r\nSSH-2.0-x\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            data[i] = draw(st.integers(0, 255))
        elif choice == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(buf=st.one_of(st.binary(max_size=300), mutated()), cap=st.sampled_from([64, 8192]))
def test_fuzz_three_way_contract_and_stability(buf: bytes, cap: int) -> None:
    final = outcome(buf, cap)
    for cut in range(len(buf)):
        early = outcome(buf[:cut], cap)
        assert early is None or early == final, (cut, early, final)
    if isinstance(final, ProxyRequest):
        assert 0 < final.head_length <= min(len(buf), cap)
        assert (final.host is not None) == (final.method == "CONNECT")


LABEL = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=12)
NAME = st.lists(LABEL, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))


@settings(max_examples=300, deadline=None)
@given(name=NAME, port=st.integers(1, 65535), fields=st.lists(
    st.tuples(st.text(string.ascii_letters + "-", min_size=1, max_size=12),
              st.text(string.printable.strip(), max_size=20)), max_size=5))  # fmt: skip
def test_generated_connects(name: str, port: int, fields: list[tuple[str, str]]) -> None:
    fields = [(k, v) for k, v in fields if k.lower() != "proxy-authorization"]
    head = f"CONNECT {name}:{port} HTTP/1.1\r\n".encode()
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in fields) + b"\r\n"
    got = parse_proxy_request(head)
    assert got is not None and (got.host, got.port) == (name, port)
