"""Expressions as the daemon sees them: validated at create, plain paths read in-process.

An expression that only names a value (`input.title`, `steps.search.result[0].id`,
`input['a key']`) is read here, in microseconds, with no code run. Every other
expression is evaluated by the sandbox process (daemon/evaluator.py) under CPU and
memory limits, so no expression can hold the event loop or grow the daemon.

What expressions read (input, results) stays the JSON text it is stored as (Scope):
the sandbox gets the text, and the daemon parses it only for plain paths, after an
estimate of what it takes once parsed fits [limits] template_mb.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from daemon import sandbox
from daemon.placeholders import (
    TemplateError,
    expressions,
    off_loop_if_large,
    placeholders,
    scan,
    truncate_json,
    whole,
)

__all__ = ["TemplateError", "check_expression", "expressions", "needs", "placeholders",
           "truncate_json"]  # fmt: skip

_NAME = r"[A-Za-z][A-Za-z0-9_]*"
_STEP = rf"(?:\.(?P<attr>{_NAME})|\.(?P<dot_index>\d+)|\[\s*(?P<index>-?\d+)\s*\]" \
        r"|\[\s*'(?P<sq>[^'\\]*)'\s*\]|\[\s*\"(?P<dq>[^\"\\]*)\"\s*\])"  # fmt: skip
_PATH = re.compile(rf"\s*(?P<root>{_NAME})(?:{_STEP})*\s*")
_STEPS = re.compile(_STEP)
_CONSTANTS = {"true", "false", "none", "True", "False", "None"}  # Jinja literals, not names
_KEYWORDS = {"and", "or", "not", "in", "is", "if", "else"}
_STEPS_REF = re.compile(r"\bsteps\b(?:\s*\.\s*(\w+)|\s*\[\s*(['\"])(.*?)\2\s*\])?")


class Fallback(Exception):
    """A path the daemon does not read itself (a miss Jinja reports in its own words)."""


@lru_cache(maxsize=8192)
def path(expr: str) -> tuple[str, tuple[tuple[str | int, bool], ...]] | None:
    """(root name, (key or index, written as `.name`?) per step) when `expr` is a plain
    path, else None."""
    m = _PATH.fullmatch(expr)
    if m is None or m["root"] in sandbox.RESERVED_NAMES | _CONSTANTS | _KEYWORDS:
        return None
    keys: list[tuple[str | int, bool]] = []
    for step in _STEPS.finditer(expr, m.end("root")):
        if step["attr"] is not None:
            keys.append((step["attr"], True))
        elif step["sq"] is not None or step["dq"] is not None:
            key = step["sq"] if step["sq"] is not None else step["dq"]
            if key.startswith("_"):
                return None  # refused by the sandbox's checks, with their message
            keys.append((key, False))
        else:
            keys.append((int(step["dot_index"] or step["index"]), False))
    return m["root"], tuple(keys)


def read(expr: str, scope: dict[str, Any]) -> Any:
    """The value a plain path names; TemplateError when it is undefined, in the words
    the sandbox would use (Fallback where those depend on more than the path)."""
    found = path(expr)
    assert found is not None
    root, keys = found
    if root not in scope:
        raise TemplateError(f"undefined in '{expr}': '{root}' is undefined")
    value = scope[root]
    for key, dotted in keys:
        if isinstance(value, dict) and isinstance(key, str):
            if key not in value:
                if not dotted:
                    raise Fallback(expr)  # `x['items']` may mean a dict method there
                raise TemplateError(f"undefined in '{expr}': key '{key}' is undefined")
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            raise Fallback(expr)
    return value


def check_expression(expr: str) -> str | None:
    """A problem with `expr` detectable without data (syntax, depth, unsafe names), else None.
    Only expressions within the length limit are cached: the caches are keyed by the text."""
    if len(expr) > sandbox.MAX_EXPRESSION:
        return f"expression is longer than {sandbox.MAX_EXPRESSION} characters"
    return _check(expr)


@lru_cache(maxsize=4096)
def _check(expr: str) -> str | None:
    if path(expr) is not None:
        return None
    return sandbox.problem(expr)


def is_plain(exprs: list[str]) -> bool:
    return all(len(e) <= sandbox.MAX_EXPRESSION and path(e.strip()) is not None for e in exprs)


@dataclass(frozen=True)
class Needs:
    """The scope names some expressions use; `states`: which steps' results (None: all)."""

    names: frozenset[str]
    states: frozenset[str] | None


def needs(exprs: list[str], state_ids: frozenset[str] | set[str]) -> Needs:
    """What a set of expressions may read, found from their text: `steps.X` and
    `steps['X']` with X a state of the flow read only X; any other use of `steps` reads
    every state (a name in a string literal only makes the scope larger, never wrong)."""
    names: set[str] = set()
    states: set[str] | None = set()
    for expr in exprs:
        names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr))
        for m in _STEPS_REF.finditer(expr):
            state = m[1] if m[1] is not None else m[3]
            if state is None or state not in state_ids:
                states = None
            elif states is not None:
                states.add(state)
    return Needs(frozenset(names), None if states is None else frozenset(states))


NO_NEEDS = Needs(frozenset(), frozenset())


def parsed_size(text: str | bytes) -> int:
    """A generous estimate of the memory JSON text takes once parsed: besides its
    characters, about 64 bytes per object or array and 40 per item (a 3-byte `{},` becomes
    a 72-byte dict and its slot). Counting is C speed; parsing to find out is not."""
    if isinstance(text, str):
        text = text.encode()
    return len(text) + 64 * (text.count(b"{") + text.count(b"[")) + 40 * text.count(b",")


class Scope:
    """The names expressions may read, each kept as JSON text until it is needed."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def with_result(self, result_json: str) -> Scope:
        return Scope({**self.texts, "result": result_json})

    def payload(self) -> str:
        """The scope as one JSON object, built from the texts without parsing them."""
        return "{" + ",".join(f'"{name}":{text}' for name, text in self.texts.items()) + "}"

    def size(self) -> int:
        return sum(map(len, self.texts.values()))

    def parsed_size(self) -> int:
        return sum(map(parsed_size, self.texts.values()))

    async def parse(self, limit: int) -> dict[str, Any]:
        """The scope as Python values, refused (TemplateError) when it would take more than
        `limit` bytes; large texts are parsed in a thread."""
        estimate = self.parsed_size()
        if estimate > limit:
            raise TemplateError(
                f"the stored data these expressions read (input and results) would take "
                f"about {estimate // 2**20} MB once parsed; the limit is {limit // 2**20} MB "
                "([limits] template_mb)"
            )
        return await off_loop_if_large(
            self.size(), lambda: {name: orjson.loads(text) for name, text in self.texts.items()}
        )


class Budget:
    """What rendering plain paths in the daemon may cost: a deadline, the size of the
    rendered args as JSON, and copies (a value named twice is copied for the second)."""

    def __init__(self, ms: float, max_bytes: int, max_memory: int) -> None:
        self.deadline = time.thread_time() + ms / 1000  # CPU of the loop: load cannot stretch it
        self.ms = ms
        self.max_bytes = max_bytes
        self.max_memory = max_memory
        self.used = 0
        self.memory = 0
        self._json: dict[int, bytes] = {}  # by id: the value is kept alive by the scope
        self._placed: set[int] = set()  # containers already in the args

    def place(self, value: Any) -> Any:
        """`value` for the args: itself the first time, a copy after (a tool changing one
        argument must not change another)."""
        if not isinstance(value, dict | list):
            return value
        if id(value) not in self._placed:
            self._placed.add(id(value))
            return value
        text = self.json(value)
        self.memory += parsed_size(text)
        if self.memory > self.max_memory:
            raise TemplateError(
                f"copies of the values the args name would take more than "
                f"{self.max_memory // 2**20} MB ([limits] template_mb)"
            )
        return orjson.loads(text)

    def json(self, value: Any) -> bytes:
        key = id(value)
        found = self._json.get(key)
        if found is None:
            found = self._json[key] = orjson.dumps(value)
        return found

    def spend(self, size: int) -> None:
        self.used += size
        if self.used > self.max_bytes:
            raise TemplateError(
                f"the rendered args would be more than {self.max_bytes} bytes as JSON "
                "([limits] template_mb / 8)"
            )
        if time.thread_time() > self.deadline:
            raise TemplateError(f"rendering took more than {self.ms:g} ms ([limits] template_ms)")


def render_plain(value: Any, scope: dict[str, Any], budget: Budget) -> Any:
    """render_value for args whose placeholders are all plain paths, in the daemon."""
    if isinstance(value, str):
        if "<<" not in value and "{{" not in value:
            budget.spend(len(value))
            return value
        expr = whole(value)
        if expr is not None:
            found = read(expr.strip(), scope)
            budget.spend(len(found) if isinstance(found, str) else len(budget.json(found)))
            return budget.place(found)
        out, pos = [], 0
        for start, end, found_expr in scan(value):
            found = read(found_expr.strip(), scope)
            piece = found if isinstance(found, str) else budget.json(found).decode()
            budget.spend(len(piece) + start - pos)
            out.append(value[pos:start])
            out.append(piece)
            pos = end
        out.append(value[pos:])
        return "".join(out)
    if isinstance(value, list):
        return [render_plain(v, scope, budget) for v in value]
    if isinstance(value, dict):
        return {k: render_plain(v, scope, budget) for k, v in value.items()}
    return value


def truthy_plain(expr: str, scope: dict[str, Any]) -> bool:
    return bool(read(expr.strip(), scope))
