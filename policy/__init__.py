"""The policy model shared by every part: data, loading with exact error
locations, and the reference decisions (diversion and egress verdicts)."""
