"""Start a real `stepd serve` and measure wake-up latency, poll latency and throughput.

    python bench/latency.py [--samples 100] [--poll-samples 20] [--workflows 1000]

Prints medians (and p95/max) of:
  create -> first step started   (POST over HTTP; the API wakes the executor)
  row written by another process -> started   (the poll path, poll_interval = 1 s)
  throughput of N two-step echo workflows submitted concurrently over HTTP
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
import orjson

# Shared with sse_latency.py (which imports them from here) and suite.py.
from common import TOKEN, free_port, start_daemon, summary  # bench/common.py

__all__ = ["TOKEN", "free_port", "start_daemon", "summary"]


async def wait_done(client: httpx.AsyncClient, wf_id: int) -> dict:
    while True:
        wf = (await client.get(f"/api/workflow/{wf_id}")).json()
        if wf["status"] != "running":
            return wf
        await asyncio.sleep(0.002)


async def wake_latency(client: httpx.AsyncClient, samples: int) -> list[float]:
    body = {"name": "lat", "flow": {"start": {"tool": "stamp", "args": {}, "done": True}}}
    out = []
    for _ in range(samples):
        t0 = time.time_ns()
        wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
        wf = await wait_done(client, wf_id)
        out.append((orjson.loads(wf["steps"][0]["result_json"]) - t0) / 1e6)
    return out


async def poll_latency(client: httpx.AsyncClient, db_path: Path, samples: int) -> list[float]:
    flow = orjson.dumps({"start": {"tool": "stamp", "args": {}, "done": True}}).decode()
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    out = []
    for i in range(samples):
        await asyncio.sleep(0.137 * (i % 7))  # spread the writes over the poll cycle
        now = int(time.time() * 1000)
        wf_id = 9_000_000_000_000 + i * 2
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO workflows (id, name, flow_json, input_json, status, created_at, "
            "updated_at) VALUES (?, 'outside', ?, '{}', 'running', ?, ?)",
            (wf_id, flow, now, now),
        )
        db.execute(
            "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at, "
            "created_at) VALUES (?, ?, 'start', 'start', 'stamp', 'pending', 1, ?, ?)",
            (wf_id + 1, wf_id, now, now),
        )
        db.execute("COMMIT")
        t0 = time.time_ns()
        wf = await wait_done(client, wf_id)
        out.append((orjson.loads(wf["steps"][0]["result_json"]) - t0) / 1e6)
    db.close()
    return out


async def throughput(client: httpx.AsyncClient, n: int, concurrency: int = 32) -> float:
    body = {
        "name": "tput",
        "flow": {
            "start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "next": "second"},
            "second": {"tool": "echo", "args": {"prev": "<<result.n>>"}, "done": True},
        },
    }
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def submitter() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            resp = await client.post("/api/workflow", json={**body, "input": {"n": i}})
            assert resp.status_code == 201, resp.text

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    while (await client.get("/api/workflow?status=running&limit=1")).json():
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    failed = (await client.get("/api/workflow?status=failed&limit=1")).json()
    assert not failed, failed
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--poll-samples", type=int, default=20)
    ap.add_argument("--workflows", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        tmp = Path(d)
        port = free_port()
        proc = start_daemon(tmp, port, poll_interval=1.0)
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
                limits=httpx.Limits(max_connections=64),
            ) as client:
                await wake_latency(client, 10)  # warm-up
                wake = await wake_latency(client, args.samples)
                poll = await poll_latency(client, tmp / "stepd.db", args.poll_samples)
                elapsed = await throughput(client, args.workflows)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(summary("create -> first step started (API wake)", wake))
    print(summary("other process's row -> started (1 s poll)", poll))
    n = args.workflows
    print(
        f"{'throughput, two-step echo workflows':<44} n={n:<5} {elapsed:.2f} s  "
        f"{n / elapsed:.0f} workflows/s  {2 * n / elapsed:.0f} steps/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
