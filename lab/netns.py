"""A node, its pods and a few "internet" hosts, built as network namespaces.

The integration tests, the demo and the benchmark all need the same picture: a
Kubernetes-like node with pods plugged into it by veth pairs, and hosts behind
it that play Azure and friends. ``Lab`` builds that picture from namespaces
that carry a per-run prefix, and removes all of it again -- processes it
started, namespaces, ``/etc/netns/<ns>`` folders -- also when the body fails.

Address plan (nothing here is ever configured in the namespace we run in):

* pods get a single ``/32`` and ``/128`` on ``eth0`` and route everything
  through the node the way Calico does: ``default via 169.254.1.1 dev eth0``
  (on-link) and ``default via fe80::1 dev eth0``. The node side of a pod veth
  has **no IPv4 address**: it answers ARP for the gateway by ``proxy_arp`` and
  reaches the pod by a host route ``<pod>/32 dev <veth>``. This is a real CNI
  situation the product must support (no address to source from, no subnet).
* external hosts sit on a small subnet of their own with the node:
  ``198.18.N.2/24`` on the host and ``198.18.N.1/24`` on the node (likewise
  ``fd00:18:N::2/64`` and ``::1``), default route via the node. There is no
  NAT, so servers see the pods' own addresses.

Only 198.18.0.0/15 and fd00::/8 are accepted, so a typo cannot send lab
traffic anywhere real.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
)
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal

from pyroute2 import IPRoute, netns

from egress_agent.lab.dns import DEFAULT_TTL, LabDns, resolv_conf

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
LAB_IPV4 = IPv4Network("198.18.0.0/15")
LAB_IPV6 = IPv6Network("fd00::/8")
# Calico's choice: a link-local gateway that no pod network can collide with.
# The node answers ARP for it on every pod veth through proxy_arp.
POD_GATEWAY_V4 = IPv4Address("169.254.1.1")
# A fixed link-local on the node side of every pod veth, so pods need not
# learn the kernel-generated one (link-locals only have to be unique per link).
POD_GATEWAY_V6 = IPv6Address("fe80::1")
EXTERNAL_PREFIX_V4 = 24
EXTERNAL_PREFIX_V6 = 64
HOST_IFNAME = "eth0"
IFNAMSIZ = 15  # usable characters of an interface name (IFNAMSIZ 16 with the NUL)

RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h
# getsockopt(SOL_SOCKET, SO_NETNS_COOKIE) (Linux 5.14+, include/uapi/asm-generic/socket.h)
# identifies the namespace a socket lives in; Python 3.11 has no name for it.
SO_NETNS_COOKIE = 71

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,11}-$")
_TERM_GRACE = 5.0


class LabError(RuntimeError):
    """The lab could not be built or torn down as asked."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run in a lab host failed; the message carries its stderr."""

    def __init__(self, host: str, proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.host = host

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        tail = f": {err[-2000:]}" if err else ""
        return f"in {self.host}: {self.cmd!r} exited with {self.returncode}{tail}"


@dataclass(frozen=True, kw_only=True)
class Host:
    """One pod or external host of the lab."""

    name: str  # logical name, e.g. "pg-primary"
    kind: Literal["pod", "external"]
    netns: str  # real namespace name, with the run's prefix
    ipv4: IPv4Address
    ipv6: IPv6Address
    node_ifname: str  # the node-side veth
    ifname: str = HOST_IFNAME  # the veth inside the host
    # The node's addresses on an external host's link (None for pods: the node
    # side of a pod veth has no address of its own).
    node_ipv4: IPv4Address | None = None
    node_ipv6: IPv6Address | None = None


def _lab_ipv4(text: str) -> IPv4Address:
    addr = ip_address(text)
    if not isinstance(addr, IPv4Address) or addr not in LAB_IPV4:
        raise ValueError(f"{text!r}: lab IPv4 addresses must be in {LAB_IPV4}")
    return addr


def _lab_ipv6(text: str) -> IPv6Address:
    addr = ip_address(text)
    if not isinstance(addr, IPv6Address) or addr not in LAB_IPV6:
        raise ValueError(f"{text!r}: lab IPv6 addresses must be in {LAB_IPV6}")
    return addr


def _netns_cookie(fd: int) -> int | None:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return None
    finally:
        sock.close()
    value: int = struct.unpack("Q", raw)[0]
    return value


def _own_netns_cookie() -> int | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return _netns_cookie(sock.fileno())


def _netns_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_RUN_DIR / name)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as ended (our parent may not reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _pids_in(name: str) -> list[int]:
    """PIDs whose network namespace is the named one (like `ip netns pids`)."""
    ident = _netns_inode(name)
    if ident is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            pids.append(int(entry))
    return pids


class Lab:
    """A node with pods and external hosts as network namespaces.

    Use as a context manager: entering creates the node, leaving removes
    everything this lab created (``close()`` does the same and is idempotent).
    ``prefix`` defaults to ``"ea"`` + 6 random hex characters + ``"-"``.
    """

    def __init__(self, prefix: str | None = None, *, dns_ttl: int = DEFAULT_TTL) -> None:
        if prefix is None:
            prefix = self._fresh_prefix()
        elif not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r}: use 2-12 lowercase letters/digits and a '-'")
        self.prefix = prefix
        self.node = f"{prefix}node"
        self._hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # created by us, in creation order
        self._etc_dirs: list[Path] = []
        self._iprs: dict[str, Any] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._extra_hosts: list[tuple[str, str]] = []  # (address, hostname)
        # What the lab's DNS server answers: (address, name). add_external's
        # names have both of the host's addresses there (A and AAAA).
        self._dns_names: list[tuple[str, str]] = []
        self._made_etc_netns = False
        self._started = False
        self._closed = False
        self._dns_ttl = dns_ttl
        self._dns: LabDns | None = None

    @staticmethod
    def _fresh_prefix() -> str:
        existing = set(netns.listnetns())
        while True:
            prefix = f"ea{secrets.token_hex(3)}-"
            if not any(name.startswith(prefix) for name in existing):
                return prefix

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError:
            if exc is None:
                raise
            log.exception("lab teardown failed while handling another error")

    def start(self) -> None:
        """Create the node namespace (with forwarding on). Called by ``__enter__``."""
        if self._closed:
            raise LabError("this lab was closed; make a new Lab")
        if self._started:
            return
        self._started = True
        try:
            self._create_namespace(self.node)
            self._sysctl(
                self.node,
                {
                    "net.ipv4.ip_forward": "1",
                    "net.ipv6.conf.all.forwarding": "1",
                },
            )
            # proxy_arp only answers for addresses the node has a unicast route
            # to through another interface (net/ipv4/arp.c, arp_fwd_proxy). A
            # real node reaches 169.254.1.1 by its default route; the lab node
            # has none, so it gets a host route of its own. Nothing sends to it.
            ipr = self._ipr(self.node)
            ipr.route(
                "add",
                dst=f"{POD_GATEWAY_V4}/32",
                oif=self._index(self.node, "lo"),
                scope=RT_SCOPE_LINK,
            )
            self._write_hosts_files()
            # The node (where the agent runs) resolves with the lab's DNS
            # server only: never with this machine's resolver.
            with open(NETNS_ETC_DIR / self.node / "resolv.conf", "w") as fh:
                fh.write(resolv_conf())
        except BaseException:
            self.close()
            raise

    @property
    def dns(self) -> LabDns:
        """The lab's DNS server (dnsmasq in host ``dns``), started on first use:
        it serves every name the externals register, to the node."""
        self._require_started()
        if self._dns is None:
            self._dns = LabDns(self, ttl=self._dns_ttl)
            self._dns.serve(self._dns_names)
        self._dns.start()
        return self._dns

    def close(self) -> None:
        """Stop processes, remove namespaces and /etc/netns folders. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        interrupted: BaseException | None = None

        def step(what: str, fn: Callable[..., object], *args: object) -> None:
            nonlocal interrupted
            try:
                fn(*args)
            except Exception as exc:
                log.warning("lab teardown: %s: %s", what, exc)
                errors.append(f"{what}: {exc}")
            except BaseException as exc:  # Ctrl-C: finish tearing down first
                interrupted = interrupted or exc

        if self._dns is not None:
            step("stop the DNS server", self._dns.close)
        step("stop processes", self._stop_processes)
        for name in reversed(self._namespaces):
            step(f"stop leftover processes in {name}", self._kill_leftovers, name)
        for name, ipr in list(self._iprs.items()):
            step(f"close netlink socket of {name}", ipr.close)
        self._iprs.clear()
        for name in reversed(self._namespaces):
            step(f"remove namespace {name}", self._remove_namespace, name)
        for path in reversed(self._etc_dirs):
            if path.exists():
                step(f"remove {path}", shutil.rmtree, path)
        if self._made_etc_netns:
            # Only if empty: another lab may be using it by now.
            with contextlib.suppress(OSError):
                NETNS_ETC_DIR.rmdir()
        if interrupted is not None:
            raise interrupted
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    def _stop_processes(self) -> None:
        procs = [p for p in self._procs if p.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + _TERM_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("lab: pid %d ignored SIGTERM; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def _kill_leftovers(self, name: str) -> None:
        """Kill what still runs in our namespace: descendants of our processes."""
        pids = [pid for pid in _pids_in(name) if pid != os.getpid()]
        for pid in pids:
            log.warning("lab: killing leftover pid %d in %s", pid, name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _TERM_GRACE
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if pid_alive(pid)]
            time.sleep(0.02)

    def _remove_namespace(self, name: str) -> None:
        if not name.startswith(self.prefix):  # never anything we did not create
            raise LabError(f"refusing to remove {name!r}: not ours")
        if name in netns.listnetns():
            netns.remove(name)

    # -- building -----------------------------------------------------------

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    @property
    def namespaces(self) -> Sequence[str]:
        """Every namespace this lab created, the node first."""
        return tuple(self._namespaces)

    def netns_of(self, host: str) -> str:
        """The namespace name of a logical host name, or of ``"node"``."""
        if host == "node":
            return self.node
        try:
            return self._hosts[host].netns
        except KeyError:
            raise KeyError(f"no lab host {host!r}; have: node, {', '.join(self._hosts)}") from None

    def add_pod(self, name: str, ipv4: str, ipv6: str) -> Host:
        """A pod joined to the node by a veth, routed through the node like Calico does."""
        self._check_new(name)
        v4 = _lab_ipv4(ipv4)
        v6 = _lab_ipv6(ipv6)
        self._check_free(v4, v6)
        ns = f"{self.prefix}{name}"
        node_if = self._veth_name("pod", name)
        host = Host(name=name, kind="pod", netns=ns, ipv4=v4, ipv6=v6, node_ifname=node_if)
        self._create_namespace(ns)
        self._hosts[name] = host
        self._make_veth(host)
        self._sysctl(
            self.node,
            {
                f"net.ipv4.conf.{node_if}.proxy_arp": "1",
                # Broadcast ARP requests are answered after a random delay of up
                # to proxy_delay (0.8 s) otherwise (Documentation/networking/
                # ip-sysctl.rst); Calico sets 0 for the same reason.
                f"net.ipv4.neigh.{node_if}.proxy_delay": "0",
            },
        )

        node = self._ipr(self.node)
        nidx = self._index(self.node, node_if)
        node.link("set", index=nidx, state="up")
        node.addr("add", index=nidx, address=str(POD_GATEWAY_V6), prefixlen=64, flags=IFA_F_NODAD)
        node.route("add", dst=f"{v4}/32", oif=nidx, scope=RT_SCOPE_LINK)
        node.route("add", dst=f"{v6}/128", oif=nidx)

        pod = self._ipr(ns)
        pidx = self._index(ns, HOST_IFNAME)
        pod.link("set", index=pidx, state="up")
        pod.addr("add", index=pidx, address=str(v4), prefixlen=32)
        pod.addr("add", index=pidx, address=str(v6), prefixlen=128, flags=IFA_F_NODAD)
        pod.route("add", dst=f"{POD_GATEWAY_V4}/32", oif=pidx, scope=RT_SCOPE_LINK)
        pod.route("add", dst="0.0.0.0/0", gateway=str(POD_GATEWAY_V4), oif=pidx)
        pod.route("add", dst="::/0", gateway=str(POD_GATEWAY_V6), oif=pidx)
        self._wait_up(self.node, nidx)
        self._wait_up(ns, pidx)
        self._write_hosts_files()
        return host

    def add_external(self, name: str, ipv4: str, ipv6: str, hostnames: Sequence[str] = ()) -> Host:
        """An "internet" host behind the node on a subnet of its own.

        ``ipv4``/``ipv6`` may carry a prefix length (default /24 and /64); the
        node takes the first address of that subnet. ``hostnames`` resolve to
        the IPv4 address in every lab namespace's hosts file (for ``ip netns
        exec``): with both, glibc would pick the IPv6 one, since its built-in
        RFC 3484 table ranks ULAs above IPv4. For names over IPv6 use
        ``add_hosts_entry``. The lab's DNS server (see ``dns``), which the
        agent in the node asks, answers them with both addresses (A and AAAA).
        """
        self._check_new(name)
        if isinstance(hostnames, str):
            raise TypeError("hostnames must be a sequence of names, not one string")
        if4 = IPv4Interface(ipv4 if "/" in ipv4 else f"{ipv4}/{EXTERNAL_PREFIX_V4}")
        if6 = IPv6Interface(ipv6 if "/" in ipv6 else f"{ipv6}/{EXTERNAL_PREFIX_V6}")
        _lab_ipv4(str(if4.ip))
        _lab_ipv6(str(if6.ip))
        node4, node6 = if4.network[1], if6.network[1]
        if if4.ip == node4 or if6.ip == node6:
            raise ValueError(f"{name}: the first address of its subnet is the node's")
        if if4.network.prefixlen > 30 or if6.network.prefixlen > 126:
            raise ValueError(f"{name}: subnet too small for node and host")
        self._check_free(if4.ip, if6.ip, subnets=(if4.network, if6.network))
        for hostname in hostnames:
            self._check_hostname(hostname)
        ns = f"{self.prefix}{name}"
        node_if = self._veth_name("ext", name)
        host = Host(
            name=name,
            kind="external",
            netns=ns,
            ipv4=if4.ip,
            ipv6=if6.ip,
            node_ifname=node_if,
            node_ipv4=node4,
            node_ipv6=node6,
        )
        self._create_namespace(ns)
        self._hosts[name] = host
        self._make_veth(host)

        node = self._ipr(self.node)
        nidx = self._index(self.node, node_if)
        node.link("set", index=nidx, state="up")
        node.addr("add", index=nidx, address=str(node4), prefixlen=if4.network.prefixlen)
        node.addr(
            "add",
            index=nidx,
            address=str(node6),
            prefixlen=if6.network.prefixlen,
            flags=IFA_F_NODAD,
        )

        ext = self._ipr(ns)
        eidx = self._index(ns, HOST_IFNAME)
        ext.link("set", index=eidx, state="up")
        ext.addr("add", index=eidx, address=str(if4.ip), prefixlen=if4.network.prefixlen)
        ext.addr(
            "add",
            index=eidx,
            address=str(if6.ip),
            prefixlen=if6.network.prefixlen,
            flags=IFA_F_NODAD,
        )
        ext.route("add", dst="0.0.0.0/0", gateway=str(node4), oif=eidx)
        ext.route("add", dst="::/0", gateway=str(node6), oif=eidx)
        self._wait_up(self.node, nidx)
        self._wait_up(ns, eidx)

        self._extra_hosts += [(str(if4.ip), hostname) for hostname in hostnames]
        self._write_hosts_files()
        if hostnames:
            self._dns_names += [(str(a), n) for n in hostnames for a in (if4.ip, if6.ip)]
            self.dns.serve(self._dns_names)
        return host

    def add_hosts_entry(self, hostname: str, address: str) -> None:
        """Resolve ``hostname`` to ``address`` in every lab namespace, node included."""
        self._require_started()
        self._check_hostname(hostname)
        addr = ip_address(address)
        if not addr.is_loopback:
            _lab_ipv4(address) if addr.version == 4 else _lab_ipv6(address)
        self._extra_hosts.append((str(addr), hostname))
        self._write_hosts_files()
        self._dns_names.append((str(addr), hostname))
        self.dns.serve(self._dns_names)

    # -- running things -----------------------------------------------------

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host`` (logical name or ``"node"``) via ``ip netns exec``.

        Text mode, output captured (unless ``stdout``/``stderr`` are given);
        a failure raises ``LabCommandError`` with the command's stderr.
        """
        ns = self._own(self.netns_of(host))
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("stdin", subprocess.DEVNULL if "input" not in kw else None)
        if kw["stdin"] is None:
            del kw["stdin"]
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], check=False, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise LabCommandError(host, proc)
        return proc

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``; the lab stops it (SIGTERM, then SIGKILL) on close.

        ``ip netns exec`` replaces itself with the command, so the PID is the
        command's own. Keyword arguments go to ``subprocess.Popen`` (bytes mode
        unless ``text=True``; stdin defaults to /dev/null).
        """
        ns = self._own(self.netns_of(host))
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    # -- helpers ------------------------------------------------------------

    def _require_started(self) -> None:
        if self._closed:
            raise LabError("this lab is closed")
        if not self._started:
            raise LabError("use the Lab as a context manager (or call start()) first")

    def _own(self, ns: str) -> str:
        self._require_started()
        if ns not in self._namespaces:
            raise LabError(f"namespace {ns!r} was not created by this lab")
        return ns

    def _check_new(self, name: str) -> None:
        self._require_started()
        if not _NAME_RE.match(name) or name == "node":
            raise ValueError(
                f"host name {name!r}: use up to 32 lowercase letters, digits and '-' (not 'node')"
            )
        if name in self._hosts:
            raise ValueError(f"host {name!r} exists already")

    @staticmethod
    def _check_hostname(hostname: str) -> None:
        if not hostname or any(c.isspace() or c == "#" for c in hostname):
            raise ValueError(f"hostname {hostname!r}: must be one word without '#'")

    def _check_free(
        self,
        v4: IPv4Address,
        v6: IPv6Address,
        subnets: tuple[IPv4Network, IPv6Network] | None = None,
    ) -> None:
        for other in self._hosts.values():
            taken: list[IPv4Address | IPv6Address] = [other.ipv4, other.ipv6]
            if other.node_ipv4 is not None and other.node_ipv6 is not None:
                taken += [other.node_ipv4, other.node_ipv6]
            if v4 in taken or v6 in taken:
                raise ValueError(f"address of {v4}/{v6} is already used by {other.name}")
            if other.kind == "external":
                assert other.node_ipv4 is not None and other.node_ipv6 is not None
                net4 = IPv4Interface(f"{other.node_ipv4}/{EXTERNAL_PREFIX_V4}").network
                net6 = IPv6Interface(f"{other.node_ipv6}/{EXTERNAL_PREFIX_V6}").network
                if v4 in net4 or v6 in net6:
                    raise ValueError(f"{v4}/{v6} lies in {other.name}'s subnet")
            if subnets is not None and (other.ipv4 in subnets[0] or other.ipv6 in subnets[1]):
                raise ValueError(f"subnet {subnets[0]}/{subnets[1]} overlaps {other.name}")

    def _veth_name(self, kind: str, name: str) -> str:
        # The index keeps names unique even when long logical names get cut.
        return f"{kind}{len(self._hosts) + 1}-{name}"[:IFNAMSIZ]

    def _create_namespace(self, ns: str) -> None:
        if ns in netns.listnetns():
            raise LabError(f"namespace {ns} exists already (another run with this prefix?)")
        netns.create(ns)
        self._namespaces.append(ns)
        if not NETNS_ETC_DIR.exists():
            NETNS_ETC_DIR.mkdir(parents=True, exist_ok=True)
            self._made_etc_netns = True
        etc = NETNS_ETC_DIR / ns
        etc.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.append(etc)
        # Addresses must be usable at once (binding a tentative IPv6 address
        # fails with EADDRNOTAVAIL), so no duplicate address detection in the
        # lab. Set before any interface exists, so every interface inherits it.
        self._sysctl(
            ns,
            {
                "net.ipv6.conf.all.accept_dad": "0",
                "net.ipv6.conf.default.accept_dad": "0",
            },
        )
        self._ipr(ns).link("set", index=self._index(ns, "lo"), state="up")

    def _make_veth(self, host: Host) -> None:
        # Created inside the node with its peer placed straight into the host's
        # namespace: the namespace we run in never sees either end.
        self._ipr(self.node).link(
            "add",
            ifname=host.node_ifname,
            kind="veth",
            peer={"ifname": host.ifname, "net_ns_fd": host.netns},
        )

    def _wait_up(self, ns: str, index: int, timeout: float = 5.0) -> None:
        """Wait until the kernel has really activated a new veth end.

        Until linkwatch has run, a device that is administratively up still
        has the ``noop`` qdisc, which drops every packet (net/core/link_watch.c,
        net/sched/sch_generic.c: dev_activate).
        """
        ipr = self._ipr(ns)
        deadline = time.monotonic() + timeout
        while True:
            link = ipr.get_links(index)[0]
            if link.get("IFLA_OPERSTATE") == "UP" and link.get("IFLA_QDISC") != "noop":
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{link.get('IFLA_IFNAME')} in {ns} not up after {timeout}s "
                    f"(operstate {link.get('IFLA_OPERSTATE')}, qdisc {link.get('IFLA_QDISC')})"
                )
            time.sleep(0.005)

    def _ipr(self, ns: str) -> Any:
        ipr = self._iprs.get(ns)
        if ipr is None:
            self._own(ns)
            # flags=0: never create a namespace as a side effect of opening it.
            ipr = IPRoute(netns=ns, flags=0)
            cookie, own = _netns_cookie(ipr.fileno()), _own_netns_cookie()
            if cookie is not None and cookie == own:
                ipr.close()
                raise LabError(f"netlink socket for {ns} is in our own namespace; refusing")
            self._iprs[ns] = ipr
        return ipr

    def _index(self, ns: str, ifname: str) -> int:
        found = self._ipr(ns).link_lookup(ifname=ifname)
        if not found:
            raise LabError(f"no interface {ifname} in {ns}")
        index: int = found[0]
        return index

    def _sysctl(self, ns: str, values: Mapping[str, str]) -> None:
        """Set sysctls inside ``ns`` (a process there sees that namespace's /proc/sys/net)."""
        self._own(ns)
        argv = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w"]
        argv += [f"{key}={value}" for key, value in values.items()]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise LabError(f"sysctl in {ns} failed: {proc.stderr.strip()}")

    def _hosts_lines(self) -> Iterator[str]:
        yield "# written by egress_agent.lab; removed with the lab"
        yield "127.0.0.1\tlocalhost"
        yield "::1\tlocalhost ip6-localhost ip6-loopback"
        for host in self._hosts.values():
            yield f"{host.ipv4}\t{host.name}"
        for address, hostname in self._extra_hosts:
            yield f"{address}\t{hostname}"

    def _write_hosts_files(self) -> None:
        text = "\n".join(self._hosts_lines()) + "\n"
        for etc in self._etc_dirs:
            # In place, not by rename: `ip netns exec` bind-mounts the file over
            # /etc/hosts, and running processes then see later entries too.
            with open(etc / "hosts", "w") as fh:
                fh.write(text)
