"""Sequential create latency against its floor: validation plus one fsync'd commit.

    python bench/create_latency.py [--samples 300] [--gap-ms 5] [--synchronous FULL] [--json PATH]

An agent submits one workflow at a time over one keep-alive connection and waits for the
answer. What it pays cannot be less than checking the body and one durable commit; this
prints p50/p95 of each, in rounds interleaved so that a shared machine's noise falls on
all of them alike:

  validate only        the request body parsed (`parse_json`: orjson plus the duplicate-key,
                       64-bit, depth and NUL checks) and checked (`Engine.check`, flows
                       cached as in the daemon), in this process
  validate over HTTP   POST /api/workflow/validate of the same body: the parse and check
                       as the daemon runs them, with the request's own round trip
  fsync'd commit       BEGIN IMMEDIATE, one INSERT, COMMIT on a WAL SQLite file in the same
                       directory as the daemon's, with the daemon's `synchronous`
  create gate-only     POST /api/workflow of a one-state gate flow (nothing runs after it)
  create two-step      POST /api/workflow of the suite's two `echo` steps (they run)

each request timed from the first byte sent to the last byte of the answer read, over one
raw keep-alive connection (httpx would add about a millisecond of its own). Then the ratio
of the gate-only create's p50 to the floor, validate p50 + commit p50, the floor taken
both ways: with the validation over HTTP (what a client pays to have a body checked, the
request's round trip included) and with the validation alone (no HTTP at all).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from common import (
    TWO_STEP_FLOW,
    exit_on_sigterm,
    free_port,
    running,
    start_daemon,
    stats,
)
from stepd_bench import RawClient

GATE_ONLY: dict[str, Any] = {"start": {"tool": None, "args": {}, "done": True}}
WARMUP = 50  # rounds before the samples: imports, caches, the first fsyncs


def gate_body(i: int) -> bytes:
    return orjson.dumps({"name": "gate", "flow": GATE_ONLY, "input": {"n": i}})


def two_step_body(i: int) -> bytes:
    return orjson.dumps({"name": "two", "flow": TWO_STEP_FLOW, "input": {"n": i}})


class Validator:
    """What the daemon does to a create body before it writes: parse and check."""

    def __init__(self) -> None:
        from daemon.bodies import parse_json
        from daemon.engine import Engine
        from daemon.tools import build_registry

        self.parse = parse_json
        # check() reads only the registry, the flow cache, max_states and the egress policy.
        self.engine = Engine(None, build_registry(["bench_tools"]), None)  # type: ignore[arg-type]

    async def once(self, body: bytes) -> float:
        t0 = time.perf_counter()
        sub, errors, _ = await self.engine.check(self.parse(body))
        took = time.perf_counter() - t0
        if sub is None:
            raise RuntimeError(f"the benchmark's flow does not validate: {errors}")
        return took * 1000


class Committer:
    """One small fsync'd transaction on a WAL file, as the daemon's writer makes."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute(f"PRAGMA synchronous = {synchronous}")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        self.n = 0

    def once(self, body: bytes) -> float:
        self.n += 1
        t0 = time.perf_counter()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO t (id, body) VALUES (?, ?)", (self.n, body.decode()))
        self.db.execute("COMMIT")
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.db.close()


async def timed_post(raw: RawClient, path: str, body: bytes, expect: int = 201) -> float:
    t0 = time.perf_counter()
    status, answer = await raw.post(path, body)
    took = time.perf_counter() - t0
    if status != expect:
        raise RuntimeError(f"{path} answered {status}: {answer[:300]!r}")
    return took * 1000


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {
        "validate": [], "validate_http": [], "commit": [], "gate": [], "two_step": []
    }  # fmt: skip
    validator = Validator()
    with tempfile.TemporaryDirectory(prefix="stepd-create-") as d:
        tmp = Path(d)
        port = free_port()
        committer = Committer(tmp / "floor.db", args.synchronous)
        with (
            (tmp / "daemon.log").open("wb") as log,
            running(start_daemon(tmp, port, synchronous=args.synchronous, log=log)),
        ):
            raw = RawClient(port)
            try:
                for i in range(WARMUP + args.samples):
                    keep = i >= WARMUP
                    # One round: the four measures, each after an idle gap.
                    for name in samples:
                        await asyncio.sleep(args.gap_ms / 1000)
                        if name == "validate":
                            took = await validator.once(gate_body(i))
                        elif name == "validate_http":
                            took = await timed_post(raw, "/api/workflow/validate", gate_body(i),
                                                    200)  # fmt: skip
                        elif name == "commit":
                            took = committer.once(gate_body(i))
                        elif name == "gate":
                            took = await timed_post(raw, "/api/workflow", gate_body(i))
                        else:
                            took = await timed_post(raw, "/api/workflow", two_step_body(i))
                        if keep:
                            samples[name].append(took)
            except BaseException:
                sys.stderr.write((tmp / "daemon.log").read_text(errors="replace")[-4000:])
                raise
            finally:
                raw.close()
                committer.close()
    s = {name: stats(values) for name, values in samples.items()}
    floor = s["validate_http"]["p50"] + s["commit"]["p50"]
    floor_local = s["validate"]["p50"] + s["commit"]["p50"]
    # The same ratio round by round (each round's measures ran within a few ms of each
    # other): steadier than the ratio of medians when the machine's load changes.
    per_round = [
        g / (v + c)
        for g, v, c in zip(
            samples["gate"], samples["validate_http"], samples["commit"], strict=True
        )
    ]
    return {
        "system": "stepd",
        "synchronous": args.synchronous,
        "gap_ms": args.gap_ms,
        "samples_ms": samples,
        "stats": s,
        "floor_p50_ms": floor,
        "floor_local_p50_ms": floor_local,
        "ratio_gate": s["gate"]["p50"] / floor,
        "ratio_two_step": s["two_step"]["p50"] / floor,
        "ratio_gate_local": s["gate"]["p50"] / floor_local,
        "ratio_gate_per_round_p50": statistics.median(per_round),
    }


LABELS = {
    "validate": "validate only (parse_json + Engine.check)",
    "validate_http": "validate over HTTP (POST .../validate)",
    "commit": "fsync'd SQLite commit (one INSERT)",
    "gate": "create gate-only (POST /api/workflow)",
    "two_step": "create two-step (POST /api/workflow)",
}


def report(result: dict[str, Any]) -> str:
    lines = [f"{'sequential, one keep-alive connection (ms)':<46}{'p50':>8}{'p95':>8}{'n':>6}"]
    for name, label in LABELS.items():
        s = result["stats"][name]
        lines.append(f"  {label:<44}{s['p50']:>8.3f}{s['p95']:>8.3f}{s['n']:>6}")
    lines.append(f"  {'validate over HTTP + commit (p50s)':<44}{result['floor_p50_ms']:>8.3f}")
    lines.append(f"  {'validate only + commit (p50s)':<44}{result['floor_local_p50_ms']:>8.3f}")
    lines.append(
        f"ratio create p50 / (validate over HTTP + commit): gate-only {result['ratio_gate']:.2f}"
        f", two-step {result['ratio_two_step']:.2f} (target <= 1.5 for gate-only); "
        f"gate-only / (validate only + commit): {result['ratio_gate_local']:.2f}"
    )
    lines.append(
        "median over rounds of gate-only / (validate over HTTP + commit): "
        f"{result['ratio_gate_per_round_p50']:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="idle time before each request")
    ap.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "EXTRA"])
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    exit_on_sigterm()
    result = asyncio.run(measure(args))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(report(result))


if __name__ == "__main__":
    main()
