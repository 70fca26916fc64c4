"""``connect:``, the explicit HTTP CONNECT listener for clients configured to
use a proxy, and the proxy credentials each workload must present to it."""

from __future__ import annotations

import os

from yaml.nodes import Node

from egress_agent.policy import fields
from egress_agent.policy.model import ConnectSettings, ProxyAuth, ProxySettings
from egress_agent.policy.sections.workloads import Known, is_known
from egress_agent.policy.yamlnodes import Reader, join

_CONNECT_KEYS = ("port", "auth")
_PROXY_AUTH_KEYS = ("users_file", "username", "password_file")


def connect(
    r: Reader, node: Node, path: str, known: Known, proxy: ProxySettings
) -> ConnectSettings | None:
    """``connect: {port, auth: {workload: {users_file} | {username, password_file}}}``."""
    section = r.mapping(node, path, what="CONNECT listener settings", allowed=_CONNECT_KEYS)
    if section is None:
        return None
    r.require(node, path, section, {"port": "expected the CONNECT listener's TCP port, e.g. 3128"})
    port = r.field(section, path, "port", fields.port, default=None)
    if port is not None and port == proxy.port:
        r.problem(
            section["port"][1],
            join(path, "port"),
            f"port {port} is also proxy.port: the CONNECT listener needs a port of"
            " its own (3128 is the usual one)",
        )
        port = None
    auth: list[tuple[str, ProxyAuth]] = []
    if "auth" in section:
        a_path = join(path, "auth")
        entries = r.entries(
            section["auth"][1], a_path, what="a mapping of workload name to proxy credentials"
        )
        for name, key_node, value_node in entries or ():
            if not is_known(r, key_node, join(a_path, name), name, known):
                continue
            got = _proxy_auth(r, value_node, join(a_path, name))
            if got is not None:
                auth.append((name, got))
    if port is None:
        return None
    return ConnectSettings(port=port, auth=tuple(auth))


def _proxy_auth(r: Reader, node: Node, path: str) -> ProxyAuth | None:
    given = r.mapping(node, path, what="proxy credentials", allowed=_PROXY_AUTH_KEYS)
    if given is None:
        return None
    shape = (
        "give either {users_file: /path} (lines of name:password) or"
        " {username: name, password_file: /path}"
    )
    has_users = "users_file" in given
    has_single = "username" in given or "password_file" in given
    if has_users == has_single or (
        has_single and not ("username" in given and "password_file" in given)
    ):
        r.problem(node, path, f"incomplete or mixed proxy credentials: {shape}")
        return None
    values: dict[str, str] = {}
    for key, (_key_node, value_node) in given.items():
        k_path = join(path, key)
        text = r.text(value_node, k_path, what="a user name" if key == "username" else "a path")
        if text is None:
            continue
        if key == "username":
            if not text or ":" in text or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
                r.problem(
                    value_node,
                    k_path,
                    "a proxy user name must be non-empty, without ':', spaces or control"
                    " characters (Basic authentication splits at the first ':')",
                )
                continue
        elif not os.path.isabs(text):
            r.problem(
                value_node,
                k_path,
                f"{text!r} is not an absolute path: give the file's full path, e.g."
                " /etc/egress-agent/connect-users",
            )
            continue
        values[key] = text
    if len(values) != len(given):
        return None
    return ProxyAuth(
        users_file=values.get("users_file"),
        username=values.get("username"),
        password_file=values.get("password_file"),
    )
