"""stepd on PostgreSQL: several daemons on one database (the suite's PostgreSQL rows).

    python bench/multi_daemon.py throughput --daemons 3 --workflows 2000 [--json PATH]
    python bench/multi_daemon.py latency --samples 100 [--json PATH]

The server is STEPD_BENCH_PG_URL, else a throwaway durable one (bench/pg_server.py); each
run gets a fresh database on it, dropped at the end.

Throughput: the suite's workload (W workflows of two `echo` steps, step 2 consuming step
1's result) POSTed by the same raw-asyncio client (64 keep-alive connections in all,
split evenly over the daemons, each daemon getting every N-th workflow); the clock runs
from the first submit until all W are `completed`, read from the database every 10 ms.

Latency (idle, one workflow at a time, tool bodies stamp time.time_ns()):
  create -> first step started    POST /api/workflow sent to daemon B -> step 1 body starts
  step done -> next step started  step 1 body returns -> step 2 body starts
  written on A -> started on B    POST sent to daemon A, whose one run slot is taken (a
                                  long `sleep`), -> the step starts on daemon B (A's commit
                                  NOTIFYs B; polls are 1 s apart). Each sample checks in the
                                  database that B ran it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pg_server
from common import (
    CLAIM_BATCH,
    CONCURRENCY,
    CONNECTIONS,
    TOKEN,
    exit_on_sigterm,
    free_port,
    start_daemon,
    stats,
    stop_process,
)
from stepd_bench import SPAN_TWO, WARMUP, RawClient, Submitter, bodies, create

SPAN_ONE = {"start": {"tool": "span", "args": {}, "done": True}}
NODES = "abcdefgh"


@contextlib.contextmanager
def database() -> Any:
    """A fresh database on the benchmarks' server, dropped afterwards."""
    admin = pg_server.server()
    url = pg_server.create_database(admin)
    try:
        yield url
    finally:
        pg_server.drop_database(admin, url)


@contextlib.contextmanager
def daemons(tmp: Path, url: str, concurrency: list[int], poll_interval: float = 1.0) -> Any:
    """One `stepd serve` per entry of `concurrency`, all on `url`; yields their ports."""
    procs, ports, logs = [], [], []
    try:
        for i, slots in enumerate(concurrency):
            port = free_port()
            log = (tmp / f"daemon-{NODES[i]}.log").open("wb")
            logs.append(log)
            procs.append(start_daemon(
                tmp, port, poll_interval=poll_interval, concurrency=slots, log=log,
                database_url=url, node_id=NODES[i], claim_batch=CLAIM_BATCH,
            ))  # fmt: skip
            ports.append(port)
        yield ports
    except BaseException:
        for log in logs:
            log.flush()
            text = Path(log.name).read_text(errors="replace")[-3000:]
            sys.stderr.write(f"--- {log.name} ---\n{text}\n")
        raise
    finally:
        for proc in procs:
            stop_process(proc)
        for log in logs:
            log.close()


async def wait_completed(url: str, target: int, timeout: float) -> float:
    """perf_counter() when `target` workflows are completed (read every 10 ms)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        deadline = time.perf_counter() + timeout
        while True:
            cur = await conn.execute("SELECT status, count(*) FROM workflows GROUP BY status")
            counts = {str(s): int(n) for s, n in await cur.fetchall()}
            if counts.get("failed") or counts.get("cancelled"):
                raise RuntimeError(f"workflows did not complete: {counts}")
            if counts.get("completed", 0) >= target:
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{counts} after {timeout:.0f} s, wanted {target} completed")
            await asyncio.sleep(0.01)


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    n = args.daemons
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d, database() as url:
        with daemons(Path(d), url, [args.concurrency] * n) as ports:
            per = max(1, args.connections // n)
            clients = [Submitter(port, "/api/workflow", per) for port in ports]

            async def submit(work: list[bytes]) -> None:
                await asyncio.gather(*(c.submit(work[i::n]) for i, c in enumerate(clients)))

            await submit(bodies(WARMUP * n))
            await wait_completed(url, WARMUP * n, 60)
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            done = asyncio.create_task(
                wait_completed(url, WARMUP * n + args.workflows, args.timeout)
            )
            await submit(bodies(args.workflows, WARMUP * n))
            submitted = time.perf_counter() - t0
            elapsed = await done - t0
            client_cpu = time.process_time() - cpu0
    w = args.workflows
    return {
        "system": "stepd", "mode": "http", "backend": "postgresql", "daemons": n,
        "workflows": w, "elapsed_s": elapsed, "submit_s": submitted, "wf_per_s": w / elapsed,
        "steps_per_s": 2 * w / elapsed, "concurrency": args.concurrency,
        "claim_batch": CLAIM_BATCH, "connections": per * n, "client_cpu_s": client_cpu,
    }  # fmt: skip


async def wait_finished(conn: Any, wf_id: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cur = await conn.execute("SELECT status FROM workflows WHERE id = %s", (wf_id,))
        row = await cur.fetchone()
        if row is not None and row[0] != "running":
            if row[0] != "completed":
                raise RuntimeError(f"workflow {wf_id} ended {row[0]}")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workflow {wf_id} still {row} after {timeout} s")
        await asyncio.sleep(0.001)


async def step_results(conn: Any, wf_id: int) -> list[tuple[dict[str, Any], str]]:
    """(result, owner) of the workflow's steps, in order."""
    cur = await conn.execute(
        "SELECT result_json, owner FROM steps WHERE workflow_id = %s ORDER BY seq", (wf_id,)
    )
    return [(orjson.loads(r), owner) for r, owner in await cur.fetchall()]


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d, database() as url:
        # a: one run slot, kept busy; b: free.
        with daemons(Path(d), url, [1, CONCURRENCY]) as (port_a, port_b):
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                on_a, on_b = RawClient(port_a), RawClient(port_b)
                first, following, across = [], [], []
                for i in range(10 + args.samples):  # 10 warm-up samples
                    await asyncio.sleep(0.01)
                    t0 = time.time_ns()
                    wf_id = await create(on_b, SPAN_TWO)
                    await wait_finished(conn, wf_id)
                    (s1, _), (s2, _) = await step_results(conn, wf_id)
                    if i >= 10:
                        first.append((s1["start"] - t0) / 1e6)
                        following.append((s2["start"] - s1["end"]) / 1e6)
                busy = await create(on_a, {"start": {"tool": "sleep", "args": {"seconds": 3600},
                                                     "done": True}})  # fmt: skip
                while (await step_results_status(conn, busy)) != "running":
                    await asyncio.sleep(0.01)
                for i in range(5 + args.samples):
                    await asyncio.sleep(0.01 + 0.137 * (i % 7))  # across the poll cycle
                    t0 = time.time_ns()
                    wf_id = await create(on_a, SPAN_ONE)
                    await wait_finished(conn, wf_id)
                    ((s, owner),) = await step_results(conn, wf_id)
                    if owner != "b":
                        raise RuntimeError(f"a step created on a ran on {owner}, not b")
                    if i >= 5:
                        across.append((s["start"] - t0) / 1e6)
                on_a.close()
                on_b.close()
                # a's long step ends now, not after its shutdown grace.
                async with httpx.AsyncClient(timeout=30) as client:
                    await client.delete(f"http://127.0.0.1:{port_a}/api/workflow/{busy}",
                                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    measures = {"create_to_start": first, "step_to_next": following, "across_daemons": across}
    return {
        "system": "stepd",
        "backend": "postgresql",
        "poll_interval_s": 1.0,
        "samples_ms": measures,
        "stats": {k: stats(v) for k, v in measures.items()},
    }


async def step_results_status(conn: Any, wf_id: int) -> str | None:
    cur = await conn.execute(
        "SELECT status FROM steps WHERE workflow_id = %s ORDER BY seq LIMIT 1", (wf_id,)
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["throughput", "latency"])
    ap.add_argument("--daemons", type=int, default=1, choices=range(1, len(NODES) + 1))
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help="[executor] concurrency")
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help="HTTP connections")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one throughput run")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    exit_on_sigterm()
    run = {"throughput": throughput, "latency": latency}
    result = asyncio.run(run[args.scenario](args))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if "wf_per_s" in result:
        print(
            f"stepd PostgreSQL, {args.daemons} daemon(s): {result['workflows']} workflows in "
            f"{result['elapsed_s']:.2f} s = {result['wf_per_s']:.0f} wf/s, "
            f"{result['steps_per_s']:.0f} steps/s (submits done at {result['submit_s']:.2f} s)"
        )
    else:
        for name, s in result["stats"].items():
            print(f"stepd PostgreSQL {name:<16} p50={s['p50']:8.2f} ms  p95={s['p95']:8.2f} ms  "
                  f"max={s['max']:8.2f} ms  n={s['n']}")  # fmt: skip


if __name__ == "__main__":
    main()
