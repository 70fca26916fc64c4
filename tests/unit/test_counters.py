"""Rule counters as the agent reports them: monotonic across table
replacements, summed per rule, classified by reason."""

from __future__ import annotations

from egress_agent.agent.counters import RuleCounters, summary
from egress_agent.rules.apply import NftablesError, RuleCounter


def _c(rule: str, packets: int, *, chain: str = "non_tcp", reason: str = "non_tcp") -> RuleCounter:
    kind = "diverted" if reason == "prerouting" else "dropped"
    return RuleCounter(
        chain=chain, rule=rule, kind=kind, reason=reason, packets=packets, bytes=packets * 100
    )


class Kernel:
    """What the kernel's counters read at each moment."""

    def __init__(self) -> None:
        self.now: list[RuleCounter] = []
        self.fail = False

    def read(self) -> list[RuleCounter]:
        if self.fail:
            raise NftablesError("cannot read")
        return list(self.now)


def _totals(counters: RuleCounters) -> dict[str, int]:
    return {c.rule: c.packets for c in counters.read()}


def test_a_replaced_rule_keeps_what_it_counted() -> None:
    kernel = Kernel()
    counters = RuleCounters(kernel.read)
    kernel.now = [_c("intercept[0] from a non_tcp", 5), _c("intercept[0] from a non_tcp", 2)]
    assert _totals(counters) == {"intercept[0] from a non_tcp": 7}
    with counters.around_change():
        kernel.now = [_c("intercept[0] from a non_tcp", 0)]  # the table was replaced
    kernel.now = [_c("intercept[0] from a non_tcp", 3)]
    assert _totals(counters) == {"intercept[0] from a non_tcp": 10}


def test_a_rule_that_survived_a_change_is_not_counted_twice() -> None:
    kernel = Kernel()
    counters = RuleCounters(kernel.read)
    kernel.now = [_c("kept", 4, chain="forward", reason="ah"), _c("flushed", 6)]
    with counters.around_change():
        kernel.now = [_c("kept", 4, chain="forward", reason="ah"), _c("flushed", 0)]
    assert _totals(counters) == {"kept": 4, "flushed": 6}


def test_a_removed_rule_stays_reported_and_unreadable_counters_are_not_carried() -> None:
    kernel = Kernel()
    counters = RuleCounters(kernel.read)
    kernel.now = [_c("gone", 9)]
    with counters.around_change():
        kernel.now = []
    assert _totals(counters) == {"gone": 9}
    kernel.fail = True
    with counters.around_change():  # a failed read carries nothing and raises nothing
        kernel.now = []
    kernel.fail = False
    assert _totals(counters) == {"gone": 9}


def test_summary_adds_drops_by_reason_and_the_classifiers_own() -> None:
    kernel = Kernel()
    kernel.now = [
        _c("intercept[0] from a", 3, chain="prerouting", reason="prerouting"),
        _c("intercept[0] from a non_tcp", 2),
        _c("reverse-path check", 1, chain="reverse_path", reason="reverse_path"),
    ]
    got = summary(RuleCounters(kernel.read).read(), bpf_drops={"fragment": 4, "ah": 0})
    assert got["diverted"]["packets"] == 3 and got["diverted"]["bytes"] == 300
    assert got["drops"]["by_reason"] == {
        "bpf_ah": 0,
        "bpf_fragment": 4,
        "non_tcp": 2,
        "reverse_path": 1,
    }
    assert [r["rule"] for r in got["drops"]["rules"]] == [
        "intercept[0] from a non_tcp",
        "reverse-path check",
    ]
