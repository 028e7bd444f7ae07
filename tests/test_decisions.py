"""Gate decisions: reject, approvers, self-approval, replays, the approvals inbox, event streams."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon import events
from daemon.api import create_app
from daemon.auth import hash_token
from daemon.config import TokenConfig
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import migrations, split_statements
from tests.helpers import TOKENS, Watch, auth, make_config, wait_for, waiting_gate


def gate_flow(**gate: Any) -> dict[str, Any]:
    return {
        "name": "gated",
        "flow": {
            "start": {"tool": "echo", "args": {"draft": "v1"}, "next": "review"},
            "review": {"tool": None, "next": "publish", **gate},
            "publish": {"tool": "echo", "args": {"ok": "<<result>>"}, "done": True},
            "handle": {"tool": "echo", "args": {"why": "<<error.message>>"}, "done": True},
        },
        "input": {"doc": "policy"},
    }


async def gate_of(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, int]:
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    assert gate is not None
    return wf_id, gate["id"]


async def test_reject_with_a_reason_goes_to_on_error(client):
    wf_id, gate = await gate_of(client, gate_flow(on_error="handle"))
    resp = await client.post(f"/api/workflow/{gate}/reject", json={"reason": "too vague"})
    assert resp.status_code == 200 and resp.json() == {"rejected": True}
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    review = wf["steps"][1]
    assert review["status"] == "failed" and review["reason"] == "too vague"
    assert review["decided_by"] == "james" and review["decided_at"] >= review["started_at"]
    assert review["error"] == "rejected by james: too vague"
    assert orjson.loads(wf["steps"][2]["result_json"]) == {"why": "rejected by james: too vague"}


async def test_reject_without_on_error_fails_the_workflow(client, app):
    wf_id, gate = await gate_of(client, gate_flow())
    await client.post(f"/api/workflow/{gate}/reject", json={"reason": "no"})
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed" and "rejected by james: no" in wf["error"]
    decided = [e for e in await app.state.store.events(wf_id) if e["type"] == "gate_decided"]
    assert decided[0]["data"] == {"decision": "reject", "by": "james", "reason": "no"}


@pytest.mark.parametrize(
    "body", [{}, {"reason": ""}, {"reason": "  "}, {"reason": 3}, {"reason": "x", "y": 1}, [1]]
)
async def test_reject_needs_a_reason(client, body):
    wf_id, gate = await gate_of(client, gate_flow())
    resp = await client.post(f"/api/workflow/{gate}/reject", json=body)
    assert resp.status_code == 400 and "error" in resp.json()
    assert waiting_gate((await client.get(f"/api/workflow/{wf_id}")).json()) is not None


async def test_approvers_decide_who_may(client):
    _, gate = await gate_of(client, gate_flow(approvers=["approver"]))
    resp = await client.post(f"/api/workflow/{gate}/ready")
    assert resp.status_code == 403 and "not among the approvers" in resp.json()["error"]
    resp = await client.post(f"/api/workflow/{gate}/reject", json={"reason": "x"})
    assert resp.status_code == 403
    assert (await client.post(f"/api/workflow/{gate}/ready", headers=auth("approver"))).json() == {
        "queued": True
    }


async def test_approvers_may_name_a_permission(client):
    _, gate = await gate_of(client, gate_flow(approvers=["approve"]))
    # james has "workflow" (which grants approving) but the gate asks for the approve role.
    assert (await client.post(f"/api/workflow/{gate}/ready")).status_code == 403
    resp = await client.post(f"/api/workflow/{gate}/ready", headers=auth("approver"))
    assert resp.status_code == 200


async def test_self_approval_can_be_forbidden_per_gate(client):
    _, gate = await gate_of(client, gate_flow(allow_self_approval=False))
    resp = await client.post(f"/api/workflow/{gate}/ready")
    assert resp.status_code == 403 and "created this workflow" in resp.json()["error"]
    assert (await client.post(f"/api/workflow/{gate}/ready", headers=auth("approver"))).json() == {
        "queued": True
    }


async def test_self_approval_default_comes_from_the_config(make_app):
    app = make_app(allow_self_approval=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth()) as c:
            _, gate = await gate_of(c, gate_flow())
            assert (await c.post(f"/api/workflow/{gate}/ready")).status_code == 403
            _, other = await gate_of(c, gate_flow(allow_self_approval=True))
            assert (await c.post(f"/api/workflow/{other}/ready")).status_code == 200


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("approvers", [], "non-empty list"),
        ("approvers", "alice", "non-empty list"),
        ("allow_self_approval", "no", "true or false"),
    ],
)
async def test_gate_rules_are_validated(client, field, value, needle):
    resp = await client.post("/api/workflow", json=gate_flow(**{field: value}))
    assert resp.status_code == 422 and needle in resp.json()["error"]
    body = gate_flow()
    body["flow"]["start"][field] = ["x"] if field == "approvers" else True
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422 and "applies only to a gate" in resp.json()["error"]


async def test_decisions_on_gates_that_no_longer_wait_are_409(client):
    # Decided already.
    _, gate = await gate_of(client, gate_flow())
    assert (await client.post(f"/api/workflow/{gate}/ready")).status_code == 200
    assert (await client.post(f"/api/workflow/{gate}/ready")).status_code == 409
    assert (
        await client.post(f"/api/workflow/{gate}/reject", json={"reason": "x"})
    ).status_code == 409
    # Cancelled.
    wf_id, gate = await gate_of(client, gate_flow())
    await client.delete(f"/api/workflow/{wf_id}")
    assert (
        await client.post(f"/api/workflow/{gate}/reject", json={"reason": "x"})
    ).status_code == 409
    # Expired.
    wf_id, gate = await gate_of(client, gate_flow(timeout=0.05))
    await wait_for(client, wf_id)
    assert (await client.post(f"/api/workflow/{gate}/ready")).status_code == 409


async def test_a_repeated_decision_with_its_key_answers_as_the_first_time(client, app):
    wf_id, gate = await gate_of(client, gate_flow())
    headers = {"Idempotency-Key": "decide-1"}
    first = await client.post(f"/api/workflow/{gate}/ready", json={"ok": 1}, headers=headers)
    again = await client.post(f"/api/workflow/{gate}/ready", json={"ok": 1}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"queued": True}
    other = await client.post(f"/api/workflow/{gate}/reject", json={"reason": "x"}, headers=headers)
    assert other.status_code == 409 and "different decision" in other.json()["error"]
    await wait_for(client, wf_id)
    decided = [e for e in await app.state.store.events(wf_id) if e["type"] == "gate_decided"]
    assert len(decided) == 1


async def test_one_key_sent_twice_at_once_decides_once_and_answers_both(client, app):
    # A client's retry racing its first try: both checks for the key run before either
    # write; the write that comes second sees the first one's key and answers as it did.
    wf_id, gate = await gate_of(client, gate_flow())
    headers = {"Idempotency-Key": "race-1"}
    answers = await asyncio.gather(
        *(client.post(f"/api/workflow/{gate}/ready", json={"ok": 1}, headers=headers)
          for _ in range(2))
    )  # fmt: skip
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"queued": True})] * 2
    await wait_for(client, wf_id)
    decided = [e for e in await app.state.store.events(wf_id) if e["type"] == "gate_decided"]
    assert len(decided) == 1


async def test_one_key_for_two_gates_at_once_decides_one_and_refuses_the_other(client, app):
    gates = [(await gate_of(client, gate_flow()))[1] for _ in range(2)]
    headers = {"Idempotency-Key": "race-2"}
    answers = await asyncio.gather(
        *(client.post(f"/api/workflow/{g}/ready", headers=headers) for g in gates)
    )
    assert sorted(a.status_code for a in answers) == [200, 409]
    refused = next(a for a in answers if a.status_code == 409)
    assert "different decision" in refused.json()["error"]
    steps = [await app.state.store.get_step(g) for g in gates]
    assert sorted((s.status, s.awaiting) for s in steps) == [("done", None), ("running", "ready")]


async def test_the_approvals_inbox(client):
    first_id, first_gate = await gate_of(client, gate_flow())
    second_id, second_gate = await gate_of(client, gate_flow(approvers=["approver"]))
    inbox = (await client.get("/api/approvals", headers=auth("approver"))).json()
    assert [a["step_id"] for a in inbox] == [first_gate, second_gate]  # oldest first
    item = inbox[0]
    assert item["workflow_id"] == first_id and item["workflow_name"] == "gated"
    assert item["name"] == "review" and item["awaiting"] == "ready"
    assert item["created_by"] == "james" and item["input"] == {"doc": "policy"}
    assert orjson.loads(item["previous_result_json"]) == {"draft": "v1"}
    assert inbox[1]["approvers"] == ["approver"]
    # Never stale: cancelled and expired gates leave it at once.
    await client.delete(f"/api/workflow/{first_id}")
    inbox = (await client.get("/api/approvals")).json()
    assert [a["step_id"] for a in inbox] == [second_gate]
    expiring_id, _ = await gate_of(client, gate_flow(timeout=0.05))
    await wait_for(client, expiring_id)
    assert [a["step_id"] for a in (await client.get("/api/approvals")).json()] == [second_gate]


async def test_a_workflow_event_stream_replays_then_follows_and_ends(client):
    wf_id, gate = await gate_of(client, gate_flow())

    async def read() -> str:
        resp = await client.get(f"/api/workflow/{wf_id}/events")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return resp.text

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    await client.post(f"/api/workflow/{gate}/ready", json=True)
    text = await asyncio.wait_for(reader, 10)  # ends by itself after "completed"
    kinds = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "created" and kinds[-1] == "completed"
    assert "gate_waiting" in kinds and "gate_decided" in kinds
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == sorted(ids)
    # Resume after an id: only what came later.
    resp = await client.get(f"/api/workflow/{wf_id}/events", headers={"Last-Event-ID": str(ids[2])})
    later = [int(line[4:]) for line in resp.text.splitlines() if line.startswith("id: ")]
    assert later == ids[3:]
    assert (await client.get("/api/workflow/42/events")).status_code == 404
    bad = await client.get(f"/api/workflow/{wf_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400


async def test_the_all_events_stream_follows_live_with_heartbeats(app, client):
    # Driven as an ASGI app: httpx's ASGITransport returns a body only once it has ended.
    response = events.stream(app.state.events, 0, None, heartbeat=0.2)
    seen: list[bytes] = []
    enough = asyncio.Event()

    async def receive() -> dict[str, str]:
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        seen.append(message.get("body", b""))  # type: ignore[arg-type]
        text = b"".join(seen)
        if b": heartbeat" in text and b"event: completed" in text:
            enough.set()

    task = asyncio.create_task(response({"type": "http", "method": "GET"}, receive, send))
    await asyncio.sleep(0.05)
    body = {"name": "e", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    await client.post("/api/workflow", json=body)
    await asyncio.wait_for(task, 10)  # the disconnect ends it
    text = b"".join(seen).decode()
    assert text.startswith("retry: 2000\n\n")
    assert "event: step_done" in text and ": heartbeat\n\n" in text
    assert app.state.events.subscribers == 0  # the stream left the hub


@pytest.mark.sqlite_only  # SQLite's schema migration
async def test_a_migrated_database_has_the_fresh_schema(tmp_path: Path):
    fresh = Store(tmp_path / "fresh.db")
    await fresh.open()
    await fresh.close()
    old = sqlite3.connect(tmp_path / "old.db")
    version, script = migrations()[0]
    for statement in split_statements(script):
        old.execute(statement)
    old.execute(f"PRAGMA user_version = {version}")
    old.commit()
    old.close()
    migrated = Store(tmp_path / "old.db")
    await migrated.open()
    assert await migrated.schema_version() == migrations()[-1][0]
    await migrated.close()

    def schema(path: Path) -> list[tuple[str, str]]:
        db = sqlite3.connect(path)
        rows = db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        db.close()
        return rows

    assert schema(tmp_path / "old.db") == schema(tmp_path / "fresh.db")


async def test_removing_a_token_removes_its_right_to_decide(tmp_path: Path):
    only_james = (TokenConfig("james", hash_token(TOKENS["james"][0]), ("workflow",)),)
    app = create_app(make_config(tmp_path, tokens=only_james))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth()) as c:
            _, gate = await gate_of(c, gate_flow())
            resp = await c.post(f"/api/workflow/{gate}/ready", headers=auth("approver"))
            assert resp.status_code == 401


@pytest.mark.parametrize("value", ["²", "١٢", "-1", "1e3"])
async def test_event_ids_must_be_ascii_digits(client, value):
    body = {"name": "e", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    resp = await client.get(f"/api/workflow/{wf_id}/events", params={"after": value})
    assert resp.status_code == 400 and "event id" in resp.json()["error"]


async def test_the_inbox_stays_small_and_cheap_with_large_workflows(make_client) -> None:
    # Every signed-in page counts the inbox; it used to parse every waiting workflow's
    # flow and send every input whole (100 MB and a 1.1 s stall for 200 such gates).
    client, _ = await make_client()
    big_args = {f"k{i}": [{}] * 1000 for i in range(60)}  # ~200 kB of flow
    body = {"name": "heavy", "input": {"text": "i" * 200_000},
            "flow": {"start": {"tool": None, "approvers": ["james"], "next": "after"},
                     "after": {"tool": "echo", "args": big_args, "done": True}}}  # fmt: skip
    ids = [(await client.post("/api/workflow", json=body)).json()["id"] for _ in range(30)]
    small = await client.post("/api/workflow", json={**body, "input": {"x": 1}})
    await wait_for(client, small.json()["id"], waiting_gate)

    resp = await client.get("/api/approvals")
    assert resp.status_code == 200
    assert len(resp.content) < 100_000
    items = resp.json()
    assert [i["workflow_id"] for i in items] == [*ids, small.json()["id"]]
    assert all(i["approvers"] == ["james"] for i in items)
    assert items[0]["input"] is None and items[0]["input_bytes"] > 200_000
    assert items[-1]["input"] == {"x": 1} and items[-1]["input_bytes"] == 7

    page = await client.get("/api/approvals", params={"limit": 10, "after": items[9]["step_id"]})
    assert [i["step_id"] for i in page.json()] == [i["step_id"] for i in items[10:20]]
    assert (await client.get("/api/approvals?limit=0")).status_code == 400

    async with Watch() as watch:
        for _ in range(3):
            assert (await client.get("/api/approvals")).status_code == 200
    assert watch.lag < 0.1, f"the event loop stalled {watch.lag * 1000:.0f} ms"
