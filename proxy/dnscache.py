"""The proxy's cache of name -> addresses: what is kept, for how long, and
what a lookup answers. Pure: the clock is passed in, nothing here resolves.

:mod:`egress_agent.proxy.resolver` asks the DNS and feeds the answers in;
``policy.decide`` gets the :class:`~egress_agent.policy.model.Resolution`
that :meth:`NameCache.resolution` makes of an entry.

The rules, and why:

* **TTLs are clamped** to ``[min_ttl, max_ttl]``: a TTL of 0 would send every
  connection to the resolver, a TTL of a week would keep an address long
  after the name moved.
* **An address belongs to a name until its answer's TTL runs out.** A new
  answer adds its addresses and extends those it repeats; it does not drop
  the others. Round-robin names hand out different subsets from one query to
  the next, and a client may hold an answer the proxy's last query did not
  repeat: within that answer's TTL it is still the name's. An answer that
  says the name has no addresses (NXDOMAIN, or neither A nor AAAA) is
  authoritative and clears them.
* **A failed query** (timeout, unreachable resolver, SERVFAIL) keeps what was
  known: addresses whose TTL ran out less than ``serve_stale`` seconds ago are
  still used, marked stale. After that the name owns nothing (fail closed).
  The next query is not tried before ``min_ttl`` has passed, so a dead
  resolver is not asked once per connection.
* **Names in use are refreshed before they expire**: a name looked up since
  its last answer, or pinned (the literal hosts of the policy), is due for a
  new query once less than a fifth of its TTL is left (at least a second).
  Names nobody uses expire, and are dropped once even a stale answer would
  be too old.
* **Bounded**: beyond ``capacity`` names the least recently used unpinned
  ones are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from egress_agent.policy.model import DnsSettings, IPAddress, Resolution

# Refresh a name in use once less than this part of its TTL is left...
REFRESH_FRACTION = 0.2
# ...or this many seconds, whichever is more.
REFRESH_MIN_SECONDS = 1.0

NXDOMAIN = "the name does not exist (NXDOMAIN)"
NO_ADDRESSES = "the name has no A or AAAA records"


def clamp_ttl(ttl: float, settings: DnsSettings) -> float:
    """A TTL within the configured floor and ceiling."""
    return min(max(float(ttl), settings.min_ttl), settings.max_ttl)


def normalise(name: str) -> str:
    return name.strip().lower().rstrip(".")


@dataclass(kw_only=True)
class Entry:
    """What is known about one name."""

    name: str
    # Address -> when the answer that last gave it expires (clamped TTL).
    addresses: dict[IPAddress, float] = field(default_factory=dict)
    # When to ask again: the last answer's clamped TTL, or after a failure
    # the retry interval.
    expires: float = 0.0
    ttl: float = 0.0  # the last answer's clamped TTL
    answered: float | None = None  # when the last answer came
    error: str | None = None  # why the last query gave no addresses
    failed: bool = False  # the last query failed (as opposed to answered)
    last_used: float = 0.0
    pinned: bool = False


@dataclass(frozen=True, kw_only=True)
class EntryView:
    """An entry as ``status`` shows it."""

    name: str
    addresses: tuple[str, ...]
    expires_in: float
    state: str  # fresh | expired | stale | failed | nxdomain | empty
    error: str | None
    pinned: bool


class NameCache:
    """Names -> addresses with TTLs, under :class:`DnsSettings`."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise(name) in self._entries

    def configure(self, settings: DnsSettings) -> None:
        """New settings (a reload): they apply from the next answer on."""
        self.settings = settings

    # -- what a lookup sees ----------------------------------------------------

    def needs_query(self, name: str, now: float) -> bool:
        """Whether the resolver must be asked before ``name`` can be answered:
        never asked, or its answer (or a failure's retry interval) ran out."""
        entry = self._entries.get(normalise(name))
        return entry is None or now >= entry.expires

    def resolution(self, name: str, now: float, *, use: bool = True) -> Resolution | None:
        """What the name owns now, or None if nothing was ever asked.
        ``use`` marks the name as in use (refreshed before it expires)."""
        entry = self._entries.get(normalise(name))
        if entry is None:
            return None
        if use:
            entry.last_used = now
        current = frozenset(a for a, until in entry.addresses.items() if until > now)
        if current:
            return Resolution(addresses=current)
        if entry.failed:
            stale_until = now - self.settings.serve_stale
            stale = frozenset(a for a, until in entry.addresses.items() if until > stale_until)
            if stale:
                return Resolution(addresses=stale, stale=True)
            if entry.addresses:
                return Resolution(
                    error=f"{entry.error}; the last answer expired more than"
                    f" {self.settings.serve_stale:g}s ago (dns.serve_stale)"
                )
        elif entry.addresses:
            return Resolution(error="its last answer expired and it was not asked again yet")
        return Resolution(error=entry.error or NO_ADDRESSES)

    # -- what the resolver learnt ------------------------------------------------

    def answered(
        self, name: str, records: Iterable[tuple[IPAddress, float]], now: float, *, ttl: float
    ) -> None:
        """An answer: ``records`` are (address, TTL); ``ttl`` is the answer's
        own (the minimum along a CNAME chain, or the negative-caching TTL of
        an answer without records). No records: the name has no addresses."""
        entry = self._entry(name)
        clamped = clamp_ttl(ttl, self.settings)
        got = list(records)
        if got:
            for address, record_ttl in got:
                until = now + clamp_ttl(min(record_ttl, ttl), self.settings)
                entry.addresses[address] = max(entry.addresses.get(address, 0.0), until)
            entry.addresses = {a: t for a, t in entry.addresses.items() if t > now}
            entry.error = None
        else:
            entry.addresses = {}
            entry.error = NO_ADDRESSES
        entry.ttl = clamped
        entry.expires = now + clamped
        entry.answered = now
        entry.failed = False

    def nxdomain(self, name: str, now: float, *, ttl: float) -> None:
        """The name does not exist: it owns nothing, for the negative TTL."""
        self.answered(name, (), now, ttl=ttl)
        self._entries[normalise(name)].error = NXDOMAIN

    def failed(self, name: str, error: str, now: float) -> None:
        """The resolver could not be asked or did not answer: keep what was
        known (see :meth:`resolution`), ask again after ``min_ttl``."""
        entry = self._entry(name)
        entry.failed = True
        entry.error = error
        entry.expires = now + self.settings.min_ttl

    # -- upkeep -------------------------------------------------------------

    def pin(self, names: Iterable[str], now: float) -> list[str]:
        """Pin exactly ``names`` (kept and refreshed while pinned); returns
        those never asked yet, for the caller to resolve."""
        wanted = {normalise(n) for n in names}
        for entry in self._entries.values():
            entry.pinned = entry.name in wanted
        new = [n for n in sorted(wanted) if n not in self._entries]
        for name in new:
            self._entry(name).pinned = True
        return new

    def due(self, now: float) -> list[str]:
        """Names in use whose answer is about to run out (or has): to be
        asked again now."""
        out = []
        for entry in self._entries.values():
            in_use = entry.pinned or (
                entry.answered is not None and entry.last_used >= entry.answered
            )
            if not in_use:
                continue
            if entry.failed or entry.answered is None:
                if now >= entry.expires:
                    out.append(entry.name)
                continue
            margin = max(REFRESH_MIN_SECONDS, REFRESH_FRACTION * entry.ttl)
            if now >= entry.expires - margin:
                out.append(entry.name)
        return out

    def prune(self, now: float) -> int:
        """Drop unpinned names that are of no use any more (expired beyond
        even a stale answer) and, beyond capacity, the least recently used
        unpinned ones. Returns how many were dropped."""
        keep_until = now - self.settings.serve_stale
        dropped = [
            n
            for n, e in self._entries.items()
            if not e.pinned
            and e.expires <= now
            and all(until <= keep_until for until in e.addresses.values())
            and e.last_used < now - self.settings.max_ttl
        ]
        for name in dropped:
            del self._entries[name]
        count = len(dropped)
        excess = len(self._entries) - self.settings.cache_size
        if excess > 0:
            victims = sorted(
                (e for e in self._entries.values() if not e.pinned), key=lambda e: e.last_used
            )[:excess]
            for entry in victims:
                del self._entries[entry.name]
            count += len(victims)
        return count

    def view(self, now: float) -> Iterator[EntryView]:
        """Every entry, for ``status``, by name."""
        for name in sorted(self._entries):
            entry = self._entries[name]
            got = self.resolution(name, now, use=False)
            addresses = sorted(got.addresses, key=lambda a: (a.version, int(a))) if got else []
            if entry.answered is None and not entry.failed:
                state = "pending"
            elif got is not None and got.stale:
                state = "stale"
            elif entry.failed:
                state = "failed"
            elif entry.error == NXDOMAIN:
                state = "nxdomain"
            elif not addresses:
                state = "empty"
            else:
                state = "fresh" if now < entry.expires else "expired"
            yield EntryView(
                name=name,
                addresses=tuple(str(a) for a in addresses),
                expires_in=round(entry.expires - now, 1),
                state=state,
                error=got.error if got is not None else None,
                pinned=entry.pinned,
            )

    def _entry(self, name: str) -> Entry:
        key = normalise(name)
        entry = self._entries.get(key)
        if entry is None:
            # Not in use until a lookup says so (see resolution()).
            entry = self._entries[key] = Entry(name=key, last_used=float("-inf"))
        return entry
