"""The Schedules forms of a definition's page: add a schedule; pause, resume, run now,
delete and backfill one. Every POST checks its CSRF token (form_action) and needs
`workflow` permission; each answers with a redirect and a flash message, never a 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from daemon import cron
from daemon.auth import Authenticator
from daemon.bodies import parse_body
from daemon.errors import BadRequest, NotFound, StepdError, Unprocessable
from daemon.ids import MAX_ID
from daemon.web.actions import Form, back, form_action
from daemon.web.defactions import refusal
from daemon.web.schedpages import DEFAULT_CATCHUP, local, scheds_of
from daemon.web.session import Session

MAX_CATCHUP = 31_622_400  # seconds: a year (the service's own limit)
MAX_TIME_TEXT = 100  # characters of a backfill's start or end
MAX_REASONS = 2  # reasons for skipped ticks quoted in a backfill's message
MAX_REASON = 120  # characters of each

Action = Callable[[Request, dict[str, Any], Form, Session], Awaitable[tuple[str | None, str, str]]]


def label(schedule: dict[str, Any]) -> str:
    return f"“{schedule.get('cron_expression')}” ({schedule.get('timezone')})"


def next_text(schedule: dict[str, Any]) -> str:
    if schedule.get("paused"):
        return "it is paused: it fires once resumed."
    upcoming = schedule.get("next_run")
    return f"next run {local(upcoming)}." if upcoming else "it has no next run."


# -- reading the forms ------------------------------------------------------------------------


def whole_seconds(raw: str) -> int:
    text = raw.strip()
    if not text:
        return DEFAULT_CATCHUP
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) > MAX_CATCHUP:
        raise Unprocessable(
            f"the catch-up window must be a whole number of seconds from 0 to {MAX_CATCHUP}"
        )
    return int(text)


async def new_schedule(form: Form) -> dict[str, Any]:
    """The create body from the add form. The service checks the expression, the zone,
    the overlap and the input against the definition's input_schema."""
    expression = form.get("cron_expression", "").strip()
    if not expression:
        raise Unprocessable("a schedule needs a cron expression, such as 0 9 * * 1-5")
    raw = form.get("input_data", "").strip()
    try:
        data = await parse_body(raw.encode()) if raw else {}
    except BadRequest as exc:
        raise Unprocessable(f"the input is not valid JSON ({exc.text})") from None
    if not isinstance(data, dict):
        raise Unprocessable("the input must be a JSON object")
    body: dict[str, Any] = {
        "cron_expression": expression,
        "timezone": form.get("timezone", "").strip() or "UTC",
        "input_data": data,
        "catchup_window": whole_seconds(form.get("catchup_window", "")),
        "paused": form.get("paused") in ("on", "true", "1"),
    }
    if form.get("overlap"):
        body["overlap"] = form["overlap"]
    return body


def instant(form: Form, field: str, zone_name: str) -> str:
    """A backfill bound as ISO 8601 with its offset: a datetime-local value ("2026-12-01T09:00")
    is read in `zone_name`; a text with an offset (or Z) is taken as it is."""
    text = form.get(field, "").strip()
    what = "the start" if field == "start" else "the end"
    if not text:
        raise Unprocessable(f"a backfill needs {what} of its window")
    try:
        if len(text) > MAX_TIME_TEXT:
            raise ValueError
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Unprocessable(f"{what} is not a date and time: {text[:MAX_TIME_TEXT]!r}") from None
    if moment.tzinfo is None:
        try:
            moment = moment.replace(tzinfo=cron.zone(zone_name))
        except cron.CronError as exc:
            raise Unprocessable(str(exc)) from None
    return moment.isoformat(timespec="seconds")


# -- the actions ------------------------------------------------------------------------------


async def add(request: Request, def_id: int, form: Form, session: Session) -> str:
    answer = await scheds_of(request).create(str(def_id), await new_schedule(form),
                                             by=session.token.name)  # fmt: skip
    schedule = answer.get("schedule") or {}
    return f"Added the schedule {label(schedule)}: {next_text(schedule)}"


async def pause(
    request: Request, schedule: dict[str, Any], form: Form, session: Session
) -> tuple[str | None, str, str]:
    await scheds_of(request).update(schedule["schedule_id"], {"paused": True})
    return None, "ok", f"Paused the schedule {label(schedule)}: it fires no more until resumed."


async def resume(
    request: Request, schedule: dict[str, Any], form: Form, session: Session
) -> tuple[str | None, str, str]:
    after = await scheds_of(request).update(schedule["schedule_id"], {"paused": False})
    return None, "ok", f"Resumed the schedule {label(schedule)}: {next_text(after)}"


async def trigger(
    request: Request, schedule: dict[str, Any], form: Form, session: Session
) -> tuple[str | None, str, str]:
    """Run now, as the schedule's overlap says: a run started goes to its page."""
    answer = await scheds_of(request).trigger(schedule["schedule_id"])
    outcome, run_id = answer.get("outcome"), answer.get("run_id")
    why = f": {answer['reason']}" if answer.get("reason") else ""
    if outcome == "fired" and run_id is not None:
        return (
            f"/ui/workflows/{run_id}",
            "ok",
            f"Started run {run_id} of the schedule {label(schedule)}.",
        )
    if outcome == "buffered":
        return None, "info", f"Buffered: the run starts when the running one ends{why}."
    return None, "info", f"Skipped: no run started{why}."


async def delete(
    request: Request, schedule: dict[str, Any], form: Form, session: Session
) -> tuple[str | None, str, str]:
    await scheds_of(request).delete(schedule["schedule_id"])
    where = f"/ui/definitions/{schedule['workflow_id']}"
    return where, "ok", f"Deleted the schedule {label(schedule)}; the runs it started stay."


async def backfill(
    request: Request, schedule: dict[str, Any], form: Form, session: Session
) -> tuple[str | None, str, str]:
    zone_name = form.get("zone", "").strip() or str(schedule.get("timezone") or "UTC")
    body: dict[str, Any] = {
        "start": instant(form, "start", zone_name),
        "end": instant(form, "end", zone_name),
    }
    if form.get("overlap"):
        body["overlap"] = form["overlap"]
    answer = await scheds_of(request).backfill(schedule["schedule_id"], body)
    n = answer.get("fire_times", 0)
    counts = ", ".join(f"{answer.get(k, 0)} {k}" for k in ("fired", "buffered", "skipped"))
    times = "fire time" if n == 1 else "fire times"
    why = skip_reasons(answer.get("ticks") or [])
    return None, "ok", (f"Backfilled {n} {times} from {body['start']} to {body['end']}: "
                        f"{counts}{why}.")  # fmt: skip


def skip_reasons(ticks: list[dict[str, Any]]) -> str:
    """Why ticks were skipped, each reason once (the first MAX_REASONS, cut)."""
    reasons: list[str] = []
    for tick in ticks:
        reason = tick.get("reason") if tick.get("outcome") == "skipped" else None
        if reason and reason not in reasons:
            reasons.append(str(reason))
    if not reasons:
        return ""
    shown = [r if len(r) <= MAX_REASON else r[:MAX_REASON] + "…" for r in reasons[:MAX_REASONS]]
    more = f"; {len(reasons) - MAX_REASONS} more" if len(reasons) > MAX_REASONS else ""
    return f" ({'; '.join(shown)}{more})"


ACTIONS: dict[str, Action] = {"pause": pause, "resume": resume, "trigger": trigger,
                              "delete": delete, "backfill": backfill}  # fmt: skip


@form_action
async def add_schedule(request: Request, session: Session, form: Form) -> Response:
    """Add a schedule to the definition, then back to its page with a message."""
    def_id = request.path_params["id"]
    here = f"/ui/definitions/{def_id}"
    try:
        Authenticator.require(session.token, "workflow")
        if def_id > MAX_ID:
            raise NotFound("there is no such definition")
        done = await add(request, def_id, form, session)
    except StepdError as exc:
        return back(request, form, here, "error", refusal(exc))
    return back(request, form, here, "ok", done)


@form_action
async def schedule_action(request: Request, session: Session, form: Form) -> Response:
    """One of ACTIONS on a schedule of the definition, then back with a message."""
    def_id, sid = request.path_params["id"], request.path_params["sid"]
    action = request.path_params["action"]
    here = f"/ui/definitions/{def_id}"
    try:
        Authenticator.require(session.token, "workflow")
        if action not in ACTIONS or def_id > MAX_ID or sid > MAX_ID:
            raise BadRequest("there is no such schedule or action")
        schedule = await scheds_of(request).get(sid)
        if schedule.get("workflow_id") != def_id:
            raise NotFound("this definition has no such schedule")
        where, kind, done = await ACTIONS[action](request, schedule, form, session)
    except StepdError as exc:
        return back(request, form, here, "error", refusal(exc))
    return back(request, {**form, "next": where or form.get("next", "")}, here, kind, done)


ROUTES: list[BaseRoute] = [
    Route("/definitions/{id:id}/schedules", add_schedule, methods=["POST"]),
    Route(
        "/definitions/{id:id}/schedules/{sid:id}/{action:str}", schedule_action, methods=["POST"]
    ),  # fmt: skip
]
