"""The DNS cache's policy, with the clock in the test's hand: TTL clamping,
addresses that last as long as their answers, stale answers only while the
resolver fails and only for serve_stale, refresh of names in use, bounds."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from egress_agent.policy.model import DnsSettings, IPAddress
from egress_agent.proxy.dnscache import NXDOMAIN, NameCache, clamp_ttl

SETTINGS = DnsSettings(min_ttl=5, max_ttl=300, serve_stale=30, timeout=2, cache_size=16)
A, B, C = (ipaddress.ip_address(a) for a in ("192.0.2.1", "192.0.2.2", "2001:db8::3"))


def addresses(cache: NameCache, name: str, now: float) -> set[IPAddress]:
    got = cache.resolution(name, now)
    assert got is not None
    return set(got.addresses)


@given(st.floats(min_value=0, max_value=10**7, allow_nan=False))
def test_ttls_are_clamped_to_floor_and_ceiling(ttl: float) -> None:
    got = clamp_ttl(ttl, SETTINGS)
    assert SETTINGS.min_ttl <= got <= SETTINGS.max_ttl
    if SETTINGS.min_ttl <= ttl <= SETTINGS.max_ttl:
        assert got == ttl


def test_an_answer_lasts_its_ttl_then_must_be_asked_again() -> None:
    cache = NameCache(SETTINGS)
    assert cache.needs_query("x.test", 0) and cache.resolution("x.test", 0) is None
    cache.answered("x.test", [(A, 60), (C, 60)], 100, ttl=60)
    assert not cache.needs_query("X.Test.", 159)
    assert addresses(cache, "x.test", 159) == {A, C}
    assert cache.needs_query("x.test", 160)
    expired = cache.resolution("x.test", 160)
    assert expired is not None and not expired.addresses and expired.error


def test_a_ttl_of_zero_is_kept_for_the_floor_and_a_week_for_the_ceiling() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("zero.test", [(A, 0)], 0, ttl=0)
    assert not cache.needs_query("zero.test", 4.9) and cache.needs_query("zero.test", 5)
    cache.answered("week.test", [(A, 604800)], 0, ttl=604800)
    assert cache.needs_query("week.test", 300)
    assert addresses(cache, "week.test", 299) == {A}


def test_round_robin_answers_add_up_within_their_ttls() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("rr.test", [(A, 60)], 0, ttl=60)
    cache.answered("rr.test", [(B, 60)], 30, ttl=60)
    # A client holding the first answer still reaches A: its TTL has not run out.
    assert addresses(cache, "rr.test", 59) == {A, B}
    assert addresses(cache, "rr.test", 61) == {B}


def test_an_answer_without_addresses_clears_the_name() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("moved.test", [(A, 60)], 0, ttl=60)
    cache.nxdomain("moved.test", 10, ttl=5)
    got = cache.resolution("moved.test", 11)
    assert got is not None and got.addresses == frozenset() and got.error == NXDOMAIN
    cache.answered("moved.test", [], 20, ttl=5)
    got = cache.resolution("moved.test", 21)
    assert got is not None and got.error == "the name has no A or AAAA records"


def test_a_failing_resolver_gets_the_last_answer_for_serve_stale_then_nothing() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("x.test", [(A, 60)], 0, ttl=60)
    cache.failed("x.test", "no answer from 10.0.0.2 within 2s", 61)
    stale = cache.resolution("x.test", 61)
    assert stale is not None and stale.stale and stale.addresses == {A}
    # Not asked again before the floor, so a dead resolver is not hammered.
    assert not cache.needs_query("x.test", 65) and cache.needs_query("x.test", 66)
    assert addresses(cache, "x.test", 89.9) == {A}  # expired at 60, stale until 90
    gone = cache.resolution("x.test", 90)
    assert gone is not None and not gone.addresses
    assert gone.error is not None and "no answer from 10.0.0.2" in gone.error
    assert "serve_stale" in gone.error


def test_a_failure_before_any_answer_owns_nothing() -> None:
    cache = NameCache(SETTINGS)
    cache.failed("new.test", "every nameserver failed", 0)
    got = cache.resolution("new.test", 0)
    assert got is not None and not got.addresses and got.error == "every nameserver failed"


def test_serve_stale_zero_fails_closed_at_once() -> None:
    cache = NameCache(DnsSettings(min_ttl=5, max_ttl=300, serve_stale=0))
    cache.answered("x.test", [(A, 60)], 0, ttl=60)
    cache.failed("x.test", "timeout", 60)
    got = cache.resolution("x.test", 60)
    assert got is not None and not got.addresses


def test_a_fresh_answer_during_a_failure_is_not_stale() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("x.test", [(A, 60)], 0, ttl=60)
    cache.failed("x.test", "timeout", 30)  # one family failed, say
    got = cache.resolution("x.test", 31)
    assert got is not None and got.addresses == {A} and not got.stale


def test_names_in_use_are_refreshed_before_they_expire_others_are_not() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("used.test", [(A, 100)], 0, ttl=100)
    cache.answered("idle.test", [(A, 100)], 0, ttl=100)
    cache.resolution("used.test", 10)
    assert cache.due(79) == []
    assert cache.due(80) == ["used.test"]  # a fifth of the TTL left
    cache.answered("used.test", [(A, 100)], 80, ttl=100)
    assert cache.due(81) == []  # not used since its new answer


def test_pinned_names_are_resolved_and_kept_fresh_without_use() -> None:
    cache = NameCache(SETTINGS)
    assert cache.pin(["smtp.test", "Blob.Test."], 0) == ["blob.test", "smtp.test"]
    assert sorted(cache.due(0)) == ["blob.test", "smtp.test"]  # never asked yet
    cache.answered("smtp.test", [(A, 10)], 0, ttl=10)
    cache.answered("blob.test", [(B, 10)], 0, ttl=10)
    assert cache.due(7.9) == []
    assert sorted(cache.due(8)) == ["blob.test", "smtp.test"]  # a fifth of 10s left
    assert cache.pin(["smtp.test"], 9) == []  # blob.test unpinned, nothing new
    assert cache.due(9) == ["smtp.test"]


def test_the_cache_is_bounded_least_recently_used_first_pinned_kept() -> None:
    cache = NameCache(DnsSettings(cache_size=16))
    cache.pin(["pinned.test"], 0)
    for i in range(20):
        cache.answered(f"n{i}.test", [(A, 300)], float(i), ttl=300)
    cache.resolution("n0.test", 100)  # used recently: kept
    dropped = cache.prune(101)
    assert dropped == 5 and len(cache) == 16
    assert "pinned.test" in cache and "n0.test" in cache
    assert "n1.test" not in cache and "n19.test" in cache


def test_unused_names_are_dropped_once_even_a_stale_answer_is_too_old() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("x.test", [(A, 10)], 0, ttl=10)
    assert cache.prune(30) == 0
    assert cache.prune(400) == 1 and "x.test" not in cache


def test_the_status_view_shows_state_and_what_is_left() -> None:
    cache = NameCache(SETTINGS)
    cache.answered("ok.test", [(C, 60), (A, 60)], 0, ttl=60)
    cache.nxdomain("no.test", 0, ttl=5)
    cache.answered("old.test", [(A, 10)], 0, ttl=10)
    cache.failed("old.test", "timeout", 20)
    views = {v.name: v for v in cache.view(21)}
    assert views["ok.test"].addresses == ("192.0.2.1", "2001:db8::3")
    assert views["ok.test"].state == "fresh" and views["ok.test"].expires_in == 39
    assert views["no.test"].state == "nxdomain"
    assert views["old.test"].state == "stale" and views["old.test"].addresses == ("192.0.2.1",)
