"""The lab's Azure helpers that tests rely on to tell who talked to Azure:
the access-log parser and the shape of the SAS tokens it makes."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import parse_qs

from tests.lab.azurite import Account, account_sas, parse_access_log

ACCOUNT = Account(
    name="pgbackups",
    key1=base64.b64encode(b"k" * 64).decode(),
    key2=base64.b64encode(b"j" * 64).decode(),
)


def test_access_log_lines_give_client_method_path_and_status() -> None:
    requests = parse_access_log(
        "Azurite Blob service is starting on 0.0.0.0:443\n"
        '198.18.1.1 - - [25/Nov/2026:11:38:44 +0000] "PUT /backups/pg-main/wals/0000000100000000/'
        '000000010000000000000003?sv=2021-08-06&sig=SECRET HTTP/1.1" 201 0\n'
        '::ffff:198.19.3.2 - - [25/Nov/2026:11:38:45 +0000] "GET /registry?restype=container '
        'HTTP/1.1" 404 -\n'
    )
    assert [(r.client_ip, r.method, r.path, r.status) for r in requests] == [
        ("198.18.1.1", "PUT", "/backups/pg-main/wals/0000000100000000/000000010000000000000003",
         201),
        ("198.19.3.2", "GET", "/registry", 404),
    ]  # fmt: skip
    assert all("SECRET" not in r.path for r in requests)


def test_account_sas_signs_the_documented_fields_with_the_chosen_key() -> None:
    expiry = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    sas = account_sas(ACCOUNT, key=ACCOUNT.key2, permissions="rl", expiry=expiry)
    fields = {k: v[0] for k, v in parse_qs(sas).items()}
    assert fields["sp"] == "rl" and fields["se"] == "2030-01-02T03:04:05Z"
    assert fields["ss"] == "b" and fields["srt"] == "sco" and fields["spr"] == "https"
    to_sign = f"pgbackups\nrl\nb\nsco\n\n2030-01-02T03:04:05Z\n\nhttps\n{fields['sv']}\n\n"
    mac = hmac.new(base64.b64decode(ACCOUNT.key2), to_sign.encode(), hashlib.sha256)
    assert fields["sig"] == base64.b64encode(mac.digest()).decode()
    assert account_sas(ACCOUNT, expiry=expiry) != account_sas(ACCOUNT, key=ACCOUNT.key2,
                                                              expiry=expiry)  # fmt: skip
