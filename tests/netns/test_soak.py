"""The soak, one minute of it: mixed traffic (TLS by name, raw TCP by CIDR,
SMTP where the server speaks first, HTTP with an injected header) from many
concurrent clients, with reloads every few seconds and one listening-socket
handover; every session compared end to end and audited exactly once.
``./run soak --minutes 10`` runs the long version."""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = pytest.mark.netns


@pytest.mark.timeout(400)
def test_a_minute_of_mixed_traffic_loses_and_corrupts_nothing(require_root: None) -> None:
    summary = soak.run(1.0, workers=24, reload_every=3.0)
    print(summary.table())
    assert summary.ok, summary.table()
    assert set(summary.sessions) == {"tls", "raw", "smtp", "http"}
    assert min(summary.sessions.values()) >= 10, summary.table()
    assert summary.reloads >= 10 and summary.handovers == 1, summary.table()
