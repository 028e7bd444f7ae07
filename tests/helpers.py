"""Test helpers shared by the test modules: tokens, config, polling."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from daemon.auth import hash_token
from daemon.config import Config, TokenConfig
from tests import backend

TOKENS = {
    "james": ("tok-james", ("workflow",)),
    "approver": ("tok-approver", ("approve",)),
}
TERMINAL = {"completed", "failed", "cancelled"}


def auth(name: str = "james") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    tokens = tuple(
        TokenConfig(name, hash_token(tok), perms) for name, (tok, perms) in TOKENS.items()
    )
    base = Config(
        db_path=tmp_path / "stepd.db",
        state_dir=tmp_path,
        tokens=tokens,
        poll_interval=1.0,
        shutdown_grace=2.0,
    )
    config = replace(base, **overrides)
    if backend.POSTGRES and "database_url" not in overrides:
        # The backend under test: a database of this test's own for this db_path.
        config = replace(config, database_url=backend.database_url(config.db_path))
    return config


async def wait_for(
    client: httpx.AsyncClient,
    wf_id: int,
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll a workflow until `until(wf)` (default: a terminal status) or fail the test."""
    until = until or (lambda wf: wf["status"] in TERMINAL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        resp = await client.get(f"/api/workflow/{wf_id}")
        assert resp.status_code == 200, resp.text
        wf = resp.json()
        if until(wf):
            return wf
        if loop.time() > deadline:
            raise AssertionError(f"workflow {wf_id} did not get there in {timeout}s: {wf}")
        await asyncio.sleep(0.01)


def waiting_gate(wf: dict[str, Any]) -> dict[str, Any] | None:
    for step in wf["steps"]:
        if step["awaiting"] == "ready":
            return step
    return None


class Watch:
    """The longest the event loop went without running a 2 ms ticker, and this process's
    largest resident size, while the block runs."""

    def __init__(self) -> None:
        self.lag = 0.0
        self.rss = self.rss_before = _rss()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)  # ticking already: a stall right after this is measured too
        return self

    async def _tick(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0.002)
            self.lag = max(self.lag, time.perf_counter() - began)
            self.rss = max(self.rss, _rss())

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        await asyncio.sleep(0.005)  # a stall that ended just now is measured too
        self._task.cancel()


def _rss() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
