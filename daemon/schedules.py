"""Schedules of saved definitions (spec §11): the operations behind the schedule routes,
the `recurring` routes, the CLI's `schedule` commands and the page.

A schedule fires its definition's latest version with its `input_data` at each fire time
of a cron expression in an IANA time zone (daemon.cron). Ticks are stored with their
outcome; the scheduler (daemon.scheduler) handles the due ones.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from daemon import cron
from daemon.definitions import _cut, input_problems, iso, parse_ref
from daemon.errors import BadRequest, Conflict, NotFound, StepdError, Unprocessable
from daemon.models import Definition, NewRun, Schedule, Tick
from daemon.storage.schedules import OVERLAPS

if TYPE_CHECKING:
    from daemon.engine import Engine

FIELDS = ("cron_expression", "timezone", "input_data", "overlap", "catchup_window", "paused")
DEFAULT_CATCHUP_S = 60
MAX_CATCHUP_S = 366 * 24 * 3600
MAX_PER_DEFINITION = 100
MAX_BACKFILL = 1000  # fire times in one backfill
# What a backfill that starts a run per fire time at once (overlap allow_all or
# cancel_other) may write in its one transaction: each run is a copy of the flow and the
# input, written on the event loop (1,000 fire times of a 500 KB input wrote 1 GB and held
# the daemon for 7 minutes; of a 15 KB one, 15 MB and 9 s).
MAX_BACKFILL_BYTES = 4 * 1024 * 1024
RECENT_TICKS = 20  # shown with a schedule
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # the times a backfill window may name
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def now_ms() -> int:
    return int(time.time() * 1000)


def schedule_not_found(sid: Any) -> NotFound:
    return NotFound(f"schedule {_cut(str(sid), 40)} not found")


def parse_sid(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise schedule_not_found(raw)
    return int(raw)


def check_fields(body: Any, *, partial: bool) -> tuple[dict[str, Any], list[str]]:
    """The schedule fields of a create (partial=False: cron_expression required, defaults
    filled) or an edit body, and every problem with them."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    problems = [
        f"unknown field '{_cut(str(k), 60)}' (allowed: {', '.join(FIELDS)})"
        for k in sorted(set(body) - set(FIELDS))
    ]
    out: dict[str, Any] = {}
    if not partial:
        out = {
            "timezone": "UTC",
            "input_data": {},
            "overlap": "skip",
            "catchup_window": DEFAULT_CATCHUP_S,
            "paused": False,
        }
        if "cron_expression" not in body:
            problems.append("missing field 'cron_expression'")
    for key in FIELDS:
        if key not in body:
            continue
        value = body[key]
        if key in ("cron_expression", "timezone") and not isinstance(value, str):
            problems.append(f"field '{key}' must be a string")
        elif key == "input_data" and not isinstance(value, dict):
            problems.append("field 'input_data' must be a JSON object")
        elif key == "overlap" and value not in OVERLAPS:
            problems.append(f"field 'overlap' must be one of {', '.join(OVERLAPS)}")
        elif key == "catchup_window" and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CATCHUP_S
        ):
            problems.append(f"field 'catchup_window' must be whole seconds, 0 to {MAX_CATCHUP_S}")
        elif key == "paused" and not isinstance(value, bool):
            problems.append("field 'paused' must be true or false")
        else:
            out[key] = value
    if "cron_expression" in out or "timezone" in out:
        try:
            parsed = cron.parse(out.get("cron_expression", "* * * * *"), out.get("timezone", "UTC"))
            if not partial:  # an edit is checked with the schedule's own fields (update)
                cron.check_cost(parsed)
        except cron.CronError as exc:
            problems.append(str(exc))
    return out, problems


class Schedules:
    """Schedule operations on top of the store (`engine.scheds`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.wake = lambda: None  # the scheduler replaces it: a change may move its next tick

    # -- rendering -----------------------------------------------------------------------

    def render(self, s: Schedule, ticks: list[Tick] | None = None) -> dict[str, Any]:
        c = cron.parse(s.cron, s.timezone)
        now = datetime.now(UTC)
        upcoming = c.upcoming(now, 5)
        out: dict[str, Any] = {
            "schedule_id": s.id,
            "workflow_id": s.definition_id,
            "workflow_name": s.definition_name,
            "cron_expression": s.cron,
            "timezone": s.timezone,
            "description": c.describe(),
            "input_data": orjson.Fragment(s.input_json),
            "overlap": s.overlap,
            "catchup_window": s.catchup_ms // 1000,
            "paused": bool(s.paused),
            "next_run": None if s.next_at is None else cron.iso(cron.from_ms(s.next_at, c.tz)),
            "next_runs": [cron.iso(t) for t in upcoming],
            "last_fired_at": None
            if s.last_fired_at is None
            else cron.iso(cron.from_ms(s.last_fired_at, c.tz)),
            "buffered": s.buffered,
            "created_by": s.created_by,
            "created_at": iso(s.created_at),
            "updated_at": iso(s.updated_at),
        }
        if ticks is not None:
            out["ticks"] = [self.render_tick(t, c.tz) for t in ticks]
        return out

    @staticmethod
    def render_tick(t: Tick, tz: Any) -> dict[str, Any]:
        return {
            "id": t.id,
            "fire_time": cron.iso(cron.from_ms(t.fire_at, tz)),
            "kind": t.kind,
            "outcome": t.outcome,
            "run_id": t.run_id,
            "reason": t.reason,
            "recorded_at": iso(t.recorded_at),
        }

    # -- reads ---------------------------------------------------------------------------

    async def _get(self, sid: int) -> Schedule:
        found = await self.store.schedule(sid)
        if found is None:
            raise schedule_not_found(sid)
        return found

    async def get(self, sid: int) -> dict[str, Any]:
        s = await self._get(sid)
        ticks, _ = await self.store.ticks(sid, outcome=None, limit=RECENT_TICKS, offset=0)
        return self.render(s, ticks)

    async def list(self, ref: str | None, *, limit: int = 200, offset: int = 0) -> dict[str, Any]:
        def_id = None
        if ref is not None:
            def_id = (await self.engine.defs.resolve(ref)).id
        items, total = await self.store.schedules(def_id, limit=limit, offset=offset)
        # Off the loop: the next five fire times of 200 schedules take about 0.2 s.
        rendered = await asyncio.to_thread(lambda: [self.render(s) for s in items])
        return {"schedules": rendered, "total": total}

    async def ticks(
        self, sid: int, *, outcome: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        s = await self._get(sid)
        if outcome is not None and outcome not in ("fired", "skipped", "missed", "buffered"):
            raise BadRequest("query parameter 'outcome' must be fired, skipped, missed or buffered")
        items, total = await self.store.ticks(sid, outcome=outcome, limit=limit, offset=offset)
        tz = cron.zone(s.timezone)
        return {"ticks": [self.render_tick(t, tz) for t in items], "total": total}

    # -- writes --------------------------------------------------------------------------

    async def _input_problems(self, d: Definition, input_data: Any) -> list[str]:
        row = await self.store.version(d.id, d.version)
        if row is None:
            return []
        schema = orjson.loads(row.body_json).get("input_schema")
        return [f"input_data: {p}" for p in input_problems(schema, input_data)]

    async def create(self, ref: str | int, body: Any, *, by: str | None) -> dict[str, Any]:
        d = await self.engine.defs.resolve(ref)
        fields, problems = check_fields(body, partial=False)
        if not problems:
            problems += await self._input_problems(d, fields["input_data"])
        if problems:
            raise Unprocessable("; ".join(problems), errors=problems)
        return await self._insert(d, fields, by=by)

    async def _insert(
        self, d: Definition, fields: dict[str, Any], *, by: str | None
    ) -> dict[str, Any]:
        c = cron.parse(fields["cron_expression"], fields["timezone"])
        s = await self.store.create_schedule(
            definition_id=d.id,
            cron=c.expression,
            timezone=c.timezone,
            input_json=orjson.dumps(fields["input_data"]).decode(),
            overlap=fields["overlap"],
            catchup_ms=fields["catchup_window"] * 1000,
            paused=fields["paused"],
            next_at=c.next_ms(now_ms()),
            created_by=by,
            max_per_definition=MAX_PER_DEFINITION,
        )
        if s is None:
            if await self.store.definition(d.id) is None:
                raise NotFound(
                    f"workflow definition '{_cut(d.name)}' not found",
                    error_code="WORKFLOW_NOT_FOUND",
                )
            raise Conflict(
                f"workflow definition '{_cut(d.name)}' has {MAX_PER_DEFINITION} schedules "
                "already; delete one first"
            )
        self.wake()
        return {"schedule_id": s.id, "schedule": self.render(s)}

    async def create_recurring(self, body: Any, *, by: str | None) -> dict[str, Any]:
        """POST /api/workflows/recurring: the create body plus `workflow` (id or name)."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        ref = body.get("workflow", body.get("workflow_id"))
        if isinstance(ref, bool) or not isinstance(ref, str | int):
            raise Unprocessable("field 'workflow' must name a workflow definition (id or name)")
        rest = {k: v for k, v in body.items() if k not in ("workflow", "workflow_id")}
        return await self.create(str(ref), rest, by=by)

    async def update(self, sid: int, body: Any) -> dict[str, Any]:
        fields, problems = check_fields(body, partial=True)
        s = await self._get(sid)
        if not problems and ("cron_expression" in fields or "timezone" in fields):
            try:
                expr = fields.get("cron_expression", s.cron)
                cron.check_cost(cron.parse(expr, fields.get("timezone", s.timezone)))
            except cron.CronError as exc:
                problems.append(str(exc))
        if not problems and "input_data" in fields:
            d = await self.store.definition(s.definition_id)
            if d is not None:
                problems += await self._input_problems(d, fields["input_data"])
        if problems:
            raise Unprocessable("; ".join(problems), errors=problems)

        def change(current: Schedule, now: int) -> dict[str, Any]:
            expr = fields.get("cron_expression", current.cron)
            zone = fields.get("timezone", current.timezone)
            c = cron.parse(expr, zone)
            paused = fields.get("paused", bool(current.paused))
            moved = (expr, zone) != (current.cron, current.timezone)
            if paused:
                next_at = None
            elif current.paused or moved or current.next_at is None:
                # resumed or rescheduled: from now on (the paused time never fires)
                next_at = c.next_ms(now)
            else:
                next_at = current.next_at
            return {
                "cron": c.expression,
                "timezone": c.timezone,
                "input_json": orjson.dumps(fields["input_data"]).decode()
                if "input_data" in fields
                else current.input_json,
                "overlap": fields.get("overlap", current.overlap),
                "catchup_ms": fields["catchup_window"] * 1000
                if "catchup_window" in fields
                else current.catchup_ms,
                "paused": int(paused),
                "next_at": next_at,
            }

        updated = await self.store.update_schedule(sid, change)
        if updated is None:
            raise schedule_not_found(sid)
        self.wake()
        return self.render(updated)

    async def delete(self, sid: int) -> None:
        if not await self.store.delete_schedule(sid):
            raise schedule_not_found(sid)
        self.wake()

    # -- firing --------------------------------------------------------------------------

    async def prepare(self, s: Schedule) -> tuple[NewRun | None, str | None]:
        """The run a tick of `s` starts (its definition's latest version), or None and why
        not (a paused or archived definition is left to the store, which reads its status
        in the tick's own transaction)."""
        d = await self.store.definition(s.definition_id)
        if d is None:
            return None, "the workflow definition was deleted"
        try:
            run = await self.engine.defs.prepare_run(
                d, orjson.loads(s.input_json), trigger="schedule", version=None, by=s.created_by
            )
        except StepdError as exc:
            return None, exc.text
        return run, None

    async def trigger(self, sid: int) -> dict[str, Any]:
        """Run now, under the schedule's overlap policy."""
        s = await self._get(sid)
        fired = await self._fire_now(s, "trigger", [], None)
        t = fired.ticks[0]
        return {
            "outcome": t.outcome,
            "run_id": t.run_id,
            "reason": t.reason,
            "fire_time": cron.iso(cron.from_ms(t.fire_at, cron.zone(s.timezone))),
            "tick_id": t.id,
        }

    async def backfill(self, sid: int, body: Any) -> dict[str, Any]:
        s = await self._get(sid)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(body) - {"start", "end", "overlap"})
        if unknown:
            raise Unprocessable(
                f"unknown field '{_cut(unknown[0], 60)}' (allowed: start, end, overlap)"
            )
        start, end = _instant(body.get("start"), "start"), _instant(body.get("end"), "end")
        overlap = body.get("overlap", "buffer_all")
        if overlap not in OVERLAPS:
            raise Unprocessable(f"field 'overlap' must be one of {', '.join(OVERLAPS)}")
        if not start < end:
            raise Unprocessable("'start' must be before 'end'")
        if end > datetime.now(UTC):
            raise Unprocessable("'end' must not be in the future: a backfill runs past fire times")
        c = cron.parse(s.cron, s.timezone)
        times = c.between(start, end, MAX_BACKFILL)
        if len(times) > MAX_BACKFILL:
            raise Unprocessable(
                f"the window holds more than {MAX_BACKFILL} fire times; backfill a shorter one"
            )
        fired = await self._fire_now(s, "backfill", [cron.to_ms(t) for t in times], overlap)
        count = {
            o: sum(t.outcome == o for t in fired.ticks) for o in ("fired", "buffered", "skipped")
        }
        return {
            "fire_times": len(times),
            **count,
            "ticks": [self.render_tick(t, c.tz) for t in fired.ticks],
        }

    async def _fire_now(
        self, s: Schedule, kind: str, fire_ats: list[int], overlap: str | None
    ) -> Any:
        for _ in range(3):
            run, problem = await self.prepare(s)
            if run is not None and (overlap or s.overlap) in ("allow_all", "cancel_other"):
                size = len(fire_ats) * (len(run.flow_json) + len(run.input_json))
                if size > MAX_BACKFILL_BYTES:
                    raise Unprocessable(
                        f"this backfill would start {len(fire_ats)} runs at once (overlap "
                        f"{overlap or s.overlap}) storing {size // 1_000_000} MB of flow and "
                        f"input; the most is {MAX_BACKFILL_BYTES // 1_000_000} MB: backfill "
                        "a shorter window, or with overlap buffer_all"
                    )
            fired = await self.store.fire_now(s.id, kind, fire_ats, run, problem, overlap)
            if fired.status == "stale":  # a new version was saved meanwhile
                continue
            if fired.status == "raced":
                raise schedule_not_found(s.id)
            self.engine.executor.cancel_steps(fired.cancelled)
            self.engine.executor.wake()
            return fired
        raise Conflict("the workflow definition kept changing; try again")

    # -- export and import ---------------------------------------------------------------

    async def export_for(self, d: Definition) -> list[dict[str, Any]]:
        items, _ = await self.store.schedules(d.id, limit=MAX_PER_DEFINITION, offset=0)
        return [
            {
                "cron_expression": s.cron,
                "timezone": s.timezone,
                "input_data": orjson.Fragment(s.input_json),
                "overlap": s.overlap,
                "catchup_window": s.catchup_ms // 1000,
                "paused": bool(s.paused),
            }
            for s in items
        ]

    @staticmethod
    def check_export(items: Any, where: str) -> list[str]:
        """Problems with an export's `schedules` of one definition."""
        if items is None:
            return []
        if not isinstance(items, list) or len(items) > MAX_PER_DEFINITION:
            return [f"{where}: 'schedules' must be a list of at most {MAX_PER_DEFINITION}"]
        problems = []
        for i, item in enumerate(items):
            try:
                _, found = check_fields(item, partial=False)
            except BadRequest as exc:
                found = [exc.text]
            problems += [f"{where}: schedules[{i}]: {p}" for p in found]
        return problems

    async def import_for(self, d: Definition, items: Any, *, by: str | None) -> int:
        """Create the export's schedules a definition lacks (same cron, zone and input);
        how many were created."""
        if not items:
            return 0
        have, _ = await self.store.schedules(d.id, limit=MAX_PER_DEFINITION, offset=0)
        keys = {(s.cron, s.timezone, _canonical(orjson.loads(s.input_json))) for s in have}
        made = 0
        for item in items:
            fields, _ = check_fields(item, partial=False)
            c = cron.parse(fields["cron_expression"], fields["timezone"])
            key = (c.expression, c.timezone, _canonical(fields["input_data"]))
            if key in keys:
                continue
            try:
                await self._insert(d, fields, by=by)
            except Conflict:
                break
            keys.add(key)
            made += 1
        return made


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _instant(value: Any, name: str) -> datetime:
    """An ISO 8601 time with a UTC offset (or Z)."""
    if not isinstance(value, str) or len(value) > 64:
        raise Unprocessable(f"field '{name}' must be an ISO 8601 time with a UTC offset")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Unprocessable(
            f"field '{name}' must be an ISO 8601 time with a UTC offset, "
            f"such as 2026-03-01T09:00:00-05:00"
        ) from None
    if moment.tzinfo is None:
        raise Unprocessable(f"field '{name}' needs a UTC offset (such as Z or -05:00)")
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # year 1 at a positive offset, year 9999 at a negative one
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise Unprocessable(f"field '{name}' must be between 1970 and 9000")
    return moment


__all__ = ["Schedules", "check_fields", "parse_sid", "parse_ref"]
