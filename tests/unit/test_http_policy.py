"""The ``http:`` section of egress rules: loading, validation messages with
their positions, and what the decisions carry."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from egress_agent.agent.cli import main
from egress_agent.policy.decide import decide, needs_server_name
from egress_agent.policy.load import PolicyError, Problem, parse_policy
from egress_agent.policy.model import (
    Action,
    AzureSas,
    AzureSharedKey,
    Bearer,
    ClientTls,
    HeaderValue,
    HttpRule,
    Resolution,
    Upstream,
)

HEAD = """\
version: 1
workloads: {pg-main: {cidrs: [10.0.0.0/24]}}
egress:
  - name: backups-injected
    from: [pg-main]
    to: {hosts: [pgbackups.blob.core.windows.net], ports: [443, 80]}
    action: allow
"""

FULL = (
    HEAD
    + """\
    http:
      client_tls: {cert: /etc/egress/tls/blob.crt, key: /etc/egress/tls/blob.key}
      upstream:
        {tls: true, port: 443, ca_file: /etc/egress/ca.pem,
         server_name: PgBackups.blob.core.windows.net}
      set_headers:
        X-Team: {value: db}
        X-Api-Key: {file: /run/secrets/apikey}
        Authorization: {file: /run/secrets/token, format: "Bearer {}"}
      remove_headers: [X-Debug]
      auth:
        azure_sas: {file: /run/secrets/azure-sas}
default: deny
"""
)


def with_http(body: str, action: str = "allow") -> str:
    text = HEAD.replace("action: allow", f"action: {action}")
    return text + textwrap.indent(textwrap.dedent(body), "    ") + "default: deny\n"


def problems(text: str) -> list[Problem]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source_name="p.yaml")
    return list(info.value.problems)


def test_the_readme_example_loads() -> None:
    policy = parse_policy(FULL)
    rule = policy.egress[0].http
    assert rule == HttpRule(
        client_tls=ClientTls(cert="/etc/egress/tls/blob.crt", key="/etc/egress/tls/blob.key"),
        upstream=Upstream(
            tls=True,
            port=443,
            ca_file="/etc/egress/ca.pem",
            server_name="pgbackups.blob.core.windows.net",
        ),
        set_headers=(
            ("X-Team", HeaderValue(value="db")),
            ("X-Api-Key", HeaderValue(file="/run/secrets/apikey")),
            ("Authorization", HeaderValue(file="/run/secrets/token", format="Bearer {}")),
        ),
        remove_headers=("X-Debug",),
        auth=AzureSas(file="/run/secrets/azure-sas"),
    )
    hash(policy)  # the model stays hashable
    assert parse_policy(FULL) == policy


def test_upstream_tls_defaults_follow_client_tls() -> None:
    plain = parse_policy(with_http("http: {set_headers: {X-A: {value: b}}}\n"))
    assert plain.egress[0].http == HttpRule(
        upstream=Upstream(tls=False), set_headers=(("X-A", HeaderValue(value="b")),)
    )
    tls = parse_policy(with_http("http: {client_tls: {cert: /c, key: /k}}\n"))
    http = tls.egress[0].http
    assert http is not None and http.upstream == Upstream(tls=True)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("{bearer: {file: /t}}", Bearer(file="/t")),
        (
            "{azure_shared_key: {account: pgbackups, key_file: /k}}",
            AzureSharedKey(account="pgbackups", key_file="/k"),
        ),
    ],
)
def test_auth_kinds(auth: str, expected: object) -> None:
    policy = parse_policy(with_http(f"http: {{auth: {auth}}}\n"))
    http = policy.egress[0].http
    assert http is not None and http.auth == expected


@pytest.mark.parametrize(
    ("body", "line", "path", "words"),
    [
        ("http: {upstream: {port: 0}}\n", 8, "egress[0].http.upstream.port", "out of range"),
        (
            "http: {set_headers: {X-A: {value: a, file: /f}}}\n",
            8,
            "egress[0].http.set_headers.X-A",
            "exactly one of value",
        ),
        (
            'http: {set_headers: {X-A: {file: /f, format: "Bearer"}}}\n',
            8,
            "egress[0].http.set_headers.X-A.format",
            "exactly once",
        ),
        (
            "http: {set_headers: {Content-Length: {value: '1'}}}\n",
            8,
            "egress[0].http.set_headers.Content-Length",
            "managed by the proxy",
        ),
        (
            "http: {set_headers: {X-A: {value: a}, x-a: {value: b}}}\n",
            8,
            "egress[0].http.set_headers.x-a",
            "case-insensitive",
        ),
        (
            "http: {set_headers: {X-A: {value: a}}, remove_headers: [x-a]}\n",
            8,
            "egress[0].http.remove_headers[0]",
            "also in set_headers",
        ),
        (
            "http: {auth: {bearer: {file: /a}, azure_sas: {file: /b}}}\n",
            8,
            "egress[0].http.auth",
            "exactly one of",
        ),
        (
            "http: {auth: {bearer: {file: run/x}}}\n",
            8,
            "egress[0].http.auth.bearer.file",
            "absolute",
        ),
        (
            "http: {auth: {azure_shared_key: {account: Bad_Name, key_file: /k}}}\n",
            8,
            "egress[0].http.auth.azure_shared_key.account",
            "storage account name",
        ),
        (
            "http: {auth: {bearer: {file: /t}}, set_headers: {Authorization: {value: x}}}\n",
            8,
            "egress[0].http.auth",
            "keep one",
        ),
        ("http: {client_tls: {cert: /c}}\n", 8, "egress[0].http.client_tls.key", "missing"),
        ("http: {upstream: {tls: maybe}}\n", 8, "egress[0].http.upstream.tls", "true or false"),
        (
            "http: {upstream: {server_name: '*.x.org'}}\n",
            8,
            "egress[0].http.upstream.server_name",
            "not a host name",
        ),
        ("http: {bogus: 1}\n", 8, "egress[0].http.bogus", "unknown key"),
        (
            'http: {set_headers: {X-A: {value: "a\\nb"}}}\n',
            8,
            "egress[0].http.set_headers.X-A.value",
            "control characters",
        ),
    ],
)
def test_problems_are_located(body: str, line: int, path: str, words: str) -> None:
    (problem,) = problems(with_http(body))
    assert (problem.file, problem.line, problem.path) == ("p.yaml", line, path)
    assert words in problem.message


def test_http_needs_allow() -> None:
    (problem,) = problems(with_http("http: {set_headers: {X-A: {value: a}}}\n", action="deny"))
    assert problem.path == "egress[0].http" and "only applies to action allow" in problem.message


def test_missing_files_are_not_load_errors() -> None:
    # Secrets may be mounted after the policy loads; they are read per request.
    parse_policy(with_http("http: {auth: {bearer: {file: /nonexistent/token}}}\n"))


def test_verdict_carries_the_http_rule_and_the_proxy_peeks() -> None:
    policy = parse_policy(FULL)
    dst = ipaddress.ip_address("20.60.1.4")
    verdict = decide(
        policy,
        workload="pg-main",
        dst=dst,
        dst_port=80,
        server_name="pgbackups.blob.core.windows.net",
        resolved={"pgbackups.blob.core.windows.net": Resolution(addresses=frozenset({dst}))},
    )
    assert verdict.action is Action.ALLOW and verdict.http == policy.egress[0].http
    plain = parse_policy(
        HEAD.replace("to: {hosts: [pgbackups.blob.core.windows.net], ", "to: {")
        + "    http: {set_headers: {X-A: {value: a}}}\ndefault: deny\n"
    )
    assert needs_server_name(plain, workload="pg-main", dst=dst, dst_port=80)


def test_explain_says_what_the_proxy_injects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(FULL.replace("egress:", "intercept: [{from: [pg-main], ports: [80]}]\negress:"))
    args = ["explain", "--policy", str(path), "--from", "10.0.0.5", "--to", "20.60.1.4:80"]
    name = "pgbackups.blob.core.windows.net"
    assert main([*args, "--server-name", name, "--address", f"{name}=20.60.1.4"]) == 0
    out = capsys.readouterr().out
    assert "verdict:   allow (rule backups-injected)" in out
    assert "http:      client TLS terminated with /etc/egress/tls/blob.crt" in out
    assert (
        "http:      upstream TLS to port 443, verifying pgbackups.blob.core.windows.net"
        " with /etc/egress/ca.pem"
    ) in out
    assert "http:      set header X-Api-Key from /run/secrets/apikey" in out
    assert "http:      remove header X-Debug" in out
    assert "http:      auth: the client's SAS replaced by the one in /run/secrets/azure-sas" in out
