"""Pod discovery: the pods on this node and their namespaces' labels, kept current.

A policy on a Kubernetes node names workloads by selector (namespace, pod
labels, namespace labels), but the datapath diverts by source address. This
module keeps the bridge between the two: a local copy of the pods scheduled on
this node (their IPs, labels, phase) and of every namespace's labels, handed
to the agent as a frozen :class:`Snapshot` whenever something that matters
changes. Deciding which pods a selector names (:func:`matches`,
:func:`selected_networks`) is pure and tested without an API server.

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

The client is synchronous. Lists run in a worker thread (``asyncio.to_thread``);
each watch request runs in its own daemon thread that hands events to the
event loop with ``call_soon_threadsafe``. Stopping shuts the watch's socket
down, so the thread ends at once; the request timeouts bound it in every case.
The API's JSON is read directly (``_preload_content=False``): the client's
model classes are never built.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from egress_agent.policy.model import IPAddress, IPNetwork

log = logging.getLogger(__name__)

NODE_NAME_ENV = "NODE_NAME"
# Pods that have finished keep status.podIPs, but the kubelet has released the
# addresses (the sandbox is gone) and may already have given them to a new pod.
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

# Seconds to establish a connection to the API server.
CONNECT_TIMEOUT = 10.0
# Seconds a list may wait for data before it is abandoned and retried.
LIST_READ_TIMEOUT = 60.0
# Objects per list page; the pages of one list are one consistent snapshot.
LIST_PAGE_SIZE = 500
# The server ends a watch after timeoutSeconds, drawn from [MIN, 2*MIN) as
# client-go does, so that the agents of many nodes do not reconnect in step.
MIN_WATCH_TIMEOUT = 300
# A watch with no data for its timeout plus this is taken as dead (a dropped
# connection no RST announced); TCP keepalive (make_api) usually notices first.
WATCH_READ_MARGIN = 30.0
# A watch that ends this soon without a single event counts as a failure, so
# a server that closes every watch at once is retried with back-off, not spun on.
MIN_WATCH_DURATION = 1.0
# How long stopping waits for a watch thread before leaving it to its timeouts.
STOP_GRACE = 2.0

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class KubernetesConfigError(Exception):
    """The agent cannot talk to the API server as configured: a permanent error
    (report and stop); the message says what to fix."""


class FrozenMap(Mapping[K, V]):
    """An immutable mapping that hashes by value (labels, namespaces' labels),
    so that pods and snapshots are hashable plain data."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        data: dict[K, V] = dict(items.items()) if isinstance(items, Mapping) else dict(items)
        self._data = data

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def _frozen(items: Mapping[str, str]) -> FrozenMap[str, str]:
    return items if isinstance(items, FrozenMap) else FrozenMap(items)


@dataclass(frozen=True, kw_only=True)
class PodInfo:
    """What the datapath needs to know of one pod on this node."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())
    # status.podIPs (IPv4 and IPv6); empty until the network plugin has assigned them.
    ips: tuple[IPAddress, ...] = ()
    host_network: bool = False
    phase: str = "Pending"
    # metadata.deletionTimestamp is set: the pod is shutting down and its
    # address may already have been given to a new pod.
    terminating: bool = False
    created: str = ""  # metadata.creationTimestamp (RFC 3339, sorts as text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "ips", tuple(self.ips))


@dataclass(frozen=True, kw_only=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))


@dataclass(frozen=True, kw_only=True)
class Selector:
    """Which pods a policy workload names, e.g. ``{namespace: db, labels:
    {cnpg.io/cluster: pg-main}}``. Every field set must match (equality-based
    label selection); an empty ``labels`` selects every pod, as in Kubernetes."""

    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())
    namespace_labels: Mapping[str, str] = field(default_factory=lambda: FrozenMap[str, str]())

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))
        object.__setattr__(self, "namespace_labels", _frozen(self.namespace_labels))


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """The discovered state at one moment: plain data, safe to keep and compare."""

    pods: tuple[PodInfo, ...]  # sorted by (namespace, name)
    namespace_labels: Mapping[str, Mapping[str, str]]
    pods_resource_version: str | None
    namespaces_resource_version: str | None
    # True once pods and namespaces have each been listed; stays true while the
    # API server is unreachable (the last known state is still the best one).
    synced: bool

    def labels_of_namespace(self, namespace: str) -> Mapping[str, str]:
        """The namespace's labels; empty when the namespace is not (yet) known."""
        return self.namespace_labels.get(namespace, FrozenMap())


def matches(selector: Selector, pod: PodInfo, namespace_labels: Mapping[str, str]) -> bool:
    """Whether ``selector`` names ``pod`` (whose namespace has ``namespace_labels``).

    The answer is about the pod's own addresses, since those are what the
    datapath matches on, hence two exceptions:

    * a hostNetwork pod never matches: its IPs are the node's, shared with the
      kubelet and every other hostNetwork pod, so they cannot identify it;
    * a pod in phase Succeeded or Failed never matches: its IPs have been
      released and may already belong to another pod.

    A pod that has no IP yet does match; it contributes no address until its
    IPs are known (see :func:`selected_networks`).
    """
    if pod.host_network or pod.phase in TERMINAL_PHASES:
        return False
    if selector.namespace is not None and pod.namespace != selector.namespace:
        return False
    return _subset(selector.labels, pod.labels) and _subset(
        selector.namespace_labels, namespace_labels
    )


def _subset(wanted: Mapping[str, str], have: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in wanted.items())


def address_owners(snapshot: Snapshot) -> dict[IPAddress, PodInfo]:
    """Which pod each address identifies, when several pods list it.

    The network plugin may give a terminating pod's address to a new pod
    before the API server has forgotten the old one, so for a while two pods
    claim one address. The address then belongs to the pod that is not
    terminating; between two such, to the newer one (the older one's entry is
    stale); ties go to the first by namespace and name, so every agent
    decides alike. hostNetwork pods and finished pods claim nothing.
    """
    owners: dict[IPAddress, PodInfo] = {}
    for pod in snapshot.pods:
        if pod.host_network or pod.phase in TERMINAL_PHASES:
            continue
        for ip in pod.ips:
            held = owners.get(ip)
            if held is None or _claim(pod) > _claim(held):
                owners[ip] = pod
    return owners


def _claim(pod: PodInfo) -> tuple[bool, str]:
    return (not pod.terminating, pod.created)


def address_conflicts(snapshot: Snapshot) -> list[str]:
    """One line per address that several pods list, saying which keeps it."""
    lines = []
    for ip, owner in address_owners(snapshot).items():
        others = [
            f"{p.namespace}/{p.name}{' (terminating)' if p.terminating else ''}"
            for p in snapshot.pods
            if p is not owner
            and ip in p.ips
            and not p.host_network
            and p.phase not in TERMINAL_PHASES
        ]
        if others:
            lines.append(
                f"address {ip} is listed by {owner.namespace}/{owner.name} and "
                f"{', '.join(others)}: it identifies {owner.namespace}/{owner.name}"
            )
    return lines


def selected_networks(selector: Selector, snapshot: Snapshot) -> tuple[IPNetwork, ...]:
    """The host networks (/32, /128) of the pods ``selector`` names: a workload's
    ``cidrs`` for the renderer. Sorted, IPv4 first, without duplicates. An
    address several pods list counts only for its owner (:func:`address_owners`)."""
    owners = address_owners(snapshot)
    addresses = {
        ip
        for pod in snapshot.pods
        if matches(selector, pod, snapshot.labels_of_namespace(pod.namespace))
        for ip in pod.ips
        if owners.get(ip) is pod
    }
    ordered = sorted(addresses, key=lambda a: (a.version, int(a)))
    return tuple(ipaddress.ip_network(a) for a in ordered)


# --- Parsing the API's objects -------------------------------------------------


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """A PodInfo from a Pod object as the API serves it (JSON); ``ValueError``
    when it lacks what identifies a pod."""
    metadata = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    namespace, name = _required(metadata, "namespace"), _required(metadata, "name")
    entries = status.get("podIPs") or []
    texts = [e.get("ip") for e in entries if isinstance(e, Mapping)]
    if not texts and status.get("podIP"):  # servers before dual-stack set podIP only
        texts = [status["podIP"]]
    ips: list[IPAddress] = []
    for text in texts:
        try:
            ips.append(ipaddress.ip_address(str(text)))
        except ValueError:
            log.warning("pod %s/%s: ignoring podIPs entry %r: not an IP", namespace, name, text)
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=str(metadata.get("uid") or ""),
        labels=_labels(metadata),
        ips=tuple(dict.fromkeys(ips)),
        host_network=bool(spec.get("hostNetwork", False)),
        phase=str(status.get("phase") or "Pending"),
        terminating=bool(metadata.get("deletionTimestamp")),
        created=str(metadata.get("creationTimestamp") or ""),
    )


def namespace_info(obj: Mapping[str, Any]) -> NamespaceInfo:
    metadata = _mapping(obj.get("metadata"), "metadata")
    return NamespaceInfo(name=_required(metadata, "name"), labels=_labels(metadata))


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is {type(value).__name__}, expected an object")
    return value


def _required(metadata: Mapping[str, Any], key: str) -> str:
    value = metadata.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"metadata.{key} is missing")
    return value


def _labels(metadata: Mapping[str, Any]) -> FrozenMap[str, str]:
    labels = _mapping(metadata.get("labels"), "metadata.labels")
    return FrozenMap((str(k), str(v)) for k, v in labels.items())


def _resource_version(obj: object) -> str | None:
    if isinstance(obj, Mapping):
        metadata = obj.get("metadata")
        if isinstance(metadata, Mapping):
            rv = metadata.get("resourceVersion")
            if isinstance(rv, str) and rv:
                return rv
    return None


# --- Configuration ------------------------------------------------------------


def node_name_from_env(environ: Mapping[str, str] | None = None) -> str:
    """This node's name, from NODE_NAME (set by the DaemonSet from the downward API)."""
    env = os.environ if environ is None else environ
    name = env.get(NODE_NAME_ENV, "").strip()
    if not name:
        raise KubernetesConfigError(
            f"{NODE_NAME_ENV} is not set: the agent watches the pods of its own node and "
            "learns the node's name from it. In the DaemonSet's container set "
            f"env: [{{name: {NODE_NAME_ENV}, valueFrom: {{fieldRef: {{fieldPath: "
            "spec.nodeName}}}}]"
        )
    return name


def make_api(kubeconfig: str | None) -> kubernetes.client.CoreV1Api:
    """The pod's service account (in-cluster config) when ``kubeconfig`` is
    None, else the current context of that file."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes.config.ConfigException as exc:
            raise KubernetesConfigError(
                f"cannot use the in-cluster configuration ({exc}): inside a pod, "
                "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set and the "
                "service account token mounted (automountServiceAccountToken must not be "
                "false); outside a cluster, give a kubeconfig file with --kubeconfig"
            ) from None
    else:
        if not os.path.isfile(kubeconfig):
            raise KubernetesConfigError(
                f"{kubeconfig}: no such kubeconfig file: check the path given with --kubeconfig"
            )
        try:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        except (kubernetes.config.ConfigException, ValueError, OSError) as exc:
            raise KubernetesConfigError(
                f"{kubeconfig}: cannot use this kubeconfig: {exc} "
                "(check it with: kubectl --kubeconfig FILE get pods)"
            ) from None
    # Watches stay open for minutes; TCP keepalive notices a peer that vanished
    # without a reset (an API server failover, an idle-dropping load balancer).
    configuration.keep_alive = True
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


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


# --- The reflector --------------------------------------------------------------


class _ShortWatch(Exception):
    """The server ended a watch at once, without a single event."""


@dataclass(frozen=True)
class _Event:
    type: str
    obj: Mapping[str, Any]


@dataclass(frozen=True)
class _Opened:
    """The server has accepted the watch request."""


@dataclass(frozen=True)
class _End:
    error: BaseException | None


class _WatchThread:
    """One watch request, read in a daemon thread; events go to ``queue``.

    The request is made here rather than through ``kubernetes.watch.Watch``:
    ``Watch.stop()`` shuts down ``response.connection.sock``, which http.client
    has already set to None when the server answers ``Connection: close``, so
    it cannot wake a blocked read; and ``Watch.stream()`` clears its stop flag
    when it starts, losing a stop that came first. Owning the response lets
    :meth:`stop` use urllib3's ``HTTPResponse.shutdown()``, made for this.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[_Event | _Opened | _End],
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        name: str,
    ) -> None:
        self._loop = loop
        self._queue = queue
        self._func = func
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._stopping = False
        self._response: Any = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            response = self._func(watch=True, _preload_content=False, **self._kwargs)
        except Exception as exc:  # non-2xx answers raise ApiException here
            self._deliver(_End(error=exc))
            return
        with self._lock:
            stopping, self._response = self._stopping, response
        self._deliver(_Opened())
        try:
            if not stopping:
                for line in _lines(response):
                    item = _parse_event(line)
                    if item is not None:
                        self._deliver(item)
        except Exception as exc:
            self._deliver(_End(error=exc))
        else:
            self._deliver(_End(error=None))
        finally:
            response.close()
            response.release_conn()

    def _deliver(self, item: _Event | _Opened | _End) -> None:
        if self._stopping:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def stop(self) -> None:
        """End the watch: shut the response's socket down, which wakes the
        blocked read at once. A request still waiting for its response headers
        cannot be woken; the thread then ends by the request's connect or read
        timeout, after STOP_GRACE here."""
        with self._lock:
            self._stopping = True
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # already closed or released
                response.shutdown()
        deadline = time.monotonic() + STOP_GRACE
        while self.thread.is_alive():
            if time.monotonic() >= deadline:
                log.warning(
                    "thread %s did not end within %.0f s; its request timeout will end it",
                    self.thread.name,
                    STOP_GRACE,
                )
                return
            await asyncio.sleep(0.01)


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a streamed response as they arrive (one watch event each)."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


def _parse_event(line: bytes) -> _Event | None:
    """One watch event; an ERROR event raises ``ApiException`` with its code
    (410 Gone when the resourceVersion is too old)."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError:
        log.warning("ignoring a watch line that is not JSON: %.200r", line)
        return None
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping) or not isinstance(data.get("type"), str):
        log.warning("ignoring a watch line that is not an event: %.200r", line)
        return None
    if data["type"] == "ERROR":
        code = obj.get("code")
        raise ApiException(
            status=code if isinstance(code, int) else 500,
            reason=f"{obj.get('reason')}: {obj.get('message')}",
        )
    return _Event(type=data["type"], obj=obj)


class Reflector(Generic[T]):
    """A local copy of one kind of object: list, then watch; see the module
    docstring for the protocol. ``on_batch`` is called after each list and
    after each batch of watch events that changed the copy."""

    def __init__(
        self,
        *,
        kind: str,
        list_func: Callable[..., Any],
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
        self._list_func = list_func
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
        if isinstance(exc, ApiException) and exc.status == 410:
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
        if isinstance(exc, ApiException) and exc.status in (401, 403):
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

    def _request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._field_selector is not None:
            kwargs["field_selector"] = self._field_selector
        return kwargs

    def _list_page(self, continue_token: str | None) -> Mapping[str, Any]:
        kwargs = self._request_kwargs()
        kwargs.update(
            limit=LIST_PAGE_SIZE,
            _preload_content=False,  # raw JSON: no model objects built
            _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
        )
        if continue_token:
            kwargs["_continue"] = continue_token
        response = self._list_func(**kwargs)
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        if not isinstance(body, Mapping):
            raise ValueError(f"the {self.kind} list is {type(body).__name__}, not an object")
        return body

    async def _list(self) -> None:
        items: dict[str, T] = {}
        resource_version: str | None = None
        continue_token: str | None = None
        while True:
            body = await asyncio.to_thread(self._list_page, continue_token)
            resource_version = resource_version or _resource_version(body)
            for obj in body.get("items") or []:
                item = self._parse_logged(obj)
                if item is not None:
                    items[self._key(item)] = item
            metadata = body.get("metadata")
            continue_token = metadata.get("continue") if isinstance(metadata, Mapping) else None
            if not continue_token:
                break
        if resource_version is None:
            raise ValueError(f"the {self.kind} list has no metadata.resourceVersion")
        first = not self.synced
        self.items = items
        self.resource_version = resource_version
        self.synced = True
        self._need_list = False
        self.last_error = None
        (log.info if first else log.debug)(
            "%s: listed %d at resourceVersion %s", self.kind, len(items), resource_version
        )
        self._on_batch()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Event | _Opened | _End] = asyncio.Queue()
        timeout = random.randint(MIN_WATCH_TIMEOUT, 2 * MIN_WATCH_TIMEOUT - 1)
        kwargs = self._request_kwargs()
        kwargs.update(
            resource_version=self.resource_version,
            timeout_seconds=timeout,
            allow_watch_bookmarks=True,
            _request_timeout=(CONNECT_TIMEOUT, timeout + WATCH_READ_MARGIN),
        )
        reader = _WatchThread(
            loop=loop,
            queue=queue,
            func=self._list_func,
            kwargs=kwargs,
            name=f"egress-agent watch {self.kind}",
        )
        started = loop.time()
        received = 0
        reader.start()
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                changed = False
                end: _End | None = None
                for item in batch:
                    if isinstance(item, _End):
                        end = item
                        break
                    if isinstance(item, _Opened):
                        self.last_error = None
                        continue
                    changed = self._apply(item) or changed
                    received += 1
                if received:
                    self._failures = 0
                if changed:
                    self._on_batch()
                if end is not None:
                    if end.error is not None:
                        raise end.error
                    if not received and loop.time() - started < MIN_WATCH_DURATION:
                        raise _ShortWatch("the API server ended the watch at once, without events")
                    log.debug("%s: watch ended at %s", self.kind, self.resource_version)
                    return
        finally:
            await reader.stop()

    def _apply(self, event: _Event) -> bool:
        """Update the copy from one event; whether the copy changed."""
        resource_version = _resource_version(event.obj)
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
        if resource_version is not None:
            self.resource_version = resource_version
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
    if isinstance(exc, ApiException):
        if exc.status == 0 or exc.status is None:
            return f"API request failed: {exc.reason}"
        return f"the API server answered {exc.status} {exc.reason or ''}".rstrip()
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
        api: kubernetes.client.CoreV1Api,
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
            kind="pods",
            list_func=api.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={node_name}",
            parse=pod_info,
            key=lambda p: f"{p.namespace}/{p.name}",
            on_batch=self._batch_done,
            backoff=backoff,
        )
        self._namespaces: Reflector[NamespaceInfo] = Reflector(
            kind="namespaces",
            list_func=api.list_namespace,
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
