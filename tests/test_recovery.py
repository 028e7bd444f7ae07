"""Recovery of interrupted steps: leases, attempt budgets, decisions for non-idempotent tools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon.api import create_app
from daemon.models import NewStep
from daemon.storage import now_ms
from tests import backend, sample_tools
from tests.helpers import auth, make_config, wait_for

MODULES = ("daemon.tools.demo", "tests.sample_tools")


async def interrupted_workflow(path: Path, flow: dict[str, Any], *, attempts: int = 1) -> int:
    """A workflow whose first step was running when its daemon died (`attempts` tries so far)."""
    store = backend.open_store(path)
    await store.open()
    start = flow["start"]
    created = await store.create_workflow(
        name="interrupted", flow_json=orjson.dumps(flow).decode(), input_json="{}",
        created_by="james", first=NewStep("start", "start", start["tool"], 1),
    )  # fmt: skip
    for i in range(attempts):
        (step,) = await store.claim_steps(1)
        if i + 1 < attempts:
            await store.requeue(step, "test")
    await store.close()
    return created.id


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Any]:
    clients: list[tuple[httpx.AsyncClient, Any]] = []

    async def start(**overrides: Any) -> httpx.AsyncClient:
        overrides.setdefault("tool_modules", MODULES)
        app = create_app(make_config(tmp_path, **overrides))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stepd", headers=auth()
        )
        client.app = app  # type: ignore[attr-defined]
        clients.append((client, lifespan))
        return client

    yield start
    for client, lifespan in clients:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


ECHO = {"start": {"tool": "echo", "args": {"a": 1}, "next": "after"},
        "after": {"tool": "echo", "args": {}, "done": True},
        "handle": {"tool": "echo", "args": {"why": "<<error.message>>"}, "done": True}}  # fmt: skip
CHARGE = {
    "start": {"tool": "charge", "args": {"amount": 5}, "on_error": "handle", "done": True},
    "handle": {"tool": "echo", "args": {"why": "<<error.message>>"}, "done": True},
}


async def test_an_interrupted_step_is_requeued_at_start(started, tmp_path):
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", ECHO)
    client = await started()
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert wf["steps"][0]["attempt"] == 2
    events = [e["type"] for e in await client.app.state.store.events(wf_id)]
    assert events[:4] == ["created", "step_started", "step_requeued", "step_started"]


async def test_an_interrupted_step_out_of_attempts_fails(started, tmp_path):
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", ECHO, attempts=3)
    client = await started(recovery_attempts=3)
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed"
    assert wf["steps"][0]["error"].startswith(
        "interrupted: the daemon ended without a clean stop while it ran"
    )
    assert "out of attempts after attempt 3" in wf["error"]


async def test_retry_policy_raises_the_recovery_budget(started, tmp_path):
    flow = {"start": {**ECHO["start"], "retry": {"max_attempts": 5}}, "after": ECHO["after"]}
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", flow, attempts=3)
    client = await started(recovery_attempts=3)
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["steps"][0]["attempt"] == 4


async def test_a_non_idempotent_step_waits_for_a_decision_then_retries(started, tmp_path):
    sample_tools.CHARGES.clear()
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", CHARGE)
    client = await started()
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "decision")
    step = wf["steps"][0]
    assert wf["status"] == "running" and step["status"] == "running"
    assert "not idempotent" in step["error"] and "retry or fail" in step["error"]
    assert sample_tools.CHARGES == []  # nothing ran again on its own
    # ready is for gates; a decision is retry or fail (an approve token may decide).
    assert (await client.post(f"/api/workflow/{step['id']}/ready")).status_code == 409
    resp = await client.post(f"/api/workflow/{step['id']}/retry", headers=auth("approver"))
    assert resp.status_code == 200 and resp.json() == {"queued": True}
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert wf["steps"][0]["attempt"] == 2 and wf["steps"][0]["decided_by"] == "approver"
    assert len(sample_tools.CHARGES) == 1
    assert (await client.post(f"/api/workflow/{step['id']}/retry")).status_code == 409


async def test_a_non_idempotent_step_cut_off_by_a_stop_waits_and_its_retry_costs_nothing(
    tmp_path,
):
    sample_tools.CHARGES.clear()
    app = create_app(make_config(tmp_path, tool_modules=MODULES, shutdown_grace=0.05))
    flow = {"start": {"tool": "slow_charge", "args": {"amount": 5, "seconds": 0.5}, "done": True}}
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://stepd",
                                     headers=auth()) as client:  # fmt: skip
            resp = await client.post("/api/workflow", json={"name": "cut", "flow": flow})
            wf_id = resp.json()["id"]
            await wait_for(client, wf_id, lambda w: w["steps"][0]["status"] == "running")
    # The lifespan ended: the grace ran out with the tool still charging.
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://stepd",
                                     headers=auth()) as client:  # fmt: skip
            wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "decision")
            step = wf["steps"][0]
            assert step["attempt"] == 1
            assert "planned stop" in step["error"] and "retry or fail" in step["error"]
            assert len(sample_tools.CHARGES) == 1  # not run again on its own
            assert (await client.post(f"/api/workflow/{step['id']}/retry")).status_code == 200
            wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["steps"][0]["attempt"] == 1
    assert orjson.loads(wf["steps"][0]["result_json"]) == {"charged": 5, "attempt": 1}
    assert len(sample_tools.CHARGES) == 2


async def test_a_non_idempotent_step_failed_by_a_person_goes_to_on_error(started, tmp_path):
    sample_tools.CHARGES.clear()
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", CHARGE)
    client = await started()
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "decision")
    step_id = wf["steps"][0]["id"]
    resp = await client.post(f"/api/workflow/{step_id}/fail", json={"reason": "charged already"})
    assert resp.status_code == 200 and resp.json() == {"failed": True}
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert [(s["state"], s["status"]) for s in wf["steps"]] == [
        ("start", "failed"),
        ("handle", "done"),
    ]
    assert orjson.loads(wf["steps"][1]["result_json"]) == {
        "why": "failed by james: charged already"
    }
    assert sample_tools.CHARGES == []
    assert (await client.post(f"/api/workflow/{step_id}/fail")).status_code == 409


@pytest.mark.parametrize("body", [[1], {"reason": 5}, {"why": "x"}])
async def test_fail_rejects_a_bad_body(started, tmp_path, body):
    wf_id = await interrupted_workflow(tmp_path / "stepd.db", CHARGE)
    client = await started()
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "decision")
    resp = await client.post(f"/api/workflow/{wf['steps'][0]['id']}/fail", json=body)
    assert resp.status_code == 400
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["steps"][0]["awaiting"] == "decision"


async def test_decisions_on_unknown_and_ordinary_steps(started):
    client = await started()
    assert (await client.post("/api/workflow/42/retry")).status_code == 404
    assert (await client.post("/api/workflow/42/fail")).status_code == 404
    body = {"name": "g", "flow": {"start": {"tool": None, "done": True}}}
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"],
                        lambda w: bool(w["steps"]))  # fmt: skip
    gate_id = wf["steps"][0]["id"]
    assert (await client.post(f"/api/workflow/{gate_id}/retry")).status_code == 409
    assert (await client.post(f"/api/workflow/{gate_id}/fail")).status_code == 409


async def test_an_expired_lease_is_recovered_while_running(started, tmp_path):
    client = await started(poll_interval=0.05)
    store = client.app.state.store
    # A running row nobody runs, its lease long gone (as another owner would leave it).
    created = await store.create_workflow(
        name="orphan", flow_json=orjson.dumps(ECHO).decode(), input_json="{}",
        created_by="james", first=NewStep("start", "start", None, 1),
    )  # fmt: skip
    backend.query(
        tmp_path / "stepd.db",
        "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt,"
        " run_at, created_at, lease_until) VALUES (:id, :wf, 'start', 'start', 'echo',"
        " 'running', 2, 1, 0, 0, :lease_until)",
        {"id": created.id + 10_000, "wf": created.id, "lease_until": now_ms() - 1},
    )
    wf = await wait_for(
        client, created.id,
        lambda w: any(s["id"] == created.id + 10_000 and s["status"] == "done"
                      for s in w["steps"]),
    )  # fmt: skip
    events = [e for e in await store.events(created.id) if e["step_id"] == created.id + 10_000]
    assert events[0]["type"] == "step_requeued"
    assert events[0]["data"]["reason"] == "its lease expired while it ran"
    assert wf is not None


async def test_running_steps_renew_their_leases(started, tmp_path):
    import asyncio

    client = await started(lease_s=1.0, poll_interval=0.05)
    body = {"name": "s", "flow": {"start": {"tool": "sleep", "args": {"seconds": 1.6},
                                            "done": True}}}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["status"] == "running")
    await asyncio.sleep(1.2)
    [(lease_until,)] = backend.query(tmp_path / "stepd.db",
                                     "SELECT lease_until FROM steps WHERE workflow_id = :wf",
                                     {"wf": wf_id})  # fmt: skip
    # Renewed past the first lease (started_at + 1 s) while the tool still runs.
    assert lease_until > wf["steps"][0]["started_at"] + 1000
    wf = await wait_for(client, wf_id, timeout=10)
    assert wf["status"] == "completed" and wf["steps"][0]["attempt"] == 1
    events = [e["type"] for e in await client.app.state.store.events(wf_id)]
    assert "step_requeued" not in events
