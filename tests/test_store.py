"""The store on real databases: schema, ids, compare-and-set transitions, recovery, plans
(the tests marked sqlite_only are about the SQLite store itself)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from daemon.models import Finish, NewStep, StepStatus, WorkflowStatus
from daemon.storage import StorageError, now_ms
from daemon.storage.base import load_queries
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import migrations, split_statements
from tests import backend
from tests.helpers import wait_for

ECHO = NewStep(state="start", name="start", tool="echo", seq=1)
GATE = NewStep(state="start", name="gate", tool=None, seq=1)


@pytest.fixture
async def store(tmp_path: Path):
    s = backend.open_store(tmp_path / "s.db")  # the backend under test (SqliteStore here)
    await s.open()
    yield s
    await s.close()


async def create(store: Store, first: NewStep = ECHO, **kw) -> int:
    created = await store.create_workflow(
        name="w", flow_json="{}", input_json="{}", created_by="t", first=first, **kw
    )
    return created.id


@pytest.mark.sqlite_only  # the SQLite store itself
def test_every_query_block_loads():
    text = (Path(__file__).parents[1] / "daemon/storage/sqlite/queries.sql").read_text()
    names = [line[3:-3] for line in text.splitlines() if line.startswith("-- ") and
             line.endswith(" --")]  # fmt: skip
    assert sorted(Store.Q) == sorted(names)
    assert all(sql and not sql.startswith("--") for sql in Store.Q.values())
    assert load_queries("-- a --\n-- what\nSELECT 1;\n\n-- b --\n-- why\nSELECT 2;") == {
        "a": "SELECT 1;",
        "b": "SELECT 2;",
    }


@pytest.mark.sqlite_only  # the SQLite store itself
def test_split_statements():
    assert split_statements("CREATE TABLE a (x);\n-- note\nCREATE TABLE b (y);\n") == [
        "CREATE TABLE a (x);",
        "-- note\nCREATE TABLE b (y);",
    ]
    with pytest.raises(ValueError):
        split_statements("CREATE TABLE a (x")


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_pragmas_and_schema_version(store: Store, tmp_path: Path):
    assert await store.schema_version() == migrations()[-1][0]
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert await store._write(lambda db: db.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
    # Readers wait for a busy database; the writer never blocks the loop (sqlite/batcher.py).
    assert (await store._one("PRAGMA busy_timeout", {}))[0] == 5000
    assert await store._write(lambda db: db.execute("PRAGMA busy_timeout").fetchone()[0]) == 0


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path):
    s = Store(tmp_path / "s.db")
    await s.open()
    wf_id = await create(s)
    await s.close()
    schema = (
        sqlite3.connect(tmp_path / "s.db")
        .execute("SELECT sql FROM sqlite_master ORDER BY name")
        .fetchall()
    )
    s = Store(tmp_path / "s.db")
    await s.open()
    assert (await s.get_workflow(wf_id)) is not None
    assert await s.schema_version() == migrations()[-1][0]
    new_id = await create(s)
    assert new_id > wf_id  # ids keep increasing across restarts
    await s.close()
    after = (
        sqlite3.connect(tmp_path / "s.db")
        .execute("SELECT sql FROM sqlite_master ORDER BY name")
        .fetchall()
    )
    assert schema == after


async def test_ids_are_unique_and_increasing_under_concurrent_creation(client):
    body = {"name": "c", "flow": {"start": {"tool": None, "done": True}}}
    responses = await asyncio.gather(*(client.post("/api/workflow", json=body)
                                       for _ in range(300)))  # fmt: skip
    ids = [r.json()["id"] for r in responses]
    assert all(r.status_code == 201 for r in responses)
    assert len(set(ids)) == 300
    listed = (await client.get("/api/workflow?limit=1000")).json()
    assert [w["id"] for w in listed] == sorted(ids, reverse=True)
    # Steps share the id space: no step id equals a workflow id.
    steps = set()
    for wf_id in ids[:20]:
        wf = (await client.get(f"/api/workflow/{wf_id}")).json()
        steps.update(s["id"] for s in wf["steps"])
    assert not steps & set(ids)


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_ids_look_like_millisecond_epochs(store: Store):
    import time

    before = int(time.time() * 1000)
    wf_id = await create(store)
    assert before <= wf_id <= int(time.time() * 1000) + 1000


async def test_stale_attempt_cannot_overwrite_a_newer_one(store: Store):
    wf_id = await create(store)
    (step,) = await store.claim_steps(10)
    assert step.attempt == 1
    assert await store.requeue(step, "test")
    (again,) = await store.claim_steps(10)
    assert again.attempt == 2
    stale = Finish(step_id=step.id, workflow_id=wf_id, attempt=1, status=StepStatus.DONE,
                   result_json='"old"', workflow_status=WorkflowStatus.COMPLETED)  # fmt: skip
    assert await store.finish_step(stale) is None
    wf = await store.get_workflow(wf_id)
    assert wf is not None and wf.status == "running"
    fresh = Finish(step_id=step.id, workflow_id=wf_id, attempt=2, status=StepStatus.DONE,
                   result_json='"new"', workflow_status=WorkflowStatus.COMPLETED)  # fmt: skip
    assert await store.finish_step(fresh) == 0
    (row,) = await store.steps(wf_id)
    assert row.result_json == '"new"' and row.status == "done"
    assert (await store.get_workflow(wf_id)).status == "completed"  # type: ignore[union-attr]


async def test_finish_and_next_step_are_one_transaction(store: Store):
    wf_id = await create(store)
    (step,) = await store.claim_steps(10)
    nxt = NewStep(state="b", name="b", tool="echo", seq=2)
    fin = Finish(step_id=step.id, workflow_id=wf_id, attempt=1, status=StepStatus.DONE,
                 result_json="1", next_step=nxt)  # fmt: skip
    next_id = await store.finish_step(fin)
    assert next_id and next_id > step.id
    # Writing the same outcome again changes nothing: no duplicated transition.
    assert await store.finish_step(fin) is None
    steps = await store.steps(wf_id)
    assert [(s.state, s.status, s.seq) for s in steps] == [
        ("start", "done", 1),
        ("b", "pending", 2),
    ]


async def test_a_failing_write_leaves_nothing_half_done(store: Store):
    wf_id = await create(store)
    (step,) = await store.claim_steps(10)
    # A next step whose insert violates a constraint (NOT NULL name) rolls back the finish too.
    bad = NewStep(state="b", name=None, tool="echo", seq=2)  # type: ignore[arg-type]
    fin = Finish(step_id=step.id, workflow_id=wf_id, attempt=1, status=StepStatus.DONE,
                 result_json="1", next_step=bad)  # fmt: skip
    with pytest.raises(StorageError):
        await store.finish_step(fin)
    (row,) = await store.steps(wf_id)
    assert row.status == "running" and row.result_json is None


async def test_gates_wait_and_are_not_claimed(store: Store):
    wf_id = await create(store, GATE)
    assert await store.claim_steps(10) == []
    (gate,) = await store.steps(wf_id)
    assert gate.status == "running" and gate.awaiting == "ready" and gate.attempt == 1


async def test_leases_find_interrupted_tool_steps_only(store: Store):
    tool_wf = await create(store)
    gate_wf = await create(store, GATE)
    t0 = now_ms() + 10
    (claimed,) = await store.claim_steps(10, lease_ms=1000, now=t0)
    assert claimed.tool == "echo"
    assert await store.interrupted(limit=10, now=t0 + 999) == []  # lease still running
    await store.renew_leases([claimed], t0 + 4000)
    assert await store.interrupted(limit=10, now=t0 + 3999) == []
    (found,) = await store.interrupted(limit=10, now=t0 + 4001)
    assert found.id == claimed.id  # the gate has no lease and is never "interrupted"
    assert await store.requeue(found, "lease expired")
    (step,) = await store.steps(tool_wf)
    assert step.status == "pending"
    (gate,) = await store.steps(gate_wf)
    assert gate.status == "running" and gate.awaiting == "ready"
    (again,) = await store.claim_steps(10)
    assert again.attempt == 2
    events = [e["type"] for e in await store.events(tool_wf)]
    assert events == ["created", "step_started", "step_requeued", "step_started"]


async def test_idempotency_key_replays_and_detects_reuse(store: Store):
    a = await store.create_workflow(
        name="w",
        flow_json="{}",
        input_json="{}",
        created_by="t",
        first=ECHO,
        idempotency_key="k",
        request_hash="h1",
    )
    b = await store.create_workflow(
        name="w",
        flow_json="{}",
        input_json="{}",
        created_by="t",
        first=ECHO,
        idempotency_key="k",
        request_hash="h1",
    )
    c = await store.create_workflow(
        name="w",
        flow_json="{}",
        input_json="{}",
        created_by="t",
        first=ECHO,
        idempotency_key="k",
        request_hash="h2",
    )
    d = await store.create_workflow(
        name="w",
        flow_json="{}",
        input_json="{}",
        created_by="u",
        first=ECHO,
        idempotency_key="k",
        request_hash="h1",
    )
    # fmt: skip
    assert (b.id, b.replayed, b.conflict) == (a.id, True, False)
    assert (c.id, c.conflict) == (a.id, True)
    assert d.id != a.id and not d.replayed


@pytest.mark.sqlite_only  # the SQLite store itself
@pytest.mark.parametrize(
    ("query", "index"),
    [
        (
            "SELECT id FROM steps WHERE status = 'pending' AND run_at <= 1 ORDER BY run_at, id "
            "LIMIT 10",
            "steps_runnable",
        ),
        ("SELECT min(run_at) FROM steps WHERE status = 'pending'", "steps_runnable"),
        ("SELECT * FROM steps WHERE workflow_id = 1 ORDER BY id", "steps_workflow"),
        (
            "SELECT id FROM workflows WHERE status = 'running' AND id < 5 ORDER BY id DESC "
            "LIMIT 50",
            "workflows_status",
        ),
    ],
)
async def test_hot_queries_use_their_indexes(store: Store, tmp_path: Path, query, index):
    db = sqlite3.connect(tmp_path / "s.db")
    plan = " ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + query))
    db.close()
    assert index in plan, plan
    assert "SCAN steps" not in plan and "SCAN workflows" not in plan


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_claim_skips_finished_steps_at_any_volume(store: Store, tmp_path: Path):
    # 20,000 finished steps beside one pending: the partial index holds only the pending one.
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    db.execute("BEGIN")
    db.execute(
        "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at, "
        "updated_at) VALUES (1, 'old', '{}', '{}', 'completed', 0, 0)"
    )
    db.executemany(
        "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at, created_at)"
        " VALUES (?, 1, 's', 's', 'echo', 'done', 1, 0, 0)",
        [(i,) for i in range(2, 20_002)],
    )
    db.execute("COMMIT")
    n_index = db.execute(
        "SELECT count(*) FROM steps INDEXED BY steps_runnable WHERE status = 'pending'"
    ).fetchone()[0]
    db.close()
    assert n_index == 0
    await create(store)
    claimed = await store.claim_steps(10)
    assert len(claimed) == 1 and claimed[0].tool == "echo"


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_foreign_keys_are_enforced(store: Store):
    with pytest.raises(StorageError):
        await store._write(
            lambda db: db.execute(
                "INSERT INTO steps (id, workflow_id, state, name, status, seq, run_at, created_at)"
                " VALUES (1, 999, 's', 's', 'pending', 1, 0, 0)"
            )
        )


async def test_cancel_reports_not_found_and_finished(client):
    body = {"name": "c", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    await wait_for(client, wf_id)
    resp = await client.delete(f"/api/workflow/{wf_id}")
    assert resp.status_code == 409 and "already completed" in resp.json()["error"]
    assert (await client.delete("/api/workflow/42")).status_code == 404


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_a_cancelled_write_does_not_leave_the_connection_in_a_transaction(store: Store):
    # Cancel a create while it waits for its BEGIN: the next writes must still work.
    for _ in range(20):
        task = asyncio.create_task(create(store))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    wf_id = await create(store)
    assert (await store.get_workflow(wf_id)) is not None
    assert store._writer is not None and not store._writer.in_transaction


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_ids_taken_by_another_process_are_skipped(store: Store):
    first = await create(store)
    # Another process writes a workflow and a step with the ids this store would take
    # next (ids are handed out from memory).
    now = now_ms()
    taken = [max(now, first + 1) + i for i in range(3)]
    db = sqlite3.connect(store.path, isolation_level=None)
    try:
        db.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at,"
            " updated_at) VALUES (?, 'outside', '{}', '{}', 'running', 0, 0)",
            (taken[0],),
        )
        db.executemany(
            "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at,"
            " created_at) VALUES (?, ?, 'start', 'start', 'echo', 'done', ?, 0, 0)",
            [(taken[1], taken[0], 1), (taken[2], taken[0], 2)],
        )
    finally:
        db.close()
    second = await create(store, now=now)
    assert second > max(taken)
    steps = await store.steps(second)
    assert len(steps) == 1 and steps[0].id > second


@pytest.mark.sqlite_only  # the SQLite store itself
async def test_a_conflicting_id_while_closing_fails_cleanly(tmp_path: Path):
    store = Store(tmp_path / "s.db")
    await store.open()
    now = now_ms()
    db = sqlite3.connect(store.path, isolation_level=None)  # takes the next id
    try:
        db.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at,"
            " updated_at) VALUES (?, 'outside', '{}', '{}', 'running', 0, 0)",
            (max(now, store._last_id + 1),),
        )
    finally:
        db.close()
    creating = asyncio.create_task(create(store, now=now))
    await asyncio.sleep(0)  # queued; its retry would come after close() began
    results = await asyncio.gather(creating, store.close(), return_exceptions=True)
    assert isinstance(results[0], StorageError), results
