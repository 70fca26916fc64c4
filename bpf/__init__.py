"""The BPF datapath (tc classifier, maps, bcc loader).

Not built yet: today the nftables ruleset from ``rules`` selects diverted traffic
on its own. The BPF classifier will make the same decisions from maps updated
live; ``policy.decide.should_divert`` is the reference both must agree with.
"""
