"""Placeholders in strings (`<<expr>>` and `{{expr}}`), and values as JSON or text.

Shared by the daemon, which reads the simplest expressions itself, and the sandbox
process, which evaluates all the others (daemon/evaluator.py).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
DELIMITERS = (("<<", ">>"), ("{{", "}}"))
INLINE_PARSE = 65_536  # bytes of JSON parsed on the event loop; larger in a thread
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class TemplateError(Exception):
    """An expression failed: bad syntax, an undefined name, a sandbox violation, or a limit."""


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


def expressions(value: Any) -> Iterator[str]:
    """The expressions of every placeholder inside a JSON value."""
    if isinstance(value, str):
        if "<<" in value or "{{" in value:
            yield from placeholders(value)
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from expressions(v)


def whole(text: str) -> str | None:
    """The expression when `text` is exactly one placeholder (its value keeps its type)."""
    found = list(scan(text))
    if len(found) == 1 and found[0][0] == 0 and found[0][1] == len(text):
        return found[0][2]
    return None


def plain(value: Any) -> Any:
    """Tuples and other sequences an expression may give, as JSON types."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TemplateError(f"expression gave a {type(value).__name__}, which is not JSON")


def as_text(value: Any) -> str:
    """A value inside a longer string: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(plain(value)).decode()
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        raise TemplateError(f"cannot write the value as JSON text: {exc}") from None


def quoted(expr: str, limit: int = 120) -> str:
    """An expression in quotes for an error message, cut to `limit` characters."""
    return f"'{expr}'" if len(expr) <= limit else f"'{expr[: limit - 3]}...'"


async def parse_off_loop(data: str | bytes, parse: Callable[[Any], T] = orjson.loads) -> T:
    """`parse(data)`, on the event loop up to INLINE_PARSE, else in a thread: a megabyte of
    small JSON items takes tens of milliseconds to parse (orjson keeps the GIL meanwhile,
    but the loop runs between the thread's switch intervals)."""
    return await off_loop_if_large(len(data), lambda: parse(data))


async def off_loop_if_large(size: int, work: Callable[[], T]) -> T:
    """`work()` (parsing `size` bytes of JSON), on the loop up to INLINE_PARSE, else in a
    thread (see parse_off_loop)."""
    if size <= INLINE_PARSE:
        return work()
    return await asyncio.to_thread(work)


def scrub(message: str) -> str:
    """An error message without object addresses (they tell an attacker about memory)."""
    return _ADDRESS.sub("", message)


def truncate_json(value: Any, limit: int = 200) -> str:
    """A value as JSON text for an error message, cut to `limit` characters."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = scrub(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."
