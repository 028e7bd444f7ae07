"""Run-start latency of saved definitions against a one-off create, and synchronous execute.

    python bench/definitions.py [--samples 300] [--gap-ms 5] [--database-url URL] [--json PATH]

One client, one keep-alive connection, requests one after another (each after an idle
gap), in interleaved rounds so a shared machine's noise falls on all alike:

  create          POST /api/workflow of a one-state echo flow (the part-one baseline)
  run             POST /api/workflows/{name}/run of the same flow saved as a definition
                  (with an input_schema to check): 202 {"run_id"}
  run queued      the same on a definition whose concurrency is taken (a gate holds it):
                  the run is written as queued
  execute         POST /api/workflows/{name}/execute: the answer waits for the outcome
                  (the step runs and the run completes), 200 with the output

Prints p50/p95 of each and the ratios of run and execute to create.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from common import TOKEN, exit_on_sigterm, free_port, running, start_daemon, stats
from stepd_bench import RawClient

FLOW = {"start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "done": True}}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
WARMUP = 30


async def timed(raw: RawClient, path: str, body: bytes, expect: int) -> float:
    t0 = time.perf_counter()
    status, answer = await raw.post(path, body)
    took = (time.perf_counter() - t0) * 1000
    if status != expect:
        raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
    return took


def setup(port: int) -> None:
    """The definitions: `echo` (free), `held` (concurrency 1, taken by a waiting gate)."""
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        for name, flow, extra in (
            ("echo", FLOW, {}),
            ("held", {"start": {"tool": None, "done": True}}, {"concurrency": 1}),
        ):
            definition = {"name": name, "flow": flow, "input_schema": SCHEMA, **extra}
            resp = c.post("/api/workflows", json={"definition": definition})
            resp.raise_for_status()
        c.post("/api/workflows/held/run", json={"input_data": {"n": 0}}).raise_for_status()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"create": [], "run": [], "run_queued": [], "execute": []}
    with tempfile.TemporaryDirectory(prefix="stepd-defs-") as d:
        tmp = Path(d)
        port = free_port()
        with (
            (tmp / "daemon.log").open("wb") as log,
            running(start_daemon(tmp, port, log=log, database_url=args.database_url)),
        ):
            setup(port)
            raw = RawClient(port)
            for i in range(WARMUP + args.samples):
                body_in = {"n": i}
                for name in samples:
                    await asyncio.sleep(args.gap_ms / 1000)
                    if name == "create":
                        body = orjson.dumps({"name": "one-off", "flow": FLOW, "input": body_in})
                        took = await timed(raw, "/api/workflow", body, 201)
                    elif name == "run":
                        body = orjson.dumps({"input_data": body_in})
                        took = await timed(raw, "/api/workflows/echo/run", body, 202)
                    elif name == "run_queued":
                        body = orjson.dumps({"input_data": body_in})
                        took = await timed(raw, "/api/workflows/held/run", body, 202)
                    else:
                        body = orjson.dumps({"variables": body_in})
                        took = await timed(raw, "/api/workflows/echo/execute", body, 200)
                    if i >= WARMUP:
                        samples[name].append(took)
    out: dict[str, Any] = {name: stats(values) for name, values in samples.items()}
    base = out["create"]["p50"]
    out["ratio_run"] = out["run"]["p50"] / base
    out["ratio_execute"] = out["execute"]["p50"] / base
    return out


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--database-url", default="", help="postgresql://... (default SQLite)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    out = asyncio.run(measure(args))
    backend = "postgresql" if args.database_url else "sqlite"
    print(f"run-start latency, {args.samples} samples each, {backend}")
    for name in ("create", "run", "run_queued", "execute"):
        s = out[name]
        print(f"  {name:<11} p50 {s['p50']:7.2f} ms   p95 {s['p95']:7.2f} ms")
    print(
        f"  run / create p50: {out['ratio_run']:.2f}x   execute / create p50: "
        f"{out['ratio_execute']:.2f}x"
    )
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
