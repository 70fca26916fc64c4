"""Azure Storage SharedKey signing, checked against the Azure SDK's own
signing policy (azure-storage-blob) on generated requests.

Two inputs are kept out of the generated requests because the SDK differs
from the service documentation there and the proxy follows the service: the
SDK never signs a ``Range`` header (it sends ``x-ms-range``), and it signs a
``Date`` header even when ``x-ms-date`` is present (the documentation says the
Date line is then empty). Both are checked against the documented rules in
their own tests.
"""

from __future__ import annotations

import base64
import urllib.parse

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_agent.proxy import credentials

ACCOUNT = "pgbackups"
KEY = base64.b64encode(b"not a real account key, just 32+ bytes of it").decode()


def sdk_authorization(method: str, target: str, headers: list[tuple[str, str]]) -> str:
    request = HttpRequest(
        method, f"https://{ACCOUNT}.blob.core.windows.net{target}", headers=dict(headers)
    )
    SharedKeyCredentialPolicy(ACCOUNT, KEY).on_request(
        PipelineRequest(request, PipelineContext(None))
    )
    value: str = request.headers["Authorization"]
    return value


def our_authorization(method: str, target: str, headers: list[tuple[str, str]]) -> str:
    to_sign = credentials.azure_string_to_sign(
        method=method, target=target, headers=headers, account=ACCOUNT
    )
    signature = credentials.shared_key_signature(credentials.decode_account_key(KEY), to_sign)
    return f"SharedKey {ACCOUNT}:{signature}"


_segment = st.text(alphabet="abcXYZ019-._~", min_size=1, max_size=8)
_x_ms_name = st.text(alphabet="abcm1-", min_size=1, max_size=6).map(lambda s: "x-ms-" + s)
_value = st.text(alphabet="abc XYZ019-_.:/=+,;", min_size=0, max_size=12).map(str.strip)
_query_value = st.text(alphabet="abc XYZ019-_.:/=+&?é", max_size=8).map(
    lambda s: urllib.parse.quote(s, safe="")
)
_standard = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Content-MD5",
            "Content-Encoding",
            "Content-Language",
            "If-Match",
            "If-None-Match",
            "If-Modified-Since",
            "If-Unmodified-Since",
        ]
    ),
    _value.filter(bool),
    max_size=4,
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "HEAD", "DELETE", "POST"]),
    path=st.lists(_segment, min_size=0, max_size=3),
    query=st.dictionaries(st.text(alphabet="abcdekmp", min_size=1, max_size=6), _query_value,
                          max_size=4),
    x_ms=st.dictionaries(_x_ms_name, _value, max_size=5),
    standard=_standard,
    length=st.sampled_from([None, "0", "3", "1048576"]),
)  # fmt: skip
def test_signature_matches_the_sdk(
    method: str,
    path: list[str],
    query: dict[str, str],
    x_ms: dict[str, str],
    standard: dict[str, str],
    length: str | None,
) -> None:
    target = "/" + "/".join(path)
    if query:
        target += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    headers = [("x-ms-date", "Wed, 25 Nov 2026 10:00:00 GMT"), ("x-ms-version", "2021-08-06")]
    headers += [(k, v) for k, v in x_ms.items() if k not in ("x-ms-date", "x-ms-version")]
    headers += list(standard.items())
    if length is not None:
        headers.append(("Content-Length", length))
    assert our_authorization(method, target, headers) == sdk_authorization(method, target, headers)


def test_x_ms_headers_sort_like_the_service() -> None:
    # Hyphens only break ties: x-ms-metab sorts before x-ms-meta-c.
    headers = [("x-ms-meta-c", "1"), ("x-ms-metab", "2"), ("x-ms-date", "d")]
    text = credentials.azure_string_to_sign(method="GET", target="/c", headers=headers, account="a")
    assert text.index("x-ms-metab:") < text.index("x-ms-meta-c:")
    assert our_authorization("GET", "/c", headers) == sdk_authorization("GET", "/c", headers)


def test_documented_rules() -> None:
    text = credentials.azure_string_to_sign(
        method="PUT",
        target="/c/b?comp=block&blockid=YQ%3D%3D&COMP=x",
        headers=[
            ("Date", "Tue, 24 Nov 2026 10:00:00 GMT"),  # ignored: x-ms-date wins
            ("x-ms-date", "Wed, 25 Nov 2026 10:00:00 GMT"),
            ("Content-Length", "0"),  # signed as an empty line
            ("Range", "bytes=0-9"),
            ("x-ms-version", "2021-08-06"),
        ],
        account="acct",
    )
    assert text.split("\n") == [
        "PUT", "", "", "", "", "", "", "", "", "", "", "bytes=0-9",
        "x-ms-date:Wed, 25 Nov 2026 10:00:00 GMT",
        "x-ms-version:2021-08-06",
        "/acct/c/b",
        "blockid:YQ==",
        "comp:block,x",
    ]  # fmt: skip


def test_account_key_must_be_base64() -> None:
    with pytest.raises(ValueError, match="not base64") as info:
        credentials.decode_account_key("this is not base64!")
    assert "this is not" not in str(info.value)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.text("ab1-'", min_size=1, max_size=6), min_size=2, max_size=5, unique=True))
def test_x_ms_names_sort_like_the_sdk_where_hyphens_differ(suffixes: list[str]) -> None:
    """Names that differ only in where their hyphens and apostrophes are (e.g.
    x-ms-meta-a-b and x-ms-meta-ab) are the hard part of the service's order."""
    headers = [("x-ms-date", "Tue, 24 Nov 2026 10:00:00 GMT")]
    headers += [(f"x-ms-meta-{s}", str(i)) for i, s in enumerate(suffixes)]
    assert our_authorization("PUT", "/c/b", headers) == sdk_authorization("PUT", "/c/b", headers)
