"""``egress:``, the named allow and deny rules the proxy decides by (sources,
destination hosts, CIDRs and ports, how hosts are bound to addresses), and the
actions they and ``default`` take."""

from __future__ import annotations

from yaml.nodes import MappingNode, Node

from egress_agent.policy import fields
from egress_agent.policy.model import Action, EgressRule, HttpRule, IPNetwork, PortRange, Resolve
from egress_agent.policy.sections.httprule import http_rule
from egress_agent.policy.sections.route import route
from egress_agent.policy.sections.traffic import traffic_controls
from egress_agent.policy.sections.workloads import Known, sources
from egress_agent.policy.yamlnodes import Reader, join, line_of

_EGRESS_KEYS = (
    "name",
    "from",
    "to",
    "action",
    "mode",
    "http",
    "limits",
    "breaker",
    "source",
    "via",
)
_DEFAULT_KEYS = ("action", "mode")
_TO_KEYS = ("hosts", "cidrs", "ports", "resolve")
_RESOLVE_CHOICES = {
    Resolve.VERIFY: "the original destination must be one of the name's addresses; the default",
    Resolve.CONNECT: "connect to one of the name's own addresses, whatever the client dialled",
    Resolve.NONE: "no check: the name alone decides, a forged name reaches any address (unsafe)",
}
# ``allow`` or ``deny``: a rule's action, and the policy's default.
action = fields.one_of(
    {a.value: a for a in Action}, what="allow or deny", expected="expected allow or deny,"
)
# ``mode: enforce | audit`` of a deny rule or of the default.
mode = fields.one_of(
    {"enforce": False, "audit": True},
    what="enforce or audit",
    expected="expected enforce (denies are denied; the default) or audit (denies are"
    " allowed and audited as audit-deny);",
)
# ``to.resolve: verify | connect | none`` of an egress rule.
_resolve = fields.one_of(
    {c.value: c for c in Resolve},
    what="verify, connect or none",
    expected="expected one of "
    + "; ".join(f"{c.value} ({why})" for c, why in _RESOLVE_CHOICES.items())
    + ";",
)


def egress(r: Reader, node: Node, path: str, known: Known) -> tuple[EgressRule, ...]:
    items = r.sequence(node, path, what="a list of egress rules ([] for none)")
    rules: list[EgressRule] = []
    first_by_name: dict[str, Node] = {}
    for index, item in enumerate(items or ()):
        r_path = f"{path}[{index}]"
        rule = r.mapping(item, r_path, what="an egress rule", allowed=_EGRESS_KEYS)
        if rule is None:
            continue
        r.require(
            item, r_path, rule, {"name": "expected a rule name", "action": "expected allow or deny"}
        )
        name = f"#{index}"  # only seen if the rule is invalid
        if "name" in rule:
            n_node = rule["name"][1]
            n_path = join(r_path, "name")
            got = fields.name(r, n_node, n_path, what="an egress rule name")
            if got == "default":
                r.problem(
                    n_node,
                    n_path,
                    "'default' is reserved: verdicts made by the default action carry"
                    " that name; choose another name",
                )
            elif got is not None and got in first_by_name:
                r.problem(
                    n_node,
                    n_path,
                    f"duplicate egress rule name {got!r}: already used at line"
                    f" {line_of(first_by_name[got])}; names identify rules in the audit"
                    " log, give each rule its own",
                )
            elif got is not None:
                first_by_name[got] = n_node
                name = got
        from_: tuple[str, ...] | None = None
        if "from" in rule:
            f_node = rule["from"][1]
            from_ = sources(r, f_node, join(r_path, "from"), known, empty_hint=True)
        hosts: tuple[str, ...] = ()
        cidrs: tuple[IPNetwork, ...] = ()
        ports: tuple[PortRange, ...] = ()
        resolve = Resolve.VERIFY
        resolve_key: tuple[Node, str] | None = None
        if "to" in rule:
            t_path = join(r_path, "to")
            to = r.mapping(rule["to"][1], t_path, what="a destination", allowed=_TO_KEYS)
            if to is not None:
                hosts = r.field(to, t_path, "hosts", fields.hosts, default=())
                cidrs = r.field(to, t_path, "cidrs", fields.networks, default=())
                ports = r.field(to, t_path, "ports", fields.ports, default=())
                if "resolve" in to:
                    resolve_key = (to["resolve"][0], join(t_path, "resolve"))
                    resolve = _resolve(r, to["resolve"][1], resolve_key[1]) or Resolve.VERIFY
                    if "hosts" not in to:
                        r.problem(
                            resolve_key[0],
                            resolve_key[1],
                            "resolve says how a rule's hosts are bound to addresses, and"
                            " this rule has no hosts: remove it, or add hosts",
                        )
        act = r.field(rule, r_path, "action", action, default=Action.DENY)
        if resolve_key is not None and "action" in rule and act is Action.DENY:
            r.problem(
                resolve_key[0],
                resolve_key[1],
                "resolve applies to allow rules only: a deny rule refuses what names its"
                " hosts, wherever it goes (deny addresses with cidrs); remove it",
            )
        audit = False
        if "mode" in rule:
            m_key, m_node = rule["mode"]
            m_path = join(r_path, "mode")
            audit = bool(mode(r, m_node, m_path))
            if audit and "action" in rule and act is not Action.DENY:
                r.problem(
                    m_key,
                    m_path,
                    "mode: audit applies to deny rules only (an allow rule lets its flows"
                    " through already): remove it, or make the rule deny",
                )
                audit = False
        http: HttpRule | None = None
        if "http" in rule:
            h_key, h_node = rule["http"]
            h_path = join(r_path, "http")
            http = http_rule(r, h_node, h_path)
            if "action" in rule and act is not Action.ALLOW:
                r.problem(
                    h_key,
                    h_path,
                    "an http section only applies to action allow: a denied connection"
                    " carries no requests; remove it or make the rule allow",
                )
        limits, breaker = traffic_controls(r, rule, r_path, act if "action" in rule else None)
        source, via = route(r, rule, r_path, act if "action" in rule else None)
        rules.append(
            EgressRule(
                name=name,
                action=act,
                sources=from_,
                hosts=hosts,
                cidrs=cidrs,
                ports=ports,
                http=http,
                resolve=resolve,
                audit=audit,
                limits=limits,
                breaker=breaker,
                source=source,
                via=via,
            )
        )
    return tuple(rules)


def default_action(r: Reader, node: Node, path: str) -> tuple[Action, bool] | None:
    """``default: allow | deny``, or ``default: {action: deny, mode: audit}``:
    the action for flows no rule matches, and whether its denies are only
    audited."""
    if not isinstance(node, MappingNode):
        got = action(r, node, path)
        return None if got is None else (got, False)
    section = r.mapping(node, path, what="the default action", allowed=_DEFAULT_KEYS)
    if section is None:
        return None
    r.require(node, path, section, {"action": "expected allow or deny"})
    act = r.field(section, path, "action", action, default=Action.DENY)
    audit = bool(r.field(section, path, "mode", mode, default=False))
    if audit and act is not Action.DENY and "action" in section:
        r.problem(
            section["mode"][0],
            join(path, "mode"),
            "mode: audit applies to default: deny only (default: allow lets every flow"
            " through already): remove it, or make the default deny",
        )
        audit = False
    return act, audit
