"""The storage backend the tests run on: STEPD_TEST_BACKEND=sqlite (default) or postgresql.

On SQLite a test's database is the file at its config's `db_path`, as always. On
PostgreSQL each `db_path` a test uses stands for a database of its own on the session's
throwaway server (tests/postgres.py): a copy of a template database migrated once per
process (CREATE DATABASE ... TEMPLATE, ~12 ms), dropped when the test ends. The same
path asked for twice in one test (a restart, a second app on the same tmp_path) is the
same database, as the same file would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BACKENDS = ("sqlite", "postgresql")
BACKEND = os.environ.get("STEPD_TEST_BACKEND", "sqlite").strip().lower() or "sqlite"
if BACKEND not in BACKENDS:
    raise RuntimeError(f"STEPD_TEST_BACKEND={BACKEND!r}: expected one of {', '.join(BACKENDS)}")
POSTGRES = BACKEND == "postgresql"
SQLITE = BACKEND == "sqlite"


class Databases:
    """Per-test PostgreSQL databases, cloned from a migrated template.

    A thread of its own drops each test's databases after it and keeps a few clones ready
    for the next tests, so a test waits for neither (a clone takes ~12 ms and a drop ~5 ms
    on an idle machine, several times that on a busy one, a second or more per 100 tests).
    """

    SPARE = 2  # clones kept ready

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._admin: Any = None  # an autocommit psycopg connection, for the tests' thread
        self._template = ""
        self._by_path: dict[Path, str] = {}  # this test's db_path -> database name
        self._names = itertools.count(1)
        # Names unique across processes sharing one server (xdist workers, STEPD_TEST_PG_URL).
        self._prefix = f"stepd_t{os.getpid()}"
        self._spare: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[str, list[str]] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self.used = 0  # databases handed to tests
        self.waited = 0  # of which a test waited for
        self.wait_s = 0.0  # how long tests waited for databases, in all
        self.create_s = 0.0  # time spent cloning (in the background too)
        self.created = 0
        self.drop_s = 0.0
        self.dropped = 0
        self.template_s = 0.0

    def url(self, db_path: Path) -> str:
        """The database that stands for `db_path` in this test (made on first use)."""
        from tests import postgres

        key = Path(db_path).absolute()
        with self._lock:
            name = self._by_path.get(key)
            if name is None:
                name = self._take()
                self._by_path[key] = name
            return postgres.server().url_for(name)

    def names(self) -> set[str]:
        """The databases handed out so far and not dropped."""
        with self._lock:
            return set(self._by_path.values())

    def drop_new(self, kept: set[str]) -> None:
        """Drop the databases handed out since `names()` returned `kept`, in the background
        (any daemon still connected to them is disconnected). Those of module or session
        fixtures, made before, stay until the end."""
        with self._lock:
            names = [n for n in self._by_path.values() if n not in kept]
            self._by_path = {p: n for p, n in self._by_path.items() if n in kept}
        if names:
            self._jobs.put(("drop", names))

    def close(self) -> None:
        """Drop what is left (once the background thread is done) and disconnect."""
        with self._lock:
            if self._worker is not None:
                self._jobs.put(None)
                self._worker.join(timeout=60)
                self._worker = None
            if self._admin is None:
                return
            leftover = list(self._by_path.values())
            while not self._spare.empty():
                leftover.append(self._spare.get())
            for name in [*leftover, self._template]:
                if name:
                    self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._admin.close()
            self._admin = None

    def _admin_conn(self) -> Any:
        if self._admin is None or self._admin.closed:
            self._admin = _connect_admin()
        return self._admin

    def _take(self) -> str:
        if not self._template:
            self._make_template()
            self._worker = threading.Thread(target=self._work, name="test-databases", daemon=True)
            self._worker.start()
        self.used += 1
        try:
            name = self._spare.get_nowait()
        except queue.Empty:
            began = time.perf_counter()
            name = self._clone(self._admin_conn())
            self.waited += 1
            self.wait_s += time.perf_counter() - began
        self._jobs.put(("spare", []))
        return name

    def _clone(self, admin: Any) -> str:
        name = f"{self._prefix}_{next(self._names)}"
        # FILE_COPY: a small database copies in half the time WAL_LOG takes (PostgreSQL 15+).
        strategy = " STRATEGY FILE_COPY" if admin.info.server_version >= 150000 else ""
        began = time.perf_counter()
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"{strategy}')
        self.create_s += time.perf_counter() - began
        self.created += 1
        return name

    def _work(self) -> None:
        """Drop used databases and keep SPARE clones ready, on a connection of its own."""
        admin = _connect_admin()
        try:
            while (job := self._jobs.get()) is not None:
                kind, names = job
                try:
                    if kind == "drop":
                        began = time.perf_counter()
                        for name in names:
                            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                        self.drop_s += time.perf_counter() - began
                        self.dropped += len(names)
                    elif self._spare.qsize() < self.SPARE:
                        self._spare.put(self._clone(admin))
                except Exception as exc:  # the tests' thread makes its own instead
                    print(f"tests/backend.py: {kind} failed: {exc}", file=sys.stderr)
                    if admin.closed:
                        admin = _connect_admin()
        finally:
            admin.close()

    def _make_template(self) -> None:
        from tests import postgres

        began = time.perf_counter()
        name = f"{self._prefix}_template"
        admin = self._admin_conn()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
        url = postgres.server().url_for(name)
        # The store migrates on open; open and close it once on its own event loop (this may
        # be called from inside a test's running loop).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _migrate(url)).result()
        self._template = name
        self.template_s = time.perf_counter() - began


def _connect_admin() -> Any:
    import psycopg

    from tests import postgres

    return psycopg.connect(postgres.server().url, autocommit=True)


async def _migrate(url: str) -> None:
    from daemon.storage.postgres.store import PostgresStore

    store = PostgresStore(url, node="test-template")
    await store.open()
    await store.close()


databases = Databases()


def database_url(db_path: Path) -> str:
    """The `database_url` a config with this `db_path` gets: "" (the file) on SQLite."""
    return databases.url(db_path) if POSTGRES else ""


def open_store(path: Path, **kwargs: Any) -> Any:
    """A store (not yet opened) for the database at `path` on the backend under test: what
    `SqliteStore(path, **kwargs)` makes in a test that is not about SQLite itself. Options
    only SQLite has (synchronous, busy_timeout_ms) are left out on PostgreSQL. Its node is
    the one a test's app has by default, so a step it leaves running counts as the app's own
    after a restart, as with one daemon per SQLite file."""
    from daemon.config import Config

    kwargs.setdefault("node", Config().node)
    if SQLITE:
        from daemon.storage.sqlite.store import SqliteStore

        return SqliteStore(path, **kwargs)
    from daemon.storage.postgres.store import PostgresStore

    for sqlite_only in ("synchronous", "busy_timeout_ms"):
        kwargs.pop(sqlite_only, None)
    return PostgresStore(databases.url(path), **kwargs)


def summary() -> str:
    if not POSTGRES:
        return "storage backend: sqlite"
    from tests import postgres

    srv = postgres._server
    if srv is None:
        return "storage backend: postgresql (no server started)"
    started = f"started in {srv.started_s:.2f}s" if srv.bin_dir else "from STEPD_TEST_PG_URL"
    d = databases
    return (
        f"storage backend: postgresql ({started}); template migrated in {d.template_s:.2f}s; "
        f"{d.used} test databases, {d.waited} waited for ({d.wait_s * 1000:.0f} ms in all); "
        f"in the background {d.create_s / max(d.created, 1) * 1000:.1f} ms per clone, "
        f"{d.drop_s / max(d.dropped, 1) * 1000:.1f} ms per drop"
    )


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def query(db_path: Path, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement on the test's database for `db_path` (committed), whichever the
    backend: for tests that look at or change stored rows behind the daemon's back. Named
    parameters are written `:name` on both. Returns the rows (none for a statement that
    returns none)."""
    return write(db_path, (sql, params or {}))[0]


def records(db_path: Path, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`query`, each row as a dict by column name."""
    return write(db_path, (sql, params or {}), dicts=True)[0]


def write(
    db_path: Path,
    *statements: tuple[str, dict[str, Any] | list[dict[str, Any]]],
    dicts: bool = False,
) -> list[list[Any]]:
    """Run statements `(sql, params)` in one transaction on the test's database for
    `db_path`, as another process would; each one's rows. A list of params runs the
    statement once for each (executemany), and returns no rows."""
    out: list[list[Any]] = []

    def rows(cur: Any) -> list[Any]:
        if cur.description is None:
            return []
        found = cur.fetchall()
        if not dicts:
            return [tuple(r) for r in found]
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in found]

    if SQLITE:
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
            for sql, params in statements:
                if isinstance(params, list):
                    db.executemany(sql, params)
                    out.append([])
                else:
                    out.append(rows(db.execute(sql, params)))
        return out
    import psycopg

    with psycopg.connect(databases.url(db_path)) as db, db.transaction():
        for sql, params in statements:
            text = _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))
            if isinstance(params, list):
                db.cursor().executemany(text, params)
                out.append([])
            else:
                out.append(rows(db.execute(text, params)))
    return out
