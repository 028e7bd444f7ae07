"""Server-Sent Events: the event log over HTTP, replayed from Last-Event-ID, then live.

The events come from the process's one EventHub (daemon/hub.py); sse-starlette frames
them, sends the heartbeats and notices a client that has gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from daemon.errors import BadRequest, NotFound
from daemon.hub import EventHub

HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
RETRY_MS = 2000  # how long a disconnected EventSource waits before it reconnects


def last_event_id(request: Request) -> int:
    """Where a stream resumes: the Last-Event-ID header, or ?after=, else the start."""
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise BadRequest("Last-Event-ID (or ?after=) must be an event id")
    return int(raw)


async def response(
    request: Request, workflow_id: int | None, *, named: bool = True
) -> EventSourceResponse:
    """The SSE response for one workflow's events (404 if unknown), or for all events.
    Without `named`, events carry no `event:` line (EventSource's onmessage gets them all)."""
    after = last_event_id(request)
    hub: EventHub = request.app.state.events
    if workflow_id is not None and await hub.store.get_workflow(workflow_id) is None:
        raise NotFound(f"workflow {workflow_id} not found")
    return stream(hub, after, workflow_id, named=named)


def stream(
    hub: EventHub,
    after: int,
    workflow_id: int | None,
    *,
    named: bool = True,
    heartbeat: float = HEARTBEAT_S,
) -> EventSourceResponse:
    """The events after `after` as an SSE response, with a heartbeat comment every
    `heartbeat` seconds."""

    async def frames() -> AsyncIterator[bytes]:
        yield ServerSentEvent(retry=RETRY_MS, sep="\n").encode()
        async with aclosing(hub.follow(after, workflow_id)) as batches:
            async for batch in batches:
                # One write for all that came at once: with many streams, sends cost most.
                yield b"".join(event.frame(named) for event in batch)

    return EventSourceResponse(
        frames(),
        sep="\n",
        ping=heartbeat,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep="\n"),
    )
