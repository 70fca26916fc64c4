"""Real PostgreSQL 15 servers in lab pods: a primary and a streaming replica.

The core user story is about a database's two kinds of traffic: backups to
Azure (to be diverted to the proxy) and replication between its pods (never
diverted). So the lab runs the real server, as the ``postgres`` user like a
container does, with ``archive_command`` running the real backup tool.

Namespaces share the file system, so every server gets its own data folder
and its own ``unix_socket_directories``. Everything lives under one folder
that the ``postgres`` user can reach (``pod_root``), not under pytest's
root-only temporary folders.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
REPLICATION_USER = "replicator"


def as_postgres(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the postgres user; setpriv execs, so PIDs stay the command's."""
    return ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--", *argv]


def pg_bin(name: str) -> str:
    path = PG_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install Debian's postgresql-15")
    return str(path)


@contextmanager
def pod_root() -> Iterator[Path]:
    """A fresh folder the postgres user can traverse; removed with all it holds."""
    root = Path(tempfile.mkdtemp(prefix="egress-agent-e2e-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def postgres_dir(path: Path, mode: int = 0o700) -> Path:
    """A folder owned by postgres (PostgreSQL insists on 0700 for its data)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, PG_USER, PG_USER)
    path.chmod(mode)
    return path


def pg_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment like a container's: nothing of ours leaks in."""
    env = {
        "PATH": f"{PG_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    env.update(extra or {})
    return env


@dataclass(kw_only=True)
class PgServer:
    """One running ``postgres`` in a lab host."""

    lab: Lab
    host: str
    datadir: Path
    socket_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen[Any]

    def psql(self, sql: str, *, timeout: float = 30) -> str:
        """Run ``sql`` through the unix socket; the unaligned, tuples-only output."""
        argv = as_postgres([
            pg_bin("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", PG_USER,
            "-d", "postgres", "-c", sql,
        ])  # fmt: skip
        return self.lab.run(self.host, argv, timeout=timeout, env=pg_env(self.socket_dir)).stdout

    def wait_ready(self, timeout: float = 30) -> None:
        argv = as_postgres([pg_bin("pg_isready"), "-q", "-h", str(self.socket_dir),
                            "-p", str(self.port)])  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres in {self.host} exited: {self.log_text()}")
            env = pg_env(self.socket_dir)
            if self.lab.run(self.host, argv, check=False, env=env).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres in {self.host} not ready: {self.log_text()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown (SIGINT): sessions are ended, not waited for."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def initdb(lab: Lab, host: str, datadir: Path) -> None:
    postgres_dir(datadir)
    argv = as_postgres([pg_bin("initdb"), "-D", str(datadir), "-U", PG_USER, "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])  # fmt: skip
    lab.run(host, argv, timeout=120, env=pg_env(datadir))


def start_postgres(
    lab: Lab,
    host: str,
    *,
    datadir: Path,
    socket_dir: Path,
    listen: str,
    port: int = 5432,
    settings: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> PgServer:
    """Run ``postgres -D datadir`` in ``host`` listening on ``listen`` ("" for
    the socket only), and wait until it accepts connections."""
    postgres_dir(socket_dir, 0o755)
    conf = {
        "listen_addresses": listen,
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "fsync": "off",  # a throw-away lab database; nothing to keep across a crash
        "shared_buffers": "16MB",
        **(settings or {}),
    }
    argv = [pg_bin("postgres"), "-D", str(datadir)]
    for key, value in conf.items():
        argv += ["-c", f"{key}={value}"]
    log = datadir.parent / f"{datadir.name}.log"
    with open(log, "ab") as out:
        proc = lab.popen(
            host,
            as_postgres(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=pg_env(datadir, env),
        )
    server = PgServer(
        lab=lab, host=host, datadir=datadir, socket_dir=socket_dir, port=port, log=log, proc=proc
    )
    server.wait_ready()
    return server


def allow_replication(datadir: Path, *, from_cidr: str) -> None:
    """Let the replication role connect from ``from_cidr`` (trust: a lab)."""
    with open(datadir / "pg_hba.conf", "a") as fh:
        fh.write(f"host replication {REPLICATION_USER} {from_cidr} trust\n")


def create_replica(
    lab: Lab, host: str, *, primary: PgServer, primary_address: str, datadir: Path, slot: str
) -> None:
    """``pg_basebackup -R`` from the primary over the network, with a slot."""
    primary.psql(f"CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN")
    postgres_dir(datadir)
    argv = as_postgres([
        pg_bin("pg_basebackup"), "-h", primary_address, "-p", str(primary.port),
        "-U", REPLICATION_USER, "-D", str(datadir), "-R", "-X", "stream", "-C", "-S", slot,
        "--no-sync",
    ])  # fmt: skip
    lab.run(host, argv, timeout=120, env=pg_env(datadir))


def wait_for(predicate: Any, what: str, timeout: float = 30, interval: float = 0.2) -> Any:
    """Poll ``predicate()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
