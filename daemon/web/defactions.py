"""The Definitions page's forms: run, deploy, undeploy, arm, rollback, status. Every POST
checks its CSRF token (form_action) and needs `workflow` permission; each answers with a
redirect and a flash message, never a 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from daemon.auth import Authenticator
from daemon.errors import BadRequest, StepdError, Unprocessable
from daemon.ids import MAX_ID
from daemon.web import runform
from daemon.web.actions import Form, back, form_action
from daemon.web.defpages import STATUSES, as_dict, defs_of, number
from daemon.web.session import Session

Action = Callable[[Request, str, Form, Session], Awaitable[tuple[str | None, str]]]


def refusal(exc: StepdError) -> str:
    """A refused action's message, with every problem the service listed."""
    problems = exc.extra.get("errors") if exc.extra else None
    text = exc.text
    if isinstance(problems, list) and problems and str(problems[0]) not in text:
        text = f"{text}: {'; '.join(str(p) for p in problems[:10])}"
    if exc.status == 403:
        return f"You may not do this: {text}."
    if exc.status in (404, 409, 410, 422):
        return f"Nothing changed: {text}."
    return text


def version_of(form: Form, field: str = "version") -> int:
    chosen = number(form.get(field, ""), limit=MAX_ID)
    if chosen is None:
        raise BadRequest("choose a version")
    return chosen


async def run(request: Request, ref: str, form: Form, session: Session) -> tuple[str | None, str]:
    """Start a run of the chosen version with the input the form gives."""
    defs = defs_of(request)
    definition = await defs.get(ref, reveal=False)
    version = version_of(form) if form.get("version") else definition["version"]
    body = as_dict((await defs.version(ref, version))["definition"]) or {}
    data, problems = runform.read(body.get("input_schema"), form)
    if problems:
        raise Unprocessable("the form has problems: " + "; ".join(problems))
    run_id = await defs.start_run(ref, input_data=data, trigger="manual", version=version,
                                  by=session.token.name)  # fmt: skip
    return f"/ui/workflows/{run_id}", f"Started run {run_id} of {definition['name']} v{version}."


async def deploy(
    request: Request, ref: str, form: Form, session: Session
) -> tuple[str | None, str]:
    answer = await defs_of(request).deploy(ref)
    return None, f"Deployed: its webhook is {answer.get('url')}."


async def undeploy(
    request: Request, ref: str, form: Form, session: Session
) -> tuple[str | None, str]:
    await defs_of(request).undeploy(ref)
    return None, "Undeployed: its webhook no longer answers."


async def arm(request: Request, ref: str, form: Form, session: Session) -> tuple[str | None, str]:
    answer = await defs_of(request).arm(ref)
    return None, f"Armed: the webhook accepts one call until {answer.get('armed_until')}."


async def rollback(
    request: Request, ref: str, form: Form, session: Session
) -> tuple[str | None, str]:
    version = version_of(form)
    answer = await defs_of(request).rollback(ref, {"version": version}, by=session.token.name)
    made = answer.get("version") if isinstance(answer, dict) else None
    return None, f"Rolled back to version {version}" + (f" as version {made}." if made else ".")


async def set_status(
    request: Request, ref: str, form: Form, session: Session
) -> tuple[str | None, str]:
    status = form.get("status", "")
    if status not in STATUSES:
        raise BadRequest(f"the status must be one of {', '.join(STATUSES)}")
    await defs_of(request).set_status(ref, {"status": status})
    return None, f"The status is {status} now."


ACTIONS: dict[str, Action] = {"run": run, "deploy": deploy, "undeploy": undeploy, "arm": arm,
                              "rollback": rollback, "status": set_status}  # fmt: skip


@form_action
async def definition_action(request: Request, session: Session, form: Form) -> Response:
    """One of ACTIONS on a definition, then back to its page (or to the run) with a message."""
    def_id, action = request.path_params["id"], request.path_params["action"]
    here = f"/ui/definitions/{def_id}"
    try:
        Authenticator.require(session.token, "workflow")
        if action not in ACTIONS or def_id > MAX_ID:
            raise BadRequest("there is no such definition or action")
        where, done = await ACTIONS[action](request, str(def_id), form, session)
    except StepdError as exc:
        return back(request, form, here, "error", refusal(exc))
    return back(request, {**form, "next": where or form.get("next", "")}, here, "ok", done)


ROUTES: list[BaseRoute] = [
    Route("/definitions/{id:id}/{action:str}", definition_action, methods=["POST"]),
]
