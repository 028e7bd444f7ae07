"""The storage interface's contract, on whichever backend the suite runs on
(STEPD_TEST_BACKEND): what the engine, executor, notifier and web pages rely on.

Only public store methods are used here, with explicit times (`now=`): no SQL, no
backend internals, so the same tests hold any store to the same behaviour.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.models import Finish, NewStep, StepStatus, WorkflowStatus
from daemon.storage import Cancelled, LinkSpent, Replay, Replayed, WorkflowTooLarge, now_ms

ECHO = NewStep(state="start", name="start", tool="echo", seq=1)
GATE = NewStep(state="ok", name="ok", tool=None, seq=1)
FLOW = orjson.dumps({"start": {"tool": "echo"}, "ok": {"approvers": ["approver"]}}).decode()
MINUTE = 60_000


@pytest.fixture
async def store(make_store: Any, tmp_path: Path) -> Any:
    s = make_store(tmp_path / "contract.db")
    await s.open()
    yield s
    await s.close()


async def create(store: Any, first: NewStep = ECHO, *, by: str | None = "james", **kw: Any) -> int:
    kw.setdefault("now", now_ms())
    created = await store.create_workflow(
        name="w", flow_json=FLOW, input_json='{"n": 1}', created_by=by, first=first, **kw
    )
    assert not created.replayed
    return created.id


async def committed_events(store: Any) -> list[dict[str, Any]]:
    """The log from the start, once it shows anything: on PostgreSQL, an event committed
    while another transaction of the database still runs is read once that one ends."""
    for _ in range(200):
        if events := await store.events_after(0):
            return events
        await asyncio.sleep(0.01)
    raise AssertionError("no event became readable within 2 s")


async def claim_one(store: Any, now: int, lease_ms: int = 30_000) -> Any:
    (step,) = await store.claim_steps(10, lease_ms=lease_ms, now=now)
    return step


def done(step: Any, **kw: Any) -> Finish:
    kw.setdefault("result_json", '{"ok": true}')
    return Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                  status=StepStatus.DONE, **kw)  # fmt: skip


# -- lifecycle and ids ---------------------------------------------------------------------


async def test_open_close_reopen_keeps_data(make_store: Any, tmp_path: Path):
    first = make_store(tmp_path / "keep.db")
    assert not first.is_open
    await first.open()
    assert first.is_open and await first.ping()
    version = await first.schema_version()
    assert version >= 1
    wf_id = await create(first)
    await first.close()
    assert not first.is_open

    again = make_store(tmp_path / "keep.db")
    await again.open()
    assert (await again.get_workflow(wf_id)).name == "w"
    assert await again.schema_version() == version  # not migrated twice
    assert await create(again) > wf_id  # ids go on increasing after a restart
    await again.close()


async def test_ids_increase_and_look_like_epoch_ms(store: Any):
    t0 = now_ms()
    ids = [await create(store, now=t0) for _ in range(20)]  # one millisecond, 20 workflows
    assert ids == sorted(set(ids))
    assert all(t0 - MINUTE < i < t0 + 10 * MINUTE for i in ids)
    steps = [(await store.steps(i))[0].id for i in ids]
    assert len(set(steps) | set(ids)) == 40  # steps and workflows share one id space
    assert steps == sorted(steps)


# -- workflows -----------------------------------------------------------------------------


async def test_create_get_and_steps(store: Any):
    t0 = now_ms()
    created = await store.create_workflow(
        name="deploy", flow_json=FLOW, input_json='{"n": 1}', created_by="james", first=ECHO,
        notify_url="http://127.0.0.1:9/hook", now=t0,
    )  # fmt: skip
    assert not created.replayed and not created.conflict and created.started is None
    wf = await store.get_workflow(created.id)
    assert (wf.id, wf.name, wf.status, wf.created_by) == (created.id, "deploy", "running", "james")
    assert (wf.created_at, wf.updated_at) == (t0, t0)
    assert orjson.loads(wf.flow_json) == orjson.loads(FLOW)
    assert orjson.loads(wf.input_json) == {"n": 1}
    assert wf.notify_url == "http://127.0.0.1:9/hook"
    (step,) = await store.steps(created.id)
    assert step.id == created.first_step_id
    assert (step.state, step.tool, step.status, step.attempt, step.seq) == (
        "start", "echo", "pending", 0, 1)  # fmt: skip
    assert await store.get_step(step.id) == step
    assert await store.get_workflow(created.id + 10**9) is None
    assert await store.get_step(created.id + 10**9) is None
    assert [e["type"] for e in await store.events(created.id)] == ["created"]
    assert (await store.events(created.id))[0]["data"] == {"by": "james"}


async def test_list_workflows_newest_first_with_cursor_and_status(store: Any):
    ids = [await create(store) for _ in range(5)]
    await store.cancel_workflow(ids[1], by="james")
    page = await store.list_workflows(limit=2)
    assert [w.id for w in page] == [ids[4], ids[3]]
    page = await store.list_workflows(limit=2, before=page[-1].id)
    assert [w.id for w in page] == [ids[2], ids[1]]
    page = await store.list_workflows(limit=2, before=page[-1].id)
    assert [w.id for w in page] == [ids[0]]
    assert [w.id for w in await store.list_workflows(status="cancelled")] == [ids[1]]
    running = await store.list_workflows(status="running", limit=3)
    assert [w.id for w in running] == [ids[4], ids[3], ids[2]]
    running = await store.list_workflows(status="running", before=ids[2])
    assert [w.id for w in running] == [ids[0]]


async def test_create_with_idempotency_key_replays(store: Any):
    kw = {"idempotency_key": "k1", "request_hash": "h1"}
    first = await create(store, **kw)
    again = await store.create_workflow(name="w", flow_json=FLOW, input_json="{}",
                                        created_by="james", first=ECHO, **kw)  # fmt: skip
    assert (again.id, again.replayed, again.conflict) == (first, True, False)
    other = await store.create_workflow(name="w", flow_json=FLOW, input_json="{}",
                                        created_by="james", first=ECHO, idempotency_key="k1",
                                        request_hash="h2")  # fmt: skip
    assert (other.id, other.replayed, other.conflict) == (first, True, True)
    # Keys are per token.
    assert await create(store, by="approver", **kw) != first
    assert len(await store.list_workflows()) == 2


async def test_create_can_start_its_first_step(store: Any):
    t0 = now_ms()
    created = await store.create_workflow(name="w", flow_json=FLOW, input_json="{}",
                                          created_by="james", first=ECHO,
                                          start_lease_ms=5000, now=t0)  # fmt: skip
    started = created.started
    assert started is not None and started.id == created.first_step_id
    assert (started.status, started.attempt) == ("running", 1)
    assert await store.claim_steps(10, now=t0) == []  # already taken
    types = [e["type"] for e in await store.events(created.id)]
    assert types == ["created", "step_started"]
    # A gate is never started that way.
    gate = await store.create_workflow(name="w", flow_json=FLOW, input_json="{}",
                                       created_by="james", first=GATE,
                                       start_lease_ms=5000)  # fmt: skip
    assert gate.started is None


# -- claims, finishing, following ----------------------------------------------------------


async def test_claim_takes_due_steps_oldest_first_once(store: Any):
    t0 = now_ms()
    a = await create(store, now=t0)
    b = await create(store, now=t0 + 1)
    c = await create(store, GATE, now=t0 + 2)
    assert await store.has_due(now=t0 + 5)
    claimed = await store.claim_steps(2, lease_ms=1000, now=t0 + 5)
    assert [s.workflow_id for s in claimed] == [a, b]
    for step in claimed:
        assert (step.status, step.attempt, step.started_at) == ("running", 1, t0 + 5)
    assert await store.claim_steps(10, now=t0 + 7) == []  # a gate waits from the start
    (gate,) = await store.steps(c)
    assert (gate.awaiting, gate.status, gate.attempt, gate.started_at) == (
        "ready", "running", 1, t0 + 2)  # fmt: skip
    assert not await store.has_due(now=t0 + 7)
    events = await store.events(a)
    assert [e["type"] for e in events] == ["created", "step_started"]
    assert events[1]["data"] == {"state": "start", "attempt": 1}


async def test_finish_follows_to_the_next_step_and_the_end(store: Any):
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    step = await claim_one(store, t0 + 1)
    nxt = NewStep(state="two", name="two", tool="echo", seq=2)
    next_id = await store.finish_step(done(step, next_step=nxt), now=t0 + 2)
    assert next_id > step.id
    assert (await store.get_step(step.id)).status == "done"
    assert (await store.get_step(step.id)).result_json == '{"ok": true}'
    # The same attempt again: it no longer owns the step, nothing is written.
    assert await store.finish_step(done(step, next_step=nxt), now=t0 + 3) is None
    second = await claim_one(store, t0 + 4)
    assert second.id == next_id
    end = done(second, workflow_status=WorkflowStatus.COMPLETED)
    assert await store.finish_step(end, now=t0 + 5) == 0
    wf = await store.get_workflow(wf_id)
    assert (wf.status, wf.completed_at, wf.updated_at) == ("completed", t0 + 5, t0 + 5)
    types = [e["type"] for e in await store.events(wf_id)]
    assert types == ["created", "step_started", "step_done", "step_started", "step_done",
                     "completed"]  # fmt: skip


async def test_finish_and_start_hands_the_next_step_over(store: Any):
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    step = await claim_one(store, t0 + 1)
    nxt = NewStep(state="two", name="two", tool="echo", seq=2)
    next_id, started = await store.finish_and_start(
        done(step, next_step=nxt, start_next_lease_ms=5000), now=t0 + 2
    )
    assert started is not None and started.id == next_id
    assert (started.status, started.attempt, started.state) == ("running", 1, "two")
    assert await store.claim_steps(10, now=t0 + 3) == []
    # A stale attempt gets (None, None).
    assert await store.finish_and_start(done(step), now=t0 + 4) == (None, None)
    assert (await store.get_workflow(wf_id)).status == "running"


async def test_a_failed_attempt_retries_later(store: Any):
    t0 = now_ms()
    await create(store, now=t0)
    step = await claim_one(store, t0)
    retry = Finish(step_id=step.id, workflow_id=step.workflow_id, attempt=1,
                   status=StepStatus.PENDING, error="boom", error_type="RuntimeError",
                   retry_at=t0 + 1000)  # fmt: skip
    assert await store.finish_step(retry, now=t0 + 1) == 0
    assert await store.claim_steps(10, now=t0 + 999) == []
    assert await store.next_due(now=t0 + 2) == t0 + 1000
    again = await claim_one(store, t0 + 1000)
    assert (again.id, again.attempt, again.error) == (step.id, 2, "boom")
    failed = Finish(step_id=again.id, workflow_id=again.workflow_id, attempt=2,
                    status=StepStatus.FAILED, error="boom", error_type="RuntimeError",
                    workflow_status=WorkflowStatus.FAILED, workflow_error="boom")  # fmt: skip
    assert await store.finish_step(failed, now=t0 + 1001) == 0
    wf = await store.get_workflow(step.workflow_id)
    assert (wf.status, wf.error) == ("failed", "boom")


async def test_a_result_past_the_workflow_size_limit_writes_nothing(store: Any):
    wf_id = await create(store)
    step = await claim_one(store, now_ms())
    big = done(step, result_json='"' + "x" * 5000 + '"', max_workflow_bytes=1000,
               workflow_status=WorkflowStatus.COMPLETED)  # fmt: skip
    with pytest.raises(WorkflowTooLarge):
        await store.finish_step(big)
    assert (await store.get_step(step.id)).status == "running"  # rolled back
    assert (await store.get_workflow(wf_id)).status == "running"
    assert await store.finish_step(done(step, workflow_status=WorkflowStatus.COMPLETED)) == 0


async def test_cancel(store: Any):
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    step = await claim_one(store, t0)
    result, step_ids = await store.cancel_workflow(wf_id, by="james", now=t0 + 1)
    assert (result, step_ids) == (Cancelled.OK, [step.id])
    wf = await store.get_workflow(wf_id)
    assert (wf.status, wf.cancelled_at) == ("cancelled", t0 + 1)
    assert (await store.get_step(step.id)).status == "cancelled"
    assert await store.finish_step(done(step)) is None  # the running attempt lost it
    assert await store.cancel_workflow(wf_id, by="james") == (Cancelled.FINISHED, [])
    assert await store.cancel_workflow(wf_id + 10**9, by="james") == (Cancelled.NOT_FOUND, [])
    assert (await store.events(wf_id))[-1]["type"] == "cancelled"


# -- people: gates and decisions ------------------------------------------------------------


async def test_decide_a_gate_with_an_idempotency_key_replay(store: Any):
    t0 = now_ms()
    wf_id = await create(store, GATE, now=t0)
    (gate,) = await store.steps(wf_id)
    assert await store.waiting_count() == 1
    assert await store.waiting_among([wf_id, wf_id + 10**9]) == {wf_id}
    (row,) = await store.approvals()
    assert (row["step_id"], row["workflow_id"], row["awaiting"]) == (gate.id, wf_id, "ready")
    assert orjson.loads(row["approvers_json"]) == ["approver"]
    assert orjson.loads(row["input_json"]) == {"n": 1}

    replay = Replay("approver", "key-1", "hash-1", 200, '{"decided": true}')
    fin = done(gate, result_json='{"decision": "approve"}',
               workflow_status=WorkflowStatus.COMPLETED)  # fmt: skip
    decided = await store.decide(fin, awaiting="ready", decision="approve",
                                 decided_by="approver", reason="fine", replay=replay,
                                 now=t0 + 1)  # fmt: skip
    assert decided == (0, None)
    step = await store.get_step(gate.id)
    assert (step.status, step.awaiting, step.decided_by, step.reason, step.decided_at) == (
        "done", None, "approver", "fine", t0 + 1)  # fmt: skip
    assert (await store.get_workflow(wf_id)).status == "completed"
    assert await store.waiting_count() == 0

    # The same key again: the saved answer, and nothing written.
    with pytest.raises(Replayed) as raised:
        await store.decide(fin, awaiting="ready", decision="reject", decided_by="approver",
                           replay=replay)  # fmt: skip
    assert raised.value.earlier == replay
    assert await store.decision_replay("approver", "key-1") == replay
    assert await store.decision_replay("james", "key-1") is None
    # Without a key, a step that no longer waits is not decided again.
    assert await store.decide(fin, awaiting="ready", decision="reject",
                              decided_by="approver") is None  # fmt: skip
    events = await store.events(wf_id)
    assert [e["type"] for e in events][-3:] == ["gate_decided", "step_done", "completed"]
    assert events[-3]["data"] == {"decision": "approve", "by": "approver", "reason": "fine"}


async def test_a_one_click_link_is_spent_once(store: Any):
    t0 = now_ms()
    (gate,) = await store.steps(await create(store, GATE, now=t0))
    assert not await store.link_used("nonce-1")
    fin = done(gate, workflow_status=WorkflowStatus.COMPLETED)
    await store.decide(fin, awaiting="ready", decision="approve", decided_by="link",
                       link_nonce="nonce-1")  # fmt: skip
    assert await store.link_used("nonce-1")
    (other,) = await store.steps(await create(store, GATE))
    with pytest.raises(LinkSpent):
        await store.decide(done(other), awaiting="ready", decision="approve",
                           decided_by="link", link_nonce="nonce-1")  # fmt: skip
    assert (await store.get_step(other.id)).awaiting == "ready"  # rolled back


async def test_gate_expiry(store: Any):
    t0 = now_ms()
    timed = NewStep(state="ok", name="ok", tool=None, seq=1, timeout_ms=1000)
    (gate,) = await store.steps(await create(store, timed, now=t0))
    assert gate.expires_at == t0 + 1000
    assert await store.expired_gates(10, now=gate.expires_at - 1) == []
    assert [s.id for s in await store.expired_gates(10, now=gate.expires_at)] == [gate.id]
    assert await store.next_due(now=t0) == gate.expires_at


# -- leases, requeue, recovery -------------------------------------------------------------


async def test_lease_expiry_and_requeue(store: Any):
    t0 = now_ms()
    await create(store, now=t0)
    step = await claim_one(store, t0, lease_ms=1000)
    assert await store.interrupted(limit=10, now=t0 + 999) == []
    await store.renew_leases([step], t0 + 5000)
    assert await store.interrupted(limit=10, now=t0 + 4999) == []
    (lost,) = await store.interrupted(limit=10, now=t0 + 5001)
    assert (lost.id, lost.attempt) == (step.id, 1)
    assert await store.requeue(lost, "lease expired", now=t0 + 5001)
    assert not await store.requeue(lost, "lease expired", now=t0 + 5002)  # compare-and-set
    assert await store.finish_step(done(step)) is None  # the old attempt is fenced off
    again = await claim_one(store, t0 + 5003)
    assert (again.id, again.attempt) == (step.id, 2)
    types = [e["type"] for e in await store.events(step.workflow_id)]
    assert types[-2:] == ["step_requeued", "step_started"]


async def test_unstart_gives_the_attempt_back(store: Any):
    t0 = now_ms()
    await create(store, now=t0)
    step = await claim_one(store, t0)
    assert await store.unstart(step, "stopping", run_at=t0 + 500, now=t0 + 1)
    assert await store.claim_steps(10, now=t0 + 499) == []
    again = await claim_one(store, t0 + 500)
    assert (again.id, again.attempt) == (step.id, 1)


async def test_an_interrupted_step_can_wait_for_a_decision(store: Any):
    t0 = now_ms()
    await create(store, now=t0)
    step = await claim_one(store, t0, lease_ms=1000)
    assert await store.await_decision(step, "lease expired", now=t0 + 2000)
    waiting = await store.get_step(step.id)
    assert (waiting.status, waiting.awaiting, waiting.error_type) == (
        "running", "decision", "Interrupted")  # fmt: skip
    assert await store.interrupted(limit=10, now=t0 + 10**6) == []
    assert await store.waiting_count() == 1
    assert await store.retry_decided(waiting, decided_by="approver", now=t0 + 2001)
    again = await claim_one(store, t0 + 2002)
    assert (again.id, again.attempt) == (step.id, 2)


# -- the event log -------------------------------------------------------------------------


async def test_events_after_reads_the_log_in_order_without_gaps(store: Any):
    assert await store.max_event_id() == 0
    assert await store.events_after(0) == []
    a = await create(store)
    b = await create(store)
    await store.claim_steps(10)
    log = await store.events_after(0)
    ids = [e["id"] for e in log]
    assert ids == sorted(set(ids)) and len(ids) == 4
    assert [(e["workflow_id"], e["type"]) for e in log] == [
        (a, "created"), (b, "created"), (a, "step_started"), (b, "step_started")]  # fmt: skip
    assert await store.max_event_id() == ids[-1]
    # Paging: every event once, in order.
    seen, after = [], 0
    while page := await store.events_after(after, limit=1):
        seen += page
        after = page[-1]["id"]
    assert seen == log
    assert [e["type"] for e in await store.events_after(0, workflow_id=b)] == [
        "created", "step_started"]  # fmt: skip
    assert await store.events_after(ids[-1]) == []
    c = await create(store)
    assert [e["workflow_id"] for e in await store.events_after(ids[-1])] == [c]


async def test_events_of_types(store: Any):
    plain = await create(store)
    hooked = await create(store, notify_url="http://127.0.0.1:9/hook")
    events, up_to, caught_up = await store.events_of_types(0, ["created"])
    assert [e["workflow_id"] for e in events] == [plain, hooked]
    assert caught_up and up_to == await store.max_event_id()
    events, _, _ = await store.events_of_types(0, ["created"], with_url_only=True)
    assert [e["workflow_id"] for e in events] == [hooked]
    events, up_to, caught_up = await store.events_of_types(0, ["created"], limit=1)
    assert [e["workflow_id"] for e in events] == [plain]
    assert up_to == events[0]["id"] and not caught_up


# -- retention -----------------------------------------------------------------------------


async def test_purge_deletes_finished_workflows_only(store: Any):
    t0 = now_ms()
    finished = []
    for _ in range(3):
        wf_id = await create(store, now=t0)
        await store.cancel_workflow(wf_id, by="james", now=t0)
        finished.append(wf_id)
    running = await create(store, now=t0)
    cutoff = t0 + 60 * MINUTE
    assert await store.purge_finished(cutoff=cutoff, limit=2) == 2
    assert await store.purge_finished(cutoff=cutoff, limit=10) == 1
    assert await store.purge_finished(cutoff=cutoff, limit=10) == 0
    for wf_id in finished:
        assert await store.get_workflow(wf_id) is None
        assert await store.steps(wf_id) == []
        assert await store.events(wf_id) == []
    assert (await store.get_workflow(running)).status == "running"
    assert len(await store.steps(running)) == 1


# -- webhook outbox ------------------------------------------------------------------------


async def test_outbox_deliveries(store: Any):
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    (event,) = await committed_events(store)
    assert await store.cursor("notifier") == 0

    def row(url: str, dest: str) -> dict[str, Any]:
        return {"event_id": event["id"], "workflow_id": wf_id, "url": url, "dest": dest,
                "body_json": '{"type": "created"}'}  # fmt: skip

    rows = [row("http://127.0.0.1:9/a", "a"), row("http://127.0.0.1:9/op", "operator")]
    await store.enqueue_deliveries("notifier", event["id"], rows, now=t0)
    assert await store.cursor("notifier") == event["id"]
    # Once per event and URL.
    await store.enqueue_deliveries("notifier", event["id"], rows[:1], now=t0)
    due = await store.due_deliveries(per_dest=10, per_operator=10, now=t0)
    assert [d["dest"] for d in due] == ["operator", "a"]  # the operator's first
    by_dest = {d["dest"]: d for d in due}
    assert by_dest["a"]["url"] == "http://127.0.0.1:9/a"
    assert by_dest["a"]["body_json"] == '{"type": "created"}'
    await store.delivery_done(by_dest["operator"]["id"])
    await store.delivery_done(by_dest["a"]["id"], error="503", next_at=t0 + MINUTE)
    assert await store.due_deliveries(per_dest=10, per_operator=10, now=t0 + 1) == []
    (retry,) = await store.due_deliveries(per_dest=10, per_operator=10, now=t0 + 10 * MINUTE)
    assert retry["id"] == by_dest["a"]["id"] and retry["attempts"] == 1
    assert retry["last_error"] == "503"
    await store.delivery_done(retry["id"], error="503", next_at=t0, dead=True)
    assert await store.due_deliveries(per_dest=10, per_operator=10, now=t0 + 20 * MINUTE) == []


async def test_due_deliveries_skip_busy_destinations(store: Any):
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    (event,) = await committed_events(store)
    rows = [{"event_id": event["id"], "workflow_id": wf_id, "url": f"http://127.0.0.1:9/{d}",
             "dest": d, "body_json": "{}"} for d in ("a", "b")]  # fmt: skip
    await store.enqueue_deliveries("notifier", event["id"], rows, now=t0)
    due = await store.due_deliveries(per_dest=10, per_operator=10, busy=["a"], now=t0)
    assert [d["dest"] for d in due] == ["b"]


# -- web sessions --------------------------------------------------------------------------


async def test_web_sessions(store: Any):
    t0 = now_ms()
    await store.add_web_session("h1", "james", "sha-1", t0 + MINUTE, now=t0)
    session = await store.web_session("h1", now=t0 + 1)
    assert (session["token_name"], session["token_hash"], session["expires_at"]) == (
        "james", "sha-1", t0 + MINUTE)  # fmt: skip
    assert await store.web_session("h1", now=t0 + MINUTE) is None  # expired
    assert await store.web_session("nope", now=t0) is None
    await store.add_web_session("h2", "approver", "sha-2", t0 + 2 * MINUTE, now=t0)
    await store.end_web_session("h2")
    assert await store.web_session("h2", now=t0) is None
    # A sign-in forgets the sessions that expired.
    await store.add_web_session("h3", "james", "sha-1", t0 + 3 * MINUTE, now=t0 + 2 * MINUTE)
    assert await store.web_session("h1", now=t0) is None


# -- counts --------------------------------------------------------------------------------


async def test_gauges(store: Any):
    t0 = now_ms()
    await create(store, now=t0)
    await create(store, now=t0)
    await create(store, GATE, now=t0)
    done_id = await create(store, now=t0)
    await store.cancel_workflow(done_id, by="james", now=t0)
    await store.claim_steps(1, now=t0)
    gauges = await store.gauges(t0)
    assert (gauges.runnable, gauges.delayed, gauges.running) == (1, 0, 1)
    assert (gauges.gates_waiting, gauges.decisions_waiting) == (1, 0)
    assert gauges.workflows == {"running": 3, "cancelled": 1}


async def test_wait_for_change_wakes_on_a_commit(store: Any):
    import asyncio

    waiter = asyncio.create_task(store.wait_for_change(5.0))
    await asyncio.sleep(0.05)
    await create(store)
    assert await waiter
    assert not await store.wait_for_change(0.05)


# -- waits and signals -------------------------------------------------------------------


async def test_a_signal_taken_by_an_interrupted_wait_is_taken_again_by_its_next_attempt(store):
    """A wait took a signal sent before it (begin_wait committed), and the daemon died
    before the step's outcome was written: the next attempt of the same visit gets the
    same signal instead of waiting for one that will not come again."""
    t0 = now_ms()
    wf_id = await create(store, NewStep(state="w", name="w", tool=":wait", seq=1), now=t0)
    assert await store.send_signal(wf_id, "go", '{"n": 1}', by="james", now=t0 + 1) == "ok"
    step = await claim_one(store, t0 + 2, lease_ms=1000)
    took = await store.begin_wait(step, awaiting="signal", signal="go", expires_at=None,
                                  now=t0 + 3)  # fmt: skip
    assert took == '{"n": 1}'
    assert await store.requeue(step, "interrupted", now=t0 + 2000)  # its lease ran out
    again = await claim_one(store, t0 + 2001)
    assert (again.id, again.attempt) == (step.id, 2)
    took = await store.begin_wait(again, awaiting="signal", signal="go", expires_at=None,
                                  now=t0 + 2002)  # fmt: skip
    assert took == '{"n": 1}'
    assert (await store.get_step(step.id)).awaiting is None  # it did not start waiting
    # A second signal is left for a later wait.
    assert await store.send_signal(wf_id, "go", '{"n": 2}', by="james", now=t0 + 2003) == "ok"
    assert (await store.get_step(step.id)).awaiting is None


# -- pause --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["retry", "requeue", "unstart"])
async def test_a_step_running_when_paused_and_queued_again_waits_for_resume(store, how):
    """A tool step that runs while its workflow is paused and goes back to the queue (its
    attempt failed and is retried; its lease ran out; a planned stop gave it back) is held
    like the steps that were queued at the pause: nothing starts until the resume."""
    t0 = now_ms()
    wf_id = await create(store, now=t0)
    step = await claim_one(store, t0 + 1)
    assert await store.pause(wf_id, by="james", reason=None) == "ok"
    if how == "retry":
        fin = Finish(step_id=step.id, workflow_id=wf_id, attempt=step.attempt,
                     status=StepStatus.PENDING, error="flaky", error_type="ToolError",
                     retry_at=t0 + 2)  # fmt: skip
        assert await store.finish_step(fin, now=t0 + 2) is not None
    elif how == "requeue":
        assert await store.requeue(step, "interrupted", now=t0 + 2)
    else:
        assert await store.unstart(step, "stopped", run_at=t0 + 2)
    assert await store.claim_steps(10, now=now_ms() + MINUTE) == []
    assert await store.unpause(wf_id, by="james", reason=None) == "ok"
    (again,) = await store.claim_steps(10, now=now_ms() + MINUTE)
    assert again.id == step.id
