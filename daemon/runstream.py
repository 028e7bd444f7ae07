"""A run's events in the shapes of saved-definition runs (Server-Sent Events), translated
from the workflow's event log:

    step_started    {"run_id", "step_id", "id", "timestamp"}
    step_waiting    {"run_id", "step_id", "id", "awaiting"}   ready|decision|signal|timer
    step_completed  {"run_id", "step_id", "id", "output"}
    step_failed     {"run_id", "step_id", "id", "error"}
    run_completed   {"run_id", "status": "completed", "output", "duration_seconds"}
    run_failed      {"run_id", "status": "failed" | "cancelled", "error"}

`step_id` is the state's name, `id` the step's own (integer) id, which approving a gate
takes. A gate starts (step_started) and waits (step_waiting) at once. Each event carries
the id of the log entry it comes from, so a stream resumes after Last-Event-ID. A run's
stream ends after its end; the stream of a synchronous execution also ends when the run
waits for the world (run_waiting, as the 202 answer of execute) or at its deadline (an
`error` event with error_code EXECUTION_TIMEOUT; the run goes on).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from daemon import events
from daemon.hub import EventHub
from daemon.models import TERMINAL, Workflow
from daemon.outcome import Outcome, Watch, feed
from daemon.storage.base import BaseStore

Out = tuple[str, dict[str, Any]]  # an event's name and data


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds (2026-12-03T15:00:00.123Z)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{ms % 1000:03d}Z"
    )


def run_end(run_id: int, wf: Workflow | None, by: str | None = None) -> Out:
    """run_completed or run_failed for a run that ended."""
    if wf is not None and wf.status == "completed":
        end = wf.completed_at or wf.updated_at
        return "run_completed", {
            "run_id": run_id,
            "status": "completed",
            "output": orjson.Fragment(wf.output_json or "null"),
            "duration_seconds": round((end - wf.created_at) / 1000, 3),
        }
    if wf is None:
        return "run_failed", {"run_id": run_id, "status": "cancelled", "error": "run deleted"}
    error = wf.error
    if error is None and wf.status == "cancelled":
        error = f"cancelled by {by}" if by else "cancelled"
    return "run_failed", {"run_id": run_id, "status": wf.status, "error": error}


def run_waiting(run_id: int, outcome: Outcome) -> Out:
    return "run_waiting", {
        "run_id": run_id,
        "status": "waiting",
        "awaiting": outcome.awaiting_json(),
    }


class Translator:
    """Turns one run's log entries into run events, reading a step when an entry lacks
    what its event shows (a finished step's output, the state of a step first seen)."""

    def __init__(self, store: BaseStore, run_id: int) -> None:
        self.store = store
        self.run_id = run_id
        self.states: dict[int, str] = {}  # step id -> state name
        self.started: dict[int, int | None] = {}  # step id -> the attempt shown started
        self.woken: set[int] = set()  # waiting steps that had their outcome

    async def translate(self, row: dict[str, Any]) -> list[Out]:
        kind, data, step_id = row["type"], row["data"] or {}, row["step_id"]
        if kind in TERMINAL:
            return [
                run_end(self.run_id, await self.store.get_workflow(self.run_id), data.get("by"))
            ]
        if step_id is None:
            return []  # created, paused, resumed, signal_received, intervened, ...
        if kind == "step_done":
            step = await self.store.get_step(step_id)
            if step is None:
                return []
            self.states[step_id] = step.state
            output = orjson.Fragment(step.result_json or "null")
            return [("step_completed", self._step(step_id, output=output))]
        if kind == "step_started":
            if "state" in data:
                self.states[step_id] = data["state"]
            attempt = data.get("attempt")
            if step_id in self.woken or self.started.get(step_id) == attempt:
                self.woken.discard(step_id)
                return []  # a parallel, map, wait or call step taken up again once woken
            self.started[step_id] = attempt
            return [("step_started", await self._at(step_id, timestamp=iso(row["at"])))]
        if kind == "gate_waiting":
            self.states[step_id] = data["state"]
            return [
                ("step_started", self._step(step_id, timestamp=iso(row["at"]))),
                ("step_waiting", self._step(step_id, awaiting="ready")),
            ]
        if kind == "wait_started":
            awaiting = "signal" if data.get("signal") else "timer"
            return [("step_waiting", await self._at(step_id, awaiting=awaiting))]
        if kind == "decision_waiting":
            return [("step_waiting", await self._at(step_id, awaiting="decision"))]
        if kind in ("wait_ended", "branches_joined"):  # its step is taken up again next
            self.woken.add(step_id)
            return []
        if kind == "step_failed":
            return [("step_failed", await self._at(step_id, error=data.get("error")))]
        return []  # step_retrying, step_requeued, branches_started, wait_ended, ...

    def _step(self, step_id: int, **fields: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "step_id": self.states.get(step_id), "id": step_id,
                **fields}  # fmt: skip

    async def _at(self, step_id: int, **fields: Any) -> dict[str, Any]:
        """A step event, the step's state looked up if not seen yet (a resumed stream)."""
        if step_id not in self.states:
            step = await self.store.get_step(step_id)
            if step is not None:
                self.states[step_id] = step.state
        return self._step(step_id, **fields)

    async def frames(self, rows: list[dict[str, Any]]) -> bytes:
        out = []
        for row in rows:
            for name, data in await self.translate(row):
                out.append(frame(name, data, row["id"]))
        return b"".join(out)


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    return ServerSentEvent(
        orjson.dumps(data).decode(),
        id=None if event_id is None else str(event_id),
        event=name,
        sep="\n",
    ).encode()


def sse(frames: AsyncIterator[bytes]) -> EventSourceResponse:
    """An SSE response of these frames, after a retry hint, with heartbeats."""

    async def body() -> AsyncIterator[bytes]:
        yield ServerSentEvent(retry=events.RETRY_MS, sep="\n").encode()
        async with aclosing(frames) as framed:
            async for chunk in framed:
                if chunk:
                    yield chunk

    return EventSourceResponse(
        body(),
        sep="\n",
        ping=events.HEARTBEAT_S,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep="\n"),
    )


def run_stream(request: Request, run_id: int) -> EventSourceResponse:
    """The run's events from the start (or after Last-Event-ID / ?after=) until it ends.
    The caller checks that the run exists."""
    after = events.last_event_id(request)
    hub: EventHub = request.app.state.events
    return sse(_run_frames(hub, run_id, after))


async def _run_frames(hub: EventHub, run_id: int, after: int) -> AsyncIterator[bytes]:
    translator = Translator(hub.store, run_id)
    async with aclosing(hub.follow(after, run_id)) as batches:
        async for batch in batches:
            yield await translator.frames([event.row for event in batch])


async def execute_stream(request: Request, run_id: int, timeout_s: float) -> EventSourceResponse:
    """The events of a run just started, ending with its outcome: its end (run_completed
    or run_failed), run_waiting, or at `timeout_s` an `error` event (EXECUTION_TIMEOUT)."""
    hub: EventHub = request.app.state.events
    deadline = asyncio.get_running_loop().time() + timeout_s
    return sse(_execute_frames(hub, run_id, deadline, timeout_s))


async def _execute_frames(
    hub: EventHub, run_id: int, deadline: float, timeout_s: float
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    translator, watch = Translator(hub.store, run_id), Watch(hub.store, run_id)
    async with feed(hub.store, hub, paced=True) as news:
        news.follow(run_id)
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    of, batch = await news.next()
            except TimeoutError:
                break
            if batch is None:
                if of == run_id:
                    break  # the run ended before its events could be read, or shutdown
                continue
            if of == run_id:  # a child's events only tell that the run may wait now
                yield await translator.frames(batch)
                if any(row["type"] in TERMINAL for row in batch):
                    return
            got = await watch.check(batch, child=of != run_id)
            if got is not None and got.status == "waiting":
                yield frame(*run_waiting(run_id, got))
                return
            for child in watch.children:
                news.follow(child)
    got = await watch.last()
    if got.ended:  # at the deadline, its end not yet in the stream
        yield frame(*run_end(run_id, got.workflow))
        return
    yield frame("error", {
        "type": "error",
        "error_code": "EXECUTION_TIMEOUT",
        "error": f"the run did not finish within {timeout_s:g} s; it goes on",
        "run_id": run_id,
    })  # fmt: skip
