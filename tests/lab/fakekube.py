"""A fake Kubernetes API server for the lab: pods and namespaces from a state
file that the test edits, served as lists and as watch streams.

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
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
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
            "uid": str(uuid.uuid5(UID_NAMESPACE, f"pod/{namespace}/{name}")),
            "labels": {str(k): str(v) for k, v in (spec.get("labels") or {}).items()},
            "creationTimestamp": str(spec.get("created", CREATED)),
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
            "uid": str(uuid.uuid5(UID_NAMESPACE, f"namespace/{name}")),
            "labels": {"kubernetes.io/metadata.name": name, **labels},
            "creationTimestamp": str(spec.get("created", CREATED)),
            **(
                {"deletionTimestamp": str(spec["deleting"]), "deletionGracePeriodSeconds": 30}
                if spec.get("deleting")
                else {}
            ),
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
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


def status_object(code: int, reason: str, message: str) -> Json:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


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
            kind = "PodList" if resource == "pods" else "NamespaceList"
            body = {
                "apiVersion": "v1",
                "kind": kind,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
            self._send(200, json.dumps(body).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code: int, reason: str, message: str) -> None:
        body = json.dumps(status_object(code, reason, message)).encode()
        self._send(code, body, "application/json")

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
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        kind = "Pod" if resource == "pods" else "Namespace"
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
                        lines = [{"type": "ERROR", "object": gone}]
                        deadline = start  # the stream ends after the error
            while True:
                for line in lines:
                    self._chunk(json.dumps(line).encode() + b"\n")
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
                    event = change.event(match)
                    if event is not None:
                        lines.append(event)
                if bookmarks and time.monotonic() >= next_bookmark:
                    next_bookmark = time.monotonic() + BOOKMARK_EVERY
                    since = max(since, current)
                    mark: Json = {"kind": kind, "apiVersion": "v1"}
                    mark["metadata"] = {"resourceVersion": str(since)}
                    lines.append({"type": "BOOKMARK", "object": mark})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the watcher went away


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: Store) -> None:
        self.store = store
        super().__init__(address, Handler)


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
