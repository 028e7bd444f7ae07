"""Group commit (daemon/storage/sqlite/batcher.py) and the executor's hand-off of due steps.

Writes queued together share one transaction and one fsync; each still succeeds
or fails on its own, and none is acknowledged before its COMMIT.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.models import Finish, NewStep, StepStatus, WorkflowStatus
from daemon.storage import StorageError, StorageUnavailable
from daemon.storage.sqlite.store import SqliteStore as Store
from tests.helpers import wait_for

ECHO = NewStep(state="start", name="start", tool="echo", seq=1)


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(tmp_path / "s.db")
    await s.open()
    yield s
    await s.close()


def count_rows(path: Path, table: str) -> int:
    """Counted through a separate connection: only committed rows are visible to it."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


async def create(store: Store, name: str = "w") -> int:
    created = await store.create_workflow(
        name=name, flow_json="{}", input_json="{}", created_by="t", first=ECHO
    )
    return created.id


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_concurrent_writes_share_transactions_and_are_all_committed(store: Store):
    batches: list[int] = []
    store.commit_hooks.append(lambda seconds, size: batches.append(size))
    ids = await asyncio.gather(*(create(store, f"w{i}") for i in range(300)))
    assert len(set(ids)) == 300
    assert count_rows(store.path, "workflows") == 300  # visible to another connection
    assert sum(batches) == 300
    assert len(batches) < 300 and max(batches) > 1  # fewer commits than writes


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_an_acknowledged_write_is_already_committed(store: Store):
    wf_id = await create(store)
    db = sqlite3.connect(store.path)
    try:
        assert db.execute("SELECT id FROM workflows WHERE id = ?", (wf_id,)).fetchone()
    finally:
        db.close()


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_failing_write_is_rolled_back_alone(store: Store):
    def insert_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO cursors (name, event_id) VALUES ('doomed', 1)")
        raise ValueError("this write fails")

    def insert(name: str):
        return lambda db: (
            db.execute("INSERT INTO cursors (name, event_id) VALUES (?, 1)", (name,)).rowcount
        )

    results = await asyncio.gather(
        store._write(insert("before")),
        store._write(insert_then_fail),
        store._write(insert("after")),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], ValueError)
    db = sqlite3.connect(store.path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM cursors")}
    finally:
        db.close()
    assert {"before", "after"} <= names and "doomed" not in names


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_failed_commit_fails_every_write_in_it_and_keeps_none(store: Store):
    await create(store)
    (pages,) = await store._write(lambda db: db.execute("PRAGMA page_count").fetchone())
    await store._write(lambda db: db.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    big = "x" * 100_000  # needs new pages: the transaction cannot be stored

    async def create_big(i: int) -> int:
        created = await store.create_workflow(
            name=f"big{i}", flow_json="{}", input_json=f'"{big}"', created_by="t", first=ECHO
        )
        return created.id

    results = await asyncio.gather(*(create_big(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, StorageUnavailable) for r in results), results
    assert count_rows(store.path, "workflows") == 1
    await store._write(lambda db: db.execute("PRAGMA max_page_count = 1073741823").fetchone())
    assert await create_big(99) > 0  # the writer carries on once space is back
    assert count_rows(store.path, "workflows") == 2


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_write_cancelled_before_its_turn_never_runs(store: Store):
    ran: list[str] = []

    def op(db: sqlite3.Connection) -> None:
        ran.append("ran")

    # Queue two writes, and cancel the second's caller before the writer task runs.
    first = asyncio.create_task(store._write(lambda db: None))
    doomed = asyncio.create_task(store._write(op))
    await asyncio.sleep(0)  # both are queued now; the writer has not run yet
    doomed.cancel()
    await first
    await asyncio.gather(doomed, return_exceptions=True)
    await create(store)  # a later write still works, and the skipped one never ran
    assert ran == []


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_close_commits_what_is_queued(tmp_path: Path):
    store = Store(tmp_path / "c.db")
    await store.open()
    pending = [asyncio.create_task(create(store, f"w{i}")) for i in range(20)]
    await asyncio.sleep(0)
    await store.close()
    ids = [await t for t in pending]
    assert len(ids) == 20 and count_rows(tmp_path / "c.db", "workflows") == 20


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_write_waits_for_another_process_holding_the_lock(store: Store):
    # Another connection holds the write lock for a moment: the write waits (off the
    # loop, which keeps serving reads) and then succeeds.
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    pending = asyncio.create_task(create(store))
    await asyncio.sleep(0.2)
    assert not pending.done()
    assert await store.list_workflows() == []  # reads go on meanwhile
    other.execute("COMMIT")
    other.close()
    assert await asyncio.wait_for(pending, 5) > 0


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_write_cancelled_while_begin_waits_for_the_lock_never_runs(store: Store):
    ran: list[str] = []

    def op(db: sqlite3.Connection) -> None:
        ran.append("ran")

    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    doomed = asyncio.create_task(store._write(op))
    await asyncio.sleep(0.2)  # the writer is in BEGIN, waiting for the other connection
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    other.execute("COMMIT")
    other.close()
    await create(store)
    assert ran == []


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_odd_failures_of_one_write_do_not_stop_the_writer(store: Store):
    def stop_iteration(db: sqlite3.Connection) -> None:
        next(iter(()))  # StopIteration cannot be set on a future as it is

    def commits_itself(db: sqlite3.Connection) -> None:
        db.execute("COMMIT")

    with pytest.raises(RuntimeError, match="StopIteration"):
        await store._write(stop_iteration)
    with pytest.raises(StorageError, match="ended the shared transaction"):
        await store._write(commits_itself)

    def broken_hook(seconds: float, size: int) -> None:
        raise ValueError("hook")

    store.commit_hooks.append(broken_hook)
    assert await create(store) > 0
    store.commit_hooks.remove(broken_hook)
    assert await create(store) > 0
    assert count_rows(store.path, "workflows") == 2


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_blocking_write_runs_off_the_loop_in_the_shared_transaction(store: Store):
    import threading

    threads: dict[str, str] = {}

    def record(kind: str):
        def op(db: sqlite3.Connection) -> int:
            threads[kind] = threading.current_thread().name
            db.execute("INSERT INTO cursors (name, event_id) VALUES (?, 1)", (kind,))
            return 1

        return op

    sizes: list[int] = []
    store.commit_hooks.append(lambda seconds, size: sizes.append(size))
    results = await asyncio.gather(
        store._write(record("quick")), store._write(record("slow"), blocking=True)
    )
    assert results == [1, 1] and sizes == [2]  # one transaction for both
    assert threads["quick"] == threading.current_thread().name  # the loop's
    assert threads["slow"].startswith("stepd-commit")
    assert count_rows(store.path, "cursors") == 2


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_writes_from_threads_are_refused_once_closed(tmp_path: Path):
    store = Store(tmp_path / "x.db")
    await store.open()
    await store.close()
    with pytest.raises(StorageError):
        await create(store)


# -- hand-off ------------------------------------------------------------------------


def claimed_ids(store: Store) -> list[int]:
    """From now on, the ids of every step the executor claims (instead of a hand-off)."""
    claims: list[int] = []
    original = store.claim_steps

    async def counting_claim(limit: int, **kw: Any):
        got = await original(limit, **kw)
        claims.extend(s.id for s in got)
        return got

    store.claim_steps = counting_claim  # type: ignore[method-assign]
    return claims


async def test_due_steps_are_handed_off_without_a_claim(make_client):
    client, app = await make_client()
    store = app.state.store
    claims = claimed_ids(store)
    body = {"name": "two", "flow": {
        "start": {"tool": "echo", "args": {"n": 1}, "next": "b"},
        "b": {"tool": "echo", "args": {"prev": "<<steps.start.result.n>>"}, "done": True},
    }}  # fmt: skip
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    assert [s["attempt"] for s in wf["steps"]] == [1, 1]
    assert claims == []  # both steps started straight from the transaction that wrote them
    events = [e["type"] for e in await store.events(wf["id"])]
    assert events.count("step_started") == 2


async def test_the_step_after_an_approved_gate_is_handed_off(make_client):
    client, app = await make_client()
    store = app.state.store
    claims = claimed_ids(store)
    body = {"name": "gated", "flow": {
        "start": {"tool": None, "next": "b"},
        "b": {"tool": "echo", "args": {"ok": "<<result.ok>>"}, "done": True},
    }}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "ready")
    gate = wf["steps"][0]["id"]
    assert (await client.post(f"/api/workflow/{gate}/ready", json={"ok": 1})).status_code == 200
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["steps"][1]["result_json"] == '{"ok":1}'
    assert claims == []


async def test_a_cancelled_create_whose_write_committed_still_runs_its_step(make_client):
    client, app = await make_client(lease_s=60.0)
    engine, store = app.state.engine, app.state.store
    body = {"name": "c", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    for _ in range(10):
        task = asyncio.create_task(engine.create(body, created_by="james"))
        for _ in range(3):  # let the write get queued (and maybe committed) first
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.5)
    # Whatever was written runs now, not after the 60 s lease of a step nobody runs.
    listed = await store.list_workflows(limit=100)
    assert listed, "no create was written at all: the test needs another timing"
    for wf in listed:
        assert (await wait_for(client, wf.id, timeout=2))["status"] == "completed"
    assert app.state.executor.running == 0


async def test_hand_off_respects_the_concurrency_limit(make_client):
    client, app = await make_client(concurrency=2, max_running_per_token=2)
    peak = 0
    body = {"name": "s", "flow": {"start": {"tool": "sleep", "args": {"seconds": 0.2},
                                            "next": "b"},
                                  "b": {"tool": "sleep", "args": {"seconds": 0.1},
                                        "done": True}}}  # fmt: skip
    ids = [(await client.post("/api/workflow", json=body)).json()["id"] for _ in range(6)]
    done = 0
    while done < len(ids):
        peak = max(peak, app.state.executor.running)
        done = 0
        for wf_id in ids:
            wf = (await client.get(f"/api/workflow/{wf_id}")).json()
            running = sum(s["status"] == "running" for s in wf["steps"])
            assert running <= 1
            done += wf["status"] == "completed"
        await asyncio.sleep(0.02)
    assert peak == 2


async def test_a_chain_of_hand_offs_does_not_starve_a_queued_step(make_client):
    # One slot. A long chain keeps handing its slot to its next step; a workflow created
    # meanwhile is queued (no free slot) and must run next, not after the whole chain.
    client, _ = await make_client(concurrency=1)
    n = 30
    chain: dict[str, Any] = {
        f"s{i}": {"tool": "sleep", "args": {"seconds": 0.02}, "next": f"s{i + 1}"} for i in range(n)
    }
    chain["start"] = chain.pop("s0")
    chain[f"s{n - 1}"] = {"tool": "sleep", "args": {"seconds": 0.02}, "done": True}
    long_id = (await client.post("/api/workflow", json={"name": "long", "flow": chain})).json()
    await asyncio.sleep(0.1)
    short = {"name": "short", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    short_id = (await client.post("/api/workflow", json=short)).json()["id"]
    long_wf = await wait_for(client, long_id["id"], timeout=30)
    short_wf = await wait_for(client, short_id, timeout=30)
    started = short_wf["steps"][0]["started_at"]
    before = [s for s in long_wf["steps"] if s["started_at"] <= started]
    # Queued behind the step running when it was created, and at most the one after it
    # (written in the same millisecond): nowhere near the whole chain.
    assert len(before) <= len(long_wf["steps"]) // 3, (len(before), len(long_wf["steps"]))
    assert long_wf["status"] == short_wf["status"] == "completed"


@pytest.mark.sqlite_only  # SQLite's group commit
async def test_a_writer_cancelled_during_commit_reports_what_committed(store: Store):
    # The COMMIT goes through in its thread while the writer task is cancelled (loop
    # teardown): its callers learn the truth, and later writes fail instead of hanging.
    batcher = store._writes
    real_commit = batcher._commit

    def slow_commit() -> None:
        time.sleep(0.2)
        real_commit()

    batcher._commit = slow_commit
    write = asyncio.create_task(create(store, "committed"))
    await asyncio.sleep(0.05)  # in its COMMIT now
    batcher._task.cancel()
    wf_id = await write
    assert count_rows(store.path, "workflows") == 1 and wf_id > 0
    with pytest.raises(StorageError):
        await asyncio.wait_for(create(store, "later"), 2)


async def test_an_outcome_is_not_retried_forever_once_the_store_is_closed(make_client):
    client, app = await make_client()
    executor, store = app.state.executor, app.state.store
    body = {"name": "g", "flow": {"start": {"tool": None, "done": True}}}
    wf = await wait_for(
        client,
        (await client.post("/api/workflow", json=body)).json()["id"],
        lambda w: w["steps"][0]["awaiting"] == "ready",
    )
    step = await store.get_step(wf["steps"][0]["id"])
    await store.close()
    fin = Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                 status=StepStatus.DONE, workflow_status=WorkflowStatus.COMPLETED)  # fmt: skip
    assert await asyncio.wait_for(executor._record(step, fin), 2) == (None, None)
    await store.open()  # for the fixture's shutdown
