"""Credentials an http rule injects: the Azure SAS query rewriting, and the
whole request head forwarded for each kind of credential (set headers from
files, SAS, SharedKey, bearer), with secrets handed in as a mapping -- the
injection is pure, so it is tested without files or sockets. SharedKey's
string-to-sign itself is checked against the Azure SDK in test_shared_key."""

from __future__ import annotations

import base64
import email.utils
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egress_agent.policy.model import AzureSas, AzureSharedKey, Bearer, HeaderValue, HttpRule
from egress_agent.proxy import credentials, httpmessage
from egress_agent.proxy.secretfiles import SecretError

NOW = 1_800_000_000.0
KEY = base64.b64encode(b"not a real account key, just 32+ bytes of it").decode()


def head(
    *lines: bytes, start: bytes = b"PUT /c/b?sig=client&comp=block HTTP/1.1"
) -> httpmessage.RequestHead:
    parsed = httpmessage.parse_request(b"\r\n".join([start, *lines]) + b"\r\n\r\n")
    assert parsed is not None
    return parsed[0]


def secrets(files: dict[str, str]) -> Callable[[str], str]:
    def read(path: str) -> str:
        if path not in files:
            raise SecretError(path, "no such file")
        return files[path]

    return read


def lines(forwarded: bytes) -> list[bytes]:
    assert forwarded.endswith(b"\r\n\r\n")
    return forwarded[:-4].split(b"\r\n")


# ---------------------------------------------------------------- SAS query


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/c/b?sv=1&sig=x&comp=list", "/c/b?comp=list"),
        ("/c/b?SIG=x", "/c/b"),
        ("/c/b?si%67=x&comp=block", "/c/b?comp=block"),
        ("/c/b", "/c/b"),
        ("/c/b?", "/c/b"),
        ("/c/b?comp=list&&restype=container", "/c/b?comp=list&restype=container"),
    ],
)
def test_strip_sas(target: str, expected: str) -> None:
    assert credentials.strip_query_parameters(target, credentials.AZURE_SAS_PARAMETERS) == expected


@pytest.mark.parametrize(
    ("target", "query", "expected"),
    [
        ("/c", "sv=1&sig=2", "/c?sv=1&sig=2"),
        ("/c?comp=list", "?sv=1", "/c?comp=list&sv=1"),
        ("/c", "", "/c"),
    ],
)
def test_append_query(target: str, query: str, expected: str) -> None:
    assert credentials.append_query(target, query) == expected


@given(
    params=st.lists(
        st.tuples(
            st.sampled_from(["sv", "sig", "se", "comp", "restype", "blockid", "SP", "x"]),
            st.text(alphabet="abc123%=", max_size=5),
        ),
        max_size=8,
    )
)
def test_sas_injection_leaves_exactly_one_of_each(params: list[tuple[str, str]]) -> None:
    target = "/c/b" + ("?" + "&".join(f"{n}={v}" for n, v in params) if params else "")
    sas = "sv=2022-11-02&sp=rw&sig=abc%2B"
    out = credentials.strip_query_parameters(target, credentials.AZURE_SAS_PARAMETERS)
    out = credentials.append_query(out, sas)
    names = [p.partition("=")[0].lower() for p in out.partition("?")[2].split("&")]
    for name in ("sv", "sp", "sig", "se"):
        assert names.count(name) == (1 if name in ("sv", "sp", "sig") else 0)
    kept = [n.lower() for n, _ in params if n.lower() not in credentials.AZURE_SAS_PARAMETERS]
    assert [n for n in names if n not in ("sv", "sp", "sig")] == kept
    assert out.endswith(sas)


# ---------------------------------------------------------------- forwarded heads


def test_plain_rule_sends_origin_form_and_applies_header_operations() -> None:
    rule = HttpRule(
        set_headers=(
            ("X-Team", HeaderValue(value="db")),
            ("X-Api-Key", HeaderValue(file="/s/api", format="key={}")),
        ),
        remove_headers=("X-Drop",),
    )
    got = credentials.forward_head(
        head(b"Host: a.example", b"X-Drop: 1", b"X-Team: web", b"Connection: keep-alive",
             start=b"GET http://a.example/p?q=1 HTTP/1.1"),
        rule,
        secret=secrets({"/s/api": "s3cret"}),
        now=NOW,
    )  # fmt: skip
    assert lines(got) == [
        b"GET /p?q=1 HTTP/1.1",
        b"Host: a.example",
        b"X-Team: db",
        b"X-Api-Key: key=s3cret",
    ]


def test_bearer_replaces_the_clients_authorization() -> None:
    rule = HttpRule(auth=Bearer(file="/s/token"), remove_headers=("Authorization",))
    got = credentials.forward_head(
        head(b"Host: a", b"Authorization: Bearer theirs"),
        rule,
        secret=secrets({"/s/token": "ours"}),
        now=NOW,
    )
    assert [x for x in lines(got) if x.lower().startswith(b"authorization")] == [
        b"Authorization: Bearer ours"
    ]


def test_sas_replaces_the_clients_sas_and_keeps_other_parameters() -> None:
    rule = HttpRule(auth=AzureSas(file="/s/sas"))
    got = credentials.forward_head(
        head(b"Host: acct.blob.core.windows.net"),
        rule,
        secret=secrets({"/s/sas": "?sv=2022-11-02&sp=rw&sig=ours"}),
        now=NOW,
    )
    assert lines(got)[0] == b"PUT /c/b?comp=block&sv=2022-11-02&sp=rw&sig=ours HTTP/1.1"


def test_shared_key_signs_what_is_sent() -> None:
    rule = HttpRule(auth=AzureSharedKey(account="acct", key_file="/s/key"))
    got = credentials.forward_head(
        head(b"Host: acct.blob.core.windows.net", b"Authorization: Bearer theirs",
             b"Content-Length: 0"),
        rule,
        secret=secrets({"/s/key": KEY}),
        now=NOW,
    )  # fmt: skip
    sent = lines(got)
    assert sent[0] == b"PUT /c/b?comp=block HTTP/1.1"  # the client's SAS is gone
    fields = [tuple(x.split(b": ", 1)) for x in sent[1:]]
    assert (b"x-ms-date", email.utils.formatdate(NOW, usegmt=True).encode()) in fields
    assert (b"x-ms-version", credentials.AZURE_VERSION.encode()) in fields
    auth = [v for n, v in fields if n.lower() == b"authorization"]
    signed = [(n.decode(), v.decode()) for n, v in fields if n.lower() != b"authorization"]
    to_sign = credentials.azure_string_to_sign(
        method="PUT", target="/c/b?comp=block", headers=signed, account="acct"
    )
    signature = credentials.shared_key_signature(credentials.decode_account_key(KEY), to_sign)
    assert auth == [f"SharedKey acct:{signature}".encode()]


def test_shared_key_keeps_the_clients_date_and_version() -> None:
    rule = HttpRule(auth=AzureSharedKey(account="acct", key_file="/s/key"))
    got = credentials.forward_head(
        head(b"Host: a", b"x-ms-date: Mon, 01 Jan 2024 00:00:00 GMT", b"x-ms-version: 2020-04-08"),
        rule,
        secret=secrets({"/s/key": KEY}),
        now=NOW,
    )
    names = [x.split(b":", 1)[0].lower() for x in lines(got)[1:]]
    assert names.count(b"x-ms-date") == 1 and names.count(b"x-ms-version") == 1
    assert b"x-ms-version: 2020-04-08" in lines(got)


@pytest.mark.parametrize(
    ("rule", "files", "problem"),
    [
        (HttpRule(auth=Bearer(file="/s/token")), {}, "/s/token: no such file"),
        (HttpRule(auth=AzureSas(file="/s/sas")), {}, "/s/sas: no such file"),
        (
            HttpRule(set_headers=(("X-Key", HeaderValue(file="/s/h")),)),
            {},
            "/s/h: no such file",
        ),
        (
            HttpRule(auth=AzureSharedKey(account="a", key_file="/s/key")),
            {"/s/key": "not base64!"},
            "/s/key: the account key is not base64",
        ),
    ],
)
def test_secret_problems_name_the_file_and_never_the_content(
    rule: HttpRule, files: dict[str, str], problem: str
) -> None:
    with pytest.raises(SecretError) as caught:
        credentials.forward_head(head(b"Host: a"), rule, secret=secrets(files), now=NOW)
    assert str(caught.value) == problem
