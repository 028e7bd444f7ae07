"""What one workflow may store: [limits] max_workflow_bytes, error and reason lengths."""

from __future__ import annotations

import gc
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from daemon.executor import INFO_CACHE
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import migrations, split_statements
from tests import backend
from tests.helpers import auth, wait_for, waiting_gate

BLOB = "x" * 100_000


async def test_a_looping_flow_stops_at_the_storage_limit(make_client: Any, tmp_path: Path) -> None:
    client, _ = await make_client(max_workflow_bytes=1_000_000)
    body = {
        "name": "hoarder",
        "input": {"blob": BLOB},
        # A way out that is never taken: a loop that cannot reach done is refused.
        "flow": {
            "start": {
                "tool": "echo",
                "args": {"blob": "<<input.blob>>", "stop": False},
                "branch": [{"if": "result.stop", "then": "end"}, {"else": "start"}],
            },
            "end": {"tool": "echo", "done": True},
        },
    }
    resp = await client.post("/api/workflow", json=body)
    wf = await wait_for(client, resp.json()["id"], timeout=20)
    assert wf["status"] == "failed"
    assert "max_workflow_bytes" in wf["error"] and "state 'start'" in wf["error"]
    stored = [s for s in wf["steps"] if s["result_json"] is not None]
    assert 5 <= len(stored) <= 9  # 100 kB each, and the input, within 1 MB
    last = wf["steps"][-1]
    assert last["status"] == "failed" and last["result_json"] is None
    assert last["attempt"] == 1
    [(total,)] = backend.query(tmp_path / "stepd.db", "SELECT sum(length(result_json)) FROM steps")
    assert total <= 1_000_000


async def test_on_error_does_not_catch_the_storage_limit(make_client: Any) -> None:
    client, _ = await make_client(max_workflow_bytes=50_000)
    body = {
        "name": "hoarder",
        "input": {"blob": BLOB[:40_000]},
        "flow": {
            "start": {"tool": "echo", "args": {"b": "<<input.blob>>"}, "next": "start",
                      "on_error": "cleanup"},
            "cleanup": {"tool": "echo", "args": {"ok": True}, "done": True},
        },
    }  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "failed"
    assert [s["name"] for s in wf["steps"]] == ["start"]


async def test_an_approval_over_the_limit_is_413_and_changes_nothing(make_client: Any) -> None:
    client, _ = await make_client(max_workflow_bytes=200_000)
    body = {"name": "gate", "flow": {"start": {"tool": None, "done": True}}}
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    assert gate is not None
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={"blob": "y" * 300_000})
    assert resp.status_code == 413, resp.text
    assert "max_workflow_bytes" in resp.json()["error"]
    assert waiting_gate(await wait_for(client, wf_id, waiting_gate)) is not None
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={"ok": True})
    assert resp.status_code == 200
    assert (await wait_for(client, wf_id))["status"] == "completed"


async def test_a_create_over_the_limit_is_413(make_client: Any) -> None:
    client, _ = await make_client(max_workflow_bytes=50_000)
    body = {"name": "big", "input": {"blob": BLOB},
            "flow": {"start": {"tool": "echo", "done": True}}}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 413
    assert (await client.get("/api/workflow")).json() == []


async def test_huge_error_messages_are_cut(make_client: Any) -> None:
    client, _ = await make_client()
    body = {
        "name": "loud",
        "flow": {
            "start": {
                "tool": "fail",
                "args": {"message": "e" * 200_000, "retryable": False},
                "done": True,
            }
        },
    }
    resp = await client.post("/api/workflow", json=body)
    wf = await wait_for(client, resp.json()["id"])
    error = wf["steps"][0]["error"]
    assert 4000 <= len(error) <= 4100 and error.endswith("(cut)")
    assert len(wf["error"]) <= 4200


async def test_long_reasons_are_refused(make_client: Any) -> None:
    client, _ = await make_client()
    body = {"name": "gate", "flow": {"start": {"tool": None, "done": True}}}
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    assert gate is not None
    url = f"/api/workflow/{gate['id']}/reject"
    resp = await client.post(url, json={"reason": "r" * 2001}, headers=auth("approver"))
    assert resp.status_code == 400
    assert "2000" in resp.json()["error"]
    assert waiting_gate(await wait_for(client, wf_id, waiting_gate)) is not None
    resp = await client.post(url, json={"reason": "r" * 2000}, headers=auth("approver"))
    assert resp.status_code == 200


@pytest.mark.sqlite_only  # SQLite's schema migration
async def test_the_migration_counts_running_workflows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    version = 0
    for number, script in migrations():
        if number >= 4:
            break
        for statement in split_statements(script):
            db.execute(statement)
        version = number
    db.execute(f"PRAGMA user_version = {version}")
    for wf_id, status in ((1, "running"), (2, "completed")):
        db.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at, "
            "updated_at) VALUES (?, 'w', '{}', '{\"a\": 1}', ?, 0, 0)",
            (wf_id, status),
        )
        db.execute(
            "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt, "
            "run_at, created_at, result_json) VALUES (?, ?, 's', 's', 'echo', 'done', 1, 1, "
            "0, 0, '\"ü\"')",
            (10 + wf_id, wf_id),
        )
    db.commit()
    db.close()
    store = Store(path)
    await store.open()
    await store.close()
    db = sqlite3.connect(path)
    counted = dict(db.execute("SELECT id, stored_bytes FROM workflows").fetchall())
    db.close()
    assert counted == {1: 2 + 8 + 4, 2: 0}  # bytes, not characters: ü is two


async def test_parsed_inputs_are_not_kept_past_a_budget(make_client: Any) -> None:
    # A megabyte of `{}` items parses into tens of megabytes: the executor's cache of
    # parsed flows and inputs is bounded by their size, not by their number.
    client, app = await make_client()
    body = {"name": "wide", "input": {"x": [{}] * 150_000},
            "flow": {"start": {"tool": "echo", "args": {"n": 1}, "done": True}}}  # fmt: skip
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(4):
            resp = await client.post("/api/workflow", json=body)
            await wait_for(client, resp.json()["id"])
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 16 * 2**20, f"{(after - before) / 2**20:.0f} MB still held"
    assert app.state.executor._infos_size <= INFO_CACHE
