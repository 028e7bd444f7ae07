"""Synchronous execution: what `POST /api/workflow?wait=` costs, and what waiting requests
cost everything else.

    python bench/sync_wait.py [--samples 200] [--waiters 50] [--database-url postgresql://...]

1. Over HTTP, against a real `stepd serve` (SQLite, or the PostgreSQL database given):
   p50/p95 of a one-step `echo` workflow's POST /api/workflow (201, answered at once) and
   of POST /api/workflow?wait=5 (200, answered once it completed), one at a time over one
   keep-alive connection; then the same with `--waiters` requests waiting all along:
   executes (?timeout=120) of a definition whose one run slot a run at a gate holds (each
   waits queued: nothing of theirs runs), then ?wait=120 creates of workflows whose one
   step sleeps (their tools run meanwhile).
2. In-process (the app without its HTTP server, SQLite): `--waiters` waiters on sleeping
   workflows while 200 other workflows run to the end, counting the store reads made
   (workflow rows, step lists, event log reads) against the same run with no waiter;
   once with the waiters following the process's event hub (what the API does), once
   with each reading the log itself after every commit (settle without a hub).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from common import free_port, read_only, running, start_daemon, stats
from stepd_bench import RawClient

ECHO = orjson.dumps(
    {"name": "sync", "flow": {"start": {"tool": "echo", "args": {"x": 1}, "done": True}}}
)


def sleeper(seconds: float) -> bytes:
    flow = {"start": {"tool": "sleep", "args": {"seconds": seconds}, "done": True}}
    return orjson.dumps({"name": "waiter", "flow": flow})


async def timed(port: int, path: str, want: int, samples: int) -> list[float]:
    raw = RawClient(port)
    times = []
    try:
        for i in range(samples + 10):
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            status, body = await raw.post(path, ECHO)
            elapsed = (time.perf_counter() - t0) * 1000
            if status != want:
                raise RuntimeError(f"{path} answered {status}: {body[:300]!r}")
            if want == 200 and orjson.loads(body)["status"] != "completed":
                raise RuntimeError(f"{path} answered before the end: {body[:300]!r}")
            if i >= 10:  # warm-up
                times.append(elapsed)
    finally:
        raw.close()
    return times


def line(label: str, times: list[float]) -> str:
    s = stats(times)
    return f"{label:<72} n={s['n']:<4} p50={s['p50']:7.2f} ms  p95={s['p95']:7.2f} ms"


async def timed_pair(port: int, samples: int, label: str) -> None:
    suffix = f", {label}" if label else ""
    print(
        line(f"POST /api/workflow (201){suffix}", await timed(port, "/api/workflow", 201, samples))
    )
    waited = await timed(port, "/api/workflow?wait=5", 200, samples)
    print(line(f"POST /api/workflow?wait=5 (200){suffix}", waited))


async def hold(port: int, waiters: list[asyncio.Task[Any]]) -> None:
    await asyncio.sleep(2.0)  # all created and waiting
    if any(w.done() for w in waiters):
        raise RuntimeError(f"a waiter was answered early: {[w for w in waiters if w.done()][0]}")


async def release(clients: list[RawClient], waiters: list[asyncio.Task[Any]]) -> None:
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for c in clients:
        c.close()


async def over_http(port: int, args: argparse.Namespace) -> None:
    await timed_pair(port, args.samples, "")
    n = args.waiters

    # Waiters that are only waiting: executes of a definition whose one run slot a run at
    # a gate holds, so that each waits queued (no step of theirs runs).
    raw = RawClient(port)
    gate = {"start": {"tool": None, "done": True}}
    definition = {"definition": {"name": "held", "concurrency": 1, "flow": gate}}
    status, answer = await raw.post("/api/workflows", orjson.dumps(definition))
    assert status == 201, answer
    status, answer = await raw.post("/api/workflows/held/run", b"{}")
    assert status == 202, answer
    raw.close()
    clients = [RawClient(port) for _ in range(n)]
    waiters = [asyncio.create_task(c.post("/api/workflows/held/execute?timeout=120", b"{}"))
               for c in clients]  # fmt: skip
    await hold(port, waiters)
    await timed_pair(port, args.samples, f"{n} executes waiting (queued runs)")
    await release(clients, waiters)

    # Waiters on workflows whose one step sleeps: their tools run meanwhile.
    clients = [RawClient(port) for _ in range(n)]
    waiters = [asyncio.create_task(c.post("/api/workflow?wait=120", sleeper(100))) for c in clients]
    await hold(port, waiters)
    await timed_pair(port, args.samples, f"{n} ?wait open (sleeping steps)")
    await release(clients, waiters)


# -- in-process read counts ------------------------------------------------------------


READS = ("get_workflow", "steps", "events_after", "max_event_id")


def count_reads(store: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name in READS:
        original = getattr(store, name)

        def wrapped(*a: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
            counts[_name] += 1
            return _f(*a, **kw)

        setattr(store, name, wrapped)
    return counts


async def in_process(tmp: Path, waiters: int, mode: str) -> tuple[Counter[str], int, float]:
    """Reads while 200 workflows run past `waiters` waiters (mode: hub, log, none)."""
    from daemon import outcome
    from daemon.api import create_app
    from daemon.config import Config

    # Room for the sleeping waiters' steps and the timed workflows at once.
    config = Config(db_path=tmp / f"{mode}.db", state_dir=tmp, tokens=(), poll_interval=1.0,
                    shutdown_grace=0.2, concurrency=waiters + 16,
                    max_running_per_token=waiters + 16)  # fmt: skip
    app = create_app(config)
    async with app.router.lifespan_context(app):
        engine, hub = app.state.engine, app.state.events
        body = orjson.loads(sleeper(100))
        tasks = []
        for _ in range(waiters if mode != "none" else 0):
            created = await engine.create(body, created_by="bench")
            kw = {"hub": hub} if mode == "hub" else {}
            tasks.append(asyncio.create_task(outcome.settle(engine.store, created.id, 300, **kw)))
        await asyncio.sleep(1.0)
        counts = count_reads(engine.store)
        commits = Counter[str]()
        engine.store.commit_hooks.append(lambda _s, _b: commits.update(["commit"]))
        began = time.perf_counter()
        echo = orjson.loads(ECHO)
        ids = [(await engine.create(echo, created_by="bench")).id for _ in range(200)]
        # Watched from a connection of its own: the store's reads are what is counted.
        with contextlib.closing(read_only(config.db_path)) as conn:
            sql = "SELECT count(*) FROM workflows WHERE status = 'completed' AND id >= ?"
            while conn.execute(sql, (ids[0],)).fetchone()[0] < len(ids):
                await asyncio.sleep(0.005)
        took = time.perf_counter() - began
        got = Counter(counts)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got, commits["commit"], took


async def reads(waiters: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        rows = {mode: await in_process(Path(d), waiters, mode) for mode in ("none", "hub", "log")}
    base = rows["none"][0]
    print(
        f"\nstore reads while 200 one-step workflows ran ({waiters} waiters on sleeping workflows):"
    )
    for mode, (counts, commits, took) in rows.items():
        extra = {k: counts[k] - base[k] for k in READS}
        label = {"none": "no waiter", "hub": "waiters on the hub (the API)",
                 "log": "waiters reading the log per commit"}[mode]  # fmt: skip
        print(f"  {label:<36} {commits:5d} commits, {took * 1000:6.0f} ms; reads "
              + ", ".join(f"{k} {counts[k]}" for k in READS)
              + ("" if mode == "none" else "  (more than with none: "
                 + ", ".join(f"{k} {v:+d}" for k, v in extra.items()) + ")"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--waiters", type=int, default=50)
    ap.add_argument("--database-url", default="")
    ap.add_argument("--skip-reads", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        port = free_port()
        backend = "PostgreSQL" if args.database_url else "SQLite"
        print(f"stepd serve on {backend}, one-step echo workflows, one request at a time")
        with (
            open(Path(d) / "daemon.log", "wb") as log,
            running(start_daemon(Path(d), port, log=log, database_url=args.database_url)),
        ):
            asyncio.run(over_http(port, args))
    if not args.skip_reads:
        asyncio.run(reads(args.waiters))


if __name__ == "__main__":
    main()
