"""Traffic controls of egress rules: the token bucket and the circuit
breaker as pure state machines (the time is handed in), the state the proxy
keeps per rule, workload and destination, and ``limits:`` / ``breaker:`` in
the policy file with located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from egress_agent.agent.cli import main
from egress_agent.policy.load import PolicyError, parse_policy
from egress_agent.policy.model import Policy
from egress_agent.policy.traffic import Breaker, Limits, Rate, Scope
from egress_agent.proxy.breaker import Admission, CircuitBreaker, State
from egress_agent.proxy.controls import destination, refusal_response
from egress_agent.proxy.tokenbucket import TokenBucket
from egress_agent.proxy.traffic import Lease, LocalTraffic, Refusal, Ticket

# -- token bucket ---------------------------------------------------------------------


def test_a_full_bucket_lets_a_burst_through_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: the next token comes after 1/rate seconds.
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.25) == pytest.approx(0.25)  # a refusal takes nothing
    assert bucket.take(100.5) == 0.0
    assert bucket.take(100.5) == pytest.approx(0.5)


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert bucket.available(3600.0) == 2.0
    assert [bucket.take(3600.0) for _ in range(3)][2] > 0


def test_a_clock_that_goes_back_earns_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=50.0)
    assert bucket.take(50.0) == 0.0
    assert bucket.take(40.0) > 0
    assert bucket.take(50.5) == pytest.approx(0.5)


def test_reconfigure_keeps_what_was_earned_up_to_the_new_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=10, now=0.0)
    for _ in range(10):
        bucket.take(0.0)
    bucket.reconfigure(rate=100.0, burst=5, now=2.0)  # 2 tokens earned at the old rate
    assert bucket.available(2.0) == pytest.approx(2.0)
    assert bucket.available(2.02) == pytest.approx(4.0)  # the new rate from now on
    assert bucket.available(10.0) == 5.0  # the new burst caps it
    full = TokenBucket(rate=1.0, burst=10, now=0.0)
    full.reconfigure(rate=1.0, burst=3, now=0.0)
    assert full.available(0.0) == 3.0  # a smaller bucket holds less at once


def test_a_bucket_refuses_a_rate_or_burst_it_cannot_work_with() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0, now=0.0)


# -- circuit breaker ------------------------------------------------------------------


def trip(b: CircuitBreaker, now: float) -> None:
    for _ in range(b.consecutive_failures):
        b.failed(b.admit(now), now)


def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count() -> None:
    b = CircuitBreaker(consecutive_failures=3, open_for=30.0)
    for _ in range(2):
        b.failed(b.admit(0.0), 0.0)
    b.succeeded(b.admit(0.0), 0.0)
    for _ in range(2):
        b.failed(b.admit(0.0), 0.0)
    assert b.state is State.CLOSED  # 2 in a row, not 4
    b.failed(b.admit(1.0), 1.0)
    assert b.state is State.OPEN
    assert b.transitions == {State.OPEN: 1}


def test_an_open_breaker_fails_fast_until_open_for_has_passed() -> None:
    b = CircuitBreaker(consecutive_failures=1, open_for=30.0)
    trip(b, 10.0)
    refused = b.admit(25.0)
    assert not refused.allowed and refused.retry_in == pytest.approx(15.0)
    assert not b.admit(39.99).allowed


def test_after_open_for_exactly_one_probe_goes_and_its_success_closes() -> None:
    b = CircuitBreaker(consecutive_failures=1, open_for=30.0)
    trip(b, 0.0)
    probe = b.admit(30.0)
    assert probe.allowed and probe.probe
    assert b.state is State.HALF_OPEN
    others = [b.admit(30.5) for _ in range(5)]
    assert not any(a.allowed for a in others)
    assert all(a.retry_in == 0 for a in others)  # a probe is under way
    b.succeeded(probe, 31.0)
    assert b.state is State.CLOSED and b.failures == 0
    assert b.admit(31.0).allowed
    assert b.transitions == {State.OPEN: 1, State.HALF_OPEN: 1, State.CLOSED: 1}


def test_a_failed_probe_opens_the_breaker_again_for_open_for() -> None:
    b = CircuitBreaker(consecutive_failures=2, open_for=10.0)
    trip(b, 0.0)
    probe = b.admit(10.0)
    b.failed(probe, 12.0)
    assert b.state is State.OPEN
    assert b.admit(21.9).retry_in == pytest.approx(0.1)
    assert b.admit(22.0).probe


def test_only_the_probe_decides_a_half_open_breaker() -> None:
    b = CircuitBreaker(consecutive_failures=1, open_for=5.0)
    early = b.admit(0.0)  # a flow that started before the breaker opened
    trip(b, 0.0)
    probe = b.admit(5.0)
    b.succeeded(early, 5.1)
    assert b.state is State.HALF_OPEN
    b.failed(early, 5.2)
    assert b.state is State.HALF_OPEN
    b.succeeded(probe, 5.3)
    assert b.state is State.CLOSED


def test_a_probe_that_ends_without_a_result_frees_its_place() -> None:
    b = CircuitBreaker(consecutive_failures=1, open_for=5.0, probe_timeout=60.0)
    trip(b, 0.0)
    probe = b.admit(5.0)
    assert not b.admit(5.0).allowed
    b.abandoned(probe)
    second = b.admit(6.0)
    assert second.allowed and second.probe != probe.probe
    b.succeeded(probe, 6.5)  # the first probe's late word changes nothing
    assert b.state is State.HALF_OPEN
    # A probe silent for probe_timeout is given up on too.
    third = b.admit(66.0)
    assert third.allowed and third.probe


def test_new_thresholds_apply_to_a_breaker_in_any_state() -> None:
    b = CircuitBreaker(consecutive_failures=1, open_for=30.0)
    trip(b, 0.0)
    b.reconfigure(consecutive_failures=3, open_for=5.0)
    assert b.admit(5.0).probe  # opened at 0, now open for 5s only
    assert b.consecutive_failures == 3


# -- the state the proxy keeps -------------------------------------------------------


def rule_policy(extra: str, *, http: bool = False) -> Policy:
    text = textwrap.dedent(
        """\
        version: 1
        workloads:
          a: {cidrs: [10.0.0.1/32]}
          b: {cidrs: [10.0.0.2/32]}
        egress:
          - name: api
            to: {ports: [80]}
            action: allow
        """
    )
    if http:
        text += "    http: {}\n"
    text += textwrap.indent(extra, "    ")
    return parse_policy(text + "default: deny\n", source_name="p.yaml")


def state_for(extra: str, *, http: bool = False, now: float = 0.0) -> LocalTraffic:
    traffic = LocalTraffic()
    traffic.configure(rule_policy(extra, http=http).egress, now)
    return traffic


def test_connections_are_counted_for_the_rule_or_for_each_workload() -> None:
    whole = state_for("limits: {connections: 2}\n")
    leases = [whole.open_flow("api", w, 0.0) for w in ("a", "b")]
    refused = whole.open_flow("api", "a", 0.0)
    assert isinstance(refused, Refusal)
    assert (refused.limit, refused.value, refused.rule) == ("connections", "2", "api")
    assert "2 connections open for rule api" in refused.message
    lease = leases[0]
    assert isinstance(lease, Lease)
    whole.release(lease)
    assert isinstance(whole.open_flow("api", "b", 0.0), Lease)

    each = state_for("limits: {connections: 1, per: workload}\n")
    assert isinstance(each.open_flow("api", "a", 0.0), Lease)
    assert isinstance(each.open_flow("api", "b", 0.0), Lease)
    refused = each.open_flow("api", "a", 0.0)
    assert isinstance(refused, Refusal) and "workload a" in refused.message
    assert each.limited == {("api", "a", "connections"): 1}


def test_new_connections_take_tokens_of_the_rules_bucket() -> None:
    traffic = state_for('limits: {rate: "2/s", burst: 3}\n')
    got = [traffic.open_flow("api", "a", 0.0) for _ in range(4)]
    assert [type(g) for g in got] == [Lease, Lease, Lease, Refusal]
    refused = got[3]
    assert isinstance(refused, Refusal)
    assert refused.limit == "rate" and refused.value == "2/s, burst 3"
    assert refused.retry_after == pytest.approx(0.5)
    assert isinstance(traffic.open_flow("api", "b", 0.5), Lease)


def test_a_rate_without_a_burst_lets_one_periods_worth_through() -> None:
    traffic = state_for('limits: {rate: "5/m"}\n')
    got = [traffic.open_flow("api", "a", 0.0) for _ in range(6)]
    assert sum(isinstance(g, Lease) for g in got) == 5
    refused = got[5]
    assert isinstance(refused, Refusal) and refused.retry_after == pytest.approx(12.0)


def test_requests_have_their_own_bucket() -> None:
    traffic = state_for(
        'limits: {rate: "1/s", requests: {rate: "10/s", burst: 2}, per: workload}\n', http=True
    )
    assert traffic.take_request("api", "a", 0.0) is None
    assert traffic.take_request("api", "a", 0.0) is None
    refused = traffic.take_request("api", "a", 0.0)
    assert isinstance(refused, Refusal)
    assert (refused.limit, refused.value) == ("requests", "10/s, burst 2")
    assert refused.retry_after == pytest.approx(0.1)
    assert traffic.take_request("api", "b", 0.0) is None  # each workload its own
    assert traffic.take_request("other-rule", "a", 0.0) is None


def test_a_reload_keeps_the_state_of_unchanged_limits_and_applies_changed_ones() -> None:
    traffic = state_for('limits: {connections: 5, rate: "1/s", burst: 2}\n')
    leases = [traffic.open_flow("api", "a", 0.0) for _ in range(2)]
    assert all(isinstance(lease, Lease) for lease in leases)
    traffic.configure(rule_policy('limits: {connections: 5, rate: "1/s", burst: 2}\n').egress, 0.1)
    assert isinstance(traffic.open_flow("api", "a", 0.1), Refusal)  # the bucket was kept
    # Fewer connections than are open now: the open ones count.
    traffic.configure(rule_policy('limits: {connections: 2, rate: "100/s"}\n').egress, 0.2)
    refused = traffic.open_flow("api", "a", 0.2)
    assert isinstance(refused, Refusal) and refused.limit == "connections"
    lease = leases[0]
    assert isinstance(lease, Lease)
    traffic.release(lease)
    # Tokens earned from the reload on come at the new rate.
    assert isinstance(traffic.open_flow("api", "a", 0.21), Lease)
    # Limits removed: nothing is refused, open flows are still counted.
    traffic.configure(rule_policy("").egress, 0.3)
    assert all(isinstance(traffic.open_flow("api", "a", 0.3), Lease) for _ in range(10))
    assert traffic.open[("api", "a")] == 12


def test_breakers_are_per_destination_and_fail_fast_when_open() -> None:
    traffic = state_for("breaker: {consecutive_failures: 2, open_for: 30s}\n")
    assert traffic.has_breaker("api")
    for _ in range(2):
        ticket = traffic.enter("api", "a", "api.example:443", 0.0)
        assert isinstance(ticket, Ticket)
        traffic.report(ticket, False, 0.0)
    refused = traffic.enter("api", "a", "api.example:443", 1.0)
    assert isinstance(refused, Refusal)
    assert refused.limit == "breaker"
    assert refused.value == "2 consecutive failures, open_for 30s"
    assert refused.retry_after == pytest.approx(29.0)
    assert "circuit breaker open for api.example:443" in refused.message
    assert isinstance(traffic.enter("api", "a", "other.example:443", 1.0), Ticket)
    probe = traffic.enter("api", "b", "api.example:443", 30.0)
    assert isinstance(probe, Ticket) and probe.admission.probe
    assert isinstance(traffic.enter("api", "b", "api.example:443", 30.0), Refusal)
    traffic.report(probe, True, 31.0)
    assert traffic.transitions == {
        ("api", "api.example:443", "open"): 1,
        ("api", "api.example:443", "half-open"): 1,
        ("api", "api.example:443", "closed"): 1,
    }
    assert traffic.limited == {("api", "a", "breaker"): 1, ("api", "b", "breaker"): 1}
    assert state_for("").enter("api", "a", "x:1", 0.0) is None


def test_a_reload_keeps_breaker_state_and_forgets_removed_breakers() -> None:
    traffic = state_for("breaker: {consecutive_failures: 1, open_for: 30}\n")
    ticket = traffic.enter("api", None, "192.0.2.1:80", 0.0)
    assert isinstance(ticket, Ticket)
    traffic.report(ticket, False, 0.0)
    traffic.configure(
        rule_policy("breaker: {consecutive_failures: 1, open_for: 10s}\n").egress, 1.0
    )
    assert isinstance(traffic.enter("api", None, "192.0.2.1:80", 5.0), Refusal)
    assert isinstance(traffic.enter("api", None, "192.0.2.1:80", 10.0), Ticket)  # the probe
    traffic.configure(rule_policy("").egress, 11.0)
    assert traffic.breakers == {}
    assert traffic.status(11.0) == {"limits": {}, "breakers": []}


def test_status_shows_limits_open_counts_and_breakers_that_are_not_idle() -> None:
    traffic = state_for(
        'limits: {connections: 3, rate: "20/s", burst: 40, per: workload}\n'
        "breaker: {consecutive_failures: 5, open_for: 30s}\n"
    )
    traffic.open_flow("api", "a", 0.0)
    ticket = traffic.enter("api", "a", "198.18.0.1:80", 0.0)
    assert isinstance(ticket, Ticket)
    traffic.report(ticket, False, 0.0)
    assert traffic.status(0.0) == {
        "limits": {
            "api": {
                "per": "workload",
                "connections": 3,
                "rate": "20/s, burst 40",
                "requests": None,
                "open": {"a": 1},
                "refused": {},
            }
        },
        "breakers": [
            {"rule": "api", "destination": "198.18.0.1:80", "state": "closed", "failures": 1}
        ],
    }


def test_destinations_are_named_by_name_when_the_flow_was_allowed_by_name() -> None:
    import ipaddress

    v4, v6 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")
    assert destination("api.example", v4, 443, by_name=True) == "api.example:443"
    assert destination("api.example", v4, 443, by_name=False) == "192.0.2.1:443"
    assert destination(None, v6, 443, by_name=True) == "[2001:db8::1]:443"


def test_refused_requests_get_429_or_503_with_retry_after_in_whole_seconds() -> None:
    limited = Refusal(
        rule="api", workload=None, limit="requests", value="1/s, burst 1", message="limited",
        retry_after=0.2,
    )  # fmt: skip
    status, raw = refusal_response(limited, close=False)
    assert status == 429
    head = raw.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 429 Too Many Requests")
    assert "Retry-After: 1" in head.split("\r\n")
    assert "Connection: close" not in head
    broken = Refusal(
        rule="api", workload=None, limit="breaker", value="5 consecutive failures, open_for 30s",
        message="open", retry_after=12.5,
    )  # fmt: skip
    status, raw = refusal_response(broken, close=True)
    assert status == 503
    assert b"Retry-After: 13\r\n" in raw and b"Connection: close\r\n" in raw


# -- the policy file ----------------------------------------------------------------


def test_limits_and_breaker_are_read_from_an_allow_rule() -> None:
    p = rule_policy(
        'limits: {connections: 100, rate: "20/s", burst: 40, requests: "50/s", per: workload}\n'
        "breaker: {consecutive_failures: 5, open_for: 30s}\n",
        http=True,
    )
    rule = p.egress[0]
    assert rule.limits == Limits(
        connections=100,
        rate=Rate(count=20, period=1.0),
        burst=40,
        requests=Rate(count=50, period=1.0),
        per=Scope.WORKLOAD,
    )
    assert rule.breaker == Breaker(consecutive_failures=5, open_for=30.0)
    assert rule.limits.request_burst() == 50
    other = rule_policy(
        'limits: {rate: "1.5/m"}\nbreaker: {consecutive_failures: 1, open_for: 500ms}\n'
    )
    assert other.egress[0].limits is not None
    assert other.egress[0].limits.rate == Rate(count=1.5, period=60.0)
    assert other.egress[0].limits.per is Scope.RULE
    assert other.egress[0].breaker == Breaker(consecutive_failures=1, open_for=0.5)


@pytest.mark.parametrize(
    ("extra", "http", "where", "says"),
    [
        ('limits: {rate: "fast"}\n', False, "p.yaml:9:20: egress[0].limits.rate",
         "'fast' is not a rate"),
        ("limits: {rate: 20}\n", False, "egress[0].limits.rate", 'say per what: "20/s"'),
        ('limits: {rate: "20/d"}\n', False, "egress[0].limits.rate", "unknown unit 'd'"),
        ('limits: {rate: "0/s"}\n', False, "egress[0].limits.rate", "out of range"),
        ("limits: {connections: -5}\n", False, "p.yaml:9:27: egress[0].limits.connections",
         "-5 is out of range: expected an integer 1-1000000"),
        ("limits: {connections: 0}\n", False, "egress[0].limits.connections", "out of range"),
        ("limits: {burst: 4}\n", False, "egress[0].limits.burst", "there is no rate"),
        ("limits: {connections: 1, per: pod}\n", False, "egress[0].limits.per",
         "expected rule (one count"),
        ('limits: {requests: "5/s"}\n', False, "egress[0].limits.requests",
         "only reads for a rule with an http section"),
        ("limits: {requests: {burst: 3}}\n", True, "egress[0].limits.requests.rate",
         "missing required key 'rate'"),
        ("limits: {}\n", False, "egress[0].limits", "empty limits"),
        ("limits: {connection: 3}\n", False, "egress[0].limits.connection",
         "did you mean 'connections'"),
        ("breaker: {consecutive_failures: 5, open_for: forever}\n", False,
         "p.yaml:9:50: egress[0].breaker.open_for", "'forever' is not a duration"),
        ("breaker: {consecutive_failures: 5, open_for: 2d}\n", False,
         "egress[0].breaker.open_for", "'2d' is not a duration"),
        ("breaker: {consecutive_failures: 5, open_for: 0s}\n", False,
         "egress[0].breaker.open_for", "out of range"),
        ("breaker: {consecutive_failures: 0, open_for: 1s}\n", False,
         "egress[0].breaker.consecutive_failures", "out of range"),
        ("breaker: {open_for: 1s}\n", False, "egress[0].breaker.consecutive_failures",
         "missing required key"),
    ],
)  # fmt: skip
def test_bad_limits_and_breakers_are_refused_where_they_are(
    extra: str, http: bool, where: str, says: str
) -> None:
    with pytest.raises(PolicyError) as info:
        rule_policy(extra, http=http)
    shown = str(info.value)
    assert where in shown and says in shown, shown


def test_limits_and_breakers_belong_to_allow_rules() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        egress:
          - name: no
            to: {ports: [25]}
            action: deny
            limits: {connections: 1}
            breaker: {consecutive_failures: 1, open_for: 1}
        default: allow
        """
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source_name="p.yaml")
    shown = str(info.value)
    assert "p.yaml:6:5: egress[0].limits: limits applies to allow rules only" in shown
    assert "p.yaml:7:5: egress[0].breaker: breaker applies to allow rules only" in shown


def test_admissions_carry_no_probe_number_for_ordinary_flows() -> None:
    assert Admission(allowed=True).probe == 0


def test_explain_shows_the_allowing_rules_limits_and_breaker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            version: 1
            workloads:
              vm: {cidrs: [10.0.5.0/24]}
            intercept:
              - from: [vm]
            egress:
              - name: api
                to: {cidrs: [192.0.2.0/24], ports: [80]}
                action: allow
                http: {}
                limits: {connections: 100, rate: "20/s", requests: "50/s", per: workload}
                breaker: {consecutive_failures: 5, open_for: 30s}
            default: deny
            """
        )
    )
    args = ["explain", "--policy", str(policy), "--from", "10.0.5.9", "--to", "192.0.2.1:80"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "limits:    100 connections open at once, new connections 20/s (burst 20),"
        " requests 50/s (burst 50), per workload; over them: reset or 429" in out
    )
    assert "breaker:   5 failures in a row to a destination fail its flows fast for 30s" in out
