"""Tools for the chaos test (tests/test_chaos.py) and bench (bench/chaos.py).

Every execution is recorded in the tools' own SQLite database (`chaos.db` in the
daemon's state directory), and the record is committed BEFORE the tool does the
rest of its work: a daemon killed right after the record still counts it. So the
table says how often each step's tool really started, whatever the daemon's
own database claims.

The daemon loads this module through `[tools] modules`; the test reads the
table with `executions()`. Several daemons sharing one state directory each say their
name in STEPD_TEST_NODE, and every execution records it (`nodes()`).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from daemon.tools import ToolContext, ToolError, tool

DB_NAME = "chaos.db"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS executions (key TEXT, attempt INT, tool TEXT, at INT, node TEXT)"
)


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode, WAL, waiting up to 10 s for a lock."""
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(_SCHEMA)
    return db


def record(ctx: ToolContext, name: str) -> None:
    """Durably note that `name` started for this step and attempt (committed on return)."""
    db = connect(ctx.state_dir / DB_NAME)
    try:
        db.execute(
            "INSERT INTO executions (key, attempt, tool, at, node) VALUES (?, ?, ?, ?, ?)",
            (
                ctx.idempotency_key,
                ctx.attempt,
                name,
                time.time_ns() // 1_000_000,
                os.environ.get("STEPD_TEST_NODE"),
            ),  # fmt: skip
        )
    finally:
        db.close()


def _result(ctx: ToolContext, ms: int) -> dict[str, Any]:
    return {"ms": ms, "attempt": ctx.attempt, "key": ctx.idempotency_key}


@tool
async def chaos_work(ms: int = 20, *, ctx: ToolContext) -> dict[str, Any]:
    """Idempotent work (async): record the execution, then sleep `ms` milliseconds."""
    await asyncio.to_thread(record, ctx, "chaos_work")
    await asyncio.sleep(ms / 1000)
    return _result(ctx, ms)


@tool
def chaos_work_sync(ms: int = 20, *, ctx: ToolContext) -> dict[str, Any]:
    """Idempotent work (sync, in a worker thread): record the execution, then sleep."""
    record(ctx, "chaos_work_sync")
    time.sleep(ms / 1000)
    return _result(ctx, ms)


@tool(idempotent=False)
async def chaos_charge(ms: int = 20, *, ctx: ToolContext) -> dict[str, Any]:
    """A side effect that must not happen twice unless a person decides so."""
    await asyncio.to_thread(record, ctx, "chaos_charge")
    await asyncio.sleep(ms / 1000)
    return {**_result(ctx, ms), "charged": True}


@tool
async def chaos_flaky(fail_first: int, *, ctx: ToolContext) -> dict[str, Any]:
    """Record the execution, then fail attempts 1..fail_first (retryable), then succeed."""
    await asyncio.to_thread(record, ctx, "chaos_flaky")
    if ctx.attempt <= fail_first:
        raise ToolError(f"chaos_flaky failure on attempt {ctx.attempt}", retryable=True)
    return _result(ctx, 0)


@tool
async def chaos_item(i: int, v: int, fail: bool = False, ms: int = 5, *, ctx: ToolContext) -> Any:
    """A map item's work: record the execution, sleep `ms`, then give {"i", "v"}, or fail
    (not retryable) when `fail`."""
    await asyncio.to_thread(record, ctx, "chaos_item")
    await asyncio.sleep(ms / 1000)
    if fail:
        raise ToolError(f"chaos_item failure of item {i}", retryable=False)
    return {"i": i, "v": v}


@tool
async def chaos_once(key: str, *, ctx: ToolContext) -> dict[str, Any]:
    """Fail (not retryable) the first time it runs for `key`, succeed afterwards: a step a
    redrive gets past. Recorded (as an execution) before it fails or succeeds."""

    def first() -> bool:
        record(ctx, "chaos_once")
        db = connect(ctx.state_dir / DB_NAME)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS once (key TEXT PRIMARY KEY)")
            return db.execute("INSERT OR IGNORE INTO once (key) VALUES (?)", (key,)).rowcount == 1
        finally:
            db.close()

    if await asyncio.to_thread(first):
        raise ToolError(f"chaos_once failure of {key}", retryable=False)
    return {"once": key}


def executions(state_dir: Path) -> list[tuple[str, int, str, int]]:
    """Every recorded execution: (key, attempt, tool, at)."""
    path = state_dir / DB_NAME
    if not path.exists():
        return []
    db = connect(path)
    try:
        return list(db.execute("SELECT key, attempt, tool, at FROM executions ORDER BY rowid"))
    finally:
        db.close()


def nodes(state_dir: Path) -> list[tuple[str, int, str | None]]:
    """Which daemon (its STEPD_TEST_NODE) ran each recorded execution: (key, attempt, node)."""
    path = state_dir / DB_NAME
    if not path.exists():
        return []
    db = connect(path)
    try:
        return list(db.execute("SELECT key, attempt, node FROM executions ORDER BY rowid"))
    finally:
        db.close()


def counts(state_dir: Path) -> Counter[str]:
    """Executions per idempotency key."""
    return Counter(key for key, _, _, _ in executions(state_dir))


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of a SQLite file ("ok" when sound)."""
    db = sqlite3.connect(path, timeout=10.0)
    try:
        return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()
