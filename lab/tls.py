"""A throw-away certificate authority and server certificates for lab hosts.

The lab's "Azure" must present a certificate for ``*.blob.core.windows.net``
that clients in pods accept when told to trust the lab CA (never the system
store: REQUESTS_CA_BUNDLE and friends point there machine-wide, so the CA
path must be given explicitly). Made with the ``openssl`` command line, so no
Python dependency is needed; keys are EC P-256 and everything is valid for
two days. Extensions follow what strict verifiers (Python 3.13's
VERIFY_X509_STRICT, Go, Node) insist on: a CA with keyUsage and key
identifiers, leaves with subjectAltName and serverAuth.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import NamedTuple

VALIDITY_DAYS = 2

# Our own config, so the system openssl.cnf cannot add or clash with extensions.
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {san}
"""


class ServerCert(NamedTuple):
    """A certificate and its key; unpacks as ``(cert_path, key_path)``."""

    cert_path: Path
    key_path: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _new_key(path: Path) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )


def _san(names: Sequence[str]) -> str:
    parts = []
    for name in names:
        try:
            parts.append(f"IP:{ip_address(name)}")
        except ValueError:
            parts.append(f"DNS:{name}")
    return ", ".join(parts)


def _serial() -> str:
    return "0x" + secrets.token_hex(16)


def _cn(text: str) -> str:
    # CN is at most 64 characters (RFC 5280 ub-common-name); the SAN is what counts.
    return text if len(text) <= 64 else "egress-agent lab server"


@dataclass(frozen=True, kw_only=True)
class CA:
    cert_path: Path
    key_path: Path

    def issue(self, directory: Path, names: Sequence[str]) -> ServerCert:
        """A server certificate for ``names`` (DNS names, or IPs as IP SANs).

        Writes ``server.crt`` and ``server.key`` into ``directory``: one folder
        per certificate. The first name is also the subject CN.
        """
        if isinstance(names, str) or not names:
            raise ValueError("names must be a non-empty sequence of names")
        for name in names:
            if not name or any(c in name for c in ",#$\n\r\\") or name != name.strip():
                raise ValueError(f"name {name!r} cannot go into a certificate")
        directory.mkdir(parents=True, exist_ok=True)
        key = directory / "server.key"
        csr = directory / "server.csr"
        cert = directory / "server.crt"
        config = directory / "openssl.cnf"
        config.write_text(_CONFIG.format(cn=_cn(names[0]), san=_san(names)))
        try:
            _new_key(key)
            _openssl("req", "-new", "-config", str(config), "-key", str(key), "-out", str(csr))
            _openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(self.cert_path),
                "-CAkey", str(self.key_path), "-set_serial", _serial(),
                "-days", str(VALIDITY_DAYS), "-sha256",
                "-extfile", str(config), "-extensions", "leaf_ext", "-out", str(cert),
            )  # fmt: skip
            csr.unlink()
        finally:
            config.unlink(missing_ok=True)
        return ServerCert(cert_path=cert, key_path=key)


def make_ca(directory: Path, *, name: str = "egress-agent lab CA") -> CA:
    """A new CA in ``directory`` (``ca.crt``, ``ca.key``)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "ca.key"
    cert = directory / "ca.crt"
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG.format(cn=_cn(name), san="DNS:unused.invalid"))
    try:
        _new_key(key)
        _openssl(
            "req", "-new", "-x509", "-config", str(config), "-key", str(key),
            "-days", str(VALIDITY_DAYS), "-sha256", "-set_serial", _serial(),
            "-extensions", "ca_ext", "-out", str(cert),
        )  # fmt: skip
    finally:
        config.unlink(missing_ok=True)
    return CA(cert_path=cert, key_path=key)
