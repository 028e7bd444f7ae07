"""How a workflow stands for someone waiting on it: ended, waiting for the world, or neither
yet. Synchronous execution (`POST /api/workflow?wait=`, `/api/workflows/{ref}/execute`)
waits here until the first two, or its deadline.

Waiting costs no polling. A waiter learns of its workflow's progress from the event log:
through the process's EventHub when given one (one read of the log per commit for every
stream and waiter together, each waiter woken only by events of its own workflow), else by
reading its workflow's new events after each commit (one small indexed query per waiter per
commit). Only the workflow's own events lead to reading its row and steps, and not all of
them: a batch that ends with a tool starting cannot leave the workflow waiting. While a
call step waits for its child workflow, the child's events are followed as well: the run
waits for the world when the child (or a child of its own) does.
(The workflow's `updated_at` is no such signal: a wait state or an interrupted step starts
waiting without touching the workflow's row.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from daemon.hub import EventHub
from daemon.models import TERMINAL, Step, StepStatus, Workflow
from daemon.storage.base import BaseStore

# A step waiting for a person ("ready": a gate; "decision": an interrupted step to retry or
# fail), a signal or a timer.
WAITS_FOR_WORLD = frozenset({"ready", "decision", "signal", "timer"})
# A step waiting for what runs under it (a parallel's or map's branches, a call's child
# workflow): it waits for the world only if what it runs does.
WAITS_INSIDE = frozenset({"branches", "child"})
OPEN = frozenset({StepStatus.PENDING, StepStatus.RUNNING})
PAGE = 500  # events per read of the log (without a hub)
SAFETY_POLL_S = 5.0  # without a hub: look at the log this often even if no commit was told
MAX_CALL_LEVELS = 6  # a run and the children of its calls (calls nest at most 5 deep)


@dataclass(frozen=True)
class Outcome:
    """Where a workflow stands: `status` is its end (completed, failed, cancelled),
    "waiting" (every open step waits for a person, a signal or a timer, and no tool runs or
    is queued, in it or in the children its call steps wait for), or "timeout" (none of
    these by the deadline). `awaiting`: the steps that wait, when waiting (a child's
    carry its workflow_id)."""

    status: str
    workflow: Workflow | None  # as last read (None: not read, when its end event told)
    awaiting: list[Step] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def awaiting_json(self) -> list[dict[str, Any]]:
        """The waiting steps as the API shows them: their id (to approve a gate or send its
        decision), state name, what they wait for and their workflow (the run's own, or a
        child's of a call state)."""
        return [
            {
                "step_id": s.id,
                "state": s.state,
                "awaiting": s.awaiting,
                "workflow_id": s.workflow_id,
            }
            for s in self.awaiting
        ]


def waiting_steps(steps: Sequence[Step]) -> list[Step] | None:
    """The steps waiting for a person, a signal or a timer, if every open step of the
    workflow does so (or waits for what runs under it); else None. A call step counts as
    waiting here: whether its child waits is for the caller to find out."""
    waiting: list[Step] = []
    for step in steps:
        if step.status not in OPEN:
            continue
        if step.status != StepStatus.RUNNING:
            return None  # queued (a tool, a retry, a step held by a pause, a woken wait)
        if step.awaiting in WAITS_FOR_WORLD or step.awaiting == "child":
            waiting.append(step)
        elif step.awaiting not in WAITS_INSIDE:
            return None  # a tool runs (or a wait or parallel is about to start waiting)
    return waiting or None


def may_wait(events: Sequence[dict[str, Any]]) -> bool:
    """Whether, after these events of one workflow (oldest first), it may wait for the
    world: not when the last is a tool step starting (it runs, and whatever it does next
    writes another event)."""
    return not events or events[-1]["type"] != "step_started"


class Watch:
    """Reads one workflow's standing, as cheaply as its latest events allow. The children
    its call steps wait for count: it waits for the world only if they do, and `children`
    collects their ids, whose events may change its standing too."""

    def __init__(self, store: BaseStore, workflow_id: int) -> None:
        self.store = store
        self.workflow_id = workflow_id
        self.workflow: Workflow | None = None  # as last read
        self.children: set[int] = set()  # of call steps it (or a child) waited for

    async def check(
        self, events: Sequence[dict[str, Any]] | None = None, *, child: bool = False
    ) -> Outcome | None:
        """The outcome if the workflow ended or waits for the world, else None. `events`:
        its events since the last check (None: look at everything), or with `child` those
        of one of its children."""
        if events is not None:
            ended = [e["type"] for e in events if e["type"] in TERMINAL]
            if ended and not child:
                # Its status is the event's; the workflow is read by whoever needs it.
                return Outcome(ended[0], None)
            if not may_wait(events):
                return None
        wf = await self.store.get_workflow(self.workflow_id)
        self.workflow = wf
        if wf is None or wf.status in TERMINAL:
            return _end(wf)
        if wf.public_status != "running":
            return None  # paused or queued: nothing moves until it is resumed or dequeued
        waiting = await self._waiting(self.workflow_id, 0)
        return None if waiting is None else Outcome("waiting", wf, waiting)

    async def _waiting(self, workflow_id: int, level: int) -> list[Step] | None:
        """What the workflow waits at, through its call steps' children; None while
        something in it runs or is due."""
        found = waiting_steps(await self.store.steps(workflow_id))
        if found is None:
            return None
        out: list[Step] = []
        for step in found:
            if step.awaiting != "child":
                out.append(step)
                continue
            if step.child_id is None or level + 1 >= MAX_CALL_LEVELS:
                return None  # its child is being started
            self.children.add(step.child_id)
            child = await self.store.get_workflow(step.child_id)
            if child is None or child.public_status != "running":
                return None  # ended (its call step is about to move on), paused or queued
            inner = await self._waiting(step.child_id, level + 1)
            if inner is None:
                return None
            out += inner
        return out or None

    async def last(self) -> Outcome:
        """At the deadline: ended after all (a last look at the workflow), or "timeout"."""
        self.workflow = await self.store.get_workflow(self.workflow_id)
        if self.workflow is None or self.workflow.status in TERMINAL:
            return _end(self.workflow)
        return Outcome("timeout", self.workflow)


def _end(wf: Workflow | None) -> Outcome:
    # A workflow purged while watched ended long ago; say so rather than wait for nothing.
    return Outcome(wf.status if wf is not None else "cancelled", wf)


class Feed:
    """The news of a workflow and of the children it comes to wait for, in one queue of
    (workflow id, batch of events); a batch of None: that workflow's news ended (it ended,
    or the daemon is stopping)."""

    def __init__(self, store: BaseStore, hub: EventHub | None, *, paced: bool = False) -> None:
        self.store, self.hub, self.paced = store, hub, paced
        self.queue: asyncio.Queue[tuple[int, list[dict[str, Any]] | None]] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def follow(self, workflow_id: int, after: int = 0) -> None:
        if workflow_id not in self._tasks:
            self._tasks[workflow_id] = asyncio.create_task(self._pump(workflow_id, after))

    async def _pump(self, workflow_id: int, after: int) -> None:
        try:
            feed = news(self.store, workflow_id, after, hub=self.hub, paced=self.paced)
            async with aclosing(feed) as batches:
                async for batch in batches:
                    self.queue.put_nowait((workflow_id, batch))
        finally:
            self.queue.put_nowait((workflow_id, None))

    async def next(self) -> tuple[int, list[dict[str, Any]] | None]:
        return await self.queue.get()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


@contextlib.asynccontextmanager
async def feed(
    store: BaseStore, hub: EventHub | None, *, paced: bool = False
) -> AsyncIterator[Feed]:
    f = Feed(store, hub, paced=paced)
    try:
        yield f
    finally:
        await f.close()


async def settle(
    store: BaseStore, workflow_id: int, timeout_s: float, *, hub: EventHub | None = None
) -> Outcome:
    """Wait until the workflow ends or waits for the world, or `timeout_s` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    watch = Watch(store, workflow_id)
    async with feed(store, hub) as news_:
        # Its log from the start: what it did before is looked at as what it does next (a
        # new workflow's log is a few events; no read of where the log ends is needed).
        news_.follow(workflow_id)
        while (remaining := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    of, batch = await news_.next()
            except TimeoutError:
                break
            if batch is None:
                if of != workflow_id:
                    continue
                # Its stream ended: it ended (or was purged) with its last events read
                # before, or the daemon is stopping.
                return await watch.check() or await watch.last()
            outcome = await watch.check(batch, child=of != workflow_id)
            if outcome is not None:
                return outcome
            for child in watch.children:
                news_.follow(child)
    return await watch.last()


async def unless_gone(
    receive: Callable[[], Awaitable[dict[str, Any]]], waiting: Awaitable[Outcome]
) -> Outcome | None:
    """`waiting`'s outcome, or None once the client that asked for it has gone (its
    request's ASGI `receive`, its body read, gives http.disconnect): a request that
    waits up to 300 s holds nothing after its client hung up."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    settled = asyncio.ensure_future(waiting)
    hung_up = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((settled, hung_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (settled, hung_up):
            task.cancel()
        await asyncio.gather(settled, hung_up, return_exceptions=True)
    return settled.result() if settled.done() and not settled.cancelled() else None


async def news(
    store: BaseStore,
    workflow_id: int,
    after: int,
    *,
    hub: EventHub | None = None,
    paced: bool = False,
) -> AsyncIterator[list[dict[str, Any]]]:
    """The workflow's events after event `after` (in the log's order), in batches as
    they are committed; ends after its terminal event. `paced`: through the hub, as an
    event stream to a client is (see EventHub.follow)."""
    if hub is not None:
        async with aclosing(hub.follow(after, workflow_id, paced=paced)) as batches:
            async for batch in batches:
                yield [e.row for e in batch]
        return
    async with _commits(store) as committed:
        cursor = after
        while True:
            committed.clear()  # before the read: a commit from now on wakes the next
            rows = await store.events_after(cursor, workflow_id=workflow_id, limit=PAGE)
            if rows:
                cursor = rows[-1]["id"]
                for i, row in enumerate(rows):
                    if row["type"] in TERMINAL:
                        yield rows[: i + 1]
                        return
                yield rows
                if len(rows) == PAGE:
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAFETY_POLL_S):
                    await committed.wait()


@contextlib.asynccontextmanager
async def _commits(store: BaseStore) -> AsyncIterator[asyncio.Event]:
    """An event set after every commit of this process, or that another daemon told of."""
    committed = asyncio.Event()
    hook: Callable[[str], None] = lambda _kind: committed.set()  # noqa: E731
    store.change_hooks.append(hook)
    try:
        yield committed
    finally:
        store.change_hooks.remove(hook)
