"""Create latency with many Server-Sent Events clients open.

    python bench/sse_fanout.py [--clients 500] [--samples 200] [--follow workflow|all|both]

Starts a real `stepd serve`, times POST /api/workflow (a one-step `echo` workflow, one at
a time over one raw keep-alive connection, 10 ms apart) with no SSE client open, then with
`--clients` streams open, and prints p50 and p95 of each:

  workflow  each client follows GET /api/workflow/{id}/events of its own workflow, which
            waits at an approval gate (a page or `stepd watch` per run): no event of the
            timed workflows is for them, so they should cost the creates nothing.
  all       each client follows GET /api/events: every event of every timed workflow is
            written to every client, so each create also pays for that fan-out.

The SSE clients are raw sockets in a process of their own that read and discard what
arrives, and count the events they were sent (printed, to show the streams were live).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import orjson
from common import TOKEN, free_port, read_only, running, start_daemon, stats
from stepd_bench import RawClient

ECHO = orjson.dumps(
    {"name": "fanout", "flow": {"start": {"tool": "echo", "args": {"x": 1}, "done": True}}}
)
GATE = {
    "name": "watched",
    "flow": {
        "start": {"name": "approve", "tool": None, "args": {}, "next": "after"},
        "after": {"tool": "echo", "args": {}, "done": True},
    },
}


class Follower:
    """One SSE connection that reads and discards, counting `id:` lines (events)."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.events = 0
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self.path} answered {head[:100]!r}")
        self.started.set()
        try:
            while chunk := await reader.read(65536):
                self.events += chunk.count(b"\nid: ") + chunk.startswith(b"id: ")
        finally:
            writer.close()


async def timed_creates(port: int, samples: int) -> list[float]:
    raw = RawClient(port)
    times = []
    try:
        for i in range(samples + 10):
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            status, body = await raw.post("/api/workflow", ECHO)
            elapsed = (time.perf_counter() - t0) * 1000
            if status != 201:
                raise RuntimeError(f"create answered {status}: {body[:200]!r}")
            if i >= 10:  # warm-up
                times.append(elapsed)
    finally:
        raw.close()
    return times


async def open_followers(port: int, paths: list[str]) -> list[Follower]:
    followers = [Follower(port, p) for p in paths]
    for f in followers:
        f.task = asyncio.create_task(f.run())
    waits = [asyncio.create_task(f.started.wait()) for f in followers]
    done, _ = await asyncio.wait([*waits, *(f.task for f in followers)], timeout=60,
                                 return_when=asyncio.FIRST_EXCEPTION)  # fmt: skip
    for f in followers:
        if f.task.done() and f.task.exception():
            raise RuntimeError(f"an SSE client failed: {f.task.exception()!r}")
    if not all(f.started.is_set() for f in followers):
        raise RuntimeError("not every SSE client was answered within 60 s")
    return followers


async def close_followers(followers: list[Follower]) -> None:
    for f in followers:
        assert f.task is not None
        f.task.cancel()
    await asyncio.gather(*(f.task for f in followers if f.task), return_exceptions=True)


def follow_in_child(port: int, paths: list[str], conn: Connection) -> None:
    """The SSE clients, in a process of their own: reading 500 streams in the timing
    process would delay its reads of the create answers, and time the client."""
    asyncio.run(_follow(port, paths, conn))


async def _follow(port: int, paths: list[str], conn: Connection) -> None:
    followers = await open_followers(port, paths)
    await asyncio.sleep(1.0)  # replays done
    before = sum(f.events for f in followers)
    conn.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    await asyncio.sleep(0.5)  # the last events arrive
    conn.send(sum(f.events for f in followers) - before)
    await close_followers(followers)


async def scenario(port: int, db: Path, mode: str, clients: int, samples: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as c:
        if mode == "workflow":
            ids = [(await c.post("/api/workflow", json=GATE)).json()["id"] for _ in range(clients)]
            paths = [f"/api/workflow/{i}/events" for i in ids]
        else:
            with contextlib.closing(read_only(db)) as conn:
                (last,) = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
            paths = [f"/api/events?after={last}"] * clients  # live only, no replay
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=follow_in_child, args=(port, paths, theirs), daemon=True
    )
    child.start()
    try:
        if not await asyncio.to_thread(ours.poll, 120):
            raise RuntimeError("the SSE clients did not start within 120 s")
        if (ready := ours.recv()) != "ready":
            raise RuntimeError(f"the SSE clients failed: {ready!r}")
        times = await timed_creates(port, samples)
        ours.send("stop")
        events = await asyncio.to_thread(ours.recv)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return {"times": times, "events": events}


def line(label: str, times: list[float]) -> str:
    s = stats(times)
    return f"{label:<44} n={s['n']:<4} p50={s['p50']:7.2f} ms  p95={s['p95']:7.2f} ms"


async def measure(port: int, db: Path, args: argparse.Namespace) -> None:
    modes = ["workflow", "all"] if args.follow == "both" else [args.follow]
    print(line("create, no SSE client", await timed_creates(port, args.samples)), flush=True)
    for mode in modes:
        result = await scenario(port, db, mode, args.clients, args.samples)
        label = f"create, {args.clients} SSE clients ({mode})"
        print(line(label, result["times"]) + f"  events sent: {result['events']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--follow", choices=["workflow", "all", "both"], default="both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        port = free_port()
        with (
            open(Path(d) / "daemon.log", "wb") as log,
            running(start_daemon(Path(d), port, log=log)),
        ):
            asyncio.run(measure(port, Path(d) / "stepd.db", args))


if __name__ == "__main__":
    main()
