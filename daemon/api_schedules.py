"""HTTP routes of schedules (spec §11): under a definition, by schedule id, and the
`recurring` shape of local-engine-api.txt reaching the same schedules."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.api import JSON, engine_of, needs, route, token_of
from daemon.api_definitions import page, ref, text_param
from daemon.bodies import read_json
from daemon.errors import BadRequest
from daemon.schedules import Schedules, parse_sid


def scheds_of(request: Request) -> Schedules:
    return engine_of(request).scheds


def sid(request: Request) -> int:
    return parse_sid(request.path_params["sid"])


@needs("read")
async def list_schedules(request: Request) -> Response:
    """A definition's schedules: {"schedules", "total"}."""
    limit, offset = page(request, default=100, most=200)
    return JSON(await scheds_of(request).list(ref(request), limit=limit, offset=offset))


@needs("workflow")
async def create_schedule(request: Request) -> Response:
    """Add a schedule to a definition -> 201 {"schedule_id", "schedule"}."""
    body = await read_json(request)
    made = await scheds_of(request).create(ref(request), body, by=token_of(request).name)
    return JSON(made, status_code=201)


@needs("read")
async def get_schedule(request: Request) -> Response:
    """A schedule with its next five fire times and its recent ticks."""
    return JSON(await scheds_of(request).get(sid(request)))


@needs("workflow")
async def update_schedule(request: Request) -> Response:
    """Edit, pause or unpause a schedule (any of the create fields)."""
    body = await read_json(request)
    return JSON(await scheds_of(request).update(sid(request), body))


@needs("workflow")
async def delete_schedule(request: Request) -> Response:
    """Remove a schedule and its ticks (its runs stay)."""
    await scheds_of(request).delete(sid(request))
    return JSON({"deleted": True})


@needs("read")
async def list_ticks(request: Request) -> Response:
    """A schedule's ticks, newest first (?outcome=fired|skipped|missed|buffered)."""
    limit, offset = page(request, default=50, most=500)
    return JSON(
        await scheds_of(request).ticks(
            sid(request), outcome=text_param(request, "outcome"), limit=limit, offset=offset
        )
    )


@needs("workflow")
async def trigger_schedule(request: Request) -> Response:
    """Run now, under the schedule's overlap policy: 202 fired or buffered, 200 skipped."""
    body = await read_json(request, optional=True)
    if body not in (None, {}):
        raise BadRequest("a trigger takes no body (or {})")
    result = await scheds_of(request).trigger(sid(request))
    return JSON(result, status_code=200 if result["outcome"] == "skipped" else 202)


@needs("workflow")
async def backfill_schedule(request: Request) -> Response:
    """One run per fire time in {"start", "end"} (overlap default buffer_all)."""
    body = await read_json(request)
    return JSON(await scheds_of(request).backfill(sid(request), body), status_code=202)


@needs("read")
async def list_recurring(request: Request) -> Response:
    """Every schedule, of every definition: {"schedules", "total"}."""
    limit, offset = page(request, default=100, most=200)
    return JSON(await scheds_of(request).list(None, limit=limit, offset=offset))


@needs("workflow")
async def create_recurring(request: Request) -> Response:
    """A schedule from {"workflow": id or name, ...the create fields} -> 201."""
    body = await read_json(request)
    made = await scheds_of(request).create_recurring(body, by=token_of(request).name)
    return JSON(made, status_code=201)


# Before the definition routes: /api/workflows/recurring is not a definition's name.
SCHEDULE_ROUTES: list[Route] = [
    route("/api/workflows/recurring", GET=list_recurring, POST=create_recurring),
    route("/api/workflows/recurring/{sid}", DELETE=delete_schedule),
    route(
        "/api/workflows/schedules/{sid}",
        GET=get_schedule,
        PATCH=update_schedule,
        DELETE=delete_schedule,
    ),
    route("/api/workflows/schedules/{sid}/ticks", GET=list_ticks),
    route("/api/workflows/schedules/{sid}/trigger", POST=trigger_schedule),
    route("/api/workflows/schedules/{sid}/backfill", POST=backfill_schedule),
    route("/api/workflows/{ref}/schedules", GET=list_schedules, POST=create_schedule),
]
