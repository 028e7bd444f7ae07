"""PostgreSQL only: what several daemons on one database rely on, with real concurrency.

The event log never skips a row while writers commit out of id order; two stores
claiming at once never take the same step; ids stay in order across stores; one store
holds a singleton job; a write on one store wakes the other (NOTIFY).

Runs in the PostgreSQL pass (STEPD_TEST_BACKEND=postgresql), on the session's server
(tests/postgres.py: a throwaway one, or STEPD_TEST_PG_URL).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

psycopg = pytest.importorskip("psycopg")

from daemon.models import NewStep  # noqa: E402
from daemon.storage.postgres.store import PostgresStore, migrations  # noqa: E402
from tests import postgres  # noqa: E402

pytestmark = pytest.mark.postgresql_only


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    server = postgres.server()
    admin = psycopg.connect(server.url, autocommit=True, connect_timeout=3)
    name = f"pg_events_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url_for(name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Two stores (two daemons' worth) on one database."""
    opened = [PostgresStore(pg_url, node=f"node-{i}", pool_size=8) for i in range(2)]
    await asyncio.gather(*(s.open() for s in opened))  # both migrate at once: once
    try:
        yield opened
    finally:
        for s in opened:
            await s.close()


async def _workflow(store: PostgresStore, tool: str | None = "echo") -> int:
    created = await store.create_workflow(
        name="w", flow_json="{}", input_json="{}", created_by=None,
        first=NewStep(state="a", name="a", tool=tool, seq=1, timeout_ms=60_000),
    )  # fmt: skip
    return created.id


async def test_migrating_at_once_migrates_once(stores: list[PostgresStore]) -> None:
    latest = migrations()[-1][0]
    assert [await s.schema_version() for s in stores] == [latest, latest]


async def test_event_log_never_skips_a_row_with_concurrent_writers(
    stores: list[PostgresStore], pg_url: str
) -> None:
    """8 writer threads insert events in transactions that take 0-20 ms (some roll back),
    so ids commit out of order; readers follow with after-cursors, one through the store
    (commit order below pg_snapshot_xmin), one by plain `id > after`, as SQLite reads.
    The store's reader sees every committed event exactly once."""
    store = stores[0]
    wf = await _workflow(store)
    start_id = await store.max_event_id()
    committed: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    joined = threading.Event()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not stop.is_set():
                ids = []
                rolled_back = rnd.random() < 0.1
                with conn.transaction() as tx:
                    for _ in range(rnd.randint(1, 4)):
                        (event_id,) = conn.execute(
                            "INSERT INTO events (workflow_id, type, at) VALUES (%s, 'x', 0)"
                            " RETURNING id",
                            (wf,),
                        ).fetchone()
                        ids.append(event_id)
                        time.sleep(rnd.random() * 0.005)
                    time.sleep(rnd.random() * 0.015)
                    if rolled_back:
                        raise psycopg.Rollback(tx)
                if rolled_back:
                    continue
                with lock:
                    committed.update(ids)

    seen: list[int] = []
    stop_at = [0.0]
    naive_seen: list[int] = []

    async def follow() -> None:
        after = start_id
        naive_after = start_id
        while True:
            done = joined.is_set()  # every writer has ended: `committed` is final
            rows = await store.events_after(after, limit=50)
            seen.extend(r["id"] for r in rows)
            if rows:
                after = rows[-1]["id"]
            naive = await store._all(
                "SELECT id FROM events WHERE id > %(after)s ORDER BY id LIMIT 50",
                {"after": naive_after},
            )
            naive_seen.extend(r[0] for r in naive)
            if naive:
                naive_after = naive[-1][0]
            if done and not rows and not naive:
                # Rows appear once every older transaction (of any client of the server)
                # has ended: wait for the committed ones, a while.
                with lock:
                    if committed <= set(seen) or time.monotonic() > stop_at[0] + 10:
                        return
            if not rows:
                await asyncio.sleep(0.001)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    reader = asyncio.create_task(follow())
    await asyncio.sleep(3.0)
    stop_at[0] = time.monotonic()
    stop.set()
    for t in threads:
        await asyncio.to_thread(t.join)
    joined.set()
    await asyncio.wait_for(reader, 30)

    assert len(committed) > 200
    assert len(seen) == len(set(seen)), "an event was read twice"
    assert set(seen) == committed, f"missed {len(committed - set(seen))} committed events"
    # What the plain id order would have done (not asserted: it depends on timing).
    missed = len(committed - set(naive_seen))
    print(f"\n{len(committed)} events; reading by id > after would have missed {missed}")


async def test_two_stores_claiming_at_once_never_claim_the_same_step(
    stores: list[PostgresStore],
) -> None:
    a, b = stores
    for _ in range(300):
        await _workflow(a)
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    async def claim(store: PostgresStore, name: str) -> None:
        while steps := await store.claim_steps(7, lease_ms=60_000):
            claimed[name] += [s.id for s in steps]
            assert all(s.attempt == 1 for s in steps)

    await asyncio.gather(claim(a, "a"), claim(b, "b"), claim(a, "a"), claim(b, "b"))
    both = claimed["a"] + claimed["b"]
    assert len(both) == len(set(both)) == 300
    assert claimed["a"] and claimed["b"], "both daemons took a share"
    owners = await a._all("SELECT owner, count(*) FROM steps GROUP BY owner ORDER BY 1", {})
    assert {r[0]: r[1] for r in owners} == {"node-0": len(claimed["a"]),
                                            "node-1": len(claimed["b"])}  # fmt: skip


async def test_recovery_takes_own_and_expired_steps_only(stores: list[PostgresStore]) -> None:
    a, b = stores
    for _ in range(3):
        await _workflow(a)
    (s1,) = await a.claim_steps(1, lease_ms=60_000)
    (s2,) = await b.claim_steps(1, lease_ms=60_000)
    (s3,) = await b.claim_steps(1, lease_ms=-1)  # its lease has run out
    assert {s.id for s in await a.recoverable(limit=10)} == {s1.id, s3.id}
    assert {s.id for s in await b.recoverable(limit=10)} == {s2.id, s3.id}


async def test_ids_increase_across_stores(stores: list[PostgresStore]) -> None:
    """A step written by one daemon after another daemon's gets the larger id, whichever
    daemon wrote more before (a workflow's steps are ordered by id)."""
    a, b = stores
    for _ in range(50):
        await _workflow(a)  # a hands out many ids, b none
    last = 0
    for i in range(40):
        store = (a, b)[i % 2]
        wf = await _workflow(store)
        assert wf > last
        steps = await store.steps(wf)
        assert steps[0].id > wf
        last = steps[0].id


async def test_one_store_leads_a_job_until_it_closes(pg_url: str) -> None:
    a = PostgresStore(pg_url, node="a", pool_size=2)
    b = PostgresStore(pg_url, node="b", pool_size=2)
    await a.open()
    await b.open()
    try:
        assert await a.lead("retention")
        assert await a.lead("retention")  # held, asked again
        assert not await b.lead("retention")
        assert await b.lead("gates")
        await a.close()
        # The server drops a's locks when its backend has seen the connection end: soon.
        deadline = time.monotonic() + 5
        while not await b.lead("retention"):
            assert time.monotonic() < deadline, "b never took the job over"
            await asyncio.sleep(0.01)
    finally:
        await b.close()
        await a.close()


async def test_a_write_on_one_store_wakes_the_other(stores: list[PostgresStore]) -> None:
    a, b = stores
    woke = asyncio.Event()
    b.change_hooks.append(lambda kind: kind == "remote" and woke.set())
    own = asyncio.Event()
    a.change_hooks.append(lambda kind: kind != "commit" and own.set())
    latencies = []
    for _ in range(20):
        woke.clear()
        await _workflow(a)
        committed = time.perf_counter()
        await asyncio.wait_for(woke.wait(), 2)
        latencies.append(time.perf_counter() - committed)
    assert not own.is_set(), "a store does not wake itself"
    latencies.sort()
    print(f"\nNOTIFY wake after commit: p50 {latencies[10] * 1e3:.2f} ms")


async def test_shared_secret_is_made_once(stores: list[PostgresStore]) -> None:
    a, b = stores
    first, second = await asyncio.gather(a.secret("server"), b.secret("server"))
    assert first == second and len(first) == 32
    assert await a.secret("webhook") != first


async def test_deliveries_are_claimed_by_one_store(stores: list[PostgresStore]) -> None:
    a, b = stores
    wf = await _workflow(a)
    rows = [{"event_id": i, "workflow_id": wf, "url": "http://r/", "dest": "http://r:80",
             "body_json": "{}"} for i in range(1, 21)]  # fmt: skip
    await a.enqueue_deliveries("notifier", 0, rows)
    due = await a.due_deliveries(per_dest=50, per_operator=5, limit=50)
    ids = [r["id"] for r in due]
    assert len(ids) == 20
    got_a, got_b = await asyncio.gather(
        a.claim_deliveries(ids, visibility_ms=60_000), b.claim_deliveries(ids, visibility_ms=60_000)
    )
    assert sorted(got_a + got_b) == sorted(ids)
    assert not set(got_a) & set(got_b)
    assert await b.due_deliveries(per_dest=50, per_operator=5, limit=50) == []  # held


async def test_connections_the_server_dropped_are_replaced(stores: list[PostgresStore]) -> None:
    a, _ = stores
    await _workflow(a)
    kinds: list[str] = []
    a.change_hooks.append(kinds.append)
    with psycopg.connect(postgres.server().url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (a.url.rpartition("/")[2],),
        )
    await asyncio.sleep(0.1)
    # Every pooled connection is dead: writes and reads take fresh ones, nothing fails.
    for _ in range(10):
        await _workflow(a)
        assert len(await a.list_workflows(limit=100)) >= 2
    # And the LISTEN connection comes back (a reconnect counts as a change).
    deadline = time.monotonic() + 10
    while "reconnect" not in kinds:
        assert time.monotonic() < deadline, kinds
        await asyncio.sleep(0.05)


async def test_an_unreachable_server_is_storage_unavailable() -> None:
    from daemon.storage.types import StorageUnavailable

    store = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", node="x", pool_size=1)
    with pytest.raises(StorageUnavailable):
        await store.open()
