"""Tools for tests/test_executor_races.py: steps the test holds and releases, and a log of calls."""

from __future__ import annotations

import asyncio

from daemon.tools import ToolContext, tool

GATES: dict[str, asyncio.Event] = {}
CALLS: list[str] = []


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


@tool
async def hold(name: str) -> str:
    """Wait until the test opens gate `name`."""
    CALLS.append(f"hold:{name}")
    await gate(name).wait()
    return name


@tool
async def record(label: str) -> str:
    CALLS.append(f"record:{label}")
    return label


@tool(idempotent=False)
async def record_once(label: str, *, ctx: ToolContext) -> str:
    CALLS.append(f"record_once:{label}")
    return label


@tool(idempotent=False)
async def slow_once(label: str, seconds: float = 0.5) -> str:
    CALLS.append(f"slow_once:{label}:start")
    await asyncio.sleep(seconds)
    CALLS.append(f"slow_once:{label}:end")
    return label
