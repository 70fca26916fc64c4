"""What the agent last put in force, saved where the next boot can read it.

Under ``fail: closed`` the kernel state outlives the agent (a crash, or a
stop that keeps it, see ``runner``), but not a reboot. So that workloads
starting at boot are refused rather than sent direct before the agent runs,
the agent writes, after every start and commit, the ruleset of its state in
force rendered for the nftables datapath (which needs no BPF program: a boot
guard installs it with no compiler at hand), with the proxy addresses it
DNATs to and what ``egress-agent cleanup`` needs to remove everything (the
BPF pin folder, the cgroups carrying the socket marker).

The file is replaced atomically (write, fsync, rename), so a reader sees the
old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egress_agent.policy.model import ProxySettings
from egress_agent.rules.nft import Json

FORMAT = 1
# Where the systemd unit keeps it (StateDirectory=egress-agent).
DEFAULT_STATE_FILE = "/var/lib/egress-agent/state.json"


class SavedStateError(Exception):
    """The saved state is missing or cannot be used; says which file and why."""


@dataclass(frozen=True, kw_only=True)
class SavedState:
    policy_path: str
    policy_hash: str
    generation: int
    fail_open: bool
    address_v4: ipaddress.IPv4Address
    address_v6: ipaddress.IPv6Address
    bpf_pin_dir: str
    cgroup_root: str | None
    cgroups: tuple[str, ...]
    ruleset: Json  # libnftables JSON, nftables selection
    saved_at: float = field(default_factory=time.time)

    def proxy_settings(self) -> ProxySettings:
        """The proxy addresses as the address helpers take them."""
        return ProxySettings(address_v4=self.address_v4, address_v6=self.address_v6)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "policy_path": self.policy_path,
            "policy_hash": self.policy_hash,
            "generation": self.generation,
            "fail_open": self.fail_open,
            "proxy_addresses": [str(self.address_v4), str(self.address_v6)],
            "bpf_pin_dir": self.bpf_pin_dir,
            "cgroup_root": self.cgroup_root,
            "cgroups": list(self.cgroups),
            "saved_at": self.saved_at,
            "ruleset": self.ruleset,
        }


def parse_saved(text: str, *, source: str) -> SavedState:
    """The state in ``text``; :class:`SavedStateError` naming ``source`` and
    the field when it is not a state this version wrote."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SavedStateError(
            f"{source}: not JSON ({exc}): delete it, the agent writes it again"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SavedStateError(
            f"{source}: not a saved state of format {FORMAT}: delete it, the agent writes it again"
        )
    try:
        v4, v6 = (ipaddress.ip_address(a) for a in data["proxy_addresses"])
        ruleset = data["ruleset"]
        if not isinstance(v4, ipaddress.IPv4Address) or not isinstance(v6, ipaddress.IPv6Address):
            raise ValueError("proxy_addresses: an IPv4 and an IPv6 address expected")
        if not isinstance(ruleset, dict) or not isinstance(ruleset.get("nftables"), list):
            raise ValueError("ruleset: a libnftables JSON document expected")
        return SavedState(
            policy_path=str(data["policy_path"]),
            policy_hash=str(data["policy_hash"]),
            generation=int(data["generation"]),
            fail_open=bool(data["fail_open"]),
            address_v4=v4,
            address_v6=v6,
            bpf_pin_dir=str(data["bpf_pin_dir"]),
            cgroup_root=None if data["cgroup_root"] is None else str(data["cgroup_root"]),
            cgroups=tuple(str(p) for p in data["cgroups"]),
            ruleset=ruleset,
            saved_at=float(data["saved_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SavedStateError(
            f"{source}: bad or missing field ({exc}): delete it, the agent writes it again"
        ) from exc


def read_saved(path: str) -> SavedState:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SavedStateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return parse_saved(text, source=path)


def write_saved(path: str, state: SavedState) -> None:
    """Replace ``path`` with ``state`` atomically (mode 0600: it names workloads)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(state.to_json(), out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
