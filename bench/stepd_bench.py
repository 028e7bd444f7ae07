"""stepd's side of the benchmark suite: throughput over HTTP, throughput in-process, latency.

    python bench/stepd_bench.py http    --workflows 2000 [--synchronous FULL] [--json PATH]
    python bench/stepd_bench.py inproc  --workflows 2000 [--synchronous FULL] [--json PATH]
    python bench/stepd_bench.py latency --samples 100 --poll-samples 20 [--json PATH]

Each run starts a fresh daemon (or, for `inproc`, the daemon's app in this process) in a
fresh temp dir on loopback and stops it at the end. `bench/suite.py` runs these as
subprocesses and compares them with the peers; they also work on their own.

Throughput: W workflows of two `echo` steps, step 2 consuming step 1's result; the clock
runs from the first submit until all W are `completed`. Completion is read from the SQLite
file (read-only, every 10 ms), which costs the daemon nothing: an SSE follower or GET polls
would take time on the daemon's own event loop, the very thing being measured.

Latency (idle daemon, one workflow at a time; tool bodies stamp time.time_ns()):
  create -> first step started       POST /api/workflow sent -> step 1 body starts
  step done -> next step started     step 1 body returns -> step 2 body starts
  ready -> next step started         POST .../ready sent -> the step after the gate starts
  row from another process -> started  commit of rows written by this process -> step
                                      starts (the poll path; poll_interval = 1 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from common import (
    CLAIM_BATCH,
    CONCURRENCY,
    CONNECTIONS,
    HERE,
    TOKEN,
    TWO_STEP_FLOW,
    count_status,
    exit_on_sigterm,
    free_port,
    read_only,
    running,
    start_daemon,
    stats,
    write_config,
)

WARMUP = 20  # workflows run before the clock starts: imports, caches, first fsyncs
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.I)


# -- a lean HTTP/1.1 keep-alive client -------------------------------------------------------


class Submitter:
    """POSTs pre-encoded bodies over `connections` keep-alive connections, back to back.

    httpx spends more CPU per request than the daemon does answering it; this client
    pre-builds every request and only parses the status line and Content-Length, so
    the daemon, not the client, sets the pace.
    """

    def __init__(self, port: int, path: str, connections: int) -> None:
        self.port = port
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.connections = connections
        self.answered = 0

    def request(self, body: bytes) -> bytes:
        return self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _worker(self, requests: Iterator[bytes]) -> None:
        reader, writer = await self._connect()
        try:
            for req in requests:  # shared iterator: each worker takes the next request
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = _CONTENT_LENGTH.search(head)
                if length is None:
                    raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
                body = await reader.readexactly(int(length.group(1)))
                if status != 201:
                    raise RuntimeError(f"POST answered {status}: {body[:300]!r}")
                self.answered += 1
                if _CLOSE.search(head):
                    writer.close()
                    reader, writer = await self._connect()
        finally:
            writer.close()

    async def submit(self, bodies: list[bytes]) -> None:
        requests = iter([self.request(b) for b in bodies])
        n = min(self.connections, len(bodies))
        await asyncio.gather(*(self._worker(requests) for _ in range(n)))


class RawClient:
    """One keep-alive connection for the timed requests of the latency runs.

    httpx spends about a millisecond of its own per request, which would be most of
    what is measured; the peers' latencies are measured through their in-process calls.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.conn is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = reader, writer
        reader, writer = self.conn
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        answer = await reader.readexactly(int(length.group(1)) if length else 0)
        if _CLOSE.search(head):
            writer.close()
            self.conn = None
        return int(head[9:12]), answer

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


def bodies(n: int, offset: int = 0) -> list[bytes]:
    return [
        orjson.dumps({"name": "tput", "flow": TWO_STEP_FLOW, "input": {"n": offset + i}})
        for i in range(n)
    ]


async def wait_completed(db_path: Path, target: int, timeout: float) -> float:
    """perf_counter() when `target` workflows are completed; fails fast on a failed one."""
    conn = read_only(db_path)
    deadline = time.perf_counter() + timeout
    try:
        while True:
            counts = count_status(conn)
            if counts.get("failed") or counts.get("cancelled"):
                raise RuntimeError(f"workflows did not complete: {counts}")
            if counts.get("completed", 0) >= target:
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{counts} after {timeout:.0f} s, wanted {target} completed")
            await asyncio.sleep(0.01)
    finally:
        conn.close()


def throughput_result(
    mode: str, args: argparse.Namespace, elapsed: float, submitted: float, **extra: Any
) -> dict[str, Any]:
    n = args.workflows
    return {
        "system": "stepd",
        "mode": mode,
        "synchronous": args.synchronous,
        "workflows": n,
        "elapsed_s": elapsed,
        "submit_s": submitted,
        "wf_per_s": n / elapsed,
        "steps_per_s": 2 * n / elapsed,
        "concurrency": args.concurrency,
        "claim_batch": args.claim_batch,
        **extra,
    }


async def http_throughput(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        tmp = Path(d)
        port = free_port()
        with (tmp / "daemon.log").open("wb") as log, running(start_daemon(
            tmp, port, synchronous=args.synchronous, concurrency=args.concurrency,
            claim_batch=args.claim_batch, log=log,
        )):  # fmt: skip
            try:
                client = Submitter(port, "/api/workflow", args.connections)
                await client.submit(bodies(WARMUP))
                await wait_completed(tmp / "stepd.db", WARMUP, 60)
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                submit = asyncio.create_task(client.submit(bodies(args.workflows, WARMUP)))
                done = asyncio.create_task(
                    wait_completed(tmp / "stepd.db", WARMUP + args.workflows, args.timeout)
                )
                await submit
                submitted = time.perf_counter() - t0
                elapsed = await done - t0
                client_cpu = time.process_time() - cpu0
            except BaseException:
                sys.stderr.write((tmp / "daemon.log").read_text(errors="replace")[-4000:])
                raise
    return throughput_result(
        "http", args, elapsed, submitted,
        connections=args.connections, client_cpu_s=client_cpu,
    )  # fmt: skip


async def inproc_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon's app (store, executor, engine) opened in this process as `stepd serve`
    does, by its lifespan; `Engine.create` called W times concurrently."""
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        tmp = Path(d)
        os.chdir(tmp)  # the state directory for anything the app writes
        try:
            return await _inproc_run(args, tmp)
        finally:
            os.chdir(HERE)


async def _inproc_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from daemon.api import create_app
    from daemon.config import load

    config = load(write_config(
        tmp, free_port(), synchronous=args.synchronous, concurrency=args.concurrency,
        claim_batch=args.claim_batch,
    ))  # fmt: skip
    app = create_app(config)
    engine = app.state.engine
    limit = asyncio.Semaphore(args.inproc_concurrency or args.workflows)

    async def create(n: int) -> None:
        body = {"name": "tput", "flow": TWO_STEP_FLOW, "input": {"n": n}}
        async with limit:
            await engine.create(body, created_by="bench")

    async with app.router.lifespan_context(app):
        await asyncio.gather(*(create(i) for i in range(WARMUP)))
        await wait_completed(tmp / "stepd.db", WARMUP, 60)
        t0 = time.perf_counter()
        done = asyncio.create_task(
            wait_completed(tmp / "stepd.db", WARMUP + args.workflows, args.timeout)
        )
        await asyncio.gather(*(create(WARMUP + i) for i in range(args.workflows)))
        submitted = time.perf_counter() - t0
        elapsed = await done - t0
    return throughput_result(
        "inproc", args, elapsed, submitted, create_concurrency=args.inproc_concurrency or "all"
    )


# -- latency ----------------------------------------------------------------------------------

SPAN_TWO = {
    "start": {"tool": "span", "args": {}, "next": "second"},
    "second": {"tool": "span", "args": {"prev": "<<result.end>>"}, "done": True},
}
GATED = {
    "start": {"tool": None, "args": {}, "next": "after"},
    "after": {"tool": "span", "args": {}, "done": True},
}


async def wait_finished(conn: sqlite3.Connection, wf_id: int, timeout: float = 30) -> None:
    """Until the workflow is no longer running, read from the file: no load on the daemon."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT status FROM workflows WHERE id = ?", (wf_id,)).fetchone()
        if row is not None and row[0] != "running":
            if row[0] != "completed":
                raise RuntimeError(f"workflow {wf_id} ended {row[0]}")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workflow {wf_id} still {row} after {timeout} s")
        await asyncio.sleep(0.001)


async def results(client: httpx.AsyncClient, wf_id: int) -> list[Any]:
    """The workflow's step results in order (read once it has finished)."""
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    return [orjson.loads(s["result_json"]) if s["result_json"] else None for s in wf["steps"]]


async def create(raw: RawClient, flow: dict[str, Any]) -> int:
    status, body = await raw.post("/api/workflow", orjson.dumps({"name": "lat", "flow": flow}))
    if status != 201:
        raise RuntimeError(f"create answered {status}: {body[:300]!r}")
    return int(orjson.loads(body)["id"])


async def chain_latency(
    client: httpx.AsyncClient, raw: RawClient, conn: sqlite3.Connection, samples: int
) -> tuple[list[float], list[float]]:
    """create -> step 1 started, and step 1 done -> step 2 started, from the same workflows."""
    first, following = [], []
    for _ in range(samples):
        await asyncio.sleep(0.01)  # idle between samples
        t0 = time.time_ns()
        wf_id = await create(raw, SPAN_TWO)
        await wait_finished(conn, wf_id)
        s1, s2 = await results(client, wf_id)
        first.append((s1["start"] - t0) / 1e6)
        following.append((s2["start"] - s1["end"]) / 1e6)
    return first, following


async def ready_latency(
    client: httpx.AsyncClient, raw: RawClient, conn: sqlite3.Connection, samples: int
) -> list[float]:
    """POST .../ready sent -> the step after the gate starts (the API wakes the executor)."""
    out = []
    for _ in range(samples):
        wf_id = await create(raw, GATED)
        while True:  # until the gate waits; this polling is over before the clock starts
            wf = (await client.get(f"/api/workflow/{wf_id}")).json()
            if wf["steps"] and wf["steps"][0].get("awaiting") == "ready":
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
        t0 = time.time_ns()
        status, body = await raw.post(f"/api/workflow/{wf['steps'][0]['id']}/ready")
        if status != 200:
            raise RuntimeError(f"ready answered {status}: {body[:300]!r}")
        await wait_finished(conn, wf_id)
        (_, after) = await results(client, wf_id)
        out.append((after["start"] - t0) / 1e6)
    return out


async def poll_latency(db_path: Path, samples: int, client: httpx.AsyncClient) -> list[float]:
    """Rows committed by this process -> the step starts: found by the daemon's poll."""
    flow = orjson.dumps({"start": {"tool": "span", "args": {}, "done": True}}).decode()
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    conn = read_only(db_path)
    out = []
    try:
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
                "created_at) VALUES (?, ?, 'start', 'start', 'span', 'pending', 1, ?, ?)",
                (wf_id + 1, wf_id, now, now),
            )
            db.execute("COMMIT")
            t0 = time.time_ns()
            await wait_finished(conn, wf_id, timeout=10)
            (s,) = await results(client, wf_id)
            out.append((s["start"] - t0) / 1e6)
    finally:
        db.close()
        conn.close()
    return out


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stepd-bench-") as d:
        tmp = Path(d)
        port = free_port()
        with (tmp / "daemon.log").open("wb") as log, running(start_daemon(
            tmp, port, poll_interval=1.0, synchronous=args.synchronous, log=log
        )):  # fmt: skip
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=30,
                ) as client:
                    conn = read_only(tmp / "stepd.db")
                    raw = RawClient(port)
                    await chain_latency(client, raw, conn, 10)  # warm-up
                    await ready_latency(client, raw, conn, 3)
                    first, following = await chain_latency(client, raw, conn, args.samples)
                    ready = await ready_latency(client, raw, conn, args.samples)
                    poll = await poll_latency(tmp / "stepd.db", args.poll_samples, client)
                    raw.close()
                    conn.close()
            except BaseException:
                sys.stderr.write((tmp / "daemon.log").read_text(errors="replace")[-4000:])
                raise
    measures = {
        "create_to_start": first,
        "step_to_next": following,
        "ready_to_start": ready,
        "poll_to_start": poll,
    }
    return {
        "system": "stepd",
        "synchronous": args.synchronous,
        "poll_interval_s": 1.0,
        "samples_ms": measures,
        "stats": {k: stats(v) for k, v in measures.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["http", "inproc", "latency"])
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "EXTRA"])
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help="[executor] concurrency")
    ap.add_argument("--claim-batch", type=int, default=CLAIM_BATCH, help="[executor] claim_batch")
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help="HTTP connections")
    ap.add_argument(
        "--inproc-concurrency", type=int, default=0,
        help="creates in flight at once in-process (0: all W at once)",
    )  # fmt: skip
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--poll-samples", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one throughput run")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    exit_on_sigterm()
    run = {"http": http_throughput, "inproc": inproc_throughput, "latency": latency}
    result = asyncio.run(run[args.scenario](args))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if "wf_per_s" in result:
        print(
            f"stepd {args.scenario} {args.synchronous}: {result['workflows']} workflows in "
            f"{result['elapsed_s']:.2f} s = {result['wf_per_s']:.0f} wf/s, "
            f"{result['steps_per_s']:.0f} steps/s (submits done at {result['submit_s']:.2f} s)"
        )
    else:
        for name, s in result["stats"].items():
            print(f"stepd {name:<16} p50={s['p50']:8.2f} ms  p95={s['p95']:8.2f} ms  "
                  f"max={s['max']:8.2f} ms  n={s['n']}")  # fmt: skip


if __name__ == "__main__":
    main()
