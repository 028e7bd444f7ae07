"""SQLite storage: one database file, one daemon.

One writer connection whose writes are group-committed (batcher.py: every write is a
function run inside a shared BEGIN IMMEDIATE transaction, and is acknowledged after its
COMMIT), and reader connections, which in WAL mode never wait behind the writer. The
transaction bodies are BaseStore's; this module gives them connections, ids and errors
the rest of the daemon understands.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import sqlite3
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from daemon import files
from daemon.storage.base import BaseStore, load_queries, numbered_migrations
from daemon.storage.sqlite.batcher import WriteBatcher, connect
from daemon.storage.types import (
    DatabaseLocked,
    Row,
    StorageError,
    StorageUnavailable,
)

T = TypeVar("T")
Conn = sqlite3.Connection

_SQL = resources.files("daemon.storage.sqlite")
SLOW_READERS = 2  # a workflow's steps and a /metrics scrape need not wait for each other


def migrations() -> list[tuple[int, str]]:
    """(version, script) for every numbered file in migrations/, in order."""
    return numbered_migrations(_SQL / "migrations")


def split_statements(script: str) -> list[str]:
    """Split a migration script into statements (sqlite3.complete_statement decides)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") for ln in buf.splitlines() if ln.strip()
    ):
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:80]}")
    return [s for s in out if s]


def _translated(exc: sqlite3.Error) -> StorageError:
    """sqlite3's errors as the storage interface's: locked past the busy timeout, disk full
    or an I/O error is StorageUnavailable (the API's 503); anything else a StorageError."""
    if isinstance(exc, sqlite3.OperationalError):
        return StorageUnavailable(str(exc))
    return StorageError(str(exc))


def backup(source: Path, dest: Path) -> int:
    """A consistent copy of a live database with SQLite's online backup API; returns pages.

    The copy is written beside `dest`, checked with PRAGMA integrity_check, then renamed,
    so `dest` is either the old file or a complete, valid copy.
    """
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    files.create_private(partial)  # a copy of the database is as private as the database
    try:
        src = sqlite3.connect(source, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # one step: a single read transaction, a consistent snapshot
                (check,) = dst.execute("PRAGMA integrity_check").fetchone()
                if check != "ok":
                    raise StorageError(f"backup failed its integrity check: {check}")
                (pages,) = dst.execute("PRAGMA page_count").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise _translated(exc) from exc
    os.replace(partial, dest)
    return int(pages)


class SqliteStore(BaseStore):
    """The storage interface on one SQLite file (see BaseStore)."""

    Q = load_queries((_SQL / "queries.sql").read_text())
    backend = "sqlite"

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        max_running_per_token: int | None = None,
        node: str = "",
    ):
        super().__init__(max_running_per_token=max_running_per_token, node=node)
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._writes: WriteBatcher | None = None
        self._reader: Conn | None = None  # small indexed reads, on the loop
        # Reads that may be big or scan (metrics, a workflow's steps): off the loop, on
        # aiosqlite connections (a thread each), taken in turn.
        self._slow: list[aiosqlite.Connection] = []
        self._next_slow = itertools.cycle(range(SLOW_READERS))
        self._last_id = 0
        self._owner_fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._writes is not None

    @property
    def _writer(self) -> Conn | None:
        """The writer connection (tests use it to simulate faults between writes)."""
        return self._writes.conn if self._writes is not None else None

    # -- lifecycle -----------------------------------------------------------------

    async def open(self) -> None:
        """Take ownership of the file (one daemon per database), migrate, connect."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_ownership()
        writer: Conn | None = None
        try:
            # SQLite gives the -wal, -shm and -journal files the database file's mode; those
            # left by an older run are tightened here.
            files.create_private(self.path)
            for suffix in ("-wal", "-shm", "-journal"):
                files.tighten(f"{self.path}{suffix}")
            writer = self._connect()
            writer.execute("PRAGMA journal_mode = WAL")
            self._migrate(writer)
            (row,) = writer.execute(self.Q["max_id"]).fetchall()
            self._last_id = int(row[0]) if row else 0
            self._reader = self._connect()
            for _ in range(SLOW_READERS):
                self._slow.append(await self._connect_slow())
        except BaseException:
            await self._close_readers(writer)
            self._release_ownership()
            raise
        self._writes = WriteBatcher(
            writer, busy_timeout_ms=self.busy_timeout_ms, on_commit=self._committed
        )
        self._writes.start()

    def _connect(self) -> Conn:
        return connect(self.path, synchronous=self.synchronous,
                             busy_timeout_ms=self.busy_timeout_ms)  # fmt: skip

    async def _connect_slow(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            await conn.execute("PRAGMA query_only = ON")
        except BaseException:
            await conn.close()  # its thread would keep the process from exiting
            raise
        return conn

    def _take_ownership(self) -> None:
        # An advisory lock on a side file, held while open: a second daemon on the same
        # database would requeue this one's running steps and run them twice. The kernel
        # drops the lock when the process dies, so kill -9 leaves nothing to clean up.
        lock_path = f"{self.path}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, files.PRIVATE)
        with contextlib.suppress(PermissionError):  # another user's lock file still locks
            os.fchmod(fd, files.PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseLocked(
                f"{self.path} is in use by another stepd process (lock file {lock_path})"
            ) from None
        self._owner_fd = fd

    def _release_ownership(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # releases the lock
            self._owner_fd = None

    async def close(self) -> None:
        """Commit queued writes, then close every connection and release the file."""
        if self._writes is not None:
            writes, self._writes = self._writes, None
            await writes.close()
            writes.conn.close()
        await self._close_readers()
        self._release_ownership()

    async def _close_readers(self, *others: Conn | None) -> None:
        slow, self._slow = self._slow, []
        for aconn in slow:
            await aconn.close()
        for conn in (self._reader, *others):
            if conn is not None:
                conn.close()
        self._reader = None

    @staticmethod
    def _migrate(db: Conn) -> None:
        """Apply every migration newer than PRAGMA user_version, in one transaction."""
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in migrations():
                if number > version:
                    for statement in split_statements(script):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        return int((await self._one("PRAGMA user_version", {}))[0])

    async def _write(self, op: Callable[[Conn], T], *, blocking: bool = False) -> T:
        """Run `op` in a write transaction (group-committed); its value once committed.
        A `blocking` op may take long and runs off the loop (see WriteBatcher.submit)."""
        writes = self._writes  # close() clears it before the queue is drained
        if writes is None:
            raise StorageError("the store is not open")
        try:
            try:
                return await writes.submit(op, blocking=blocking)
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise

            # Another process inserted rows with ids this one was about to use (ids are
            # handed out from memory): catch up with the largest id in use, and try again.
            # The failed attempt was rolled back in its savepoint.
            def again(db: Conn) -> T:
                (row,) = db.execute(self.Q["max_id"]).fetchall()
                self._last_id = max(self._last_id, int(row[0]))
                return op(db)

            return await writes.submit(again, blocking=blocking)
        except sqlite3.Error as exc:
            raise _translated(exc) from exc

    def _new_id(self, now: int) -> int:
        """Millisecond-epoch shaped ids, unique and increasing; call inside a write op."""
        self._last_id = max(now, self._last_id + 1)
        return self._last_id

    async def _one(self, sql: str, params: dict[str, Any]) -> Row | None:
        """One row, read on the loop: every such query is small and indexed, and a WAL
        reader never waits for the writer, so a thread hop would cost more than the read."""
        return self._read(sql, params, all_rows=False)

    async def _all(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """All rows of a small, indexed, LIMITed query, read on the loop (see _one)."""
        return self._read(sql, params, all_rows=True)

    def _read(self, sql: str, params: dict[str, Any], *, all_rows: bool) -> Any:
        if self._reader is None:
            raise StorageError("the store is not open")
        try:
            cur = self._reader.execute(sql, params)
            return cur.fetchall() if all_rows else cur.fetchone()
        except sqlite3.Error as exc:
            raise _translated(exc) from exc

    async def read_slow(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """All rows of a query that may scan or return much (counts for /metrics, a
        workflow's steps with their results), read in a thread."""
        if not self._slow:
            raise StorageError("the store is not open")
        conn = self._slow[next(self._next_slow)]
        try:
            return list(await conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise _translated(exc) from exc
