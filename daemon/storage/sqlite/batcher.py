"""SQLite connections for the store: group-committed writes and reads that never wait.

Writes are small synchronous functions of a connection. They are queued, and one
task runs everything queued so far as a single transaction: each function inside
its own SAVEPOINT (a failing one is rolled back alone), then one COMMIT for all of
them. A caller's future resolves only after that COMMIT, so nothing is
acknowledged before it is durable. While one COMMIT waits for its fsync, the next
batch fills up: under load, hundreds of step completions share one fsync; when
idle, a batch holds one write and is committed at once.

The statements themselves run on the event loop thread (microseconds each, no
thread hop per statement); only the parts that can block leave it: COMMIT (the
fsync, and the occasional checkpoint), a BEGIN that has to wait for another
process's write lock, and writes submitted as blocking (a retention purge), which
run in the commit thread inside the same transaction. Reads use other connections:
in WAL mode they see the last commit and never wait for the writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("stepd.db")
T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
Queued = tuple[Op, "asyncio.Future[Any]", bool]  # an op, its caller's future, blocking?
CommitHook = Callable[[float, int], None]  # (seconds, operations in the transaction)

MAX_BATCH = 2000  # operations per transaction: bounds one commit's latency


def connect(path: Path, *, synchronous: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from the commit
    thread as well as the loop (never from both at once: the batcher takes turns)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         cached_statements=256)  # fmt: skip
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    return db


def _busy(exc: sqlite3.OperationalError) -> bool:
    # The primary code: SQLITE_BUSY_RECOVERY, SQLITE_BUSY_SNAPSHOT ... are busy too.
    return (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class WriteBatcher:
    """Runs queued write operations in shared transactions (group commit)."""

    def __init__(
        self, conn: sqlite3.Connection, *, busy_timeout_ms: int, on_commit: CommitHook
    ) -> None:
        self.conn = conn
        self._busy_timeout_ms = busy_timeout_ms
        self._on_commit = on_commit
        self._queue: list[Queued] = []
        self._has_work = asyncio.Event()
        self._stopping = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="stepd-commit")
        self._task: asyncio.Task[None] | None = None
        self._commit_done = False  # set in the thread when the current COMMIT succeeded
        # The writer connection never waits on the loop: BEGIN fails at once when another
        # process holds the write lock, and is then retried in the thread with the timeout.
        conn.execute("PRAGMA busy_timeout = 0")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stepd-writer")

    async def submit(self, op: Callable[[sqlite3.Connection], T], *, blocking: bool = False) -> T:
        """Run `op` in the next transaction; returns its value once that transaction committed.

        A `blocking` op (one that may take long: a purge) runs in the commit thread, so
        the loop goes on serving reads and requests meanwhile; the others run on the loop.

        If `op` raises, its own changes are rolled back and the exception is raised here
        (after the commit of the others). If the transaction fails as a whole (disk full,
        locked), every operation in it gets that error and none of them changed anything.
        A caller cancelled before its turn is skipped.
        """
        if self._stopping or self._task is None or self._task.done():
            raise sqlite3.ProgrammingError("the store is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut, blocking))
        self._has_work.set()
        return await fut

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._stopping = True
        self._has_work.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # ended already if it was cancelled: no raise
            self._task = None
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        return
                    await self._has_work.wait()
                self._has_work.clear()
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if self._queue:
                    self._has_work.set()
                live = [queued for queued in batch if not queued[1].done()]
                if live:
                    await self._transaction(live)
        finally:
            # However the writer ends (cancelled at loop teardown, a bug), nobody may wait
            # forever for a write that will not run.
            queued, self._queue = self._queue, []
            for _, fut, _ in queued:
                if not fut.done():
                    fut.set_exception(sqlite3.ProgrammingError("the store's writer stopped"))

    async def _transaction(self, batch: list[Queued]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[asyncio.Future[Any], Any, Exception | None]] = []
        self._commit_done = False
        try:
            await self._begin()
            for op, fut, blocking in batch:
                if fut.done():
                    continue  # its caller gave up while BEGIN waited for the lock
                if blocking:
                    outcomes.append((fut, *await self._in_thread(self._apply, op)))
                else:
                    outcomes.append((fut, *self._apply(op)))
            await self._in_thread(self._commit)
        except BaseException as exc:  # noqa: BLE001 - every caller must hear of it
            if self._commit_done:
                # Cancelled while the COMMIT went through: the writes are durable, and
                # their callers must hear that, not an error (a retry would repeat them).
                self._resolve(outcomes, time.perf_counter() - started)
                raise
            self._rollback()
            error = exc if isinstance(exc, Exception) else _aborted(exc)
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        self._resolve(outcomes, time.perf_counter() - started)

    def _commit(self) -> None:
        self.conn.execute("COMMIT")
        self._commit_done = True

    def _resolve(
        self, outcomes: list[tuple[asyncio.Future[Any], Any, Exception | None]], seconds: float
    ) -> None:
        for fut, value, failure in outcomes:
            if fut.done():
                continue  # the caller gave up after its change was made: it stays made
            if failure is None:
                fut.set_result(value)
            elif isinstance(failure, StopIteration):  # a future refuses to carry one
                fut.set_exception(RuntimeError(f"write raised {failure!r}"))
            else:
                fut.set_exception(failure)
        try:
            self._on_commit(seconds, len(outcomes))
        except Exception:  # a broken hook must not stop the writer
            log.exception("a commit hook failed")

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call on the connection in the commit thread. If this task is
        cancelled meanwhile, wait for the call anyway: the connection is the loop's
        again only when the thread is done with it (a COMMIT cannot be interrupted)."""
        job = self._thread.submit(fn, *args)
        try:
            # Shielded, so a cancellation never cancels the job before it starts either.
            return await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            concurrent.futures.wait([job])
            raise

    async def _begin(self) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            await self._in_thread(self._begin_waiting)

    def _begin_waiting(self) -> None:
        """BEGIN IMMEDIATE with the busy timeout, off the loop (another process writes)."""
        self.conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        finally:
            self.conn.execute("PRAGMA busy_timeout = 0")

    def _apply(self, op: Op) -> tuple[Any, Exception | None]:
        """One operation inside its own savepoint; a failure undoes only its changes."""
        self.conn.execute("SAVEPOINT op")
        try:
            value = op(self.conn)
            if not self.conn.in_transaction:  # it ran COMMIT or ROLLBACK itself: a bug
                raise sqlite3.ProgrammingError("a write ended the shared transaction")
        except Exception as exc:
            if not self.conn.in_transaction:
                raise  # SQLite rolled back the whole transaction (disk full, I/O error)
            self.conn.execute("ROLLBACK TO op")
            self.conn.execute("RELEASE op")
            return None, exc
        self.conn.execute("RELEASE op")
        return value, None

    def _rollback(self) -> None:
        # "no transaction is active" is fine: BEGIN itself failed, or SQLite rolled back.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")


def _aborted(exc: BaseException) -> Exception:
    return sqlite3.OperationalError(f"write aborted: {type(exc).__name__}")
