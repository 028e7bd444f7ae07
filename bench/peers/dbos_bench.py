"""DBOS (3.x, SQLite system database) on stepd's benchmark workload, in a process of its own.

    python bench/peers/dbos_bench.py throughput --workflows 2000 [--json PATH]
    python bench/peers/dbos_bench.py latency --samples 100 [--json PATH]

The workload is stepd's: a `@DBOS.workflow` of two `@DBOS.step`s, step 2 consuming step
1's result, started with `DBOS.start_workflow`. DBOS runs in the caller's process (it is a
library), so this script is both the client and the engine; everything is at DBOS's
defaults but the system database URL (a SQLite file in a fresh temp dir) and the log level.

throughput: start W workflows back to back, then wait for every handle's result; the clock
  runs from the first start_workflow until the last result.
latency: one workflow at a time; start_workflow called -> step 1 body runs, and step 1
  body returns -> step 2 body runs (the bodies stamp time.time_ns()).
Self-contained (stdlib + dbos) so that a missing or broken DBOS cannot break the suite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from dbos import DBOS, DBOSConfig
except ImportError as exc:  # the suite reports this and carries on with the other systems
    sys.exit(f"dbos is not installed ({exc}); install the bench extra: pip install -e '.[bench]'")


@DBOS.step()
def first(n: int) -> dict[str, int]:
    start = time.time_ns()
    return {"n": n, "start": start, "end": time.time_ns()}


@DBOS.step()
def second(prev: dict[str, int]) -> dict[str, int]:
    start = time.time_ns()
    return {"prev": prev["n"], "start": start, "end": time.time_ns()}


@DBOS.workflow()
def two_steps(n: int) -> dict[str, Any]:
    a = first(n)
    b = second(a)  # step 2 consumes step 1's result
    return {"first": a, "second": b}


def launch(tmp: Path) -> None:
    config: DBOSConfig = {
        "name": "stepd-bench",
        "system_database_url": f"sqlite:///{tmp / 'dbos.sqlite'}",
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()


def throughput(n: int, timeout: float) -> dict[str, Any]:
    for h in [DBOS.start_workflow(two_steps, -i) for i in range(1, 21)]:  # warm-up
        h.get_result()
    t0 = time.perf_counter()
    handles = [DBOS.start_workflow(two_steps, i) for i in range(n)]
    started = time.perf_counter() - t0
    deadline = t0 + timeout
    for h in handles:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"DBOS did not finish {n} workflows in {timeout:.0f} s")
        result = h.get_result()
        assert result["second"]["prev"] == result["first"]["n"]
    elapsed = time.perf_counter() - t0
    return {
        "workflows": n,
        "elapsed_s": elapsed,
        "submit_s": started,
        "wf_per_s": n / elapsed,
        "steps_per_s": 2 * n / elapsed,
    }


def latency(samples: int) -> dict[str, Any]:
    first_ms, next_ms = [], []
    for i in range(10 + samples):
        time.sleep(0.01)  # idle between samples, as for stepd
        t0 = time.time_ns()
        result = DBOS.start_workflow(two_steps, i).get_result()
        if i >= 10:  # warm-up
            first_ms.append((result["first"]["start"] - t0) / 1e6)
            next_ms.append((result["second"]["start"] - result["first"]["end"]) / 1e6)
    return {"samples_ms": {"create_to_start": first_ms, "step_to_next": next_ms}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["throughput", "latency"])
    ap.add_argument("--workflows", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="dbos-bench-") as d:
        os.chdir(d)
        launch(Path(d))
        try:
            if args.scenario == "throughput":
                result = throughput(args.workflows, args.timeout)
            else:
                result = latency(args.samples)
        finally:
            DBOS.destroy()
            os.chdir("/")
    from importlib.metadata import version

    result = {"system": "dbos", "version": version("dbos"), "database": "sqlite", **result}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if "wf_per_s" in result:
        print(f"dbos: {result['workflows']} workflows in {result['elapsed_s']:.2f} s = "
              f"{result['wf_per_s']:.0f} wf/s")  # fmt: skip
    else:
        for name, values in result["samples_ms"].items():
            print(f"dbos {name:<16} p50={statistics.median(values):8.2f} ms  "
                  f"max={max(values):8.2f} ms  n={len(values)}")  # fmt: skip


if __name__ == "__main__":
    main()
