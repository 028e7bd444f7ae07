"""The expression language: sandboxed Jinja2 expressions over JSON values.

This is what the sandbox process runs (daemon/evaluator.py); the daemon itself only
parses expressions to validate them and reads plain paths (daemon/templating.py).
Besides Jinja's sandbox: no globals, dict keys before dict methods, an allowlist of
callable methods, bounded sizes for what `*`, `**`, `join` and `replace` build, text
conversions that refuse anything but data (no object addresses), and a CPU-time
limit per expression.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes, pass_environment
from jinja2.compiler import CodeGenerator, Frame
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from daemon.placeholders import TemplateError, as_text, plain, quoted, scan, scrub, whole

MAX_SIZE = 1_000_000  # largest string or list (in characters / items) an operation may build
MAX_POWER = 10_000  # largest exponent
MAX_INT_BITS = 100_000  # largest integer arithmetic may build
MAX_EXPRESSION = 500  # characters in one expression
MAX_DEPTH = 24  # brackets and operators nested in one expression
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


def text(value: Any) -> str:
    """A value as text for `~`, `string` and the text filters: strings as they are, data as
    JSON; anything else (a method, an undefined) is refused rather than shown as a repr."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    try:
        return as_text(value)
    except TemplateError as exc:
        raise SecurityError(str(exc)) from None


class _Codegen(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802
        # `a ~ b` joins through environment.concat (the `text` rules), not str().
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Env(ImmutableSandboxedEnvironment):
    code_generator_class = _Codegen
    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `input.items` must mean the key "items", not dict.items; without such a key, an
        # allowed method (`input.get('k', 0)`) is the method.
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            if attribute in SAFE_METHODS[dict]:
                return getattr(obj, attribute)
            return self.undefined(obj=obj, name=attribute, hint=f"key '{attribute}' is undefined")
        return super().getattr(obj, attribute)

    @staticmethod
    def concat(parts: Iterable[Any]) -> str:
        pieces = [text(p) for p in parts]
        _bounded(sum(map(len, pieces)), "~")
        return "".join(pieces)

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
        if isinstance(__obj, Undefined):
            __obj._fail_with_undefined_error()  # `range(...)`: say that range is undefined
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


def _join(items: Any, sep: Any = "") -> str:
    parts = [text(p) for p in items]
    sep = text(sep)
    _bounded(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0), "join")
    return sep.join(parts)


def _replace(value: Any, old: Any, new: Any, count: Any = -1) -> str:
    value, old, new = text(value), text(old), text(new)
    hits = len(value) + 1 if old == "" else value.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _bounded(len(value) + hits * max(len(new) - len(old), 0), "replace")
    return value.replace(old, new, count if isinstance(count, int) else -1)


def _on_text(name: str) -> Any:
    """A Jinja text filter that first turns its value into text by the `text` rules."""
    fn = _ENV.filters[name]
    if getattr(fn, "jinja_pass_arg", None) is not None:  # truncate: takes the environment

        @pass_environment
        def with_env(env: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            return fn(env, text(value), *args, **kwargs)

        return with_env
    return lambda value, *args, **kwargs: fn(text(value), *args, **kwargs)


def _tojson(value: Any) -> str:
    return text(value) if not isinstance(value, str) else orjson.dumps(value).decode()


# optimized=False: Jinja would otherwise fold constant parts at compile time, running
# filters and operators outside the limits that apply when an expression is evaluated.
_ENV = _Env(undefined=StrictUndefined, autoescape=False, optimized=False)
_ENV.globals.clear()
_TEXT_FILTERS = ("capitalize", "lower", "title", "trim", "truncate", "upper")
_ENV.filters = {
    **{name: _ENV.filters[name] for name in (
        "abs", "default", "first", "float", "int", "last", "length", "list", "max", "min",
        "reverse", "round", "sort", "sum", "unique",
    )},
    **{name: _on_text(name) for name in _TEXT_FILTERS},
    "string": text, "tojson": _tojson, "join": lambda value, d="": _join(value, d),
    "replace": _replace,
}  # fmt: skip


def parse(expr: str) -> nodes.Expr:
    """The syntax tree of one expression; TemplateError for syntax errors and depth."""
    if _bracket_depth(expr) > MAX_DEPTH:
        raise TemplateError(f"'{expr}' is nested more than {MAX_DEPTH} levels deep")
    try:
        parser = Parser(_ENV, expr, state="variable")  # as Environment.compile_expression
        node = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("chunk after expression", parser.stream.current.lineno)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error in '{expr}': {exc.message}") from None
    except RecursionError:
        raise TemplateError(f"'{expr}' is nested too deeply") from None
    if _tree_depth(node) > MAX_DEPTH:
        raise TemplateError(f"'{expr}' is nested more than {MAX_DEPTH} levels deep")
    return node


def _bracket_depth(expr: str) -> int:
    """How deeply brackets nest, outside string literals (checked before parsing: the
    parser recurses per level, and a hundred levels exhaust Python's stack)."""
    depth = deepest = 0
    quote = ""
    escaped = False
    for ch in expr:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest


def _tree_depth(root: nodes.Node) -> int:
    deepest, todo = 0, [(root, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


def problem(expr: str) -> str | None:
    """What is wrong with `expr` before any data is seen (syntax, depth, unsafe names)."""
    if not expr:
        return "empty expression"
    if len(expr) > MAX_EXPRESSION:
        return f"expression is longer than {MAX_EXPRESSION} characters"
    try:
        tree = parse(expr)
    except TemplateError as exc:
        return str(exc)
    kinds = (nodes.Getattr, nodes.Getitem, nodes.Name, nodes.Filter, nodes.Test)
    for node in (tree, *tree.find_all(kinds)):  # find_all yields descendants only
        if not isinstance(node, kinds):
            continue
        if isinstance(node, nodes.Filter | nodes.Test):
            known = _ENV.filters if isinstance(node, nodes.Filter) else _ENV.tests
            if node.name not in known:
                kind = "filter" if isinstance(node, nodes.Filter) else "test"
                return f"no {kind} named '{node.name}' in '{expr}'"
            continue
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


@lru_cache(maxsize=1024)  # compiled code takes tens of kilobytes an expression
def _compile(expr: str) -> Any:
    found = problem(expr)
    if found:
        raise TemplateError(found)
    try:
        return _ENV.compile_expression(expr, undefined_to_none=False)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"syntax error in '{expr}': {exc.message}") from None
    except (RecursionError, MemoryError, SyntaxError):
        raise TemplateError(f"'{expr}' is nested too deeply") from None


class Clock:
    """CPU time one expression may use, and all of one request's together (compiling
    counted in the total, not in an expression's own time)."""

    def __init__(self, limit_ms: float | None = None, total_ms: float | None = None) -> None:
        self.limit_ms = limit_ms
        self.total_ms = total_ms
        self.used_ms = 0.0

    def check(self, expr: str, seconds: float, compiling: float = 0.0) -> None:
        ms = seconds * 1000
        self.used_ms += ms + compiling * 1000
        if self.limit_ms is not None and ms > self.limit_ms:
            raise TemplateError(
                f"{quoted(expr)} took {ms:.1f} ms; the limit is {self.limit_ms:g} ms "
                "([limits] template_ms)"
            )
        if self.total_ms is not None and self.used_ms > self.total_ms:
            raise TemplateError(
                f"the expressions took {self.used_ms:.0f} ms together, compiling them "
                f"included; the limit is {self.total_ms:g} ms (10 x [limits] template_ms)"
            )


def evaluate(expr: str, scope: dict[str, Any], clock: Clock | None = None) -> Any:
    """Evaluate one expression; undefined names and sandbox violations raise TemplateError."""
    expr = expr.strip()
    compiled = time.process_time()
    fn = _compile(expr)
    began = time.process_time()
    try:
        value = fn(**scope)
    except UndefinedError as exc:
        raise TemplateError(f"undefined in '{expr}': {scrub(exc.message or '')}") from None
    except SecurityError as exc:
        raise TemplateError(f"not allowed in '{expr}': {scrub(str(exc))}") from None
    except (TemplateError, MemoryError):
        raise
    except RecursionError:
        raise TemplateError(f"'{expr}' recursed too deeply") from None
    except Exception as exc:  # a type error in user arithmetic, a bad filter argument, ...
        raise TemplateError(f"cannot evaluate '{expr}': {scrub(str(exc))}") from None
    finally:
        if clock is not None:
            clock.check(expr, time.process_time() - began, began - compiled)
    if isinstance(value, Undefined):
        hint = value._undefined_hint
        if hint is None:
            hint = f"'{value._undefined_name}' is undefined"
        raise TemplateError(f"undefined in '{expr}': {hint}")
    return value


def render_value(value: Any, scope: dict[str, Any], clock: Clock | None = None) -> Any:
    """Render placeholders in every string inside a JSON value."""
    if isinstance(value, str):
        return _render_string(value, scope, clock)
    if isinstance(value, list):
        return [render_value(v, scope, clock) for v in value]
    if isinstance(value, dict):
        return {k: render_value(v, scope, clock) for k, v in value.items()}
    return value


def _render_string(source: str, scope: dict[str, Any], clock: Clock | None) -> Any:
    if "<<" not in source and "{{" not in source:
        return source
    expr = whole(source)
    if expr is not None:  # exactly one placeholder: keep the type
        return plain(evaluate(expr, scope, clock))
    out, pos = [], 0
    for start, end, found in scan(source):
        out.append(source[pos:start])
        out.append(as_text(evaluate(found, scope, clock)))
        pos = end
    out.append(source[pos:])
    return "".join(out)


def truthy(expr: str, scope: dict[str, Any], clock: Clock | None = None) -> bool:
    """Evaluate a branch condition."""
    return bool(evaluate(expr, scope, clock))


def first_true(conditions: list[str], scope: dict[str, Any], clock: Clock | None = None) -> int:
    """The index of the first condition that holds, or -1 when none does."""
    for i, condition in enumerate(conditions):
        if truthy(condition, scope, clock):
            return i
    return -1
