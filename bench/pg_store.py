"""PostgreSQL store micro-benchmarks: claim throughput, NOTIFY wake latency, op latency.

    python -m bench.pg_store [--url postgresql://postgres@127.0.0.1:55432/postgres]
        [--pending 100000] [--ops 2000]

Makes a scratch database on the server (dropped at the end) and prints one line per
figure: a SKIP LOCKED claim of 64 over a big pending table (steps/s, through the store:
the claim, its events, the commit), a NOTIFY from one store waking another (after the
writer's commit), and single-operation latency (create, claim+finish, reads).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg

from daemon.models import Finish, NewStep, StepStatus, WorkflowStatus
from daemon.storage.postgres.store import PostgresStore


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def seed(url: str, n: int) -> None:
    """n pending steps of n/10 workflows, written with plain SQL (fast)."""
    with psycopg.connect(url, autocommit=True) as conn:
        now = int(time.time() * 1000) - 10_000
        conn.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at,"
            " updated_at) SELECT g, 'w', '{}', '{}', 'running', %s, %s"
            " FROM generate_series(1, %s) g",
            (now, now, n // 10),
        )
        conn.execute(
            "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at,"
            " created_at) SELECT 1000000 + g, 1 + g %% %s, 'a', 'a', 'echo', 'pending', 1,"
            " %s + g / 100, %s FROM generate_series(1, %s) g",
            (n // 10, now, now, n),
        )
        conn.execute("ANALYZE")


async def claims(url: str, pending: int) -> None:
    stores = [PostgresStore(url, node=f"bench-{i}", pool_size=4) for i in range(2)]
    for s in stores:
        await s.open()  # the first one migrates
    await seed(url, pending)
    try:
        for label, users in (("1 claimer", stores[:1]), ("2 stores x 2 claimers", stores * 2)):
            total = 0
            began = time.perf_counter()
            deadline = began + 3.0

            async def loop(store: PostgresStore, deadline: float = deadline) -> None:
                nonlocal total
                while time.perf_counter() < deadline:
                    got = await store.claim_steps(64, lease_ms=60_000)
                    if not got:
                        return
                    total += len(got)

            await asyncio.gather(*(loop(s) for s in users))
            took = time.perf_counter() - began
            print(f"claim 64 (SKIP LOCKED) over {pending:,} pending, {label}: "
                  f"{total / took:,.0f} steps/s ({total:,} in {took:.2f}s)")  # fmt: skip
        # The bare statement, no events: what the database alone does.
        with psycopg.connect(url, autocommit=True) as conn:
            n = 0
            began = time.perf_counter()
            while time.perf_counter() - began < 2.0:
                rows = conn.execute(
                    "UPDATE steps SET status = 'running', attempt = attempt + 1, owner = 'x'"
                    " WHERE id IN (SELECT id FROM steps WHERE status = 'pending'"
                    " AND run_at <= %s ORDER BY run_at, id LIMIT 64 FOR UPDATE SKIP LOCKED)"
                    " RETURNING *",
                    (int(time.time() * 1000),),
                ).fetchall()
                if not rows:
                    break
                n += len(rows)
            took = time.perf_counter() - began
            print(f"bare claim statement (UPDATE ... SKIP LOCKED RETURNING *, 64): "
                  f"{n / took:,.0f} steps/s")  # fmt: skip
    finally:
        for s in stores:
            await s.close()


async def notify(url: str) -> None:
    a = PostgresStore(url, node="bench-a", pool_size=2)
    b = PostgresStore(url, node="bench-b", pool_size=2)
    await a.open()
    await b.open()
    try:
        woke = asyncio.Event()
        b.change_hooks.append(lambda kind: kind == "remote" and woke.set())
        lat = []
        for _ in range(200):
            woke.clear()
            await a.secret("x")  # warm: a write that commits
            await a.write("bench", lambda db: db.execute("SELECT 1"))
            t = time.perf_counter()
            await asyncio.wait_for(woke.wait(), 2)
            lat.append((time.perf_counter() - t) * 1e3)
            await asyncio.sleep(0.002)
        print(f"NOTIFY wake (store A's commit returned -> store B's hook): "
              f"p50 {pct(lat, .5):.2f} ms, p95 {pct(lat, .95):.2f} ms")  # fmt: skip
    finally:
        await a.close()
        await b.close()
    # The same with two bare async connections, for scale.
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as sender,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as listener,
    ):
        await listener.execute("LISTEN bench")
        gen = listener.notifies()
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            await sender.execute("NOTIFY bench, 'x'")
            await anext(gen)
            lat.append((time.perf_counter() - t) * 1e3)
        await gen.aclose()  # it holds the connection until closed
        print(f"bare NOTIFY -> LISTEN (two async connections): p50 {pct(lat, 0.5):.2f} ms")


async def ops(url: str, n: int) -> None:
    store = PostgresStore(url, node="bench-ops", pool_size=8)
    await store.open()
    try:
        first = NewStep(state="a", name="a", tool="echo", seq=1)
        times: dict[str, list[float]] = {k: [] for k in ("create", "claim", "finish", "read")}
        for _ in range(n):
            t = time.perf_counter()
            created = await store.create_workflow(
                name="w", flow_json="{}", input_json="{}", created_by="t", first=first
            )
            t1 = time.perf_counter()
            got = await store.claim_steps(1, lease_ms=60_000)
            t2 = time.perf_counter()
            if got:
                step = got[0]
                await store.finish_step(Finish(
                    step_id=step.id, workflow_id=step.workflow_id, attempt=step.attempt,
                    status=StepStatus.DONE, result_json='{"ok":1}',
                    workflow_status=WorkflowStatus.COMPLETED,
                ))  # fmt: skip
            t3 = time.perf_counter()
            await store.get_workflow(created.id)
            t4 = time.perf_counter()
            times["create"].append((t1 - t) * 1e3)
            times["claim"].append((t2 - t1) * 1e3)
            times["finish"].append((t3 - t2) * 1e3)
            times["read"].append((t4 - t3) * 1e3)
        for k, v in times.items():
            print(f"op latency {k:7s} p50 {pct(v, .5):.2f} ms  p95 {pct(v, .95):.2f} ms  "
                  f"mean {statistics.fmean(v):.2f} ms")  # fmt: skip
        # Concurrent creates: operations per second with the pool busy.
        for conc in (8, 32):
            big = PostgresStore(url, node=f"bench-c{conc}", pool_size=conc)
            await big.open()
            try:
                done = 0
                began = time.perf_counter()

                async def worker(store: PostgresStore = big, began: float = began) -> None:
                    nonlocal done
                    while time.perf_counter() - began < 3.0:
                        await store.create_workflow(
                            name="w", flow_json="{}", input_json="{}", created_by="t",
                            first=first,
                        )  # fmt: skip
                        done += 1

                await asyncio.gather(*(worker() for _ in range(conc)))
                took = time.perf_counter() - began
                print(f"create_workflow, {conc} concurrent: {done / took:,.0f} ops/s")
            finally:
                await big.close()
        print(f"write retries (serialization/deadlock/duplicate): {store.retries}")
    finally:
        await store.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:55432/postgres")
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--ops", type=int, default=1000)
    args = ap.parse_args()
    name = f"bench_pg_{uuid.uuid4().hex[:8]}"
    base = args.url.rpartition("/")[0]
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    try:
        await claims(url, args.pending)
        await notify(url)
        await ops(url, args.ops)
    finally:
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
