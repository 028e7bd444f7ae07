"""A definition's input_schema, used without side effects and in bounded time.

Inputs are checked by jsonschema-rs (JSON Schema 2020-12 in Rust):
- its regular expressions cannot backtrack catastrophically (the `regex` crate runs in
  linear time; look-arounds go through fancy-regex with a backtracking limit), where
  Python's `re` took 11 s for `"pattern": "^(a+)+$"` against 27 a's and a `!`, holding the
  event loop and every thread, since the match never releases the interpreter lock;
- a `$ref` resolves within the schema only (its `$defs`, its own `$id`s): the retriever
  refuses every URL and file, so a schema cannot make the daemon fetch an address outside
  the egress policy or read a local file and quote it in a 422. A reference that does not
  resolve makes the schema unusable, said when it is saved (422) and again if a run still
  meets one.
The schema itself is checked against the 2020-12 meta-schema first (`meta_problem`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import orjson


class UnusableSchema(Exception):
    """The schema cannot check anything: a reference that does not resolve, or a pattern
    the regular expression engine refuses."""


def _refuse(uri: str) -> Any:
    raise UnusableSchema(f"$ref '{uri[:200]}' does not resolve: references resolve within "
                         "the schema only (its $defs), never to a URL or a file")  # fmt: skip


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> Any:
    try:
        return jsonschema_rs.Draft202012Validator(orjson.loads(text), retriever=_refuse)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        text = str(exc)
        if "does not resolve" in text:  # our retriever's refusal, wrapped: say it plainly
            text = "$ref " + text.split("$ref ", 1)[1] if "$ref " in text else text
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UnusableSchema(first[:400]) from None


def meta_problem(schema: Any) -> str | None:
    """Where and how `schema` breaks the 2020-12 meta-schema (" at <path>: <message>"), or
    None when it is a valid JSON Schema."""
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        where = "/".join(str(p) for p in exc.instance_path)
        return f"{' at ' + where if where else ''}: {exc.message[:300]}"
    except jsonschema_rs.ReferencingError as exc:  # an unknown $schema
        return f": {str(exc).splitlines()[0][:300]}"
    return None


def validator(schema: Any) -> Any:
    """The compiled schema (cached by its JSON text); UnusableSchema when it cannot be used."""
    return _compiled(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())


def iter_errors(schema: Any, value: Any) -> Iterator[tuple[str, str]]:
    """(where, message) of each way `value` breaks the schema; UnusableSchema when the
    schema cannot be used."""
    try:
        for error in validator(schema).iter_errors(value):
            where = "/".join(str(p) for p in error.instance_path)
            yield where, error.message
    except jsonschema_rs.ValidationError as exc:  # a regex that hit its backtracking limit
        raise UnusableSchema(str(exc).splitlines()[0][:400]) from None


def unusable(schema: Any) -> str | None:
    """Why a (valid) schema cannot be used; None when it can."""
    try:
        validator(schema)
    except UnusableSchema as exc:
        return str(exc)
    return None
