"""Throughput as a plain Python client sees it: threads of http.client, no tricks.

    python bench/plain_client.py --workflows 2000 [--threads 16] [--synchronous FULL] [--json PATH]

The suite's raw-asyncio client (stepd_bench.py http) pre-builds every request and parses
only a status line, so that the daemon sets the pace. A user's client is rarely like that:
here 16 threads each hold one keep-alive `http.client.HTTPConnection` and POST the same
W two-step workflows one after another, in this process, while the daemon runs in its
own. Completion is read the way a user would, through the API: once every POST has been
answered, `GET /api/workflow?status=running&limit=1` every 10 ms until it lists nothing.
On a 2-core machine the client's CPU competes with the daemon's, which is part of what a
user pays; the result is printed beside the raw client's and Huey's in the suite's table.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from common import (
    CLAIM_BATCH,
    CONCURRENCY,
    TOKEN,
    TWO_STEP_FLOW,
    exit_on_sigterm,
    free_port,
    running,
    start_daemon,
)

WARMUP = 20  # workflows run before the clock starts, as in stepd_bench.py
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def bodies(n: int, offset: int = 0) -> list[bytes]:
    return [
        orjson.dumps({"name": "tput", "flow": TWO_STEP_FLOW, "input": {"n": offset + i}})
        for i in range(n)
    ]


class Submitter:
    """`threads` threads, one keep-alive connection each, taking bodies from one list."""

    def __init__(self, port: int, threads: int) -> None:
        self.port = port
        self.threads = threads
        self.errors: list[str] = []

    def _worker(self, queue: Iterator[bytes], lock: threading.Lock) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                conn.request("POST", "/api/workflow", body=body, headers=HEADERS)
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"POST answered {resp.status}: {answer[:300]!r}")
        except Exception as exc:  # noqa: BLE001 - reported by submit()
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def submit(self, payloads: list[bytes]) -> None:
        queue, lock = iter(payloads), threading.Lock()
        workers = [
            threading.Thread(target=self._worker, args=(queue, lock), daemon=True)
            for _ in range(min(self.threads, len(payloads)))
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} thread(s) failed; first: {self.errors[0]}")


def wait_none_running(port: int, timeout: float, every: float = 0.01) -> float:
    """perf_counter() when GET /api/workflow?status=running lists nothing; fails fast on a
    failed workflow."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    deadline = time.perf_counter() + timeout
    try:
        while True:
            conn.request("GET", "/api/workflow?status=running&limit=1", headers=HEADERS)
            resp = conn.getresponse()
            running_ = orjson.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"GET answered {resp.status}: {running_!r}")
            if not running_:
                done = time.perf_counter()
                conn.request("GET", "/api/workflow?status=failed&limit=1", headers=HEADERS)
                failed = orjson.loads(conn.getresponse().read())
                if failed:
                    raise RuntimeError(f"a workflow failed: {failed[0]}")
                return done
            if time.perf_counter() > deadline:
                raise TimeoutError(f"workflows still running after {timeout:.0f} s")
            time.sleep(every)
    finally:
        conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stepd-plain-") as d:
        tmp = Path(d)
        port = free_port()
        with (tmp / "daemon.log").open("wb") as log, running(start_daemon(
            tmp, port, synchronous=args.synchronous, concurrency=args.concurrency,
            claim_batch=args.claim_batch, log=log,
        )):  # fmt: skip
            try:
                client = Submitter(port, args.threads)
                client.submit(bodies(WARMUP))
                wait_none_running(port, 60)
                payloads = bodies(args.workflows, WARMUP)
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                client.submit(payloads)
                submitted = time.perf_counter() - t0
                elapsed = wait_none_running(port, args.timeout) - t0
                client_cpu = time.process_time() - cpu0
            except BaseException:
                sys.stderr.write((tmp / "daemon.log").read_text(errors="replace")[-4000:])
                raise
    n = args.workflows
    return {
        "system": "stepd",
        "mode": "plain",
        "synchronous": args.synchronous,
        "workflows": n,
        "elapsed_s": elapsed,
        "submit_s": submitted,
        "wf_per_s": n / elapsed,
        "steps_per_s": 2 * n / elapsed,
        "concurrency": args.concurrency,
        "claim_batch": args.claim_batch,
        "threads": args.threads,
        "client_cpu_s": client_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16, help="client threads (connections)")
    ap.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "EXTRA"])
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help="[executor] concurrency")
    ap.add_argument("--claim-batch", type=int, default=CLAIM_BATCH, help="[executor] claim_batch")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the run")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    exit_on_sigterm()
    result = run(args)
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(
        f"stepd plain client ({args.threads} http.client threads) {args.synchronous}: "
        f"{result['workflows']} workflows in {result['elapsed_s']:.2f} s = "
        f"{result['wf_per_s']:.0f} wf/s (submits done at {result['submit_s']:.2f} s, "
        f"client CPU {result['client_cpu_s']:.2f} s)"
    )


if __name__ == "__main__":
    main()
