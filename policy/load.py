"""Load a policy file into a validated :class:`~egress_agent.policy.model.Policy`.

The agent refuses to start (and a reload keeps the last good policy) unless the
whole file is valid, so the loader's job is to say exactly what is wrong: every
problem, not just the first, each with file:line:column, the field path
(``egress[2].to.ports[1]``) and what was expected.

The loader is three layers: the YAML tree whose nodes remember their position,
and the located problems (:mod:`~egress_agent.policy.yamlnodes`); the field
types (:mod:`~egress_agent.policy.fields`); and the sections
(:mod:`~egress_agent.policy.sections`). This module reads the file and composes
the sections into a Policy.

Nothing in a policy may be written as null: an empty ``from:`` that silently
meant "any workload" would widen an allow rule. Empty lists are written ``[]``.
"""

from __future__ import annotations

import os

from yaml.nodes import Node

from egress_agent.policy import fields
from egress_agent.policy.model import (
    Action,
    DnsSettings,
    EgressRule,
    InterceptRule,
    Policy,
    ProxySettings,
    ReversePath,
    Workload,
    by_cgroup,
    cgroup_marks,
)
from egress_agent.policy.sections.connect import connect
from egress_agent.policy.sections.egress import default_action, egress
from egress_agent.policy.sections.intercept import intercept
from egress_agent.policy.sections.settings import dns, fail, on_reload, proxy, reverse_path
from egress_agent.policy.sections.workloads import workloads
from egress_agent.policy.yamlnodes import PolicyError, Problem, Reader, compose, is_null

__all__ = [
    "SUPPORTED_VERSION",
    "PolicyError",
    "Problem",
    "load_policy",
    "parse_policy",
    "read_policy_text",
]

SUPPORTED_VERSION = 1

_TOP_KEYS = (
    "version",
    "proxy",
    "workloads",
    "intercept",
    "egress",
    "default",
    "enforce",
    "on_reload",
    "fail",
    "connect",
    "dns",
    "reverse_path",
)
_REQUIRED = {
    "version": f"expected the integer {SUPPORTED_VERSION}",
    "workloads": "expected a mapping of workload name to {cidrs: [...]}",
    "default": "expected allow or deny (or {action: deny, mode: audit})",
}


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at ``path``; raise :class:`PolicyError`."""
    return parse_policy(read_policy_text(path), source_name=os.fspath(path))


def read_policy_text(path: str | os.PathLike[str]) -> str:
    """The policy file's text; a file that cannot be read raises :class:`PolicyError`
    saying what to do."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _file_error(name, "no such file: check the path given with --policy") from None
    except IsADirectoryError:
        raise _file_error(name, "this is a directory: give the path of the policy file") from None
    except PermissionError:
        raise _file_error(
            name, "permission denied: make the file readable by the user running the agent"
        ) from None
    except UnicodeDecodeError as exc:
        raise _file_error(
            name, f"not UTF-8 text (byte {exc.start} cannot be decoded): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise _file_error(name, f"cannot read the file: {exc.strerror or exc}") from None
    return text


def parse_policy(text: str, *, source_name: str = "<policy>") -> Policy:
    """Validate policy ``text``; raise :class:`PolicyError` listing every problem."""
    root = compose(text, source_name=source_name)
    if root is None or is_null(root):
        message = (
            "the policy is empty: expected a mapping with at least version, workloads and"
            " default (see the example in the README)"
        )
        raise PolicyError([Problem(file=source_name, line=1, column=1, path="", message=message)])
    reader = Reader(source_name)
    policy = _policy(reader, root)
    if reader.problems:
        raise PolicyError(sorted(reader.problems, key=lambda p: (p.line, p.column)))
    return policy


def _file_error(name: str, message: str) -> PolicyError:
    return PolicyError([Problem(file=name, line=0, column=0, path="", message=message)])


def _policy(r: Reader, root: Node) -> Policy:
    """The whole document: each section read in turn, and what ties them."""
    top = r.mapping(root, "", what="the policy", allowed=_TOP_KEYS)
    if top is None:
        return _EMPTY_POLICY
    r.require(root, "", top, _REQUIRED)

    if "version" in top:
        _version(r, top["version"][1])
    proxy_settings = r.field(top, "", "proxy", proxy, default=ProxySettings())
    workloads_: tuple[Workload, ...] = ()
    known: dict[str, Workload] | None = {}
    if "workloads" in top:
        known = workloads(r, top["workloads"][1], "workloads")
        workloads_ = tuple(known.values()) if known is not None else ()
    if any(by_cgroup(w) for w in workloads_):
        try:
            cgroup_marks(workloads_, proxy_settings.cgroup_mark_mask)
        except ValueError as exc:
            r.problem(top["workloads"][1], "workloads", str(exc))
    intercept_rules: tuple[InterceptRule, ...] = ()
    if "intercept" in top:
        intercept_rules = intercept(r, top["intercept"][1], "intercept", known)
    egress_rules: tuple[EgressRule, ...] = ()
    if "egress" in top:
        egress_rules = egress(r, top["egress"][1], "egress", known)
    default, default_audit = r.field(
        top, "", "default", default_action, default=(Action.DENY, False)
    )
    enforce = r.field(top, "", "enforce", _enforce, default=True)
    close_denied = r.field(top, "", "on_reload", on_reload, default=False)
    fail_open = r.field(top, "", "fail", fail, default=False)
    connect_settings = None
    if "connect" in top:
        connect_settings = connect(r, top["connect"][1], "connect", known, proxy_settings)

    return Policy(
        version=SUPPORTED_VERSION,
        proxy=proxy_settings,
        workloads=workloads_,
        intercept=intercept_rules,
        egress=egress_rules,
        default=default,
        enforce=enforce,
        default_audit=default_audit,
        close_denied_on_reload=close_denied,
        fail_open=fail_open,
        connect=connect_settings,
        dns=r.field(top, "", "dns", dns, default=DnsSettings()),
        reverse_path=r.field(top, "", "reverse_path", reverse_path, default=ReversePath()),
        source_name=r.source_name,
    )


def _enforce(r: Reader, node: Node, path: str) -> bool:
    # ``enforce: false``: audit mode for every deny (see Policy.enforce).
    return fields.boolean(r, node, path, default=True)


def _version(r: Reader, node: Node) -> None:
    value = r.scalar(node, "version")
    if value is None:
        return
    if type(value) is not int:
        expected = f"expected the integer {SUPPORTED_VERSION}"
        r.problem(node, "version", f"{expected}, found {r.describe(node)}")
    elif value != SUPPORTED_VERSION:
        r.problem(
            node,
            "version",
            f"unsupported version {value}: this egress-agent reads version"
            f" {SUPPORTED_VERSION} policies",
        )


_EMPTY_POLICY = Policy(
    version=SUPPORTED_VERSION,
    proxy=ProxySettings(),
    workloads=(),
    intercept=(),
    egress=(),
    default=Action.DENY,
)
