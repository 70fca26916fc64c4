"""A real DNS server for the lab: dnsmasq in an "internet" host of its own.

The agent binds names to addresses by resolving them itself, with the
nameservers of its network namespace's ``/etc/resolv.conf``. In the lab that
file is ``/etc/netns/<node>/resolv.conf`` (``ip netns exec`` bind-mounts it
over ``/etc/resolv.conf``), and it names this server. The names the lab's
external hosts register (``Lab.add_external(..., hostnames=...)``,
``Lab.add_hosts_entry``) are served from a hosts file that dnsmasq re-reads
on SIGHUP, with a real TTL (``--local-ttl``); any other name is NXDOMAIN
(``--address=/#/``), so nothing is ever forwarded off the machine.

Tests stop and start the server (``stop()``, ``start()``) to see the agent
fail closed and serve stale answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

DNS_HOST = "dns"
DNS_IPV4 = "198.18.255.2"
DNS_IPV6 = "fd00:18:ff::2"
DEFAULT_TTL = 30
DNSMASQ = "/usr/sbin/dnsmasq"
_READY_TIMEOUT = 10.0


class LabDnsError(RuntimeError):
    """dnsmasq is missing or did not start."""


class LabDns:
    """dnsmasq serving the lab's names; the lab makes one when a name is
    first registered (see ``Lab.dns``)."""

    def __init__(self, lab: Lab, *, ttl: int = DEFAULT_TTL) -> None:
        self.lab = lab
        self.ttl = ttl
        self.address = DNS_IPV4
        self.address_v6 = DNS_IPV6
        # Readable by dnsmasq's unprivileged user, removed with the lab.
        self.folder = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}dns-"))
        self.folder.chmod(0o755)
        self.hosts_file = self.folder / "hosts"
        self.log_file = self.folder / "dnsmasq.log"
        self._names: list[tuple[str, str]] = []  # (address, name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_hosts()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LabDnsError("the lab's DNS server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start dnsmasq (again) and return once it answers."""
        if self.running:
            return
        if not os.path.exists(DNSMASQ):
            raise LabDnsError(
                f"{DNSMASQ} not found: install Debian's dnsmasq-base (./run test does)"
            )
        if DNS_HOST not in self.lab.hosts:
            self.lab.add_external(DNS_HOST, DNS_IPV4, DNS_IPV6)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            f"--log-facility={self.log_file}",
            "--no-resolv",  # nothing is forwarded: the lab's names only
            "--no-hosts",
            f"--addn-hosts={self.hosts_file}",
            "--address=/#/",  # every other name: NXDOMAIN
            "--bind-interfaces",
            f"--listen-address={DNS_IPV4}",
            f"--listen-address={DNS_IPV6}",
            f"--local-ttl={self.ttl}",
            "--cache-size=0",
            "--pid-file=",
        ]
        self._proc = self.lab.popen(DNS_HOST, argv, stderr=subprocess.PIPE)
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if "read " in text and str(self.hosts_file) in text:
                return  # sockets are bound before the hosts file is read
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise LabDnsError(f"dnsmasq exited with {self._proc.returncode}: {err or text}")
            time.sleep(0.02)
        raise LabDnsError(f"dnsmasq not ready after {_READY_TIMEOUT}s:\n{self._log_since(offset)}")

    def stop(self) -> None:
        """Stop dnsmasq: lookups then time out (its address stays, unanswered)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def serve(self, entries: Iterable[tuple[str, str]]) -> None:
        """Serve exactly these (address, name) pairs; a running server re-reads them."""
        self._names = list(dict.fromkeys(entries))
        self._write_hosts()
        if self.running:
            assert self._proc is not None
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + _READY_TIMEOUT
            while str(self.hosts_file) not in self._log_since(offset):
                if time.monotonic() > deadline:
                    raise LabDnsError("dnsmasq did not re-read its hosts file after SIGHUP")
                time.sleep(0.01)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            for path in self.folder.iterdir():
                path.unlink()
            self.folder.rmdir()

    def _write_hosts(self) -> None:
        text = "".join(f"{address}\t{name}\n" for address, name in self._names)
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(self.hosts_file)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def resolv_conf() -> str:
    """The node's resolv.conf: this server only, asked once, quickly."""
    return (
        "# written by egress_agent.lab; removed with the lab\n"
        f"nameserver {DNS_IPV4}\n"
        "options timeout:1 attempts:1\n"
    )
