"""Tools used by the tests (loaded through the config's [tools] modules)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from daemon.tools import ToolContext, ToolError, tool

CALLS: dict[str, int] = {}  # idempotency key -> calls, for flaky
STARTED: list[tuple[str, float]] = []
LOCK = threading.Lock()


@tool
def blocking_sleep(seconds: float) -> dict[str, Any]:
    """Block the calling thread (a sync tool)."""
    time.sleep(seconds)
    return {"slept": seconds, "thread": threading.current_thread().name}


@tool
async def flaky(fail_times: int, *, ctx: ToolContext) -> dict[str, Any]:
    """Fail the first `fail_times` attempts of a step, then succeed."""
    with LOCK:
        CALLS[ctx.idempotency_key] = CALLS.get(ctx.idempotency_key, 0) + 1
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@tool
async def fail(message: str = "boom", retryable: bool = True) -> None:
    """Always fail."""
    raise ToolError(message, retryable=retryable)


@tool
async def exit_daemon() -> None:
    """Try to stop the daemon with SystemExit."""
    raise SystemExit(3)


@tool
def not_json() -> Any:
    """Return something JSON cannot encode."""
    return {"when": object()}


@tool
async def big(size: int) -> str:
    """Return a string of `size` characters."""
    return "x" * size


@tool
async def track(label: str, seconds: float = 0.05) -> str:
    """Record when it started, then wait."""
    STARTED.append((label, time.monotonic()))
    await asyncio.sleep(seconds)
    return label


@tool
async def surrogate_error() -> None:
    """Fail with text SQLite cannot store as UTF-8 (a lone surrogate)."""
    raise ValueError("cannot open b'\udcff.txt'")


@tool
async def self_cancel(*, ctx: ToolContext) -> dict[str, int]:
    """Raise CancelledError on the first attempt without being cancelled."""
    if ctx.attempt == 1:
        fut = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut
    return {"attempt": ctx.attempt}


@tool
async def own_timeout(*, ctx: ToolContext) -> dict[str, int]:
    """Raise the tool's own TimeoutError on the first attempt."""
    if ctx.attempt == 1:
        raise TimeoutError("upstream did not answer")
    return {"attempt": ctx.attempt}


@tool
async def mutate_then_fail(items: list[str], *, ctx: ToolContext) -> list[str]:
    """Append to its argument, and fail on the first two attempts."""
    items.append("trailer")
    if ctx.attempt < 3:
        raise RuntimeError("not yet")
    return items


CHARGES: list[str] = []


@tool(idempotent=False)
async def charge(amount: int, *, ctx: ToolContext) -> dict[str, Any]:
    """A side effect that must not happen twice by surprise."""
    CHARGES.append(ctx.idempotency_key)
    return {"charged": amount, "attempt": ctx.attempt}


@tool(idempotent=False)
async def slow_charge(amount: int, seconds: float, *, ctx: ToolContext) -> dict[str, Any]:
    """A side effect that takes a while: a stop can cut it off."""
    CHARGES.append(ctx.idempotency_key)
    await asyncio.sleep(seconds)
    return {"charged": amount, "attempt": ctx.attempt}


class Boom(BaseException):
    """Not an Exception: escapes `except Exception`."""


@tool
async def base_exception() -> None:
    """Raise a BaseException subclass."""
    raise Boom("out of band")


@tool
def base_exception_in_thread() -> None:
    """Raise a BaseException subclass from a worker thread."""
    raise Boom("out of band, threaded")


@tool
async def chatty(*, ctx: ToolContext) -> None:
    """Writes a line to its own logger."""
    ctx.logger.info("hello from a tool", extra={"rows": 5})
    ctx.logger.getChild("part").info("hello from a part")


@tool
async def empties(n: int) -> list[dict[str, Any]]:
    """A list of `n` empty objects: 3 bytes of JSON each, ~70 bytes once parsed."""
    return [{} for _ in range(n)]
