"""The Definitions pages: the list of saved definitions, and one definition with its
versions, a diff between two of them, its flow as a graph, its runs, its schedules
(daemon/web/schedpages.py), a Run form made from its input schema, and (for `workflow`
tokens) deploy, arm, rollback and status forms.

The pages read through the engine (`engine.defs`), never over HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from daemon.errors import NotFound
from daemon.ids import MAX_ID
from daemon.web import graph, runform
from daemon.web.pages import ENV, can, engine_of, not_found, render, signed_in
from daemon.web.session import Session

LIST_PAGE = 50  # definitions shown at once
RUNS_PAGE = 20  # runs shown on a definition's page at once
STATUSES = ("draft", "active", "paused", "archived")
RUN_STATUSES = ("queued", "running", "paused", "completed", "failed", "cancelled")
MAX_TAG = 100
MAX_OFFSET = 1_000_000
MAX_OPS = 200  # diff operations shown (each value cut at PRETTY_LIMIT)


def to_ms(value: Any) -> int | None:
    """An ISO 8601 time of the definitions API (or epoch ms) as epoch ms, for `m.when`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


ENV.filters["ms"] = to_ms


def defs_of(request: Request) -> Any:
    """The engine's definitions service."""
    return engine_of(request).defs


def number(raw: str | None, *, limit: int = MAX_OFFSET) -> int | None:
    """A small non-negative integer from a query parameter, or None."""
    if raw and raw.isascii() and raw.isdigit() and len(raw) <= 9 and int(raw) <= limit:
        return int(raw)
    return None


def valid_ref(ref: str) -> bool:
    """A definition's id (digits, within the id range) or name (1..200 characters)."""
    if ref.isascii() and ref.isdigit():
        return len(ref) < 20 and int(ref) <= MAX_ID
    return 0 < len(ref) <= 200


def plain(definition: dict[str, Any]) -> dict[str, Any]:
    """A definition as the service gives it, its tags as a list (they come as stored JSON)."""
    tags = as_dict(definition.get("tags"))
    return {**definition, "tags": [str(t) for t in tags] if isinstance(tags, list) else []}


def as_dict(value: Any) -> Any:
    """A stored JSON value (text, bytes or an orjson Fragment) as Python values."""
    if isinstance(value, orjson.Fragment):
        return orjson.loads(orjson.dumps(value))
    if isinstance(value, str | bytes):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return value


# -- the list ---------------------------------------------------------------------------------


@signed_in
async def definitions_page(request: Request, session: Session) -> Response:
    """Saved definitions, filtered by status and tag, LIST_PAGE at a time."""
    query = request.query_params
    status = query.get("status") if query.get("status") in STATUSES else None
    tag = (query.get("tag") or "").strip()[:MAX_TAG] or None
    offset = number(query.get("offset")) or 0
    page = await defs_of(request).list(
        status=status, tag=tag, trigger_type=None, limit=LIST_PAGE, offset=offset
    )
    items, total = [plain(d) for d in page["workflows"]], page["total"]

    def link(**changes: Any) -> str:
        params = {"status": status, "tag": tag, "offset": offset or None, **changes}
        kept = {k: v for k, v in params.items() if v not in (None, "", 0)}
        return "/ui/definitions" + (f"?{urlencode(kept)}" if kept else "")

    return await render(
        request,
        "definitions.html",
        session,
        items=items,
        total=total,
        statuses=STATUSES,
        filter_status=status,
        filter_tag=tag,
        offset=offset,
        link=link,
        newer=link(offset=max(offset - LIST_PAGE, 0)) if offset else None,
        older=link(offset=offset + LIST_PAGE) if offset + LIST_PAGE < total else None,
    )


# -- one definition ---------------------------------------------------------------------------


def pick_version(raw: str | None, numbers: list[int], default: int) -> int:
    chosen = number(raw, limit=MAX_ID)
    return chosen if chosen in numbers else default


async def diff_of(
    request: Request, ref: str, numbers: list[int]
) -> tuple[int | None, int | None, dict[str, Any] | None]:
    """The two versions compared (by default the one before the latest and the latest)
    and their diff; (None, None, None) with a single version."""
    if len(numbers) < 2:
        return None, None, None
    v1 = pick_version(request.query_params.get("v1"), numbers, numbers[1])
    v2 = pick_version(request.query_params.get("v2"), numbers, numbers[0])
    return v1, v2, await defs_of(request).diff(ref, v1, v2)


def op_rows(diff: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The RFC 6902 operations as rows to show: op, path, from, the value as text."""
    rows = []
    for op in ((diff or {}).get("diff") or [])[:MAX_OPS]:
        if not isinstance(op, dict):
            continue
        rows.append({
            "op": str(op.get("op", "")),
            "path": str(op.get("path", "")),
            "from": op.get("from"),
            "has_value": "value" in op,
            "value": op.get("value"),
        })  # fmt: skip
    return rows


def hide_secrets(definition: dict[str, Any], allowed: bool) -> dict[str, Any]:
    """Never a webhook id or secret to a token without `workflow` permission, whatever the
    service answered."""
    hook = definition.get("webhook")
    if not allowed and isinstance(hook, dict):
        shown = {k: v for k, v in hook.items() if k not in ("webhook_id", "webhook_secret")}
        definition = {**definition, "webhook": shown}
    return definition


async def gather(request: Request, ref: str, write: bool) -> dict[str, Any]:
    """What a definition's page shows: the definition, its versions, the diff asked for,
    the chosen version's body and flow, a page of its runs. NotFound when it is gone."""
    defs, query = defs_of(request), request.query_params
    definition = plain(hide_secrets(await defs.get(ref, reveal=write), write))
    ref = str(definition["id"])  # a name may be changed meanwhile: the id stays
    versions = (await defs.versions(ref))["versions"]
    numbers = [v["version"] for v in versions]
    v1, v2, diff = await diff_of(request, ref, numbers)
    shown = pick_version(query.get("version"), numbers, definition["version"])
    chosen = definition if shown == definition["version"] else await defs.version(ref, shown)
    run_status = query.get("runs") if query.get("runs") in RUN_STATUSES else None
    runs_offset = number(query.get("runs_offset")) or 0
    runs = await defs.runs(ref, status=run_status, limit=RUNS_PAGE, offset=runs_offset)
    body = as_dict(chosen["definition"]) or {}
    ops = (diff or {}).get("diff") or []
    return {
        "d": definition,
        "versions": versions,
        "shown": shown,
        "body": body,
        "graph": graph.build(chosen["flow"], [], "none") if chosen["flow"] else None,
        "v1": v1,
        "v2": v2,
        "diff": diff,
        "ops": op_rows(diff),
        "ops_hidden": max(len(ops) - MAX_OPS, 0),
        "runs": runs["runs"],
        "runs_total": runs["total"],
        "run_status": run_status,
        "runs_offset": runs_offset,
        "fields": runform.fields(body.get("input_schema")),
    }


@signed_in
async def definition_page(request: Request, session: Session) -> Response:
    """One definition: versions, a diff, the chosen version's flow, runs, the forms."""
    ref = request.path_params["ref"]
    if not valid_ref(ref):
        return await not_found(request, session, "There is no such definition.")
    write = can(session, "workflow")
    last_event = await engine_of(request).store.max_event_id()  # first: see workflow_page
    try:
        context = await gather(request, ref, write)
        context |= await schedpages.section(request, context["d"]["id"])
    except NotFound:
        return await not_found(request, session, "There is no such definition.")
    return await render(
        request,
        "definition.html",
        session,
        can_write=write,
        run_statuses=RUN_STATUSES,
        runs_page=RUNS_PAGE,
        statuses=STATUSES,
        last_event=last_event,
        **context,
    )


from daemon.web import schedpages  # noqa: E402 - it uses this module's helpers

ROUTES: list[BaseRoute] = [
    Route("/definitions", definitions_page, methods=["GET"]),
    Route("/definitions/{ref:str}", definition_page, methods=["GET"]),
]
