"""The tests' one harness over the lab: an agent with resources of its own,
its status and metrics, its audit log, and waits on what it exposes.

The tree is lab (``Lab``) → hosts (``Lab.add_pod``/``add_external``, the
``pod_and_sink`` fixture) → agent (``Agent``) → audit (``Audit``). Tests wait
on state (a generation in ``/status``, a counter in ``/metrics``, an audit
record), never on the clock: ``wait_until`` polls a predicate until it holds
and says what did not happen when it does not.

A negative check ("this flow was not diverted") cannot wait for something
that never comes. ``Audit.barrier`` turns it into a positive one: after the
flow that must leave no record, make one flow that must, wait for its
record, and only then look at what is new. The proxy writes a connection's
record when it ends; a flow that ended before the barrier's began would
have been written by the time the barrier's is.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from egress_agent.lab.agentproc import AgentProcess
from egress_agent.lab.netns import Lab
from egress_agent.lab.servers import read_log

T = TypeVar("T")

STATUS_URL = "http://127.0.0.1:15021"


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something true, and return that;
    an AssertionError naming ``what`` once ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def status_page(lab: Lab, path: str, *, host: str = "node") -> str:
    """The body of GET ``path`` on the status address of whichever agent
    runs in ``host`` (an error's body too)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1]).read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.read().decode())\n"
    )
    return lab.run(host, [sys.executable, "-c", code, STATUS_URL + path]).stdout


# Every pin folder an agent of this process was given; what a killed agent
# left there is removed at the end of the session (conftest).
PIN_DIRS: set[str] = set()


def pin_dir(lab: Lab) -> str:
    """A bpffs folder that belongs to this lab alone (tests run side by side);
    an agent and its successor in a handover share it, as on a node."""
    return f"/sys/fs/bpf/egress-{lab.prefix.rstrip('-')}"


class Agent(AgentProcess):
    """``egress-agent run`` in a lab namespace, with a BPF pin folder of the
    lab's own unless the test names one: the default folder is one per
    machine, and two tests' agents must never share (or clean up) it."""

    def __init__(
        self,
        lab: Lab,
        *,
        policy: Path,
        audit: Path,
        log: Path,
        host: str = "node",
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if "--bpf-pin-dir" not in extra_args:
            extra_args = (*extra_args, "--bpf-pin-dir", pin_dir(lab))
        pins = extra_args[extra_args.index("--bpf-pin-dir") + 1]
        PIN_DIRS.update({pins, pins + "-cgroup"})
        super().__init__(
            lab, policy=policy, audit=audit, log=log, host=host, extra_args=extra_args, env=env
        )

    def start(self, *, timeout: float = 120.0) -> Agent:
        # Ready means compiled, loaded and applied: compiling the classifier
        # takes a core for seconds, longer while other tests compile theirs.
        super().start(timeout=timeout)
        return self

    def get(self, path: str) -> str:
        """The body of GET ``path`` on the agent's status address."""
        return status_page(self.lab, path, host=self.host)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/status"))
        return result

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def generation(self) -> int:
        return int(self.status()["policy"]["generation"])

    def reloads(self, result: str) -> int:
        """How many reloads ended with ``result`` (applied, failed)."""
        return int(self.metrics().get(f'egress_agent_reloads_total{{result="{result}"}}', 0))

    def wait_generation(self, above: int, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until a policy newer than generation ``above`` is in force."""
        return wait_until(
            lambda: (s := self.status())["policy"]["generation"] > above and s,
            timeout=timeout,
            what=f"a policy newer than generation {above} in force",
        )

    def wait_reloads(self, result: str, above: int, timeout: float = 5.0) -> None:
        """Wait until more than ``above`` reloads ended with ``result``."""
        wait_until(
            lambda: self.reloads(result) > above,
            timeout=timeout,
            what=f"a {result} reload (more than {above})",
        )


class Audit:
    """An agent's audit log (JSON lines) and waits on it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        text = self.path.read_text()
        # A record being written has no newline yet: only whole lines count.
        lines = text.splitlines()[: text.count("\n")]
        return [json.loads(line) for line in lines if line]

    def records(self) -> list[dict[str, Any]]:
        """One per connection (a plain HTTP request allowed by a name also gets
        a record of its own, event "request", left out here)."""
        return [r for r in self.all() if r.get("event") != "request"]

    def mark(self) -> int:
        return len(self.records())

    def since(self, mark: int) -> list[dict[str, Any]]:
        return self.records()[mark:]

    def wait(self, count: int, *, after: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` connection records follow mark ``after``; return them."""

        def enough() -> list[dict[str, Any]] | None:
            new = self.since(after)
            return new if len(new) >= count else None

        return wait_until(
            enough,
            timeout=timeout,
            what=f"{count} audit record(s) after the first {after} in {self.path}",
        )

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], *, after: int = 0, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait for a connection record after mark ``after`` that ``match``es."""
        return wait_until(
            lambda: next((r for r in self.since(after) if match(r)), None),
            timeout=timeout,
            what=f"a matching audit record after the first {after} in {self.path}",
        )

    def barrier(
        self,
        diverted_flow: Callable[[], object],
        match: Callable[[dict[str, Any]], bool],
        *,
        after: int,
        timeout: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Make ``diverted_flow`` (a flow that must be recorded), wait for its
        record (``match``), and return every record after mark ``after`` but
        the barrier's own: what the flows before it left."""
        diverted_flow()
        barrier = self.wait_for(match, after=after, timeout=timeout)
        return [r for r in self.since(after) if r is not barrier and r != barrier]


def client(
    lab: Lab, host: str, target: str, port: int, *, args: Sequence[str] = ()
) -> dict[str, Any]:
    """The lab's test client from ``host`` to ``target``:``port``: its JSON result."""
    argv = [sys.executable, "-m", "egress_agent.lab.client", target, str(port), *args]
    result: dict[str, Any] = json.loads(lab.run(host, argv, check=False).stdout)
    return result


@dataclass(kw_only=True)
class World:
    """What the tests of one module share: the lab (its hosts are
    ``lab.hosts``), a work folder holding the policy, the servers' logs and
    the agent's audit log, and the helpers every such module needs. A module
    adds its own fields and helpers in a dataclass of its own on top
    (``@dataclass class World(harness.World)``), usually with the agent
    (``Agent``) it started; its fixture builds the lab and always tears it
    down."""

    lab: Lab
    work: Path

    @property
    def audit(self) -> Path:
        """Where the agent writes its audit log (give it as ``audit=``)."""
        return self.work / "audit.jsonl"

    @property
    def audit_log(self) -> Audit:
        return Audit(self.audit)

    def audit_records(self) -> list[dict[str, Any]]:
        """The connection records so far (see ``Audit.records``)."""
        return self.audit_log.records()

    def server_log(self, name: str) -> list[dict[str, Any]]:
        """The connections a lab server started with ``log=work/NAME.jsonl`` logged."""
        return read_log(self.work / f"{name}.jsonl")

    def python(self, host: str, code: str, *args: str, timeout: float = 60) -> str:
        """Run ``code`` (dedented) in ``host`` with the tests' Python; its
        output. It must succeed."""
        argv = [sys.executable, "-c", textwrap.dedent(code), *args]
        proc = self.lab.run(host, argv, check=False, timeout=timeout)
        assert proc.returncode == 0, f"a script in {host} failed: {proc.stderr}"
        return proc.stdout

    def client(
        self, host: str, target: str, port: int, *, args: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The lab's test client (see ``client``)."""
        return client(self.lab, host, target, port, args=args)
