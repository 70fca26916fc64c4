"""The BPF datapath: a tc classifier that marks the packets to divert, from
maps the agent updates live (nftables then only matches the mark and DNATs).

``classifier.bpf.c`` and ``egress.h`` are the kernel side; ``layout`` mirrors
the header, ``maps`` computes the map contents purely (and re-does the
classifier's decision for tests), ``loader`` owns bcc, ``attach`` owns tc,
``datapath`` composes them for the agent. ``policy.decide.should_divert`` is
the reference this datapath and the nftables one must both agree with.
"""
