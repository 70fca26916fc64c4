"""The benchmark: the direct path, HAProxy and egress-agent side by side.

One run builds one lab topology (a node, a pod ``client`` and an external
``server``) and measures each path in turn with the same load: iperf3
throughput (1 and 4 streams), new connections per second with their latency,
and the proxy's memory with many idle connections. Numbers are reported
absolute and as ratios to the direct path, printed as a table and written as
JSON to ``bench/results/<timestamp>.json``.

    sudo ./run bench            # or: .venv/bin/python -m bench [--quick]

Modules: ``run`` (orchestration and checks), ``paths`` (how each path is put
in place and removed), ``loadgen`` (the clients run inside the pod), ``sink``
(the server run inside the external host), ``report`` (table and JSON).
"""
