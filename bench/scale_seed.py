"""Seed a stepd database with finished history, fast, for the scale benchmark.

The real store creates the schema (so the benchmark runs against exactly the
migrations the daemon applies); then raw sqlite3 `executemany` in large
transactions appends completed two-step `echo` workflows with their steps and
events, with the column values the daemon itself writes for such a run (checked
against a real run: ids and times in milliseconds, a lease left on finished
steps, six events per workflow). Going through the daemon would take hours for
a million steps; this takes seconds.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.storage import now_ms
from daemon.storage.sqlite.store import SqliteStore as Store

# The flow exactly as the daemon stores it for the throughput workload's two-step echo.
FLOW_JSON = (
    '{"start":{"tool":"echo","args":{"n":"<<input.n>>"},"next":"second"},'
    '"second":{"tool":"echo","args":{"prev":"<<result.n>>"},"done":true}}'
)
CREATED_BY = "bench"
LEASE_MS = 30_000  # the daemon's default lease; finished steps keep their last lease_until
STRIDE_MS = 1_000  # one seeded workflow per second of history: ids look like real epochs
BATCH_WORKFLOWS = 50_000  # workflows per transaction


@dataclass(frozen=True)
class Seeded:
    """What was written, and where the seeded workflows' ids are (base + k * stride)."""

    workflows: int
    steps: int
    events: int
    seconds: float
    base_id: int
    stride_ms: int

    def workflow_id(self, k: int) -> int:
        """The id of the k-th seeded workflow (0 <= k < workflows)."""
        return self.base_id + k * self.stride_ms


def create_schema(path: Path) -> None:
    """Open the database once with the real store: WAL mode and every migration."""

    async def run() -> None:
        store = Store(path)
        await store.open()
        await store.close()

    asyncio.run(run())


def _rows(base: int, start: int, stop: int) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Rows for workflows start..stop-1: one completed workflow, two done steps, six events.

    Times follow the order the daemon writes them in (created, claimed, done, next
    step created, claimed, done, completed) a few milliseconds apart.
    """
    wfs: list[tuple] = []
    steps: list[tuple] = []
    events: list[tuple] = []
    for k in range(start, stop):
        t = base + k * STRIDE_MS
        s1, s2 = t + 1, t + 2
        n = str(k)
        wfs.append((t, "seeded", FLOW_JSON, '{"n":' + n + "}", "completed", CREATED_BY,
                    t, t + 8, t + 8))  # fmt: skip
        steps.append((s1, t, "start", "start", "echo", "done", 1, 1, '{"n":' + n + "}",
                      t, t + 4 + LEASE_MS, t, t + 4, t + 6))  # fmt: skip
        steps.append((s2, t, "second", "second", "echo", "done", 2, 1, '{"prev":' + n + "}",
                      t + 6, t + 7 + LEASE_MS, t + 6, t + 7, t + 8))  # fmt: skip
        events.append((t, None, "created", t, '{"by":"' + CREATED_BY + '"}'))
        events.append((t, s1, "step_started", t + 4, '{"state":"start","attempt":1}'))
        events.append((t, s1, "step_done", t + 6, '{"attempt":1}'))
        events.append((t, s2, "step_started", t + 7, '{"state":"second","attempt":1}'))
        events.append((t, s2, "step_done", t + 8, '{"attempt":1}'))
        events.append((t, None, "completed", t + 8, None))
    return wfs, steps, events


def _batches(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, BATCH_WORKFLOWS):
        yield start, min(n, start + BATCH_WORKFLOWS)


def seed(path: Path, steps: int) -> Seeded:
    """Create the schema, then append `steps // 2` finished two-step workflows.

    The history ends a minute ago, so ids the daemon makes afterwards (from the
    clock) keep increasing. The webhook notifier's cursor is set to the last event,
    as a daemon that wrote this history would have left it (it saves the cursor
    every few seconds); otherwise the first start would spend its first minutes
    catching up on millions of old events, which is a different measurement.
    """
    t0 = time.perf_counter()
    create_schema(path)
    n = steps // 2
    base = now_ms() - 60_000 - n * STRIDE_MS
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # Nothing else has the file open; the rows can be rebuilt if this is interrupted.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -262144")  # 256 MiB: index pages stay in memory
        db.execute("PRAGMA foreign_keys = OFF")  # parents are inserted first anyway
        for start, stop in _batches(n):
            wfs, step_rows, event_rows = _rows(base, start, stop)
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO workflows (id, name, flow_json, input_json, status, created_by,"
                " created_at, updated_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                wfs,
            )
            db.executemany(
                "INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt,"
                " result_json, run_at, lease_until, created_at, started_at, completed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                step_rows,
            )
            db.executemany(
                "INSERT INTO events (workflow_id, step_id, type, at, data_json) "
                "VALUES (?, ?, ?, ?, ?)",
                event_rows,
            )
            db.execute("COMMIT")
        db.execute(
            "INSERT INTO cursors (name, event_id) SELECT 'webhooks', coalesce(max(id), 0) "
            "FROM events WHERE true ON CONFLICT (name) DO UPDATE SET event_id = excluded.event_id"
        )
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        assert mode == "wal", mode
    finally:
        db.close()
    # On disk before anything is measured, as a database at rest would be: otherwise the
    # kernel writes the seeded half-gigabyte back during the measurements, and reads of the
    # freshly seeded file were seen to take three times as long meanwhile.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return Seeded(
        workflows=n,
        steps=2 * n,
        events=6 * n,
        seconds=time.perf_counter() - t0,
        base_id=base,
        stride_ms=STRIDE_MS,
    )
