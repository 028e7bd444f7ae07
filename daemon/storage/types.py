"""What the storage interface returns and raises, the same for every backend.

Nothing here knows a database driver: callers catch these, never sqlite3's or psycopg's
errors, and read these results, never a driver's rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from daemon.models import Step

NEVER = 1 << 62  # a time (epoch ms) after every real one: "no cursor", "not due"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Row(Protocol):
    """A result row: by position (`row[0]`) and by column name (`row["id"]`)."""

    def __getitem__(self, key: int | str) -> Any: ...

    def keys(self) -> list[str]: ...


class StorageError(Exception):
    """The database could not do what was asked (the store is closed, a constraint...)."""


class StorageUnavailable(StorageError):
    """The database cannot take writes or answer now (disk full, locked past the busy
    timeout, the connection lost); nothing was changed. The API answers 503."""


class DatabaseLocked(Exception):
    """Another process owns the database file."""


@dataclass(frozen=True)
class Replay:
    """A decision's answer, remembered under (created_by, Idempotency-Key)."""

    created_by: str | None
    key: str
    request_hash: str
    status: int
    body_json: str

    def params(self) -> dict[str, Any]:
        return {"created_by": self.created_by, "key": self.key,
                "request_hash": self.request_hash, "status": self.status,
                "body_json": self.body_json}  # fmt: skip


class WorkflowTooLarge(Exception):
    """Storing a result would take a workflow past its [limits] max_workflow_bytes."""

    def __init__(self, stored: int, adding: int, limit: int) -> None:
        super().__init__(
            f"storing a result of {adding} bytes would bring the workflow to "
            f"{stored + adding} bytes; the limit is {limit} ([limits] max_workflow_bytes)"
        )


class LinkSpent(Exception):
    """A one-click link's nonce was used before."""


class Replayed(Exception):
    """A decision's Idempotency-Key was used before: `earlier` is what it was answered."""

    def __init__(self, earlier: Replay) -> None:
        super().__init__(f"Idempotency-Key {earlier.key!r} was used before")
        self.earlier = earlier


class Cancelled(Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    FINISHED = "finished"


@dataclass(frozen=True)
class Created:
    id: int
    replayed: bool  # an earlier request with the same Idempotency-Key made it
    conflict: bool = False  # same key, different request
    started: Step | None = None  # the first step, when it was handed to the executor
    first_step_id: int = 0  # 0 for a replay


@dataclass(frozen=True)
class Gauges:
    """What the database holds now, for /metrics."""

    runnable: int  # pending and due
    delayed: int  # pending, waiting out a retry's backoff
    running: int  # tool steps holding a lease
    gates_waiting: int
    decisions_waiting: int
    workflows: dict[str, int]  # by status
