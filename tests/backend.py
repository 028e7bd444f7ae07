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
import re
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
    """Per-test PostgreSQL databases, cloned from a migrated template."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._admin: Any = None  # an autocommit psycopg connection to the server
        self._template = ""
        self._by_path: dict[Path, str] = {}  # this test's db_path -> database name
        self._names = itertools.count(1)
        # Names unique across processes sharing one server (xdist workers, STEPD_TEST_PG_URL).
        self._prefix = f"stepd_t{os.getpid()}"
        self.created = 0
        self.create_s = 0.0  # time spent cloning and dropping, for the session summary
        self.template_s = 0.0

    def url(self, db_path: Path) -> str:
        """The database that stands for `db_path` in this test (made on first use)."""
        from tests import postgres

        key = Path(db_path).absolute()
        with self._lock:
            name = self._by_path.get(key)
            if name is None:
                name = self._clone()
                self._by_path[key] = name
            return postgres.server().url_for(name)

    def drop_all(self) -> None:
        """Drop this test's databases (daemons still connected to them are disconnected)."""
        with self._lock:
            names, self._by_path = list(self._by_path.values()), {}
            if not names:
                return
            began = time.perf_counter()
            for name in names:
                self._admin_conn().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.create_s += time.perf_counter() - began

    def close(self) -> None:
        with self._lock:
            if self._admin is not None:
                if self._template:
                    self._admin.execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
                self._admin.close()
                self._admin = None

    def _admin_conn(self) -> Any:
        import psycopg

        from tests import postgres

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(postgres.server().url, autocommit=True)
        return self._admin

    def _clone(self) -> str:
        if not self._template:
            self._make_template()
        admin = self._admin_conn()
        name = f"{self._prefix}_{next(self._names)}"
        # FILE_COPY: a small database copies in half the time WAL_LOG takes (PostgreSQL 15+).
        strategy = " STRATEGY FILE_COPY" if admin.info.server_version >= 150000 else ""
        began = time.perf_counter()
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"{strategy}')
        self.create_s += time.perf_counter() - began
        self.created += 1
        return name

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
    only SQLite has (synchronous, busy_timeout_ms) are left out on PostgreSQL."""
    if SQLITE:
        from daemon.storage.sqlite.store import SqliteStore

        return SqliteStore(path, **kwargs)
    from daemon.storage.postgres.store import PostgresStore

    for sqlite_only in ("synchronous", "busy_timeout_ms"):
        kwargs.pop(sqlite_only, None)
    kwargs.setdefault("node", "test")
    return PostgresStore(databases.url(path), **kwargs)


def summary() -> str:
    if not POSTGRES:
        return "storage backend: sqlite"
    from tests import postgres

    srv = postgres._server
    if srv is None:
        return "storage backend: postgresql (no server started)"
    started = f"started in {srv.started_s:.2f}s" if srv.directory else "from STEPD_TEST_PG_URL"
    per = databases.create_s / databases.created * 1000 if databases.created else 0.0
    return (
        f"storage backend: postgresql ({started}); template migrated in "
        f"{databases.template_s:.2f}s; {databases.created} test databases, "
        f"{per:.1f} ms each to create and drop"
    )


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def query(db_path: Path, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement on the test's database for `db_path` (committed), whichever the
    backend: for tests that look at or change stored rows behind the daemon's back. Named
    parameters are written `:name` on both. Returns the rows (none for a statement that
    returns none)."""
    params = params or {}
    if SQLITE:
        import sqlite3

        with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
            return db.execute(sql, params).fetchall()
    import psycopg

    text = _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))
    with psycopg.connect(databases.url(db_path), autocommit=True) as db:
        cur = db.execute(text, params)
        return cur.fetchall() if cur.description else []
