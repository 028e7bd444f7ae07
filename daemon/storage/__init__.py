"""The daemon's storage: one interface (base.BaseStore), a backend per kind of database.

`open_store(config)` picks the backend from the configuration: the SQLite file at
`[database] path` (one daemon), or the PostgreSQL database at `[database] url` (several
daemons may share it). A backend's driver is imported only when it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.storage.types import (
    NEVER,
    Cancelled,
    Created,
    DatabaseLocked,
    Gauges,
    LinkSpent,
    Replay,
    Replayed,
    Row,
    StorageError,
    StorageUnavailable,
    WorkflowTooLarge,
    now_ms,
)

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.storage.base import BaseStore

__all__ = [
    "NEVER", "Cancelled", "Created", "DatabaseLocked", "Gauges", "LinkSpent", "Replay",
    "Replayed", "Row", "StorageError", "StorageUnavailable", "WorkflowTooLarge", "now_ms",
    "open_store",
]  # fmt: skip


def open_store(config: Config) -> BaseStore:
    """The store for `config`'s database (not yet opened: `await store.open()`)."""
    if config.database_url:
        from daemon.storage.postgres.store import PostgresStore

        return PostgresStore(config.database_url, node=config.node,
                             max_running_per_token=config.running_share)  # fmt: skip
    from daemon.storage.sqlite.store import SqliteStore

    return SqliteStore(config.db_path, synchronous=config.synchronous,
                       busy_timeout_ms=config.busy_timeout_ms, node=config.node,
                       max_running_per_token=config.running_share)  # fmt: skip
