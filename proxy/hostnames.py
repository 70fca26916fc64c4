"""Server names as the policy compares them, from the bytes a client sent:
a TLS SNI, an HTTP Host or request-target, a CONNECT target."""

from __future__ import annotations

import ipaddress

_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_IPV6_BYTES = b"0123456789abcdefABCDEF:."


def hostname(raw: bytes, what: str) -> str:
    """A DNS name as the policy compares it: lower-case, no trailing dot.

    Only letters, digits, '-', '.' and '_' are accepted (RFC 6066 section 3
    wants an ASCII host name, IDNs in A-label form), so a name can never smuggle
    a wildcard or an empty label past the policy's suffix match. IPv4 literals
    pass as they are: RFC 6066 keeps them out of SNI, but refusing them gains
    nothing -- they are compared with the policy's names like any other text.
    """
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} of {len(raw)} bytes, expected 1-255")
    return dns_name(raw, what)


def dns_name(raw: bytes, what: str) -> str:
    """:func:`hostname` without the check of its length (the caller's)."""
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


def authority_host(authority: bytes, *, port_required: bool, what: str) -> str:
    """The host of ``uri-host [ ":" port ]`` (RFC 9110 section 7.2, RFC 3986
    section 3.2), bracketed IPv6 literals without their brackets."""
    if authority.startswith(b"["):
        _, text, rest = bracketed_ipv6(authority, what)
        host = text.lower()
    else:
        colon = authority.find(b":")
        if colon < 0:
            colon = len(authority)
        host, rest = hostname(authority[:colon], what), authority[colon:]
    if rest and not rest.startswith(b":"):
        raise ValueError(f"{what}: unexpected bytes after the host")
    port = rest[1:]
    if port_required and not port:
        raise ValueError(f"{what}: port required")
    # RFC 3986 allows an empty port after ':'; a present one must fit 16 bits.
    if port and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{what}: port is not a number 0-65535")
    return host


def bracketed_ipv6(authority: bytes, what: str) -> tuple[ipaddress.IPv6Address, str, bytes]:
    """The IPv6 literal in brackets that starts ``authority``: the address,
    the literal as sent, and the bytes after the closing bracket."""
    close = authority.find(b"]")
    if close < 0:
        raise ValueError(f"{what}: IPv6 literal without closing ']'")
    literal, rest = authority[1:close], authority[close + 1 :]
    # Zone ids (RFC 6874) and IPvFuture have no business in an egress name.
    if not literal or literal.translate(None, _IPV6_BYTES):
        raise ValueError(f"{what}: bracketed host is not an IPv6 address")
    text = literal.decode("ascii")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"{what}: bracketed host is not an IPv6 address") from None
    return address, text, rest
