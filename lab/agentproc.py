"""Run ``egress-agent run`` inside a lab namespace as its own process, wait
until it says it is ready, and stop it with SIGTERM like an init system would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab


class AgentProcess:
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
        self.lab = lab
        self.policy = policy
        self.audit = audit
        self.log = log
        self.host = host
        self.extra_args = extra_args
        self.env = dict(env) if env is not None else None  # None: inherit ours
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30.0) -> AgentProcess:
        argv = [
            sys.executable,
            "-m",
            "egress_agent.agent.cli",
            "run",
            "--policy",
            str(self.policy),
            "--audit-log",
            str(self.audit),
            *self.extra_args,
        ]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = self.lab.popen(
                self.host, argv, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if "ready:" in text:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"egress-agent exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"egress-agent not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self, *, timeout: float = 10.0) -> int:
        """SIGTERM, wait for the clean teardown; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: simulate a crash (nothing gets cleaned up)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
