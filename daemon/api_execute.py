"""Synchronous execution of saved definitions and run event streams:

POST /api/workflows/{ref}/execute?timeout=S         the run's outcome in the answer
POST /api/workflows/{ref}/execute/stream?timeout=S  its events as SSE, then its outcome
GET  /api/workflows/runs/{run_id}/stream            a run's events as SSE until it ends
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon import outcome, runstream
from daemon.api import (
    JSON,
    MAX_WAIT_S,
    engine_of,
    needs,
    path_id,
    route,
    seconds_param,
    token_of,
)
from daemon.bodies import read_json
from daemon.errors import BadRequest, NotFound

DEFAULT_TIMEOUT_S = 30.0
BODY_KEYS = ("variables", "input", "version")


async def _start(request: Request) -> tuple[int, float]:
    """Check the request, start the run (trigger "execute"): its id and the timeout."""
    timeout = seconds_param(request, "timeout", DEFAULT_TIMEOUT_S, MAX_WAIT_S)
    assert timeout is not None
    body = await read_json(request, optional=True)
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - set(BODY_KEYS))
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (allowed: {', '.join(BODY_KEYS)})")
    variables = body.get("variables", body.get("input"))
    version = body.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise BadRequest("field 'version' must be a version number")
    run_id = await engine_of(request).defs.start_run(
        request.path_params["ref"],
        variables,
        trigger="execute",
        version=version,
        by=token_of(request).name,
    )
    return run_id, timeout


def answer(run_id: int, got: outcome.Outcome, timeout: float) -> JSON:
    """The execute answer for an outcome: 200, 202 waiting, 500 failed, 504 timeout."""
    if got.status == "completed":
        wf = got.workflow
        output = orjson.Fragment((wf.output_json if wf else None) or "null")
        return JSON({"run_id": run_id, "status": "completed", "output": output})
    if got.status == "waiting":
        body: dict[str, Any] = {"run_id": run_id, "status": "waiting",
                                "awaiting": got.awaiting_json()}  # fmt: skip
        return JSON(body, status_code=202)
    if got.ended:
        error = got.workflow.error if got.workflow else None
        if got.status == "cancelled":
            error = error or "the run was cancelled"
        return JSON(
            {
                "error": error or f"the run {got.status}",
                "error_code": "EXECUTION_FAILED",
                "run_id": run_id,
                "status": got.status,
            },
            status_code=500,
        )
    return JSON(
        {
            "error": f"the run did not finish within {timeout:g} s; it goes on "
            f"(GET /api/workflows/runs/{run_id})",
            "error_code": "EXECUTION_TIMEOUT",
            "run_id": run_id,
        },
        status_code=504,
    )


@needs("workflow")
async def execute(request: Request) -> Response:
    """Run a definition and answer with its outcome (up to ?timeout= seconds)."""
    run_id, timeout = await _start(request)
    engine = engine_of(request)
    got = await outcome.unless_gone(
        request.receive,
        outcome.settle(engine.store, run_id, timeout, hub=request.app.state.events),
    )
    if got is None:  # the client hung up: no one to answer
        return Response(status_code=202)
    if got.ended and got.workflow is None:  # its output or error
        got = replace(got, workflow=await engine.store.get_workflow(run_id))
    return answer(run_id, got, timeout)


@needs("workflow")
async def execute_stream(request: Request) -> Response:
    """Run a definition and stream its events, ending with its outcome."""
    run_id, timeout = await _start(request)
    return await runstream.execute_stream(request, run_id, timeout)


@needs("read")
async def run_stream(request: Request) -> Response:
    """A run's events as Server-Sent Events, until it ends."""
    run_id = path_id(request, "run_id")
    if await engine_of(request).store.get_workflow(run_id) is None:
        raise NotFound(f"run {run_id} not found")
    return runstream.run_stream(request, run_id)


EXECUTE_ROUTES: list[Route] = [
    route("/api/workflows/runs/{run_id:id}/stream", GET=run_stream),
    route("/api/workflows/{ref}/execute", POST=execute),
    route("/api/workflows/{ref}/execute/stream", POST=execute_stream),
]
