"""Shared fixtures: a real database (a SQLite file in tmp_path, or a PostgreSQL database of
the test's own with STEPD_TEST_BACKEND=postgresql) and the real app over httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.api import create_app
from daemon.config import Config
from tests import backend
from tests.helpers import auth, make_config

# Tests about one backend itself (SQLite's group commit, PRAGMAs, file lock, backup; or
# PostgreSQL's several daemons on one database) say so with one of these markers.
ONLY = {"sqlite_only": "sqlite", "postgresql_only": "postgresql"}


# Modules that never open a store (flow validation, templates, configuration, tools
# alone, the unit file): their pass on SQLite covers them; the PostgreSQL pass skips them.
NO_STORAGE = frozenset({"test_flow", "test_templating", "test_config", "test_systemd_unit",
                        "test_sdnotify", "test_demo_tools", "test_tools"})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (
            backend.POSTGRES
            and item.module is not None
            and (item.module.__name__.rpartition(".")[2] in NO_STORAGE)
        ):
            item.add_marker(pytest.mark.skip(reason="opens no store: covered by the SQLite pass"))
        for marker, name in ONLY.items():
            if item.get_closest_marker(marker) and backend.BACKEND != name:
                item.add_marker(pytest.mark.skip(reason=f"{marker}: runs on {name} only"))


def pytest_report_header(config: pytest.Config) -> str:
    return f"storage backend: {backend.BACKEND} (STEPD_TEST_BACKEND)"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(backend.summary())


@pytest.fixture(scope="session", autouse=backend.POSTGRES)
def postgres_server() -> Iterator[Any]:
    """The session's PostgreSQL server (started before the first test, not inside it)."""
    from tests import postgres

    server = postgres.server()
    yield server
    backend.databases.close()
    server.stop()


@pytest.fixture(autouse=True)
def _test_databases() -> Iterator[None]:
    """Drops the PostgreSQL databases a test made (nothing to do on SQLite: tmp_path).
    Fixtures of a wider scope were set up before this one: theirs stay."""
    kept = backend.databases.names() if backend.POSTGRES else set()
    yield
    if backend.POSTGRES:
        backend.databases.drop_new(kept)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def app(config: Config) -> AsyncIterator[Any]:
    """The real app with its lifespan running (store open, executor polling)."""
    application = create_app(config)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://stepd", headers=auth("james")
    ) as c:
        yield c


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., Any]:
    """Build another app on the same tmp_path with config overrides (not started)."""

    def build(**overrides: Any) -> Any:
        return create_app(make_config(tmp_path, **overrides))

    return build


@pytest.fixture
async def make_client(tmp_path) -> AsyncIterator[Any]:
    """Start an app with config overrides; yields a factory returning (client, app)."""
    stack: list[Any] = []

    async def start(**overrides: Any) -> tuple[httpx.AsyncClient, Any]:
        overrides.setdefault("tool_modules", ("daemon.tools.demo", "tests.sample_tools"))
        app = create_app(make_config(tmp_path, **overrides))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stepd", headers=auth()
        )
        stack.append((client, lifespan))
        return client, app

    yield start
    for client, lifespan in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def make_store() -> AsyncIterator[Callable[..., Any]]:
    """`make_store(path, **kwargs)`: a store (not opened) for that database on the
    backend under test; any still open when the test ends are closed."""
    made: list[Any] = []

    def build(path: Path, **overrides: Any) -> Any:
        store = backend.open_store(path, **overrides)
        made.append(store)
        return store

    yield build
    for store in made:
        if store.is_open:
            await store.close()
