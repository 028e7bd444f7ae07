"""Storage faults: a full disk gets 503 and changes nothing; the executor waits it out."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from daemon.storage import StorageUnavailable
from tests.helpers import wait_for

ECHO = {"name": "e", "flow": {"start": {"tool": "echo", "args": {"a": 1}, "done": True}}}
SLEEP_THEN_ECHO = {
    "name": "s",
    "flow": {
        "start": {"tool": "sleep", "args": {"seconds": 0.3}, "next": "b"},
        "b": {"tool": "echo", "args": {"big": "<<input.pad>>"}, "done": True},
    },
    "input": {"pad": "x" * 20_000},
}


async def fill_disk(app: Any) -> int:
    """Make the database "full": no page may be added (PRAGMA max_page_count)."""
    store = app.state.store
    (pages,) = await store._write(lambda db: db.execute("PRAGMA page_count").fetchone())
    await store._write(lambda db: db.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    return int(pages)


async def free_disk(app: Any) -> None:
    await app.state.store._write(
        lambda db: db.execute("PRAGMA max_page_count = 1073741823").fetchone()
    )


async def count(client: httpx.AsyncClient) -> int:
    return len((await client.get("/api/workflow?limit=1000")).json())


@pytest.mark.sqlite_only  # fills the disk with PRAGMA max_page_count
async def test_a_full_disk_answers_503_and_stores_nothing(client, app):
    before = await count(client)
    await fill_disk(app)
    big = {**ECHO, "input": {"pad": "y" * 200_000}}  # needs new pages
    resp = await client.post("/api/workflow", json=big)
    assert resp.status_code == 503, resp.text
    assert "full" in resp.json()["error"] and "nothing was changed" in resp.json()["error"]
    assert await count(client) == before  # reads still work, and nothing half-written
    await free_disk(app)
    resp = await client.post("/api/workflow", json=big)
    assert resp.status_code == 201
    assert (await wait_for(client, resp.json()["id"]))["status"] == "completed"


@pytest.mark.sqlite_only  # fills the disk with PRAGMA max_page_count
@pytest.mark.timeout(60)
async def test_the_executor_carries_on_when_the_fault_clears(client, app):
    wf_id = (await client.post("/api/workflow", json=SLEEP_THEN_ECHO)).json()["id"]
    await wait_for(client, wf_id, lambda wf: wf["steps"][0]["status"] == "running")
    await fill_disk(app)
    await asyncio.sleep(1.0)  # step b's 20 kB result cannot be written
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running"
    assert wf["steps"][-1]["state"] == "b" and wf["steps"][-1]["status"] == "running"
    assert wf["steps"][-1]["result_json"] is None  # nothing half-written
    await free_disk(app)
    wf = await wait_for(client, wf_id, timeout=30)
    assert wf["status"] == "completed"
    assert [s["status"] for s in wf["steps"]] == ["done", "done"]
    assert wf["steps"][0]["attempt"] == 1
    assert app.state.executor.healthy


class Outage:
    """The storage interface's fault hook: while on, the named operations (all when none
    are named) fail with StorageUnavailable before they run, as a lost database would."""

    def __init__(self, store: Any, *names: str) -> None:
        self.store, self.names, self.on, self.hits = store, set(names), False, 0
        store.faults = self

    def __call__(self, name: str) -> None:
        if self.on and (not self.names or name in self.names):
            self.hits += 1
            raise StorageUnavailable("the database is unreachable (injected fault)")


async def test_an_unreachable_database_answers_503_on_every_backend(client, app):
    outage = Outage(app.state.store, "create_workflow", "decide", "cancel_workflow")
    gated = {"name": "g", "flow": {"start": {"tool": None, "next": "b"},
                                   "b": {"tool": "echo", "args": {}, "done": True}}}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=gated)).json()["id"]
    before = await count(client)
    outage.on = True
    resp = await client.post("/api/workflow", json=ECHO)
    assert resp.status_code == 503 and "nothing was changed" in resp.json()["error"]
    gate = (await client.get(f"/api/workflow/{wf_id}")).json()["steps"][0]
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 503
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 503
    assert outage.hits == 3
    assert await count(client) == before  # nothing was written
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and wf["steps"][0]["awaiting"] == "ready"
    outage.on = False
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
    assert (await wait_for(client, wf_id))["status"] == "completed"


@pytest.mark.timeout(60)
async def test_the_executor_waits_out_an_outage_of_its_writes(client, app):
    outage = Outage(app.state.store, "finish_step", "finish_and_start", "claim_steps")
    wf_id = (await client.post("/api/workflow", json=SLEEP_THEN_ECHO)).json()["id"]
    await wait_for(client, wf_id, lambda wf: wf["steps"][0]["status"] == "running")
    outage.on = True
    await asyncio.sleep(1.0)  # the sleep ends; its outcome cannot be written
    assert outage.hits >= 1
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and wf["steps"][0]["status"] == "running"
    outage.on = False
    wf = await wait_for(client, wf_id, timeout=30)
    assert wf["status"] == "completed"
    assert [s["status"] for s in wf["steps"]] == ["done", "done"]
    assert wf["steps"][0]["attempt"] == 1  # an outage costs no attempt
    assert app.state.executor.healthy
