"""Network-namespace hosts for the demo, the integration tests and the benchmark.

Everything here builds its own namespaces (with a per-run prefix), never touches
the root namespace's addresses, routes or nftables, and removes what it made.
"""
