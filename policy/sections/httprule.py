"""An allow rule's ``http:`` section: TLS towards the client, the upstream
connection, headers to set and remove, and the credential the proxy adds
(Azure SAS, Azure SharedKey, bearer token)."""

from __future__ import annotations

import re

from yaml.nodes import Node

from egress_agent.policy import fields
from egress_agent.policy.model import (
    Auth,
    AzureSas,
    AzureSharedKey,
    Bearer,
    ClientTls,
    HeaderValue,
    HttpRule,
    Upstream,
)
from egress_agent.policy.yamlnodes import Reader, join, line_of

_HTTP_KEYS = ("client_tls", "upstream", "set_headers", "remove_headers", "auth")
_CLIENT_TLS_KEYS = ("cert", "key")
_UPSTREAM_KEYS = ("tls", "port", "ca_file", "server_name")
_HEADER_VALUE_KEYS = ("value", "file", "format")
_AUTH_KEYS = ("azure_sas", "azure_shared_key", "bearer")
_FILE_KEYS = ("file",)
_SHARED_KEY_KEYS = ("account", "key_file")
# Headers that frame the message or the connection: the proxy owns them, a
# rule may neither set nor remove them (RFC 9110 section 7.6.1, RFC 9112 section 6).
_FRAMING_HEADERS = frozenset(
    (
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    )
)
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_account = fields.text_like(
    re.compile(r"[a-z0-9]{3,24}"),
    what="an account name",
    kind="a storage account name",
    rule="3-24 lower-case letters and digits",
)


def http_rule(r: Reader, node: Node, path: str) -> HttpRule | None:
    section = r.mapping(node, path, what="an http section", allowed=_HTTP_KEYS)
    if section is None:
        return None
    client_tls = r.field(section, path, "client_tls", _client_tls, default=None)
    upstream = _upstream(
        r,
        section["upstream"][1] if "upstream" in section else None,
        join(path, "upstream"),
        tls_default=client_tls is not None,
    )
    set_headers: tuple[tuple[str, HeaderValue], ...] = r.field(
        section, path, "set_headers", _set_headers, default=()
    )
    remove: tuple[str, ...] = ()
    if "remove_headers" in section:
        remove = _remove_headers(
            r, section["remove_headers"][1], join(path, "remove_headers"), set_headers
        )
    auth: Auth | None = None
    if "auth" in section:
        auth = _auth(r, section["auth"][1], join(path, "auth"))
        names = {n.lower(): n for n, _ in set_headers}
        if isinstance(auth, AzureSharedKey | Bearer) and "authorization" in names:
            r.problem(
                section["auth"][0],
                join(path, "auth"),
                f"auth sets the Authorization header, and so does set_headers"
                f".{names['authorization']}: keep one of them",
            )
    return HttpRule(
        client_tls=client_tls,
        upstream=upstream,
        set_headers=set_headers,
        remove_headers=remove,
        auth=auth,
    )


def _client_tls(r: Reader, node: Node, path: str) -> ClientTls | None:
    tls = r.mapping(node, path, what="client TLS settings {cert, key}", allowed=_CLIENT_TLS_KEYS)
    if tls is None:
        return None
    r.require(
        node,
        path,
        tls,
        {key: f"expected the path of a PEM {key} file" for key in _CLIENT_TLS_KEYS},
    )
    cert_path = r.field(tls, path, "cert", fields.file_path, default=None)
    key_path = r.field(tls, path, "key", fields.file_path, default=None)
    if cert_path is None or key_path is None:
        return None
    return ClientTls(cert=cert_path, key=key_path)


def _upstream(r: Reader, node: Node | None, path: str, *, tls_default: bool) -> Upstream:
    if node is None:
        return Upstream(tls=tls_default)
    upstream = r.mapping(node, path, what="upstream settings", allowed=_UPSTREAM_KEYS)
    if upstream is None:
        return Upstream(tls=tls_default)
    tls = tls_default
    if "tls" in upstream:
        tls = fields.boolean(r, upstream["tls"][1], join(path, "tls"), default=tls_default)
    return Upstream(
        tls=tls,
        port=r.field(upstream, path, "port", fields.port, default=None),
        ca_file=r.field(upstream, path, "ca_file", fields.file_path, default=None),
        server_name=r.field(upstream, path, "server_name", fields.host_name, default=None),
    )


def _set_headers(r: Reader, node: Node, path: str) -> tuple[tuple[str, HeaderValue], ...]:
    entries = r.entries(node, path, what="headers to set (name: {value|file: ...})")
    result: list[tuple[str, HeaderValue]] = []
    seen: dict[str, Node] = {}
    for name, key_node, value_node in entries or ():
        n_path = join(path, name)
        if not _header_name(r, key_node, n_path, name):
            continue
        lower = name.lower()
        if lower in seen:
            r.problem(
                key_node,
                n_path,
                f"header {name!r} is already set at line {line_of(seen[lower])}"
                " (header names are case-insensitive): keep one",
            )
            continue
        seen[lower] = key_node
        value = _header_value(r, value_node, n_path)
        if value is not None:
            result.append((name, value))
    return tuple(result)


def _header_value(r: Reader, node: Node, path: str) -> HeaderValue | None:
    header = r.mapping(
        node,
        path,
        what="a header value {value: ...} or {file: ...}",
        allowed=_HEADER_VALUE_KEYS,
    )
    if header is None:
        return None
    if ("value" in header) == ("file" in header):
        r.problem(
            node,
            path,
            "give exactly one of value (the text itself) or file (a file whose content"
            " is the value, re-read when it changes)",
        )
        return None
    fmt = "{}"
    if "format" in header:
        f_node = header["format"][1]
        f_path = join(path, "format")
        got = r.text(f_node, f_path, what='a format like "Bearer {}"')
        if got is not None:
            if "file" not in header:
                r.problem(f_node, f_path, "format applies to file values only")
            elif got.count("{}") != 1:
                r.problem(
                    f_node,
                    f_path,
                    f"{got!r} must contain {{}} exactly once, where the file content goes"
                    ' (like "Bearer {}")',
                )
            elif not _header_text_ok(got.replace("{}", "")):
                r.problem(f_node, f_path, "control characters are not allowed in headers")
            else:
                fmt = got
    if "value" in header:
        v_node = header["value"][1]
        v_path = join(path, "value")
        text = r.text(v_node, v_path, what="the header value as a string")
        if text is None:
            return None
        if not _header_text_ok(text):
            r.problem(
                v_node,
                v_path,
                "control characters (newlines, tabs aside) are not allowed in a header value",
            )
            return None
        return HeaderValue(value=text.strip(" \t"))
    file = fields.file_path(r, header["file"][1], join(path, "file"))
    if file is None:
        return None
    return HeaderValue(file=file, format=fmt)


def _remove_headers(
    r: Reader, node: Node, path: str, set_headers: tuple[tuple[str, HeaderValue], ...]
) -> tuple[str, ...]:
    set_names = {n.lower() for n, _ in set_headers}

    def removable(r: Reader, item: Node, i_path: str) -> str | None:
        name = r.text(item, i_path, what="a header name")
        if name is None or not _header_name(r, item, i_path, name):
            return None
        if name.lower() in set_names:
            r.problem(
                item,
                i_path,
                f"header {name!r} is also in set_headers, which replaces it anyway:"
                " remove it from one of the two",
            )
            return None
        return name

    return tuple(r.items(node, path, what="a list of header names", read=removable))


def _header_name(r: Reader, node: Node, path: str, name: str) -> bool:
    if not _HEADER_NAME_RE.fullmatch(name):
        r.problem(node, path, f"{name!r} is not a header name: expected a token like X-Api-Key")
        return False
    if name.lower() in _FRAMING_HEADERS:
        r.problem(
            node,
            path,
            f"{name!r} frames the message or the connection and is managed by the proxy:"
            " a rule cannot set or remove it",
        )
        return False
    return True


def _header_text_ok(text: str) -> bool:
    """Visible characters, spaces and tabs: nothing that could end a header line."""
    return all(c in " \t" or (ord(c) >= 0x20 and ord(c) != 0x7F) for c in text)


def _auth(r: Reader, node: Node, path: str) -> Auth | None:
    section = r.mapping(node, path, what="an auth section", allowed=_AUTH_KEYS)
    if section is None:
        return None
    if len(section) != 1:
        r.problem(node, path, "give exactly one of azure_sas, azure_shared_key or bearer")
        return None
    ((key, (_key_node, value_node)),) = section.items()
    a_path = join(path, key)
    if key == "azure_shared_key":
        return _shared_key(r, value_node, a_path)
    f = r.mapping(value_node, a_path, what="{file: PATH}", allowed=_FILE_KEYS)
    if f is None:
        return None
    r.require(value_node, a_path, f, {"file": "the file holding the credential"})
    file = r.field(f, a_path, "file", fields.file_path, default=None)
    if file is None:
        return None
    return AzureSas(file=file) if key == "azure_sas" else Bearer(file=file)


def _shared_key(r: Reader, node: Node, path: str) -> AzureSharedKey | None:
    sk = r.mapping(node, path, what="{account, key_file}", allowed=_SHARED_KEY_KEYS)
    if sk is None:
        return None
    r.require(
        node,
        path,
        sk,
        {"account": "the storage account name", "key_file": "the file holding the account key"},
    )
    account = r.field(sk, path, "account", _account, default=None)
    key_file = r.field(sk, path, "key_file", fields.file_path, default=None)
    if account is None or key_file is None:
        return None
    return AzureSharedKey(account=account, key_file=key_file)
