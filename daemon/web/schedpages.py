"""Schedules on a definition's page: the Schedules section (each schedule's cron expression
in words, zone, overlap, catch-up window, next runs, last fire; the add form for `workflow`
tokens) and one schedule's page with its ticks, paged and filtered by outcome.

The pages read through the engine's schedules service (`engine.scheds`), never over HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from daemon.errors import NotFound
from daemon.ids import MAX_ID
from daemon.web.defpages import as_dict, defs_of, number, plain, valid_ref
from daemon.web.pages import ENV, can, engine_of, not_found, render, signed_in
from daemon.web.session import Session

MAX_SCHEDULES = 100  # a definition has at most this many (the service refuses more)
TICKS_PAGE = 50  # ticks shown on a schedule's page at once
OUTCOMES = ("fired", "skipped", "missed", "buffered")
OVERLAPS = {
    "skip": "skip the tick while a run of this schedule is still going",
    "buffer_one": "keep one tick to fire when the running one ends; skip more",
    "buffer_all": "keep every tick, fire them one after another",
    "cancel_other": "cancel the running run, start the new one",
    "allow_all": "start a run every time, however many are going",
}
DEFAULT_CATCHUP = 60  # seconds
# The time zones the add form suggests; any IANA name can be typed.
ZONES = (
    "UTC",
    "Europe/London", "Europe/Dublin", "Europe/Lisbon", "Europe/Paris", "Europe/Berlin",
    "Europe/Madrid", "Europe/Rome", "Europe/Amsterdam", "Europe/Brussels", "Europe/Zurich",
    "Europe/Stockholm", "Europe/Warsaw", "Europe/Prague", "Europe/Vienna", "Europe/Athens",
    "Europe/Helsinki", "Europe/Kyiv", "Europe/Istanbul", "Europe/Moscow",
    "Africa/Cairo", "Africa/Johannesburg", "Africa/Lagos", "Africa/Nairobi",
    "Asia/Dubai", "Asia/Karachi", "Asia/Kolkata", "Asia/Dhaka", "Asia/Bangkok",
    "Asia/Jakarta", "Asia/Singapore", "Asia/Shanghai", "Asia/Hong_Kong", "Asia/Taipei",
    "Asia/Seoul", "Asia/Tokyo", "Australia/Perth", "Australia/Adelaide", "Australia/Brisbane",
    "Australia/Sydney", "Australia/Melbourne", "Pacific/Auckland", "Pacific/Honolulu",
    "America/Anchorage", "America/Los_Angeles", "America/Vancouver", "America/Phoenix",
    "America/Denver", "America/Chicago", "America/Mexico_City", "America/New_York",
    "America/Toronto", "America/Halifax", "America/Bogota", "America/Lima",
    "America/Santiago", "America/Sao_Paulo", "America/Argentina/Buenos_Aires",
)  # fmt: skip
# How an outcome is coloured: the status colours of runs.
OUTCOME_STATUS = {"fired": "done", "skipped": "cancelled", "missed": "waiting",
                  "buffered": "queued"}  # fmt: skip


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time with its offset, as the schedules service gives them."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def offset_text(moment: datetime) -> str:
    """ "UTC", "UTC+01:00", "UTC-05:00", "UTC+05:45"."""
    delta = moment.utcoffset()
    if not delta:
        return "UTC"
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"UTC{sign}{hours:02d}:{mins:02d}"


def local(value: Any) -> str:
    """A fire time for people, in the schedule's zone with its offset:
    "Fri 2026-12-04 09:00 UTC-05:00" (seconds only when there are some)."""
    moment = parse_time(value)
    if moment is None:
        return str(value or "")
    clock = "%H:%M:%S" if moment.second else "%H:%M"
    return f"{moment.strftime('%a %Y-%m-%d ' + clock)} {offset_text(moment)}"


ENV.filters["local"] = local


def scheds_of(request: Request) -> Any:
    """The engine's schedules service."""
    return engine_of(request).scheds


async def section(request: Request, def_id: int) -> dict[str, Any]:
    """What the definition page's Schedules section shows: its schedules (every one: a
    definition has at most MAX_SCHEDULES) and the add form's choices."""
    page = await scheds_of(request).list(str(def_id), limit=MAX_SCHEDULES, offset=0)
    return {
        "schedules": [shown(s) for s in page["schedules"]],
        "schedules_total": page["total"],
        **choices(),
    }


def choices() -> dict[str, Any]:
    return {"overlaps": OVERLAPS, "zones": ZONES, "default_catchup": DEFAULT_CATCHUP,
            "outcome_status": OUTCOME_STATUS}  # fmt: skip


def shown(schedule: dict[str, Any]) -> dict[str, Any]:
    """A schedule as the page shows it: its input as Python values."""
    return {**schedule, "input_data": as_dict(schedule.get("input_data"))}


# -- one schedule and its ticks ---------------------------------------------------------------


@signed_in
async def schedule_page(request: Request, session: Session) -> Response:
    """One schedule: what the definition page shows of it, and its ticks, TICKS_PAGE at a
    time, newest first, filtered by outcome."""
    ref, sid = request.path_params["ref"], request.path_params["sid"]
    missing = "There is no such schedule."
    if not valid_ref(ref) or sid > MAX_ID:
        return await not_found(request, session, missing)
    write = can(session, "workflow")
    last_event = await engine_of(request).store.max_event_id()  # first: see workflow_page
    query = request.query_params
    outcome = query.get("outcome") if query.get("outcome") in OUTCOMES else None
    offset = number(query.get("offset")) or 0
    scheds = scheds_of(request)
    try:
        defs = defs_of(request)
        definition = plain(defs.summary(await defs.resolve(ref)))
        schedule = shown(await scheds.get(sid))
        if schedule.get("workflow_id") != definition["id"]:
            raise NotFound(missing)
        ticks = await scheds.ticks(sid, limit=TICKS_PAGE, offset=offset, outcome=outcome)
    except NotFound:
        return await not_found(request, session, missing)
    here = f"/ui/definitions/{definition['id']}/schedules/{sid}"

    def link(**changes: Any) -> str:
        params = {"outcome": outcome, "offset": offset or None, **changes}
        kept = {k: v for k, v in params.items() if v not in (None, "", 0)}
        return here + (f"?{urlencode(kept)}" if kept else "") + "#ticks"

    total = ticks["total"]
    return await render(
        request,
        "schedule.html",
        session,
        d=definition,
        s=schedule,
        ticks=ticks["ticks"],
        ticks_total=total,
        outcomes=OUTCOMES,
        filter_outcome=outcome,
        offset=offset,
        link=link,
        newer=link(offset=max(offset - TICKS_PAGE, 0)) if offset else None,
        older=link(offset=offset + TICKS_PAGE) if offset + TICKS_PAGE < total else None,
        can_write=write,
        last_event=last_event,
        **choices(),
    )


ROUTES: list[BaseRoute] = [
    Route("/definitions/{ref:str}/schedules/{sid:id}", schedule_page, methods=["GET"]),
]
