"""What map, parallel and wait states cost: a large map's time and memory, and the poll
loop's work with many workflows waiting.

    python bench/flow_states.py [--items 10000] [--concurrency 10] [--waiting 1000]
                                [--idle-s 20] [--database postgresql://...]

1. A map over `--items` items (each an `echo` step), `max_concurrency` `--concurrency`:
   the wall time from create to completed, items per second, and the daemon's peak RSS
   (VmHWM) before and after.
2. The idle daemon's CPU time per poll (poll_interval 1 s) over `--idle-s` seconds, with
   no workflow, then with `--waiting` workflows each waiting a day on a timer and as many
   waiting for a signal: their number should not change the poll's work (the poll reads
   only due rows, by index).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import TOKEN, free_port, running, start_daemon

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_status(client: httpx.Client, wf_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = client.get("/api/workflow", params={"limit": 20}).json()
        status = next((r["status"] for r in rows if r["id"] == wf_id), "running")
        if status not in ("running", "paused"):
            return str(status)
        time.sleep(0.2)
    return "timeout"


def big_map(client: httpx.Client, pid: int, items: int, concurrency: int) -> dict[str, Any]:
    flow = {"start": {"map": {"items": "<<input.xs>>", "max_concurrency": concurrency,
                              "flow": {"start": {"tool": "echo", "args": {"i": "<<index>>"},
                                                 "done": True}}}, "done": True}}  # fmt: skip
    rss_before = peak_rss_mb(pid)
    began = time.perf_counter()
    resp = client.post("/api/workflow", json={"name": "map", "flow": flow,
                                              "input": {"xs": list(range(items))}})  # fmt: skip
    resp.raise_for_status()
    status = wait_status(client, resp.json()["id"], timeout=3600)
    wall = time.perf_counter() - began
    return {"items": items, "status": status, "wall_s": round(wall, 2),
            "items_per_s": round(items / wall, 1), "peak_rss_mb_before": round(rss_before, 1),
            "peak_rss_mb_after": round(peak_rss_mb(pid), 1)}  # fmt: skip


def idle_cpu(pid: int, seconds: float) -> float:
    """CPU milliseconds per second (one poll per second) while idle."""
    start = cpu_s(pid)
    time.sleep(seconds)
    return (cpu_s(pid) - start) * 1000 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--database", default="", help="a PostgreSQL URL (default: SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_daemon(Path(tmp), port, poll_interval=1.0, synchronous="NORMAL",
                            database_url=args.database)  # fmt: skip
        with running(proc):
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                  headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
            idle_empty = idle_cpu(proc.pid, args.idle_s)
            wait_flows = [{"start": {"wait": {"seconds": 86400}, "done": True}},
                          {"start": {"wait": {"signal": "never", "timeout": 86400},
                                     "done": True}}]  # fmt: skip
            for i in range(args.waiting):
                for flow in wait_flows:
                    client.post(
                        "/api/workflow", json={"name": f"w{i}", "flow": flow}
                    ).raise_for_status()
            time.sleep(3)  # their first steps claimed and waiting
            idle_waiting = idle_cpu(proc.pid, args.idle_s)
            mapped = big_map(client, proc.pid, args.items, args.concurrency)
    print(f"idle poll, no workflow:          {idle_empty:6.2f} ms CPU per second")
    waiting = f"{2 * args.waiting:5d} waiting (timer+signal)"
    print(f"idle poll, {waiting}: {idle_waiting:6.2f} ms CPU per second")
    print(
        f"map of {mapped['items']} items (max_concurrency {args.concurrency}): {mapped['status']} "
        f"in {mapped['wall_s']} s ({mapped['items_per_s']} items/s); daemon peak RSS "
        f"{mapped['peak_rss_mb_before']} MB before, {mapped['peak_rss_mb_after']} MB after"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
