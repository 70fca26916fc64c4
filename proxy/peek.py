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

The parsers: :mod:`~egress_agent.proxy.peek_tls` (the ClientHello),
:mod:`~egress_agent.proxy.peek_http` (the request head), over
:mod:`~egress_agent.proxy.hostnames` (names as the policy compares them) and
:mod:`~egress_agent.proxy.peek_result` (what they answer); each module says
where it decides what the RFCs leave open. :func:`sniff` only takes bytes for
HTTP when they start with one of the methods in :data:`HTTP_METHODS` followed
by a space, so binary protocols (PostgreSQL, SSH, HTTP/2 prior knowledge
``PRI *``) are plain TCP.
"""

from __future__ import annotations

from egress_agent.proxy.peek_http import (
    HTTP_METHODS,
    HTTP_STARTS,
    MAX_HTTP_HEAD,
    HttpHeadParser,
    parse_http_request_head,
)
from egress_agent.proxy.peek_result import Incremental, Peeked, Protocol
from egress_agent.proxy.peek_tls import (
    CONTENT_HANDSHAKE,
    MAX_CLIENT_HELLO,
    MAX_TLS_RECORD,
    ClientHelloParser,
    parse_client_hello,
)

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


class Sniffer(Incremental):
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
        if buf[0] == CONTENT_HANDSHAKE:
            if len(buf) < 2:
                return None
            if buf[1] != 0x03:
                return _TCP
            self._parser = ClientHelloParser()
        elif buf.startswith(HTTP_STARTS):
            self._parser = HttpHeadParser()
        elif any(start.startswith(buf) for start in HTTP_STARTS):
            return None
        else:
            return _TCP
        self._start = b""
        return self._parser.feed(buf)
