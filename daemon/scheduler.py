"""The scheduler: fires due schedule ticks (spec §11).

It sleeps until the earliest next fire time of all schedules (one index seek, whatever
their number) or until a change to a schedule wakes it, then handles the schedules due by
then. Each due schedule is one transaction (daemon.storage.schedules.fire_due): its ticks,
their runs and its next fire time commit together, and only if the schedule is still due
at the time read, so of several daemons, or a daemon and itself after a restart, a tick
fires once. On PostgreSQL one daemon leads the job (a session advisory lock); another
takes it over if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from daemon import cron, metrics
from daemon.errors import StepdError
from daemon.models import NewRun, Schedule
from daemon.storage import StorageError

if TYPE_CHECKING:
    from daemon.engine import Engine

log = logging.getLogger("stepd.scheduler")
IDLE_S = 1.0  # longest sleep: another daemon's new schedule is seen within this
BATCH = 200  # due schedules read per query
IN_FLIGHT = 16  # due schedules handled at once (their writes share commits on SQLite)
ERROR_PAUSE_S = 1.0
MAX_CACHED_RUNS = 20_000


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self._wake = asyncio.Event()
        self._crons: dict[tuple[str, str], cron.Cron] = {}
        engine.scheds.wake = self.wake
        self.store.commit_hooks.append(self._committed)
        self._runs: dict[int, tuple[str, NewRun]] = {}  # schedule -> (input, its run)
        self.passes = 0  # passes that looked for due schedules (bench/schedules.py reads it)

    def wake(self) -> None:
        self._wake.set()

    def _committed(self, seconds: float, batch: int) -> None:
        """After each commit: a run of a schedule that ended wakes the scheduler, which
        starts the schedule's next buffered tick (another daemon's is seen within IDLE_S)."""
        if self.store.schedule_run_ended:
            self.store.schedule_run_ended = False
            self._wake.set()

    def _cron(self, expression: str, timezone: str) -> cron.Cron:
        key = (expression, timezone)
        found = self._crons.get(key)
        if found is None:
            if len(self._crons) > 10_000:
                self._crons.clear()
            found = self._crons[key] = cron.parse(expression, timezone)
        return found

    async def run(self) -> None:
        while True:
            try:
                delay = await self.pass_once()
            except (StorageError, OSError) as exc:
                log.warning("scheduler: %s; trying again in %.0f s", exc, ERROR_PAUSE_S)
                delay = ERROR_PAUSE_S
            except Exception:  # a bug: logged, and the scheduler goes on after a pause
                log.exception("scheduler pass failed; trying again in %.0f s", ERROR_PAUSE_S)
                delay = ERROR_PAUSE_S
            self._wake.clear()
            if delay > 0:
                # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # cancellation that stops the daemon when the event is set meanwhile.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def pass_once(self) -> float:
        """Handle the schedules due now; the seconds until the next one may be (at most
        IDLE_S)."""
        if not await self.store.lead("scheduler"):
            return IDLE_S
        self.passes += 1
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(s: Schedule) -> bool:
            async with gate:
                return await self.fire(s)

        while True:
            due = await self.store.due_schedules(_now(), BATCH)
            moved = await asyncio.gather(*(one(s) for s in due))
            if len(due) < BATCH or not any(moved):  # (none moved on: no busy loop)
                break
        for sid in await self.store.schedules_to_unbuffer(BATCH):
            await self.unbuffer(sid)
        upcoming = await self.store.next_schedule_at()
        if upcoming is None:
            return IDLE_S
        return min(IDLE_S, max(0.0, (upcoming - _now()) / 1000 + 0.001))

    async def fire(self, s: Schedule) -> bool:
        """Handle one due schedule (its ticks up to now). The run a tick starts is kept
        per schedule and input: while its definition gets no new version, a tick is one
        write and no read."""
        sid = s.id
        assert s.next_at is not None
        try:
            c = self._cron(s.cron, s.timezone)
            for attempt in range(3):
                run, problem = await self._run_of(s, fresh=attempt > 0)
                fired = await self.store.fire_due(sid, s.next_at, run, problem, c.next_ms)
                if fired.status != "stale":
                    break
            else:
                return False  # the definition kept changing: the next pass tries again
            done = _now()
            for tick in fired.ticks:
                lag = (done - tick.fire_at) / 1000 if tick.outcome == "fired" else None
                metrics.ticked(tick.outcome, lag)
                if tick.outcome == "missed":
                    log.warning(
                        "schedule %d missed its tick of %s (%s)",
                        sid,
                        cron.iso(cron.from_ms(tick.fire_at, c.tz)),
                        tick.reason,
                    )
            if fired.cancelled:
                self.engine.executor.cancel_steps(fired.cancelled)
            if fired.ticks:
                self.engine.executor.wake()
            return True
        except (StepdError, cron.CronError) as exc:
            log.error("schedule %d: %s", sid, exc)
        except Exception:  # a bug: this schedule waits for the next pass, the others go on
            log.exception("schedule %d: its due ticks failed", sid)
        return False

    async def unbuffer(self, sid: int) -> None:
        """Start the run of a schedule's oldest buffered tick (none of its runs is going)."""
        try:
            s = await self.store.schedule(sid)
            if s is None:
                return
            for attempt in range(3):
                run, problem = await self._run_of(s, fresh=attempt > 0)
                fired = await self.store.start_buffered(sid, run, problem)
                if fired.status != "stale":
                    break
            else:
                return
            for tick in fired.ticks:
                metrics.ticked(tick.outcome)
            if fired.ticks:
                self.engine.executor.wake()
        except (StepdError, cron.CronError) as exc:
            log.error("schedule %d: %s", sid, exc)
        except Exception:
            log.exception("schedule %d: its buffered tick failed", sid)

    async def _run_of(self, s: Schedule, *, fresh: bool) -> tuple[NewRun | None, str | None]:
        """The run a tick of `s` starts: kept per schedule and input, made again when
        `fresh` (the definition has a new version) or its input changed."""
        cached = self._runs.get(s.id)
        if not fresh and cached is not None and cached[0] == s.input_json:
            return cached[1], None
        run, problem = await self.engine.scheds.prepare(s)
        if run is not None:
            if len(self._runs) >= MAX_CACHED_RUNS:
                self._runs.clear()
            self._runs[s.id] = (s.input_json, run)
        return run, problem


def _now() -> int:
    return int(time.time() * 1000)


async def run(engine: Engine) -> None:
    await Scheduler(engine).run()
