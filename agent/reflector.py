"""Pod discovery: the pods on this node and their namespaces' labels, kept current.

A :class:`PodWatcher` keeps a local copy of the pods scheduled on this node
(their IPs, labels, phase) and of every namespace's labels, and hands it to
the agent as a frozen :class:`~egress_agent.agent.pods.Snapshot` whenever
something that matters changes.

Each kind is kept by a :class:`Reflector`, the list-then-watch protocol of
client-go's reflector in small (see
https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes):

* list (pods with ``fieldSelector=spec.nodeName=NODE``), then watch from the
  list's ``resourceVersion``;
* a watch that ends normally (the server's ``timeoutSeconds``) resumes from the
  last ``resourceVersion`` seen; ``allowWatchBookmarks`` lets the server
  advance it with BOOKMARK events while nothing changes;
* ``410 Gone`` (the version is older than the server's history, as an ERROR
  event or as the response's status) lists again from scratch; objects absent
  from the new list are dropped then, and only then;
* any other error (5xx, 403, refused or dropped connection) is retried with
  exponential back-off and jitter. The local copy is never cleared because the
  API server is unreachable: the last known state stays enforced.

Everything runs on the agent's event loop (the requests are
:mod:`egress_agent.agent.kubeapi`'s); cancelling :meth:`PodWatcher.run`
closes the open watches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from egress_agent.agent.kubeapi import ApiError, KubeApi, WatchEvent
from egress_agent.agent.pods import (
    FrozenMap,
    NamespaceInfo,
    PodInfo,
    Snapshot,
    namespace_info,
    pod_info,
    resource_version,
)

log = logging.getLogger(__name__)

# Objects per list page; the pages of one list are one consistent snapshot.
LIST_PAGE_SIZE = 500
# The server ends a watch after timeoutSeconds, drawn from [MIN, 2*MIN) as
# client-go does, so that the agents of many nodes do not reconnect in step.
MIN_WATCH_TIMEOUT = 300
# A watch that ends this soon without a single event counts as a failure, so
# a server that closes every watch at once is retried with back-off, not spun on.
MIN_WATCH_DURATION = 1.0

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential back-off with jitter for retrying the API server."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry ``attempt`` (0 for the first): half the
        exponential step plus a random part of the other half ("equal jitter"),
        so that the agents of many nodes do not retry in step."""
        step = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return step / 2 + rand() * step / 2


class _ShortWatch(Exception):
    """The server ended a watch at once, without a single event."""


class Reflector(Generic[T]):
    """A local copy of one kind of object: list, then watch; see the module
    docstring for the protocol. ``on_batch`` is called after each list and
    after each batch of watch events that changed the copy."""

    def __init__(
        self,
        *,
        api: KubeApi,
        kind: str,
        parse: Callable[[Mapping[str, Any]], T],
        key: Callable[[T], str],
        on_batch: Callable[[], None],
        backoff: Backoff,
        field_selector: str | None = None,
    ) -> None:
        self.kind = kind
        self.items: dict[str, T] = {}
        self.resource_version: str | None = None
        self.synced = False
        self.last_error: str | None = None
        self._api = api
        self._parse = parse
        self._key = key
        self._on_batch = on_batch
        self._backoff = backoff
        self._field_selector = field_selector
        self._need_list = True
        self._failures = 0

    async def run(self) -> None:
        """List and watch until cancelled; errors are retried, never raised."""
        while True:
            try:
                if self._need_list:
                    await self._list()
                await self._watch()
                self._failures = 0
            except Exception as exc:
                await asyncio.sleep(self._failed(exc))

    def _failed(self, exc: Exception) -> float:
        self._failures += 1
        if isinstance(exc, ApiError) and exc.status == 410:
            self._need_list = True
            if self._failures == 1:
                log.info(
                    "%s: resourceVersion %s is no longer in the API server's history "
                    "(410 Gone); listing again",
                    self.kind,
                    self.resource_version,
                )
                return 0.0
        delay = self._backoff.delay(self._failures - 1)
        self.last_error = _describe(exc)
        hint = ""
        if isinstance(exc, ApiError) and exc.status in (401, 403):
            hint = (
                f" (the agent's service account needs get, list and watch on {self.kind}:"
                " check its ClusterRole and ClusterRoleBinding)"
            )
        log.warning(
            "%s: %s%s; keeping the last known %d %s%s; retrying in %.1f s",
            self.kind,
            self.last_error,
            hint,
            len(self.items),
            self.kind,
            "" if self.synced else " (not listed yet)",
            delay,
        )
        return delay

    async def _list(self) -> None:
        items: dict[str, T] = {}
        version: str | None = None
        continue_token: str | None = None
        while True:
            body = await self._api.list_page(
                self.kind,
                field_selector=self._field_selector,
                limit=LIST_PAGE_SIZE,
                continue_token=continue_token,
            )
            version = version or resource_version(body)
            for obj in body.get("items") or []:
                item = self._parse_logged(obj)
                if item is not None:
                    items[self._key(item)] = item
            metadata = body.get("metadata")
            continue_token = metadata.get("continue") if isinstance(metadata, Mapping) else None
            if not continue_token:
                break
        if version is None:
            raise ValueError(f"the {self.kind} list has no metadata.resourceVersion")
        first = not self.synced
        self.items = items
        self.resource_version = version
        self.synced = True
        self._need_list = False
        self.last_error = None
        (log.info if first else log.debug)(
            "%s: listed %d at resourceVersion %s", self.kind, len(items), version
        )
        self._on_batch()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        events = self._api.watch(
            self.kind,
            field_selector=self._field_selector,
            resource_version=self.resource_version,
            timeout_seconds=random.randint(MIN_WATCH_TIMEOUT, 2 * MIN_WATCH_TIMEOUT - 1),
        )
        async with contextlib.aclosing(events):
            async for batch in events:
                if not batch:  # the server has accepted the watch
                    self.last_error = None
                    continue
                changed = False
                for event in batch:
                    changed = self._apply(event) or changed
                received += len(batch)
                self._failures = 0
                if changed:
                    self._on_batch()
        if not received and loop.time() - started < MIN_WATCH_DURATION:
            raise _ShortWatch("the API server ended the watch at once, without events")
        log.debug("%s: watch ended at %s", self.kind, self.resource_version)

    def _apply(self, event: WatchEvent) -> bool:
        """Update the copy from one event; whether the copy changed."""
        version = resource_version(event.obj)
        changed = False
        if event.type in ("ADDED", "MODIFIED", "DELETED"):
            item = self._parse_logged(event.obj)
            if item is not None:
                key = self._key(item)
                if event.type == "DELETED":
                    changed = self.items.pop(key, None) is not None
                else:
                    changed = self.items.get(key) != item
                    self.items[key] = item
        elif event.type != "BOOKMARK":
            log.warning("%s: ignoring a watch event of unknown type %r", self.kind, event.type)
        if version is not None:
            self.resource_version = version
        return changed

    def _parse_logged(self, obj: object) -> T | None:
        try:
            if not isinstance(obj, Mapping):
                raise ValueError(f"{type(obj).__name__}, not an object")
            return self._parse(obj)
        except ValueError as exc:
            log.warning("%s: ignoring an object the agent cannot read: %s", self.kind, exc)
            return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- The pod watcher -------------------------------------------------------------


class PodWatcher:
    """The pods on one node and all namespaces' labels, kept current.

    ``on_change(snapshot)`` is called on the event loop after the first
    complete sync and then after each batch of events that changed pods or
    namespace labels; resource versions moving on alone (bookmarks) do not
    call it. Read the current state at any time with :meth:`snapshot`.
    """

    def __init__(
        self,
        api: KubeApi,
        *,
        node_name: str,
        on_change: Callable[[Snapshot], None],
        backoff: Backoff | None = None,
    ) -> None:
        backoff = backoff or Backoff()
        self.node_name = node_name
        self._on_change = on_change
        self._delivered: tuple[object, ...] | None = None
        self._pods: Reflector[PodInfo] = Reflector(
            api=api,
            kind="pods",
            field_selector=f"spec.nodeName={node_name}",
            parse=pod_info,
            key=lambda p: f"{p.namespace}/{p.name}",
            on_batch=self._batch_done,
            backoff=backoff,
        )
        self._namespaces: Reflector[NamespaceInfo] = Reflector(
            api=api,
            kind="namespaces",
            parse=namespace_info,
            key=lambda n: n.name,
            on_batch=self._batch_done,
            backoff=backoff,
        )

    async def run(self) -> None:
        """List and watch pods and namespaces until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pods.run(), name=f"watch pods on {self.node_name}")
            group.create_task(self._namespaces.run(), name="watch namespaces")

    def snapshot(self) -> Snapshot:
        pods = sorted(self._pods.items.values(), key=lambda p: (p.namespace, p.name))
        return Snapshot(
            pods=tuple(pods),
            namespace_labels=FrozenMap(
                (n.name, n.labels) for n in sorted(self._namespaces.items.values(), key=_name)
            ),
            pods_resource_version=self._pods.resource_version,
            namespaces_resource_version=self._namespaces.resource_version,
            synced=self._pods.synced and self._namespaces.synced,
        )

    @property
    def last_error(self) -> str | None:
        """The latest API error while it lasts (for status): None when both
        watches are running."""
        return self._pods.last_error or self._namespaces.last_error

    def _batch_done(self) -> None:
        snapshot = self.snapshot()
        content = (snapshot.pods, snapshot.namespace_labels)
        if not snapshot.synced or content == self._delivered:
            return  # a partial view (pods without namespaces) would mislead
        self._delivered = content
        try:
            self._on_change(snapshot)
        except Exception:
            log.exception("pod discovery: the change handler failed; discovery goes on")


def _name(namespace: NamespaceInfo) -> str:
    return namespace.name
