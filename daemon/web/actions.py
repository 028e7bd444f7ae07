"""The forms: sign in and out, approve, reject, retry, fail, cancel, and run control (pause,
resume or redrive, intervene, signal). Every POST checks its CSRF token; decisions answer
with a redirect and a flash message, never a 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from daemon.auth import Authenticator
from daemon.bodies import parse_body, read_body
from daemon.config import TokenConfig
from daemon.errors import BadRequest, StepdError, Unprocessable, UnsupportedMediaType
from daemon.ids import MAX_ID
from daemon.limits import MAX_IDEMPOTENCY_KEY
from daemon.web import session as sessions
from daemon.web.pages import engine_of, login_form, render, safe_next, signed_in
from daemon.web.session import Session

MAX_FIELDS = 80  # a definition's Run form has a field per input property (up to 60)

Form = dict[str, str]


async def read_form(request: Request) -> Form:
    """A url-encoded form body, size-checked while reading; the first value of each field."""
    body = await read_body(request, request.app.state.config.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("forms must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(bytes(body).decode("utf-8"), keep_blank_values=True,
                          max_num_fields=MAX_FIELDS)  # fmt: skip
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form could not be read") from None
    form: Form = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


async def forbidden(request: Request, session: Session | None, text: str) -> Response:
    return await render(
        request, "message.html", session, status=403, title="Form expired", text=text
    )


CSRF_TEXT = (
    "This form has expired or did not come from this site, so nothing was changed. "
    "Go back, reload the page and try again."
)


def form_action(fn: Callable[[Request, Session, Form], Awaitable[Response]]) -> Any:
    """Route decorator for a signed-in form: reads the form and checks its CSRF token."""

    @signed_in
    async def endpoint(request: Request, session: Session) -> Response:
        try:
            form = await read_form(request)
        except StepdError as exc:
            return await render(request, "message.html", session, status=exc.status,
                                title="Bad form", text=exc.text)  # fmt: skip
        if not session.csrf_ok(request.app.state.config, form.get("csrf")):
            return await forbidden(request, session, CSRF_TEXT)
        return await fn(request, session, form)

    endpoint.__name__ = fn.__name__
    return endpoint


def back(request: Request, form: Form, default: str, kind: str, text: str) -> Response:
    response = RedirectResponse(safe_next(form.get("next"), default), status_code=303)
    sessions.set_flash(request, response, kind, text)
    return response


# -- sign in and out ---------------------------------------------------------------------------


async def login(request: Request) -> Response:
    """Check the pasted token; on success set the session cookie and go on."""
    config = request.app.state.config
    try:
        form = await read_form(request)
    except StepdError as exc:
        return await login_form(request, "/ui/approvals", error=exc.text, status=exc.status)
    next_url = safe_next(form.get("next"))
    nonce = request.cookies.get(sessions.LOGIN_COOKIE, "")
    if not sessions.login_csrf_ok(config, nonce, form.get("csrf")):
        return await login_form(
            request, next_url, status=403,
            error="The sign-in form expired. It has been renewed: paste the token again.",
        )  # fmt: skip
    token = sessions.identify(config, form.get("token", ""))
    if token is None:
        return await login_form(request, next_url, status=401, error="That token is not valid.")
    response = RedirectResponse(next_url, status_code=303)
    value = await sessions.issue(request.app.state.store, config, token)
    sessions.set_cookie(request, response, sessions.SESSION_COOKIE, value,
                        int(config.session_ttl_s))  # fmt: skip
    sessions.clear_cookie(request, response, sessions.LOGIN_COOKIE)
    return response


@form_action
async def logout(request: Request, session: Session, form: Form) -> Response:
    """End the session on the server (every copy of the cookie), then clear the cookie."""
    await sessions.end(request.app.state.store, session)
    response = RedirectResponse("/ui/login", status_code=303)
    sessions.clear_cookie(request, response, sessions.SESSION_COOKIE)
    sessions.set_flash(request, response, "ok", f"Signed out {session.token.name}.")
    return response


# -- decisions ---------------------------------------------------------------------------------


async def parse_result(form: Form) -> Any:
    """The approval's result: the JSON field, or None when it is empty."""
    raw = form.get("result", "").strip()
    if not raw:
        return None
    try:
        return await parse_body(raw.encode())
    except BadRequest as exc:
        raise BadRequest(f"The result was refused ({exc.text}); nothing was decided.") from None


def idempotency_key(form: Form) -> str | None:
    key = form.get("key") or None
    return key if key is None or len(key) <= MAX_IDEMPOTENCY_KEY else None


async def approve(request: Request, step_id: int, form: Form, token: TokenConfig) -> str:
    await engine_of(request).approve(
        step_id,
        await parse_result(form),
        token=token,
        idempotency_key=idempotency_key(form),
        comment=form.get("comment", "").strip() or None,
    )
    return "Approved"


async def reject(request: Request, step_id: int, form: Form, token: TokenConfig) -> str:
    reason = form.get("reason", "").strip()
    if not reason:
        raise BadRequest("A rejection needs a reason; nothing was decided.")
    await engine_of(request).reject(step_id, reason, token=token,
                                    idempotency_key=idempotency_key(form))  # fmt: skip
    return "Rejected"


async def retry(request: Request, step_id: int, form: Form, token: TokenConfig) -> str:
    await engine_of(request).retry(step_id, by=token.name)
    return "Queued again:"


async def fail(request: Request, step_id: int, form: Form, token: TokenConfig) -> str:
    reason = form.get("reason", "").strip() or None
    await engine_of(request).fail(step_id, reason, by=token.name)
    return "Failed"


DECISIONS = {"approve": approve, "reject": reject, "retry": retry, "fail": fail}


def friendly(exc: StepdError) -> str:
    if exc.status == 403:
        return f"You may not decide this: {exc.text}."
    if exc.status == 409:
        return f"Nothing changed: {exc.text} (someone may have decided it already)."
    if exc.status == 404:
        return f"Nothing changed: {exc.text}."
    return exc.text


@form_action
async def decide(request: Request, session: Session, form: Form) -> Response:
    """Approve, reject, retry or fail a waiting step, then go back with a message."""
    step_id, action = request.path_params["step_id"], request.path_params["action"]
    if action not in DECISIONS or step_id > MAX_ID:
        return back(request, form, "/ui/approvals", "error", "There is no such step or action.")
    step = await request.app.state.store.get_step(step_id)
    label = f"“{step.name}” of workflow {step.workflow_id}" if step else f"step {step_id}"
    try:
        Authenticator.require(session.token, "approve")
        done = await DECISIONS[action](request, step_id, form, session.token)
    except StepdError as exc:
        return back(request, form, "/ui/approvals", "error", friendly(exc))
    return back(request, form, "/ui/approvals", "ok", f"{done} {label}.")


@form_action
async def cancel(request: Request, session: Session, form: Form) -> Response:
    wf_id = request.path_params["id"]
    here = f"/ui/workflows/{wf_id}"
    try:
        Authenticator.require(session.token, "workflow")
        if wf_id > MAX_ID:
            raise BadRequest(f"there is no workflow {wf_id}")
        await engine_of(request).cancel(wf_id, by=session.token.name)
    except StepdError as exc:
        return back(request, form, here, "error", friendly(exc))
    return back(request, form, here, "ok", f"Cancelled workflow {wf_id}.")


# -- run control ---------------------------------------------------------------------------

MAX_SIGNAL_NAME = 200


def merge_patch(before: Any, after: Any) -> Any:
    """The RFC 7386 merge patch that turns `before` into `after`: changed and new keys,
    removed keys as null (objects recursively; anything else is replaced whole)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        if key not in before:
            patch[key] = value
        elif before[key] != value:
            patch[key] = merge_patch(before[key], value)
    return patch


async def parse_json_field(form: Form, field: str, what: str) -> Any:
    raw = form.get(field, "").strip()
    if not raw:
        return None
    try:
        return await parse_body(raw.encode())
    except BadRequest as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc.text}); nothing was changed.") from None


def control_refusal(exc: StepdError) -> str:
    if exc.status == 403:
        return f"You may not do this: {exc.text}."
    if exc.status in (404, 409, 422):
        return f"Nothing changed: {exc.text}."
    return exc.text


def reason_of(form: Form) -> str | None:
    return form.get("reason", "").strip() or None


async def pause_run(request: Request, wf_id: int, form: Form, by: str) -> str:
    await engine_of(request).pause(wf_id, by=by, reason=reason_of(form))
    return f"Paused workflow {wf_id}: nothing new starts until it is resumed."


async def resume_run(request: Request, wf_id: int, form: Form, by: str) -> str:
    from_step = form.get("from_step", "").strip() or None
    answer = await engine_of(request).resume(wf_id, by=by, from_step=from_step,
                                             reason=reason_of(form))  # fmt: skip
    redriven = answer is True  # a failed or cancelled workflow was redriven
    where = f" from {from_step}" if from_step else ""
    return f"{'Redriven' if redriven else 'Resumed'} workflow {wf_id}{where}."


async def intervene_run(request: Request, wf_id: int, form: Form, by: str) -> str:
    reason = reason_of(form)
    if reason is None:
        raise BadRequest("Changing the input needs a reason; nothing was changed.")
    new = await parse_json_field(form, "input", "The input")
    if not isinstance(new, dict):
        raise Unprocessable("the input must be a JSON object; nothing was changed")
    engine = engine_of(request)
    before = orjson.loads(orjson.dumps((await engine.get(wf_id))["input"]))
    patch = merge_patch(before, new)
    if not patch:
        return "The input is unchanged; nothing was done."
    await engine.intervene(wf_id, patch, by=by, reason=reason)
    return f"Changed the input of workflow {wf_id}."


async def signal_run(request: Request, wf_id: int, form: Form, by: str) -> str:
    name = form.get("name", "").strip()
    if not name or len(name) > MAX_SIGNAL_NAME:
        raise BadRequest(f"A signal needs a name of 1 to {MAX_SIGNAL_NAME} characters.")
    data = await parse_json_field(form, "data", "The signal's data")
    await engine_of(request).signal(wf_id, name, data, by=by)
    return f"Sent signal “{name}” to workflow {wf_id}."


RUN_CONTROL = {"pause": pause_run, "resume": resume_run, "intervene": intervene_run,
               "signal": signal_run}  # fmt: skip


@form_action
async def control(request: Request, session: Session, form: Form) -> Response:
    """Pause, resume (or redrive), intervene or signal, then back with a message."""
    wf_id, action = request.path_params["id"], request.path_params["action"]
    here = f"/ui/workflows/{wf_id}"
    try:
        Authenticator.require(session.token, "workflow")
        if action not in RUN_CONTROL or wf_id > MAX_ID:
            raise BadRequest("there is no such workflow or action")
        done = await RUN_CONTROL[action](request, wf_id, form, session.token.name)
    except StepdError as exc:
        return back(request, form, here, "error", control_refusal(exc))
    return back(request, form, here, "ok", done)


ROUTES: list[BaseRoute] = [
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/steps/{step_id:id}/{action:str}", decide, methods=["POST"]),
    Route("/workflows/{id:id}/cancel", cancel, methods=["POST"]),
    Route("/workflows/{id:id}/{action:str}", control, methods=["POST"]),
]
