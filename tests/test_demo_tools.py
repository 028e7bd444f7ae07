"""The demo tools against real SQLite files under tmp_path."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from daemon.tools import Registry, ToolContext, ToolError, demo


def make_ctx(
    state_dir: Path, *, step_id: int = 2, attempt: int = 1, created_by: str | None = "james"
) -> ToolContext:
    return ToolContext(
        workflow_id=1,
        step_id=step_id,
        state="s",
        attempt=attempt,
        created_by=created_by,
        state_dir=state_dir,
        logger=logging.getLogger("t"),
    )


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return make_ctx(tmp_path)


def test_registers_exactly_the_five_tools() -> None:
    reg = Registry()
    assert reg.add_module(demo) == 5
    assert reg.names() == [
        "get_counter",
        "get_greeting",
        "is_admin",
        "knowledge_add",
        "knowledge_search",
    ]
    assert all(reg.get(n).takes_ctx and reg.get(n).description for n in reg.names())


def test_sql_blocks_loaded() -> None:
    assert {"schema", "seed", "search", "add_article", "bump_counter"} <= set(demo.SQL)
    assert all(sql for sql in demo.SQL.values())


def test_greeting(ctx: ToolContext) -> None:
    assert demo.get_greeting(ctx=ctx) == "Hello, World!"
    assert demo.get_greeting("Ada", ctx=ctx) == "Hello, Ada!"


def test_counter_increments_per_step_and_is_stable_per_attempt(tmp_path: Path) -> None:
    assert demo.get_counter(ctx=make_ctx(tmp_path, step_id=10)) == 1
    assert demo.get_counter(ctx=make_ctx(tmp_path, step_id=11)) == 2
    # a repeated attempt of step 11 gets the same value and does not increment
    assert demo.get_counter(ctx=make_ctx(tmp_path, step_id=11, attempt=2)) == 2
    assert demo.get_counter(ctx=make_ctx(tmp_path, step_id=12)) == 3


def test_database_file_uses_wal(ctx: ToolContext) -> None:
    demo.get_counter(ctx=ctx)
    db = ctx.state_dir / demo.DB_NAME
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_is_admin(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, created_by="james")
    assert demo.is_admin(ctx=ctx) is True
    assert demo.is_admin("admin", ctx=ctx) is True
    assert demo.is_admin("mallory", ctx=ctx) is False
    assert demo.is_admin(ctx=make_ctx(tmp_path, created_by="mallory")) is False
    assert demo.is_admin(ctx=make_ctx(tmp_path, created_by=None)) is False


def test_search_ranks_access_control_first(ctx: ToolContext) -> None:
    hits = demo.knowledge_search("access control permissions", ctx=ctx)
    assert hits and hits[0]["title"] == "Access Control"
    assert set(hits[0]) == {"id", "title", "scope", "snippet", "score"}
    assert hits[0]["score"] == 1.0
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(s, float) and 0 < s <= 1 for s in scores)


def test_search_any_word_matches(ctx: ToolContext) -> None:
    titles = [h["title"] for h in demo.knowledge_search("approval retention", ctx=ctx)]
    assert set(titles) == {"Approval Gates", "Data Retention"}


@pytest.mark.parametrize(
    "query", ['"AND OR NEAR(', 'NOT "', "title:access*", "^ - + ( ) {}", "a\"b'c", "!!!"]
)
def test_search_hostile_input_does_not_error(ctx: ToolContext, query: str) -> None:
    assert isinstance(demo.knowledge_search(query, ctx=ctx), list)


def test_search_respects_limit(ctx: ToolContext) -> None:
    assert len(demo.knowledge_search("the and a token", limit=2, ctx=ctx)) == 2
    assert len(demo.knowledge_search("the and a token", limit=50, ctx=ctx)) > 2


@pytest.mark.parametrize("limit", [0, 51, -1, True, "5", 2.5])
def test_search_rejects_bad_limit(ctx: ToolContext, limit: object) -> None:
    with pytest.raises(ToolError) as err:
        demo.knowledge_search("access", limit=limit, ctx=ctx)  # type: ignore[arg-type]
    assert err.value.retryable is False


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_search_empty_query(ctx: ToolContext, query: str) -> None:
    with pytest.raises(ToolError, match="query must not be empty") as err:
        demo.knowledge_search(query, ctx=ctx)
    assert err.value.retryable is False


def test_add_then_search(ctx: ToolContext) -> None:
    out = demo.knowledge_add(
        "New Policy", "All agents must request approval before writing.", ctx=ctx
    )
    assert out["created"] is True and out["title"] == "New Policy" and out["scope"] == "general"
    hits = demo.knowledge_search("agents writing policy", ctx=ctx)
    assert hits[0]["id"] == out["id"] and hits[0]["title"] == "New Policy"


def test_add_is_idempotent_per_step(tmp_path: Path) -> None:
    first = demo.knowledge_add("Runbook", "Page the on-call.", "ops", ctx=make_ctx(tmp_path))
    again = demo.knowledge_add(
        "Runbook", "Page the on-call.", "ops", ctx=make_ctx(tmp_path, attempt=2)
    )
    assert first["created"] is True and again["created"] is False
    assert again == {**first, "created": False}
    assert len(demo.knowledge_search("runbook", ctx=make_ctx(tmp_path))) == 1
    other = demo.knowledge_add("Runbook", "Page the on-call.", ctx=make_ctx(tmp_path, step_id=3))
    assert other["created"] is True and other["id"] != first["id"]


def test_seeded_once(tmp_path: Path) -> None:
    demo.get_counter(ctx=make_ctx(tmp_path))
    demo._ready.discard(tmp_path / demo.DB_NAME)  # force the seed to run again
    demo.get_counter(ctx=make_ctx(tmp_path))
    with sqlite3.connect(tmp_path / demo.DB_NAME) as conn:
        (count,) = conn.execute("SELECT count(*) FROM knowledge").fetchone()
        titles = {r[0] for r in conn.execute("SELECT title FROM knowledge")}
    assert count == 8 and "Access Control" in titles


def test_counter_from_many_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def call(step: int) -> int:
        return demo.get_counter(ctx=make_ctx(tmp_path, step_id=step))

    with ThreadPoolExecutor(8) as pool:
        values = list(pool.map(call, [s % 16 for s in range(64)]))  # 4 attempts per step
    assert sorted(set(values)) == list(range(1, 17))
    assert all(values[i] == values[i % 16] for i in range(64))
