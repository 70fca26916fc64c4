"""Read the request head a client sends to an explicit proxy (HTTPS_PROXY).

A client configured with a proxy opens a TCP connection to it and sends
``CONNECT host:port HTTP/1.1`` plus header lines, and only after the proxy's
``200`` starts its own protocol (usually TLS) inside the tunnel. This module
parses that head; the listener in :mod:`egress_agent.proxy.connect` acts on it.

A pure function over bytes the client controls, with the three-way contract
every parser of untrusted bytes in this project keeps:

* a :class:`ProxyRequest` once the head (up to its empty line) has arrived;
* ``None`` while the bytes are a prefix of a head that may still be valid;
* ``ValueError`` with a short reason otherwise. No other exception escapes,
  and once a buffer gives a value or an error, every longer buffer starting
  with it gives the same.

Decisions (where RFC 9110 section 9.3.6 and RFC 9112 leave room):

* Lines end in CRLF; bare CR or LF, obsolete line folding and leading empty
  lines are refused, like :mod:`egress_agent.proxy.peek` does for the
  transparent path.
* The CONNECT target is authority-form with a port (RFC 9112 section 3.2.3):
  a DNS name, an IPv4 address in dotted-quad form or a bracketed IPv6
  address. Names whose last label starts with a digit but that are no
  dotted quad (``0x7f.1``, ``10.1``) are refused: the C resolver would read
  them as numbers, so the name the policy saw would not be what is dialled.
* The Host header of a CONNECT is not consulted: the request-target names the
  tunnel's end (RFC 9110 section 7.2).
* Requests with other methods (a plain-HTTP forward proxy request such as
  ``GET http://host/ HTTP/1.1``) parse, so that the listener can answer them
  properly; their ``host`` and ``port`` are None.
* At most one Proxy-Authorization field is accepted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from egress_agent.policy.model import IPAddress

# The request head's syntax (CRLF lines, request line, field lines) and its host names are
# the same as on the transparent path: one implementation of RFC 9112's rules.
from egress_agent.proxy.hostnames import bracketed_ipv6, dns_name
from egress_agent.proxy.peek_http import (
    check_field_line_prefix,
    check_line_endings,
    check_request_line_prefix,
    parse_field_line,
    parse_request_line,
)

__all__ = ["MAX_CONNECT_HEAD", "ProxyRequest", "parse_proxy_request"]

# Largest request head (request line, fields and the empty line) waited for.
# CONNECT heads are short (curl sends about 150 bytes); 8 KiB leaves room for
# long Proxy-Authorization values and user agents.
MAX_CONNECT_HEAD = 8192


@dataclass(frozen=True, kw_only=True)
class ProxyRequest:
    """What a proxy client asked for.

    For CONNECT, ``host`` is the target's name (lower case, no trailing dot)
    or its IP literal (IPv6 without brackets) and ``address`` is set when it
    is a literal. ``proxy_authorization`` is the field's value as sent (a
    secret: never log it). ``head_length`` counts the head's bytes including
    its empty line; bytes after it already belong to the tunnel.
    """

    method: str
    target: str
    host: str | None
    port: int | None
    address: IPAddress | None
    proxy_authorization: str | None
    head_length: int


def parse_proxy_request(buf: bytes, *, max_head: int = MAX_CONNECT_HEAD) -> ProxyRequest | None:
    """The request head at the start of ``buf`` (see the module docstring)."""
    end = buf.find(b"\r\n\r\n", 0, max_head)
    complete = end >= 0
    region = buf[:end] if complete else buf[:max_head]
    if not complete and region.endswith(b"\r"):
        region = region[:-1]  # may be the first half of a CRLF
    check_line_endings(region)
    lines = region.split(b"\r\n")
    partial = b"" if complete else lines.pop()
    if not lines:
        check_request_line_prefix(partial)
        _check_size(buf, max_head)
        return None
    method, target = parse_request_line(lines[0])
    authorization: bytes | None = None
    for line in lines[1:]:
        name, value = parse_field_line(line)
        if name.lower() == b"proxy-authorization":
            if authorization is not None:
                raise ValueError("more than one Proxy-Authorization header")
            authorization = value
    if not complete:
        check_field_line_prefix(partial)
        _check_size(buf, max_head)
        return None
    host: str | None = None
    port: int | None = None
    address: IPAddress | None = None
    if method == b"CONNECT":
        host, port, address = _authority(target)
    return ProxyRequest(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        host=host,
        port=port,
        address=address,
        proxy_authorization=None if authorization is None else authorization.decode("latin-1"),
        head_length=end + 4,
    )


def _check_size(buf: bytes, max_head: int) -> None:
    if len(buf) >= max_head:
        raise ValueError(f"no end of the request head within {max_head} bytes")


def _authority(target: bytes) -> tuple[str, int, IPAddress | None]:
    """``host:port`` of a CONNECT (RFC 9112 section 3.2.3)."""
    address: IPAddress | None
    if target.startswith(b"["):
        v6, _, rest = bracketed_ipv6(target, "CONNECT target")
        host, address = str(v6), v6
    else:
        raw, colon, port_text = target.partition(b":")
        rest = colon + port_text
        host, address = _host(raw)
    if not rest.startswith(b":"):
        raise ValueError("CONNECT target needs a port: host:port")
    port_text = rest[1:]
    if not (port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535):
        raise ValueError("CONNECT target: port is not a number 1-65535")
    return host, int(port_text), address


def _host(raw: bytes) -> tuple[str, IPAddress | None]:
    what = "CONNECT target: host"
    if not 1 <= len(raw) <= 254:
        raise ValueError(f"{what} of {len(raw)} bytes, expected 1-253")
    name = dns_name(raw, what)
    if len(name) > 253:
        raise ValueError(f"{what} has an empty label or one longer than 63 bytes")
    if name.rpartition(".")[2][0].isdigit():
        try:
            v4 = ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(
                "CONNECT target: host is neither a DNS name nor a dotted-quad IPv4 address"
            ) from None
        return str(v4), v4
    return name, None
