"""Shared fixtures: a real SQLite file in tmp_path and the real app over httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.api import create_app
from daemon.config import Config
from tests.helpers import auth, make_config


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
