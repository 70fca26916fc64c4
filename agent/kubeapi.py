"""Access to the Kubernetes API server: configuration, one list page, one watch.

The agent needs two requests of the API, for pods and for namespaces: a list
(one page of it) and a watch (a stream of events). They are made with
``kubernetes_asyncio``, on the agent's event loop, for what it does well and
the agent should not redo: the in-cluster configuration (service-account
token re-read as it rotates, the cluster's CA) and every way a kubeconfig can
authenticate (tokens, client certificates, exec plugins, OIDC). Its model
classes are never built: the API's JSON is read directly
(``_preload_content=False``) and handed on as plain mappings, for
:mod:`egress_agent.agent.pods` to read.

Every answer that is not a success becomes an :class:`ApiError` with the
HTTP status, whether the server sent it as the response's status or as an
ERROR event inside a watch (410 Gone when the resourceVersion is too old).
Keeping a copy current from these requests is
:mod:`egress_agent.agent.reflector`'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp
    import kubernetes_asyncio.client

# kubernetes_asyncio (with aiohttp and its ~700 model modules) takes seconds
# to import on a busy node: it is imported when pod discovery starts, so an
# agent without pod workloads (a VM) never pays for it.

log = logging.getLogger(__name__)

NODE_NAME_ENV = "NODE_NAME"

# Seconds to establish a connection to the API server.
CONNECT_TIMEOUT = 10.0
# Seconds a list may wait for data before it is abandoned and retried.
LIST_READ_TIMEOUT = 60.0
# A watch with no data for its timeout plus this is taken as dead (a dropped
# connection no RST announced); TCP keepalive usually notices first.
WATCH_READ_MARGIN = 30.0
# TCP keepalive on a watch's connection, as client-go asks the kernel for: an
# idle watch is probed after IDLE seconds and dropped after COUNT unanswered
# probes INTERVAL seconds apart, so a peer that vanished without a reset (an
# API server failover, an idle-dropping load balancer) is noticed in minutes.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 9
# The largest error body read to say what the server answered.
ERROR_BODY_LIMIT = 64 * 1024

# The list (and watch) request of each kind the agent keeps.
_LIST_METHODS = {"pods": "list_pod_for_all_namespaces", "namespaces": "list_namespace"}


class KubernetesConfigError(Exception):
    """The agent cannot talk to the API server as configured: a permanent error
    (report and stop); the message says what to fix."""


class ApiError(Exception):
    """The API server answered with an error ``status`` (an HTTP status code):
    as the response's status, or as a watch's ERROR event."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"the API server answered {status} {reason}".rstrip())
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK."""

    type: str
    obj: Mapping[str, Any]


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


async def make_api(kubeconfig: str | None) -> KubeApi:
    """The pod's service account (in-cluster config) when ``kubeconfig`` is
    None, else the current context of that file. Close it with
    :meth:`KubeApi.close`."""
    import kubernetes_asyncio.client
    import kubernetes_asyncio.config

    configuration = kubernetes_asyncio.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes_asyncio.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes_asyncio.config.ConfigException as exc:
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
            await kubernetes_asyncio.config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration, persist_config=False
            )
        except (kubernetes_asyncio.config.ConfigException, ValueError, OSError) as exc:
            raise KubernetesConfigError(
                f"{kubeconfig}: cannot use this kubeconfig: {exc} "
                "(check it with: kubectl --kubeconfig FILE get pods)"
            ) from None
    return KubeApi(kubernetes_asyncio.client.ApiClient(configuration))


class KubeApi:
    """The two requests the agent makes of one kind of object, pods or namespaces."""

    def __init__(self, client: kubernetes_asyncio.client.ApiClient) -> None:
        import kubernetes_asyncio.client

        self._client = client
        self._core = kubernetes_asyncio.client.CoreV1Api(client)

    async def close(self) -> None:
        await self._client.close()

    async def list_page(
        self,
        kind: str,
        *,
        field_selector: str | None,
        limit: int,
        continue_token: str | None,
    ) -> Mapping[str, Any]:
        """One page of the list of ``kind``, as the API's JSON (``ApiError``
        when the server refuses; ``ValueError`` when the body is not an object)."""
        params: dict[str, Any] = {"limit": limit}
        if field_selector is not None:
            params["field_selector"] = field_selector
        if continue_token:
            params["_continue"] = continue_token
        response = await self._request(kind, params, read_timeout=LIST_READ_TIMEOUT)
        async with response:
            await _raise_for_status(response)
            body = json.loads(await response.read())
        if not isinstance(body, Mapping):
            raise ValueError(f"the {kind} list is {type(body).__name__}, not an object")
        return body

    async def watch(
        self,
        kind: str,
        *,
        field_selector: str | None,
        resource_version: str | None,
        timeout_seconds: int,
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Watch ``kind`` from ``resource_version`` (with bookmarks): the events
        in batches as they arrive. The first batch is empty and comes once the
        server has accepted the watch; the iteration ends when the server ends
        the watch. An ERROR event raises ``ApiError`` after the events before
        it; a dropped connection raises what aiohttp raises. Closing the
        iterator (or cancelling its reader) closes the connection at once."""
        params: dict[str, Any] = {
            "watch": True,
            "resource_version": resource_version,
            "timeout_seconds": timeout_seconds,
            "allow_watch_bookmarks": True,
        }
        if field_selector is not None:
            params["field_selector"] = field_selector
        response = await self._request(
            kind, params, read_timeout=timeout_seconds + WATCH_READ_MARGIN
        )
        try:
            await _raise_for_status(response)
            _keep_alive(response)
            yield []
            lines = _LineBuffer()
            async for chunk in response.content.iter_any():
                batch: list[WatchEvent] = []
                for line in lines.feed(chunk):
                    try:
                        event = parse_event(line)
                    except ApiError:
                        if batch:
                            yield batch
                        raise
                    if event is not None:
                        batch.append(event)
                if batch:
                    yield batch
            last = [e for e in map(parse_event, lines.rest()) if e is not None]
            if last:
                yield last
        finally:
            # Not released to the pool: an unfinished stream cannot be reused.
            response.close()

    async def _request(
        self, kind: str, params: dict[str, Any], *, read_timeout: float
    ) -> aiohttp.ClientResponse:
        method = getattr(self._core, _LIST_METHODS[kind])
        response: aiohttp.ClientResponse = await method(
            **params,
            _preload_content=False,  # raw JSON: no model objects built
            _request_timeout=(CONNECT_TIMEOUT, read_timeout),
        )
        return response


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    """``ApiError`` with the server's reason when ``response`` is not a success."""
    if 200 <= response.status <= 299:
        return
    reason = response.reason or ""
    with contextlib.suppress(Exception):  # a body that is not a Status says nothing more
        status = json.loads(await response.content.read(ERROR_BODY_LIMIT))
        if isinstance(status, Mapping) and status.get("message"):
            reason = f"{status.get('reason') or reason}: {status['message']}"
    response.close()
    raise ApiError(response.status, reason)


def _keep_alive(response: aiohttp.ClientResponse) -> None:
    """Turn TCP keepalive on for the watch's connection (see KEEPALIVE_IDLE)."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class _LineBuffer:
    """Splits a streamed body into lines (one watch event each) as it arrives."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return lines

    def rest(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        return [rest] if rest else []


def parse_event(line: bytes) -> WatchEvent | None:
    """One watch event from one line; None for a line that is not one (logged).
    An ERROR event raises ``ApiError`` with its code (410 Gone when the
    resourceVersion is too old)."""
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
        raise ApiError(
            code if isinstance(code, int) else 500, f"{obj.get('reason')}: {obj.get('message')}"
        )
    return WatchEvent(type=data["type"], obj=obj)
