"""HTTP routes of saved definitions (/api/workflows, plural) and inbound webhooks (/hooks)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon.api import (
    JSON,
    engine_of,
    idempotency_key,
    int_param,
    needs,
    path_id,
    route,
    token_of,
)
from daemon.auth import GRANTS
from daemon.bodies import read_body, read_json
from daemon.definitions import Definitions
from daemon.errors import BadRequest


def defs_of(request: Request) -> Definitions:
    return engine_of(request).defs


def ref(request: Request) -> str:
    value: str = request.path_params["ref"]
    return value


def reveals(request: Request) -> bool:
    """Whether the request's token may see webhook secrets (the workflow permission)."""
    return any("workflow" in GRANTS.get(p, set()) for p in token_of(request).permissions)


def page(request: Request, default: int = 50, most: int = 200) -> tuple[int, int]:
    limit = int_param(request, "limit", default, 1, most)
    offset = int_param(request, "offset", 0, 0, 1 << 31)
    assert limit is not None and offset is not None
    return limit, offset


def text_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and len(value) > 200:
        raise BadRequest(f"query parameter '{name}' is too long")
    return value


def version_param(request: Request, name: str) -> int:
    value = int_param(request, name, None, 1, 1 << 31)
    if value is None:
        raise BadRequest(f"query parameter '{name}' (a version number) is required")
    return value


# -- definitions ---------------------------------------------------------------------------


@needs("read")
async def list_definitions(request: Request) -> Response:
    """Saved definitions, newest first: {"workflows", "total"}."""
    limit, offset = page(request)
    return JSON(
        await defs_of(request).list(
            status=text_param(request, "status"),
            tag=text_param(request, "tag"),
            trigger_type=text_param(request, "trigger_type"),
            limit=limit,
            offset=offset,
        )
    )


@needs("workflow")
async def create_definition(request: Request) -> Response:
    """Save a definition: {"definition", "trigger_type", "tags"} -> 201 {"id", "workflow"}."""
    body = await read_json(request)
    return JSON(await defs_of(request).create(body, by=token_of(request).name), status_code=201)


@needs("workflow")
async def validate_definition(request: Request) -> Response:
    """Check a definition without saving it: {"valid", "errors", "warnings"}."""
    return JSON(await defs_of(request).validate(await read_json(request)))


@needs("read")
async def get_definition(request: Request) -> Response:
    """One definition (by id or name) with its latest version."""
    return JSON(await defs_of(request).get(ref(request), reveal=reveals(request)))


@needs("workflow")
async def update_definition(request: Request) -> Response:
    """A new version: {"definition", "change_summary"}; unchanged content makes none."""
    body = await read_json(request)
    return JSON(await defs_of(request).update(ref(request), body, by=token_of(request).name))


@needs("workflow")
async def delete_definition(request: Request) -> Response:
    """Delete a definition and its versions (?force=true cancels its active runs)."""
    force = request.query_params.get("force", "false").lower()
    if force not in ("true", "false", "1", "0"):
        raise BadRequest("query parameter 'force' must be true or false")
    await defs_of(request).delete(
        ref(request), force=force in ("true", "1"), by=token_of(request).name
    )
    return Response(status_code=204)


@needs("workflow")
async def set_definition_status(request: Request) -> Response:
    """{"status": "draft" | "active" | "paused" | "archived"}."""
    return JSON(await defs_of(request).set_status(ref(request), await read_json(request)))


@needs("read")
async def list_versions(request: Request) -> Response:
    """Versions, newest first."""
    limit, offset = page(request)
    return JSON(await defs_of(request).versions(ref(request), limit=limit, offset=offset))


@needs("read")
async def get_version(request: Request) -> Response:
    """One version's definition and compiled flow."""
    return JSON(await defs_of(request).version(ref(request), path_version(request)))


def path_version(request: Request) -> int:
    value: int = request.path_params["version"]
    if not 1 <= value < 1 << 31:
        raise BadRequest("a version number is from 1 up")
    return value


@needs("read")
async def diff_versions(request: Request) -> Response:
    """?v1=&v2=: RFC 6902 operations from v1 to v2, and a summary."""
    v1, v2 = version_param(request, "v1"), version_param(request, "v2")
    return JSON(await defs_of(request).diff(ref(request), v1, v2))


@needs("workflow")
async def rollback_definition(request: Request) -> Response:
    """{"version": n}: a new version with version n's content."""
    body = await read_json(request)
    return JSON(await defs_of(request).rollback(ref(request), body, by=token_of(request).name))


# -- runs ----------------------------------------------------------------------------------


@needs("workflow")
async def run_definition(request: Request) -> Response:
    """Start a run: {"input_data", "trigger", "version"} -> 202 {"run_id"}."""
    body = await read_json(request, optional=True)
    run_id = await defs_of(request).run_body(ref(request), body, by=token_of(request).name)
    return JSON({"run_id": run_id}, status_code=202)


@needs("read")
async def list_runs(request: Request) -> Response:
    """A definition's runs, newest first: {"runs", "total"}."""
    limit, offset = page(request)
    status = text_param(request, "status")
    allowed = ("queued", "running", "paused", "completed", "failed", "cancelled")
    if status is not None and status not in allowed:
        raise BadRequest(f"query parameter 'status' must be one of {', '.join(allowed)}")
    return JSON(
        await defs_of(request).runs(ref(request), status=status, limit=limit, offset=offset)
    )


@needs("read")
async def get_run(request: Request) -> Response:
    """A run with its step runs."""
    return JSON(await defs_of(request).run(path_id(request, "run_id")))


@needs("workflow")
async def delete_run(request: Request) -> Response:
    """Delete a run that ended."""
    await defs_of(request).delete_run(path_id(request, "run_id"))
    return Response(status_code=204)


@needs("workflow")
async def cancel_run(request: Request) -> Response:
    """Cancel a run (a queued one too)."""
    run_id = path_id(request, "run_id")
    await engine_of(request).cancel(run_id, by=token_of(request).name)
    return JSON({"run_id": run_id, "status": "cancelled"})


@needs("workflow")
async def resume_run(request: Request) -> Response:
    """Resume a paused run, or redrive a failed or cancelled one: {"from_step"}."""
    body = await read_json(request, optional=True)
    if body is None:
        body = {}
    if not isinstance(body, dict) or set(body) - {"from_step", "reason"}:
        raise BadRequest('body must be {"from_step": "<state>"} or empty')
    from_step, reason = body.get("from_step"), body.get("reason")
    if from_step is not None and not isinstance(from_step, str):
        raise BadRequest("field 'from_step' must be a string")
    if reason is not None and not isinstance(reason, str):
        raise BadRequest("field 'reason' must be a string")
    run_id = path_id(request, "run_id")
    redriven = await engine_of(request).resume(
        run_id, by=token_of(request).name, from_step=from_step, reason=reason
    )
    return JSON({"run_id": run_id, "status": "running", "redriven": redriven})


# -- webhooks ------------------------------------------------------------------------------


@needs("workflow")
async def deploy(request: Request) -> Response:
    """Give the definition a webhook: {"ok", "webhook_id", "webhook_secret", "url"}."""
    return JSON(await defs_of(request).deploy(ref(request)))


@needs("workflow")
async def undeploy(request: Request) -> Response:
    """Remove the definition's webhook."""
    return JSON(await defs_of(request).undeploy(ref(request)))


@needs("workflow")
async def arm(request: Request) -> Response:
    """Open the webhook for one call in the next 10 minutes: {"ok", "armed_until"}."""
    return JSON(await defs_of(request).arm(ref(request)))


async def call_hook(request: Request) -> Response:
    """An inbound webhook call, signed with the definition's webhook secret: 202 {"run_id"}."""
    webhook_id: str = request.path_params["webhook_id"]
    key = idempotency_key(request)
    body = await read_body(request, request.app.state.config.max_body_bytes)
    run_id, replayed = await defs_of(request).hook(
        webhook_id,
        timestamp=request.headers.get("x-stepd-timestamp"),
        signature=request.headers.get("x-stepd-signature"),
        body=body,
        key=key,
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSON({"run_id": run_id}, status_code=202, headers=headers)


# -- templates -----------------------------------------------------------------------------


@needs("read")
async def list_templates(request: Request) -> Response:
    """The templates stepd ships: {"templates", "total"}."""
    limit, offset = page(request)
    return JSON(
        defs_of(request).templates(
            category=text_param(request, "category"), limit=limit, offset=offset
        )
    )


@needs("read")
async def get_template(request: Request) -> Response:
    """One template with its definition."""
    return JSON(defs_of(request).template(request.path_params["template_id"]))


@needs("workflow")
async def install_template(request: Request) -> Response:
    """Save a template as a definition: {"name"} -> 201 {"workflow_id"}."""
    body = await read_json(request, optional=True)
    def_id = await defs_of(request).install(
        request.path_params["template_id"], body, by=token_of(request).name
    )
    return JSON({"workflow_id": def_id}, status_code=201)


# -- export and import -----------------------------------------------------------------------


@needs("read")
async def export_all(request: Request) -> Response:
    """Every definition with its versions and triggers (never a secret)."""
    return JSON(await defs_of(request).export(None))


@needs("read")
async def export_one(request: Request) -> Response:
    """One definition with its versions and triggers (never a secret)."""
    return JSON(await defs_of(request).export(ref(request)))


@needs("workflow")
async def import_definitions(request: Request) -> Response:
    """Import an export (?mode=create|upsert): {"created", "updated", "skipped"}."""
    mode = request.query_params.get("mode", "create")
    body = await read_json(request)
    result = await defs_of(request).import_(body, mode=mode, by=token_of(request).name)
    return JSON(result, status_code=200)


DEFINITION_ROUTES: list[Route] = [
    route("/api/workflows", GET=list_definitions, POST=create_definition),
    route("/api/workflows/validate", POST=validate_definition),
    route("/api/workflows/export", GET=export_all),
    route("/api/workflows/import", POST=import_definitions),
    route("/api/workflows/templates", GET=list_templates),
    route("/api/workflows/templates/{template_id}", GET=get_template),
    route("/api/workflows/templates/{template_id}/install", POST=install_template),
    route("/api/workflows/runs/{run_id:id}", GET=get_run, DELETE=delete_run),
    route("/api/workflows/runs/{run_id:id}/cancel", POST=cancel_run),
    route("/api/workflows/runs/{run_id:id}/resume", POST=resume_run),
    route(
        "/api/workflows/{ref}", GET=get_definition, PUT=update_definition, DELETE=delete_definition
    ),
    route("/api/workflows/{ref}/status", PATCH=set_definition_status),
    route("/api/workflows/{ref}/versions", GET=list_versions),
    route("/api/workflows/{ref}/versions/{version:int}", GET=get_version),
    route("/api/workflows/{ref}/diff", GET=diff_versions),
    route("/api/workflows/{ref}/rollback", POST=rollback_definition),
    route("/api/workflows/{ref}/run", POST=run_definition),
    route("/api/workflows/{ref}/runs", GET=list_runs),
    route("/api/workflows/{ref}/deploy", POST=deploy),
    route("/api/workflows/{ref}/undeploy", POST=undeploy),
    route("/api/workflows/{ref}/arm", POST=arm),
    route("/api/workflows/{ref}/export", GET=export_one),
    route("/hooks/{webhook_id}", POST=call_hook),
]
