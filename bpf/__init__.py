"""The BPF datapath: a tc classifier that marks the packets to divert, from
maps the agent updates live (nftables then only matches the mark and DNATs).

``classifier.bpf.c`` and ``egress.h`` are the kernel side; ``layout`` mirrors
the header, ``maps`` computes the map contents purely (and re-does the
classifier's decision for tests), ``classifier`` configures the program and
reads and writes its maps, ``build`` owns bcc (compiling in a child, for the
cgroup socket marker in ``cgroup`` too), ``libbpf`` the bpf(2) calls,
``pins`` the bpffs folder, ``attach`` owns tc, ``datapath`` composes them for
the agent. ``policy.decide.should_divert`` is
the reference this datapath and the nftables one must both agree with.
"""
