"""PostgreSQL storage: any number of daemons share one database.

Every write is one transaction on a pooled connection, run in a worker thread (a write
is a plain synchronous function of the connection, the same function as on SQLite);
serialization failures and deadlocks are retried, a lost connection is StorageUnavailable.
Reads run the same way, in autocommit. Other daemons' writes are heard by LISTEN on a
dedicated connection (channel `stepd`): each daemon NOTIFYs after its commits, at most one
NOTIFY in flight at a time (a burst of commits costs one or two). Singleton jobs hold
session advisory locks on another dedicated connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool

from daemon.models import Step
from daemon.storage import base
from daemon.storage.base import BaseStore, numbered_migrations
from daemon.storage.types import Row as RowProtocol
from daemon.storage.types import StorageError, StorageUnavailable, now_ms

log = logging.getLogger("stepd.storage.postgres")
T = TypeVar("T")

CHANNEL = "stepd"
LOCK_SPACE = 7355608  # advisory lock key space: (LOCK_SPACE, 0) migrations, 1 ids
JOB_SPACE = 7355609  # (JOB_SPACE, crc32(job)): singleton jobs
RETRIES = 5  # attempts of a write that hit a serialization failure, a deadlock, a duplicate
POOL_SIZE = 16
RECONNECT_MAX_S = 5.0

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

# Errors after which the same write may simply run again: it changed nothing.
_RETRY = (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.UniqueViolation)


def translate(sql: str) -> str:
    """`:name` parameters (both backends' queries.sql) as psycopg's `%(name)s`."""
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


def load_queries(text: str) -> dict[str, str]:
    """Named SQL blocks (`-- name --`, one comment line, the statement), translated."""
    return {name: translate(sql) for name, sql in base.load_queries(text).items()}


_SQL = resources.files("daemon.storage.postgres")
Q = load_queries((_SQL / "queries.sql").read_text())


def migrations() -> list[tuple[int, str]]:
    """(version, script) for every numbered file in migrations/, in order."""
    return numbered_migrations(_SQL / "migrations")


# -- rows --------------------------------------------------------------------------


class Row(tuple):  # type: ignore[type-arg]
    """A result row like sqlite3.Row: `row[0]`, `row["col"]`, `keys()`, `dict(row)`."""

    __slots__ = ()
    _index: dict[str, int] = {}
    _keys: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        if key.__class__ is str:
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._keys, self, strict=True))!r})"


_shapes: dict[tuple[str, ...], type[Row]] = {}


def _row_class(names: tuple[str, ...]) -> type[Row]:
    cls = _shapes.get(names)
    if cls is None:
        index = {}
        for i, name in enumerate(names):
            index.setdefault(name, i)  # a repeated name reads its first column, as SQLite
        cls = type("Row", (Row,), {"__slots__": (), "_index": index, "_keys": names})
        if len(_shapes) < 1024:
            _shapes[names] = cls
    return cls


def rows(cursor: psycopg.Cursor[Any]) -> RowMaker[Row]:
    """psycopg row factory: Row instances of one class per result shape."""
    desc = cursor.description
    if desc is None:
        return tuple  # type: ignore[return-value]
    cls = _row_class(tuple(c.name for c in desc))
    return cls  # type: ignore[return-value]


# -- errors ------------------------------------------------------------------------


def _unavailable(exc: BaseException) -> bool:
    """A connection, server or resource problem (not a bug, not a constraint)."""
    return isinstance(exc, psycopg.OperationalError) or (
        isinstance(exc, psycopg.Error)
        and exc.sqlstate is not None
        and exc.sqlstate[:2] in ("08", "53", "57", "58")  # connection, resources, operator
    )


def storage_error(exc: psycopg.Error) -> StorageError:
    if _unavailable(exc):
        return StorageUnavailable(f"PostgreSQL: {exc}".strip())
    return StorageError(f"PostgreSQL: {exc}".strip())


# -- the transaction a write runs in -------------------------------------------------


class Tx:
    """What a write operation sees: execute/executemany on its transaction's connection,
    in pipeline mode: statements whose results the operation does not look at (events,
    touches) go out without waiting for the server, and the first look at a result (a
    fetch, a rowcount) waits for everything sent before it. An operation of one claim
    and 64 events takes a few round trips, not 66."""

    __slots__ = ("conn", "pipeline")

    def __init__(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> None:
        self.conn = conn
        self.pipeline = pipeline

    def execute(self, sql: str, params: Any = None, /) -> PipelinedCursor:
        return PipelinedCursor(self.conn.execute(sql, params), self.pipeline)

    def executemany(self, sql: str, params: Iterable[Any], /) -> PipelinedCursor:
        cur = self.conn.cursor()
        cur.executemany(sql, params)
        return PipelinedCursor(cur, self.pipeline)


class PipelinedCursor:
    """A cursor whose rowcount waits for its result (fetches do so by themselves)."""

    __slots__ = ("_cur", "_pipeline")

    def __init__(self, cur: psycopg.Cursor[Any], pipeline: psycopg.Pipeline) -> None:
        self._cur = cur
        self._pipeline = pipeline

    @property
    def rowcount(self) -> int:
        if self._cur.rowcount == -1:  # not back from the server yet
            self._pipeline.sync()
        return self._cur.rowcount

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    def __iter__(self) -> Any:
        return iter(self._cur.fetchall())


class PostgresStore(BaseStore):
    """The storage interface on a PostgreSQL database that several daemons share.

    Every database call runs in this store's worker threads (one per pooled connection),
    so a slow statement never holds up the event loop, and a write is the same plain
    function of a connection as on SQLite.
    """

    Q = Q
    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        node: str = "",
        max_running_per_token: int | None = None,
        pool_size: int = POOL_SIZE,
    ) -> None:
        super().__init__(max_running_per_token=max_running_per_token, node=node or _node())
        self.url = url
        self.pool_size = pool_size
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._local = threading.local()  # the connection of the write running in a thread
        self._listener: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()  # a commit to tell other daemons about
        self._listening = asyncio.Event()
        self._jobs_conn: psycopg.Connection[Any] | None = None
        self._jobs_lock = threading.Lock()
        self._jobs: set[str] = set()
        self.retries = 0  # writes run again after a serialization failure or a deadlock
        self.notify_sent = 0
        self.notify_heard = 0
        self._held_timer: asyncio.TimerHandle | None = None
        self._held_delay = 0.0

    # -- lifecycle -----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Connect, migrate (under a lock: daemons starting together migrate once), listen."""
        self._dirty = asyncio.Event()
        self._listening = asyncio.Event()
        threads = ThreadPoolExecutor(self.pool_size + 2, thread_name_prefix="stepd-pg")
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url,
            min_size=min(4, self.pool_size),
            max_size=self.pool_size,
            kwargs={
                "autocommit": True,
                "row_factory": rows,
                "application_name": f"stepd {self.node}"[:63],
            },  # fmt: skip
            open=False,
            timeout=10.0,  # waiting for a free connection
            reconnect_timeout=60.0,
            name="stepd",
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(threads, self._open_pool, pool)
        except psycopg.Error as exc:
            threads.shutdown(wait=False)
            raise storage_error(exc) from exc
        except BaseException:
            threads.shutdown(wait=False)
            raise
        self._pool, self._threads = pool, threads
        self._listener = asyncio.create_task(self._listen(), name="stepd-pg-listen")
        self._sender = asyncio.create_task(self._send(), name="stepd-pg-notify")
        with contextlib.suppress(TimeoutError):  # not listening yet is no reason to fail
            async with asyncio.timeout(5):
                await self._listening.wait()

    def _open_pool(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        try:
            pool.open(wait=True, timeout=10.0)
            with pool.connection() as conn:
                migrate(conn)
        except BaseException:
            pool.close()
            raise

    async def close(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        for task in (self._listener, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener = self._sender = None
        pool, self._pool = self._pool, None
        threads, self._threads = self._threads, None
        if threads is not None:
            await asyncio.get_running_loop().run_in_executor(threads, self._close, pool)
            threads.shutdown(wait=True)

    def _close(self, pool: ConnectionPool[psycopg.Connection[Any]] | None) -> None:
        with self._jobs_lock:
            if self._jobs_conn is not None:
                self._jobs_conn.close()  # ends the session: its advisory locks go with it
                self._jobs_conn = None
            self._jobs.clear()
        if pool is not None:
            pool.close(timeout=5.0)

    async def schema_version(self) -> int:
        row = await self._one(self.Q["schema_version"], {})
        return int(row[0]) if row else 0

    # -- running things in the threads ----------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        threads = self._threads
        if threads is None:
            raise StorageError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(threads, fn, *args)

    async def _write(self, op: Callable[[Tx], T], *, blocking: bool = False) -> T:
        """Run `op` in one transaction on a pooled connection, in a worker thread."""
        started = time.perf_counter()
        value = await self._call(self._transaction, op)
        self._committed(time.perf_counter() - started, 1)
        self._dirty.set()  # tell the other daemons
        return value

    def _transaction(self, op: Callable[[Tx], T]) -> T:
        """Run `op` in one transaction (in the calling thread), again after a
        serialization failure, a deadlock or a duplicate key (the next run sees the row
        that collided), or when its connection turned out dead before the COMMIT (a
        pooled connection the server dropped: the transaction cannot have committed);
        StorageUnavailable when the server cannot be reached. A connection lost during
        the COMMIT is StorageUnavailable too: the write may or may not have happened."""
        pool = self._pool
        if pool is None:
            raise StorageError("the store is not open")
        for attempt in range(RETRIES):
            before_commit = False
            try:
                with pool.connection() as conn:
                    self._local.conn = conn
                    try:
                        before_commit = True
                        with conn.pipeline() as pipeline, conn.transaction():
                            value = op(Tx(conn, pipeline))
                            before_commit = False
                        return value
                    finally:
                        self._local.conn = None
            except _RETRY as exc:
                if attempt == RETRIES - 1:
                    raise storage_error(exc) from exc
                self.retries += 1
                time.sleep(0.001 * (attempt + 1))
            except psycopg.OperationalError as exc:
                if not (before_commit and conn.broken) or attempt == RETRIES - 1:
                    raise storage_error(exc) from exc
                self.retries += 1
            except psycopg.Error as exc:
                raise storage_error(exc) from exc
        raise AssertionError("unreachable")

    def _read(self, sql: str, params: Any, one: bool) -> Any:
        pool = self._pool
        if pool is None:
            raise StorageError("the store is not open")
        for attempt in range(2):
            try:
                with pool.connection() as conn:
                    cur = conn.execute(sql, params)
                    return cur.fetchone() if one else cur.fetchall()
            except psycopg.OperationalError as exc:
                if attempt or not conn.broken:  # a pooled connection the server dropped
                    raise storage_error(exc) from exc
            except psycopg.Error as exc:
                raise storage_error(exc) from exc
        raise AssertionError("unreachable")

    async def _one(self, sql: str, params: dict[str, Any]) -> RowProtocol | None:
        return await self._call(self._read, sql, params, True)  # type: ignore[no-any-return]

    async def _all(self, sql: str, params: dict[str, Any]) -> list[RowProtocol]:
        return await self._call(self._read, sql, params, False)  # type: ignore[no-any-return]

    async def read_slow(self, sql: str, params: dict[str, Any]) -> list[RowProtocol]:
        return await self._call(self._read, sql, params, False)  # type: ignore[no-any-return]

    def _new_id(self, now: int) -> int:
        """An id for a row a write inserts: max(now, the last id handed out + 1), shared by
        every daemon (the sequence behind stepd_new_id), taken on the write's own
        connection. Not blocks of ids per daemon: a step one daemon writes after a step
        another daemon wrote must get the larger id, or a workflow's steps (ordered by
        id) would be out of order, whichever daemon was less busy."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise StorageError("ids are handed out inside a write")
        return int(conn.execute(self.Q["new_id"], {"now": now}).fetchone()[0])

    # -- what PostgreSQL does its own way --------------------------------------------

    def _one_at_a_time(self, db: Tx, key: str) -> None:
        """A transaction advisory lock on the key: a second transaction waits here for
        the first to end, and its next statement (READ COMMITTED) sees what it wrote."""
        db.execute(self.Q["lock_key"], {"key": key}).fetchone()

    async def claim_steps(
        self, limit: int, *, lease_ms: int = 30_000, now: int | None = None
    ) -> list[Step]:
        """As BaseStore.claim_steps, in one statement with its events: the oldest due
        steps no other transaction holds (FOR UPDATE SKIP LOCKED), so daemons claiming at
        once take different steps and never wait for each other. With token shares the
        steps are chosen token by token (BaseStore._claimable) and those another daemon
        holds are skipped. (Its own body: BaseStore's writes an event per claimed step, a
        statement each; here the claim's RETURNING feeds one INSERT.)"""

        def op(db: Tx) -> list[Step]:
            at = now_ms() if now is None else now  # leases start when the claim runs
            params: dict[str, Any] = {"now": at, "lease_ms": lease_ms, "node": self.node}
            if self.max_running_per_token is None:
                rows = db.execute(self.Q["claim_due_logged"], {**params, "limit": limit})
            else:
                ids = orjson.dumps(self._claimable(db, limit, at)).decode()
                rows = db.execute(self.Q["claim_steps_logged"], {**params, "ids": ids})
            return [Step.from_row(r) for r in rows.fetchall()]

        return await self.write("claim_steps", op)

    async def events_after(
        self, after: int, *, workflow_id: int | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """As BaseStore.events_after (in commit order); see _held_back."""
        events = await super().events_after(after, workflow_id=workflow_id, limit=limit)
        if len(events) < limit:
            await self._held_back()
        return events

    async def _held_back(self) -> None:
        """Readers stop below the oldest transaction of this database still running, so
        events committed after it wait for it to end (an instant, usually). If some do,
        readers are woken again shortly (sooner than their poll), backing off while it
        lasts."""
        if await self._one(self.Q["events_held_back"], {}) is None:
            self._held_delay = 0.0
            return
        if self._held_timer is not None:
            return  # a wake-up is due already
        self._held_delay = min(max(self._held_delay * 2, 0.002), 1.0)
        self._held_timer = asyncio.get_running_loop().call_later(self._held_delay, self._held_wake)

    def _held_wake(self) -> None:
        self._held_timer = None
        self.changed("remote")

    async def events_of_types(
        self,
        after: int,
        types: Iterable[str],
        *,
        limit: int = 500,
        with_url_only: bool = False,
        span: int = 20_000,
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """As BaseStore.events_of_types, in commit order: ids are not, so the window is
        the next `span` events after event `after`, and `up_to` the last event read."""
        params = {"after": after, "limit": limit, "with_url_only": with_url_only,
                  "span": span, "types": orjson.dumps(sorted(types)).decode()}  # fmt: skip
        rows = await self._all(self.Q["events_of_types_after"], params)
        tail = rows[-1]  # where the window ends (no event)
        window_last, window_size = tail["window_last"], tail["window_size"]
        events = [
            {"id": r["id"], "workflow_id": r["workflow_id"], "step_id": r["step_id"],
             "type": r["type"], "at": r["at"], "data_json": r["data_json"],
             "data": orjson.loads(r["data_json"]) if r["data_json"] else None}
            for r in rows[:-1]
        ]  # fmt: skip
        if len(events) == limit:
            return events, events[-1]["id"], False
        if window_size < span:
            await self._held_back()
        if window_last is None:
            return events, after, True
        return events, int(window_last), window_size < span

    async def claim_deliveries(self, ids: list[int], *, visibility_ms: int) -> list[int]:
        """Of the due deliveries `ids`, those no other daemon holds, now held by this one
        for `visibility_ms` (then another may take them, if this one died sending)."""
        if not ids:
            return []
        params = {"ids": orjson.dumps(ids).decode(), "now": now_ms(),
                  "visibility_ms": visibility_ms}  # fmt: skip

        def op(db: Tx) -> list[int]:
            return [r["id"] for r in db.execute(self.Q["claim_deliveries"], params).fetchall()]

        return await self.write("claim_deliveries", op)

    async def secret(self, name: str) -> bytes | None:
        """A secret every daemon on this database shares, made at first use."""
        params = {"name": name, "value": os.urandom(32)}

        def op(db: Tx) -> bytes:
            db.execute(self.Q["make_secret"], params)
            return bytes(db.execute(self.Q["get_secret"], params).fetchone()[0])

        return await self._call(self._transaction, op)

    # -- wake-ups ------------------------------------------------------------------

    def _remote_change(self, kind: str = "remote") -> None:
        self.notify_heard += 1
        self.changed(kind)

    async def _send(self) -> None:
        """NOTIFY after commits, one at a time: commits made meanwhile share the next."""
        conn: psycopg.AsyncConnection[Any] | None = None
        backoff = 0.05
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self.url, autocommit=True, application_name="stepd notify"
                        )
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.node))
                    self.notify_sent += 1
                    backoff = 0.05
                except psycopg.Error as exc:
                    log.warning("PostgreSQL: NOTIFY failed (other daemons poll): %s", exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
                    self._dirty.set()  # to be told once connected again
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection; after a reconnect everything may have changed
        meanwhile, so it counts as a change (a full poll)."""
        backoff = 0.05
        first = True
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, application_name="stepd listen"
                )
                await conn.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                if not first:
                    log.info("PostgreSQL: listening again for other daemons' changes")
                    self._remote_change("reconnect")
                first = False
                backoff = 0.05
                async for note in conn.notifies():
                    if note.payload != self.node:
                        self._remote_change()
            except psycopg.Error as exc:
                log.warning("PostgreSQL: the LISTEN connection failed: %s", exc)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    # -- singleton jobs ------------------------------------------------------------

    async def lead(self, job: str) -> bool:
        """Whether this process runs the named singleton job: it holds the job's session
        advisory lock, on a connection of its own (taken if free; a daemon that dies
        drops it with its connection, and another daemon takes the job over)."""
        return await self._call(self._lead, job)

    def _lead(self, job: str) -> bool:
        key = zlib.crc32(job.encode()) - (1 << 31)  # an int4
        with self._jobs_lock:
            for attempt in range(2):
                try:
                    if self._jobs_conn is None or self._jobs_conn.closed:
                        self._jobs.clear()  # a lost connection lost its locks
                        self._jobs_conn = psycopg.Connection.connect(
                            self.url, autocommit=True, application_name="stepd jobs"
                        )
                    conn = self._jobs_conn
                    if job in self._jobs:
                        conn.execute("SELECT 1")  # still connected: still held
                        return True
                    (got,) = conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)", (JOB_SPACE, key)
                    ).fetchone()  # fmt: skip
                    if got:
                        self._jobs.add(job)
                    return bool(got)
                except psycopg.Error as exc:
                    if self._jobs_conn is not None:
                        self._jobs_conn.close()
                    self._jobs_conn = None
                    self._jobs.clear()
                    if attempt == 1 or not _unavailable(exc):
                        raise storage_error(exc) from exc
        return False


def _node() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply every migration newer than the schema_version table says, in one transaction
    under an advisory lock: daemons starting together migrate once. Returns the version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SPACE,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        (version,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        for number, script in migrations():
            if number > version:
                conn.execute(script)  # type: ignore[arg-type]  # no parameters: many statements
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
                version = number
        return int(version)
