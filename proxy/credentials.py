"""Credentials an ``http`` rule injects into each request it forwards.

One place for what a rule adds on the way: ``set_headers`` values (literal or
read from a file), an Azure Storage SAS that replaces the client's, an Azure
Storage SharedKey signature, a bearer token. :func:`forward_head` turns a
request head and its rule into the head to send upstream.

Everything here is pure: secrets come in through a ``secret(path) -> text``
callable (the relay passes its file cache, which raises
:class:`~egress_agent.proxy.secretfiles.SecretError`), and the clock through
``now``. A problem with a secret is a ``SecretError`` naming the file and
never its content, for the error page and the log.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from egress_agent.policy.model import AzureSas, AzureSharedKey, Bearer, HttpRule
from egress_agent.proxy.httpmessage import (
    Header,
    RequestHead,
    build_request_head,
    origin_form,
    serialize_request,
)
from egress_agent.proxy.secretfiles import SecretError

__all__ = [
    "AZURE_SAS_PARAMETERS",
    "AZURE_VERSION",
    "append_query",
    "azure_string_to_sign",
    "decode_account_key",
    "forward_head",
    "sas_parameter_names",
    "shared_key_signature",
    "strip_query_parameters",
]


# x-ms-version the proxy adds to a SharedKey-signed request that has none;
# every Blob operation barman and the SDKs use exists in it.
AZURE_VERSION = "2021-08-06"


def forward_head(
    head: RequestHead, rule: HttpRule, *, secret: Callable[[str], str], now: float
) -> bytes:
    """The request head to send upstream for ``rule``: origin-form target
    (an origin server is sent origin-form, RFC 9112 section 3.2.1), hop-by-hop
    and removed headers dropped, set headers and credentials added.

    ``secret`` reads a secret file's text; ``now`` (seconds since the epoch)
    dates a SharedKey-signed request. Raises ``SecretError`` for a missing,
    unreadable or unusable secret."""
    target = origin_form(head.target)
    set_headers: list[tuple[str, str]] = []
    for name, value in rule.set_headers:
        if value.file is not None:
            set_headers.append((name, value.format.replace("{}", secret(value.file))))
        else:
            assert value.value is not None
            set_headers.append((name, value.value))
    auth = rule.auth
    remove = list(rule.remove_headers)
    if isinstance(auth, AzureSas | AzureSharedKey):
        target = strip_query_parameters(target, AZURE_SAS_PARAMETERS)
    if isinstance(auth, AzureSas):
        sas = secret(auth.file).lstrip("?")
        target = strip_query_parameters(target, sas_parameter_names(sas))
        target = append_query(target, sas)
    elif isinstance(auth, Bearer):
        set_headers.append(("Authorization", "Bearer " + secret(auth.file)))
    elif isinstance(auth, AzureSharedKey):
        remove.append("Authorization")
    headers = build_request_head(head, set_headers=set_headers, remove_headers=remove)
    if isinstance(auth, AzureSharedKey):
        _sign(head.method, target, headers, auth, secret=secret, now=now)
    return serialize_request(head.method, target, headers, close=False)


# ---------------------------------------------------------------- Azure SAS

# Query parameters that make up an Azure Storage SAS (service, account and
# user delegation SAS; "Create a service SAS" and "Create a user delegation
# SAS" in the Storage REST reference). Azure refuses a request that carries
# one twice, so a client's are removed before the proxy's SAS is appended.
AZURE_SAS_PARAMETERS = frozenset(
    (
        "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "sig", "si", "sr", "sdd",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
        "sduoid", "skdutid", "ses", "rscc", "rscd", "rsce", "rscl", "rsct",
    )
)  # fmt: skip


def strip_query_parameters(target: str, names: Iterable[str]) -> str:
    """``target`` without the query parameters called ``names``
    (case-insensitive, compared after percent-decoding the name)."""
    path, sep, rest = target.partition("?")
    if not sep:
        return target
    query, hash_, fragment = rest.partition("#")
    drop = {n.lower() for n in names}
    kept = [
        p
        for p in query.split("&")
        if p and urllib.parse.unquote(p.partition("=")[0]).lower() not in drop
    ]
    out = path + ("?" + "&".join(kept) if kept else "")
    return out + (hash_ + fragment if hash_ else "")


def append_query(target: str, query: str) -> str:
    query = query.lstrip("?&")
    if not query:
        return target
    path, hash_, fragment = target.partition("#")
    joiner = "&" if "?" in path else "?"
    if path.endswith(("?", "&")):
        joiner = ""
    return path + joiner + query + (hash_ + fragment if hash_ else "")


def sas_parameter_names(sas: str) -> set[str]:
    """The parameter names of a SAS token (``sv=...&sig=...``)."""
    return {
        urllib.parse.unquote(p.partition("=")[0]).lower() for p in sas.lstrip("?").split("&") if p
    }


# ---------------------------------------------------------------- Azure SharedKey


def _sign(
    method: str,
    target: str,
    headers: list[Header],
    auth: AzureSharedKey,
    *,
    secret: Callable[[str], str],
    now: float,
) -> None:
    """Add ``x-ms-date`` and ``x-ms-version`` where missing, then the
    SharedKey ``Authorization`` over the headers as they will be sent."""
    names = {n.lower() for n, _ in headers}
    if b"x-ms-date" not in names:
        headers.append((b"x-ms-date", email.utils.formatdate(now, usegmt=True).encode("ascii")))
    if b"x-ms-version" not in names:
        headers.append((b"x-ms-version", AZURE_VERSION.encode("ascii")))
    text = secret(auth.key_file)
    try:
        key = decode_account_key(text)
    except ValueError as exc:
        raise SecretError(auth.key_file, str(exc)) from None
    text_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    to_sign = azure_string_to_sign(
        method=method, target=target, headers=text_headers, account=auth.account
    )
    signature = shared_key_signature(key, to_sign)
    headers.append((b"Authorization", f"SharedKey {auth.account}:{signature}".encode()))


# The standard headers in the order the string-to-sign lists them
# ("Authorize with Shared Key", Blob/Queue/File services, version 2009-09-19+).
_SIGNED_STANDARD = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)
# Azure sorts x-ms-* names the way .NET's invariant culture compares strings:
# hyphens and apostrophes are ignored at first and only break ties (by their
# positions, see _x_ms_sort_key), and
# punctuation sorts before digits before letters. Plain ASCII order differs,
# e.g. for x-ms-meta-c vs x-ms-metab, and a wrong order is a 403.
_PRIMARY_ORDER = "!#$%&*.^_`|~+0123456789abcdefghijklmnopqrstuvwxyz"
_IGNORED_FIRST = "'-"


def _x_ms_sort_key(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    primary = tuple(
        _PRIMARY_ORDER.find(c) if c in _PRIMARY_ORDER else 100 + ord(c)
        for c in name
        if c not in _IGNORED_FIRST
    )
    # The tie-break walks both names in step: at the first place where one
    # has a hyphen or apostrophe and the other a regular character, the
    # regular character comes first; an apostrophe comes before a hyphen; a
    # name that ends there comes first.
    secondary = tuple(_IGNORED_FIRST.index(c) + 1 if c in _IGNORED_FIRST else 0 for c in name)
    return primary, secondary


def azure_string_to_sign(
    *, method: str, target: str, headers: Sequence[tuple[str, str]], account: str
) -> str:
    """The Shared Key string-to-sign for a Blob, Queue or File request.

    ``headers`` are (name, value) as they will be sent; ``target`` is the
    request-target (origin- or absolute-form). Content-Length 0 signs as an
    empty line (version 2015-02-21 and later); the Date line is empty when
    ``x-ms-date`` is present, which the proxy always sends.
    """
    by_name: dict[str, list[str]] = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), []).append(value.strip())
    standard = {n: ",".join(v) for n, v in by_name.items()}
    if standard.get("content-length") == "0":
        standard["content-length"] = ""
    if "x-ms-date" in standard:
        standard["date"] = ""
    lines = [method] + [standard.get(n, "") for n in _SIGNED_STANDARD]
    x_ms = sorted((n for n in by_name if n.startswith("x-ms-")), key=_x_ms_sort_key)
    canonical_headers = "".join(f"{n}:{','.join(by_name[n])}\n" for n in x_ms)
    return "\n".join(lines) + "\n" + canonical_headers + _canonical_resource(account, target)


def _canonical_resource(account: str, target: str) -> str:
    path, _, query = origin_form(target).partition("#")[0].partition("?")
    params: dict[str, list[str]] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        key = urllib.parse.unquote(name).lower()
        params.setdefault(key, []).append(urllib.parse.unquote(value))
    resource = f"/{account}{path or '/'}"
    for name in sorted(params):
        resource += f"\n{name}:{','.join(sorted(params[name]))}"
    return resource


def shared_key_signature(key: bytes, string_to_sign: str) -> str:
    """Base64 HMAC-SHA256 of the string-to-sign with the (decoded) account key."""
    digest = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def decode_account_key(text: str) -> bytes:
    """The account key file's content (base64) as bytes; ValueError if it is not base64."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the account key is not base64") from None
