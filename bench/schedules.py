"""What schedules cost a daemon, and how late their ticks fire.

    python bench/schedules.py [--schedules 10000] [--idle-s 20] [--ticking 50]
                              [--ticking-s 15] [--database-url URL] [--json PATH]

  idle cost    the daemon's CPU time per second (utime + stime from /proc) while nothing
               is due, with no schedule and then with --schedules of them (each fires
               once a year): the scheduler sleeps until the earliest fire time, so the
               figure should not grow with their number
  create       how fast the schedules were created (one client, 16 requests in flight)
  lag          from a tick's fire time to its run's creation (workflows.created_at -
               workflows.fire_at), for --ticking schedules firing every second (overlap
               allow_all, a one-step echo flow) for --ticking-s seconds, beside the others

Prints the figures; --json writes them too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from common import TOKEN, exit_on_sigterm, free_port, running, start_daemon, stats

FLOW = {"start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "done": True}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    return (
        int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    )


def idle_cost(pid: int, seconds: float) -> float:
    """CPU milliseconds per second the daemon used over `seconds` of nothing due."""
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) * 1000 / (time.monotonic() - t0)


PER_DEFINITION = 100  # (the daemon's limit)


async def define(client: httpx.AsyncClient, name: str) -> None:
    resp = await client.post("/api/workflows", json={"definition": {"name": name, "flow": FLOW}})
    resp.raise_for_status()


async def create_many(
    client: httpx.AsyncClient, count: int, body: dict[str, Any], prefix: str
) -> float:
    """Create `count` schedules over definitions `prefix-0`, `prefix-1`... (100 each);
    the seconds it took."""
    gate = asyncio.Semaphore(16)
    for k in range((count + PER_DEFINITION - 1) // PER_DEFINITION):
        await define(client, f"{prefix}-{k}")

    async def one(i: int) -> None:
        async with gate:
            # spread over the year's first hours: no two share a fire time by chance
            cron_expr = body.get("cron_expression") or f"{i % 60} {(i // 60) % 24} 1 1 *"
            resp = await client.post(
                f"/api/workflows/{prefix}-{i // PER_DEFINITION}/schedules",
                json={**body, "cron_expression": cron_expr, "input_data": {"n": i}},
            )
            if resp.status_code != 201:
                raise RuntimeError(f"create answered {resp.status_code}: {resp.text[:300]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - t0


def lags(args: argparse.Namespace, db: Path) -> list[float]:
    sql = (
        "SELECT created_at - fire_at, fire_at FROM workflows WHERE run_trigger = 'schedule' "
        "AND fire_at IS NOT NULL"
    )
    if args.database_url:
        import psycopg

        with psycopg.connect(args.database_url) as conn:
            rows = conn.execute(sql).fetchall()
    else:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute(sql).fetchall()
    if os.environ.get("BENCH_BY_SECOND"):
        by: dict[int, list[float]] = {}
        for lag, at in rows:
            by.setdefault(int(at) // 1000, []).append(float(lag))
        for at, vals in sorted(by.items()):
            print(at, len(vals), f"{min(vals):.0f}..{max(vals):.0f}")
    return [float(r[0]) for r in rows]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"schedules": args.schedules}
    with tempfile.TemporaryDirectory(prefix="stepd-sched-") as d:
        tmp = Path(d)
        port = free_port()
        with (
            (tmp / "daemon.log").open("wb") as log,
            running(start_daemon(tmp, port, log=log, database_url=args.database_url)) as proc,
        ):
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
            ) as client:
                await asyncio.sleep(2)  # start-up settles
                out["idle_cpu_ms_per_s_0"] = await asyncio.to_thread(
                    idle_cost, proc.pid, args.idle_s
                )
                out["rss_mb_0"] = rss_mb(proc.pid)
                took = await create_many(
                    client, args.schedules, {"timezone": "America/New_York"}, "yearly"
                )
                out["create_per_s"] = args.schedules / took
                await asyncio.sleep(2)
                out["idle_cpu_ms_per_s_n"] = await asyncio.to_thread(
                    idle_cost, proc.pid, args.idle_s
                )
                out["rss_mb_n"] = rss_mb(proc.pid)
                body = {"cron_expression": "* * * * * *", "overlap": "allow_all"}
                await create_many(client, args.ticking, body, "tick")
                await asyncio.sleep(args.ticking_s)
                for k in range((args.ticking + PER_DEFINITION - 1) // PER_DEFINITION):
                    page = (
                        await client.get(
                            f"/api/workflows/tick-{k}/schedules", params={"limit": 200}
                        )
                    ).json()
                    for s in page["schedules"]:  # pause the ticking ones
                        await client.patch(
                            f"/api/workflows/schedules/{s['schedule_id']}", json={"paused": True}
                        )
        lag = lags(args, tmp / "stepd.db")
        out["ticks"] = len(lag)
        out["lag_ms"] = stats(lag)
    return out


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schedules", type=int, default=10_000)
    p.add_argument("--idle-s", type=float, default=20.0)
    p.add_argument("--ticking", type=int, default=50)
    p.add_argument("--ticking-s", type=float, default=15.0)
    p.add_argument("--database-url", default="")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out = asyncio.run(measure(args))
    backend = "postgresql" if args.database_url else "sqlite"
    print(f"backend: {backend}")
    print(
        f"idle CPU, no schedule:          {out['idle_cpu_ms_per_s_0']:.2f} ms/s "
        f"(RSS {out['rss_mb_0']:.0f} MB)"
    )
    print(
        f"idle CPU, {args.schedules} schedules:   {out['idle_cpu_ms_per_s_n']:.2f} ms/s "
        f"(RSS {out['rss_mb_n']:.0f} MB)"
    )
    print(f"created {out['create_per_s']:.0f} schedules/s")
    lag = out["lag_ms"]
    print(
        f"lag over {out['ticks']} ticks of {args.ticking} every-second schedules: "
        f"p50 {lag['p50']:.1f} ms, p95 {lag['p95']:.1f} ms, max {lag['max']:.1f} ms"
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    sys.exit(main())
