"""Schedules of definitions and their ticks: the transaction bodies behind them, shared by
every backend (a mixin of BaseStore).

A tick is one fire time of a schedule (kind `cron`), a run-now (`trigger`) or one fire time
of a backfill (`backfill`). It is stored once per (schedule, kind, fire time), in the same
transaction as the run it starts and the schedule's next fire time: a tick fires once,
whichever daemon handles it, and a crash at any instant leaves it either all done or not
begun (and then done after the restart, or recorded as missed past the catch-up window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.models import NewRun, Schedule, Tick
from daemon.storage.types import Row, now_ms

if TYPE_CHECKING:
    from daemon.storage.base import BaseStore, Tx

    _Base = BaseStore
else:
    _Base = object

OVERLAPS = ("skip", "buffer_one", "buffer_all", "cancel_other", "allow_all")
MAX_BUFFERED = 1000  # ticks one schedule may hold under buffer_all
MAX_RUNNING = 1000  # runs of one schedule going at once under allow_all
MAX_MISSED = 100  # missed ticks of one outage recorded one by one; later ones passed over
MAX_DUE = 100  # due ticks of one schedule handled in one transaction
# A tick handled this late still fires whatever the catch-up window (0 included): the
# scheduler's own latency, a busy machine, another daemon taking the job over.
MIN_CATCHUP_MS = 2000


@dataclass(frozen=True)
class Fired:
    """What a pass over one due schedule did: `status` is "ok", "raced" (another daemon or
    an edit moved the schedule first: nothing done) or "stale" (the definition has a newer
    version than the run prepared: prepare again)."""

    status: str
    ticks: list[Tick]
    cancelled: list[int] = dataclasses.field(default_factory=list)  # steps of cancelled runs


class ScheduleStore(_Base):
    # -- schedules ---------------------------------------------------------------------

    async def create_schedule(
        self,
        *,
        definition_id: int,
        cron: str,
        timezone: str,
        input_json: str,
        overlap: str,
        catchup_ms: int,
        paused: bool,
        next_at: int | None,
        created_by: str | None,
        max_per_definition: int,
    ) -> Schedule | None:
        """A new schedule; None when its definition has `max_per_definition` already (or
        was deleted meanwhile: the caller tells the two apart)."""
        now = now_ms()

        def op(db: Tx) -> Schedule | None:
            self._one_at_a_time(db, f"definition {definition_id}")
            if db.execute(self.Q["definition_by_id"], {"id": definition_id}).fetchone() is None:
                return None
            params = {"definition_id": definition_id}
            (count,) = db.execute(self.Q["count_schedules_of_definition"], params).fetchone()
            if int(count) >= max_per_definition:
                return None
            sid = self._new_id(now)
            db.execute(
                self.Q["insert_schedule"],
                {
                    "id": sid,
                    "definition_id": definition_id,
                    "cron": cron,
                    "timezone": timezone,
                    "input_json": input_json,
                    "overlap": overlap,
                    "catchup_ms": catchup_ms,
                    "paused": int(paused),
                    "next_at": None if paused else next_at,
                    "created_by": created_by,
                    "now": now,
                },
            )
            return self._schedule(db, sid)

        return await self.write("create_schedule", op)

    def _schedule(self, db: Tx, sid: int) -> Schedule | None:
        row = db.execute(self.Q["schedule_by_id"], {"id": sid}).fetchone()
        return Schedule.from_row(row) if row else None

    async def schedule(self, sid: int) -> Schedule | None:
        row = await self._one(self.Q["schedule_by_id"], {"id": sid})
        return Schedule.from_row(row) if row else None

    async def schedules(
        self, definition_id: int | None, *, limit: int, offset: int
    ) -> tuple[list[Schedule], int]:
        """A definition's schedules (every schedule for None), and how many there are."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if definition_id is None:
            rows = await self._all(self.Q["all_schedules"], params)
            (total,) = await self._one(self.Q["count_schedules"], {})  # type: ignore[misc]
        else:
            params["definition_id"] = definition_id
            rows = await self._all(self.Q["schedules_of_definition"], params)
            (total,) = await self._one(  # type: ignore[misc]
                self.Q["count_schedules_of_definition"], {"definition_id": definition_id}
            )
        return [Schedule.from_row(r) for r in rows], int(total)

    async def update_schedule(
        self, sid: int, change: Callable[[Schedule, int], dict[str, Any]]
    ) -> Schedule | None:
        """Apply `change(schedule, now)` -> the update_schedule fields (all of them) under
        the schedule's lock; None when it does not exist. `change` may raise to refuse."""
        now = now_ms()

        def op(db: Tx) -> Schedule | None:
            self._one_at_a_time(db, f"schedule {sid}")
            current = self._schedule(db, sid)
            if current is None:
                return None
            fields = change(current, now)
            db.execute(self.Q["update_schedule"], {**fields, "id": sid, "now": now})
            return self._schedule(db, sid)

        return await self.write("update_schedule", op)

    async def delete_schedule(self, sid: int) -> bool:
        def op(db: Tx) -> bool:
            self._one_at_a_time(db, f"schedule {sid}")
            return bool(db.execute(self.Q["delete_schedule"], {"id": sid}).rowcount)

        return await self.write("delete_schedule", op)

    async def next_schedule_at(self) -> int | None:
        row = await self._one(self.Q["next_schedule_at"], {})
        return None if row is None or row[0] is None else int(row[0])

    async def due_schedules(self, now: int, limit: int) -> list[Schedule]:
        """Schedules due at `now`, the most overdue first (without definition_name)."""
        rows = await self._all(self.Q["due_schedules"], {"now": now, "limit": limit})
        return [Schedule.from_row(r) for r in rows]

    async def ticks(
        self, sid: int, *, outcome: str | None, limit: int, offset: int
    ) -> tuple[list[Tick], int]:
        params = {"schedule_id": sid, "outcome": outcome}
        rows = await self._all(
            self.Q["schedule_ticks"], {**params, "limit": limit, "offset": offset}
        )
        (total,) = await self._one(self.Q["count_schedule_ticks"], params)  # type: ignore[misc]
        return [Tick.from_row(r) for r in rows], int(total)

    async def ticks_to_notify(self, limit: int) -> list[Row]:
        """Skipped and missed ticks not posted yet (a flag, not a cursor: a buffered tick
        skipped later, or one committed after a larger id on PostgreSQL, is not passed)."""
        return await self._all(self.Q["ticks_to_notify"], {"limit": limit})

    async def enqueue_tick_deliveries(
        self, tick_ids: list[int], rows: list[dict[str, Any]]
    ) -> None:
        """Queue webhook deliveries of ticks and mark the ticks posted, atomically."""
        now = now_ms()

        def op(db: Tx) -> None:
            if rows:
                db.executemany(self.Q["enqueue_delivery"], [{**r, "now": now} for r in rows])
            db.executemany(self.Q["tick_notified"], [{"id": i} for i in tick_ids])

        await self.write("enqueue_tick_deliveries", op)

    async def purge_ticks(self, *, cutoff: int, limit: int) -> int:
        """Delete up to `limit` ticks recorded before `cutoff` (buffered ones stay: their
        runs are still to start); how many."""

        def op(db: Tx) -> int:
            params = {"cutoff": cutoff, "limit": limit}
            return db.execute(self.Q["purge_ticks"], params).rowcount

        return await self.write("purge_ticks", op, blocking=True)

    # -- ticks -------------------------------------------------------------------------

    async def fire_due(
        self,
        sid: int,
        expected_next: int,
        run: NewRun | None,
        problem: str | None,
        next_ms: Callable[[int], int | None],
        now: int | None = None,
    ) -> Fired:
        """Handle a due schedule's ticks up to `now`: each within the catch-up window fires
        `run` (or is skipped for `problem`, or by the overlap policy), each older one is
        missed; the schedule moves to its next fire time (`next_ms(after)`), all in one
        transaction, and only if the schedule is still due at `expected_next`."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> Fired:
            self._one_at_a_time(db, f"schedule {sid}")
            row = db.execute(self.Q["schedule_row"], {"id": sid}).fetchone()
            if row is None or row["next_at"] != expected_next or row["paused"]:
                return Fired("raced", [])
            if run is not None and run.definition_version != row["definition_version"]:
                return Fired("stale", [])
            ticks: list[Tick] = []
            cancelled: list[int] = []
            fire_at: int | None = expected_next
            missed = 0
            handled = 0
            late = now - max(int(row["catchup_ms"]), MIN_CATCHUP_MS)
            while fire_at is not None and fire_at <= now:
                if fire_at < late:
                    if missed == MAX_MISSED:  # the rest of the outage is passed over
                        fire_at = next_ms(late - 1)
                        continue
                    missed += 1
                    reason = (
                        f"missed while no daemon ran (catchup_window "
                        f"{int(row['catchup_ms']) // 1000} s)"
                    )
                    later = next_ms(fire_at)
                    if missed == MAX_MISSED and later is not None and later < late:
                        reason += "; the later ones of this outage are passed over unrecorded"
                    tick = self._record(db, sid, "cron", fire_at, "missed", None, reason, now)
                else:
                    if handled == MAX_DUE:  # the next pass goes on from here
                        break
                    handled += 1
                    tick = self._tick(db, row, "cron", fire_at, run, problem, None, now, cancelled)
                if tick is not None:
                    ticks.append(tick)
                fire_at = next_ms(fire_at)
            db.execute(
                self.Q["advance_schedule"], {"id": sid, "next_at": fire_at, "last_fired_at": None}
            )
            return Fired("ok", ticks, cancelled)

        return await self.write("fire_schedule", op, blocking=True)

    async def fire_now(
        self,
        sid: int,
        kind: str,
        fire_ats: list[int],
        run: NewRun | None,
        problem: str | None,
        overlap: str | None,
        now: int | None = None,
    ) -> Fired:
        """Ticks of a run-now (`trigger`, at `now`) or a backfill (each of `fire_ats`),
        under `overlap` (default: the schedule's). A backfill's fire time that has a tick
        of its kind already is skipped ("already backfilled")."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> Fired:
            self._one_at_a_time(db, f"schedule {sid}")
            row = db.execute(self.Q["schedule_row"], {"id": sid}).fetchone()
            if row is None:
                return Fired("raced", [])
            if run is not None and run.definition_version != row["definition_version"]:
                return Fired("stale", [])
            ticks: list[Tick] = []
            cancelled: list[int] = []
            times = fire_ats
            if kind == "trigger":  # two in one millisecond: the next millisecond
                times = [now]
                while db.execute(
                    self.Q["tick_exists"], {"schedule_id": sid, "kind": kind, "fire_at": times[0]}
                ).fetchone():
                    times = [times[0] + 1]
            for fire_at in times:
                tick = self._tick(db, row, kind, fire_at, run, problem, overlap, now, cancelled)
                if tick is None:  # not stored again: the answer says so (id 0)
                    tick = Tick(
                        id=0,
                        schedule_id=sid,
                        kind=kind,
                        fire_at=fire_at,
                        outcome="skipped",
                        recorded_at=now,
                        reason="already backfilled",
                    )
                ticks.append(tick)
            return Fired("ok", ticks, cancelled)

        return await self.write(f"{kind}_schedule", op, blocking=True)

    def _tick(
        self,
        db: Tx,
        row: Row,
        kind: str,
        fire_at: int,
        run: NewRun | None,
        problem: str | None,
        overlap: str | None,
        now: int,
        cancelled: list[int],
    ) -> Tick | None:
        """One tick that is due: fired, buffered or skipped. None when the schedule has a
        tick of this kind and fire time already. Steps of runs it cancels (cancel_other)
        are added to `cancelled`."""
        sid = int(row["id"])
        if kind != "trigger":  # the idempotency key of a run is (schedule, fire time)
            other = "backfill" if kind == "cron" else "cron"
            params = {"schedule_id": sid, "kind": other, "fire_at": fire_at}
            if db.execute(self.Q["fire_time_taken"], params).fetchone() is not None:
                if db.execute(self.Q["tick_exists"], {**params, "kind": kind}).fetchone():
                    return None
                return self._record(db, sid, kind, fire_at, "skipped", None,
                                    f"already fired (by a {other} tick)", now)  # fmt: skip
        status = row["definition_status"]
        if status in ("paused", "archived"):
            return self._record(
                db, sid, kind, fire_at, "skipped", None, f"definition is {status}", now
            )
        if run is None:
            return self._record(db, sid, kind, fire_at, "skipped", None, problem, now)
        policy = overlap or row["overlap"]
        running = [r[0] for r in db.execute(self.Q["schedule_running"], {"schedule_id": sid})]
        (buffered,) = db.execute(self.Q["count_buffered"], {"schedule_id": sid}).fetchone()
        buffered = int(buffered)
        busy = bool(running) or buffered > 0
        this = dataclasses.replace(run, schedule_id=sid, fire_at=fire_at)
        if policy == "allow_all" and len(running) >= MAX_RUNNING:
            return self._record(db, sid, kind, fire_at, "skipped", None,
                                f"{MAX_RUNNING} runs of this schedule are still going "
                                "(overlap allow_all starts no more)", now)  # fmt: skip
        if busy and policy != "allow_all":
            what = (
                f"run {running[0]} of this schedule is still running"
                if running
                else f"{buffered} earlier tick(s) of this schedule wait"
            )
            if policy == "skip":
                return self._record(
                    db, sid, kind, fire_at, "skipped", None, f"{what} (overlap skip)", now
                )
            if policy in ("buffer_one", "buffer_all"):
                cap = 1 if policy == "buffer_one" else MAX_BUFFERED
                if buffered >= cap:
                    return self._record(
                        db,
                        sid,
                        kind,
                        fire_at,
                        "skipped",
                        None,
                        f"the buffer is full (overlap {policy})",
                        now,
                    )
                return self._record(
                    db,
                    sid,
                    kind,
                    fire_at,
                    "buffered",
                    None,
                    f"{what} (overlap {policy})",
                    now,
                )
            # cancel_other: the runs still going are cancelled, buffered ticks dropped
            for (tick_id,) in db.execute(self.Q["buffered_ticks"], {"schedule_id": sid}).fetchall():
                self._settle(db, tick_id, "skipped", None, "replaced (overlap cancel_other)", now)
            for run_id in running:
                cancelled += (
                    self._cancel_tree(db, run_id, "schedule (overlap cancel_other)", now) or []
                )
        tick = self._record(db, sid, kind, fire_at, "fired", None, None, now)
        if tick is None:
            return None
        created = self._new_run(db, this, int(row["concurrency"]), now)
        self._fired(db, tick.id, sid, created.id, kind, fire_at, now)
        return dataclasses.replace(tick, run_id=created.id)

    def _fired(
        self, db: Tx, tick_id: int, sid: int, run_id: int, kind: str, fire_at: int, now: int
    ) -> None:
        db.execute(self.Q["set_tick_run"], {"id": tick_id, "run_id": run_id})
        db.execute(self.Q["mark_fired"], {"id": sid, "fire_at": fire_at})
        self._event(
            db,
            run_id,
            None,
            "schedule_fired",
            now,
            {"schedule_id": sid, "fire_at": fire_at, "kind": kind, "tick_id": tick_id},
        )

    def _record(
        self,
        db: Tx,
        sid: int,
        kind: str,
        fire_at: int,
        outcome: str,
        run_id: int | None,
        reason: str | None,
        now: int,
    ) -> Tick | None:
        """Store a tick; None when one of this schedule, kind and fire time exists."""
        params = {
            "schedule_id": sid,
            "kind": kind,
            "fire_at": fire_at,
            "outcome": outcome,
            "run_id": run_id,
            "reason": reason,
            "now": now,
        }
        got = db.execute(self.Q["insert_tick"], params).fetchone()
        if got is None:
            return None
        return Tick(
            id=int(got[0]),
            schedule_id=sid,
            kind=kind,
            fire_at=fire_at,
            outcome=outcome,
            recorded_at=now,
            run_id=run_id,
            reason=reason,
        )

    async def schedules_to_unbuffer(self, limit: int) -> list[int]:
        """Schedules with buffered ticks and no run going: their next run may start."""
        rows = await self._all(self.Q["schedules_to_unbuffer"], {"limit": limit})
        return [int(r[0]) for r in rows]

    async def start_buffered(
        self, sid: int, run: NewRun | None, problem: str | None, now: int | None = None
    ) -> Fired:
        """Start the run of a schedule's oldest buffered tick, when none of its runs is
        going ("raced" when one is, or there is no buffered tick: nothing done). A tick
        whose definition is paused or archived by now, or whose run cannot be made
        (`problem`), is skipped and the next one tried."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> Fired:
            self._one_at_a_time(db, f"schedule {sid}")
            row = db.execute(self.Q["schedule_row"], {"id": sid}).fetchone()
            if (
                row is None
                or db.execute(self.Q["schedule_running"], {"schedule_id": sid}).fetchone()
            ):
                return Fired("raced", [])
            if run is not None and run.definition_version != row["definition_version"]:
                return Fired("stale", [])
            ticks: list[Tick] = []
            while True:
                found = db.execute(self.Q["oldest_buffered"], {"schedule_id": sid}).fetchone()
                if found is None:
                    return Fired("ok" if ticks else "raced", ticks)
                tick_id, fire_at = int(found["id"]), int(found["fire_at"])
                status = row["definition_status"]
                reason = f"definition is {status}" if status in ("paused", "archived") else problem
                if run is None or reason is not None:
                    self._settle(db, tick_id, "skipped", None, reason or "no run", now)
                    ticks.append(self._tick_of(found, sid, "skipped", None, reason, now))
                    continue
                this = dataclasses.replace(run, schedule_id=sid, fire_at=fire_at)
                created = self._new_run(db, this, int(row["concurrency"]), now)
                self._settle(db, tick_id, "fired", created.id, None, now)
                self._fired(db, tick_id, sid, created.id, found["kind"], fire_at, now)
                ticks.append(self._tick_of(found, sid, "fired", created.id, None, now))
                return Fired("ok", ticks)

        return await self.write("start_buffered", op, blocking=True)

    def _settle(
        self, db: Tx, tick_id: int, outcome: str, run_id: int | None, reason: str | None, now: int
    ) -> None:
        params = {"id": tick_id, "outcome": outcome, "run_id": run_id, "reason": reason, "now": now}
        db.execute(self.Q["settle_tick"], params)

    @staticmethod
    def _tick_of(
        found: Row, sid: int, outcome: str, run_id: int | None, reason: str | None, now: int
    ) -> Tick:
        return Tick(
            id=int(found["id"]),
            schedule_id=sid,
            kind=found["kind"],
            fire_at=int(found["fire_at"]),
            outcome=outcome,
            recorded_at=now,
            run_id=run_id,
            reason=reason,
        )
