"""Retention purges finished workflows in batches; `stepd backup` copies a live database."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from daemon import retention
from daemon.cli import main
from daemon.models import NewStep
from daemon.storage import now_ms
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import backup
from tests import backend
from tests.helpers import wait_for

ECHO = {"name": "e", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
GATE = {"name": "g", "flow": {"start": {"tool": None, "done": True}}}


async def created_workflows(path: Path, n: int) -> list[int]:
    """`n` workflows of one pending echo step in a new database at `path`; their ids."""
    store = backend.open_store(path)
    await store.open()
    try:
        first = NewStep("start", "start", "echo", 1)
        return [
            (await store.create_workflow(name="w", flow_json="{}", input_json="{}",
                                         created_by="t", first=first)).id
            for _ in range(n)
        ]  # fmt: skip
    finally:
        await store.close()


async def test_purge_deletes_old_finished_workflows_in_batches(tmp_path: Path):
    ids = await created_workflows(tmp_path / "s.db", 7)
    day = retention.DAY_MS
    now = now_ms()
    # Seen three days from now: 5 finished three days ago, 1 still running, 1 finished
    # half a day ago.
    update = "UPDATE workflows SET status = :status, updated_at = :at WHERE id = :id"
    statuses = ["completed", "failed", "cancelled", "completed", "failed"]
    backend.write(
        tmp_path / "s.db",
        *[(update.replace(", updated_at = :at", ""), {"status": status, "id": wf_id})
          for wf_id, status in zip(ids[:5], statuses, strict=True)],
        (update, {"status": "completed", "at": now + int(2.5 * day), "id": ids[6]}),
    )  # fmt: skip
    now += 3 * day

    store = backend.open_store(tmp_path / "s.db")
    await store.open()
    batches = []
    real = store.purge_finished

    async def counting(**kw):
        n = await real(**kw)
        batches.append(n)
        return n

    store.purge_finished = counting  # type: ignore[method-assign]
    assert await retention.purge(store, days=1, batch=2, now=now) == 5
    assert batches == [2, 2, 1, 0]
    remaining = [w.id for w in await store.list_workflows(limit=100)]
    assert sorted(remaining) == sorted(ids[5:])
    for wf_id in ids[:5]:
        assert await store.steps(wf_id) == [] and await store.events(wf_id) == []
    assert await store.steps(ids[5]) != []
    await store.close()


async def test_a_purge_batch_is_bounded_by_steps_not_only_by_workflows(tmp_path: Path):
    ids = await created_workflows(tmp_path / "s.db", 4)
    insert = (
        "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at,"
        " created_at) VALUES (:id, :wf, 's', 's', 'echo', 'done', :seq, 0, 0)"
    )
    backend.write(
        tmp_path / "s.db",
        ("UPDATE workflows SET status = 'completed'", {}),
        # 1 + 40 steps each; the last workflow keeps its one step
        *[(insert, {"id": wf_id * 1000 + i, "wf": wf_id, "seq": i + 2})
          for wf_id in ids[:3] for i in range(40)],
    )  # fmt: skip
    store = backend.open_store(tmp_path / "s.db")
    await store.open()
    later = now_ms() + retention.DAY_MS
    batches = []
    while n := await store.purge_finished(cutoff=later, limit=100, max_steps=50):
        batches.append(n)
    assert batches == [1, 1, 2]  # 41 steps each; the last batch: 41 + 1
    assert await store.list_workflows() == []
    await store.close()


async def test_the_daemon_purges_on_its_own(make_app):
    app = make_app(retention_days=1 / 86_400, retention_interval_s=0.2)  # one second
    import httpx

    from tests.helpers import auth

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stepd", headers=auth()
        ) as client:
            done = (await client.post("/api/workflow", json=ECHO)).json()["id"]
            waiting = (await client.post("/api/workflow", json=GATE)).json()["id"]
            await wait_for(client, done)
            for _ in range(100):
                if (await client.get(f"/api/workflow/{done}")).status_code == 404:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get(f"/api/workflow/{done}")).status_code == 404
            assert (await client.get(f"/api/workflow/{waiting}")).json()["status"] == "running"


@pytest.mark.sqlite_only  # SQLite's online backup (PostgreSQL: pg_dump)
async def test_backup_while_writing_is_consistent(client, app, tmp_path: Path):
    async def writer() -> None:
        for _ in range(60):
            await client.post("/api/workflow", json=ECHO)

    task = asyncio.create_task(writer())
    copies = []
    for i in range(3):
        await asyncio.sleep(0.02)
        dest = tmp_path / f"copy{i}.db"
        pages = await asyncio.to_thread(backup, app.state.store.path, dest)
        assert pages > 0
        copies.append(dest)
    await task
    for dest in copies:
        db = sqlite3.connect(dest)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # A consistent snapshot: every workflow has its first step and its created event.
        orphans = db.execute(
            "SELECT count(*) FROM workflows w WHERE NOT EXISTS "
            "(SELECT 1 FROM steps s WHERE s.workflow_id = w.id) OR NOT EXISTS "
            "(SELECT 1 FROM events e WHERE e.workflow_id = w.id AND e.type = 'created')"
        ).fetchone()[0]
        assert orphans == 0
        db.close()
    assert not [p for p in copies if p.with_name(p.name + ".partial").exists()]  # noqa: ASYNC240


@pytest.mark.sqlite_only
def test_backup_command(tmp_path: Path, capsys):
    db_path = tmp_path / "live.db"

    async def make() -> None:
        store = Store(db_path)
        await store.open()
        await store.create_workflow(name="w", flow_json="{}", input_json="{}", created_by="t",
                                    first=NewStep("start", "start", "echo", 1))  # fmt: skip
        await store.close()

    asyncio.run(make())
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\npath = "{db_path}"\n')
    out = tmp_path / "backup.db"
    assert main(["backup", str(out), "--config", str(cfg)]) == 0
    assert "integrity ok" in capsys.readouterr().out
    assert sqlite3.connect(out).execute("SELECT count(*) FROM workflows").fetchone()[0] == 1
    assert main(["backup", str(db_path), "--config", str(cfg)]) == 1
    assert "must not overwrite" in capsys.readouterr().err
    missing = tmp_path / "m.toml"
    missing.write_text(f'[database]\npath = "{tmp_path / "nope.db"}"\n')
    assert main(["backup", str(out), "--config", str(missing)]) == 1
