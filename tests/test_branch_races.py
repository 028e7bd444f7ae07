"""PostgreSQL runs write transactions side by side (READ COMMITTED); the interleavings
the chaos test found, forced:

- a step that a branch starts while a sibling's failure cancels what runs inside the
  parallel is cancelled with it, whichever transaction commits first (another connection
  holds the workflow row, so the branch's transaction, its step done and its next step
  inserted, waits before it commits; the sibling's failure runs meanwhile);
- a step a claim chose before its workflow's pause committed is not taken;
- a step written while its workflow's pause commits is held.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.models import BranchEnd, Branches, Finish, NewStep, StepStatus
from daemon.storage import now_ms
from tests import backend

pytestmark = pytest.mark.postgresql_only

FLOW = '{"fan": {"parallel": {}}}'


def _in(branch: str, state: str, parent_id: int, seq: int) -> NewStep:
    return NewStep(state=state, name=state, tool="echo", seq=seq, parent_id=parent_id,
                   branch=branch, scope=f'["fan", "{branch}"]')  # fmt: skip


def _waiting(conn: Any, count: int) -> None:
    """Until `count` sessions of the database wait for a lock."""
    deadline = time.monotonic() + 10
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
           " AND datname = current_database()")  # fmt: skip
    while conn.execute(sql).fetchone()[0] < count:
        assert time.monotonic() < deadline, f"not {count} sessions waiting for a lock"
        time.sleep(0.02)


async def test_a_step_a_branch_starts_while_a_sibling_fails_is_cancelled(
    make_store: Any, tmp_path: Path
) -> None:
    import psycopg

    path = tmp_path / "race.db"
    store = make_store(path)
    await store.open()
    t0 = now_ms()
    first = NewStep(state="fan", name="fan", tool=":parallel", seq=1)
    created = await store.create_workflow(name="w", flow_json=FLOW, input_json="{}",
                                          created_by="james", first=first, now=t0)  # fmt: skip
    wf_id = created.id
    (parent,) = await store.claim_steps(10, lease_ms=30_000, now=t0 + 1)
    firsts = {k: _in(k, "start", parent.id, 2) for k in ("a", "c")}
    assert await store.start_branches(parent, Branches([("a", None), ("c", None)], 2, firsts))
    a, c = sorted(await store.claim_steps(10, lease_ms=30_000), key=lambda s: s.branch)
    assert (a.branch, c.branch) == ("a", "c")

    with psycopg.connect(backend.database_url(path), autocommit=True) as watch, \
            psycopg.connect(backend.database_url(path)) as holder:  # fmt: skip
        holder.execute("SELECT 1 FROM workflows WHERE id = %s FOR NO KEY UPDATE", (wf_id,))
        a_done = asyncio.ensure_future(store.finish_step(Finish(
            step_id=a.id, workflow_id=wf_id, attempt=a.attempt, status=StepStatus.DONE,
            result_json="{}", next_step=_in("a", "a_end", parent.id, 3))))  # fmt: skip
        await asyncio.to_thread(_waiting, watch, 1)  # its step is done, its next inserted
        end = BranchEnd(parent_id=parent.id, key="c", ok=False, kind="parallel")
        c_failed = asyncio.ensure_future(store.finish_step(Finish(
            step_id=c.id, workflow_id=wf_id, attempt=c.attempt, status=StepStatus.FAILED,
            error="boom", error_type="ToolError", workflow_error="state 'start' failed: boom",
            branch_end=end)))  # fmt: skip
        await asyncio.to_thread(_waiting, watch, 2)
        holder.rollback()
        await asyncio.gather(a_done, c_failed)

    steps = {(s.branch, s.state): s for s in await store.steps(wf_id)}
    assert steps[("c", "start")].status == "failed"
    assert steps[(None, "fan")].status == "pending"  # woken: its branch failed
    nothing_open = {k: s.status for k, s in steps.items() if s.parent_id is not None}
    assert "pending" not in nothing_open.values(), nothing_open
    assert "running" not in nothing_open.values(), nothing_open


async def test_a_step_chosen_before_its_workflow_was_paused_is_not_claimed(
    make_store: Any, tmp_path: Path
) -> None:
    """A claim chooses due steps (token shares: BaseStore._claimable), then takes them in
    a second statement; a pause committed in between holds the step, and the claim must
    not take it then (it started while its workflow was paused)."""
    store = make_store(tmp_path / "pause.db")
    await store.open()
    t0 = now_ms()
    first = NewStep(state="start", name="start", tool="echo", seq=1)
    created = await store.create_workflow(name="w", flow_json="{}", input_json="{}",
                                          created_by="james", first=first, now=t0)  # fmt: skip
    chosen = await store.write("choose", lambda db: store._claimable(db, 10, t0 + 1))
    assert len(chosen) == 1
    assert await store.pause(created.id, by="james", reason=None) == "ok"
    params = {"ids": f"[{chosen[0]}]", "now": t0 + 2, "lease_ms": 30_000, "node": "a"}
    for name in ("claim_steps_logged", "claim_steps"):
        taken = await store.write(
            name, lambda db, q=name: db.execute(store.Q[q], params).fetchall()
        )
        assert taken == [], name


async def test_a_step_written_as_its_workflow_is_paused_is_held(
    make_store: Any, tmp_path: Path
) -> None:
    """A step's next step written while a pause commits is held: the pause waits for the
    transaction that writes it, or that transaction sees the pause. (Another connection
    holds the workflow row; the step's failure, whose on_error step is written next, and
    the pause both wait for it, then go on together.)"""
    import psycopg

    path = tmp_path / "paused.db"
    store = make_store(path)
    await store.open()
    t0 = now_ms()
    first = NewStep(state="start", name="start", tool="echo", seq=1)
    created = await store.create_workflow(name="w", flow_json="{}", input_json="{}",
                                          created_by="james", first=first, now=t0)  # fmt: skip
    wf_id = created.id
    (step,) = await store.claim_steps(10, lease_ms=30_000, now=t0 + 1)
    with psycopg.connect(backend.database_url(path), autocommit=True) as watch, \
            psycopg.connect(backend.database_url(path)) as holder:  # fmt: skip
        holder.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (wf_id,))
        failed = asyncio.ensure_future(store.finish_step(Finish(
            step_id=step.id, workflow_id=wf_id, attempt=step.attempt, status=StepStatus.FAILED,
            error="boom", error_type="ToolError",
            next_step=NewStep(state="handle", name="handle", tool="echo", seq=2))))  # fmt: skip
        await asyncio.to_thread(_waiting, watch, 1)
        paused = asyncio.ensure_future(store.pause(wf_id, by="james", reason=None))
        await asyncio.to_thread(_waiting, watch, 2)
        holder.rollback()
        await asyncio.gather(failed, paused)
    assert paused.result() == "ok"
    assert await store.claim_steps(10, now=now_ms() + 60_000) == []  # held
    assert await store.unpause(wf_id, by="james", reason=None) == "ok"
    (handle,) = await store.claim_steps(10, now=now_ms() + 60_000)
    assert handle.state == "handle"
