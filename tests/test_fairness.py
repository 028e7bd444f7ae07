"""Each token's share of the run slots ([executor] max_running_per_token): one token's long
steps or its backlog never take the slots of the others."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.auth import hash_token
from daemon.config import TokenConfig
from daemon.models import NewStep
from daemon.storage import now_ms
from daemon.storage.sqlite.store import SqliteStore as Store
from daemon.storage.sqlite.store import migrations, split_statements
from tests import backend
from tests.helpers import TOKENS, wait_for

PEOPLE = {**TOKENS, "mallory": ("tok-mallory", ("workflow",)),
          "victor": ("tok-victor", ("workflow",))}  # fmt: skip
CONFIG_TOKENS = tuple(TokenConfig(name, hash_token(tok), perms)
                      for name, (tok, perms) in PEOPLE.items())  # fmt: skip
LONG = {"name": "long", "flow": {"start": {"tool": "sleep", "args": {"seconds": 3600},
                                           "done": True}}}  # fmt: skip
ECHO = {"name": "echo", "flow": {"start": {"tool": "echo", "args": {"x": 1}, "done": True}}}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {PEOPLE[name][0]}"}


async def create(client: httpx.AsyncClient, who: str, body: dict[str, Any]) -> int:
    resp = await client.post("/api/workflow", json=body, headers=as_(who))
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


async def first_step(client: httpx.AsyncClient, wf_id: int) -> dict[str, Any]:
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    return dict(wf["steps"][-1])


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def start(make_client: Any, **overrides: Any) -> tuple[httpx.AsyncClient, Any]:
    """An app with four run slots (a share of two per token) and the tokens above."""
    overrides = {"concurrency": 4, "tokens": CONFIG_TOKENS, "shutdown_grace": 0.0, **overrides}
    return await make_client(**overrides)  # type: ignore[no-any-return]


async def test_a_tokens_long_steps_and_backlog_leave_the_other_slots_to_others(make_client):
    client, app = await start(make_client)
    ex = app.state.executor
    # More queued than any claim batch: none of it may hide victor's step.
    mallory = [await create(client, "mallory", LONG) for _ in range(300)]

    async def two_running() -> bool:
        return bool(ex.running == 2)

    await until(two_running)
    victor = await create(client, "victor", ECHO)
    wf = await wait_for(client, victor, timeout=10)
    assert wf["status"] == "completed"
    assert ex.running == 2  # mallory's share, no more, though two slots were free
    statuses = [(await first_step(client, i))["status"] for i in mallory[:5]]
    assert statuses == ["running", "running", "pending", "pending", "pending"]


async def test_hand_offs_respect_the_share(make_client):
    # Slots are free and nothing is queued, so every step below would be handed off (written
    # as running at once) but for mallory's share.
    client, app = await start(make_client)
    first = [await create(client, "mallory", LONG) for _ in range(2)]
    third = await create(client, "mallory", LONG)
    assert (await first_step(client, third))["status"] == "pending"
    gated = {"name": "gated", "flow": {
        "start": {"tool": None, "next": "work"},
        "work": {"tool": "sleep", "args": {"seconds": 3600}, "done": True}}}  # fmt: skip
    gate_wf = await create(client, "mallory", gated)
    gate = await first_step(client, gate_wf)
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", headers=as_("approver"))
    assert resp.status_code == 200, resp.text
    assert (await first_step(client, gate_wf))["status"] == "pending"  # not handed off
    await asyncio.sleep(0.3)  # claims ran meanwhile (each create wakes the executor)
    assert app.state.executor.running == 2
    # Another token's step is still handed off.
    victor = await create(client, "victor", LONG)
    assert (await first_step(client, victor))["status"] == "running"
    # One of mallory's ends: her oldest queued step takes its place, the other waits.
    assert (await client.delete(f"/api/workflow/{first[0]}")).status_code == 200

    async def third_running() -> bool:
        return (await first_step(client, third))["status"] == "running"

    await until(third_running)
    assert (await first_step(client, gate_wf))["status"] == "pending"
    assert app.state.executor.running == 3


async def test_a_tokens_share_frees_up_as_its_steps_finish(make_client):
    client, app = await start(make_client)
    chain = {"name": "chain", "flow": {
        "start": {"tool": "sleep", "args": {"seconds": 0.1}, "next": "b"},
        "b": {"tool": "sleep", "args": {"seconds": 0.1}, "done": True}}}  # fmt: skip
    ids = [await create(client, "mallory", chain) for _ in range(6)]
    peak = 0
    done: list[dict[str, Any]] = []
    while len(done) < len(ids):
        peak = max(peak, app.state.executor.running)
        listed = (await client.get("/api/workflow?status=completed")).json()
        done = [w for w in listed if w["id"] in ids]
        await asyncio.sleep(0.01)
    assert peak == 2  # her share was used, never more, and freed up for the rest


async def test_a_templated_sleep_beyond_a_year_fails_without_retry(make_client):
    client, _ = await start(make_client)
    body = {"name": "forever", "flow": {"start": {
        "tool": "sleep", "args": {"seconds": "{{ 1e9 }}"}, "done": True,
        "retry": {"max_attempts": 3}}}}  # fmt: skip
    wf = await wait_for(client, await create(client, "mallory", body), timeout=10)
    assert wf["status"] == "failed"
    step = wf["steps"][0]
    assert step["attempt"] == 1
    assert "at most 31622400" in step["error"]


# -- the store ------------------------------------------------------------------------------


async def test_the_claim_skips_a_token_at_its_share_whatever_its_backlog(tmp_path: Path):
    path = tmp_path / "s.db"
    store = backend.open_store(path, max_running_per_token=2)
    await store.open()
    try:
        now = now_ms()
        rows = [(10 + i, 1, "running", now + 60_000, "mallory") for i in range(2)]
        rows += [(100 + i, 1, "pending", None, "mallory") for i in range(5000)]
        rows += [(90_000, 2, "pending", None, "victor")]  # queued behind all of hers
        backend.write(
            path,
            ("INSERT INTO workflows (id, name, flow_json, input_json, status, created_by,"
             " created_at, updated_at) VALUES (:id, 'w', '{}', '{}', 'running', :who, 0, 0)",
             [{"id": 1, "who": "mallory"}, {"id": 2, "who": "victor"}]),
            ("INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt,"
             " run_at, created_at, lease_until, created_by)"
             " VALUES (:id, :wf, 's', 's', 'echo', :status, 1, 0, 1, 1, :lease, :who)",
             [dict(zip(("id", "wf", "status", "lease", "who"), r, strict=True)) for r in rows]),
        )  # fmt: skip
        # The due step of victor is known to be due, none of mallory's: no busy claiming.
        assert await store.next_due() == 1
        claimed = await store.claim_steps(64, now=now)
        assert [s.id for s in claimed] == [90_000]
        assert await store.next_due() is None  # hers wait for a slot of her own
        assert await store.claim_steps(64, now=now) == []
        # One of hers ends: one more of hers, the oldest.
        backend.query(path, "UPDATE steps SET status = 'done' WHERE id = 10")
        assert await store.next_due() == 1
        assert [s.id for s in await store.claim_steps(64, now=now)] == [100]
    finally:
        await store.close()


async def test_steps_carry_their_workflows_token(tmp_path: Path):
    store = backend.open_store(tmp_path / "s.db")
    await store.open()
    try:
        created = await store.create_workflow(
            name="w", flow_json="{}", input_json="{}", created_by="victor",
            first=NewStep("start", "start", "echo", 1), start_lease_ms=30_000,
        )  # fmt: skip
        second = await store.create_workflow(
            name="w", flow_json="{}", input_json="{}", created_by=None,
            first=NewStep("start", "start", "echo", 1),
        )  # fmt: skip
        rows = await store.read_slow("SELECT id, status, created_by FROM steps ORDER BY id", {})
        assert [tuple(r) for r in rows] == [
            (created.first_step_id, "running", "victor"),
            (second.first_step_id, "pending", None),
        ]
    finally:
        await store.close()


@pytest.mark.sqlite_only  # SQLite's schema migration
async def test_the_migration_gives_live_steps_their_token(tmp_path: Path):
    old = sqlite3.connect(tmp_path / "stepd.db")
    for number, script in migrations():
        if number < 6:
            for statement in split_statements(script):
                old.execute(statement)
            old.execute(f"PRAGMA user_version = {number}")
    old.execute(
        "INSERT INTO workflows (id, name, flow_json, input_json, status, created_by,"
        " created_at, updated_at) VALUES (1, 'w', '{}', '{}', 'running', 'mallory', 0, 0)"
    )
    old.executemany(
        "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt, run_at,"
        " created_at, lease_until) VALUES (?, 1, 's', 's', 'echo', ?, 1, 1, 0, 0, ?)",
        [(10, "done", None), (11, "running", 1 << 50), (12, "pending", None),
         (13, "pending", None)],
    )  # fmt: skip
    old.commit()
    old.close()
    store = Store(tmp_path / "stepd.db", max_running_per_token=2)
    await store.open()
    try:
        rows = await store.read_slow("SELECT id, created_by FROM steps ORDER BY id", {})
        assert [tuple(r) for r in rows] == [
            (10, None), (11, "mallory"), (12, "mallory"), (13, "mallory")
        ]  # fmt: skip
        # Counted as hers: one more of hers may run, not two.
        assert [s.id for s in await store.claim_steps(64)] == [12]
    finally:
        await store.close()


@pytest.mark.sqlite_only  # reads a token on the SQLite writer's connection
async def test_the_token_cache_stays_bounded_however_many_workflows_are_created(tmp_path: Path):
    """Creating a workflow remembers its token; past TOKEN_CACHE workflows the oldest are
    forgotten, and a forgotten one's token is read again when a hand-off needs it."""
    from daemon.storage.base import TOKEN_CACHE

    store = Store(tmp_path / "s.db", max_running_per_token=2)
    await store.open()
    try:
        first = NewStep("start", "start", None, 1)
        made = await asyncio.gather(*(
            store.create_workflow(name=f"w{i}", flow_json="{}", input_json="{}",
                                  created_by=f"t{i % 3}", first=first)
            for i in range(TOKEN_CACHE + 500)
        ))  # fmt: skip
        assert len(store._tokens) == TOKEN_CACHE
        oldest = made[0].id
        assert oldest not in store._tokens
        assert store._writer is not None
        assert store._token(store._writer, oldest) == "t0"
        assert len(store._tokens) == TOKEN_CACHE
    finally:
        await store.close()
