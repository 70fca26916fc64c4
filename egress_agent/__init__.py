"""egress-agent: divert chosen workloads' outbound TCP into a local policy proxy.

The parts live in sibling folders of the repository and are installed under this
namespace: ``agent`` (CLI, composition), ``rules`` (nftables), ``bpf`` (BPF
datapath), ``proxy`` (the transparent proxy), ``policy`` (the shared policy model)
and ``lab`` (network-namespace hosts for the demo, tests and benchmarks).
"""

__version__ = "0.1.0"
