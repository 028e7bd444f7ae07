"""The pages: approvals inbox, workflow list and detail, sign-in; rendered with Jinja2."""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from jinja2 import Environment, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from daemon import assets, events
from daemon.auth import Authenticator
from daemon.engine import Engine
from daemon.errors import Forbidden, NotFound
from daemon.ids import MAX_ID
from daemon.limits import PRETTY_LIMIT
from daemon.models import TERMINAL, WorkflowStatus
from daemon.web import graph
from daemon.web import session as sessions
from daemon.web.session import Session

STATIC = assets.StaticFiles("daemon.web", "static")  # read now: see daemon.assets
PAGE_SIZE = 50
STEP_ROWS = 100  # a workflow's latest top-level steps shown at first ("show older" for more)
INNER_ROWS = 50  # a parallel's or map's latest inner steps shown under its row
LATEST_MS = 253_402_300_799_999  # 9999-12-31: a later time (held while paused) is not shown
INBOX_PAGE = 100  # approvals shown at once (the nav counts them all)
HEADERS = {
    # Scripts and styles come only from /ui/static; nothing inline, no framing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[Request, Session], Awaitable[Response]]


# -- template helpers ----------------------------------------------------------------------


def ago(ms: int | None, now_ms: int | None = None) -> str:
    """A time relative to now: "just now", "5 min ago", "in 2 h", "3 d ago"."""
    if ms is None or not 0 <= ms <= LATEST_MS:
        return ""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    delta = (now_ms - ms) / 1000
    s = abs(delta)
    if s < 10:
        return "just now"
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if s < limit:
            text = f"{int(s // size)} {unit}"
            break
    else:
        if s >= 30 * 86400:
            return iso(ms)[:10]
        text = f"{int(s // 86400)} d"
    return f"{text} ago" if delta > 0 else f"in {text}"


def duration(ms: int) -> str:
    """How long something took: "< 0.1 s", "0.4 s", "12 s", "3 min 5 s", "2 h 10 min"."""
    s = max(ms, 0) / 1000
    if s < 0.1:
        return "< 0.1 s"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def iso(ms: int | None) -> str:
    """An epoch-milliseconds time as ISO 8601 UTC (for the datetime attribute)."""
    if ms is None or not 0 <= ms <= LATEST_MS:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc(ms: int | None) -> str:
    """An epoch-milliseconds time for people: "2026-11-25 11:28:11 UTC"."""
    return iso(ms).replace("T", " ").replace("Z", " UTC")


def pretty(value: Any) -> str:
    """JSON text (or an orjson Fragment) indented for reading, cut at PRETTY_LIMIT. A
    longer text is shown as stored, cut: never parsed (it may be megabytes, and the page
    is rendered on the event loop)."""
    if value is None:
        return ""
    if not isinstance(value, str | bytes):  # an orjson Fragment, or a value already parsed
        value = orjson.dumps(value)
    raw = value
    if len(raw) > PRETTY_LIMIT:
        return _cut(raw)
    try:
        text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return _cut(text) if len(text) > PRETTY_LIMIT else text


def _cut(raw: str | bytes) -> str:
    """The first PRETTY_LIMIT characters (or bytes) of a text, and how much is left out."""
    if isinstance(raw, bytes):  # a cut through a character drops its start
        head, unit = raw[:PRETTY_LIMIT].decode(errors="ignore"), "bytes"
    else:
        head, unit = raw[:PRETTY_LIMIT], "characters"
    return f"{head}\n… {len(raw) - PRETTY_LIMIT} more {unit}"


def is_empty_json(value: Any) -> bool:
    """Whether a stored JSON value shows as nothing: none, {} or null (a long one is
    not, and is not parsed to find that out)."""
    if value is None:
        return True
    raw = orjson.dumps(value) if isinstance(value, orjson.Fragment) else value
    return len(raw) <= 64 and pretty(raw) in ("", "{}", "null")


ENV = Environment(
    loader=assets.template_loader("daemon.web", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(ago=ago, duration=duration, iso=iso, utc=utc, pretty=pretty)
ENV.tests["empty_json"] = is_empty_json
ENV.globals.update(
    latest_ms=LATEST_MS,
    static_version=STATIC.version,
    terminal=TERMINAL,
    new_key=lambda: secrets.token_urlsafe(12),  # an Idempotency-Key: a double submit is harmless
)


def can(token_session: Session | None, need: str) -> bool:
    if token_session is None:
        return False
    try:
        Authenticator.require(token_session.token, need)
    except Forbidden:
        return False
    return True


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def render(
    request: Request,
    name: str,
    session: Session | None,
    *,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A page; signed-in pages get the nav (with the inbox count) and the CSRF token."""
    inbox_count = await engine_of(request).store.waiting_count() if session is not None else 0
    message = sessions.flash(request)
    html = ENV.get_template(name).render(
        session=session,
        csrf=session.csrf(request.app.state.config) if session else "",
        can_approve=can(session, "approve"),
        can_cancel=can(session, "workflow"),
        inbox_count=inbox_count,
        flash=message,
        now_ms=int(time.time() * 1000),
        path=request.url.path,
        **context,
    )
    response = HTMLResponse(html, status_code=status, headers=HEADERS)
    if message is not None:
        sessions.clear_cookie(request, response, sessions.FLASH_COOKIE)
    return response


def login_redirect(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/ui/login?next={quote(here)}", status_code=303)
    if sessions.SESSION_COOKIE in request.cookies:  # expired, forged, or its token is gone
        sessions.clear_cookie(request, response, sessions.SESSION_COOKIE)
    return response


def signed_in(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Route decorator: a valid session, or a redirect to the sign-in page."""

    async def endpoint(request: Request) -> Response:
        session = await sessions.current(request)
        if session is None:
            return login_redirect(request)
        return await fn(request, session)

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


def safe_next(value: str | None, default: str = "/ui/approvals") -> str:
    """Where to go after a form: a path under /ui only (never another site)."""
    if value and re.fullmatch(r"/ui/[A-Za-z0-9/_\-?=&.%]*", value) and "//" not in value:
        return value
    return default


# -- pages ------------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    return RedirectResponse("/ui/approvals", status_code=303)


async def login_page(request: Request) -> Response:
    """The sign-in form (a signed-in visitor goes straight on)."""
    next_url = safe_next(request.query_params.get("next"))
    if await sessions.current(request) is not None:
        return RedirectResponse(next_url, status_code=303)
    return await login_form(request, next_url)


async def login_form(
    request: Request, next_url: str, *, error: str | None = None, status: int = 200
) -> HTMLResponse:
    nonce, fresh = sessions.login_nonce(request)
    config = request.app.state.config
    response = await render(
        request,
        "login.html",
        None,
        status=status,
        error=error,
        next_url=next_url,
        login_csrf=sessions.login_csrf(config, nonce),
    )
    if fresh:
        sessions.set_cookie(request, response, sessions.LOGIN_COOKIE, nonce, sessions.LOGIN_TTL_S)
    return response


@signed_in
async def approvals_page(request: Request, session: Session) -> Response:
    """Gates and interrupted steps that wait for a person, oldest first."""
    last_event = await request.app.state.store.max_event_id()  # first: see workflow_page
    items = await engine_of(request).approvals(limit=INBOX_PAGE)
    return await render(request, "approvals.html", session, items=items, last_event=last_event)


@signed_in
async def workflows_page(request: Request, session: Session) -> Response:
    """Workflows, newest first, filtered by status, PAGE_SIZE at a time."""
    status = request.query_params.get("status") or None
    if status not in set(WorkflowStatus):
        status = None
    before_raw = request.query_params.get("before", "")
    ok = before_raw.isascii() and before_raw.isdigit() and len(before_raw) < 19
    before = int(before_raw) if ok else None
    engine = engine_of(request)
    last_event = await engine.store.max_event_id()  # first: see workflow_page
    items = await engine.list(limit=PAGE_SIZE, status=status, before=before)
    return await render(
        request,
        "workflows.html",
        session,
        items=items,
        filter_status=status,
        statuses=[s.value for s in WorkflowStatus],
        waiting=await engine.store.waiting_among(w["id"] for w in items),
        before=before,
        older=items[-1]["id"] if len(items) == PAGE_SIZE else None,
        last_event=last_event,
    )


def step_tree(steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, Any]]:
    """The top-level steps, and each parallel's or map's inner steps by its step id."""
    top: list[dict[str, Any]] = []
    inner: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        parent = step.get("parent_id")
        if parent is None:
            top.append(step)
        else:
            inner.setdefault(parent, []).append(step)
    return top, inner


def fold(inner: dict[int, Any], step_id: int) -> dict[str, Any]:
    """What the row of a parallel or map step folds: its latest inner steps, how many there
    are by status, whether one needs attention (then the fold starts open)."""
    rows = inner.get(step_id, [])
    counts: dict[str, int] = {}
    attention = False
    stack = list(rows)
    while stack:  # nested parallels and maps count too
        row = stack.pop()
        status = graph.shown_status(row)
        counts[status] = counts.get(status, 0) + 1
        attention = attention or status in ("waiting", "decision", "failed")
        stack.extend(inner.get(row["id"], ()))
    return {
        "rows": rows[-INNER_ROWS:],
        "hidden": max(len(rows) - INNER_ROWS, 0),
        "total": len(rows),
        "counts": graph.counts_text(Counter(counts)),
        "open": attention,
    }


def state_ids(flow: Any) -> list[str]:
    """The top-level state ids of a stored flow (the choices for resuming from a state)."""
    try:
        raw = orjson.loads(orjson.dumps(flow)) if flow is not None else None
    except orjson.JSONDecodeError:
        return []
    return [str(k) for k, v in raw.items() if isinstance(v, dict)] if isinstance(raw, dict) else []


def editable_input(value: Any) -> str | None:
    """The input as indented JSON for the intervene form; None when it is too long to edit
    here (it is not parsed then)."""
    text = pretty(value) or "{}"
    return None if text.endswith(("more characters", "more bytes")) else text


async def run_origin(engine: Engine, wf: dict[str, Any]) -> dict[str, Any] | None:
    """For a run of a saved definition: the definition's id, name and the version it runs."""
    def_id = wf.get("definition_id")
    if def_id is None:
        return None
    name = wf.get("definition_name")
    if name is None:
        try:
            name = (await engine.defs.resolve(def_id)).name
        except NotFound:  # deleted since
            name = None
    return {"id": def_id, "name": name, "version": wf.get("definition_version")}


@signed_in
async def workflow_page(request: Request, session: Session) -> Response:
    """One workflow: its flow as a graph, its input, the timeline of steps (the latest
    STEP_ROWS, inner steps folded under their parallel or map), run control; updated live."""
    wf_id = request.path_params["id"]
    if wf_id > MAX_ID:
        return await not_found(request, session, f"There is no workflow {wf_id}.")
    # The last event first: anything committed after it reaches the page's live stream.
    log = await request.app.state.store.events(wf_id)
    try:
        wf = await engine_of(request).get(wf_id)
    except NotFound:
        return await not_found(request, session, f"There is no workflow {wf_id}.")
    steps = wf["steps"]
    for step in steps:  # the scope as a list (it comes as stored JSON)
        step["scope"] = list(graph.scope_of(step)) or None
    top, inner = step_tree(steps)
    raw = request.query_params.get("steps", "")
    shown = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 9 else STEP_ROWS
    shown = len(top) if raw == "all" else max(shown, STEP_ROWS)
    running = [s for s in steps if s["status"] == "running"]
    return await render(
        request,
        "workflow.html",
        session,
        wf=wf,
        steps=top[-shown:],
        older=max(len(top) - shown, 0),
        shown=shown,
        folds={parent: fold(inner, parent) for parent in inner},
        graph=graph.build(wf["flow"], steps, wf["status"], graph.item_totals(log)),
        states=state_ids(wf["flow"]),
        input_text=editable_input(wf["input"]),
        last_event=log[-1]["id"] if log else 0,
        waiting=any(s["awaiting"] in ("ready", "decision") for s in running),
        at_gate=any(s["awaiting"] == "ready" for s in running),
        origin=await run_origin(engine_of(request), wf),
    )


async def workflow_events(request: Request) -> Response:
    """The workflow's Server-Sent Events for the live page (401 without a session)."""
    if await sessions.current(request) is None:
        return PlainTextResponse("sign in first", status_code=401)
    wf_id = request.path_params["id"]
    if wf_id > MAX_ID:
        raise NotFound(f"workflow {wf_id} not found")
    # Unnamed events: EventSource hands those to `onmessage`; a named one reaches only
    # listeners for its name, and the page wants them all.
    return await events.response(request, wf_id, named=False)


async def all_events(request: Request) -> Response:
    """Every workflow's Server-Sent Events, for the live inbox and list (401 without a
    session): the pages reload their list when anything happens."""
    if await sessions.current(request) is None:
        return PlainTextResponse("sign in first", status_code=401)
    return await events.response(request, None, named=False)


async def not_found(
    request: Request, session: Session | None, text: str = "There is no such page."
) -> HTMLResponse:
    return await render(request, "message.html", session, status=404, title="Not found", text=text)


async def fallback(request: Request) -> Response:
    session = await sessions.current(request)
    if session is None and request.method == "GET":
        return login_redirect(request)
    if request.method not in ("GET", "HEAD"):
        return PlainTextResponse("not found", status_code=404)
    return await not_found(request, session)


ROUTES: list[BaseRoute] = [
    Route("/", home, methods=["GET"]),
    Route("/login", login_page, methods=["GET"]),
    Route("/approvals", approvals_page, methods=["GET"]),
    Route("/workflows", workflows_page, methods=["GET"]),
    Route("/workflows/{id:id}", workflow_page, methods=["GET"]),
    Route("/workflows/{id:id}/events", workflow_events, methods=["GET"]),
    Route("/events", all_events, methods=["GET"]),
    Route("/static/{name:path}", STATIC.serve, methods=["GET"], name="static"),
]
FALLBACK: list[BaseRoute] = [
    Route("/{path:path}", fallback, methods=["GET", "POST"]),
]
