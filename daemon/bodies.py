"""Request bodies: read within limits, parsed as JSON with every check a client's JSON
needs (duplicate keys, 64-bit integers, depth, NUL characters). Used by the API, the web
pages' forms and the one-click links alike."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from starlette.requests import Request

from daemon.errors import BadRequest, PayloadTooLarge, Unavailable, UnsupportedMediaType
from daemon.limits import MAX_BODY_DEPTH
from daemon.placeholders import parse_off_loop

BODIES_IN_MEMORY = 64  # request bodies of max_body_bytes being received at once, at most
# 19 digits in a row: the shortest integer that may lie outside the 64-bit range
# (-2**63 .. 2**64 - 1) has as many; a shorter run of digits cannot hide one.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


async def read_json(request: Request, *, optional: bool = False) -> Any:
    """The request body as JSON, size-checked while reading; None for an empty optional body."""
    limit: int = request.app.state.config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}")
    body = await read_body(request, limit)
    if not body.strip():
        if optional:
            return None
        raise BadRequest("request body is empty; expected a JSON object")
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json (got '{ctype or 'none'}')"
        )
    return await parse_body(body)


async def read_body(request: Request, limit: int) -> bytes:
    """A request's body, up to `limit` bytes (413 past it). The bodies being read count
    together against BODIES_IN_MEMORY x max_body_bytes (503 past it): a thousand clients
    each stalling near the end of a large body must not take a gigabyte."""
    state = request.app.state
    budget = BODIES_IN_MEMORY * state.config.max_body_bytes
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            state.body_bytes += len(chunk)
            if len(body) > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            if state.body_bytes > budget:
                raise Unavailable("too many request bodies are being received at once; "
                                  "nothing was changed, retry later")  # fmt: skip
    finally:
        state.body_bytes -= len(body)
    return bytes(body)


async def parse_body(body: bytes) -> Any:
    """parse_json, in a thread for a large body: its duplicate-key and 64-bit checks call
    Python for every item, ~100 ms for a megabyte of small items."""
    return await parse_off_loop(body, parse_json)


def parse_json(body: bytes) -> Any:
    """JSON from a client, with every check: what fails them is a 400 (BadRequest)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    members = _check_values(value)  # first: bounds the depth the stdlib parser recurses to
    # orjson keeps the last of duplicate keys, and turns integers beyond 64 bits into
    # floats. The stdlib re-parse that catches both calls Python for every item, so it
    # runs only when the parse could have hidden one: every member of an object in the
    # text has a ':' of its own, so if the parsed objects hold as many members as the
    # body has ':' characters (some may be inside strings), none was lost to a duplicate.
    if members != body.count(b":") or _LONG_DIGITS.search(body) is not None:
        _check_syntax(body)
    return value


def _check_syntax(body: bytes) -> None:
    """What orjson lets through: duplicate keys (it keeps the last) and integers beyond
    64 bits (it turns them into floats). Both would store something else than was sent."""

    def pairs(items: list[tuple[str, Any]]) -> None:
        seen = set()
        for key, _ in items:
            if key in seen:
                raise BadRequest(f"duplicate key '{key[:50]}' in a JSON object")
            seen.add(key)

    def parse_int(text: str) -> int:
        value = int(text)
        if not -(1 << 63) <= value < (1 << 64):
            raise BadRequest(f"integer {text[:30]}... does not fit in 64 bits")
        return value

    json.loads(body, object_pairs_hook=pairs, parse_int=parse_int)


def _check_values(value: Any) -> int:
    """Reject bodies nested deeper than MAX_BODY_DEPTH, and strings with NUL characters
    (C-string tools and logs would cut them short). Returns how many members the
    objects in `value` have together."""
    level: list[Any] = [value]
    members = 0
    for _ in range(MAX_BODY_DEPTH + 1):
        nxt: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                members += len(v)
                nxt.extend(v.values())
                nxt.extend(v.keys())
            elif isinstance(v, list):
                nxt.extend(v)
            elif isinstance(v, str) and "\x00" in v:
                raise BadRequest("strings must not contain NUL (\\u0000) characters")
        if not nxt:
            return members
        level = nxt
    raise BadRequest(f"JSON is nested more than {MAX_BODY_DEPTH} levels deep")
