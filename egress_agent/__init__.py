"""egress-agent: divert chosen workloads' outbound TCP into a local policy proxy.

The parts live in sibling folders of the repository, and this folder holds a
relative symlink to each, so that ``egress_agent.<part>`` is the file path
``egress_agent/<part>/``: ``agent`` (CLI, composition), ``rules`` (nftables),
``bpf`` (BPF datapath), ``proxy`` (the transparent proxy), ``policy`` (the
shared policy model) and ``lab`` (the network-namespace hosts the demo runs on,
which the tests and the benchmark use too).
"""

__version__ = "0.1.0"
