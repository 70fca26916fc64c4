"""Pod discovery against a fake API server: list, watch, resume, relist, retry.

The fake (``tests/lab/fakekube.py``, the one the netns tests run too) serves
real-shaped PodList/NamespaceList JSON and, for ``?watch=true``,
newline-delimited watch events, here answering each request from a script
that also says which query it expects (fieldSelector, resourceVersion,
continue).
What is asserted is what a user of the watcher sees: the snapshot, the
snapshots handed to ``on_change``, and the requests the API server received.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_asyncio.client
import pytest

from egress_agent.agent.kubeapi import (
    KubeApi,
    KubernetesConfigError,
    make_api,
    node_name_from_env,
)
from egress_agent.agent.pods import (
    PodInfo,
    Snapshot,
    address_conflicts,
    address_owners,
    matches,
    pod_info,
    selected_networks,
)
from egress_agent.agent.reflector import Backoff, PodWatcher
from egress_agent.policy.model import PodSelector
from tests.lab.fakekube import (
    CREATED,
    Script,
    body,
    bookmark,
    error,
    event,
    list_object,
    namespace_object,
    pod_object,
    serving,
    status_object,
)

NODE = "node-a"
TINY = Backoff(initial=0.01, cap=0.05)
# Every wait in these tests is bounded by this many seconds.
WAIT = 5.0

Json = dict[str, Any]


# --- Real-shaped API objects (the fake API server's) ------------------------------


def pod(
    name: str,
    *,
    namespace: str = "db",
    ips: tuple[str, ...] = (),
    labels: Mapping[str, str] | None = None,
    rv: str = "1",
    host_network: bool = False,
    phase: str = "Running",
) -> Json:
    return pod_object(
        {
            "namespace": namespace,
            "name": name,
            "uid": f"0c6f3a52-{namespace}-{name}",
            "labels": dict(labels or {}),
            "nodeName": NODE,
            **dict(zip(("ip", "ip6"), ips, strict=False)),
            "hostNetwork": host_network,
            "phase": phase,
            "rv": rv,
        }
    )


def namespace(name: str, *, labels: Mapping[str, str] | None = None, rv: str = "1") -> Json:
    return namespace_object({"name": name, "uid": f"7d1e-{name}", "labels": labels, "rv": rv})


def pod_list(rv: str, *items: Json, cont: str | None = None) -> Json:
    return list_object("pods", rv, items, cont=cont)


def namespace_list(rv: str, *items: Json, cont: str | None = None) -> Json:
    return list_object("namespaces", rv, items, cont=cont)


GONE = status_object(410, "Expired", "too old resource version: 10 (30)")
NAMESPACES = namespace_list(
    "100", namespace("db", labels={"team": "data"}), namespace("web", labels={"team": "front"})
)


# --- The fake API server, answering from a script -----------------------------------


@pytest.fixture
def served() -> Iterator[tuple[Script, str]]:
    script = Script({"pods": pod_list("1"), "namespaces": NAMESPACES})
    with serving(script) as url:
        yield script, url
    assert not script.mismatches, script.mismatches
    assert not script.errors, script.errors


@pytest.fixture
def fake(served: tuple[Script, str]) -> Script:
    return served[0]


@pytest.fixture
def api(served: tuple[Script, str]) -> str:
    """The fake's URL, for :func:`running`."""
    return served[1]


def api_for(url: str) -> KubeApi:
    """A client of the server at ``url`` (made on the running event loop)."""
    configuration = kubernetes_asyncio.client.Configuration(host=url)
    return KubeApi(kubernetes_asyncio.client.ApiClient(configuration))


def Selector(
    *,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    namespace_labels: Mapping[str, str] | None = None,
) -> PodSelector:
    """The policy's pod selector, from mappings (as a policy file gives them)."""
    return PodSelector(
        namespace=namespace,
        labels=tuple(sorted((labels or {}).items())),
        namespace_labels=tuple(sorted((namespace_labels or {}).items())),
    )


# --- Running the watcher ----------------------------------------------------------


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 20))

    return wrapper


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(url: str) -> AsyncIterator[tuple[PodWatcher, list[Snapshot]]]:
    """The watcher of the API server at ``url`` running as a task; cancelled
    at the end."""
    changes: list[Snapshot] = []
    api = api_for(url)
    watcher = PodWatcher(api, node_name=NODE, on_change=changes.append, backoff=TINY)
    task = asyncio.get_running_loop().create_task(watcher.run(), name="pod watcher under test")
    try:
        yield watcher, changes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


async def synced(watcher: PodWatcher, gate: threading.Event | None = None) -> None:
    """Wait for the first complete sync, then open ``gate``: what the test
    scripted behind it happens after the first on_change."""
    await until(lambda: watcher.snapshot().synced, "the first sync")
    if gate is not None:
        gate.set()


def names(snapshot: Snapshot) -> list[str]:
    return [f"{p.namespace}/{p.name}" for p in snapshot.pods]


def ips(*texts: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return tuple(ipaddress.ip_address(t) for t in texts)


# --- List, then watch ---------------------------------------------------------------


@run_async
async def test_initial_list_fills_the_snapshot_with_this_nodes_pods(
    fake: Script, api: str
) -> None:
    fake.on_list(
        "pods",
        body(
            pod_list(
                "10",
                pod("pg-1", ips=("10.1.0.5", "fd00:1::5"), labels={"cnpg.io/cluster": "pg-main"}),
                pod("agent", namespace="kube-system", ips=("192.0.2.10",), host_network=True),
                pod("web-1", namespace="web", phase="Pending"),
            )
        ),
        fieldSelector=f"spec.nodeName={NODE}",
    )
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="10")
    async with running(api) as (watcher, changes):
        await until(lambda: bool(fake.requests("pods", "watch")), "the pod watch")
        await until(lambda: watcher.snapshot().synced, "the first sync")
        snap = watcher.snapshot()
        assert names(snap) == ["db/pg-1", "kube-system/agent", "web/web-1"]
        pg = snap.pods[0]
        assert pg == PodInfo(
            namespace="db",
            name="pg-1",
            uid="0c6f3a52-db-pg-1",
            labels={"cnpg.io/cluster": "pg-main"},
            ips=ips("10.1.0.5", "fd00:1::5"),
            host_network=False,
            phase="Running",
            created=CREATED,
        )
        assert snap.pods[1].host_network
        assert snap.pods[2].ips == ()
        assert snap.pods_resource_version == "10"
        assert snap.namespaces_resource_version == "100"
        assert dict(snap.labels_of_namespace("db")) == {
            "kubernetes.io/metadata.name": "db",
            "team": "data",
        }
        assert changes[-1] == snap
        assert all(c.synced for c in changes), "on_change before both lists were complete"
        hash(snap)  # plain, frozen data
    (listed,) = fake.requests("pods", "list")
    assert listed["fieldSelector"] == f"spec.nodeName={NODE}"
    watched = fake.requests("pods", "watch")[0]
    assert watched["fieldSelector"] == f"spec.nodeName={NODE}"
    assert watched["resourceVersion"] == "10"
    assert watched["allowWatchBookmarks"].lower() == "true"
    assert int(watched["timeoutSeconds"]) > 0
    assert "fieldSelector" not in fake.requests("namespaces", "list")[0]


@run_async
async def test_watch_events_add_update_and_remove_pods(fake: Script, api: str) -> None:
    fake.on_list("pods", body(pod_list("10", pod("pg-1", rv="9"))))
    gates = [threading.Event() for _ in range(3)]
    fake.on_watch(
        "pods",
        fake.events(
            event("ADDED", pod("pg-2", rv="11")),
            gates[0],
            event("MODIFIED", pod("pg-2", ips=("10.1.0.6",), rv="12")),
            gates[1],
            event("MODIFIED", pod("pg-2", ips=("10.1.0.6",), labels={"role": "replica"}, rv="13")),
            gates[2],
            event("DELETED", pod("pg-1", rv="14")),
            then="hold",
        ),
        resourceVersion="10",
    )
    async with running(api) as (watcher, changes):

        def pg2() -> PodInfo:
            return next(p for p in watcher.snapshot().pods if p.name == "pg-2")

        await synced(watcher)
        await until(lambda: "db/pg-2" in names(watcher.snapshot()), "pg-2 to be added")
        assert names(watcher.snapshot()) == ["db/pg-1", "db/pg-2"]
        assert pg2().ips == ()
        gates[0].set()
        await until(lambda: pg2().ips == ips("10.1.0.6"), "pg-2's IP")
        gates[1].set()
        await until(lambda: pg2().labels == {"role": "replica"}, "pg-2's new labels")
        gates[2].set()
        await until(lambda: names(watcher.snapshot()) == ["db/pg-2"], "pg-1 to be deleted")
        assert watcher.snapshot().pods_resource_version == "14"
        assert changes[-1] == watcher.snapshot()
    assert len(fake.requests("pods", "list")) == 1


@run_async
async def test_watch_that_ends_resumes_from_the_last_resource_version(
    fake: Script, api: str
) -> None:
    fake.on_list("pods", body(pod_list("10")))
    fake.on_watch(
        "pods",
        fake.events(
            event("ADDED", pod("pg-1", rv="12")),
            event("MODIFIED", pod("pg-1", ips=("10.1.0.5",), rv="13")),
        ),
        resourceVersion="10",
    )
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="13")
    async with running(api) as (watcher, _):
        await until(lambda: len(fake.requests("pods", "watch")) == 2, "the second watch")
        assert watcher.snapshot().pods[0].ips == ips("10.1.0.5")
    assert [w["resourceVersion"] for w in fake.requests("pods", "watch")] == ["10", "13"]
    assert len(fake.requests("pods", "list")) == 1, "a normal end must not relist"


@run_async
async def test_bookmark_advances_the_resource_version_without_a_change(
    fake: Script, api: str
) -> None:
    fake.on_list("pods", body(pod_list("10", pod("pg-1", ips=("10.1.0.5",)))))
    fake.on_watch("pods", fake.events(bookmark("pods", "50")), resourceVersion="10")
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="50")
    async with running(api) as (watcher, changes):
        await synced(watcher)
        await until(lambda: len(fake.requests("pods", "watch")) == 2, "the second watch")
        assert watcher.snapshot().pods_resource_version == "50"
        assert len(changes) == 1, "a bookmark changes no pod: no on_change"


@pytest.mark.parametrize("how", ["error event", "http status"])
@run_async
async def test_gone_relists_from_scratch(fake: Script, api: str, how: str) -> None:
    fake.on_list("pods", body(pod_list("10", pod("pg-1"), pod("pg-2"))))
    gate = threading.Event()
    if how == "error event":
        gone = fake.events(gate, {"type": "ERROR", "object": GONE})
    else:
        gone = fake.after(gate, body(GONE, 410))
    fake.on_watch("pods", gone, resourceVersion="10")
    fake.on_list("pods", body(pod_list("30", pod("pg-2"), pod("pg-3"))))
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="30")
    async with running(api) as (watcher, changes):
        await synced(watcher, gate)
        await until(lambda: len(fake.requests("pods", "watch")) == 2, "the watch after relist")
        assert names(watcher.snapshot()) == ["db/pg-2", "db/pg-3"]
        assert watcher.snapshot().pods_resource_version == "30"
        assert [names(c) for c in changes] == [["db/pg-1", "db/pg-2"], ["db/pg-2", "db/pg-3"]]
    assert len(fake.requests("pods", "list")) == 2
    assert "resourceVersion" not in fake.requests("pods", "list")[1], "relist from scratch"


# --- Errors: retry, and never forget the last known state ------------------------


@run_async
async def test_api_errors_and_dropped_connections_keep_the_last_known_pods(
    fake: Script, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="egress_agent.agent.reflector")
    fake.on_list("pods", error(500, "InternalError"))
    fake.on_list("pods", body(pod_list("10", pod("pg-1", ips=("10.1.0.5",)))))
    gate = threading.Event()
    fake.on_watch("pods", fake.after(gate, error(500, "InternalError")), resourceVersion="10")
    fake.on_watch("pods", error(503, "ServiceUnavailable"), resourceVersion="10")
    fake.on_watch(
        "pods",
        fake.events(event("ADDED", pod("pg-2", ips=("10.1.0.6",), rv="11")), then="drop"),
        resourceVersion="10",
    )
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="11")
    async with running(api) as (watcher, changes):
        await synced(watcher, gate)
        await until(lambda: len(fake.requests("pods", "watch")) == 4, "the watch after the drop")
        assert names(watcher.snapshot()) == ["db/pg-1", "db/pg-2"]
        await until(lambda: watcher.last_error is None, "the open watch to clear the error")
        assert [names(c) for c in changes] == [["db/pg-1"], ["db/pg-1", "db/pg-2"]]
    assert len(fake.requests("pods", "list")) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("answered 500" in w and "not listed yet" in w for w in warnings), warnings
    assert any("answered 503" in w and "keeping the last known 1 pods" in w for w in warnings)
    assert any("ClientPayloadError" in w for w in warnings), warnings


@run_async
async def test_a_failing_relist_keeps_the_last_known_pods(
    fake: Script, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="egress_agent.agent.reflector")
    fake.on_list("pods", body(pod_list("10", pod("pg-1"), pod("pg-2"))))
    gate = threading.Event()
    fake.on_watch("pods", fake.after(gate, body(GONE, 410)), resourceVersion="10")
    fake.on_list("pods", error(500, "InternalError"))
    fake.on_list("pods", error(403, "Forbidden"))
    fake.on_list("pods", body(pod_list("40", pod("pg-1"))))
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="40")
    async with running(api) as (watcher, changes):
        await synced(watcher, gate)
        await until(lambda: len(fake.requests("pods", "watch")) == 2, "the watch after relist")
        assert names(watcher.snapshot()) == ["db/pg-1"]
    # The store went straight from the old list to the new one: never emptied.
    assert [names(c) for c in changes] == [["db/pg-1", "db/pg-2"], ["db/pg-1"]]
    assert len(fake.requests("pods", "list")) == 4
    forbidden = [r.getMessage() for r in caplog.records if "answered 403" in r.getMessage()]
    assert forbidden, "the 403 was not logged"
    assert "needs get, list and watch on pods" in forbidden[0]
    assert "keeping the last known 2 pods" in forbidden[0]


@run_async
async def test_a_watch_that_ends_at_once_is_retried_with_backoff(
    fake: Script, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="egress_agent.agent.reflector")
    fake.on_list("pods", body(pod_list("10")))
    fake.on_watch("pods", fake.events(), resourceVersion="10")
    fake.on_watch("pods", fake.events(then="hold"), resourceVersion="10")
    async with running(api):
        await until(lambda: len(fake.requests("pods", "watch")) == 2, "the second watch")
    assert any("ended the watch at once" in r.getMessage() for r in caplog.records)


@run_async
async def test_unreachable_api_server_is_retried_and_nothing_is_synced() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with running(f"http://127.0.0.1:{port}") as (watcher, changes):
        await until(lambda: watcher.last_error is not None, "a connection error")
        assert "ClientConnectorError" in watcher.last_error  # type: ignore[operator]
        assert not watcher.snapshot().synced
        assert changes == []


@run_async
async def test_cancel_ends_watches_held_open_at_once(fake: Script, api: str) -> None:
    loop = asyncio.get_running_loop()
    client = api_for(api)
    watcher = PodWatcher(client, node_name=NODE, on_change=lambda _: None, backoff=TINY)
    task = loop.create_task(watcher.run(), name="pod watcher under test")
    try:
        await until(lambda: fake.open_watches == 2, "both watches to be open")
        started = loop.time()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert loop.time() - started < 0.5
        # The API server saw both connections closed, not left to their timeouts.
        await until(lambda: fake.open_watches == 0, "the server to see the watches closed", 0.5)
    finally:
        task.cancel()
        await client.close()


# --- Namespaces ------------------------------------------------------------------------


@run_async
async def test_namespace_labels_follow_the_namespace_watch(fake: Script, api: str) -> None:
    pods = [pod("pg-1", ips=("10.1.0.5",)), pod("web-1", namespace="web", ips=("10.1.0.9",))]
    fake.on_list("pods", body(pod_list("10", *pods)))
    fake.on_list("namespaces", body(NAMESPACES))
    gate = threading.Event()
    web = namespace("web", labels={"team": "data"}, rv="101")
    fake.on_watch(
        "namespaces",
        fake.events(gate, event("MODIFIED", web), then="hold"),
        resourceVersion="100",
    )
    selector = Selector(namespace_labels={"team": "data"})
    async with running(api) as (watcher, changes):
        await synced(watcher, gate)
        await until(lambda: watcher.snapshot().namespaces_resource_version == "101", "the change")
        assert selected_networks(selector, watcher.snapshot()) == (
            ipaddress.ip_network("10.1.0.5/32"),
            ipaddress.ip_network("10.1.0.9/32"),
        )
        assert selected_networks(selector, changes[0]) == (ipaddress.ip_network("10.1.0.5/32"),)


@run_async
async def test_a_list_in_pages_is_read_whole(fake: Script, api: str) -> None:
    fake.on_list(
        "namespaces",
        body(namespace_list("100", namespace("a"), cont="page-2")),
    )
    fake.on_list(
        "namespaces",
        body(namespace_list("100", namespace("b"))),
        **{"continue": "page-2"},
    )
    fake.on_watch("namespaces", fake.events(then="hold"), resourceVersion="100")
    async with running(api) as (watcher, _):
        await until(lambda: watcher.snapshot().synced, "the first sync")
        assert sorted(watcher.snapshot().namespace_labels) == ["a", "b"]
        await until(lambda: bool(fake.requests("namespaces", "watch")), "the namespace watch")


# --- Selection (pure) ------------------------------------------------------------------


PG = PodInfo(
    namespace="db",
    name="pg-1",
    uid="u1",
    labels={"cnpg.io/cluster": "pg-main", "role": "primary"},
    ips=ips("10.1.0.5", "fd00:1::5"),
    phase="Running",
)
DB_LABELS = {"kubernetes.io/metadata.name": "db", "team": "data"}


def variant(**changes: Any) -> PodInfo:
    return dataclasses.replace(PG, **changes)


@pytest.mark.parametrize(
    ("selector", "pod_", "ns_labels", "expected"),
    [
        pytest.param(Selector(), PG, DB_LABELS, True, id="empty selects every pod"),
        pytest.param(Selector(namespace="db"), PG, DB_LABELS, True, id="namespace"),
        pytest.param(Selector(namespace="web"), PG, DB_LABELS, False, id="other namespace"),
        pytest.param(
            Selector(labels={"cnpg.io/cluster": "pg-main"}), PG, DB_LABELS, True, id="one label"
        ),
        pytest.param(
            Selector(namespace="db", labels=dict(PG.labels)), PG, DB_LABELS, True, id="all labels"
        ),
        pytest.param(
            Selector(labels={"cnpg.io/cluster": "pg-main", "role": "replica"}),
            PG,
            DB_LABELS,
            False,
            id="one of two labels differs",
        ),
        pytest.param(
            Selector(labels={"cnpg.io/cluster": "pg-other"}), PG, DB_LABELS, False, id="value"
        ),
        pytest.param(
            Selector(labels={"absent": ""}), PG, DB_LABELS, False, id="empty value is not any"
        ),
        pytest.param(
            Selector(namespace_labels={"team": "data"}), PG, DB_LABELS, True, id="namespace label"
        ),
        pytest.param(
            Selector(namespace_labels={"team": "front"}),
            PG,
            DB_LABELS,
            False,
            id="namespace label differs",
        ),
        pytest.param(
            Selector(namespace_labels={"team": "data"}),
            PG,
            {},
            False,
            id="namespace not seen yet",
        ),
        pytest.param(
            Selector(namespace_labels={"kubernetes.io/metadata.name": "db"}),
            PG,
            DB_LABELS,
            True,
            id="namespace by its name label",
        ),
        # The pod is named, and contributes its addresses once they are known.
        pytest.param(Selector(namespace="db"), variant(ips=()), DB_LABELS, True, id="no IP yet"),
        pytest.param(
            Selector(namespace="db"), variant(host_network=True), DB_LABELS, False, id="hostNetwork"
        ),
        pytest.param(
            Selector(), variant(host_network=True), DB_LABELS, False, id="hostNetwork, empty"
        ),
        pytest.param(
            Selector(namespace="db"), variant(phase="Pending"), DB_LABELS, True, id="Pending"
        ),
        pytest.param(
            Selector(namespace="db"), variant(phase="Succeeded"), DB_LABELS, False, id="Succeeded"
        ),
        pytest.param(
            Selector(namespace="db"), variant(phase="Failed"), DB_LABELS, False, id="Failed"
        ),
        pytest.param(
            Selector(namespace="db"), variant(phase="Unknown"), DB_LABELS, True, id="Unknown"
        ),
    ],
)
def test_matches(
    selector: Selector, pod_: PodInfo, ns_labels: dict[str, str], expected: bool
) -> None:
    assert matches(selector, pod_, ns_labels) is expected


def test_selected_networks_are_host_routes_of_matching_pods_only() -> None:
    snapshot = Snapshot(
        pods=(
            PG,
            variant(name="pg-2", ips=ips("10.1.0.4")),
            variant(name="pg-3", ips=()),
            variant(name="old", ips=ips("10.1.0.7"), phase="Succeeded"),
            variant(name="hostnet", ips=ips("192.0.2.10"), host_network=True),
            variant(name="other", ips=ips("10.1.0.8"), labels={"app": "other"}),
        ),
        namespace_labels={"db": DB_LABELS},
        pods_resource_version="1",
        namespaces_resource_version="1",
        synced=True,
    )
    selector = Selector(namespace="db", labels={"cnpg.io/cluster": "pg-main"})
    assert [str(n) for n in selected_networks(selector, snapshot)] == [
        "10.1.0.4/32",
        "10.1.0.5/32",
        "fd00:1::5/128",
    ]


def test_pods_and_selectors_are_hashable_values() -> None:
    assert variant(labels={"a": "1", "b": "2"}) == variant(labels={"b": "2", "a": "1"})
    assert hash(variant(labels={"a": "1", "b": "2"})) == hash(variant(labels={"b": "2", "a": "1"}))
    assert len({Selector(labels={"a": "1"}), Selector(labels={"a": "1"})}) == 1


# --- Reading pods --------------------------------------------------------------------


def test_pod_info_reads_podip_of_older_servers_and_skips_bad_addresses() -> None:
    obj = pod("pg-1")
    obj["status"]["podIP"] = "10.1.0.5"
    assert pod_info(obj).ips == ips("10.1.0.5")
    obj["status"]["podIPs"] = [{"ip": "not-an-ip"}, {"ip": "fd00:1::5"}]
    assert pod_info(obj).ips == ips("fd00:1::5")


def test_pod_info_refuses_an_object_without_namespace() -> None:
    obj = pod("pg-1")
    del obj["metadata"]["namespace"]
    with pytest.raises(ValueError, match=r"metadata\.namespace"):
        pod_info(obj)


@run_async
async def test_an_unreadable_pod_is_skipped_not_fatal(fake: Script, api: str) -> None:
    broken = pod("broken")
    del broken["metadata"]["name"]
    fake.on_list("pods", body(pod_list("10", broken, pod("pg-1"))))
    async with running(api) as (watcher, _):
        await until(lambda: watcher.snapshot().synced, "the first sync")
        assert names(watcher.snapshot()) == ["db/pg-1"]


# --- Configuration -----------------------------------------------------------------------


def test_node_name_from_env() -> None:
    assert node_name_from_env({"NODE_NAME": " node-a\n"}) == "node-a"
    for env in ({}, {"NODE_NAME": ""}):
        with pytest.raises(KubernetesConfigError) as info:
            node_name_from_env(env)
        message = str(info.value)
        assert "NODE_NAME is not set" in message
        assert "fieldPath: spec.nodeName" in message


@run_async
async def test_make_api_explains_missing_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesConfigError, match="--kubeconfig"):
        await make_api(None)
    with pytest.raises(KubernetesConfigError, match="no such kubeconfig file"):
        await make_api(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(KubernetesConfigError, match="cannot use this kubeconfig"):
        await make_api(str(empty))


@run_async
async def test_make_api_with_a_kubeconfig_reaches_its_server(
    fake: Script, api: str, tmp_path: Path
) -> None:
    fake.on_list("pods", body(pod_list("7", pod("pg-1"))))
    server = api
    config = tmp_path / "config"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api = await make_api(str(config))
    try:
        page = await api.list_page(
            "pods", field_selector=f"spec.nodeName={NODE}", limit=10, continue_token=None
        )
    finally:
        await api.close()
    assert [p["metadata"]["name"] for p in page["items"]] == ["pg-1"]
    assert fake.seen[-1].headers["Authorization"] == "Bearer t0ken"


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial=0.5, cap=30.0)
    assert [backoff.delay(n, rand=lambda: 1.0) for n in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert backoff.delay(3, rand=lambda: 0.0) == 2.0
    assert backoff.delay(10_000, rand=lambda: 0.0) == 15.0


# --- Two pods listing one address ----------------------------------------------------


def _snapshot(*pods: PodInfo) -> Snapshot:
    return Snapshot(
        pods=pods,
        namespace_labels={"db": DB_LABELS, "web": {}},
        pods_resource_version="1",
        namespaces_resource_version="1",
        synced=True,
    )


PG_SELECTOR = Selector(namespace="db", labels={"cnpg.io/cluster": "pg-main"})
WEB = PodInfo(
    namespace="web",
    name="web-1",
    uid="u-web",
    ips=ips("10.1.0.5"),  # PG's address, given to a new pod
    phase="Pending",
    created="2026-11-25T10:00:05Z",
)


@pytest.mark.parametrize(
    ("pg", "web", "pg_keeps"),
    [
        pytest.param(
            variant(terminating=True, created="2026-11-25T09:00:00Z"),
            WEB,
            False,
            id="terminating pod loses its address to the new pod",
        ),
        pytest.param(
            variant(created="2026-11-25T09:00:00Z"),
            dataclasses.replace(WEB, terminating=True),
            True,
            id="live pod keeps it from a terminating one",
        ),
        pytest.param(
            variant(created="2026-11-25T09:00:00Z"),
            WEB,
            False,
            id="both live: the newer pod's entry wins",
        ),
        pytest.param(
            variant(created="2026-11-25T11:00:00Z"),
            WEB,
            True,
            id="both live, pg newer",
        ),
        pytest.param(
            variant(created="2026-11-25T09:00:00Z"),
            dataclasses.replace(WEB, phase="Succeeded"),
            True,
            id="a finished pod claims nothing",
        ),
    ],
)
def test_an_address_two_pods_list_identifies_one(pg: PodInfo, web: PodInfo, pg_keeps: bool) -> None:
    snapshot = _snapshot(pg, web)
    networks = [str(n) for n in selected_networks(PG_SELECTOR, snapshot)]
    assert ("10.1.0.5/32" in networks) is pg_keeps
    assert "fd00:1::5/128" in networks  # the address only pg lists stays its own
    owner = address_owners(snapshot)[ipaddress.ip_address("10.1.0.5")]
    assert owner is (pg if pg_keeps else web)
    conflicts = address_conflicts(snapshot)
    if web.phase == "Succeeded":
        assert conflicts == []
    else:
        (line,) = conflicts
        assert line.startswith("address 10.1.0.5 is listed by ")
        assert line.endswith(f"it identifies {owner.namespace}/{owner.name}")


def test_pod_info_reads_deletion_and_creation_timestamps() -> None:
    obj = pod("pg-1", ips=("10.1.0.5",))
    assert pod_info(obj).terminating is False
    obj["metadata"]["deletionTimestamp"] = "2026-11-25T10:00:00Z"
    obj["metadata"]["creationTimestamp"] = "2026-11-25T09:00:00Z"
    info = pod_info(obj)
    assert info.terminating is True and info.created == "2026-11-25T09:00:00Z"
