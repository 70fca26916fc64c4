"""The tc classifier (``classifier.bpf.c``): its configuration, what would be
loaded (``dump``), and the loaded program's maps.

Configuration reaches the C source only through ``-D`` flags (:func:`cflags`).
:class:`Classifier` loads through ``build.load`` and keeps the program and
every map pinned under the agent's pin folder (``BpfConfig.pin_dir``) while
it runs; map contents are raw key/value bytes laid out as ``layout`` says.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from egress_agent.bpf import layout, pins
from egress_agent.bpf.build import Program, load
from egress_agent.bpf.libbpf import BpfError, RawMap, fdinfo, possible_cpus
from egress_agent.bpf.maps import MapContents, MapDiff

PROGRAM = "egress_classify"
SOURCE = Path(__file__).resolve().parent / "classifier.bpf.c"
HEADER = Path(__file__).resolve().parent / "egress.h"
DEFAULT_PIN_DIR = "/sys/fs/bpf/egress_agent"


@dataclass(frozen=True, kw_only=True)
class BpfConfig:
    divert_mark: int
    upstream_mark: int
    proxy_v4: ipaddress.IPv4Address
    proxy_v6: ipaddress.IPv6Address
    pin_dir: str = DEFAULT_PIN_DIR
    cache_dir: str | None = None  # the compile cache (bpf.cache); None: always compile
    max_sources: int = 65536
    max_destinations: int = 65536
    max_workloads: int = 16384
    max_bindings: int = 16384


def cflags(config: BpfConfig) -> list[str]:
    v6 = int(config.proxy_v6)
    words = [(v6 >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
    return [
        f"-I{SOURCE.parent}",
        f"-DDIVERT_MARK={config.divert_mark:#x}",
        f"-DUPSTREAM_MARK={config.upstream_mark:#x}",
        f"-DPROXY_V4={int(config.proxy_v4):#x}",
        *(f"-DPROXY_V6_{i}={w:#x}" for i, w in enumerate(words)),
        f"-DMAX_SOURCES={config.max_sources}",
        f"-DMAX_DESTINATIONS={config.max_destinations}",
        f"-DMAX_WORKLOADS={config.max_workloads}",
        f"-DMAX_BINDINGS={config.max_bindings}",
    ]


def program(config: BpfConfig) -> Program:
    return Program(
        name=PROGRAM,
        source=SOURCE,
        cflags=tuple(cflags(config)),
        prog_type="SCHED_CLS",
        maps=(*layout.CONFIG_MAPS, *layout.COUNTER_MAPS),
        features="tc BPF, LPM tries, CAP_BPF",
    )


def program_error(reason: str) -> BpfError:
    """An error about the classifier program (a policy it cannot hold, an attach)."""
    return BpfError(f"BPF program {PROGRAM} ({SOURCE.name})", reason)


def dump(config: BpfConfig) -> str:
    """What would be loaded: the source, the flags, the pin folder."""
    lines = [
        f"// program {PROGRAM} (tc clsact ingress, direct action)",
        f"// source  {SOURCE}",
        f"// header  {HEADER}",
        f"// cflags  {' '.join(cflags(config))}",
        f"// pinned  {config.pin_dir}/{{{PROGRAM},"
        f"{','.join((*layout.CONFIG_MAPS, *layout.COUNTER_MAPS))}}}",
        "",
        SOURCE.read_text(),
    ]
    return "\n".join(lines)


class Classifier:
    """The loaded classifier: program fd, maps, pins (until :meth:`close`)."""

    def __init__(self, config: BpfConfig) -> None:
        self.config = config
        pin_dir = Path(config.pin_dir)
        loaded = load(
            program(config),
            pin_dir,
            keep_pins=True,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        )
        self.pinned = [pin_dir / name for name in (PROGRAM, *loaded.maps)]
        self.prog_fd = loaded.prog_fd
        self.prog_id = loaded.prog_id
        self.maps: dict[str, RawMap] = loaded.maps
        self._loaded = loaded
        self._cpus = possible_cpus()

    def map_ids(self) -> dict[str, int]:
        return {name: int(fdinfo(m.fd).get("map_id", "0")) for name, m in self.maps.items()}

    def close(self) -> None:
        """Unpin and release; the program stays alive only while a tc filter holds it."""
        pins.remove_pins(Path(self.config.pin_dir))
        self.pinned.clear()
        self._loaded.close()

    # -- maps ---------------------------------------------------------------

    def read(self) -> MapContents:
        """What the config maps hold now."""
        return {name: self.maps[name].items() for name in layout.CONFIG_MAPS}

    def apply(self, change: MapDiff) -> None:
        """Upserts in dependency order (see layout.CONFIG_MAPS), then deletes in
        the reverse order: sources go before the workloads they point at."""
        for name in layout.CONFIG_MAPS:
            target = self.maps[name]
            for key, value in change.upserts.get(name, {}).items():
                target.update(key, value)
        for name in reversed(layout.CONFIG_MAPS):
            target = self.maps[name]
            for key in change.deletes.get(name, ()):
                target.delete(key)

    def _sum_per_cpu(self, m: RawMap, key: bytes, layout_: struct.Struct) -> tuple[int, ...] | None:
        """A per-CPU value's fields (a ``struct.Struct`` of u64s), summed over CPUs."""
        values = m.lookup_per_cpu(key, layout_.size, self._cpus)
        if values is None:
            return None
        sums = [0] * len(layout_.unpack(values[0]))
        for raw in values:
            for i, n in enumerate(layout_.unpack(raw)):
                sums[i] += n
        return tuple(sums)

    def counters(self) -> dict[int, tuple[int, ...]]:
        """Workload id -> (marked packets, bytes, passed packets, bytes,
        dropped packets, bytes), all CPUs."""
        m = self.maps[layout.COUNTERS]
        out = {}
        for key in list(m.keys()):
            sums = self._sum_per_cpu(m, key, layout.COUNTER)
            if sums is not None:
                out[layout.unpack_u32(key)] = sums
        return out

    def reasons(self) -> dict[layout.Reason, int]:
        """Packets by reason, all CPUs."""
        m = self.maps[layout.REASONS]
        out = {}
        for reason in layout.Reason:
            values = m.lookup_per_cpu(layout.u32(reason.value), 8, self._cpus)
            out[reason] = sum(map(layout.unpack_u64, values or []))
        return out

    def non_tcp(self) -> dict[int, tuple[int, int]]:
        """Rule bit -> (packets, bytes) of non-TCP marked for it, all CPUs;
        only rules that counted any."""
        m = self.maps[layout.NON_TCP]
        out = {}
        for bit in range(layout.MAX_RULES):
            sums = self._sum_per_cpu(m, layout.u32(bit), layout.RULE_COUNTER)
            if sums is not None and sums[0]:
                out[bit] = (sums[0], sums[1])
        return out

    def reset_non_tcp(self, bits: Iterable[int]) -> None:
        """Zero the non-TCP counters of these rule bits on every CPU."""
        m = self.maps[layout.NON_TCP]
        for bit in bits:
            m.zero_per_cpu(layout.u32(bit), layout.RULE_COUNTER.size, self._cpus)

    def forget_workloads(self, ids: Mapping[str, int]) -> None:
        """Drop counters of workload ids no longer in use."""
        live = set(ids.values())
        m = self.maps[layout.COUNTERS]
        for key in list(m.keys()):
            if layout.unpack_u32(key) not in live:
                m.delete(key)
