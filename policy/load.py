"""Load a policy file into a validated :class:`~egress_agent.policy.model.Policy`.

The agent refuses to start (and a reload keeps the last good policy) unless the
whole file is valid, so this module's job is to say exactly what is wrong: every
problem, not just the first, each with file:line:column, the field path
(``egress[2].to.ports[1]``) and what was expected.

PyYAML's ``safe_load`` throws the positions away and silently keeps the last of
duplicate keys, so the file is *composed* into a node tree (each node carries its
start mark) and the tree is walked here against the version 1 schema. Scalars
are converted with PyYAML's own safe constructor, so ``0x6567`` is an integer
and ``yes`` a boolean (which is not a port) exactly as YAML 1.1 says.

Nothing in a policy may be written as null: an empty ``from:`` that silently
meant "any workload" would widen an allow rule. Empty lists are written ``[]``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egress_agent.policy.model import (
    Action,
    Auth,
    AzureSas,
    AzureSharedKey,
    Bearer,
    ClientTls,
    ConnectSettings,
    DnsSettings,
    EgressRule,
    HeaderValue,
    HttpRule,
    InterceptRule,
    IPAddress,
    IPNetwork,
    NonTcp,
    PodSelector,
    Policy,
    PortRange,
    ProxyAuth,
    ProxySettings,
    Resolve,
    ReversePath,
    Upstream,
    Workload,
    by_cgroup,
    cgroup_marks,
)

SUPPORTED_VERSION = 1

# Workload and egress rule names: safe in audit records, nft comments and paths.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NAME_RULE = "1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
_LABEL_RE = re.compile(r"[A-Za-z0-9-]{1,63}")
_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")
# Linux refuses interface names of IFNAMSIZ (16) bytes or more, "." and "..",
# and any '/', ':' or whitespace: dev_valid_name() in net/core/dev.c.
_IFNAMSIZ = 16
_CIDR_EXAMPLE = "an IPv4 or IPv6 network like 10.0.0.0/16"
_PORT_EXAMPLE = 'a port 1-65535 or a range string like "8000-8100"'

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR = _TAG_PREFIX + "str"
_INT = _TAG_PREFIX + "int"
_FLOAT = _TAG_PREFIX + "float"
_BOOL = _TAG_PREFIX + "bool"
_NULL = _TAG_PREFIX + "null"
_MERGE = _TAG_PREFIX + "merge"

_TOP_KEYS = (
    "version",
    "proxy",
    "workloads",
    "intercept",
    "egress",
    "default",
    "on_reload",
    "fail",
    "connect",
    "dns",
    "reverse_path",
)
_DNS_KEYS = ("min_ttl", "max_ttl", "serve_stale", "timeout", "cache_size")
_RESOLVE_CHOICES = {
    Resolve.VERIFY: "the original destination must be one of the name's addresses; the default",
    Resolve.CONNECT: "connect to one of the name's own addresses, whatever the client dialled",
    Resolve.NONE: "no check: the name alone decides, a forged name reaches any address (unsafe)",
}
_REVERSE_PATH_KEYS = ("interfaces",)
_CONNECT_KEYS = ("port", "auth")
_PROXY_AUTH_KEYS = ("users_file", "username", "password_file")
_ON_RELOAD_KEYS = ("denied_connections",)
_DENIED_CHOICES = ("keep", "close")
_PROXY_KEYS = (
    "port",
    "address_v4",
    "address_v6",
    "upstream_mark",
    "divert_mark",
    "cgroup_mark_mask",
    "peek_bytes",
    "peek_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "max_connections_per_workload",
)
_WORKLOAD_KEYS = ("cidrs", "pods", "interfaces", "cgroups")
_PODS_KEYS = ("namespace", "labels", "namespaceLabels", "hostNetwork")
# Kubernetes label syntax: an optional DNS-subdomain prefix and a name of at
# most 63 characters; values at most 63 characters, possibly empty.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY_RE = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _LABEL_NAME
)
_LABEL_VALUE_RE = re.compile(f"({_LABEL_NAME})?")
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_INTERCEPT_KEYS = ("from", "ports", "except_cidrs", "to_cidrs", "non_tcp")
_EGRESS_KEYS = ("name", "from", "to", "action", "http")
_TO_KEYS = ("hosts", "cidrs", "ports", "resolve")
_HTTP_KEYS = ("client_tls", "upstream", "set_headers", "remove_headers", "auth")
_CLIENT_TLS_KEYS = ("cert", "key")
_UPSTREAM_KEYS = ("tls", "port", "ca_file", "server_name")
_HEADER_VALUE_KEYS = ("value", "file", "format")
_AUTH_KEYS = ("azure_sas", "azure_shared_key", "bearer")
_FILE_KEYS = ("file",)
_SHARED_KEY_KEYS = ("account", "key_file")
# Headers that frame the message or the connection: the proxy owns them, a
# rule may neither set nor remove them (RFC 9110 section 7.6.1, RFC 9112 section 6).
_FRAMING_HEADERS = frozenset(
    (
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    )
)
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Azure storage account names: 3-24 lower-case letters and digits.
_ACCOUNT_RE = re.compile(r"[a-z0-9]{3,24}")
# What a missing required key should hold, for the message.
_EXPECTED = {
    "version": f"the integer {SUPPORTED_VERSION}",
    "workloads": "a mapping of workload name to {cidrs: [...]}",
    "default": "allow or deny",
    "cidrs": "a non-empty list of CIDRs like 10.0.0.0/24",
    "from": "a non-empty list of workload names",
    "name": "a rule name",
    "action": "allow or deny",
    "port": "the CONNECT listener's TCP port, e.g. 3128",
}


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a policy, where it is and what was expected.

    ``line`` and ``column`` are 1-based; both are 0 when the problem is the file
    itself (missing, unreadable). ``path`` is empty for the document as a whole.
    """

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class PolicyError(Exception):
    """The policy is not valid; ``problems`` holds everything that was found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at ``path``; raise :class:`PolicyError`."""
    return parse_policy(read_policy_text(path), source_name=os.fspath(path))


def read_policy_text(path: str | os.PathLike[str]) -> str:
    """The policy file's text; a file that cannot be read raises :class:`PolicyError`
    saying what to do."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _file_error(name, "no such file: check the path given with --policy") from None
    except IsADirectoryError:
        raise _file_error(name, "this is a directory: give the path of the policy file") from None
    except PermissionError:
        raise _file_error(
            name, "permission denied: make the file readable by the user running the agent"
        ) from None
    except UnicodeDecodeError as exc:
        raise _file_error(
            name, f"not UTF-8 text (byte {exc.start} cannot be decoded): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise _file_error(name, f"cannot read the file: {exc.strerror or exc}") from None
    return text


def parse_policy(text: str, *, source_name: str = "<policy>") -> Policy:
    """Validate policy ``text``; raise :class:`PolicyError` listing every problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise PolicyError([_syntax_problem(exc, source_name)]) from None
    except yaml.reader.ReaderError as exc:
        line, column = _position(text, int(exc.position))
        message = f"YAML cannot read this character: {exc.reason} (#x{exc.character:04x})"
        raise PolicyError(
            [Problem(file=source_name, line=line, column=column, path="", message=message)]
        ) from None
    except yaml.YAMLError as exc:  # no position known
        problem = Problem(file=source_name, line=1, column=1, path="", message=f"YAML: {exc}")
        raise PolicyError([problem]) from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
        message = (
            "the policy is empty: expected a mapping with at least version, workloads and"
            " default (see the example in the README)"
        )
        raise PolicyError([Problem(file=source_name, line=1, column=1, path="", message=message)])
    reader = _Reader(source_name)
    policy = reader.policy(root)
    if reader.problems:
        raise PolicyError(sorted(reader.problems, key=lambda p: (p.line, p.column)))
    return policy


def _file_error(name: str, message: str) -> PolicyError:
    return PolicyError([Problem(file=name, line=0, column=0, path="", message=message)])


def _syntax_problem(exc: yaml.MarkedYAMLError, source_name: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    problem = (exc.problem or "cannot parse").removeprefix("but ")
    message = f"YAML syntax error: {problem}"
    if exc.context and exc.context_mark is not None:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    elif exc.context:
        message += f" ({exc.context})"
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return Problem(file=source_name, line=line, column=column, path="", message=message)


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Walks the composed node tree against the schema, collecting problems.

    Each reading method returns the value or None after recording why there is
    none, so one pass finds every problem; the Policy it builds from the
    remaining parts is only returned when there were none.
    """

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.problems: list[Problem] = []
        # A fresh constructor per load: it caches constructed objects by node.
        self._constructor = SafeConstructor()

    def problem(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(
            Problem(
                file=self.source_name,
                line=mark.line + 1,
                column=mark.column + 1,
                path=path,
                message=message,
            )
        )

    # -- the schema -------------------------------------------------------

    def policy(self, root: Node) -> Policy:
        top = self.mapping(root, "", what="the policy", allowed=_TOP_KEYS)
        if top is None:
            return _EMPTY_POLICY
        self.require(root, "", top, ("version", "workloads", "default"))

        if "version" in top:
            self.version(top["version"][1])
        proxy = ProxySettings()
        if "proxy" in top:
            proxy = self.proxy(top["proxy"][1], "proxy")
        workloads: tuple[Workload, ...] = ()
        known: dict[str, Workload] | None = {}
        if "workloads" in top:
            known = self.workloads(top["workloads"][1], "workloads")
            workloads = tuple(known.values()) if known is not None else ()
        if any(by_cgroup(w) for w in workloads):
            try:
                cgroup_marks(workloads, proxy.cgroup_mark_mask)
            except ValueError as exc:
                self.problem(top["workloads"][1], "workloads", str(exc))
        intercept: tuple[InterceptRule, ...] = ()
        if "intercept" in top:
            intercept = self.intercept(top["intercept"][1], "intercept", known)
        egress: tuple[EgressRule, ...] = ()
        if "egress" in top:
            egress = self.egress(top["egress"][1], "egress", known)
        default = Action.DENY
        if "default" in top:
            default = self.action(top["default"][1], "default") or Action.DENY
        close_denied = False
        if "on_reload" in top:
            close_denied = self.on_reload(top["on_reload"][1], "on_reload")
        fail_open = False
        if "fail" in top:
            fail_open = self.fail(top["fail"][1], "fail")
        connect = None
        if "connect" in top:
            connect = self.connect(top["connect"][1], "connect", known, proxy)
        dns = DnsSettings()
        if "dns" in top:
            dns = self.dns(top["dns"][1], "dns")
        reverse_path = ReversePath()
        if "reverse_path" in top:
            reverse_path = self.reverse_path(top["reverse_path"][1], "reverse_path")

        return Policy(
            version=SUPPORTED_VERSION,
            proxy=proxy,
            workloads=workloads,
            intercept=intercept,
            egress=egress,
            default=default,
            close_denied_on_reload=close_denied,
            fail_open=fail_open,
            connect=connect,
            dns=dns,
            reverse_path=reverse_path,
            source_name=self.source_name,
        )

    def version(self, node: Node) -> None:
        value = self.scalar(node, "version")
        if value is None:
            return
        if type(value) is not int:
            expected = f"expected the integer {SUPPORTED_VERSION}"
            self.problem(node, "version", f"{expected}, found {self.describe(node)}")
        elif value != SUPPORTED_VERSION:
            self.problem(
                node,
                "version",
                f"unsupported version {value}: this egress-agent reads version"
                f" {SUPPORTED_VERSION} policies",
            )

    def proxy(self, node: Node, path: str) -> ProxySettings:
        fields = self.mapping(node, path, what="proxy settings", allowed=_PROXY_KEYS)
        defaults = ProxySettings()
        if fields is None:
            return defaults

        def value(key: str) -> Node | None:
            return fields[key][1] if key in fields else None

        def int_field(key: str, low: int, high: int, default: int, *, hex_: bool = False) -> int:
            n = value(key)
            if n is None:
                return default
            got = self.integer(n, _join(path, key), low=low, high=high, hex_=hex_)
            return default if got is None else got

        def seconds_field(key: str, high: float, default: float) -> float:
            n = value(key)
            if n is None:
                return default
            got = self.seconds(n, _join(path, key), high=high)
            return default if got is None else got

        address_v4 = defaults.address_v4
        if (n := value("address_v4")) is not None:
            got = self.address(n, _join(path, "address_v4"), version=4)
            if isinstance(got, ipaddress.IPv4Address):
                address_v4 = got
        address_v6 = defaults.address_v6
        if (n := value("address_v6")) is not None:
            got = self.address(n, _join(path, "address_v6"), version=6)
            if isinstance(got, ipaddress.IPv6Address):
                address_v6 = got
        upstream_mark = int_field("upstream_mark", 1, 0xFFFFFFFF, defaults.upstream_mark, hex_=True)
        divert_mark = int_field("divert_mark", 1, 0xFFFFFFFF, defaults.divert_mark, hex_=True)
        cgroup_mark_mask = int_field(
            "cgroup_mark_mask", 1, 0xFFFFFFFF, defaults.cgroup_mark_mask, hex_=True
        )
        for other, mark in (("upstream_mark", upstream_mark), ("divert_mark", divert_mark)):
            if cgroup_mark_mask & mark and (n := value("cgroup_mark_mask")) is not None:
                self.problem(
                    n,
                    _join(path, "cgroup_mark_mask"),
                    f"cgroup_mark_mask {cgroup_mark_mask:#x} shares bits with {other}"
                    f" {mark:#x}: give the cgroup workloads' marks bits of their own",
                )
        max_connections = int_field("max_connections", 1, 1_000_000, defaults.max_connections)
        per_workload = int_field(
            "max_connections_per_workload", 1, 1_000_000, defaults.max_connections_per_workload
        )
        n = value("max_connections_per_workload")
        if per_workload > max_connections and n is not None:
            self.problem(
                n,
                _join(path, "max_connections_per_workload"),
                f"max_connections_per_workload {per_workload} is above max_connections"
                f" {max_connections}: no workload could reach it; lower it or raise"
                " max_connections",
            )
        return ProxySettings(
            port=int_field("port", 1, 65535, defaults.port),
            address_v4=address_v4,
            address_v6=address_v6,
            upstream_mark=upstream_mark,
            divert_mark=divert_mark,
            cgroup_mark_mask=cgroup_mark_mask,
            peek_bytes=int_field("peek_bytes", 512, 65536, defaults.peek_bytes),
            peek_timeout=seconds_field("peek_timeout", 60, defaults.peek_timeout),
            connect_timeout=seconds_field("connect_timeout", 300, defaults.connect_timeout),
            idle_timeout=seconds_field("idle_timeout", 86400, defaults.idle_timeout),
            max_connections=max_connections,
            max_connections_per_workload=min(per_workload, max_connections),
        )

    def workloads(self, node: Node, path: str) -> dict[str, Workload] | None:
        """The workloads by name (also those with invalid contents, so that
        references to them are not reported twice); None when the section
        itself is unusable and references cannot be checked."""
        entries = self.named_entries(node, path, what="workloads (name: {cidrs: [...]})")
        if entries is None:
            return None
        result: dict[str, Workload] = {}
        owners: dict[IPNetwork, tuple[str, Node]] = {}
        for name, _key_node, value_node in entries:
            w_path = _join(path, name)
            fields = self.mapping(
                value_node, w_path, what=f"workload {name!r}", allowed=_WORKLOAD_KEYS
            )
            cidrs: list[IPNetwork] = []
            interfaces: tuple[str, ...] = ()
            pods: PodSelector | None = None
            cgroups: tuple[str, ...] = ()
            if fields is not None and "cgroups" in fields:
                others = [k for k in ("cidrs", "pods", "interfaces") if k in fields]
                if others:
                    self.problem(
                        fields["cgroups"][0],
                        _join(w_path, "cgroups"),
                        f"workload {name!r} has both cgroups and {others[0]}: a workload is"
                        " recognised either by its cgroups (node processes) or by addresses",
                    )
                cgroups = self.cgroup_paths(fields["cgroups"][1], _join(w_path, "cgroups"))
            elif fields is not None:
                if "pods" in fields and "cidrs" in fields:
                    self.problem(
                        fields["pods"][0],
                        _join(w_path, "pods"),
                        f"workload {name!r} has both cidrs and pods: give one of them"
                        " (addresses, or Kubernetes pods whose addresses the agent discovers)",
                    )
                elif "pods" in fields:
                    pods = self.pod_selector(fields["pods"][1], _join(w_path, "pods"))
                else:
                    self.require(value_node, w_path, fields, ("cidrs",))
                if "cidrs" in fields:
                    c_path = _join(w_path, "cidrs")
                    items = self.sequence(fields["cidrs"][1], c_path, what="a list of CIDRs")
                    if items is not None and not items:
                        self.problem(
                            fields["cidrs"][1],
                            c_path,
                            f"workload {name!r} needs at least one CIDR: a workload is"
                            " recognised by its source addresses",
                        )
                    for i, item in enumerate(items or ()):
                        net = self.network(item, f"{c_path}[{i}]")
                        if net is None:
                            continue
                        cidrs.append(net)
                        owner = owners.setdefault(net, (name, item))
                        if owner[0] != name:
                            self.problem(
                                item,
                                f"{c_path}[{i}]",
                                f"{net} is also a CIDR of workload {owner[0]!r} (line"
                                f" {owner[1].start_mark.line + 1}): an address must identify one"
                                " workload; give this network to only one of them (a longer or"
                                " shorter prefix may overlap: the longest prefix wins)",
                            )
                if "interfaces" in fields:
                    interfaces = self.interfaces(
                        fields["interfaces"][1], _join(w_path, "interfaces")
                    )
            result[name] = Workload(
                name=name, cidrs=tuple(cidrs), interfaces=interfaces, pods=pods, cgroups=cgroups
            )
        return result

    def cgroup_paths(self, node: Node, path: str) -> tuple[str, ...]:
        """Cgroup v2 paths relative to the cgroup2 mount, like
        ``system.slice/backup.service``: no leading slash, no ``..``."""
        items = self.sequence(node, path, what="a list of cgroup paths")
        if items is not None and not items:
            self.problem(
                node,
                path,
                "needs at least one cgroup path like system.slice/backup.service",
            )
        paths: list[str] = []
        for i, item in enumerate(items or ()):
            i_path = f"{path}[{i}]"
            text = self.text(item, i_path, what="a cgroup path")
            if text is None:
                continue
            why = _cgroup_path_problem(text)
            if why:
                self.problem(item, i_path, f"{text!r} is not a usable cgroup path: {why}")
                continue
            paths.append(text.rstrip("/"))
        return tuple(paths)

    def pod_selector(self, node: Node, path: str) -> PodSelector | None:
        fields = self.mapping(node, path, what="a pod selector", allowed=_PODS_KEYS)
        if fields is None:
            return None
        if not set(fields) - {"hostNetwork"}:
            self.problem(
                node,
                path,
                "an empty pod selector would select every pod on the node: give a"
                " namespace, labels or namespaceLabels",
            )
            return None
        host_network = False
        if "hostNetwork" in fields:
            host_network = self.boolean(
                fields["hostNetwork"][1], _join(path, "hostNetwork"), default=False
            )
        namespace = None
        if "namespace" in fields:
            n_node = fields["namespace"][1]
            namespace = self.text(n_node, _join(path, "namespace"), what="a namespace name")
            if namespace is not None and not _NAMESPACE_RE.fullmatch(namespace):
                self.problem(
                    n_node,
                    _join(path, "namespace"),
                    f"{namespace!r} is not a namespace name: expected lower-case letters,"
                    " digits and '-', at most 63 characters",
                )
        labels = (
            self.labels(fields["labels"][1], _join(path, "labels")) if "labels" in fields else ()
        )
        ns_labels = (
            self.labels(fields["namespaceLabels"][1], _join(path, "namespaceLabels"))
            if "namespaceLabels" in fields
            else ()
        )
        return PodSelector(
            namespace=namespace,
            labels=labels,
            namespace_labels=ns_labels,
            host_network=host_network,
        )

    def labels(self, node: Node, path: str) -> tuple[tuple[str, str], ...]:
        entries = self.entries(node, path, what="labels (a mapping of key: value)")
        pairs: list[tuple[str, str]] = []
        for key, key_node, value_node in entries or ():
            k_path = _join(path, key)
            if not _LABEL_KEY_RE.fullmatch(key) or len(key.rpartition("/")[2]) > 63:
                self.problem(
                    key_node,
                    k_path,
                    f"{key!r} is not a label key: expected [prefix/]name, the name at most"
                    " 63 letters, digits, '-', '_' or '.'",
                )
                continue
            value = self.scalar(value_node, k_path, what="a label value")
            if not isinstance(value, str):
                if value is not None:
                    self.problem(
                        value_node,
                        k_path,
                        f"expected a label value as a string, found {self.describe(value_node)}:"
                        ' quote it, e.g. "true" or "5"',
                    )
                continue
            if not _LABEL_VALUE_RE.fullmatch(value):
                self.problem(
                    value_node,
                    k_path,
                    f"{value!r} is not a label value: at most 63 letters, digits, '-', '_'"
                    " or '.', starting and ending with a letter or digit",
                )
                continue
            pairs.append((key, value))
        return tuple(sorted(pairs))

    def interfaces(self, node: Node, path: str) -> tuple[str, ...]:
        items = self.sequence(node, path, what="a list of interface names")
        names: list[str] = []
        for i, item in enumerate(items or ()):
            i_path = f"{path}[{i}]"
            name = self.text(item, i_path, what="an interface name")
            if name is None:
                continue
            why = _interface_name_problem(name)
            if why:
                self.problem(item, i_path, f"{name!r} is not a valid interface name: {why}")
                continue
            names.append(name)
        return tuple(names)

    def intercept(
        self, node: Node, path: str, known: dict[str, Workload] | None
    ) -> tuple[InterceptRule, ...]:
        items = self.sequence(node, path, what="a list of intercept rules ([] for none)")
        rules: list[InterceptRule] = []
        for index, item in enumerate(items or ()):
            r_path = f"{path}[{index}]"
            fields = self.mapping(item, r_path, what="an intercept rule", allowed=_INTERCEPT_KEYS)
            if fields is None:
                continue
            self.require(item, r_path, fields, ("from",))
            sources: tuple[str, ...] = ()
            if "from" in fields:
                sources = self.sources(fields["from"][1], _join(r_path, "from"), known)
            ports: tuple[PortRange, ...] = ()
            if "ports" in fields:
                ports = self.ports(fields["ports"][1], _join(r_path, "ports"))
            except_cidrs: tuple[IPNetwork, ...] = ()
            if "except_cidrs" in fields:
                except_cidrs = self.networks(
                    fields["except_cidrs"][1], _join(r_path, "except_cidrs")
                )
            to_cidrs: tuple[IPNetwork, ...] = ()
            if "to_cidrs" in fields:
                to_cidrs = self.networks(fields["to_cidrs"][1], _join(r_path, "to_cidrs"))
            non_tcp = NonTcp.PASS
            if "non_tcp" in fields:
                non_tcp = self.non_tcp(fields["non_tcp"][1], _join(r_path, "non_tcp"))
            rules.append(
                InterceptRule(
                    index=index,
                    sources=sources,
                    ports=ports,
                    except_cidrs=except_cidrs,
                    to_cidrs=to_cidrs,
                    non_tcp=non_tcp,
                )
            )
        return tuple(rules)

    def egress(
        self, node: Node, path: str, known: dict[str, Workload] | None
    ) -> tuple[EgressRule, ...]:
        items = self.sequence(node, path, what="a list of egress rules ([] for none)")
        rules: list[EgressRule] = []
        first_by_name: dict[str, Node] = {}
        for index, item in enumerate(items or ()):
            r_path = f"{path}[{index}]"
            fields = self.mapping(item, r_path, what="an egress rule", allowed=_EGRESS_KEYS)
            if fields is None:
                continue
            self.require(item, r_path, fields, ("name", "action"))
            name = f"#{index}"  # only seen if the rule is invalid
            if "name" in fields:
                n_node = fields["name"][1]
                n_path = _join(r_path, "name")
                got = self.name(n_node, n_path, what="an egress rule name")
                if got == "default":
                    self.problem(
                        n_node,
                        n_path,
                        "'default' is reserved: verdicts made by the default action carry"
                        " that name; choose another name",
                    )
                elif got is not None and got in first_by_name:
                    first = first_by_name[got]
                    self.problem(
                        n_node,
                        n_path,
                        f"duplicate egress rule name {got!r}: already used at line"
                        f" {first.start_mark.line + 1}; names identify rules in the audit"
                        " log, give each rule its own",
                    )
                elif got is not None:
                    first_by_name[got] = n_node
                    name = got
            sources: tuple[str, ...] | None = None
            if "from" in fields:
                f_node = fields["from"][1]
                sources = self.sources(f_node, _join(r_path, "from"), known, empty_hint=True)
            hosts: tuple[str, ...] = ()
            cidrs: tuple[IPNetwork, ...] = ()
            ports: tuple[PortRange, ...] = ()
            resolve = Resolve.VERIFY
            resolve_key: tuple[Node, str] | None = None
            if "to" in fields:
                t_path = _join(r_path, "to")
                to = self.mapping(fields["to"][1], t_path, what="a destination", allowed=_TO_KEYS)
                if to is not None:
                    if "hosts" in to:
                        hosts = self.hosts(to["hosts"][1], _join(t_path, "hosts"))
                    if "cidrs" in to:
                        cidrs = self.networks(to["cidrs"][1], _join(t_path, "cidrs"))
                    if "ports" in to:
                        ports = self.ports(to["ports"][1], _join(t_path, "ports"))
                    if "resolve" in to:
                        resolve_key = (to["resolve"][0], _join(t_path, "resolve"))
                        resolve = self.resolve(to["resolve"][1], resolve_key[1])
                        if "hosts" not in to:
                            self.problem(
                                resolve_key[0],
                                resolve_key[1],
                                "resolve says how a rule's hosts are bound to addresses, and"
                                " this rule has no hosts: remove it, or add hosts",
                            )
            action = Action.DENY
            if "action" in fields:
                action = self.action(fields["action"][1], _join(r_path, "action")) or Action.DENY
            if resolve_key is not None and "action" in fields and action is Action.DENY:
                self.problem(
                    resolve_key[0],
                    resolve_key[1],
                    "resolve applies to allow rules only: a deny rule refuses what names its"
                    " hosts, wherever it goes (deny addresses with cidrs); remove it",
                )
            http: HttpRule | None = None
            if "http" in fields:
                h_key, h_node = fields["http"]
                h_path = _join(r_path, "http")
                http = self.http(h_node, h_path)
                if "action" in fields and action is not Action.ALLOW:
                    self.problem(
                        h_key,
                        h_path,
                        "an http section only applies to action allow: a denied connection"
                        " carries no requests; remove it or make the rule allow",
                    )
            rules.append(
                EgressRule(
                    name=name,
                    action=action,
                    sources=sources,
                    hosts=hosts,
                    cidrs=cidrs,
                    ports=ports,
                    http=http,
                    resolve=resolve,
                )
            )
        return tuple(rules)

    def resolve(self, node: Node, path: str) -> Resolve:
        """``to.resolve: verify | connect | none`` of an egress rule."""
        value = self.scalar(node, path, what="verify, connect or none")
        for choice in Resolve:
            if value == choice.value:
                return choice
        if value is not None:
            choices = "; ".join(f"{c.value} ({why})" for c, why in _RESOLVE_CHOICES.items())
            self.problem(node, path, f"expected one of {choices}; found {self.describe(node)}")
        return Resolve.VERIFY

    def dns(self, node: Node, path: str) -> DnsSettings:
        """``dns: {min_ttl, max_ttl, serve_stale, timeout, cache_size}``."""
        fields = self.mapping(node, path, what="DNS settings", allowed=_DNS_KEYS)
        defaults = DnsSettings()
        if fields is None:
            return defaults

        def seconds(key: str, high: float, default: float, *, zero: bool = False) -> float:
            if key not in fields:
                return default
            k_node = fields[key][1]
            if zero and isinstance(k_node, ScalarNode) and k_node.value in ("0", "0.0"):
                return 0.0
            got = self.seconds(k_node, _join(path, key), high=high)
            return default if got is None else got

        min_ttl = seconds("min_ttl", 3600, defaults.min_ttl)
        max_ttl = seconds("max_ttl", 86400, defaults.max_ttl)
        if max_ttl < min_ttl and "max_ttl" in fields:
            self.problem(
                fields["max_ttl"][1],
                _join(path, "max_ttl"),
                f"max_ttl {max_ttl:g} is below min_ttl {min_ttl:g}: the ceiling on TTLs must"
                " be at least the floor",
            )
        elif max_ttl < min_ttl:
            self.problem(
                fields["min_ttl"][1],
                _join(path, "min_ttl"),
                f"min_ttl {min_ttl:g} is above max_ttl ({max_ttl:g}, the default): set a"
                " max_ttl of at least the floor too",
            )
        cache_size = defaults.cache_size
        if "cache_size" in fields:
            got = self.integer(fields["cache_size"][1], _join(path, "cache_size"), low=16,
                               high=1_000_000)  # fmt: skip
            cache_size = defaults.cache_size if got is None else got
        return DnsSettings(
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            serve_stale=seconds("serve_stale", 86400, defaults.serve_stale, zero=True),
            timeout=seconds("timeout", 60, defaults.timeout),
            cache_size=cache_size,
        )

    # -- http sections ------------------------------------------------------

    def http(self, node: Node, path: str) -> HttpRule | None:
        fields = self.mapping(node, path, what="an http section", allowed=_HTTP_KEYS)
        if fields is None:
            return None
        client_tls: ClientTls | None = None
        if "client_tls" in fields:
            client_tls = self.client_tls(fields["client_tls"][1], _join(path, "client_tls"))
        upstream = self.upstream(
            fields["upstream"][1] if "upstream" in fields else None,
            _join(path, "upstream"),
            tls_default=client_tls is not None,
        )
        set_headers: tuple[tuple[str, HeaderValue], ...] = ()
        if "set_headers" in fields:
            set_headers = self.set_headers(fields["set_headers"][1], _join(path, "set_headers"))
        remove: tuple[str, ...] = ()
        if "remove_headers" in fields:
            remove = self.remove_headers(
                fields["remove_headers"][1], _join(path, "remove_headers"), set_headers
            )
        auth: Auth | None = None
        if "auth" in fields:
            auth = self.auth(fields["auth"][1], _join(path, "auth"))
            names = {n.lower(): n for n, _ in set_headers}
            if isinstance(auth, AzureSharedKey | Bearer) and "authorization" in names:
                self.problem(
                    fields["auth"][0],
                    _join(path, "auth"),
                    f"auth sets the Authorization header, and so does set_headers"
                    f".{names['authorization']}: keep one of them",
                )
        return HttpRule(
            client_tls=client_tls,
            upstream=upstream,
            set_headers=set_headers,
            remove_headers=remove,
            auth=auth,
        )

    def client_tls(self, node: Node, path: str) -> ClientTls | None:
        fields = self.mapping(
            node, path, what="client TLS settings {cert, key}", allowed=_CLIENT_TLS_KEYS
        )
        if fields is None:
            return None
        for key in _CLIENT_TLS_KEYS:
            if key not in fields:
                self.problem(
                    node,
                    _join(path, key),
                    f"missing required key {key!r}: expected the path of a PEM {key} file",
                )
        cert_path: str | None = None
        key_path: str | None = None
        if "cert" in fields:
            cert_path = self.file_path(fields["cert"][1], _join(path, "cert"))
        if "key" in fields:
            key_path = self.file_path(fields["key"][1], _join(path, "key"))
        if cert_path is None or key_path is None:
            return None
        return ClientTls(cert=cert_path, key=key_path)

    def upstream(self, node: Node | None, path: str, *, tls_default: bool) -> Upstream:
        if node is None:
            return Upstream(tls=tls_default)
        fields = self.mapping(node, path, what="upstream settings", allowed=_UPSTREAM_KEYS)
        if fields is None:
            return Upstream(tls=tls_default)
        tls = tls_default
        if "tls" in fields:
            tls = self.boolean(fields["tls"][1], _join(path, "tls"), default=tls_default)
        port = None
        if "port" in fields:
            port = self.integer(fields["port"][1], _join(path, "port"), low=1, high=65535)
        ca_file = None
        if "ca_file" in fields:
            ca_file = self.file_path(fields["ca_file"][1], _join(path, "ca_file"))
        server_name = None
        if "server_name" in fields:
            s_node = fields["server_name"][1]
            s_path = _join(path, "server_name")
            text = self.text(s_node, s_path, what="a host name like api.example.org")
            if text is not None:
                host, why = _host_pattern(text)
                if host is None or host.startswith("*."):
                    why = why or "a wildcard names no one server"
                    self.problem(s_node, s_path, f"{text!r} is not a host name: {why}")
                else:
                    server_name = host
        return Upstream(tls=tls, port=port, ca_file=ca_file, server_name=server_name)

    def set_headers(self, node: Node, path: str) -> tuple[tuple[str, HeaderValue], ...]:
        entries = self.entries(node, path, what="headers to set (name: {value|file: ...})")
        result: list[tuple[str, HeaderValue]] = []
        seen: dict[str, Node] = {}
        for name, key_node, value_node in entries or ():
            n_path = _join(path, name)
            if not self.header_name(key_node, n_path, name):
                continue
            lower = name.lower()
            if lower in seen:
                self.problem(
                    key_node,
                    n_path,
                    f"header {name!r} is already set at line {seen[lower].start_mark.line + 1}"
                    " (header names are case-insensitive): keep one",
                )
                continue
            seen[lower] = key_node
            value = self.header_value(value_node, n_path)
            if value is not None:
                result.append((name, value))
        return tuple(result)

    def header_value(self, node: Node, path: str) -> HeaderValue | None:
        fields = self.mapping(
            node,
            path,
            what="a header value {value: ...} or {file: ...}",
            allowed=_HEADER_VALUE_KEYS,
        )
        if fields is None:
            return None
        if ("value" in fields) == ("file" in fields):
            self.problem(
                node,
                path,
                "give exactly one of value (the text itself) or file (a file whose content"
                " is the value, re-read when it changes)",
            )
            return None
        fmt = "{}"
        if "format" in fields:
            f_node = fields["format"][1]
            f_path = _join(path, "format")
            got = self.text(f_node, f_path, what='a format like "Bearer {}"')
            if got is not None:
                if "file" not in fields:
                    self.problem(f_node, f_path, "format applies to file values only")
                elif got.count("{}") != 1:
                    self.problem(
                        f_node,
                        f_path,
                        f"{got!r} must contain {{}} exactly once, where the file content goes"
                        ' (like "Bearer {}")',
                    )
                elif not _header_text_ok(got.replace("{}", "")):
                    self.problem(f_node, f_path, "control characters are not allowed in headers")
                else:
                    fmt = got
        if "value" in fields:
            v_node = fields["value"][1]
            v_path = _join(path, "value")
            text = self.text(v_node, v_path, what="the header value as a string")
            if text is None:
                return None
            if not _header_text_ok(text):
                self.problem(
                    v_node,
                    v_path,
                    "control characters (newlines, tabs aside) are not allowed in a header value",
                )
                return None
            return HeaderValue(value=text.strip(" \t"))
        file = self.file_path(fields["file"][1], _join(path, "file"))
        if file is None:
            return None
        return HeaderValue(file=file, format=fmt)

    def remove_headers(
        self, node: Node, path: str, set_headers: tuple[tuple[str, HeaderValue], ...]
    ) -> tuple[str, ...]:
        items = self.sequence(node, path, what="a list of header names")
        names: list[str] = []
        set_names = {n.lower() for n, _ in set_headers}
        for i, item in enumerate(items or ()):
            i_path = f"{path}[{i}]"
            name = self.text(item, i_path, what="a header name")
            if name is None or not self.header_name(item, i_path, name):
                continue
            if name.lower() in set_names:
                self.problem(
                    item,
                    i_path,
                    f"header {name!r} is also in set_headers, which replaces it anyway:"
                    " remove it from one of the two",
                )
                continue
            names.append(name)
        return tuple(names)

    def header_name(self, node: Node, path: str, name: str) -> bool:
        if not _HEADER_NAME_RE.fullmatch(name):
            self.problem(
                node, path, f"{name!r} is not a header name: expected a token like X-Api-Key"
            )
            return False
        if name.lower() in _FRAMING_HEADERS:
            self.problem(
                node,
                path,
                f"{name!r} frames the message or the connection and is managed by the proxy:"
                " a rule cannot set or remove it",
            )
            return False
        return True

    def auth(self, node: Node, path: str) -> Auth | None:
        fields = self.mapping(node, path, what="an auth section", allowed=_AUTH_KEYS)
        if fields is None:
            return None
        if len(fields) != 1:
            self.problem(
                node,
                path,
                "give exactly one of azure_sas, azure_shared_key or bearer",
            )
            return None
        ((key, (_key_node, value_node)),) = fields.items()
        a_path = _join(path, key)
        if key == "azure_shared_key":
            sk = self.mapping(
                value_node, a_path, what="{account, key_file}", allowed=_SHARED_KEY_KEYS
            )
            if sk is None:
                return None
            account = key_file = None
            if "account" not in sk:
                self.problem(
                    value_node, _join(a_path, "account"),
                    "missing required key 'account': the storage account name",
                )  # fmt: skip
            else:
                a_node = sk["account"][1]
                account = self.text(a_node, _join(a_path, "account"), what="an account name")
                if account is not None and not _ACCOUNT_RE.fullmatch(account):
                    self.problem(
                        a_node,
                        _join(a_path, "account"),
                        f"{account!r} is not a storage account name: 3-24 lower-case letters"
                        " and digits",
                    )
                    account = None
            if "key_file" not in sk:
                self.problem(
                    value_node, _join(a_path, "key_file"),
                    "missing required key 'key_file': the file holding the account key",
                )  # fmt: skip
            else:
                key_file = self.file_path(sk["key_file"][1], _join(a_path, "key_file"))
            if account is None or key_file is None:
                return None
            return AzureSharedKey(account=account, key_file=key_file)
        f = self.mapping(value_node, a_path, what="{file: PATH}", allowed=_FILE_KEYS)
        if f is None:
            return None
        if "file" not in f:
            self.problem(
                value_node, _join(a_path, "file"),
                "missing required key 'file': the file holding the credential",
            )  # fmt: skip
            return None
        file = self.file_path(f["file"][1], _join(a_path, "file"))
        if file is None:
            return None
        return AzureSas(file=file) if key == "azure_sas" else Bearer(file=file)

    def file_path(self, node: Node, path: str) -> str | None:
        """An absolute file path. The file need not exist yet: secrets and
        certificates may be mounted after the policy loads, and are read when
        a connection needs them."""
        text = self.text(node, path, what="an absolute file path")
        if text is None:
            return None
        if not text.startswith("/") or "\0" in text:
            self.problem(
                node,
                path,
                f"{text!r} is not an absolute path: write it from /, like /run/secrets/x",
            )
            return None
        return text

    # -- field types --------------------------------------------------------

    def sources(
        self,
        node: Node,
        path: str,
        known: dict[str, Workload] | None,
        *,
        empty_hint: bool = False,
    ) -> tuple[str, ...]:
        items = self.sequence(node, path, what="a list of workload names")
        if items is None:
            return ()
        if not items:
            hint = "; leave out `from` to match traffic from any workload" if empty_hint else ""
            self.problem(node, path, f"expected at least one workload name{hint}")
            return ()
        names: list[str] = []
        for i, item in enumerate(items):
            i_path = f"{path}[{i}]"
            name = self.text(item, i_path, what="a workload name")
            if name is None:
                continue
            if known is not None and name not in known:
                existing = ", ".join(sorted(known)) if known else "none are defined"
                self.problem(
                    item,
                    i_path,
                    f"unknown workload {name!r}{_did_you_mean(name, known)}; workloads: {existing}",
                )
                continue
            names.append(name)
        return tuple(names)

    def networks(self, node: Node, path: str) -> tuple[IPNetwork, ...]:
        items = self.sequence(node, path, what="a list of CIDRs")
        nets = (self.network(item, f"{path}[{i}]") for i, item in enumerate(items or ()))
        return tuple(n for n in nets if n is not None)

    def network(self, node: Node, path: str) -> IPNetwork | None:
        # Take the scalar's text whatever YAML resolved it to: an unquoted IPv6
        # address such as 1:2:3:4:5:6:7:8 is a YAML 1.1 base-60 integer.
        text = self.text(node, path, what=_CIDR_EXAMPLE, raw=True)
        if text is None:
            return None
        if "%" in text:
            self.problem(
                node, path, f"{text!r} has an IPv6 zone (%...): write the network without it"
            )
            return None
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            self.problem(node, path, _network_message(text, exc))
            return None
        mapped = net.network_address.ipv4_mapped if net.version == 6 else None
        if mapped is not None and net.prefixlen >= 96:
            v4 = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
            self.problem(
                node,
                path,
                f"{text!r} is an IPv4-mapped IPv6 network: policy compares IPv4 traffic"
                f" by its IPv4 address, write {v4}",
            )
            return None
        return net

    def address(self, node: Node, path: str, *, version: int) -> IPAddress | None:
        text = self.text(node, path, what=f"an IPv{version} address", raw=True)
        if text is None:
            return None
        example = "169.254.99.1" if version == 4 else '"fd65:6772:6573::1"'
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            addr = None
        if addr is None or addr.version != version or "%" in text:
            self.problem(
                node, path, f"{text!r} is not an IPv{version} address: expected one like {example}"
            )
            return None
        return addr

    def ports(self, node: Node, path: str) -> tuple[PortRange, ...]:
        items = self.sequence(node, path, what="a list of ports ([] for every port)")
        result: list[PortRange] = []
        for i, item in enumerate(items or ()):
            got = self.port_range(item, f"{path}[{i}]")
            if got is not None:
                result.append(got)
        return tuple(result)

    def port_range(self, node: Node, path: str) -> PortRange | None:
        if isinstance(node, ScalarNode) and node.tag == _INT and ":" in node.value:
            self.problem(
                node,
                path,
                f"{node.value} is a YAML 1.1 base-60 number, not a port range: write a range"
                f' as a string like "8000-8100"',
            )
            return None
        value = self.scalar(node, path, what=_PORT_EXAMPLE)
        if value is None:
            return None
        if type(value) is int:
            if 1 <= value <= 65535:
                return PortRange(first=value, last=value)
            self.problem(node, path, f"port {value} is out of range: expected {_PORT_EXAMPLE}")
            return None
        if isinstance(value, str):
            m = _PORT_RANGE_RE.fullmatch(value)
            if m is None:
                self.problem(node, path, f"{value!r} is not a port range: expected {_PORT_EXAMPLE}")
                return None
            first, last = int(m[1]), int(m[2])
            if not (1 <= first <= 65535 and 1 <= last <= 65535):
                self.problem(node, path, f"{value!r} is out of range: ports are 1-65535")
                return None
            if first > last:
                self.problem(
                    node,
                    path,
                    f"{value!r} is not a port range: the first port must not be greater than"
                    f' the last (write "{last}-{first}")',
                )
                return None
            return PortRange(first=first, last=last)
        self.problem(node, path, f"expected {_PORT_EXAMPLE}, found {self.describe(node)}")
        return None

    def hosts(self, node: Node, path: str) -> tuple[str, ...]:
        items = self.sequence(node, path, what="a list of host names")
        result: list[str] = []
        for i, item in enumerate(items or ()):
            i_path = f"{path}[{i}]"
            text = self.text(item, i_path, what="a host name like api.example.org")
            if text is None:
                continue
            host, why = _host_pattern(text)
            if host is None:
                self.problem(item, i_path, f"{text!r} is not a host name pattern: {why}")
                continue
            result.append(host)
        return tuple(result)

    def on_reload(self, node: Node, path: str) -> bool:
        """``on_reload: {denied_connections: keep | close}``; True means close."""
        fields = self.mapping(node, path, what="reload settings", allowed=_ON_RELOAD_KEYS)
        if not fields or "denied_connections" not in fields:
            return False
        value_node = fields["denied_connections"][1]
        key_path = _join(path, "denied_connections")
        value = self.scalar(value_node, key_path, what="keep or close")
        if value in _DENIED_CHOICES:
            return value == "close"
        if value is not None:
            self.problem(
                value_node,
                key_path,
                f"expected keep (open connections run until they end) or close (connections "
                f"the new policy denies are closed), found {self.describe(value_node)}",
            )
        return False

    def non_tcp(self, node: Node, path: str) -> NonTcp:
        """``non_tcp: pass | drop`` of an intercept rule."""
        value = self.scalar(node, path, what="pass or drop")
        for choice in NonTcp:
            if value == choice.value:
                return choice
        if value is not None:
            self.problem(
                node,
                path,
                "expected pass (non-TCP traffic of the rule's workloads goes where it is sent; "
                "the default) or drop (it is dropped in the kernel, replies and related ICMP "
                f"errors excepted), found {self.describe(node)}",
            )
        return NonTcp.PASS

    def reverse_path(self, node: Node, path: str) -> ReversePath:
        """``reverse_path: {interfaces: [name or name*, ...]}``."""
        fields = self.mapping(
            node, path, what="reverse-path check settings", allowed=_REVERSE_PATH_KEYS
        )
        if not fields or "interfaces" not in fields:
            return ReversePath()
        i_path = _join(path, "interfaces")
        items = self.sequence(
            fields["interfaces"][1], i_path, what='a list of interface names or patterns ("cali*")'
        )
        names: list[str] = []
        for i, item in enumerate(items or ()):
            item_path = f"{i_path}[{i}]"
            name = self.text(item, item_path, what="an interface name or pattern")
            if name is None:
                continue
            why = _interface_pattern_problem(name)
            if why:
                self.problem(
                    item, item_path, f"{name!r} is not an interface name or pattern: {why}"
                )
            elif name not in names:
                names.append(name)
        return ReversePath(interfaces=tuple(names))

    def fail(self, node: Node, path: str) -> bool:
        """``fail: closed | open``; True means open."""
        value = self.scalar(node, path, what="closed or open")
        if value in ("closed", "open"):
            return value == "open"
        if value is not None:
            self.problem(
                node,
                path,
                "expected closed (diverted traffic is refused while the agent is not running; "
                f"the default) or open (it goes direct), found {self.describe(node)}",
            )
        return False

    def connect(
        self, node: Node, path: str, known: dict[str, Workload] | None, proxy: ProxySettings
    ) -> ConnectSettings | None:
        """``connect: {port, auth: {workload: {users_file} | {username, password_file}}}``."""
        fields = self.mapping(node, path, what="CONNECT listener settings", allowed=_CONNECT_KEYS)
        if fields is None:
            return None
        self.require(node, path, fields, ("port",))
        port: int | None = None
        if "port" in fields:
            p_node = fields["port"][1]
            port = self.integer(p_node, _join(path, "port"), low=1, high=65535)
            if port is not None and port == proxy.port:
                self.problem(
                    p_node,
                    _join(path, "port"),
                    f"port {port} is also proxy.port: the CONNECT listener needs a port of"
                    " its own (3128 is the usual one)",
                )
                port = None
        auth: list[tuple[str, ProxyAuth]] = []
        if "auth" in fields:
            a_path = _join(path, "auth")
            entries = self.entries(
                fields["auth"][1], a_path, what="a mapping of workload name to proxy credentials"
            )
            for name, key_node, value_node in entries or ():
                if known is not None and name not in known:
                    existing = ", ".join(sorted(known)) if known else "none are defined"
                    self.problem(
                        key_node,
                        _join(a_path, name),
                        f"unknown workload {name!r}{_did_you_mean(name, known)};"
                        f" workloads: {existing}",
                    )
                    continue
                got = self.proxy_auth(value_node, _join(a_path, name))
                if got is not None:
                    auth.append((name, got))
        if port is None:
            return None
        return ConnectSettings(port=port, auth=tuple(auth))

    def proxy_auth(self, node: Node, path: str) -> ProxyAuth | None:
        fields = self.mapping(node, path, what="proxy credentials", allowed=_PROXY_AUTH_KEYS)
        if fields is None:
            return None
        shape = (
            "give either {users_file: /path} (lines of name:password) or"
            " {username: name, password_file: /path}"
        )
        has_users = "users_file" in fields
        has_single = "username" in fields or "password_file" in fields
        if has_users == has_single or (
            has_single and not ("username" in fields and "password_file" in fields)
        ):
            self.problem(node, path, f"incomplete or mixed proxy credentials: {shape}")
            return None
        values: dict[str, str] = {}
        for key, (_key_node, value_node) in fields.items():
            k_path = _join(path, key)
            text = self.text(
                value_node, k_path, what="a user name" if key == "username" else "a path"
            )
            if text is None:
                continue
            if key == "username":
                if not text or ":" in text or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
                    self.problem(
                        value_node,
                        k_path,
                        "a proxy user name must be non-empty, without ':', spaces or control"
                        " characters (Basic authentication splits at the first ':')",
                    )
                    continue
            elif not os.path.isabs(text):
                self.problem(
                    value_node,
                    k_path,
                    f"{text!r} is not an absolute path: give the file's full path, e.g."
                    " /etc/egress-agent/connect-users",
                )
                continue
            values[key] = text
        if len(values) != len(fields):
            return None
        return ProxyAuth(
            users_file=values.get("users_file"),
            username=values.get("username"),
            password_file=values.get("password_file"),
        )

    def boolean(self, node: Node, path: str, *, default: bool) -> bool:
        """true or false; ``default`` (and a problem) for anything else."""
        value = self.scalar(node, path, what="true or false")
        if isinstance(value, bool):
            return value
        if value is not None:
            self.problem(node, path, f"expected true or false, found {self.describe(node)}")
        return default

    def action(self, node: Node, path: str) -> Action | None:
        value = self.scalar(node, path, what="allow or deny")
        if value is None:
            return None
        if isinstance(value, str):
            for action in Action:
                if value == action.value:
                    return action
        self.problem(node, path, f"expected allow or deny, found {self.describe(node)}")
        return None

    def name(self, node: Node, path: str, *, what: str) -> str | None:
        text = self.text(node, path, what=what)
        if text is None:
            return None
        if not _NAME_RE.fullmatch(text):
            self.problem(node, path, f"{text!r} is not a valid name: expected {_NAME_RULE}")
            return None
        return text

    def integer(
        self, node: Node, path: str, *, low: int, high: int, hex_: bool = False
    ) -> int | None:
        bounds = f"{low:#x}-{high:#x}" if hex_ else f"{low}-{high}"
        value = self.scalar(node, path, what=f"an integer {bounds}")
        if value is None:
            return None
        if type(value) is not int:
            self.problem(node, path, f"expected an integer {bounds}, found {self.describe(node)}")
            return None
        if not low <= value <= high:
            self.problem(node, path, f"{node.value} is out of range: expected an integer {bounds}")
            return None
        return value

    def seconds(self, node: Node, path: str, *, high: float) -> float | None:
        what = f"a number of seconds greater than 0 and at most {high:g}"
        value = self.scalar(node, path, what=what)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        seconds = float(value)
        if not 0 < seconds <= high:  # also refuses NaN
            self.problem(node, path, f"{node.value} is out of range: expected {what}")
            return None
        return seconds

    # -- YAML nodes -----------------------------------------------------------

    def scalar(self, node: Node, path: str, *, what: str = "a value") -> object | None:
        """The scalar's value, or None (and a problem) for collections, null
        and values PyYAML cannot construct."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        try:
            # types-PyYAML leaves the constructor untyped.
            value: object = self._constructor.construct_object(  # type: ignore[no-untyped-call]
                node, deep=True
            )
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            self.problem(node, path, f"cannot read {node.value!r} as {node.tag}: {exc}")
            return None
        return value

    def text(self, node: Node, path: str, *, what: str, raw: bool = False) -> str | None:
        """A string. Unquoted numbers are taken as written (a workload may be
        called 2048); with ``raw`` so is any other plain scalar, for fields
        whose parser reports a better message than "found a boolean"."""
        if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
            return str(node.value)
        if raw and isinstance(node, ScalarNode) and node.tag not in (_NULL, _STR):
            return str(node.value)
        value = self.scalar(node, path, what=what)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problem(
                node, path, f"expected {what}, found {self.describe(node)}; quote it if a string"
            )
            return None
        return value

    def sequence(self, node: Node, path: str, *, what: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        items: list[Node] = node.value
        return items

    def mapping(
        self, node: Node, path: str, *, what: str, allowed: Sequence[str]
    ) -> dict[str, tuple[Node, Node]] | None:
        """A mapping with fixed keys: key -> (key node, value node); unknown
        keys are reported and left out."""
        entries = self.entries(node, path, what=f"{what} (a mapping)")
        if entries is None:
            return None
        result: dict[str, tuple[Node, Node]] = {}
        for key, key_node, value_node in entries:
            if key not in allowed:
                self.problem(
                    key_node,
                    _join(path, key),
                    f"unknown key {key!r}{_did_you_mean(key, allowed)}; allowed keys in"
                    f" {what}: {', '.join(allowed)}",
                )
                continue
            result[key] = (key_node, value_node)
        return result

    def named_entries(
        self, node: Node, path: str, *, what: str
    ) -> list[tuple[str, Node, Node]] | None:
        """A mapping keyed by names (workloads); invalid names are reported."""
        entries = self.entries(node, path, what=what)
        if entries is None:
            return None
        result = []
        for name, key_node, value_node in entries:
            if _NAME_RE.fullmatch(name):
                result.append((name, key_node, value_node))
            else:
                message = f"{name!r} is not a valid name: expected {_NAME_RULE}"
                self.problem(key_node, _join(path, name), message)
        return result

    def entries(self, node: Node, path: str, *, what: str) -> list[tuple[str, Node, Node]] | None:
        """The (key, key node, value node) of a mapping with string keys, in
        file order; bad and duplicate keys are reported and left out."""
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        seen: dict[str, Node] = {}
        result: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self.problem(
                    key_node,
                    path,
                    "merge keys (<<) are not supported: write the keys out, or use an"
                    " alias (*name) for a whole value",
                )
                continue
            key = self.text(key_node, path, what="a key (a string)")
            if key is None:
                continue
            if key in seen:
                self.problem(
                    key_node,
                    _join(path, key),
                    f"duplicate key {key!r}: already given at line"
                    f" {seen[key].start_mark.line + 1}; keep only one",
                )
                continue
            seen[key] = key_node
            result.append((key, key_node, value_node))
        return result

    def require(
        self,
        node: Node,
        path: str,
        fields: dict[str, tuple[Node, Node]],
        required: Sequence[str],
    ) -> None:
        for key in required:
            if key not in fields:
                self.problem(
                    node,
                    _join(path, key),
                    f"missing required key {key!r}: expected {_EXPECTED[key]}",
                )

    def describe(self, node: Node) -> str:
        """What a node is, for "expected X, found Y"."""
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        tag = node.tag
        if tag == _NULL:
            return "nothing (null)"
        if tag == _BOOL:
            return f"the boolean {node.value}"
        if tag == _INT:
            return f"the integer {node.value}"
        if tag == _FLOAT:
            return f"the number {node.value}"
        if tag == _STR:
            return f"the string {node.value!r}"
        kind = tag.removeprefix(_TAG_PREFIX)
        return f"{node.value!r} (a YAML {kind})"


_EMPTY_POLICY = Policy(
    version=SUPPORTED_VERSION,
    proxy=ProxySettings(),
    workloads=(),
    intercept=(),
    egress=(),
    default=Action.DENY,
)


def _header_text_ok(text: str) -> bool:
    """Visible characters, spaces and tabs: nothing that could end a header line."""
    return all(c in " \t" or (ord(c) >= 0x20 and ord(c) != 0x7F) for c in text)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _network_message(text: str, exc: ValueError) -> str:
    if "has host bits set" in str(exc):
        loose = ipaddress.ip_network(text, strict=False)
        address = text.split("/", 1)[0]
        single = 32 if loose.version == 4 else 128
        return (
            f"{text!r} has host bits set: write the network {loose}, or {address}/{single}"
            " for the one address"
        )
    return f"{text!r} is not a valid CIDR: expected {_CIDR_EXAMPLE}"


def _cgroup_path_problem(text: str) -> str | None:
    if not text or text.strip("/") == "":
        return "it names the cgroup root, which holds every process on the machine"
    if text.startswith("/"):
        return (
            "give it relative to the cgroup v2 root, without the leading slash"
            f" (e.g. {text.lstrip('/')!r})"
        )
    parts = text.rstrip("/").split("/")
    if any(p in ("..", ".", "") for p in parts):
        return "'.', '..' and empty components are not allowed"
    if "\0" in text or "\n" in text:
        return "it contains a NUL or newline character"
    return None


def _interface_name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if len(name.encode()) >= _IFNAMSIZ:
        return f"Linux interface names are at most {_IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "'.' and '..' are not allowed"
    if any(c in "/:" or c.isspace() for c in name):
        return "'/', ':' and whitespace are not allowed"
    return None


def _interface_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is neither an interface name nor ``prefix*``, or None."""
    if pattern == "*":
        return (
            "a bare '*' would check every interface, the node's uplinks too, where"
            " routes may be asymmetric: name the pod-facing ones, e.g. 'cali*' or 'veth*'"
        )
    name = pattern[:-1] if pattern.endswith("*") else pattern
    if "*" in name:
        return "'*' may only end a pattern, as in 'veth*'"
    return _interface_name_problem(name)


def _host_pattern(text: str) -> tuple[str | None, str]:
    """The stored form of a host pattern (lower case, no trailing dot), or
    None and why it is not one."""
    if text in ("*", "*."):
        return None, (
            "a bare '*' is not allowed: write '*.example.org' for every name below"
            " example.org, or leave out `hosts` to allow any name"
        )
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    name = host.removeprefix("*.")
    if "*" in name:
        return None, "a wildcard is only allowed as the whole first label, like '*.example.org'"
    if not name:
        return None, "it is empty"
    if len(name) > 253:
        return None, "a DNS name is at most 253 characters"
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            if not label:
                return None, "it has an empty label (two dots in a row, or a leading dot)"
            if not label.isascii():
                return None, "write international names in their xn-- (punycode) form"
            return None, (
                f"label {label!r} must be 1-63 letters, digits or hyphens"
                " (a host name, not a URL: no scheme, port or path)"
            )
    return host, ""
