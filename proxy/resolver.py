"""The proxy's own DNS lookups: the one module that asks a resolver.

A server name (TLS SNI, HTTP Host) is the client's word; the proxy binds it to
addresses by resolving it itself (see ``policy.decide``). Lookups go to the
nameservers of the agent's own network namespace (``/etc/resolv.conf``: on
Kubernetes the DaemonSet's ``dnsPolicy: ClusterFirstWithHostNet`` makes that
the cluster DNS), with dnspython's asynchronous resolver so that a slow
resolver holds up only the connections that need it, never the event loop.
Names are queried as absolute names (no search list: a server name is fully
qualified), A and AAAA in parallel, with the TTLs the answers carry.

What is kept and for how long is :mod:`.dnscache`'s business (pure); this
module asks, coalesces concurrent lookups of one name into one query, keeps
names in use fresh with a background refresh, and counts what happened for
``/metrics``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from egress_agent.policy.model import DnsSettings, IPAddress, Resolution
from egress_agent.proxy.dnscache import NameCache, normalise

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
# How often the refresher looks for names about to expire.
REFRESH_INTERVAL = 1.0
# Refresh queries in flight at once (a policy may pin many names).
REFRESH_CONCURRENCY = 16

Records = list[tuple[IPAddress, float]]


class _Failed(Exception):
    """A query that got no answer (timeout, unreachable, SERVFAIL, ...)."""


class _NxDomain(Exception):
    def __init__(self, ttl: float) -> None:
        super().__init__("NXDOMAIN")
        self.ttl = ttl


class Resolver:
    """Names to addresses for the proxy's decisions, cached by TTL."""

    def __init__(
        self,
        settings: DnsSettings,
        *,
        resolv_conf: str = RESOLV_CONF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = NameCache(settings)
        self.resolv_conf = resolv_conf
        self.clock = clock
        self._dns: dns.asyncresolver.Resolver | None = None
        self._conf_stamp: tuple[int, int] | None = None
        self.config_error: str | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._refreshes = asyncio.Semaphore(REFRESH_CONCURRENCY)
        # For /metrics: queries by outcome, lookups by what they got.
        self.queries: dict[str, int] = {"answer": 0, "nodata": 0, "nxdomain": 0, "failed": 0}
        self.lookups: dict[str, int] = {"cached": 0, "queried": 0, "stale": 0, "failed": 0}

    @property
    def settings(self) -> DnsSettings:
        return self.cache.settings

    def configure(self, settings: DnsSettings) -> None:
        """New settings from a reload (timeouts, TTL bounds, size)."""
        self.cache.configure(settings)
        if self._dns is not None:
            self._dns.lifetime = settings.timeout
            self._dns.timeout = settings.timeout

    # -- lookups ---------------------------------------------------------------

    async def resolve(self, name: str) -> Resolution:
        """The addresses ``name`` owns now; asks the resolver when the cached
        answer ran out (or there is none). Never raises: failures are in the
        result's ``error``."""
        key = normalise(name)
        queried = self.cache.needs_query(key, self.clock())
        if queried:
            await self._query(key)
        got = self.cache.resolution(key, self.clock())
        if got is None:  # a query that did not even get to record a failure
            got = Resolution(error="not resolved")
        if got.stale:
            self.lookups["stale"] += 1
        elif not got.addresses:
            self.lookups["failed"] += 1
        else:
            self.lookups["queried" if queried else "cached"] += 1
        return got

    async def resolve_many(self, names: Iterable[str]) -> dict[str, Resolution]:
        wanted = list(dict.fromkeys(normalise(n) for n in names))
        if not wanted:
            return {}
        if len(wanted) == 1:
            return {wanted[0]: await self.resolve(wanted[0])}
        got = await asyncio.gather(*(self.resolve(n) for n in wanted))
        return dict(zip(wanted, got, strict=True))

    def known(self, names: Iterable[str]) -> dict[str, Resolution]:
        """What the cache holds for ``names`` now, without asking anyone
        (for decisions that cannot wait, like re-deciding on a reload)."""
        now = self.clock()
        out = {}
        for name in names:
            got = self.cache.resolution(name, now, use=False)
            out[normalise(name)] = got if got is not None else Resolution(error="not resolved")
        return out

    def keep_warm(self, names: Iterable[str]) -> None:
        """Pin exactly these names (the policy's literal hosts): they are
        resolved now and kept fresh, so no flow waits for them."""
        for name in self.cache.pin(names, self.clock()):
            self._spawn(name)

    async def run(self) -> None:
        """Refresh names in use before they expire; prune the rest. Runs
        until cancelled."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            now = self.clock()
            for name in self.cache.due(now):
                self._spawn(name)
            self.cache.prune(now)

    def _spawn(self, name: str) -> None:
        if name not in self._inflight:
            self._inflight[name] = asyncio.get_running_loop().create_task(
                self._refresh(name), name=f"dns {name}"
            )

    async def _refresh(self, name: str) -> None:
        try:
            async with self._refreshes:
                await self._ask(name)
        finally:
            self._inflight.pop(name, None)

    async def _query(self, name: str) -> None:
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(name), name=f"dns {name}")
            self._inflight[name] = task
            task.add_done_callback(lambda _t: self._inflight.pop(name, None))
        # A connection that goes away must not cancel the query others wait for.
        await asyncio.shield(task)

    async def _ask(self, name: str) -> None:
        """One query for A and AAAA, recorded in the cache whatever happens."""
        started = self.clock()
        try:
            resolver = self._resolver()
        except _Failed as exc:
            self._record_failure(name, str(exc), started)
            return
        a, aaaa = await asyncio.gather(
            self._family(resolver, name, dns.rdatatype.A),
            self._family(resolver, name, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        now = self.clock()
        if isinstance(a, _NxDomain) or isinstance(aaaa, _NxDomain):
            ttl = min(x.ttl for x in (a, aaaa) if isinstance(x, _NxDomain))
            self.cache.nxdomain(name, now, ttl=ttl)
            self.queries["nxdomain"] += 1
            return
        answers = [x for x in (a, aaaa) if isinstance(x, tuple)]
        failures = [x for x in (a, aaaa) if isinstance(x, BaseException)]
        for problem in failures:
            if not isinstance(problem, _Failed):
                log.error("dns: unexpected error resolving %s", name, exc_info=problem)
        records = [r for got, _ttl in answers for r in got]
        if failures and not records:
            self._record_failure(name, _failure_text(failures[0]), now)
            return
        ttl = min(t for _got, t in answers)
        self.cache.answered(name, records, now, ttl=ttl)
        if failures:
            # One family answered, the other did not: use what came, ask
            # again soon for the rest.
            self.cache.failed(name, _failure_text(failures[0]), now)
            self.queries["failed"] += 1
        elif records:
            self.queries["answer"] += 1
        else:
            self.queries["nodata"] += 1

    def _record_failure(self, name: str, error: str, now: float) -> None:
        self.cache.failed(name, error, now)
        self.queries["failed"] += 1
        log.warning("dns: %s: %s", name, error)

    async def _family(
        self, resolver: dns.asyncresolver.Resolver, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[Records, float]:
        qname = dns.name.from_text(name)  # absolute: no search list
        try:
            answer = await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            raise _NxDomain(_negative_ttl(exc, default=self.settings.min_ttl)) from None
        except dns.resolver.LifetimeTimeout:
            raise _Failed(
                f"no answer from {_servers(resolver)} within {self.settings.timeout:g}s"
            ) from None
        except dns.resolver.NoNameservers as exc:
            raise _Failed(f"every nameserver failed ({_servers(resolver)}): {exc}") from None
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}") from None
        ttl = float(answer.chaining_result.minimum_ttl)
        records: Records = []
        if answer.rrset is not None:
            for rdata in answer.rrset:
                records.append((ipaddress.ip_address(rdata.address), ttl))
        return records, ttl

    def _resolver(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver with this namespace's resolv.conf, read again
        when the file changes."""
        try:
            st = os.stat(self.resolv_conf)
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError as exc:
            self.config_error = f"cannot read {self.resolv_conf}: {exc.strerror}"
            raise _Failed(self.config_error) from None
        if self._dns is None or stamp != self._conf_stamp:
            try:
                resolver = dns.asyncresolver.Resolver(filename=self.resolv_conf)
            except dns.resolver.NoResolverConfiguration:
                self.config_error = f"no nameserver in {self.resolv_conf}"
                raise _Failed(self.config_error) from None
            except (OSError, ValueError, dns.exception.DNSException) as exc:
                self.config_error = f"cannot use {self.resolv_conf}: {exc}"
                raise _Failed(self.config_error) from None
            resolver.lifetime = self.settings.timeout
            resolver.timeout = self.settings.timeout
            self._dns, self._conf_stamp, self.config_error = resolver, stamp, None
        return self._dns

    # -- for status and metrics -----------------------------------------------

    def nameservers(self) -> list[str]:
        if self._dns is None:
            try:
                self._resolver()
            except _Failed:
                return []
        assert self._dns is not None
        return [str(ns) for ns in self._dns.nameservers]

    def status(self, *, limit: int = 200) -> dict[str, Any]:
        now = self.clock()
        views = list(self.cache.view(now))
        return {
            "nameservers": self.nameservers(),
            "resolv_conf": self.resolv_conf,
            "error": self.config_error,
            "names": len(views),
            "settings": {
                "min_ttl": self.settings.min_ttl,
                "max_ttl": self.settings.max_ttl,
                "serve_stale": self.settings.serve_stale,
                "timeout": self.settings.timeout,
                "cache_size": self.settings.cache_size,
            },
            "queries": dict(self.queries),
            "lookups": dict(self.lookups),
            "entries": [
                {
                    "name": v.name,
                    "addresses": list(v.addresses),
                    "expires_in": v.expires_in,
                    "state": v.state,
                    "error": v.error,
                    "pinned": v.pinned,
                }
                for v in views[:limit]
            ],
        }

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _negative_ttl(exc: dns.resolver.NXDOMAIN, *, default: float) -> float:
    """How long the zone says a name's absence may be cached (RFC 2308: the
    SOA in the authority section), else ``default``."""
    responses: dict[Any, Any] = exc.responses()  # type: ignore[no-untyped-call]
    for response in responses.values():
        try:
            return float(response.resolve_chaining().minimum_ttl)
        except (dns.exception.DNSException, ValueError):
            continue
    return default


def _servers(resolver: dns.asyncresolver.Resolver) -> str:
    return ", ".join(str(ns) for ns in resolver.nameservers) or "no nameserver"


def _failure_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {exc}"
