"""Races between hand-offs, claims, cancels and stop() under group commit.

CommitHold keeps the writer's COMMIT waiting, so that chosen writes end up in the
same transaction and their callers resume in the order the batch resolves them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from tests import race_tools as rt
from tests.helpers import wait_for

TOOLS = ("daemon.tools.demo", "tests.sample_tools", "tests.race_tools")
# These races exist where writes share a group-committed transaction: SQLite's batcher.
# PostgreSQL runs each write in a transaction of its own.
pytestmark = pytest.mark.sqlite_only


async def store_steps(path: Any, wf_id: int) -> list[dict[str, Any]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM steps WHERE workflow_id = ? ORDER BY id", (wf_id,))
        return [dict(r) for r in rows]
    finally:
        db.close()


class CommitHold:
    """Hold the batcher's next COMMIT until released, so later writes queue up together."""

    def __init__(self, store: Any) -> None:
        self.batcher = store._writes
        self.open = asyncio.Event()
        self.open.set()
        orig = self.batcher._in_thread

        async def held(fn: Any, *args: Any) -> Any:
            if getattr(fn, "__name__", "") == "_commit":
                await self.open.wait()
            return await orig(fn, *args)

        self.batcher._in_thread = held

    async def hold(self, store: Any) -> asyncio.Task:
        self.open.clear()
        t = asyncio.create_task(store._write(lambda db: None))
        await asyncio.sleep(0.05)  # that dummy write sits in COMMIT now
        return t

    def names(self) -> list[str]:
        return [op.__qualname__ for op, *_ in self.batcher._queue]

    async def queued(self, n: int, name: str = "") -> None:
        for _ in range(400):
            if sum(name in q for q in self.names()) >= n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"queue={self.names()}")


@pytest.fixture(autouse=True)
def _reset():
    rt.GATES.clear()
    rt.CALLS.clear()


async def test_a_cancel_committed_with_a_hand_off_stops_the_next_step(make_client):
    client, app = await make_client(tool_modules=TOOLS)
    store, engine = app.state.store, app.state.engine
    body = {
        "name": "c",
        "flow": {
            "start": {"tool": "hold", "args": {"name": "a"}, "next": "b"},
            "b": {"tool": "record", "args": {"label": "b"}, "done": True},
        },
    }
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    await wait_for(client, wf_id, lambda w: "hold:a" in rt.CALLS)
    h = CommitHold(store)
    dummy = await h.hold(store)
    rt.gate("a").set()  # step 'start' finishes: its finish (+ hand-off of b) queues
    await h.queued(1, "finish_and_start")
    cancel = asyncio.create_task(engine.cancel(wf_id, by="james"))
    await h.queued(1, "cancel_workflow")  # finish and cancel will share the next transaction
    h.open.set()
    await dummy
    await cancel  # the cancel is acknowledged (HTTP 200 equivalent)
    await asyncio.sleep(0.3)
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "cancelled"
    assert "record:b" not in rt.CALLS, "b's tool ran after its workflow's cancel was acknowledged"


async def test_a_cancel_committed_with_a_decision_hand_off_frees_its_slot(make_client):
    client, app = await make_client(tool_modules=TOOLS, concurrency=1)
    store, engine, ex = app.state.store, app.state.engine, app.state.executor
    token = ex.config.tokens[0]
    body = {
        "name": "g",
        "flow": {
            "start": {"tool": None, "next": "b"},
            "b": {"tool": "record", "args": {"label": "b"}, "done": True},
        },
    }
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "ready")
    gate_id = wf["steps"][0]["id"]
    h = CommitHold(store)
    dummy = await h.hold(store)
    approve = asyncio.create_task(engine.approve(gate_id, None, token=token))
    await h.queued(1, "decide")
    cancel = asyncio.create_task(engine.cancel(wf_id, by="james"))
    await h.queued(1, "cancel_workflow")
    h.open.set()
    await dummy
    assert (await approve)[0] == 200  # the approval and the cancel share one transaction
    await cancel
    await asyncio.sleep(0.3)
    # A later workflow needs the (only) slot
    body2 = {"name": "e", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    wf2 = (await client.post("/api/workflow", json=body2)).json()["id"]
    status = (await wait_for(client, wf2, timeout=3))["status"]
    assert ex.running == 0, f"slot leaked: {ex._tasks}"
    assert status == "completed", status


async def test_a_claim_and_a_cancel_in_one_transaction_free_the_slot(make_client):
    client, app = await make_client(tool_modules=TOOLS, concurrency=1, poll_interval=60.0)
    store, engine, ex = app.state.store, app.state.engine, app.state.executor
    busy = {"name": "h", "flow": {"start": {"tool": "hold", "args": {"name": "a"}, "done": True}}}
    busy_id = (await client.post("/api/workflow", json=busy)).json()["id"]
    await wait_for(client, busy_id, lambda w: "hold:a" in rt.CALLS)
    # the only slot is taken: this workflow's first step is queued as pending
    body = {
        "name": "r",
        "flow": {"start": {"tool": "record", "args": {"label": "x"}, "done": True}},
    }
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    permits = asyncio.Semaphore(0)
    orig = store._writes._in_thread

    async def held(fn, *args):
        if getattr(fn, "__name__", "") == "_commit":
            await permits.acquire()
        return await orig(fn, *args)

    store._writes._in_thread = held
    h = CommitHold.__new__(CommitHold)
    h.batcher = store._writes
    d1 = asyncio.create_task(store._write(lambda db: None))
    await asyncio.sleep(0.05)  # batch 1 = [d1], held
    rt.gate("a").set()
    await h.queued(1, "finish_and_start")  # A's finish waits for batch 2
    permits.release()  # batch 1 commits; batch 2 = [finish] starts, held
    await d1
    d2 = asyncio.create_task(store._write(lambda db: None))  # will be batch 3
    permits.release()  # batch 2 commits -> slot frees -> tick -> claim
    await h.queued(1, "claim_steps")
    cancel = asyncio.create_task(engine.cancel(wf_id, by="james"))
    await h.queued(1, "cancel_workflow")  # batch 4 = [claim, cancel]
    for _ in range(5):
        permits.release()
    store._writes._in_thread = orig
    await d2
    await cancel
    await asyncio.sleep(0.3)
    assert ex.running == 0, f"slot leaked: {list(ex._tasks)}"


async def finish_behind_a_held_commit(
    client: Any, store: Any, next_tool: str
) -> tuple[int, CommitHold, asyncio.Task]:
    """A workflow whose step 'start' has finished and whose finish (handing off 'b', a
    `next_tool` step) waits behind a held COMMIT: (workflow id, the hold, its dummy write)."""
    body = {
        "name": "s",
        "flow": {
            "start": {"tool": "hold", "args": {"name": "a"}, "next": "b"},
            "b": {"tool": next_tool, "args": {"label": "b"}, "done": True},
        },
    }
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    await wait_for(client, wf_id, lambda w: "hold:a" in rt.CALLS)
    h = CommitHold(store)
    dummy = await h.hold(store)
    rt.gate("a").set()
    await h.queued(1, "finish_and_start")
    return wf_id, h, dummy


async def test_a_step_handed_off_during_stop_gets_the_grace(make_client):
    client, app = await make_client(tool_modules=TOOLS, shutdown_grace=5.0)
    store, ex = app.state.store, app.state.executor
    # The finish (handing off b) is queued before stop begins.
    wf_id, h, dummy = await finish_behind_a_held_commit(client, store, "slow_once")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = asyncio.create_task(ex.stop())
    await asyncio.sleep(0.05)
    h.open.set()
    await dummy
    await stop
    took = loop.time() - t0
    steps = await store.steps(wf_id)
    b = steps[1]
    assert took > 0.5 and b.status == "done", (
        f"b was cancelled after {took:.2f}s of a 5s grace: {b.status} awaiting={b.awaiting}"
    )


async def test_a_step_written_running_after_the_grace_is_given_back_unstarted(make_client):
    client, app = await make_client(tool_modules=TOOLS, shutdown_grace=0.1)
    store, ex = app.state.store, app.state.executor
    wf_id, h, dummy = await finish_behind_a_held_commit(client, store, "record_once")
    stop = asyncio.create_task(ex.stop())  # grace 0.1 s passes while the commit is slow
    try:
        for _ in range(200):  # until stop() has cancelled 'start' (its write goes on)
            if ex._grace_over and ex.running == 0:
                break
            await asyncio.sleep(0.01)
        assert ex._grace_over
    finally:
        h.open.set()
    await dummy
    await stop
    await store.close()
    steps = await store_steps(store.path, wf_id)
    assert steps[1]["status"] == "pending" and steps[1]["attempt"] == 0, steps
    assert "record_once:b" not in rt.CALLS
    # After a restart it runs once, as its first attempt: no decision asked of anyone.
    client2, app2 = await make_client(tool_modules=TOOLS)
    wf = await wait_for(client2, wf_id)
    assert wf["status"] == "completed" and wf["steps"][1]["attempt"] == 1
    assert rt.CALLS.count("record_once:b") == 1


@pytest.mark.timeout(60)
async def test_stop_waits_for_a_hand_off_however_long_its_commit_takes(make_client):
    # A create reserved a run slot; its COMMIT takes longer than the 5 s stop() used to
    # wait. The step must still run (it was acknowledged), not be left written as running
    # for the next start to treat as interrupted.
    client, app = await make_client(tool_modules=TOOLS, shutdown_grace=0.1)
    store, ex, engine = app.state.store, app.state.executor, app.state.engine
    body = {"name": "s", "flow": {"start": {"tool": "record_once", "args": {"label": "a"},
                                            "done": True}}}  # fmt: skip
    h = CommitHold(store)
    dummy = await h.hold(store)
    create = asyncio.create_task(engine.create(body, created_by="james"))
    await h.queued(1, "create_workflow")
    assert ex._reserved == 1
    stop = asyncio.create_task(ex.stop())
    try:
        await asyncio.sleep(5.3)
        assert not stop.done()  # still waiting for the reservation
    finally:
        h.open.set()
    created = await create
    await dummy
    await asyncio.wait_for(stop, 10)
    await store.close()
    steps = await store_steps(store.path, created.id)
    assert [(s["status"], s["attempt"]) for s in steps] == [("done", 1)]
    assert rt.CALLS == ["record_once:a"]


async def test_reservations_during_a_claim_keep_within_concurrency(make_client):
    client, app = await make_client(
        tool_modules=TOOLS, concurrency=2, max_running_per_token=2, poll_interval=60.0
    )
    store, engine, ex = app.state.store, app.state.engine, app.state.executor

    def wf(gate: str) -> dict:
        return {
            "name": gate,
            "flow": {"start": {"tool": "hold", "args": {"name": gate}, "done": True}},
        }

    for g in ("a1", "a2"):
        await client.post("/api/workflow", json=wf(g))  # handed off: both slots taken
    for g in ("b", "b", "b"):
        await client.post("/api/workflow", json=wf(g))  # backlog: pending
    await asyncio.sleep(0.1)
    assert ex.running == 2
    permits = asyncio.Semaphore(0)
    orig = store._writes._in_thread

    async def held(fn, *args):
        if getattr(fn, "__name__", "") == "_commit":
            await permits.acquire()
        return await orig(fn, *args)

    store._writes._in_thread = held
    h = CommitHold.__new__(CommitHold)
    h.batcher = store._writes
    d1 = asyncio.create_task(store._write(lambda db: None))
    await asyncio.sleep(0.05)
    rt.gate("a1").set()
    rt.gate("a2").set()
    await h.queued(2, "finish_and_start")
    permits.release()
    await d1  # batch 2 = the two finishes, held
    d2 = asyncio.create_task(store._write(lambda db: None))  # batch 3, held next
    permits.release()  # finishes commit: slots free, tick
    await h.queued(1, "claim_steps")  # claim(2) waits behind d2
    create = asyncio.create_task(engine.create(wf("c"), created_by="james"))
    await h.queued(1, "create_workflow")  # reserved a slot meanwhile
    for _ in range(10):
        permits.release()
    store._writes._in_thread = orig
    await d2
    await create
    await asyncio.sleep(0.2)
    db_running = 0
    for w in await store.list_workflows(limit=50):
        db_running += sum(s.status == "running" for s in await store.steps(w.id))
    for g in ("b", "c"):
        rt.gate(g).set()
    assert ex.running <= 2, f"{ex.running} steps run with concurrency = 2"
