"""The policy file as a tree of YAML nodes that remember where they stand, and
the problems found in it, each located at file:line:column.

PyYAML's ``safe_load`` throws the positions away and silently keeps the last of
duplicate keys, so the file is *composed* into a node tree (each node carries its
start mark) and read with a :class:`Reader`, which records a located
:class:`Problem` for every node that is not what the schema expects. Scalars
are converted with PyYAML's own safe constructor, so ``0x6567`` is an integer
and ``yes`` a boolean (which is not a port) exactly as YAML 1.1 says.

This module knows YAML's shapes (scalars, lists, mappings, keys) and nothing of
the policy's fields (:mod:`egress_agent.policy.fields`) or sections
(:mod:`egress_agent.policy.sections`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

T = TypeVar("T")

TAG_PREFIX = "tag:yaml.org,2002:"
STR = TAG_PREFIX + "str"
INT = TAG_PREFIX + "int"
FLOAT = TAG_PREFIX + "float"
BOOL = TAG_PREFIX + "bool"
NULL = TAG_PREFIX + "null"
MERGE = TAG_PREFIX + "merge"

# What reads one field: the value, or None after saying why there is none.
Read = Callable[["Reader", Node, str], T | None]

# A mapping with fixed keys, as :meth:`Reader.mapping` returns it:
# key -> (key node, value node).
Fields = dict[str, tuple[Node, Node]]


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a policy, where it is and what was expected.

    ``line`` and ``column`` are 1-based; both are 0 when the problem is the file
    itself (missing, unreadable). ``path`` is empty for the document as a whole.
    """

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class PolicyError(Exception):
    """The policy is not valid; ``problems`` holds everything that was found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def compose(text: str, *, source_name: str) -> Node | None:
    """The node tree of ``text`` (None for an empty document); YAML that
    cannot be read raises :class:`PolicyError` with the place it stopped."""
    try:
        root: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise PolicyError([_syntax_problem(exc, source_name)]) from None
    except yaml.reader.ReaderError as exc:
        line, column = _position(text, int(exc.position))
        message = f"YAML cannot read this character: {exc.reason} (#x{exc.character:04x})"
        raise PolicyError(
            [Problem(file=source_name, line=line, column=column, path="", message=message)]
        ) from None
    except yaml.YAMLError as exc:  # no position known
        problem = Problem(file=source_name, line=1, column=1, path="", message=f"YAML: {exc}")
        raise PolicyError([problem]) from None
    return root


def is_null(node: Node | None) -> bool:
    """Nothing there: an empty document, or a null scalar."""
    return node is None or (isinstance(node, ScalarNode) and node.tag == NULL)


def _syntax_problem(exc: yaml.MarkedYAMLError, source_name: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    problem = (exc.problem or "cannot parse").removeprefix("but ")
    message = f"YAML syntax error: {problem}"
    if exc.context and exc.context_mark is not None:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    elif exc.context:
        message += f" ({exc.context})"
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return Problem(file=source_name, line=line, column=column, path="", message=message)


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, column


def join(path: str, key: str) -> str:
    """The field path of ``key`` inside ``path``: ``egress[2].to``."""
    return f"{path}.{key}" if path else key


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def line_of(node: Node) -> int:
    """The 1-based line a node starts on, for "already given at line N"."""
    return int(node.start_mark.line) + 1


class Reader:
    """Reads a composed node tree, collecting problems.

    Each reading method returns the value or None after recording why there is
    none, so one pass finds every problem; what is built from the remaining
    parts is only used when there were none.
    """

    def __init__(self, source_name: str) -> None:
        self.source_name = source_name
        self.problems: list[Problem] = []
        # A fresh constructor per load: it caches constructed objects by node.
        self._constructor = SafeConstructor()

    def problem(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.problems.append(
            Problem(
                file=self.source_name,
                line=mark.line + 1,
                column=mark.column + 1,
                path=path,
                message=message,
            )
        )

    def scalar(self, node: Node, path: str, *, what: str = "a value") -> object | None:
        """The scalar's value, or None (and a problem) for collections, null
        and values PyYAML cannot construct."""
        if not isinstance(node, ScalarNode) or node.tag == NULL:
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        try:
            # types-PyYAML leaves the constructor untyped.
            value: object = self._constructor.construct_object(  # type: ignore[no-untyped-call]
                node, deep=True
            )
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            self.problem(node, path, f"cannot read {node.value!r} as {node.tag}: {exc}")
            return None
        return value

    def text(self, node: Node, path: str, *, what: str, raw: bool = False) -> str | None:
        """A string. Unquoted numbers are taken as written (a workload may be
        called 2048); with ``raw`` so is any other plain scalar, for fields
        whose parser reports a better message than "found a boolean"."""
        if isinstance(node, ScalarNode) and node.tag in (INT, FLOAT):
            return str(node.value)
        if raw and isinstance(node, ScalarNode) and node.tag not in (NULL, STR):
            return str(node.value)
        value = self.scalar(node, path, what=what)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problem(
                node, path, f"expected {what}, found {self.describe(node)}; quote it if a string"
            )
            return None
        return value

    def sequence(self, node: Node, path: str, *, what: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        items: list[Node] = node.value
        return items

    def mapping(self, node: Node, path: str, *, what: str, allowed: Sequence[str]) -> Fields | None:
        """A mapping with fixed keys: key -> (key node, value node); unknown
        keys are reported and left out."""
        entries = self.entries(node, path, what=f"{what} (a mapping)")
        if entries is None:
            return None
        result: Fields = {}
        for key, key_node, value_node in entries:
            if key not in allowed:
                self.problem(
                    key_node,
                    join(path, key),
                    f"unknown key {key!r}{did_you_mean(key, allowed)}; allowed keys in"
                    f" {what}: {', '.join(allowed)}",
                )
                continue
            result[key] = (key_node, value_node)
        return result

    def entries(self, node: Node, path: str, *, what: str) -> list[tuple[str, Node, Node]] | None:
        """The (key, key node, value node) of a mapping with string keys, in
        file order; bad and duplicate keys are reported and left out."""
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected {what}, found {self.describe(node)}")
            return None
        seen: dict[str, Node] = {}
        result: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:
                self.problem(
                    key_node,
                    path,
                    "merge keys (<<) are not supported: write the keys out, or use an"
                    " alias (*name) for a whole value",
                )
                continue
            key = self.text(key_node, path, what="a key (a string)")
            if key is None:
                continue
            if key in seen:
                self.problem(
                    key_node,
                    join(path, key),
                    f"duplicate key {key!r}: already given at line"
                    f" {line_of(seen[key])}; keep only one",
                )
                continue
            seen[key] = key_node
            result.append((key, key_node, value_node))
        return result

    def require(self, node: Node, path: str, fields: Fields, required: Mapping[str, str]) -> None:
        """Report each key of ``required`` missing from ``fields`` with what
        ``required`` says of it (what it should hold)."""
        for key, what in required.items():
            if key not in fields:
                self.problem(node, join(path, key), f"missing required key {key!r}: {what}")

    def field(
        self,
        fields: Fields,
        path: str,
        key: str,
        read: Read[T],
        default: T,
    ) -> T:
        """``fields[key]`` read with ``read`` at ``path.key``; ``default`` when
        the key is absent or its value is not usable (``read`` said why)."""
        if key not in fields:
            return default
        got = read(self, fields[key][1], join(path, key))
        return default if got is None else got

    def items(
        self,
        node: Node,
        path: str,
        *,
        what: str,
        read: Read[T],
        empty: str | None = None,
    ) -> list[T]:
        """The items of a list, each read with ``read`` at ``path[i]``; those
        that are not usable (``read`` said why) are left out. An empty list is
        reported with the message ``empty`` when one is given."""
        items = self.sequence(node, path, what=what)
        if items is not None and not items and empty is not None:
            self.problem(node, path, empty)
        result: list[T] = []
        for i, item in enumerate(items or ()):
            got = read(self, item, f"{path}[{i}]")
            if got is not None:
                result.append(got)
        return result

    def describe(self, node: Node) -> str:
        """What a node is, for "expected X, found Y"."""
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        tag = node.tag
        if tag == NULL:
            return "nothing (null)"
        if tag == BOOL:
            return f"the boolean {node.value}"
        if tag == INT:
            return f"the integer {node.value}"
        if tag == FLOAT:
            return f"the number {node.value}"
        if tag == STR:
            return f"the string {node.value!r}"
        kind = tag.removeprefix(TAG_PREFIX)
        return f"{node.value!r} (a YAML {kind})"
