"""Network-namespace hosts for the demo, the integration tests and the benchmark.

Everything here builds its own namespaces (with a per-run prefix), never touches
the root namespace's addresses, routes or nftables, and removes what it made.
Only what ``egress-agent demo`` uses lives here (the hosts and their DNS, the
test CA, the TCP servers and client, the agent process); what only the tests
and the benchmark start is in the repository's ``tests/lab``.
"""
