"""The Huey application of the benchmark: one `SqliteHuey` and its tasks.

Imported by both sides, `huey_bench.py` (the producer) and the consumer it starts
(`python -m huey.bin.huey_consumer huey_app.huey`), so task names match. The database file
comes from $HUEY_BENCH_DB (a fresh temp dir per run). SqliteHuey runs at its defaults:
WAL, SQLite's default synchronous (FULL), results stored.
"""

from __future__ import annotations

import os
import time
from typing import Any

from huey import SqliteHuey

huey = SqliteHuey("stepd-bench", filename=os.environ["HUEY_BENCH_DB"])


@huey.task()
def first(n: int) -> dict[str, int]:
    """Step 1: compute a result and enqueue step 2 with it (Huey stores this result too)."""
    result = {"n": n}
    second(result)
    return result


@huey.task()
def second(prev: dict[str, int]) -> dict[str, int]:
    """Step 2: consume step 1's result."""
    return {"prev": prev["n"]}


@huey.task()
def first_timed(n: int) -> str:
    """Step 1 of the latency run: stamp, enqueue step 2 with the stamps, return its task id."""
    start = time.time_ns()
    result = {"n": n, "start": start, "end": time.time_ns()}
    return second_timed(result).id


@huey.task()
def second_timed(prev: dict[str, Any]) -> dict[str, Any]:
    return {"first": prev, "second_start": time.time_ns()}


@huey.task()
def slow(n: int) -> int:
    """For the kill test: long enough to be killed in the middle of it."""
    time.sleep(0.05)
    return n
