"""Python mirror of ``egress.h``: map names, key and value layouts, reasons.

The C header is the source of truth for the kernel; this module is the one
place Python packs and unpacks the same bytes (native byte order for the
integers, network byte order for addresses, as the classifier reads them).
A unit test parses the header and checks every number here against it.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

from egress_agent.policy.model import IPNetwork


class Verdict(enum.IntEnum):
    """What the classifier does with a packet (``EGRESS_VERDICT_*``)."""

    PASS = 0  # on its way, divert mark cleared
    MARK = 1  # divert mark set: nftables DNATs TCP to the proxy, decides non-TCP
    DROP = 2  # TC_ACT_SHOT


class Reason(enum.IntEnum):
    """Why the classifier gave a packet its verdict (``egress_reasons`` index).
    Numbers are never reused; :data:`REASON_VERDICT` gives each one's verdict."""

    MARKED = 0
    NOT_TCP = 1
    NO_IDENTITY = 2
    WRONG_INTERFACE = 3
    NO_RULE = 4
    TO_PROXY = 5
    UPSTREAM_MARK = 6
    MALFORMED = 7
    FRAGMENT = 8
    NOT_IP = 9
    NON_TCP_MARKED = 10
    AH = 11
    VLAN_TAGS = 12
    EXT_HEADERS = 13
    TCP_TRUNCATED = 14


REASON_COUNT = 15
REASON_VERDICT: dict[Reason, Verdict] = {
    Reason.MARKED: Verdict.MARK,
    Reason.NOT_TCP: Verdict.PASS,
    Reason.NO_IDENTITY: Verdict.PASS,
    Reason.WRONG_INTERFACE: Verdict.DROP,
    Reason.NO_RULE: Verdict.PASS,
    Reason.TO_PROXY: Verdict.PASS,
    Reason.UPSTREAM_MARK: Verdict.PASS,
    Reason.MALFORMED: Verdict.DROP,
    Reason.FRAGMENT: Verdict.DROP,
    Reason.NOT_IP: Verdict.PASS,
    Reason.NON_TCP_MARKED: Verdict.MARK,
    Reason.AH: Verdict.DROP,
    Reason.VLAN_TAGS: Verdict.DROP,
    Reason.EXT_HEADERS: Verdict.DROP,
    Reason.TCP_TRUNCATED: Verdict.DROP,
}
WORKLOAD_BOUND = 1
MAX_RULES = 64

SRC_V4 = "egress_src_v4"
SRC_V6 = "egress_src_v6"
DST_V4 = "egress_dst_v4"
DST_V6 = "egress_dst_v6"
WORKLOADS = "egress_workloads"
BIND = "egress_bind"
PORTS = "egress_ports"
SETTINGS = "egress_settings"
COUNTERS = "egress_counters"
REASONS = "egress_reasons"
NON_TCP = "egress_non_tcp"
# The maps the classifier counts in (the agent only reads them).
COUNTER_MAPS = (COUNTERS, REASONS, NON_TCP)
# The maps the agent writes, in the order a change is applied: what a lookup
# reaches last (settings, ports, destinations, bindings, workloads) is written
# before what points at it (sources), so a new source never meets a half-made
# workload.
CONFIG_MAPS = (SETTINGS, PORTS, DST_V4, DST_V6, BIND, WORKLOADS, SRC_V4, SRC_V6)

_LPM_V4 = struct.Struct("=I4s")
_LPM_V6 = struct.Struct("=I16s")
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")
_WORKLOAD = struct.Struct("=QII")
_BIND = struct.Struct("=II")
_TWO_U64 = struct.Struct("=QQ")
_SETTINGS = struct.Struct("=QQQ")
# egress_counter_value: marked, passed, dropped (packets, bytes) of a workload.
COUNTER = struct.Struct("=QQQQQQ")
# egress_rule_counter_value: packets, bytes.
RULE_COUNTER = struct.Struct("=QQ")


def lpm_key(net: IPNetwork) -> bytes:
    packer = _LPM_V4 if net.version == 4 else _LPM_V6
    return packer.pack(net.prefixlen, net.network_address.packed)


def lpm_key_raw(prefixlen: int, packed: bytes) -> bytes:
    packer = _LPM_V4 if len(packed) == 4 else _LPM_V6
    return packer.pack(prefixlen, packed)


def lpm_network(key: bytes) -> IPNetwork:
    if len(key) == _LPM_V4.size:
        plen, addr = _LPM_V4.unpack(key)
        return ipaddress.IPv4Network((addr, plen))
    plen, addr6 = _LPM_V6.unpack(key)
    return ipaddress.IPv6Network((addr6, plen))


def u32(value: int) -> bytes:
    return _U32.pack(value)


def unpack_u32(raw: bytes) -> int:
    value: int = _U32.unpack(raw)[0]
    return value


def u16(value: int) -> bytes:
    return _U16.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def unpack_u64(raw: bytes) -> int:
    value: int = _U64.unpack(raw)[0]
    return value


def workload_value(*, rules: int, flags: int) -> bytes:
    return _WORKLOAD.pack(rules, flags, 0)


def unpack_workload(raw: bytes) -> tuple[int, int]:
    rules, flags, _ = _WORKLOAD.unpack(raw)
    return rules, flags


def bind_key(*, workload: int, ifindex: int) -> bytes:
    return _BIND.pack(workload, ifindex)


def masks_value(first: int, second: int) -> bytes:
    """``egress_dst_*`` values: (to, except) rule bits."""
    return _TWO_U64.pack(first, second)


def settings_value(*, any_dst: int, any_port: int, non_tcp: int) -> bytes:
    """``egress_settings[0]``: rules with no to_cidrs, with no ports, with non_tcp: drop."""
    return _SETTINGS.pack(any_dst, any_port, non_tcp)


def unpack_settings(raw: bytes) -> tuple[int, int, int]:
    """(any_dst, any_port, non_tcp) rule bits."""
    any_dst, any_port, non_tcp = _SETTINGS.unpack(raw)
    return any_dst, any_port, non_tcp


def unpack_masks(raw: bytes) -> tuple[int, int]:
    first, second = _TWO_U64.unpack(raw)
    return first, second
