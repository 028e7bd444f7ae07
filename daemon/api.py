"""HTTP API: parse, call the engine, answer. No SQL here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon import (
    catalog,
    events,
    flowschema,
    links,
    metrics,
    notify,
    openapi,
    outcome,
    retention,
    scheduler,
    signing,
    web,
)
from daemon.auth import Authenticator
from daemon.bodies import read_json
from daemon.config import Config, TokenConfig
from daemon.engine import Engine
from daemon.errors import (
    BadRequest,
    NotFound,
    StepdError,
    Unauthorized,
)
from daemon.executor import Executor
from daemon.hub import EventHub
from daemon.ids import MAX_ID
from daemon.limits import MAX_IDEMPOTENCY_KEY
from daemon.models import WorkflowStatus
from daemon.storage import StorageUnavailable, open_store
from daemon.tools import Registry, build_registry

log = logging.getLogger("stepd.api")
PUBLIC_PATHS = frozenset({"/healthz"})
WEB_PREFIXES = ("/ui", "/link")  # web pages: session cookies and signed links, not bearers
HOOK_PREFIX = "/hooks/"  # inbound webhooks: signed with the definition's secret, not bearers
MAX_WAIT_S = 300.0  # the longest a request may wait for its workflow (?wait=, ?timeout=)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(status: int, message: str, **extra: Any) -> JSON:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSON({"error": message, **extra}, status_code=status, headers=headers)


class AuthMiddleware:
    """Every path but the public ones (/healthz, and /metrics when configured so) needs a
    valid bearer token; the token lands in scope state."""

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator, public: frozenset[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.auth = authenticator
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        web = any(path == p or path.startswith(p + "/") for p in WEB_PREFIXES)
        web = web or path.startswith(HOOK_PREFIX)
        if scope["type"] == "http" and path not in self.public and not web:
            header = None
            for key, value in scope["headers"]:
                if key == b"authorization":
                    header = value.decode("latin-1")
                    break
            try:
                token = self.auth.identify(header)
            except Unauthorized as exc:
                await error_response(401, exc.text)(scope, receive, send)
                return
            scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


Endpoint = Callable[[Request], Awaitable[Response]]


def needs(permission: str) -> Callable[[Endpoint], Endpoint]:
    """Route decorator: the request's token must grant `permission`."""

    def wrap(fn: Endpoint) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            Authenticator.require(token_of(request), permission)
            return await fn(request)

        endpoint.__name__ = fn.__name__
        endpoint.__doc__ = fn.__doc__
        return endpoint

    return wrap


def token_of(request: Request) -> TokenConfig:
    token: TokenConfig = request.state.token
    return token


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return key


def path_id(request: Request, name: str) -> int:
    """An integer path parameter; ids outside the 64-bit range cannot exist."""
    value: int = request.path_params[name]
    if value > MAX_ID:
        kind = "step" if name == "step_id" else "workflow"
        raise NotFound(f"{kind} not found: ids go up to {MAX_ID}")
    return value


def int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter '{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter '{name}' must be between {lo} and {hi}")
    return value


# -- routes --------------------------------------------------------------------------


def seconds_param(request: Request, name: str, default: float | None, most: float) -> float | None:
    """A query parameter of seconds, above 0 and at most `most`."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= most:  # also NaN
        raise BadRequest(f"query parameter '{name}' must be seconds above 0, at most {most:g}")
    return value


@needs("workflow")
async def create_workflow(request: Request) -> Response:
    """Create and start a workflow; with ?wait=SECONDS, answer once it ended (200) or
    waits for a person, a signal or a timer, or the seconds passed (202)."""
    key = idempotency_key(request)
    wait = seconds_param(request, "wait", None, MAX_WAIT_S)
    body = await read_json(request)
    engine = engine_of(request)
    created = await engine.create(body, created_by=token_of(request).name, idempotency_key=key)
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    if wait is None:
        return JSON({"id": created.id, "status": "started"}, status_code=201, headers=headers)
    settled = await outcome.unless_gone(
        request.receive,
        outcome.settle(engine.store, created.id, wait, hub=request.app.state.events),
    )
    if settled is None:  # the client hung up: no one to answer
        return Response(status_code=202)
    status = 200 if settled.ended else 202
    return JSON(await engine.get(created.id), status_code=status, headers=headers)


@needs("read")
async def list_workflows(request: Request) -> Response:
    """Workflows, newest first."""
    status = request.query_params.get("status") or None
    if status is not None and status not in set(WorkflowStatus):
        allowed = ", ".join(s.value for s in WorkflowStatus)
        raise BadRequest(f"query parameter 'status' must be one of {allowed}")
    limit = int_param(request, "limit", 50, 1, 1000)
    before = int_param(request, "before", None, 1, 1 << 62)
    assert limit is not None
    items = await engine_of(request).list(limit=limit, status=status, before=before)
    return JSON(items)


@needs("read")
async def get_workflow(request: Request) -> Response:
    """One workflow with its steps."""
    return JSON(await engine_of(request).get(path_id(request, "id")))


@needs("workflow")
async def cancel_workflow(request: Request) -> Response:
    """Cancel a running workflow."""
    await engine_of(request).cancel(path_id(request, "id"), by=token_of(request).name)
    return JSON({"cancelled": True})


async def _control_body(request: Request, allowed: set[str]) -> dict[str, Any]:
    """An optional JSON object body with only `allowed` fields (a reason is text)."""
    body = await read_json(request, optional=True)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
    for key in ("reason", "from_step", "name"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"field '{key}' must be a string")
    return body


@needs("workflow")
async def pause_workflow(request: Request) -> Response:
    """Pause a running workflow: nothing new starts, running tools finish."""
    body = await _control_body(request, {"reason"})
    workflow_id = path_id(request, "id")
    await engine_of(request).pause(workflow_id, by=token_of(request).name,
                                   reason=body.get("reason"))  # fmt: skip
    return JSON({"id": workflow_id, "status": "paused"})


@needs("workflow")
async def resume_workflow(request: Request) -> Response:
    """Resume a paused workflow, or redrive a failed or cancelled one."""
    body = await _control_body(request, {"reason", "from_step"})
    workflow_id = path_id(request, "id")
    redriven = await engine_of(request).resume(
        workflow_id, by=token_of(request).name, from_step=body.get("from_step"),
        reason=body.get("reason"),
    )  # fmt: skip
    return JSON({"id": workflow_id, "status": "running", "redriven": redriven})


@needs("workflow")
async def intervene_workflow(request: Request) -> Response:
    """Merge-patch the input of a paused workflow or one waiting at a gate."""
    body = await _control_body(request, {"input", "reason"})
    if "input" not in body:
        raise BadRequest("Missing required field: input")
    workflow_id = path_id(request, "id")
    new = await engine_of(request).intervene(
        workflow_id, body["input"], by=token_of(request).name, reason=body.get("reason")
    )
    return JSON({"id": workflow_id, "input": new})


@needs("workflow")
async def signal_workflow(request: Request) -> Response:
    """Send a signal to a workflow: {"name", "data"}."""
    body = await _control_body(request, {"name", "data"})
    if "name" not in body:
        raise BadRequest("Missing required field: name")
    await engine_of(request).signal(path_id(request, "id"), body["name"], body.get("data"),
                                    by=token_of(request).name)  # fmt: skip
    return JSON({"accepted": True}, status_code=202)


@needs("approve")
async def ready_step(request: Request) -> Response:
    """Release (approve) a waiting gate; an optional JSON body becomes its result."""
    key = idempotency_key(request)
    result = await read_json(request, optional=True)
    status, body = await engine_of(request).approve(
        path_id(request, "step_id"), result, token=token_of(request), idempotency_key=key
    )
    return JSON(body, status_code=status)


@needs("approve")
async def reject_step(request: Request) -> Response:
    """Reject a waiting gate with {"reason": "..."}; the flow goes to on_error or fails."""
    key = idempotency_key(request)
    body = await read_json(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) - {"reason"}:
        raise BadRequest('body must be {"reason": "..."}')
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest("a rejection needs a non-empty 'reason'")
    status, answer = await engine_of(request).reject(
        path_id(request, "step_id"), reason.strip(), token=token_of(request), idempotency_key=key
    )
    return JSON(answer, status_code=status)


@needs("read")
async def workflow_events(request: Request) -> Response:
    """One workflow's events as Server-Sent Events; the stream ends when the workflow does."""
    return await events.response(request, path_id(request, "id"))


@needs("read")
async def all_events(request: Request) -> Response:
    """Every workflow's events as Server-Sent Events."""
    return await events.response(request, None)


@needs("read")
async def list_approvals(request: Request) -> Response:
    """What waits for a person now (gates and interrupted steps), oldest first."""
    limit = int_param(request, "limit", 100, 1, 500)
    after = int_param(request, "after", 0, 0, 1 << 62)
    assert limit is not None and after is not None
    return JSON(await engine_of(request).approvals(limit=limit, after=after))


@needs("approve")
async def retry_step(request: Request) -> Response:
    """Run an interrupted step of a non-idempotent tool again."""
    await engine_of(request).retry(path_id(request, "step_id"), by=token_of(request).name)
    return JSON({"queued": True})


@needs("approve")
async def fail_step(request: Request) -> Response:
    """Fail an interrupted step of a non-idempotent tool; the flow goes to on_error or fails."""
    body = await read_json(request, optional=True)
    reason = None
    if body is not None:
        if not isinstance(body, dict) or set(body) - {"reason"}:
            raise BadRequest('body must be {"reason": "..."} or empty')
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("reason must be a string")
    await engine_of(request).fail(path_id(request, "step_id"), reason, by=token_of(request).name)
    return JSON({"failed": True})


@needs("workflow")
async def validate_workflow(request: Request) -> Response:
    """Check a workflow without creating it."""
    return JSON(await engine_of(request).validate(await read_json(request)))


@needs("read")
async def list_tools(request: Request) -> Response:
    """Registered tools and their parameters."""
    return JSON(engine_of(request).registry.describe())


@needs("read")
async def flow_schema(request: Request) -> Response:
    """The flow format (and the create body) as JSON Schema 2020-12."""
    return JSON(request.app.state.flow_schema)


@needs("read")
async def openapi_json(request: Request) -> Response:
    """The OpenAPI document of this API."""
    return JSON(request.app.state.openapi)


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus metrics. Any valid token may read them, or none with [metrics] auth = false."""
    body, content_type = await metrics.render(
        request.app.state.store, request.headers.get("accept")
    )
    return Response(body, media_type=content_type)


async def healthz(request: Request) -> Response:
    """Liveness: no auth."""
    executor: Executor = request.app.state.executor
    failing = executor.evaluator.failing
    if not executor.healthy or failing is not None:
        body = {"status": "degraded"}
        if failing is not None:
            body["expression_sandbox"] = failing
        return JSON(body, status_code=503)
    return JSON({"status": "ok"})


def route(path: str, **handlers: Endpoint) -> Route:
    """One route per path, dispatching on the method (so a 405 lists every allowed one)."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, endpoint, methods=list(handlers), name=path)


ROUTES = [
    route("/healthz", GET=healthz),
    route("/openapi.json", GET=openapi_json),
    route("/metrics", GET=prometheus_metrics),
    route("/api/tools", GET=list_tools),
    route("/api/schema/flow", GET=flow_schema),
    route("/api/workflow", GET=list_workflows, POST=create_workflow),
    route("/api/workflow/validate", POST=validate_workflow),
    route("/api/workflow/{id:id}", GET=get_workflow, DELETE=cancel_workflow),
    route("/api/approvals", GET=list_approvals),
    route("/api/events", GET=all_events),
    route("/api/workflow/{id:id}/events", GET=workflow_events),
    route("/api/workflow/{step_id:id}/ready", POST=ready_step),
    route("/api/workflow/{step_id:id}/reject", POST=reject_step),
    route("/api/workflow/{step_id:id}/retry", POST=retry_step),
    route("/api/workflow/{step_id:id}/fail", POST=fail_step),
    route("/api/workflow/{id:id}/pause", POST=pause_workflow),
    route("/api/workflow/{id:id}/resume", POST=resume_workflow),
    route("/api/workflow/{id:id}/intervene", POST=intervene_workflow),
    route("/api/workflow/{id:id}/signal", POST=signal_workflow),
]


def loggable(request: Request) -> str:
    """The request's path for a log line: a one-click link's token is a credential."""
    path = request.url.path
    return "/link/..." if path.startswith("/link/") else path


async def on_stepd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StepdError)
    resp = error_response(exc.status, exc.text, **exc.extra)
    if request.url.path.startswith(HOOK_PREFIX) and "www-authenticate" in resp.headers:
        del resp.headers["www-authenticate"]  # signed: no bearer to retry with
    return resp


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such route", 405: "method not allowed"}
    resp = error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
    resp.headers.update(exc.headers or {})
    return resp


async def on_storage_fault(request: Request, exc: Exception) -> Response:
    # The transaction was rolled back: nothing of the request was stored.
    log.error("storage fault on %s %s: %s", request.method, loggable(request), exc)
    return error_response(503, f"storage unavailable: {exc}; nothing was changed, retry later")


async def on_client_gone(request: Request, exc: Exception) -> Response:
    # Not a fault of ours, and no one is left to answer: one line, no traceback. Handled
    # here, before the catch-all, because Starlette re-raises what reaches that one and the
    # server then logs a second traceback.
    log.info("client disconnected before sending the whole body: %s %s", request.method,
             loggable(request))  # fmt: skip
    return error_response(400, "the client disconnected before sending the whole body")


async def on_crash(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, loggable(request), exc_info=exc)
    return error_response(500, "internal error")


def web_routes() -> list[Any]:
    """The web pages (/ui) and the one-click decision links (/link)."""
    return [*web.routes(), *links.routes()]


def all_routes() -> list[Any]:
    """Every route of the daemon: the API, saved definitions, their execution and webhooks,
    the web pages."""
    from daemon.api_definitions import DEFINITION_ROUTES  # they build on this module
    from daemon.api_execute import EXECUTE_ROUTES
    from daemon.api_schedules import SCHEDULE_ROUTES

    return [*ROUTES, *SCHEDULE_ROUTES, *DEFINITION_ROUTES, *EXECUTE_ROUTES, *web_routes()]


def create_app(
    config: Config, *, registry: Registry | None = None, tokens: list[TokenConfig] | None = None
) -> Starlette:
    """The API and the executor; the lifespan opens the store and runs the executor."""
    registry = registry or build_registry(config.tool_modules, search_path=config.config_dir)
    catalog.list_templates()  # a broken template file stops the start, not a later request
    store = open_store(config)
    store.commit_hooks.append(metrics.committed)
    executor = Executor(store, registry, config)
    engine = Engine(store, registry, executor, max_states=config.max_states,
                    policy=executor.egress)  # fmt: skip
    hub = EventHub(store)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not store.is_open:  # `stepd serve` opens it before binding the port
            await store.open()
        try:
            if (key := await store.secret("server")) is not None:
                signing.remember(config.state_dir, key)
            recovered = await executor.recover()
            await hub.start()
        except BaseException:
            await store.close()  # a failed start-up must not leave connections open
            raise
        if recovered:
            log.warning(
                "recovered %d steps left running by a daemon that did not stop cleanly", recovered
            )
        executor.start()
        background = []
        if config.retention_days > 0:
            background.append(asyncio.create_task(retention.run(store, config)))
        background.append(asyncio.create_task(notify.run(store, config)))
        background.append(asyncio.create_task(scheduler.run(engine)))
        try:
            yield
        finally:
            await hub.stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await executor.stop()
            await store.close()

    app = Starlette(
        routes=all_routes(),
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=Authenticator(list(config.tokens) if tokens is None else tokens),
                public=PUBLIC_PATHS if config.metrics_auth else PUBLIC_PATHS | {"/metrics"},
            ),
        ],
        exception_handlers={
            StepdError: on_stepd_error,
            HTTPException: on_http_error,
            StorageUnavailable: on_storage_fault,  # disk full, locked past the timeout
            ClientDisconnect: on_client_gone,
            Exception: on_crash,
        },
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.body_bytes = 0  # of request bodies being received (read_body)
    app.state.store = store
    app.state.executor = executor
    app.state.engine = engine
    # Served documents name this daemon's tools: flows built from them run here.
    app.state.openapi = openapi.document(registry.names())
    app.state.flow_schema = flowschema.document(registry.names())
    app.state.events = hub
    return app
