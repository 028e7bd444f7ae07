"""Server-Sent Events: replay the event log from Last-Event-ID, then follow it live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from daemon.errors import BadRequest, NotFound
from daemon.store import Store

TERMINAL = {"completed", "failed", "cancelled"}
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
POLL_S = 1.0  # events committed by other processes are noticed this fast


def format_event(event: dict[str, Any]) -> bytes:
    data = {k: event[k] for k in ("id", "workflow_id", "step_id", "type", "at", "data")}
    return (
        f"id: {event['id']}\nevent: {event['type']}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
    )


async def follow(
    store: Store,
    *,
    after: int,
    workflow_id: int | None = None,
    heartbeat: float = HEARTBEAT_S,
    poll: float = POLL_S,
) -> AsyncIterator[bytes]:
    """Events after `after`, then new ones as they are committed; a workflow's stream ends
    after its terminal event."""
    yield b"retry: 2000\n\n"
    last, idle = after, 0.0
    while True:
        events = await store.events_after(last, workflow_id=workflow_id)
        for event in events:
            last = event["id"]
            yield format_event(event)
            if workflow_id is not None and event["type"] in TERMINAL:
                return
        if events:
            idle = 0.0
            continue
        if workflow_id is not None:
            wf = await store.get_workflow(workflow_id)
            if wf is None or wf.status in TERMINAL:  # ended before `after`, or purged
                return
        wait = min(poll, heartbeat - idle)
        if await store.wait_for_change(wait):
            continue
        idle += wait
        if idle >= heartbeat:
            yield b": heartbeat\n\n"
            idle = 0.0


def last_event_id(request: Request) -> int:
    """Where a stream resumes: the Last-Event-ID header, or ?after=, else the start."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise BadRequest("Last-Event-ID (or ?after=) must be an event id")
    return int(raw)


async def response(request: Request, store: Store, workflow_id: int | None) -> StreamingResponse:
    """The SSE response for one workflow's events (404 if unknown), or for all events."""
    after = last_event_id(request)
    if workflow_id is not None and await store.get_workflow(workflow_id) is None:
        raise NotFound(f"workflow {workflow_id} not found")
    return StreamingResponse(
        follow(store, after=after, workflow_id=workflow_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
