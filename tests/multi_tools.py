"""Tools for the tests and benchmarks that run several daemons on one database.

Each daemon is started with STEPD_TEST_NODE naming it, so a step's result says which
daemon ran it. `linger` and `linger_charge` record every execution in the shared state
directory's chaos.db (tests/chaos_tools.py: committed before the work) and sleep long on
their first attempt only: a daemon killed mid-step leaves a step whose next attempt ends
at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from daemon.tools import ToolContext, tool
from tests.chaos_tools import record


def node() -> str:
    return os.environ.get("STEPD_TEST_NODE", "?")


@tool
async def whereami(**args: Any) -> dict[str, Any]:
    """Which daemon ran this step, and when its body started (time.time_ns())."""
    return {**args, "node": node(), "start_ns": time.time_ns()}


async def _linger(name: str, seconds: float, ctx: ToolContext) -> dict[str, Any]:
    await asyncio.to_thread(record, ctx, f"{name}@{node()}")
    if ctx.attempt == 1:
        await asyncio.sleep(seconds)
    return {"node": node(), "attempt": ctx.attempt}


@tool
async def linger(seconds: float, *, ctx: ToolContext) -> dict[str, Any]:
    """Idempotent: record the execution, then sleep `seconds` (first attempt only)."""
    return await _linger("linger", seconds, ctx)


@tool(idempotent=False)
async def linger_charge(seconds: float, *, ctx: ToolContext) -> dict[str, Any]:
    """Not idempotent: record the execution, then sleep `seconds` (first attempt only)."""
    return await _linger("linger_charge", seconds, ctx)
