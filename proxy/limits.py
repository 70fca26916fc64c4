"""What bounds the proxy's resources: the descriptors connections may hold,
the names of the caps on open connections, and giving memory back to the
system after a flood."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
from collections.abc import Callable

# A relayed connection holds two file descriptors (client and upstream); the
# agent's own (listeners, netlink and BPF map descriptors, the audit log, the
# status server) and short-lived ones (sock_diag, resolver) fit in a reserve.
FDS_PER_CONNECTION = 2
FD_RESERVE = 256
# Audit and metrics name the cap that refused a connection by its setting.
CAP_TOTAL = "proxy.max_connections"
CAP_WORKLOAD = "proxy.max_connections_per_workload"
CAP_WARNING_INTERVAL = 10.0


# Give freed memory back to the system once this many connections have
# ended since the peak (and at least half of those open then).
TRIM_AFTER_DROP = 1000


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3), or None where the C library has none (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def descriptor_room() -> int:
    """How many descriptors connections may hold: this process's soft
    RLIMIT_NOFILE (the agent raises it to the hard one at start) less a
    reserve for the agent's own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(FDS_PER_CONNECTION, soft - FD_RESERVE)
