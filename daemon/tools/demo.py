"""Demo tools of the reference workflow API, backed by a SQLite file in the state dir.

get_greeting, get_counter, is_admin, knowledge_search and knowledge_add. The
database is `<state_dir>/stepd-demo.db`; its schema is created and seeded on
first use. The SQL lives in `demo.sql` as named blocks. These are sync tools
(the daemon runs them in worker threads), so every call opens its own connection.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from daemon import files
from daemon.tools import ToolContext, ToolError, tool

DB_NAME = "stepd-demo.db"
MAX_LIMIT = 50
MAX_TERMS = 32  # words of a search query beyond this are ignored

_BLOCK = re.compile(r"--\s+(\w+)\s+--")
_WORD = re.compile(r"\w+")


def _load_sql(text: str) -> dict[str, str]:
    """Split `-- name --` blocks into {name: sql}."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _BLOCK.fullmatch(line.strip()):
            current = blocks.setdefault(m[1], [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in blocks.items()}


SQL = _load_sql(resources.files(__package__).joinpath("demo.sql").read_text("utf-8"))

_ready: set[Path] = set()
_ready_lock = threading.Lock()


@contextmanager
def _connect(ctx: ToolContext) -> Iterator[sqlite3.Connection]:
    """A fresh autocommit connection to the demo database, schema and seed in place."""
    path = Path(ctx.state_dir) / DB_NAME
    if path not in _ready:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only like the daemon's own database; SQLite copies the mode to -wal/-shm.
        files.create_private(path)
        for suffix in ("-wal", "-shm"):
            files.tighten(f"{path}{suffix}")
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.row_factory = sqlite3.Row
        with _ready_lock:
            if path not in _ready:
                # WAL is a property of the file: set it once. Switching needs an exclusive
                # lock, and SQLite does not wait for that one, so asking on every connection
                # failed now and then with "database is locked" while other threads read.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(SQL["schema"])
                conn.executescript(SQL["seed"])
                _ready.add(path)
        yield conn


def _match_expression(query: str) -> str:
    """The user's words as an FTS5 OR of quoted terms: no operator can get through."""
    words = dict.fromkeys(w.lower() for w in _WORD.findall(query))  # dedupe, keep order
    return " OR ".join(f'"{w}"' for w in list(words)[:MAX_TERMS])


@tool
def get_greeting(name: str = "World", *, ctx: ToolContext) -> str:
    """Return "Hello, <name>!"."""
    return f"Hello, {name}!"


@tool
def get_counter(*, ctx: ToolContext) -> int:
    """Increment a persistent counter once per step and return its value."""
    params = {"key": ctx.idempotency_key}
    with _connect(ctx) as conn:
        conn.execute(SQL["bump_counter"], params)
        row = conn.execute(SQL["counter_for_key"], params).fetchone()
    return int(row["value"])


@tool
def is_admin(user: str | None = None, *, ctx: ToolContext) -> bool:
    """Whether `user` (default: the workflow's creator) is a demo admin."""
    name = user if user is not None else ctx.created_by
    if not name:
        return False
    with _connect(ctx) as conn:
        return conn.execute(SQL["is_admin"], {"name": str(name)}).fetchone() is not None


@tool
def knowledge_search(query: str, limit: int = 5, *, ctx: ToolContext) -> list[dict[str, Any]]:
    """Full-text search of the knowledge base: [{"id", "title", "snippet", "score"...}], best first.

    Any of the query's words may match (OR). `score` is relative: the bm25 rank of
    each hit divided by the best hit's, so the best hit scores 1.0 and the others
    fall in (0, 1], rounded to 2 decimals (never below 0.01).
    """
    if not isinstance(query, str) or not query.strip():
        raise ToolError("query must not be empty", retryable=False)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ToolError(f"limit must be an integer from 1 to {MAX_LIMIT}", retryable=False)
    match = _match_expression(query)
    if not match:
        return []  # punctuation only: nothing to look for
    with _connect(ctx) as conn:
        rows = conn.execute(SQL["search"], {"match": match, "limit": limit}).fetchall()
    if not rows:
        return []
    best = rows[0]["rank"]  # bm25 ranks are negative; the most negative is the best
    return [
        {
            "id": row["id"],
            "title": row["title"],
            "scope": row["scope"],
            "snippet": row["snippet"],
            "score": max(0.01, round(row["rank"] / best, 2)) if best < 0 else 1.0,
        }
        for row in rows
    ]


@tool
def knowledge_add(
    title: str, content: str = "", scope: str = "general", *, ctx: ToolContext
) -> dict[str, Any]:
    """Add an article to the knowledge base once per step; returns {"id", "title", "created"...}."""
    if not isinstance(title, str) or not title.strip():
        raise ToolError("title must not be empty", retryable=False)
    params = {
        "key": ctx.idempotency_key,
        "title": title.strip(),
        "content": "" if content is None else str(content),
        "scope": str(scope or "general"),
    }
    with _connect(ctx) as conn:
        created = conn.execute(SQL["add_article"], params).rowcount == 1
        row = conn.execute(SQL["article_for_key"], {"key": ctx.idempotency_key}).fetchone()
    return {"id": row["id"], "title": row["title"], "scope": row["scope"], "created": created}
