"""An allow rule's way out: ``source:``, the local address its upstream
connections leave from, and ``via:``, the gateway proxy they go through.

Both are read here and only shaped: whether the address is one of the
host's and whether the files can be read is the agent's to check when it
loads the policy (``agent.hostcheck``), with the places recorded here.
"""

from __future__ import annotations

import ipaddress
import re

from yaml.nodes import Node, SequenceNode

from egress_agent.policy import fields
from egress_agent.policy.model import (
    Action,
    Gateway,
    GatewayAuth,
    GatewayTls,
    IPAddress,
    Place,
    SourceBinding,
)
from egress_agent.policy.yamlnodes import Fields, Reader, join

_SOURCE_KEYS = ("address",)
_VIA_KEYS = ("connect", "auth", "tls")
_AUTH_KEYS = ("username_file", "password_file")
_TLS_KEYS = ("ca_file", "server_name")
_CONNECT_EXAMPLE = 'like "gateway.example:3128", "192.0.2.10:3128" or "[2001:db8::10]:3128"'
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]*)")


def place(r: Reader, node: Node, path: str) -> Place:
    """Where ``node`` was written, for problems found after loading."""
    mark = node.start_mark
    return Place(file=r.source_name, line=mark.line + 1, column=mark.column + 1, path=path)


def source_binding(r: Reader, node: Node, path: str) -> SourceBinding | None:
    """``source: {address: A}`` or ``{address: [A4, A6]}``: one address per family."""
    section = r.mapping(node, path, what="a source binding", allowed=_SOURCE_KEYS)
    if section is None:
        return None
    r.require(
        node,
        path,
        section,
        {"address": "expected the local address to leave from, e.g. 203.0.113.7"},
    )
    if "address" not in section:
        return None
    a_node = section["address"][1]
    a_path = join(path, "address")
    given = a_node.value if isinstance(a_node, SequenceNode) else None
    items = [(n, f"{a_path}[{i}]") for i, n in enumerate(given)] if given is not None else []
    if given is None:
        items = [(a_node, a_path)]
    elif not given:
        r.problem(a_node, a_path, "an empty list: give one address, or one per family")
        return None
    addresses: list[IPAddress] = []
    places: list[Place] = []
    for item, i_path in items:
        address = _address(r, item, i_path)
        if address is None:
            continue
        if any(a.version == address.version for a in addresses):
            r.problem(
                item,
                i_path,
                f"a second IPv{address.version} address: a connection leaves from one"
                " address, so give at most one per family (one IPv4, one IPv6)",
            )
            continue
        addresses.append(address)
        places.append(place(r, item, i_path))
    if len(addresses) != len(items):
        return None
    return SourceBinding(addresses=tuple(addresses), places=tuple(places))


def _address(r: Reader, node: Node, path: str) -> IPAddress | None:
    text = r.text(node, path, what="an IP address", raw=True)
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.is_unspecified or address.is_multicast:
        r.problem(
            node,
            path,
            f"{text!r} is not a unicast IP address: expected one of this host's addresses,"
            ' like 203.0.113.7 or "2001:db8::7"',
        )
        return None
    return address


def gateway(r: Reader, node: Node, path: str) -> Gateway | None:
    """``via: {connect: "host:port", auth: {username_file, password_file},
    tls: {ca_file, server_name}}``."""
    section = r.mapping(node, path, what="a gateway proxy", allowed=_VIA_KEYS)
    if section is None:
        return None
    r.require(
        node,
        path,
        section,
        {"connect": f"expected the gateway proxy's host:port, {_CONNECT_EXAMPLE}"},
    )
    target = r.field(section, path, "connect", _connect, default=None)
    auth = None
    if "auth" in section:
        auth = _auth(r, section["auth"][1], join(path, "auth"))
    tls = None
    if "tls" in section:
        t_path = join(path, "tls")
        t_node = section["tls"][1]
        got = r.mapping(
            t_node, t_path, what="TLS to the gateway ({} for the defaults)", allowed=_TLS_KEYS
        )
        if got is not None:
            ca_place = (
                place(r, got["ca_file"][1], join(t_path, "ca_file")) if "ca_file" in got else None
            )
            tls = GatewayTls(
                ca_file=r.field(got, t_path, "ca_file", fields.file_path, default=None),
                server_name=r.field(got, t_path, "server_name", fields.host_name, default=None),
                ca_place=ca_place,
            )
    if target is None or ("auth" in section and auth is None):
        return None
    host, port = target
    return Gateway(
        host=host,
        port=port,
        auth=auth,
        tls=tls,
        place=place(r, section["connect"][1], join(path, "connect")),
    )


def _connect(r: Reader, node: Node, path: str) -> tuple[str, int] | None:
    """``host:port``: a host name, an IPv4 address, or an IPv6 one in brackets."""
    text = r.text(node, path, what=f"the gateway's host:port, {_CONNECT_EXAMPLE}")
    if text is None:
        return None
    why = _connect_problem(text)
    if why is not None:
        r.problem(node, path, f"{text!r} is not a gateway address: {why}; {_CONNECT_EXAMPLE}")
        return None
    match = _HOST_PORT.fullmatch(text)
    assert match is not None
    host = match["v6"] if match["v6"] is not None else match["host"].lower().rstrip(".")
    return str(ipaddress.ip_address(host)) if match["v6"] is not None else host, int(match["port"])


def _connect_problem(text: str) -> str | None:
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        if "://" in text:
            return "give host:port without a scheme"
        if text.count(":") > 1 and not text.startswith("["):
            return "write an IPv6 address in brackets"
        return "expected host:port"
    port = match["port"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"the port {port!r} is not a number from 1 to 65535"
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            return f"{match['v6']!r} in brackets is not an IPv6 address"
        return None
    host = match["host"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        return "an unspecified address names no gateway" if address.is_unspecified else None
    if not host:
        return "the host is empty"
    if all(c.isdigit() or c == "." for c in host):
        return f"{host!r} is not an IPv4 address"
    return fields.host_name_problem(host)


def _auth(r: Reader, node: Node, path: str) -> GatewayAuth | None:
    section = r.mapping(node, path, what="proxy credentials for the gateway", allowed=_AUTH_KEYS)
    if section is None:
        return None
    r.require(
        node,
        path,
        section,
        {
            "username_file": "expected the path of the file holding the user name",
            "password_file": "expected the path of the file holding the password",
        },
    )
    username = r.field(section, path, "username_file", fields.file_path, default=None)
    password = r.field(section, path, "password_file", fields.file_path, default=None)
    if username is None or password is None:
        return None
    return GatewayAuth(
        username_file=username,
        password_file=password,
        places=(
            place(r, section["username_file"][1], join(path, "username_file")),
            place(r, section["password_file"][1], join(path, "password_file")),
        ),
    )


def route(
    r: Reader,
    rule: Fields,
    path: str,
    action: Action | None,
) -> tuple[SourceBinding | None, Gateway | None]:
    """An egress rule's ``source`` and ``via``: allowed flows only, and not
    with ``http`` (the HTTP relay dials its upstream servers itself)."""
    source: SourceBinding | None = None
    via: Gateway | None = None
    for key in ("source", "via"):
        if key not in rule:
            continue
        k_node, v_node = rule[key]
        k_path = join(path, key)
        if key == "source":
            source = source_binding(r, v_node, k_path)
        else:
            via = gateway(r, v_node, k_path)
        if action is not None and action is not Action.ALLOW:
            r.problem(
                k_node,
                k_path,
                f"{key} applies to allow rules only: a denied flow leaves from nowhere;"
                " remove it, or make the rule allow",
            )
        elif "http" in rule:
            r.problem(
                k_node,
                k_path,
                f"{key} is not supported on a rule with http: (its requests are sent by the"
                " HTTP relay from the node's own address): remove it, or drop http: from"
                " this rule",
            )
    return source, via
