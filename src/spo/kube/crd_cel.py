"""A CRD's CEL rules (``x-kubernetes-validations``) as JSON Schema, for :mod:`spo.kube.manifests`.

The API server evaluates a CRD's CEL rules on every create and update, so a validator that
skipped them would pass manifests the cluster rejects (a TrainJob name with a dot, say). A CEL
interpreter is far more than the few rule shapes CRDs actually use, so this translates exactly
those shapes and raises on anything else — a new release's new rule is noticed, never skipped:

* ``P.matches('RE')`` → ``pattern``; ``P == 'text'`` → ``const``; ``P in ['a', 'b']`` → ``enum``
* ``size(P) <= N`` (also ``<``, ``>=``, ``>``) → ``maxLength``/``maxItems``/``maxProperties`` (or min)
* ``has(P.field)`` → ``required``; ``A || B`` → ``anyOf``; ``A && B`` → ``allOf``; parentheses

where ``P`` is ``self`` or a field path below it (``self.metadata.name``). A path's missing
field passes, as ``has()`` guards would have it. A *transition rule* (one that reads
``oldSelf``, e.g. ``self == oldSelf``: "field is immutable") constrains updates only — the API
server does not evaluate it on create — so it translates to nothing: these schemas check
manifests that are about to be created.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["cel_rule_schema", "re2_pattern"]

_TOKEN = re.compile(r"""\s*(?:(?P<string>'(?:[^'\\]|\\.)*')|(?P<number>\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)
                        |(?P<op>\|\||&&|==|<=|>=|<|>|[()\[\],.]))""", re.VERBOSE)
_SIZE_BOUNDS = {"<=": ("max", 0), "<": ("max", -1), ">=": ("min", 0), ">": ("min", 1)}


def re2_pattern(pattern: str) -> str:
    """Make a trailing ``$`` mean end-of-text, as in Go's RE2 (Python's ``$`` also matches before a final newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


class _Unsupported(ValueError):
    pass


def cel_rule_schema(rule: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema one ``x-kubernetes-validations`` entry means on create (``None``: a transition rule).

    The rule's ``message`` rides along as ``$comment`` (no effect on validation) on every node,
    so a finding can quote what the CRD's authors wrote. Raises ``ValueError`` naming the rule for a shape
    this module does not translate.
    """
    text = rule.get("rule")
    unknown = set(rule) - {"rule", "message", "messageExpression", "reason", "fieldPath"}
    if not isinstance(text, str) or unknown or rule.get("optionalOldSelf"):
        raise ValueError(f"x-kubernetes-validations entry {dict(rule)!r}: unsupported form")
    try:
        tokens = _tokenize(text)
        if ("name", "oldSelf") in tokens:
            return None
        parser = _Parser(tokens)
        schema = parser.expression()
        parser.expect_end()
    except _Unsupported as err:
        raise ValueError(f"x-kubernetes-validations rule {text!r} is not translated to JSON Schema ({err}); "
                         "refusing to validate only part of the CRD") from None
    if rule.get("message"):
        _annotate(schema, str(rule["message"]))
    return schema


def _annotate(schema: dict[str, Any], message: str) -> None:
    """``$comment`` on every node: jsonschema reports the innermost failing node, which must carry it."""
    schema["$comment"] = message
    for key, value in schema.items():
        if key == "properties":
            for child in value.values():
                _annotate(child, message)
        elif key in ("anyOf", "allOf"):
            for child in value:
                _annotate(child, message)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text.rstrip()):
        match = _TOKEN.match(text, position)
        if not match:
            raise _Unsupported(f"cannot read {text[position:]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _string_value(literal: str) -> str:
    """A single-quoted CEL string; only ``\\\\`` and ``\\'`` escapes (regexes rarely need others)."""
    out, escaped = [], False
    for char in literal[1:-1]:
        if escaped and char not in "\\'":
            raise _Unsupported(f"escape sequence \\{char} in {literal}")
        if char == "\\" and not escaped:
            escaped = True
            continue
        out.append(char)
        escaped = False
    return "".join(out)


def _at(path: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` applied to the value at ``path`` below ``self`` (absent fields pass)."""
    for field in reversed(path):
        schema = {"properties": {field: schema}}
    return schema


class _Parser:
    """Recursive descent over the token list: ``or := and ('||' and)*``, ``and := atom ('&&' atom)*``."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.index = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.index] if self.index < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        got_kind, got = self.peek()
        if got_kind != kind or (value is not None and got != value):
            raise _Unsupported(f"expected {value or kind}, found {got or 'the end'}")
        self.index += 1
        return got

    def expect_end(self) -> None:
        if self.index != len(self.tokens):
            raise _Unsupported(f"unexpected {self.peek()[1]!r}")

    def expression(self) -> dict[str, Any]:
        branches = [self.conjunction()]
        while self.peek() == ("op", "||"):
            self.take("op", "||")
            branches.append(self.conjunction())
        return branches[0] if len(branches) == 1 else {"anyOf": branches}

    def conjunction(self) -> dict[str, Any]:
        parts = [self.atom()]
        while self.peek() == ("op", "&&"):
            self.take("op", "&&")
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else {"allOf": parts}

    def path(self) -> list[str]:
        self.take("name", "self")
        fields: list[str] = []
        while self.peek() == ("op", ".") and self.index + 1 < len(self.tokens) \
                and self.tokens[self.index + 1] != ("name", "matches"):
            self.take("op", ".")
            fields.append(self.take("name"))
        return fields

    def atom(self) -> dict[str, Any]:
        if self.peek() == ("op", "("):
            self.take("op", "(")
            inner = self.expression()
            self.take("op", ")")
            return inner
        if self.peek() == ("name", "has"):
            return self.has()
        if self.peek() == ("name", "size"):
            return self.size()
        path = self.path()
        kind, value = self.peek()
        if (kind, value) == ("op", "."):
            self.take("op", ".")
            self.take("name", "matches")
            self.take("op", "(")
            pattern = _string_value(self.take("string"))
            self.take("op", ")")
            return _at(path, {"type": "string", "pattern": re2_pattern(pattern)})
        if (kind, value) == ("op", "=="):
            self.take("op", "==")
            return _at(path, {"const": _string_value(self.take("string"))})
        if (kind, value) == ("name", "in"):
            self.take("name", "in")
            return _at(path, {"enum": self.string_list()})
        raise _Unsupported(f"unexpected {value or 'end'} after self{''.join('.' + f for f in path)}")

    def has(self) -> dict[str, Any]:
        self.take("name", "has")
        self.take("op", "(")
        path = self.path()
        self.take("op", ")")
        if not path:
            raise _Unsupported("has() needs a field")
        return _at(path[:-1], {"required": [path[-1]]})

    def size(self) -> dict[str, Any]:
        self.take("name", "size")
        self.take("op", "(")
        path = self.path()
        self.take("op", ")")
        operator = self.take("op")
        if operator not in _SIZE_BOUNDS:
            raise _Unsupported(f"size() compared with {operator}")
        bound, shift = _SIZE_BOUNDS[operator]
        limit = int(self.take("number")) + shift
        return _at(path, {f"{bound}Length": limit, f"{bound}Items": limit, f"{bound}Properties": limit})

    def string_list(self) -> list[str]:
        self.take("op", "[")
        values = [_string_value(self.take("string"))]
        while self.peek() == ("op", ","):
            self.take("op", ",")
            values.append(_string_value(self.take("string")))
        self.take("op", "]")
        return values
