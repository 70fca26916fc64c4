"""The policy's sections, one module per group of top-level keys: the
workloads, the intercept and egress rules (and an allow rule's http section),
the CONNECT listener, and the node-wide settings (proxy, dns, on_reload, fail,
reverse_path). :mod:`egress_agent.policy.load` composes them into a Policy.

Each reader takes the :class:`~egress_agent.policy.yamlnodes.Reader`, the
section's node and its field path, reads its fields with
:mod:`egress_agent.policy.fields`, and checks what ties the fields together.
"""
