"""The policy model: typed, validated, immutable data that every part shares.

A :class:`Policy` is what a policy file means once it has been loaded and
validated (see :mod:`egress_agent.policy.load`). ``rules`` renders it into
nftables, ``proxy`` decides with it, ``agent`` composes them. Nothing here does
I/O; everything is hashable plain data so that two loads of the same file
compare equal.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from egress_agent.policy.traffic import Breaker, Limits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PROXY_PORT = 15001
# The proxy's own addresses. Diverted connections are DNAT-ed to these (not
# `redirect`-ed), so diversion works even when the pod-facing interface has no
# address of its own. The agent puts them on the node's loopback interface.
# 169.254.0.0/16 is link-local (RFC 3927): never routed off the node.
DEFAULT_PROXY_ADDRESS_V4 = ipaddress.IPv4Address("169.254.99.1")
DEFAULT_PROXY_ADDRESS_V6 = ipaddress.IPv6Address("fd65:6772:6573::1")
# Packet mark on the proxy's upstream sockets; the rules never divert it.
DEFAULT_UPSTREAM_MARK = 0x6567
# Packet mark bit the BPF datapath's classifier sets on packets to divert; the
# nftables rules then only match it. Its own bit, clear of the upstream mark.
DEFAULT_DIVERT_MARK = 0x00800000
# Packet mark bits that name a cgroup workload: a BPF program at socket
# creation writes the workload's mark into the socket (bpf/cgroup_mark.bpf.c),
# the output chain matches it. Clear of the upstream and divert marks.
DEFAULT_CGROUP_MARK_MASK = 0x7F000000


class Action(enum.Enum):
    """What the proxy does with a diverted connection."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, kw_only=True, order=True)
class PortRange:
    """An inclusive TCP port range; a single port has first == last."""

    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, kw_only=True)
class PodSelector:
    """Kubernetes pods on this node that a workload names: every field set must
    match (equality-based labels). Label pairs are sorted tuples so the model
    stays hashable."""

    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    namespace_labels: tuple[tuple[str, str], ...] = ()
    # Select hostNetwork pods instead, by their cgroups (their addresses are
    # the node's): the agent fills the workload's ``cgroups``.
    host_network: bool = False


@dataclass(frozen=True, kw_only=True)
class Workload:
    """A named source of traffic: addresses, optionally bound to interfaces.

    When ``interfaces`` is set, a packet carries this identity only if it
    arrived on one of them: another pod cannot claim it by spoofing an address.
    A workload given by ``pods`` has no CIDRs in the file; the agent fills them
    with the selected pods' addresses as it discovers them (``agent.discovery``).
    """

    name: str
    cidrs: tuple[IPNetwork, ...]
    interfaces: tuple[str, ...] = ()
    pods: PodSelector | None = None
    # Cgroup v2 paths relative to the cgroup2 root: identity is the cgroup of
    # the process that created the socket (or any cgroup below it), for
    # locally generated traffic, where the source address says nothing.
    cgroups: tuple[str, ...] = ()


class NonTcp(enum.Enum):
    """What the kernel does with an intercepted workload's traffic that is not
    TCP (UDP, ICMP, anything else) towards the rule's destinations."""

    PASS = "pass"  # not under policy: it goes where it is sent (the default)
    DROP = "drop"  # dropped in the kernel, except replies and related ICMP errors


@dataclass(frozen=True, kw_only=True)
class InterceptRule:
    """Which traffic is diverted to the proxy at all (the kernel's decision)."""

    index: int
    sources: tuple[str, ...]
    ports: tuple[PortRange, ...] = ()  # empty: every TCP port
    except_cidrs: tuple[IPNetwork, ...] = ()
    to_cidrs: tuple[IPNetwork, ...] = ()  # empty: any destination
    # Non-TCP traffic from the sources to the destinations (ports do not apply).
    non_tcp: NonTcp = NonTcp.PASS


@dataclass(frozen=True, kw_only=True)
class HeaderValue:
    """A header value to set: literal ``value``, or the content of ``file``
    (read when a request needs it, trailing newline stripped) put into
    ``format`` at ``{}``."""

    value: str | None = None
    file: str | None = None
    format: str = "{}"


@dataclass(frozen=True, kw_only=True)
class ClientTls:
    """Terminate the client's TLS with this certificate chain and key (PEM files)."""

    cert: str
    key: str


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """How the proxy reaches the server for an HTTP rule. ``port`` None is the
    original destination's port; ``server_name`` None is the request's Host;
    ``ca_file`` None is the system trust store."""

    tls: bool = False
    port: int | None = None
    ca_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class AzureSas:
    """Replace any SAS the client sent with the one in ``file``."""

    file: str


@dataclass(frozen=True, kw_only=True)
class AzureSharedKey:
    """Sign each request with the Storage account key in ``key_file`` (base64)."""

    account: str
    key_file: str


@dataclass(frozen=True, kw_only=True)
class Bearer:
    """``Authorization: Bearer <content of file>``."""

    file: str


Auth = AzureSas | AzureSharedKey | Bearer


@dataclass(frozen=True, kw_only=True)
class HttpRule:
    """An allow rule's HTTP handling: the proxy speaks HTTP/1.1 to both sides
    and rewrites each request head (headers, credentials) on the way."""

    client_tls: ClientTls | None = None
    upstream: Upstream = Upstream()
    # (name as written, value); names are unique case-insensitively.
    set_headers: tuple[tuple[str, HeaderValue], ...] = ()
    remove_headers: tuple[str, ...] = ()
    auth: Auth | None = None


class Resolve(enum.Enum):
    """How an allow rule's ``hosts`` are bound to addresses (``to.resolve``).

    A server name comes from the client (TLS SNI, HTTP Host): alone it proves
    nothing about where the connection goes. The proxy resolves the name
    itself and holds the connection to that name's addresses.
    """

    # The original destination must be one of the name's current addresses
    # (the default). A literal host also matches a flow that carries no name
    # (SMTP, PostgreSQL, SSH) headed to one of its addresses.
    VERIFY = "verify"
    # Connect to one of the name's own addresses, whatever address the client
    # dialled: for CDNs whose answers differ between resolvers.
    CONNECT = "connect"
    # No check: the name alone decides. A client that forges the name reaches
    # any address. Unsafe; for names the proxy cannot resolve.
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class Place:
    """Where a value was written in the policy file: for the problems found
    after loading, when the agent checks the policy against its host (an
    address it does not have, a file it cannot read)."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    path: str  # the field path, like egress[2].source.address


@dataclass(frozen=True, kw_only=True)
class SourceBinding:
    """``source:`` of an egress rule: the local addresses its upstream
    connections leave from, at most one per address family. A connection
    whose destination (or gateway) has a family with no address here is
    refused, never sent from another address."""

    addresses: tuple[IPAddress, ...]
    places: tuple[Place, ...] = field(default=(), compare=False)  # one per address

    def for_version(self, version: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == version), None)


@dataclass(frozen=True, kw_only=True)
class GatewayAuth:
    """``via.auth``: Basic proxy credentials for the gateway, read from files
    when a connection needs them (so they rotate without a reload)."""

    username_file: str
    password_file: str
    places: tuple[Place, Place] | None = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True)
class GatewayTls:
    """``via.tls``: speak TLS to the gateway itself. ``ca_file`` (default: the
    system's trust store) verifies its certificate for ``server_name``
    (default: the gateway's host in ``connect``)."""

    ca_file: str | None = None
    server_name: str | None = None
    ca_place: Place | None = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True)
class Gateway:
    """``via:`` of an egress rule: the upstream proxy its flows go through
    (``CONNECT destination``) instead of being dialled directly."""

    host: str  # a host name, or an IP address literal
    port: int
    auth: GatewayAuth | None = None
    tls: GatewayTls | None = None
    place: Place | None = field(default=None, compare=False)

    @property
    def address(self) -> IPAddress | None:
        """``host`` as an address when it is a literal one, else None."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        address = self.address
        if address is not None and address.version == 6:
            return f"[{address}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class EgressRule:
    """What the proxy lets through; the first matching rule wins.

    A rule matches when every field it sets matches: ``sources`` (None = any
    workload), ``hosts`` (TLS SNI or HTTP Host), ``cidrs`` and ``ports`` of the
    original destination. An allow rule's ``hosts`` are bound to addresses as
    ``resolve`` says (see :class:`Resolve` and ``policy.decide``).
    """

    name: str
    action: Action
    sources: tuple[str, ...] | None = None
    hosts: tuple[str, ...] = ()
    cidrs: tuple[IPNetwork, ...] = ()
    ports: tuple[PortRange, ...] = ()
    http: HttpRule | None = None  # only with action allow
    resolve: Resolve = Resolve.VERIFY  # only matters for allow rules with hosts
    # ``mode: audit`` (deny rules only): what the rule would deny is allowed,
    # and audited as ``audit-deny`` with this rule's name.
    audit: bool = False
    # Traffic controls (allow rules only): see ``policy.traffic``.
    limits: Limits | None = None
    breaker: Breaker | None = None
    # Allow rules only: where its upstream connections leave from, and the
    # gateway proxy they go through (see proxy.gateway).
    source: SourceBinding | None = None
    via: Gateway | None = None


# The values of ``proxy.relay``.
RELAY_KERNEL = "kernel"
RELAY_USERSPACE = "userspace"


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    port: int = DEFAULT_PROXY_PORT
    address_v4: ipaddress.IPv4Address = DEFAULT_PROXY_ADDRESS_V4
    address_v6: ipaddress.IPv6Address = DEFAULT_PROXY_ADDRESS_V6
    upstream_mark: int = DEFAULT_UPSTREAM_MARK
    divert_mark: int = DEFAULT_DIVERT_MARK
    cgroup_mark_mask: int = DEFAULT_CGROUP_MARK_MASK
    # Caps on reading the first bytes (TLS ClientHello, HTTP request head).
    # Wire bytes: a 16 KiB ClientHello plus its TLS record and handshake headers.
    peek_bytes: int = 20480
    peek_timeout: float = 5.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    # Caps on connections open at once (transparent and CONNECT): beyond
    # them new ones are reset and audited. Each relayed connection holds two
    # file descriptors; the defaults fit well below the limits systemd and
    # container runtimes give (524288 and more), and the proxy lowers the
    # total further when the process's descriptor limit is smaller.
    max_connections: int = 20000
    max_connections_per_workload: int = 5000
    # Who moves a plain relayed connection's bytes once it is decided: the
    # kernel (splice(2), see proxy.kernel_relay; the proxy falls back to its
    # own relay where the kernel cannot) or the proxy itself (``userspace``).
    relay: str = RELAY_KERNEL


@dataclass(frozen=True, kw_only=True)
class DnsSettings:
    """How the proxy resolves the names it binds to addresses (``dns:``).

    Answers are cached for their TTL, clamped to [``min_ttl``, ``max_ttl``];
    names in use are refreshed before they expire. When the resolver cannot be
    reached, an answer that expired less than ``serve_stale`` seconds ago is
    still used; after that, flows that need the name are refused.
    """

    min_ttl: float = 5.0
    max_ttl: float = 300.0
    serve_stale: float = 30.0
    timeout: float = 2.0  # per lookup (A and AAAA, all nameservers)
    cache_size: int = 10000  # names


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """What the proxy knows about one name's addresses, as data for
    :func:`~egress_agent.policy.decide.decide`.

    ``error`` says why there are no usable addresses (the name does not
    exist, the resolver failed and no recent answer is known); ``stale``
    marks an expired answer used because the resolver cannot be reached.
    """

    addresses: frozenset[IPAddress] = frozenset()
    error: str | None = None
    stale: bool = False


@dataclass(frozen=True, kw_only=True)
class ProxyAuth:
    """Basic proxy credentials a workload presents on the CONNECT listener:
    either a users file (``name:password`` lines) or one user name with a
    password file. Only paths are held here; the secrets stay in the files."""

    users_file: str | None = None
    username: str | None = None
    password_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConnectSettings:
    """The explicit HTTP CONNECT listener for clients that set HTTPS_PROXY.

    It listens on the proxy's own addresses at ``port``; ``auth`` maps
    workload names to the credentials they must present (workloads not
    listed need none).
    """

    port: int
    auth: tuple[tuple[str, ProxyAuth], ...] = ()

    def auth_for(self, workload: str | None) -> ProxyAuth | None:
        for name, auth in self.auth:
            if name == workload:
                return auth
        return None


@dataclass(frozen=True, kw_only=True)
class ReversePath:
    """Interfaces on which the kernel drops packets whose source address is
    not routed back through the interface they arrived on (a strict
    reverse-path check, before conntrack), besides the interfaces workloads
    are bound to, which are always checked. A name ending in ``*`` matches
    every interface that starts with what precedes it (``cali*``)."""

    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Policy:
    version: int
    proxy: ProxySettings
    workloads: tuple[Workload, ...]
    intercept: tuple[InterceptRule, ...]
    egress: tuple[EgressRule, ...]
    default: Action
    # ``enforce: false``: every deny (a rule's or the default's) is audited
    # as ``audit-deny`` and the flow allowed, as if each had ``mode: audit``.
    enforce: bool = True
    # ``default: {action: deny, mode: audit}``: the default's denies only.
    default_audit: bool = False
    # On reload, close open connections the new policy would deny (else they
    # run until they end).
    close_denied_on_reload: bool = False
    # When the agent is not running (crashed, killed), diverted traffic is
    # refused (False, the default) or goes direct (True): see rules.apply.
    fail_open: bool = False
    # The explicit CONNECT listener; None: there is none.
    connect: ConnectSettings | None = None
    dns: DnsSettings = DnsSettings()
    reverse_path: ReversePath = ReversePath()
    source_name: str = field(default="<policy>", compare=False)

    def audited(self) -> tuple[str, ...]:
        """The deny rules (and ``default``) whose denies are only audited."""
        names = [r.name for r in self.egress if r.action is Action.DENY and self.audits(r)]
        if self.default is Action.DENY and self.audits(None):
            names.append("default")
        return tuple(names)

    def audits(self, rule: EgressRule | None) -> bool:
        """Whether a deny by ``rule`` (None: the default) is only audited."""
        if not self.enforce:
            return True
        return rule.audit if rule is not None else self.default_audit

    def reverse_path_interfaces(self) -> tuple[str, ...]:
        """Every interface (or ``name*`` pattern) the reverse-path check runs
        on: those workloads are bound to, then those ``reverse_path`` names."""
        names: list[str] = []
        for w in self.workloads:
            names += [n for n in w.interfaces if n not in names]
        names += [n for n in self.reverse_path.interfaces if n not in names]
        return tuple(names)

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def cgroup_marks(self) -> dict[str, int]:
        """Cgroup workload name -> its socket mark (see :func:`cgroup_marks`)."""
        return cgroup_marks(self.workloads, self.proxy.cgroup_mark_mask)

    def workload_for_mark(self, mark: int) -> str | None:
        """The cgroup workload a socket mark names, or None."""
        field_ = mark & self.proxy.cgroup_mark_mask
        if not field_:
            return None
        for name, value in self.cgroup_marks().items():
            if value == field_:
                return name
        return None


def by_cgroup(w: Workload) -> bool:
    """Whether the workload is identified by cgroups (given, or hostNetwork
    pods' found by the agent): it gets a mark even while it has no cgroup yet,
    so that marks never shift as pods come and go."""
    return bool(w.cgroups) or (w.pods is not None and w.pods.host_network)


def cgroup_marks(workloads: tuple[Workload, ...], mask: int) -> dict[str, int]:
    """Number the cgroup workloads 1, 2, ... in file order and shift the number
    into the mask's lowest set bit: the value each one's sockets carry under
    ``mask``. Raises ValueError when the mask cannot hold them all."""
    if mask <= 0:
        raise ValueError("cgroup_mark_mask must have at least one bit set")
    shift = (mask & -mask).bit_length() - 1
    names = [w.name for w in workloads if by_cgroup(w)]
    out: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        value = number << shift
        if value & ~mask:
            raise ValueError(
                f"{len(names)} cgroup workloads do not fit in cgroup_mark_mask {mask:#x}"
                " (contiguous bits from its lowest set bit): widen the mask"
            )
        out[name] = value
    return out


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The proxy's decision for one connection, with the rule that made it."""

    action: Action
    rule: str  # an egress rule's name, or "default"
    workload: str | None
    http: HttpRule | None = None  # the allow rule's HTTP handling, if it has one
    # The rule matched through its hosts: the client's server name, or a
    # literal host's address for a flow without one (so a plain-HTTP
    # connection must have every request's Host checked).
    by_name: bool = False
    # Where to connect instead of the original destination (resolve: connect).
    upstream: IPAddress | None = None
    # Why a rule that names the server did not match (its name does not own
    # the destination, or could not be resolved): for the audit record of a
    # connection the rest of the policy then refused.
    reason: str | None = None
    # Audit mode: ``rule`` would have denied the flow (``action`` is then
    # allow, and the flow is relayed raw to its original destination).
    audit: bool = False
    # The allow rule's source binding and gateway, if it has them.
    source: SourceBinding | None = None
    via: Gateway | None = None

    @property
    def label(self) -> str:
        """The verdict as the audit record and metrics write it: allow, deny
        or audit-deny."""
        return AUDIT_DENY if self.audit else self.action.value


# The verdict of a flow that audit mode let through instead of denying it.
AUDIT_DENY = "audit-deny"
