"""The table's rule counters as the agent reports them: what was diverted,
what was dropped and why, kept monotonic across table replacements.

The kernel keeps one counter per rule, and a rule replaced by a new
ruleset (every reload in the nftables datapath, a workload change in the
output chains of the BPF one) starts again at zero. ``/metrics`` promises
counters that only grow, so the agent reads the counters just before and
just after each change and carries what a replaced rule had counted
(:meth:`RuleCounters.around_change`). A rule is known by its chain and
comment (the name ``nft list`` shows); rules that share both (one per
address family) are added up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from egress_agent.rules.apply import NftablesError, RuleCounter

log = logging.getLogger(__name__)

Key = tuple[str, str, str, str]  # chain, rule comment, kind, reason


@dataclass(frozen=True, kw_only=True)
class Count:
    chain: str
    rule: str
    kind: str  # diverted | dropped
    reason: str
    packets: int
    bytes: int


def _by_key(counters: Sequence[RuleCounter]) -> dict[Key, tuple[int, int]]:
    out: dict[Key, tuple[int, int]] = {}
    for c in counters:
        key = (c.chain, c.rule, c.kind, c.reason)
        packets, size = out.get(key, (0, 0))
        out[key] = (packets + c.packets, size + c.bytes)
    return out


class RuleCounters:
    """Reads the kernel's rule counters through ``read`` and adds what rules
    replaced since the agent started had counted."""

    def __init__(self, read: Callable[[], Sequence[RuleCounter]]) -> None:
        self._read = read
        self._carried: dict[Key, tuple[int, int]] = {}

    def _kernel(self) -> dict[Key, tuple[int, int]] | None:
        try:
            return _by_key(self._read())
        except NftablesError as exc:
            log.warning("cannot read the rule counters: %s", exc)
            return None

    @contextlib.contextmanager
    def around_change(self) -> Iterator[None]:
        """Wrap a change of the table: a rule whose counter went down across
        it was replaced, and what it had counted is carried."""
        before = self._kernel()
        yield
        if before is None:
            return
        after = self._kernel() or {}
        for key, (packets, size) in before.items():
            if after.get(key, (0, 0))[0] < packets:
                carried = self._carried.get(key, (0, 0))
                self._carried[key] = (carried[0] + packets, carried[1] + size)

    def read(self) -> list[Count]:
        """Every counted rule with its total since the agent started (rules
        no longer in the table keep what they counted). Raises
        NftablesError when the kernel cannot be read."""
        kernel = _by_key(self._read())
        totals = dict(self._carried)
        for key, (packets, size) in kernel.items():
            carried = totals.get(key, (0, 0))
            totals[key] = (carried[0] + packets, carried[1] + size)
        return [
            Count(chain=k[0], rule=k[1], kind=k[2], reason=k[3], packets=v[0], bytes=v[1])
            for k, v in totals.items()
        ]


def summary(counts: Sequence[Count], *, bpf_drops: dict[str, int] | None = None) -> dict[str, Any]:
    """What ``status`` shows: diverted packets, and drops by reason and by rule.

    ``bpf_drops``: the classifier's own drops by reason (BPF datapath), added
    as ``bpf_<reason>``."""
    diverted = [c for c in counts if c.kind == "diverted"]
    dropped = [c for c in counts if c.kind == "dropped"]
    by_reason: dict[str, int] = {}
    for c in dropped:
        by_reason[c.reason] = by_reason.get(c.reason, 0) + c.packets
    for reason, packets in (bpf_drops or {}).items():
        by_reason[f"bpf_{reason}"] = packets
    return {
        "diverted": {
            "packets": sum(c.packets for c in diverted),
            "bytes": sum(c.bytes for c in diverted),
            "rules": [_row(c) for c in diverted],
        },
        "drops": {
            "by_reason": dict(sorted(by_reason.items())),
            "rules": [_row(c) for c in dropped],
        },
    }


def _row(c: Count) -> dict[str, Any]:
    return {
        "chain": c.chain,
        "rule": c.rule,
        "reason": c.reason,
        "packets": c.packets,
        "bytes": c.bytes,
    }
