"""The fake Kubernetes API server of the tests: pods and namespaces, served
over HTTP as lists and as watch streams of real-shaped objects.

It answers in one of two ways. In the lab (the netns tests, the demo) it
serves the objects of a state file that the test edits, with the real
server's resourceVersion semantics (below). For the API client's own unit
tests it answers each request from a :class:`Script` instead, which can also
say what a failing server says (5xx, 403, 410 Gone as a status or as an ERROR
event, a dropped connection, a watch that ends at once, a list in pages);
:func:`serving` runs it in the test's process. The objects are built by the
same functions (:func:`pod_object`, :func:`namespace_object`,
:func:`list_object`, :func:`event`, :func:`status_object`) either way.

Run inside a lab host (``lab.popen`` or ``start_fakekube`` below)::

    python tests/lab/fakekube.py --listen 127.0.0.1:PORT --state FILE

It is the part of the API the agent's pod watcher uses, and no more:

* ``GET /api/v1/pods`` (also ``/api/v1/namespaces/NS/pods``) and
  ``GET /api/v1/namespaces`` answer a ``PodList``/``NamespaceList`` with
  ``metadata.resourceVersion``; ``fieldSelector`` (``spec.nodeName``,
  ``metadata.name``, ``metadata.namespace``, ``status.phase`` with ``=``,
  ``==``, ``!=``) and equality-based ``labelSelector`` filter them. ``limit``
  is accepted and ignored: everything comes in one page, with no ``continue``.
* the same with ``watch=true`` streams newline-delimited events
  ``{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK", "object": ...}``
  (chunked) for the changes after ``resourceVersion`` -- all current objects
  as ADDED first when it is absent or ``0`` -- until ``timeoutSeconds``
  (capped at ``MAX_WATCH_SECONDS``). With ``allowWatchBookmarks=true`` a
  BOOKMARK carries the current resourceVersion every ``BOOKMARK_EVERY``
  seconds. As the real server does for a watch with a field selector, an
  object that stops matching is sent as DELETED and one that starts matching
  as ADDED. A ``resourceVersion`` older than the kept history gets an ERROR
  event with a ``410 Expired`` Status.

The state file (replace it atomically, e.g. write a temporary file and
``os.rename`` it over) is JSON::

    {"namespaces": [{"name": "db", "labels": {"team": "data"}}],
     "pods": [{"namespace": "db", "name": "pg-1", "labels": {"app": "pg"},
               "nodeName": "node-a", "ip": "198.19.1.2", "ip6": "fd00:19:1::2",
               "hostNetwork": false, "phase": "Running"}]}

It is read every ``POLL_INTERVAL`` seconds; each object whose content changed
gets the next resourceVersion and one event. A state file that does not parse
is reported on stderr and the last good state stays. ``READY`` is printed on
stdout once the port is bound; everything else goes to stderr.

Stdlib only: it runs with nothing but the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, urlsplit

from egress_agent.lab.servers import wait_ready

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

POLL_INTERVAL = 0.05
MAX_WATCH_SECONDS = 30.0
DEFAULT_WATCH_SECONDS = 30.0
BOOKMARK_EVERY = 5.0
HISTORY = 10_000  # events kept for watches that resume from an older version
CREATED = "2026-11-25T10:00:00Z"
UID_NAMESPACE = uuid.UUID("6f1c1f8e-2d6a-4d0b-9b8e-6567726573ff")

Json = dict[str, Any]


def log(message: str) -> None:
    print(f"fakekube: {message}", file=sys.stderr, flush=True)


# --- Objects -------------------------------------------------------------------


def pod_object(spec: Mapping[str, Any]) -> Json:
    """A Pod as the API serves it, from one entry of the state file's "pods"."""
    namespace, name = str(spec["namespace"]), str(spec["name"])
    ips = [str(spec[key]) for key in ("ip", "ip6") if spec.get(key)]
    node = str(spec.get("nodeName", ""))
    status: Json = {"phase": str(spec.get("phase", "Running"))}
    if node:
        status["hostIP"] = "192.0.2.10"
        status["hostIPs"] = [{"ip": "192.0.2.10"}]
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(spec.get("uid") or uuid.uuid5(UID_NAMESPACE, f"pod/{namespace}/{name}")),
            "labels": {str(k): str(v) for k, v in (spec.get("labels") or {}).items()},
            "creationTimestamp": str(spec.get("created", CREATED)),
            **({"resourceVersion": str(spec["rv"])} if spec.get("rv") else {}),
            **(
                {"deletionTimestamp": str(spec["deleting"]), "deletionGracePeriodSeconds": 30}
                if spec.get("deleting")
                else {}
            ),
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": bool(spec.get("hostNetwork", False)),
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
        },
        "status": status,
    }


def namespace_object(spec: Mapping[str, Any]) -> Json:
    name = str(spec["name"])
    labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": str(spec.get("uid") or uuid.uuid5(UID_NAMESPACE, f"namespace/{name}")),
            "labels": {"kubernetes.io/metadata.name": name, **labels},
            "creationTimestamp": str(spec.get("created", CREATED)),
            **({"resourceVersion": str(spec["rv"])} if spec.get("rv") else {}),
            **(
                {"deletionTimestamp": str(spec["deleting"]), "deletionGracePeriodSeconds": 30}
                if spec.get("deleting")
                else {}
            ),
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def list_object(resource: str, rv: str, items: Sequence[Json], *, cont: str | None = None) -> Json:
    """A PodList or NamespaceList; ``cont`` is the token of the next page."""
    metadata: Json = {"resourceVersion": rv}
    if cont:
        metadata["continue"] = cont
    kind = "PodList" if resource == "pods" else "NamespaceList"
    return {"apiVersion": "v1", "kind": kind, "metadata": metadata, "items": list(items)}


def event(kind: str, obj: Json) -> Json:
    """A watch event: ADDED, MODIFIED, DELETED, or ERROR with a Status."""
    return {"type": kind, "object": obj}


def bookmark(resource: str, rv: str) -> Json:
    kind = "Pod" if resource == "pods" else "Namespace"
    mark: Json = {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv}}
    return event("BOOKMARK", mark)


def status_object(code: int, reason: str, message: str) -> Json:
    """The Status object the API server answers errors with."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# --- Selectors -----------------------------------------------------------------

FIELDS: dict[str, Callable[[Json], str]] = {
    "metadata.name": lambda o: str(o["metadata"].get("name", "")),
    "metadata.namespace": lambda o: str(o["metadata"].get("namespace", "")),
    "spec.nodeName": lambda o: str(o.get("spec", {}).get("nodeName", "")),
    "status.phase": lambda o: str(o.get("status", {}).get("phase", "")),
}

Matcher = Callable[[Json], bool]


def _requirements(text: str) -> Iterator[tuple[str, str, str]]:
    """``a=b,c!=d,e`` -> (key, op, value); op is ``=``, ``!=``, ``exists`` or ``!exists``."""
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            key, value = part.split("!=", 1)
            yield key.strip(), "!=", value.strip()
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            yield key.strip(), "=", value.strip()
        elif part.startswith("!"):
            yield part[1:].strip(), "!exists", ""
        else:
            yield part, "exists", ""


def field_matcher(text: str) -> Matcher:
    checks = []
    for key, op, value in _requirements(text):
        if key not in FIELDS or op not in ("=", "!="):
            raise ValueError(f'"{key}" is not a known field selector: only {", ".join(FIELDS)}')
        checks.append((FIELDS[key], op == "=", value))
    return lambda obj: all((get(obj) == value) == equal for get, equal, value in checks)


def label_matcher(text: str) -> Matcher:
    reqs = list(_requirements(text))

    def match(obj: Json) -> bool:
        labels = obj["metadata"].get("labels") or {}
        for key, op, value in reqs:
            ok = {
                "=": labels.get(key) == value,
                "!=": labels.get(key) != value,
                "exists": key in labels,
                "!exists": key not in labels,
            }[op]
            if not ok:
                return False
        return True

    return match


# --- The store -----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    rv: int
    resource: str
    old: Json | None  # the version before (None: created)
    new: Json | None  # the version after (None: deleted)

    def event(self, match: Matcher) -> Json | None:
        """The watch event this change is for a watcher that selects ``match``
        (None when it sees neither version)."""
        before = self.old is not None and match(self.old)
        after = self.new is not None and match(self.new)
        if after:
            assert self.new is not None
            return {"type": "MODIFIED" if before else "ADDED", "object": self.new}
        if before:
            assert self.old is not None
            # The last state of the object, at the version of its removal.
            return {"type": "DELETED", "object": self.new or _with_version(self.old, self.rv)}
        return None


def _with_version(obj: Json, rv: int) -> Json:
    out: Json = json.loads(json.dumps(obj))
    out["metadata"]["resourceVersion"] = str(rv)
    return out


def _content(obj: Json) -> Json:
    out: Json = json.loads(json.dumps(obj))
    out["metadata"].pop("resourceVersion", None)
    return out


class Store:
    """The current objects with their resourceVersions, and the changes so far."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1
        self.objects: dict[str, dict[str, Json]] = {"pods": {}, "namespaces": {}}
        self.history: deque[Change] = deque()
        self.compacted = 0  # changes up to this resourceVersion are forgotten

    def apply(self, state: Mapping[str, Mapping[str, Json]]) -> list[str]:
        """Turn the differences to ``state`` into changes; what changed, for the log."""
        done = []
        with self.cond:
            for resource in ("namespaces", "pods"):
                current = self.objects[resource]
                wanted = state.get(resource, {})
                for key in sorted(set(current) | set(wanted)):
                    old, new = current.get(key), wanted.get(key)
                    if old is not None and new is not None and _content(old) == new:
                        continue
                    self.rv += 1
                    if new is None:
                        del current[key]
                        version = None
                        what = "DELETED"
                    else:
                        version = current[key] = _with_version(new, self.rv)
                        what = "ADDED" if old is None else "MODIFIED"
                    self.history.append(Change(self.rv, resource, old, version))
                    if len(self.history) > HISTORY:
                        self.compacted = self.history.popleft().rv
                    done.append(f"{what} {resource} {key} at {self.rv}")
            if done:
                self.cond.notify_all()
        return done

    def listing(self, resource: str, match: Matcher) -> tuple[int, list[Json]]:
        with self.cond:
            objects = self.objects[resource]
            return self.rv, [objects[k] for k in sorted(objects) if match(objects[k])]

    def changes_after(self, rv: int, resource: str) -> list[Change]:
        """Changes newer than ``rv`` (the caller holds ``cond``)."""
        out = []
        for change in reversed(self.history):
            if change.rv <= rv:
                break
            if change.resource == resource:
                out.append(change)
        out.reverse()
        return out


def poll_state(store: Store, path: Path, stop: threading.Event) -> None:
    """Apply the state file whenever its text changes."""
    last: str | None = None
    while not stop.wait(POLL_INTERVAL):
        try:
            text = path.read_text()
        except OSError as exc:
            if last != "":
                log(f"cannot read the state file, keeping the last state: {exc}")
                last = ""
            continue
        if text == last:
            continue
        last = text
        try:
            state = read_state(path, text)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log(f"{path}: not a valid state, keeping the last one: {exc!r}")
            continue
        for line in store.apply(state):
            log(line)


def read_state(path: Path, text: str | None = None) -> dict[str, dict[str, Json]]:
    """The objects a state file describes, by resource and key (no resourceVersion)."""
    data = json.loads(path.read_text() if text is None else text)
    if not isinstance(data, dict):
        raise ValueError("the state is not a JSON object")
    pods = {f"{p['namespace']}/{p['name']}": pod_object(p) for p in data.get("pods") or []}
    namespaces = {str(n["name"]): namespace_object(n) for n in data.get("namespaces") or []}
    return {"pods": pods, "namespaces": namespaces}


# --- HTTP ----------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = [p for p in url.path.split("/") if p]
        namespace: str | None = None
        if parts == ["api", "v1", "pods"]:
            resource = "pods"
        elif parts == ["api", "v1", "namespaces"]:
            resource = "namespaces"
        elif len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            resource, namespace = "pods", parts[3]
        elif parts in (["healthz"], ["readyz"], ["livez"]):
            self._send(200, b"ok", "text/plain")
            return
        else:
            self._status(404, "NotFound", f"the server could not find {url.path}")
            return
        script = self.server.script
        if script is not None:
            script.answer(self, resource, query)
            return
        try:
            fields = field_matcher(query.get("fieldSelector", ""))
            labels = label_matcher(query.get("labelSelector", ""))
        except ValueError as exc:
            self._status(400, "BadRequest", str(exc))
            return

        def match(obj: Json) -> bool:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return fields(obj) and labels(obj)

        if query.get("watch", "").lower() in ("true", "1"):
            self._watch(resource, match, query)
        else:
            rv, items = self.server.store.listing(resource, match)
            self.send_json(200, list_object(resource, str(rv), items))

    def send_json(self, code: int, obj: Json) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def start_stream(self) -> None:
        """The headers of a watch: sent at once, before any event."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_event(self, line: Json) -> None:
        self._chunk(json.dumps(line).encode() + b"\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Close the connection in the middle of the response."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def hold(self, stop: threading.Event) -> None:
        """Keep the response open, sending nothing, until the client closes
        the connection or ``stop`` is set."""
        while not stop.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                break  # the client closed its end

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code: int, reason: str, message: str) -> None:
        self.send_json(code, status_object(code, reason, message))

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, resource: str, match: Matcher, query: Mapping[str, str]) -> None:
        store = self.server.store
        try:
            seconds = float(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        except ValueError:
            self._status(400, "BadRequest", "timeoutSeconds is not a number")
            return
        seconds = max(0.0, min(seconds, MAX_WATCH_SECONDS))
        bookmarks = query.get("allowWatchBookmarks", "").lower() == "true"
        since_text = query.get("resourceVersion", "")
        self.start_stream()
        start = time.monotonic()
        deadline = start + seconds
        next_bookmark = start + BOOKMARK_EVERY
        try:
            with store.cond:
                if since_text in ("", "0"):
                    since, initial = store.listing(resource, match)
                    lines = [{"type": "ADDED", "object": obj} for obj in initial]
                else:
                    try:
                        since = int(since_text)
                    except ValueError:
                        since = -1
                    lines = []
                    if since < store.compacted:
                        gone = status_object(
                            410,
                            "Expired",
                            f"too old resource version: {since_text} ({store.compacted + 1})",
                        )
                        lines = [event("ERROR", gone)]
                        deadline = start  # the stream ends after the error
            while True:
                for line in lines:
                    self.send_event(line)
                now = time.monotonic()
                if now >= deadline:
                    break
                lines = []
                with store.cond:
                    changes = store.changes_after(since, resource)
                    if not changes:
                        store.cond.wait(max(0.0, min(deadline, next_bookmark) - now))
                        changes = store.changes_after(since, resource)
                    if changes:
                        since = changes[-1].rv
                    current = store.rv
                for change in changes:
                    watched = change.event(match)
                    if watched is not None:
                        lines.append(watched)
                if bookmarks and time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + BOOKMARK_EVERY
                    since = max(since, current)
                    lines.append(bookmark(resource, str(since)))
            self.end_stream()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the watcher went away


class Server(ThreadingHTTPServer):
    """Answers from ``store``, or, when ``script`` is given, from the script."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], store: Store, script: Script | None = None
    ) -> None:
        self.store = store
        self.script = script
        super().__init__(address, Handler)


# --- Scripted answers (for the client's unit tests) -------------------------------

Reply = Callable[[Handler], None]


def body(obj: Json, code: int = 200) -> Reply:
    """Answer ``obj`` as JSON with status ``code``."""
    return lambda handler: handler.send_json(code, obj)


def error(code: int, reason: str) -> Reply:
    return body(status_object(code, reason, f"the test says {reason}"), code)


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    resource: str
    verb: str  # list or watch
    args: Mapping[str, str]
    headers: Message  # read without regard to case, as HTTP does


@dataclass
class _Step:
    reply: Reply
    expect: Mapping[str, str]


class Script:
    """Answers each request from what the test scripted for its (resource,
    list|watch), and checks the query the test expects (fieldSelector,
    resourceVersion, continue). Unscripted lists repeat the resource's last
    list; unscripted watches stay open with no events until the client goes
    or the test ends. Every request is kept in ``seen``."""

    def __init__(self, default_lists: Mapping[str, Json]) -> None:
        self.seen: list[Seen] = []
        self.mismatches: list[str] = []
        self.errors: list[str] = []
        self.closing = threading.Event()  # set at the end of the test: held streams end
        self.open_watches = 0
        self._steps: dict[tuple[str, str], deque[_Step]] = defaultdict(deque)
        self._last_list: dict[str, Reply] = {r: body(o) for r, o in default_lists.items()}
        self._lock = threading.Lock()

    def on_list(self, resource: str, reply: Reply, **expect: str) -> None:
        self._steps[(resource, "list")].append(_Step(reply, expect))

    def on_watch(self, resource: str, reply: Reply, **expect: str) -> None:
        self._steps[(resource, "watch")].append(_Step(reply, expect))

    def requests(self, resource: str, verb: str) -> list[Mapping[str, str]]:
        with self._lock:
            return [s.args for s in self.seen if (s.resource, s.verb) == (resource, verb)]

    def after(self, gate: threading.Event, reply: Reply, timeout: float = 5.0) -> Reply:
        """``reply``, once the test has set ``gate``."""

        def delayed(handler: Handler) -> None:
            gate.wait(timeout)
            reply(handler)

        return delayed

    def events(
        self,
        *items: Json | threading.Event,
        then: Literal["end", "hold", "drop"] = "end",
        timeout: float = 5.0,
    ) -> Reply:
        """A watch response: the events, one JSON per line. A threading.Event
        in ``items`` holds the stream until the test sets it. Then the stream
        ends, stays open, or its connection is dropped."""

        def reply(handler: Handler) -> None:
            handler.start_stream()
            for item in items:
                if isinstance(item, threading.Event):
                    item.wait(timeout)
                else:
                    handler.send_event(item)
            if then == "end":
                handler.end_stream()
            elif then == "hold":
                with self._lock:
                    self.open_watches += 1
                try:
                    handler.hold(self.closing)
                finally:
                    with self._lock:
                        self.open_watches -= 1
                handler.close_connection = True
            else:
                handler.drop()

        return reply

    def answer(self, handler: Handler, resource: str, query: Mapping[str, str]) -> None:
        verb = "watch" if query.get("watch", "").lower() == "true" else "list"
        with self._lock:
            self.seen.append(Seen(resource, verb, dict(query), handler.headers))
            steps = self._steps[(resource, verb)]
            step = steps.popleft() if steps else None
        if step is None:
            reply = self._last_list[resource] if verb == "list" else self.events(then="hold")
        else:
            wrong = {k: (v, query.get(k)) for k, v in step.expect.items() if query.get(k) != v}
            if wrong:
                self.mismatches.append(f"{resource} {verb}: expected, got: {wrong}")
                error(400, "UnexpectedRequest")(handler)
                return
            reply = step.reply
            if verb == "list":
                self._last_list[resource] = reply
        try:
            reply(handler)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the client went away
        except Exception as exc:
            self.errors.append(f"{resource} {verb}: {exc!r}")
            raise


@contextlib.contextmanager
def serving(script: Script) -> Iterator[str]:
    """The fake answering from ``script`` on 127.0.0.1 in this process, in
    threads; yields its URL."""
    server = Server(("127.0.0.1", 0), Store(), script)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        script.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- Command line ----------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected ADDR:PORT")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fakekube.py", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, metavar="ADDR:PORT")
    p.add_argument("--state", required=True, type=Path, metavar="FILE")
    args = p.parse_args(argv)
    try:
        address = parse_listen(args.listen)
    except ValueError as exc:
        p.error(str(exc))
    store = Store()
    try:
        for line in store.apply(read_state(args.state)):
            log(line)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"FAILED: {args.state}: {exc!r}", flush=True)
        return 1
    try:
        server = Server(address, store)
    except OSError as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=poll_state, args=(store, args.state, stop), daemon=True).start()
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    print("READY", flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()  # open watches are daemon threads: they end with the process
    return 0


# --- For callers ---------------------------------------------------------------------


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Replace the state file atomically (the server never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.rename(tmp, path)


def write_kubeconfig(path: Path, server_url: str, *, token: str = "fake-token") -> Path:
    """A kubeconfig whose current context talks to ``server_url`` with a dummy
    bearer token (JSON, which kubeconfig loaders read as YAML)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fake", "cluster": {"server": server_url, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}
        ],
        "current-context": "fake",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def start_fakekube(
    lab: Lab,
    host: str,
    *,
    port: int,
    state: Path,
    address: str = "127.0.0.1",
    log: Path | None = None,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start the fake API server in lab host ``host`` and return once it listens.

    Its stderr (one line per request and per change) goes to ``log`` if given,
    else to ours. The lab stops it at teardown; ``proc.terminate()`` earlier.
    """
    argv = [
        sys.executable,
        __file__,
        "--listen",
        f"{address}:{port}",
        "--state",
        str(state),
    ]
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log, "ab")) if log is not None else None
        proc: subprocess.Popen[bytes] = lab.popen(host, argv, stdout=subprocess.PIPE, stderr=err)
    wait_ready(proc, f"fakekube in {host}", timeout)
    return proc


if __name__ == "__main__":
    sys.exit(main())
