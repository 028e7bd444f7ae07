"""Placeholders in step args and branch conditions, in a sandboxed Jinja2 environment.

`<<expr>>` and `{{expr}}` mean the same. A string that is exactly one placeholder
keeps the value's JSON type; inside a longer string the value is interpolated
as text (strings as they are, anything else as JSON).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

PLACEHOLDER = re.compile(r"<<(.+?)>>|\{\{(.+?)\}\}", re.DOTALL)
MAX_STRING = 1_000_000  # longest string or list an expression may build with * or **
MAX_POWER = 10_000


class TemplateError(Exception):
    """An expression failed: bad syntax, an undefined name, or a sandbox violation."""


class _Env(ImmutableSandboxedEnvironment):
    """Sandbox with no globals, dict keys before dict methods, and bounded arithmetic."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `input.items` must mean the key "items", not dict.items.
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute, hint=f"key '{attribute}' is undefined")
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER:
                raise SecurityError(f"exponent {right} is too large")
            return operator.pow(left, right)
        size = _repeat_size(left, right)
        if size is not None and size > MAX_STRING:
            raise SecurityError(f"result of * would have {size} items (limit {MAX_STRING})")
        return operator.mul(left, right)


def _repeat_size(left: Any, right: Any) -> int | None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            return len(seq) * n
    return None


_ENV = _Env(undefined=StrictUndefined, autoescape=False)
_ENV.globals.clear()
_ENV.filters = {
    name: _ENV.filters[name]
    for name in (
        "abs", "capitalize", "default", "first", "float", "int", "join", "last", "length",
        "list", "lower", "max", "min", "replace", "reverse", "round", "sort", "string",
        "sum", "title", "trim", "truncate", "unique", "upper", "tojson",
    )
}  # fmt: skip


def placeholders(text: str) -> Iterator[str]:
    """The expressions inside a string's placeholders."""
    for m in PLACEHOLDER.finditer(text):
        yield (m.group(1) if m.group(1) is not None else m.group(2)).strip()


def check_expression(expr: str) -> str | None:
    """A problem with `expr` detectable without data (syntax, unsafe attribute), else None."""
    if not expr:
        return "empty expression"
    try:
        tree = _ENV.parse("{{ " + expr + " }}")
    except TemplateSyntaxError as exc:
        return f"syntax error in '{expr}': {exc.message}"
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else _const(node.arg)
        if isinstance(name, str) and name.startswith("_"):
            return f"access to '{name}' is not allowed in '{expr}'"
    try:
        _compile(expr)
    except TemplateError as exc:
        return str(exc)
    return None


def _const(node: nodes.Node) -> Any:
    return node.value if isinstance(node, nodes.Const) else None


@lru_cache(maxsize=4096)
def _compile(expr: str) -> Any:
    try:
        return _ENV.compile_expression(expr, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error in '{expr}': {exc.message}") from None


def evaluate(expr: str, scope: dict[str, Any]) -> Any:
    """Evaluate one expression; undefined names and sandbox violations raise TemplateError."""
    fn = _compile(expr.strip())
    try:
        value = fn(**scope)
    except UndefinedError as exc:
        raise TemplateError(f"undefined in '{expr.strip()}': {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"not allowed in '{expr.strip()}': {exc}") from None
    except TemplateError:
        raise
    except Exception as exc:  # a type error in user arithmetic, a bad filter argument, ...
        raise TemplateError(f"cannot evaluate '{expr.strip()}': {exc}") from None
    if isinstance(value, Undefined):
        hint = value._undefined_hint
        if hint is None:
            hint = f"'{value._undefined_name}' is undefined"
        raise TemplateError(f"undefined in '{expr.strip()}': {hint}")
    return value


def render_value(value: Any, scope: dict[str, Any]) -> Any:
    """Render placeholders in every string inside a JSON value."""
    if isinstance(value, str):
        return _render_string(value, scope)
    if isinstance(value, list):
        return [render_value(v, scope) for v in value]
    if isinstance(value, dict):
        return {k: render_value(v, scope) for k, v in value.items()}
    return value


def _render_string(text: str, scope: dict[str, Any]) -> Any:
    m = PLACEHOLDER.fullmatch(text)
    if m is not None and len(list(PLACEHOLDER.finditer(text))) == 1:
        return _plain(evaluate(m.group(1) or m.group(2), scope))
    if "<<" not in text and "{{" not in text:
        return text
    return PLACEHOLDER.sub(lambda m: _as_text(evaluate(m.group(1) or m.group(2), scope)), text)


def _plain(value: Any) -> Any:
    """Convert tuples and other sequences the sandbox may return into JSON types."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TemplateError(f"expression gave a {type(value).__name__}, which is not JSON")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(_plain(value)).decode()


def truthy(expr: str, scope: dict[str, Any]) -> bool:
    """Evaluate a branch condition."""
    return bool(evaluate(expr, scope))


def truncate_json(value: Any, limit: int = 200) -> str:
    """A value as JSON text for an error message, cut to `limit` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
