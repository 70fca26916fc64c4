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
    BYPASS = 0
    DIVERT = 1


class Reason(enum.IntEnum):
    """Why the classifier gave a packet its verdict (``egress_reasons`` index).
    Numbers are never reused."""

    DIVERTED = 0
    NOT_TCP = 1
    NO_IDENTITY = 2
    WRONG_INTERFACE = 3
    NO_RULE = 4
    TO_PROXY = 5
    UPSTREAM_MARK = 6
    MALFORMED = 7
    FRAGMENT = 8


REASON_COUNT = 9
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
COUNTER = struct.Struct("=QQQQ")


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
    """``egress_dst_*`` (to, except) and ``egress_settings`` (any_dst, any_port)."""
    return _TWO_U64.pack(first, second)


def unpack_masks(raw: bytes) -> tuple[int, int]:
    first, second = _TWO_U64.unpack(raw)
    return first, second
