"""One reader of the event log per process, fanning new events out to every live stream.

Each stream used to query the log itself after every commit, so 500 open streams ran 500
queries per commit. Here one task reads what is new once per commit (and every poll
interval, for rows written by other processes) and hands it to the streams that want it:
one workflow's, or all. A stream starts by replaying the log after its Last-Event-ID and
then takes the live events, skipping those it replayed already, so none is missed or sent
twice. Events come in the log's order, which is not id order on PostgreSQL (ids are taken
when a transaction writes, rows become visible when it commits): what was replayed is told
by id, never by comparing ids. A stream that does not keep up (its queue full) is dropped
from the fan-out and goes back to reading the log from its last event, so a stalled client
costs a bounded queue, not memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from sse_starlette import ServerSentEvent

from daemon.models import TERMINAL
from daemon.storage import StorageError
from daemon.storage.base import BaseStore

log = logging.getLogger("stepd.events")

POLL_S = 1.0  # events committed by other processes are noticed this fast
PAGE = 500  # events per read of the log
QUEUE_SIZE = 1000  # live events a stream may fall behind before it reads the log instead
# Each write to a stream costs the loop some 20 us, and 500 streams following every event
# made 500 writes per commit. So after a write a stream waits (streams / WRITES_PER_S)
# seconds before the next, sending what came meanwhile together: all streams together then
# write at most about WRITES_PER_S times a second. Up to 10 streams do not wait, 500
# streams wait 0.1 s; a stream that was quiet sends at once.
WRITES_PER_S = 5000
MIN_PAUSE_S = 0.002  # shorter pauses are not worth it (the loop's timers tick in ms)
# Replayed ids kept to skip them among the first live events: those the hub had not yet
# handed out when the stream subscribed (more than a full queue would drop the stream).
REPLAY_OVERLAP = 4 * QUEUE_SIZE


class Event:
    """One event of the log, framed for Server-Sent Events once, however many streams."""

    __slots__ = ("id", "workflow_id", "type", "_row", "_frames")

    def __init__(self, row: dict[str, Any]) -> None:
        self.id: int = row["id"]
        self.workflow_id: int = row["workflow_id"]
        self.type: str = row["type"]
        self._row = row
        self._frames: dict[bool, bytes] = {}

    @property
    def row(self) -> dict[str, Any]:
        """The event as the store reads it (id, workflow_id, step_id, type, at, data)."""
        return self._row

    def frame(self, named: bool = True) -> bytes:
        """`id:`, `event:` (unless not `named`) and `data:` lines of this event."""
        framed = self._frames.get(named)
        if framed is None:
            row = self._row
            data = {k: row[k] for k in ("id", "workflow_id", "step_id", "type", "at", "data")}
            framed = ServerSentEvent(
                orjson.dumps(data).decode(),
                id=str(self.id),
                event=self.type if named else None,
                sep="\n",
            ).encode()
            self._frames[named] = framed
        return framed


class Subscription:
    """A stream's queue of live events, filled by the hub."""

    __slots__ = ("workflow_id", "queue", "ready", "dropped", "paced")

    def __init__(self, workflow_id: int | None, paced: bool = True) -> None:
        self.workflow_id = workflow_id
        self.paced = paced  # writes to a client (see EventHub.follow)
        self.queue: deque[Event] = deque()
        self.ready = asyncio.Event()
        self.dropped = False  # fell QUEUE_SIZE behind: no more live events

    def take(self) -> list[Event]:
        events = list(self.queue)
        self.queue.clear()
        self.ready.clear()
        return events


class EventHub:
    """Reads new events once for everyone and hands them to the streams that want them."""

    def __init__(
        self,
        store: BaseStore,
        *,
        poll: float = POLL_S,
        queue_size: int = QUEUE_SIZE,
        writes_per_s: float = WRITES_PER_S,
    ) -> None:
        self.store = store
        self.poll = poll
        self.queue_size = queue_size
        self.writes_per_s = writes_per_s
        self.last = 0  # events up to here have been handed out
        # True while no stream is open: the log is not read then, and `last` is brought up
        # to date when the next stream joins (see _join).
        self._behind = False
        self._all: set[Subscription] = set()
        self._by_workflow: dict[int, set[Subscription]] = {}
        self._count = 0  # subscriptions in both
        self._writers = 0  # of them, streams that write to a client (paced)
        self._committed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        store.change_hooks.append(lambda _kind: self._committed.set())

    @property
    def subscribers(self) -> int:
        return self._count

    # -- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start reading, from the newest event (the store must be open)."""
        self._closed = False
        self.last = await self.store.max_event_id()
        self._task = asyncio.create_task(self._run(), name="stepd-event-hub")

    def close(self) -> None:
        """End every stream now (at shutdown: open streams must not hold it up)."""
        self._closed = True
        for sub in self._subscriptions():
            sub.ready.set()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the reader ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await self._committed.wait()
            self._committed.clear()  # a commit from now on wakes the next pass
            try:
                await self._read()
            except StorageError as exc:  # a storage fault: streams wait for the next pass
                log.warning("event streams: reading the event log failed: %s", exc)

    async def _read(self) -> None:
        if not self._count:
            # Nobody to hand events to: read nothing (each commit would cost a query), and
            # let the next stream to join bring `last` up to date.
            self._behind = True
            return
        while True:
            rows = await self.store.events_after(self.last, limit=PAGE)
            if rows:
                self._hand_out(Event(row) for row in rows)
                self.last = rows[-1]["id"]
            if len(rows) < PAGE:
                return
            await asyncio.sleep(0)  # a long backlog must not hold the loop

    def _hand_out(self, events: Iterable[Event]) -> None:
        woken: set[Subscription] = set()
        for event in events:
            for sub in (*self._all, *self._by_workflow.get(event.workflow_id, ())):
                if len(sub.queue) >= self.queue_size:
                    self._unsubscribe(sub)
                    sub.dropped = True
                else:
                    sub.queue.append(event)
                woken.add(sub)
        for sub in woken:
            sub.ready.set()

    # -- streams -------------------------------------------------------------------

    def _subscriptions(self) -> list[Subscription]:
        return [*self._all, *(s for subs in self._by_workflow.values() for s in subs)]

    async def _join(self, workflow_id: int | None, paced: bool = True) -> Subscription:
        """Subscribe, the hub's cursor brought up to the log's end first if it idled."""
        if self._behind and not self._count:
            newest = await self.store.max_event_id()
            # Unless a stream joined meanwhile (the hub hands out from where it read):
            # every event up to `newest` is committed, and the new stream's replay, which
            # starts after it subscribed, reads the log past them.
            # Not max() with the last id: on PostgreSQL the log is read in commit order,
            # where a later event may have a smaller id.
            if not self._count:
                self.last = newest
                self._behind = False
        return self._subscribe(workflow_id, paced)

    def _subscribe(self, workflow_id: int | None, paced: bool = True) -> Subscription:
        sub = Subscription(workflow_id, paced)
        if workflow_id is None:
            self._all.add(sub)
        else:
            self._by_workflow.setdefault(workflow_id, set()).add(sub)
        self._count += 1
        self._writers += paced
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._all if sub.workflow_id is None else self._by_workflow.get(sub.workflow_id)
        if subs is None or sub not in subs:
            return  # dropped already
        subs.remove(sub)
        self._count -= 1
        self._writers -= sub.paced
        if not subs and sub.workflow_id is not None:
            del self._by_workflow[sub.workflow_id]

    async def follow(
        self, after: int, workflow_id: int | None = None, *, paced: bool = True
    ) -> AsyncIterator[list[Event]]:
        """Events after `after`, in batches as they come (of one workflow, or all); a
        workflow's stream ends after its terminal event, or at once if it had ended.
        Without `paced`, batches come as soon as there are events, and the stream does not
        count among those whose number paces the others: for a reader that writes nothing
        to a client (a request waiting for its workflow's outcome)."""
        cursor, loop = after, asyncio.get_running_loop()
        while not self._closed:
            # Subscribe first, then read the log: whatever is committed after the read
            # arrives in the queue, and what both hold is skipped by id.
            sub = await self._join(workflow_id, paced)
            replayed: dict[int, None] = {}  # sent by the replay; the hub may hand them out too
            try:
                while not self._closed:  # replay
                    batch, more = await self._page(cursor, workflow_id)
                    if batch:
                        cursor = batch[-1].id
                        _remember(replayed, batch)
                        yield batch
                        if _ends(batch, workflow_id):
                            return
                    if not more:
                        break
                if workflow_id is not None and await self._has_ended(workflow_id, cursor):
                    return
                sent = float("-inf")
                while not self._closed:  # live
                    if not sub.queue and not sub.dropped:
                        await sub.ready.wait()
                        continue
                    pause = sent + self._writers / self.writes_per_s - loop.time()
                    if paced and pause > MIN_PAUSE_S:
                        await asyncio.sleep(pause)  # events go on queuing meanwhile
                    batch = sub.take()
                    if replayed:
                        batch = _after_replay(batch, replayed)
                    if batch:
                        batch = _through_terminal(batch, workflow_id)
                        cursor = batch[-1].id
                        sent = loop.time()
                        yield batch
                        if _ends(batch, workflow_id):
                            return
                    elif sub.dropped:
                        break  # fell behind: read the log again from `cursor`
            finally:
                self._unsubscribe(sub)

    async def _page(self, cursor: int, workflow_id: int | None) -> tuple[list[Event], bool]:
        """Up to PAGE events from the log after `cursor`, and whether there may be more."""
        rows = await self.store.events_after(cursor, workflow_id=workflow_id, limit=PAGE)
        return _through_terminal([Event(r) for r in rows], workflow_id), len(rows) == PAGE

    async def _has_ended(self, workflow_id: int, cursor: int) -> bool:
        """Whether the workflow is gone or has ended with no event of it after `cursor`
        (its terminal event came before the stream's start)."""
        wf = await self.store.get_workflow(workflow_id)
        if wf is not None and wf.status not in TERMINAL:
            return False
        # Ended (or purged) after the replay's read: what it wrote since is in the log.
        return not await self.store.events_after(cursor, workflow_id=workflow_id, limit=1)


def _remember(replayed: dict[int, None], batch: list[Event]) -> None:
    """Note a replayed batch's ids (the newest REPLAY_OVERLAP of them)."""
    for event in batch:
        replayed[event.id] = None
    while len(replayed) > REPLAY_OVERLAP:
        del replayed[next(iter(replayed))]


def _after_replay(batch: list[Event], replayed: dict[int, None]) -> list[Event]:
    """Of the first live events, those the replay did not send. The hub hands events out
    in the log's order, so the ones the replay sent as well come first: from the first it
    did not send on, all are new (and `replayed` is forgotten)."""
    for i, event in enumerate(batch):
        if event.id not in replayed:
            replayed.clear()
            return batch[i:]
    return []


def _through_terminal(batch: list[Event], workflow_id: int | None) -> list[Event]:
    """The batch up to and including a workflow stream's terminal event."""
    if workflow_id is not None:
        for i, event in enumerate(batch):
            if event.type in TERMINAL:
                return batch[: i + 1]
    return batch


def _ends(batch: list[Event], workflow_id: int | None) -> bool:
    return workflow_id is not None and batch[-1].type in TERMINAL
