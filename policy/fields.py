"""The policy's field types: numbers in a range, durations, choices, names,
addresses and networks, ports, host name patterns, interface names, cgroup
paths, file paths.

Each reader takes the :class:`~egress_agent.policy.yamlnodes.Reader`, a node
and its field path, and returns the value or None after recording why there is
none, so that the sections (:mod:`egress_agent.policy.sections`) can say what
each field is and leave how it is spelled to this module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from yaml.nodes import Node, ScalarNode

from egress_agent.policy.model import IPAddress, IPNetwork, PortRange
from egress_agent.policy.yamlnodes import INT, Read, Reader, join

T = TypeVar("T")

# Workload and egress rule names: safe in audit records, nft comments and paths.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_RULE = "1-63 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
_LABEL_RE = re.compile(r"[A-Za-z0-9-]{1,63}")
_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")
# Linux refuses interface names of IFNAMSIZ (16) bytes or more, "." and "..",
# and any '/', ':' or whitespace: dev_valid_name() in net/core/dev.c.
_IFNAMSIZ = 16
_CIDR_EXAMPLE = "an IPv4 or IPv6 network like 10.0.0.0/16"
_PORT_EXAMPLE = 'a port 1-65535 or a range string like "8000-8100"'
_HOST_EXAMPLE = "a host name like api.example.org"


# -- numbers, choices -------------------------------------------------------


def integer(
    r: Reader, node: Node, path: str, *, low: int, high: int, hex_: bool = False
) -> int | None:
    bounds = f"{low:#x}-{high:#x}" if hex_ else f"{low}-{high}"
    value = r.scalar(node, path, what=f"an integer {bounds}")
    if value is None:
        return None
    if type(value) is not int:
        r.problem(node, path, f"expected an integer {bounds}, found {r.describe(node)}")
        return None
    if not low <= value <= high:
        r.problem(node, path, f"{node.value} is out of range: expected an integer {bounds}")
        return None
    return value


def integer_in(low: int, high: int, *, hex_: bool = False) -> Read[int]:
    """A reader of integers from ``low`` to ``high`` (said in hex with ``hex_``)."""
    return lambda r, node, path: integer(r, node, path, low=low, high=high, hex_=hex_)


def port(r: Reader, node: Node, path: str) -> int | None:
    """One TCP port, 1-65535."""
    return integer(r, node, path, low=1, high=65535)


def seconds(r: Reader, node: Node, path: str, *, high: float) -> float | None:
    what = f"a number of seconds greater than 0 and at most {high:g}"
    value = r.scalar(node, path, what=what)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        r.problem(node, path, f"expected {what}, found {r.describe(node)}")
        return None
    got = float(value)
    if not 0 < got <= high:  # also refuses NaN
        r.problem(node, path, f"{node.value} is out of range: expected {what}")
        return None
    return got


def seconds_up_to(high: float) -> Read[float]:
    """A reader of durations greater than 0 and at most ``high`` seconds."""
    return lambda r, node, path: seconds(r, node, path, high=high)


def boolean(r: Reader, node: Node, path: str, *, default: bool) -> bool:
    """true or false; ``default`` (and a problem) for anything else."""
    value = r.scalar(node, path, what="true or false")
    if isinstance(value, bool):
        return value
    if value is not None:
        r.problem(node, path, f"expected true or false, found {r.describe(node)}")
    return default


def one_of(choices: Mapping[str, T], *, what: str, expected: str) -> Read[T]:
    """A reader of one of the words in ``choices``, as the value it stands
    for. Anything else is reported as ``{expected} found {what the node is}``:
    ``expected`` explains the choices and ends in its own punctuation."""

    def read(r: Reader, node: Node, path: str) -> T | None:
        value = r.scalar(node, path, what=what)
        if value is None:
            return None
        if isinstance(value, str) and value in choices:
            return choices[value]
        r.problem(node, path, f"{expected} found {r.describe(node)}")
        return None

    return read


# -- names and paths --------------------------------------------------------


def name(r: Reader, node: Node, path: str, *, what: str) -> str | None:
    """A workload or rule name (:data:`NAME_RE`)."""
    return text_like(NAME_RE, what=what, kind="a valid name", rule=f"expected {NAME_RULE}")(
        r, node, path
    )


def named_entries(
    r: Reader, node: Node, path: str, *, what: str
) -> list[tuple[str, Node, Node]] | None:
    """A mapping keyed by names (workloads); invalid names are reported."""
    entries = r.entries(node, path, what=what)
    if entries is None:
        return None
    result = []
    for key, key_node, value_node in entries:
        if NAME_RE.fullmatch(key):
            result.append((key, key_node, value_node))
        else:
            message = f"{key!r} is not a valid name: expected {NAME_RULE}"
            r.problem(key_node, join(path, key), message)
    return result


def checked(*, what: str, kind: str, why_not: Callable[[str], str | None]) -> Read[str]:
    """A reader of strings (``what``) that ``why_not`` accepts (it says why
    not, or None); others are refused as ``'text' is not {kind}: {why}``."""

    def read(r: Reader, node: Node, path: str) -> str | None:
        text = r.text(node, path, what=what)
        if text is None:
            return None
        why = why_not(text)
        if why:
            r.problem(node, path, f"{text!r} is not {kind}: {why}")
            return None
        return text

    return read


def text_like(pattern: re.Pattern[str], *, what: str, kind: str, rule: str) -> Read[str]:
    """A reader of strings that ``pattern`` matches whole; others are refused
    as ``'text' is not {kind}: {rule}``."""
    return checked(
        what=what, kind=kind, why_not=lambda text: None if pattern.fullmatch(text) else rule
    )


def file_path(r: Reader, node: Node, path: str) -> str | None:
    """An absolute file path. The file need not exist yet: secrets and
    certificates may be mounted after the policy loads, and are read when
    a connection needs them."""
    text = r.text(node, path, what="an absolute file path")
    if text is None:
        return None
    if not text.startswith("/") or "\0" in text:
        r.problem(
            node,
            path,
            f"{text!r} is not an absolute path: write it from /, like /run/secrets/x",
        )
        return None
    return text


def cgroup_path(r: Reader, node: Node, path: str) -> str | None:
    """A cgroup v2 path relative to the cgroup2 mount, like
    ``system.slice/backup.service``: no leading slash, no ``..``."""
    text = _cgroup_path(r, node, path)
    return None if text is None else text.rstrip("/")


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


_cgroup_path = checked(
    what="a cgroup path", kind="a usable cgroup path", why_not=_cgroup_path_problem
)
interface_name = checked(
    what="an interface name", kind="a valid interface name", why_not=_interface_name_problem
)
# An interface name, or a prefix of names followed by ``*``.
interface_pattern = checked(
    what="an interface name or pattern",
    kind="an interface name or pattern",
    why_not=_interface_pattern_problem,
)


# -- addresses, ports, host names --------------------------------------------


def network(r: Reader, node: Node, path: str) -> IPNetwork | None:
    # Take the scalar's text whatever YAML resolved it to: an unquoted IPv6
    # address such as 1:2:3:4:5:6:7:8 is a YAML 1.1 base-60 integer.
    text = r.text(node, path, what=_CIDR_EXAMPLE, raw=True)
    if text is None:
        return None
    if "%" in text:
        r.problem(node, path, f"{text!r} has an IPv6 zone (%...): write the network without it")
        return None
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        r.problem(node, path, _network_message(text, exc))
        return None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        v4 = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        r.problem(
            node,
            path,
            f"{text!r} is an IPv4-mapped IPv6 network: policy compares IPv4 traffic"
            f" by its IPv4 address, write {v4}",
        )
        return None
    return net


def networks(r: Reader, node: Node, path: str) -> tuple[IPNetwork, ...]:
    return tuple(r.items(node, path, what="a list of CIDRs", read=network))


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


def address(r: Reader, node: Node, path: str, *, version: int) -> IPAddress | None:
    text = r.text(node, path, what=f"an IPv{version} address", raw=True)
    if text is None:
        return None
    example = "169.254.99.1" if version == 4 else '"fd65:6772:6573::1"'
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is None or addr.version != version or "%" in text:
        r.problem(
            node, path, f"{text!r} is not an IPv{version} address: expected one like {example}"
        )
        return None
    return addr


def ipv4_address(r: Reader, node: Node, path: str) -> ipaddress.IPv4Address | None:
    addr = address(r, node, path, version=4)
    return addr if isinstance(addr, ipaddress.IPv4Address) else None


def ipv6_address(r: Reader, node: Node, path: str) -> ipaddress.IPv6Address | None:
    addr = address(r, node, path, version=6)
    return addr if isinstance(addr, ipaddress.IPv6Address) else None


def port_range(r: Reader, node: Node, path: str) -> PortRange | None:
    if isinstance(node, ScalarNode) and node.tag == INT and ":" in node.value:
        r.problem(
            node,
            path,
            f"{node.value} is a YAML 1.1 base-60 number, not a port range: write a range"
            f' as a string like "8000-8100"',
        )
        return None
    value = r.scalar(node, path, what=_PORT_EXAMPLE)
    if value is None:
        return None
    if type(value) is int:
        if 1 <= value <= 65535:
            return PortRange(first=value, last=value)
        r.problem(node, path, f"port {value} is out of range: expected {_PORT_EXAMPLE}")
        return None
    if isinstance(value, str):
        m = _PORT_RANGE_RE.fullmatch(value)
        if m is None:
            r.problem(node, path, f"{value!r} is not a port range: expected {_PORT_EXAMPLE}")
            return None
        first, last = int(m[1]), int(m[2])
        if not (1 <= first <= 65535 and 1 <= last <= 65535):
            r.problem(node, path, f"{value!r} is out of range: ports are 1-65535")
            return None
        if first > last:
            r.problem(
                node,
                path,
                f"{value!r} is not a port range: the first port must not be greater than"
                f' the last (write "{last}-{first}")',
            )
            return None
        return PortRange(first=first, last=last)
    r.problem(node, path, f"expected {_PORT_EXAMPLE}, found {r.describe(node)}")
    return None


def ports(r: Reader, node: Node, path: str) -> tuple[PortRange, ...]:
    return tuple(r.items(node, path, what="a list of ports ([] for every port)", read=port_range))


def host_pattern(r: Reader, node: Node, path: str) -> str | None:
    """A host name or ``*.`` and a name, stored lower case without a trailing dot."""
    return _host(r, node, path, wildcard=True)


def hosts(r: Reader, node: Node, path: str) -> tuple[str, ...]:
    return tuple(r.items(node, path, what="a list of host names", read=host_pattern))


def host_name(r: Reader, node: Node, path: str) -> str | None:
    """One host name (no wildcard), stored as :func:`host_pattern` stores it."""
    return _host(r, node, path, wildcard=False)


def _host(r: Reader, node: Node, path: str, *, wildcard: bool) -> str | None:
    text = r.text(node, path, what=_HOST_EXAMPLE)
    if text is None:
        return None
    host, why = _host_pattern(text)
    if host is not None and not wildcard and host.startswith("*."):
        host, why = None, "a wildcard names no one server"
    if host is None:
        kind = "a host name pattern" if wildcard else "a host name"
        r.problem(node, path, f"{text!r} is not {kind}: {why}")
    return host


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


def host_name_problem(text: str) -> str | None:
    """Why ``text`` is not a host name (no wildcard), or None when it is one."""
    host, why = _host_pattern(text)
    if host is not None and host.startswith("*."):
        return "a wildcard names no one server"
    return None if host is not None else why
