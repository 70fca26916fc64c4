"""barman's cloud commands as a postgres pod runs them: the backup client of the
end-to-end scenario.

CloudNativePG backs up with ``barman-cloud-*``; so does the lab. Like a CNPG
pod, the lab's pod gets its backup target and credentials from outside (here
one environment file, standing in for the cluster's Secret), and PostgreSQL's
``archive_command`` runs ``barman-cloud-wal-archive`` as the postgres user.
Rewriting that file is how a test re-configures the pod (a real credential, a
dummy one the proxy replaces, a plain-HTTP endpoint) without restarting it.

barman lives in its own virtualenv under ``/opt/egress-agent-test`` (``./run``
installs it, ``setup_e2e``), because the postgres user must be able to
execute it wherever this repository was cloned.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.lab.azurite import TOOLS_DIR
from tests.lab.postgres import PG_USER, as_postgres, pg_env

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

BARMAN_VERSION = "3.19.1"  # keep equal to barman_version in ./run
CLOUD_PROVIDER = "azure-blob-storage"


def barman_bin_dir() -> Path:
    """The barman virtualenv's bin folder; says how to install it when missing."""
    bindir = TOOLS_DIR / f"barman-{BARMAN_VERSION}" / "bin"
    if not (bindir / "barman-cloud-backup").exists():
        raise FileNotFoundError(
            f"{bindir}/barman-cloud-backup is missing: run 'sudo ./run test' once (its "
            f"set-up installs barman {BARMAN_VERSION} with Azure support from PyPI)"
        )
    # archive_command runs as postgres, which owns none of these folders: each
    # one must be searchable by others (a tree under /root, mode 700, is not).
    for folder in [bindir, *bindir.parents]:
        if not folder.stat().st_mode & 0o001:
            raise PermissionError(
                f"{folder} is not searchable by the postgres user, so PostgreSQL's "
                f"archive_command cannot run barman: chmod o+x {folder}, or set "
                f"EGRESS_AGENT_TEST_TOOLS to a folder outside it and re-run 'sudo ./run test'"
            )
    return bindir


@dataclass(frozen=True, kw_only=True)
class BackupConfig:
    """A pod's backup target and credential, as barman reads them from its
    environment. Exactly one credential is usually set."""

    destination: str  # https://<account>.blob.core.windows.net/<container>
    server: str  # barman's server name: the folder of this configuration's backups
    ca_file: Path | None = None  # the CA the pod trusts for Azure (REQUESTS_CA_BUNDLE)
    sas_token: str | None = None
    account_key: str | None = None
    connection_string: str | None = None

    def env(self) -> dict[str, str]:
        env = {"BARMAN_DESTINATION": self.destination, "BARMAN_SERVER": self.server}
        if self.ca_file is not None:
            env["REQUESTS_CA_BUNDLE"] = str(self.ca_file)
        if self.sas_token is not None:
            env["AZURE_STORAGE_SAS_TOKEN"] = self.sas_token
        if self.account_key is not None:
            env["AZURE_STORAGE_KEY"] = self.account_key
        if self.connection_string is not None:
            env["AZURE_STORAGE_CONNECTION_STRING"] = self.connection_string
        return env


_IN_ENV = """\
#!/bin/sh
# Run a command with the pod's backup configuration (its "Secret").
set -a
. {env}
set +a
exec "$@"
"""

_ARCHIVE_WAL = """\
#!/bin/sh
# PostgreSQL's archive_command: archive_command = '{self} %p'
set -a
. {env}
set +a
exec {bindir}/barman-cloud-wal-archive --cloud-provider {provider} \\
    "$BARMAN_DESTINATION" "$BARMAN_SERVER" "$1"
"""


class PodBackups:
    """The backup set-up of one postgres pod: config file, scripts, commands."""

    def __init__(self, lab: Lab, host: str, home: Path) -> None:
        self.lab = lab
        self.host = host
        self.home = home
        self.bindir = barman_bin_dir()
        self.env_file = home / "backup.env"
        self.in_env = home / "in-backup-env"
        self.archive_wal = home / "archive-wal"
        self.config: BackupConfig | None = None
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o755)
        self.in_env.write_text(_IN_ENV.format(env=shlex.quote(str(self.env_file))))
        self.archive_wal.write_text(
            _ARCHIVE_WAL.format(
                self=self.archive_wal,
                env=shlex.quote(str(self.env_file)),
                bindir=shlex.quote(str(self.bindir)),
                provider=CLOUD_PROVIDER,
            )
        )
        for script in (self.in_env, self.archive_wal):
            script.chmod(0o755)

    @property
    def archive_command(self) -> str:
        return f"{self.archive_wal} %p"

    def configure(self, config: BackupConfig) -> None:
        """Give the pod this configuration; ``archive_command`` uses it from its next run."""
        text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in config.env().items())
        tmp = self.env_file.with_name(self.env_file.name + ".new")
        tmp.write_text(text)
        os.chown(tmp, *_postgres_ids())
        tmp.chmod(0o600)
        tmp.replace(self.env_file)  # archive_command never reads half a file
        self.config = config

    def run(
        self,
        command: str,
        *,
        options: Sequence[str] = (),
        extra: Sequence[str] = (),
        check: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``barman-cloud-<command> --cloud-provider azure-blob-storage OPTIONS
        DESTINATION SERVER EXTRA`` in the pod, as postgres, with the pod's config."""
        if self.config is None:
            raise RuntimeError("configure() the pod's backups first")
        argv = [
            str(self.in_env), str(self.bindir / f"barman-cloud-{command}"),
            "--cloud-provider", CLOUD_PROVIDER, *options,
            self.config.destination, self.config.server, *extra,
        ]  # fmt: skip
        return self.lab.run(
            self.host, as_postgres(argv), check=check, timeout=timeout,
            env=pg_env(self.home, env),
        )  # fmt: skip


def _postgres_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(PG_USER)
    return entry.pw_uid, entry.pw_gid
