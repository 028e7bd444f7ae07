"""Tools for the benchmarks: report when they started, on the wall clock in ns."""

from __future__ import annotations

import time

from daemon.tools import tool


@tool
async def stamp() -> int:
    """Return time.time_ns() at the moment the step started."""
    return time.time_ns()
