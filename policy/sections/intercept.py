"""``intercept:``, which workloads' traffic the kernel diverts to the proxy
(by port and destination), and what happens to their traffic that is not TCP."""

from __future__ import annotations

from yaml.nodes import Node

from egress_agent.policy import fields
from egress_agent.policy.model import InterceptRule, NonTcp
from egress_agent.policy.sections.workloads import Known, sources
from egress_agent.policy.yamlnodes import Reader, join

_INTERCEPT_KEYS = ("from", "ports", "except_cidrs", "to_cidrs", "non_tcp")
# ``non_tcp: pass | drop`` of an intercept rule.
non_tcp = fields.one_of(
    {choice.value: choice for choice in NonTcp},
    what="pass or drop",
    expected="expected pass (non-TCP traffic of the rule's workloads goes where it is sent;"
    " the default) or drop (it is dropped in the kernel, replies and related ICMP errors"
    " excepted),",
)


def intercept(r: Reader, node: Node, path: str, known: Known) -> tuple[InterceptRule, ...]:
    items = r.sequence(node, path, what="a list of intercept rules ([] for none)")
    rules: list[InterceptRule] = []
    for index, item in enumerate(items or ()):
        r_path = f"{path}[{index}]"
        rule = r.mapping(item, r_path, what="an intercept rule", allowed=_INTERCEPT_KEYS)
        if rule is None:
            continue
        r.require(item, r_path, rule, {"from": "expected a non-empty list of workload names"})
        from_: tuple[str, ...] = ()
        if "from" in rule:
            from_ = sources(r, rule["from"][1], join(r_path, "from"), known)
        rules.append(
            InterceptRule(
                index=index,
                sources=from_,
                ports=r.field(rule, r_path, "ports", fields.ports, default=()),
                except_cidrs=r.field(rule, r_path, "except_cidrs", fields.networks, default=()),
                to_cidrs=r.field(rule, r_path, "to_cidrs", fields.networks, default=()),
                non_tcp=r.field(rule, r_path, "non_tcp", non_tcp, default=NonTcp.PASS),
            )
        )
    return tuple(rules)
