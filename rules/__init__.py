"""nftables: a pure renderer from policy to one JSON ruleset for the agent's own
table, and a thin module that applies it as one transaction and reads it back."""
