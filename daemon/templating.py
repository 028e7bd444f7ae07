"""Placeholders in step args and branch conditions, in a sandboxed Jinja2 environment.

`<<expr>>` and `{{expr}}` mean the same. A string that is exactly one placeholder
keeps the value's JSON type; inside a longer string the value is interpolated
as text (strings as they are, anything else as JSON).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

DELIMITERS = (("<<", ">>"), ("{{", "}}"))
MAX_SIZE = 1_000_000  # largest string or list (in characters / items) an operation may build
MAX_POWER = 10_000  # largest exponent
MAX_INT_BITS = 100_000  # largest integer arithmetic may build
MAX_EXPRESSION = 500  # characters in one expression: bounds how much `~` chains can build
RESERVED_NAMES = {"self", "loop", "super", "caller", "varargs", "kwargs"}

# The only methods an expression may call, per type; everything else is refused.
SAFE_METHODS: dict[type, frozenset[str]] = {
    str: frozenset(
        "lower upper strip lstrip rstrip startswith endswith split rsplit splitlines title "
        "capitalize casefold swapcase count find rfind index rindex isdigit isalpha isalnum "
        "isspace islower isupper isnumeric isdecimal partition rpartition removeprefix "
        "removesuffix replace join".split()
    ),
    dict: frozenset({"get", "keys", "values", "items"}),
    list: frozenset({"index", "count"}),
}


class TemplateError(Exception):
    """An expression failed: bad syntax, an undefined name, or a sandbox violation."""


def _weight(value: Any, limit: int = MAX_SIZE) -> int:
    """Roughly how many characters/items a value holds; stops counting past `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple | dict):
        total = len(value)
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            total += _weight(item, limit - total)
            if total > limit:
                break
        return total
    return 1


def _bounded(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise SecurityError(f"{what} would build {size} characters or items (limit {MAX_SIZE})")


class _Env(ImmutableSandboxedEnvironment):
    """Sandbox: no globals, dict keys before dict methods, allowlisted methods, bounded sizes."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `input.items` must mean the key "items", not dict.items.
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute, hint=f"key '{attribute}' is undefined")
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "%":
            if isinstance(left, str):
                raise SecurityError("'%' string formatting is not supported; join with '~'")
            return operator.mod(left, right)
        if op == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER:
                raise SecurityError(f"exponent {right} is too large")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if max(left.bit_length(), 1) * right > MAX_INT_BITS:
                    raise SecurityError("result of ** is too large")
            return operator.pow(left, right)
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int):
                _bounded(_weight(seq) * n, "*")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise SecurityError("result of * is too large")
        return operator.mul(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "?")
        allowed = SAFE_METHODS.get(type(owner), frozenset())
        if owner is None or name not in allowed:
            raise SecurityError(f"calling '{name}' is not allowed in expressions")
        if isinstance(owner, str) and name == "join" and args:
            return _join(args[0], owner)
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            return _replace(owner, *args)
        return __obj(*args, **kwargs)


def _join(items: Any, sep: str = "") -> str:
    parts = [p if isinstance(p, str) else str(p) for p in items]
    _bounded(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0), "join")
    return sep.join(parts)


def _replace(text: Any, old: Any, new: Any, count: Any = -1) -> str:
    text, old, new = str(text), str(old), str(new)
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _bounded(len(text) + hits * max(len(new) - len(old), 0), "replace")
    return text.replace(old, new, count if isinstance(count, int) else -1)


_ENV = _Env(undefined=StrictUndefined, autoescape=False)
_ENV.globals.clear()
_ENV.filters = {
    name: _ENV.filters[name]
    for name in (
        "abs", "capitalize", "default", "first", "float", "int", "last", "length",
        "list", "lower", "max", "min", "reverse", "round", "sort", "string",
        "sum", "title", "trim", "truncate", "unique", "upper", "tojson",
    )
}  # fmt: skip
_ENV.filters["join"] = lambda value, d="": _join(value, d)
_ENV.filters["replace"] = _replace


def scan(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, expression) of each placeholder, left to right, in linear time.

    An opener matches the nearest closer at least one character after it; an
    opener without a closer is plain text.
    """
    pos = 0
    closed = {opener: False for opener, _ in DELIMITERS}  # no closer left for this kind
    while True:
        best: tuple[int, str, str] | None = None
        for opener, closer in DELIMITERS:
            if closed[opener]:
                continue
            at = text.find(opener, pos)
            if at != -1 and (best is None or at < best[0]):
                best = (at, opener, closer)
        if best is None:
            return
        at, opener, closer = best
        end = text.find(closer, at + len(opener) + 1)
        if end == -1:
            closed[opener] = True
            continue
        yield at, end + len(closer), text[at + len(opener) : end]
        pos = end + len(closer)


def placeholders(text: str) -> Iterator[str]:
    """The expressions inside a string's placeholders."""
    for _, _, expr in scan(text):
        yield expr.strip()


def check_expression(expr: str) -> str | None:
    """A problem with `expr` detectable without data (syntax, unsafe names), else None."""
    try:
        _compile(expr)
    except TemplateError as exc:
        return str(exc)
    return None


def _problem(expr: str) -> str | None:
    if not expr:
        return "empty expression"
    if len(expr) > MAX_EXPRESSION:
        return f"expression is longer than {MAX_EXPRESSION} characters"
    try:
        tree = _ENV.parse("{{ " + expr + " }}")
    except TemplateSyntaxError as exc:
        return f"syntax error in '{expr}': {exc.message}"
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        if isinstance(node, nodes.Name):
            if node.name in RESERVED_NAMES:
                return f"'{node.name}' is undefined in '{expr}'"
            continue
        name = node.attr if isinstance(node, nodes.Getattr) else _const(node.arg)
        if isinstance(name, str) and name.startswith("_"):
            return f"access to '{name}' is not allowed in '{expr}'"
    return None


def _const(node: nodes.Node) -> Any:
    return node.value if isinstance(node, nodes.Const) else None


@lru_cache(maxsize=4096)
def _compile(expr: str) -> Any:
    problem = _problem(expr)
    if problem:
        raise TemplateError(problem)
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
    if "<<" not in text and "{{" not in text:
        return text
    found = list(scan(text))
    if len(found) == 1 and found[0][0] == 0 and found[0][1] == len(text):
        return _plain(evaluate(found[0][2], scope))  # exactly one placeholder: keep the type
    out, pos = [], 0
    for start, end, expr in found:
        out.append(text[pos:start])
        out.append(_as_text(evaluate(expr, scope)))
        pos = end
    out.append(text[pos:])
    return "".join(out)


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
    try:
        return orjson.dumps(_plain(value)).decode()
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        raise TemplateError(f"cannot write the value as JSON text: {exc}") from None


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
