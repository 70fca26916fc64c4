"""Azure Blob Storage for the lab: Azurite in an external namespace, over HTTPS.

The end-to-end scenario needs the real thing a backup tool talks to: the Blob
REST API with SharedKey and SAS authentication, served as
``<account>.blob.core.windows.net:443`` with a certificate from the lab CA.
Azurite (Microsoft's emulator, npm ``azurite``) is that; ``./run test``
installs it under ``/opt/egress-agent-test`` (see ``setup_e2e`` in ``run``).

Its access log (one line per request, the client address first) is how a test
tells whose address Azure saw: the proxy's (diverted) or the pod's own
(direct). SAS tokens are made here from the account key, as Azure's
documentation specifies the signature, so tests need no Azure SDK.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab
    from egress_agent.lab.tls import ServerCert

AZURITE_VERSION = "3.35.0"  # keep equal to azurite_version in ./run
TOOLS_DIR = Path(os.environ.get("EGRESS_AGENT_TEST_TOOLS", "/opt/egress-agent-test"))
BLOB_DOMAIN = "blob.core.windows.net"
# The signed version of the SAS tokens made here: the string to sign below is
# the one for versions 2020-12-06 and later (account SAS).
SAS_VERSION = "2021-08-06"

# morgan's "common" format: ':remote-addr - :remote-user [:date] ":method :url
# HTTP/:version" :status :length'.
_ACCESS_RE = re.compile(
    r'^(?P<ip>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>\S+) (?P<url>\S+) [^"]*" '
    r"(?P<status>\d{3}) "
)


def azurite_blob_bin() -> Path:
    """The installed ``azurite-blob``; says how to install it when missing."""
    path = TOOLS_DIR / f"azurite-{AZURITE_VERSION}" / "node_modules" / ".bin" / "azurite-blob"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run 'sudo ./run test' once (its set-up installs "
            f"azurite {AZURITE_VERSION} from npm)"
        )
    return path


@dataclass(frozen=True, kw_only=True)
class Account:
    """A storage account with its two keys (base64, like Azure shows them)."""

    name: str
    key1: str
    key2: str

    @property
    def host(self) -> str:
        return f"{self.name}.{BLOB_DOMAIN}"


def new_account(name: str) -> Account:
    return Account(
        name=name,
        key1=base64.b64encode(secrets.token_bytes(64)).decode(),
        key2=base64.b64encode(secrets.token_bytes(64)).decode(),
    )


def account_sas(
    account: Account,
    *,
    key: str | None = None,
    permissions: str = "rwdlac",
    expiry: datetime | None = None,
) -> str:
    """An account SAS for the blob service (query string without '?').

    The string to sign is the one for signed version 2020-12-06 and later
    ("Create an account SAS", Azure Storage REST documentation): account,
    permissions, services, resource types, start, expiry, IP, protocol,
    version, encryption scope, each followed by a newline.
    """
    if expiry is None:
        expiry = datetime.now(UTC) + timedelta(hours=2)
    se = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = {"sv": SAS_VERSION, "ss": "b", "srt": "sco", "sp": permissions, "se": se,
              "spr": "https"}  # fmt: skip
    to_sign = "\n".join([account.name, permissions, "b", "sco", "", se, "", "https",
                         SAS_VERSION, "", ""])  # fmt: skip
    digest = hmac.new(base64.b64decode(key or account.key1), to_sign.encode(), hashlib.sha256)
    fields["sig"] = base64.b64encode(digest.digest()).decode()
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items())


@dataclass(frozen=True, kw_only=True)
class Request:
    """One line of Azurite's access log."""

    client_ip: str
    method: str
    path: str  # without the query string (which may hold a SAS)
    status: int


def parse_access_log(text: str) -> list[Request]:
    """The requests in Azurite's console output (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if m is None:
            continue
        found.append(
            Request(
                # An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
                client_ip=m["ip"].removeprefix("::ffff:"),
                method=m["method"],
                path=m["url"].partition("?")[0],
                status=int(m["status"]),
            )
        )
    return found


class Azurite:
    """A running ``azurite-blob`` in a lab host; the lab stops it on close."""

    def __init__(self, *, proc: subprocess.Popen[Any], access_log: Path) -> None:
        self.proc = proc
        self.access_log = access_log

    def requests(self) -> list[Request]:
        if not self.access_log.exists():
            return []
        return parse_access_log(self.access_log.read_text(errors="replace"))


def start_azurite(
    lab: Lab,
    host: str,
    *,
    cert: ServerCert,
    accounts: Sequence[Account],
    workdir: Path,
    port: int = 443,
    timeout: float = 30.0,
) -> Azurite:
    """Start Azurite's blob service in ``host`` on every address, port ``port``.

    Returns once it accepts connections. Its console (the access log, plus
    start-up lines) goes to ``workdir/access.log``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    access_log = workdir / "access.log"
    env = dict(os.environ)
    # Replaces the well-known development account; key2 makes rotation possible.
    env["AZURITE_ACCOUNTS"] = ";".join(f"{a.name}:{a.key1}:{a.key2}" for a in accounts)
    argv = [
        str(azurite_blob_bin()),
        "--blobHost", "0.0.0.0", "--blobPort", str(port),
        "--cert", str(cert.cert_path), "--key", str(cert.key_path),
        "--location", str(data),
        # Newer SDKs send API versions this release does not know yet.
        "--skipApiVersionCheck", "--loose",
        # Never try to reach the internet.
        "--disableTelemetry",
    ]  # fmt: skip
    with open(access_log, "ab") as out:
        proc = lab.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    address = str(lab.hosts[host].ipv4)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"azurite exited with {proc.returncode}:\n{access_log.read_text(errors='replace')}"
            )
        if "successfully listens" in access_log.read_text(errors="replace"):
            probe = lab.run(
                host,
                ["bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"],
                check=False,
                timeout=5,
            )
            if probe.returncode == 0:
                return Azurite(proc=proc, access_log=access_log)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"azurite not listening after {timeout}s:\n{access_log.read_text(errors='replace')}"
            )
        time.sleep(0.1)
