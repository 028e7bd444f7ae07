"""Time from a step finishing to its event reaching a Server-Sent Events client.

    python bench/sse_latency.py [--samples 100]

Starts a real `stepd serve`, follows GET /api/events, runs workflows of one `stamp`
step one at a time (the tool returns time.time_ns() as it finishes) and prints the
median, p95 and max of (step_done event received - tool finished).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from common import TOKEN, free_port, start_daemon, summary  # bench/common.py


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        port = free_port()
        proc = start_daemon(Path(d), port, poll_interval=1.0)
        try:
            latencies = await measure(port, args.samples)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(summary("step finished -> SSE client has step_done", latencies))


async def measure(port: int, samples: int) -> list[float]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "sse", "flow": {"start": {"tool": "stamp", "args": {}, "done": True}}}
    received: dict[int, int] = {}
    arrived = asyncio.Event()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
    ) as client:

        async def follow() -> None:
            timeout = httpx.Timeout(30, read=None)
            async with client.stream("GET", "/api/events", timeout=timeout) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        event = orjson.loads(line[6:])
                        if event["type"] == "step_done":
                            received[event["workflow_id"]] = time.time_ns()
                            arrived.set()

        reader = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        latencies = []
        for i in range(samples + 5):
            arrived.clear()
            wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
            while wf_id not in received:
                await asyncio.wait_for(arrived.wait(), 10)
                arrived.clear()
            wf = (await client.get(f"/api/workflow/{wf_id}")).json()
            finished = orjson.loads(wf["steps"][0]["result_json"])
            if i >= 5:  # warm-up
                latencies.append((received[wf_id] - finished) / 1e6)
        reader.cancel()
    return latencies


if __name__ == "__main__":
    asyncio.run(main())
