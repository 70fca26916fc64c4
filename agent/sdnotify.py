"""Tell systemd that the agent is ready (``Type=notify``), so that units
ordered ``After=egress-agent.service`` start only once the policy is in
force: table installed, proxy listening, datapath attached.

The protocol is one datagram on the unix socket named by ``$NOTIFY_SOCKET``
(sd_notify(3); a leading ``@`` names an abstract socket). Outside systemd the
variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); whether a notify socket was there."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %r through %s: %s", state, address, exc)
        return False
    return True
