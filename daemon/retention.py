"""Retention: purge finished workflows (and schedule ticks) older than `[retention] days`,
in small batches."""

from __future__ import annotations

import asyncio
import logging

from daemon.config import Config
from daemon.storage import now_ms
from daemon.storage.base import BaseStore

log = logging.getLogger("stepd.retention")
DAY_MS = 86_400_000


async def purge(store: BaseStore, *, days: float, batch: int, now: int | None = None) -> int:
    """Delete finished workflows last changed more than `days` ago; returns how many.

    Each batch is its own short transaction, and the loop yields between batches so
    the executor's writes are never held up behind a long delete.
    """
    cutoff = (now_ms() if now is None else now) - int(days * DAY_MS)
    total = 0
    while purged := await store.purge_finished(cutoff=cutoff, limit=batch):
        total += purged
        await asyncio.sleep(0.01)
    while await store.purge_ticks(cutoff=cutoff, limit=batch * 10):  # schedules' history
        await asyncio.sleep(0.01)
    return total


async def run(store: BaseStore, config: Config) -> None:
    """Purge every `interval_s` until cancelled; a failing pass is logged and retried later."""
    while True:
        try:
            if not await store.lead("retention"):  # another daemon on this database purges
                await asyncio.sleep(config.retention_interval_s)
                continue
            purged = await purge(store, days=config.retention_days, batch=config.retention_batch)
            if purged:
                log.info("purged %d workflows finished over %g days ago", purged,
                         config.retention_days)  # fmt: skip
        except Exception:
            log.exception("retention pass failed")
        await asyncio.sleep(config.retention_interval_s)
