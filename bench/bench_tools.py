"""Tools for the benchmarks: report when they ran, on the wall clock in ns."""

from __future__ import annotations

import time

from daemon.tools import tool


@tool
async def stamp() -> int:
    """Return time.time_ns() at the moment the step started."""
    return time.time_ns()


@tool
async def span(**args: object) -> dict[str, object]:
    """Return when the tool body started and when it finished (time.time_ns()), with its args.

    The next step's `start` minus this step's `end` is the step-done -> next-started latency
    (the transition's commit and the wake-up, without the tool's own run time).
    """
    start = time.time_ns()
    return {**args, "start": start, "end": time.time_ns()}
