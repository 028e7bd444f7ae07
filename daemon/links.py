"""One-click approve and reject links for gate_waiting notifications.

A link is signed, bound to one step and one decision, expiring, and single use. Opening
it (GET) only shows a confirmation page, because link previewers, mail scanners and chat
unfurlers fetch URLs; the form on that page POSTs back to the same URL, which decides as
LINK_TOKEN through the engine, so the gate's approvers and self-approval rules apply.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from itsdangerous import BadPayload, BadSignature
from jinja2 import Environment
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from daemon import assets, signing
from daemon import flow as flows
from daemon.bodies import parse_json, read_body
from daemon.config import Config, TokenConfig
from daemon.errors import PayloadTooLarge, StepdError
from daemon.limits import MAX_REASON, PRETTY_LIMIT
from daemon.models import Step, Workflow
from daemon.storage import LinkSpent, StorageUnavailable

log = logging.getLogger("stepd.links")
LINK_TOKEN = TokenConfig(name="link", sha256="0" * 64, permissions=("approve",))
DECISIONS = ("approve", "reject")
MAX_TOKEN = 1000  # characters; ours are about 140
MAX_FORM = 65_536  # bytes of a POSTed form
HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",  # the URL is the credential: never leak it onwards
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
}
# Read now, not when a page is served: see daemon.assets.
TEMPLATES = Environment(loader=assets.template_loader("daemon", "link_templates"), autoescape=True)


@dataclass(frozen=True)
class Link:
    step_id: int
    decision: str  # "approve" or "reject"
    expires: int  # epoch seconds
    nonce: str


class LinkError(Exception):
    """A link that cannot be used: rendered as a page with `status`."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


# -- tokens ----------------------------------------------------------------------------


def make_token(secret: bytes, link: Link) -> str:
    """The signed token of a link (`secret`: the server secret)."""
    body = {"s": link.step_id, "d": link.decision, "e": link.expires, "n": link.nonce}
    return signing.serializer(secret, "link").dumps(body)


def parse_token(secret: bytes, token: str) -> Link:
    """The link a token carries; LinkError 400 (malformed) or 403 (bad signature)."""
    if "." not in token or len(token) > MAX_TOKEN:
        raise LinkError(400, "Broken link", "This link is incomplete or malformed.")
    try:
        body = signing.serializer(secret, "link").loads(token)
    except BadPayload:  # signed by us, yet unreadable: cannot happen short of a bug
        raise LinkError(400, "Broken link", "This link is malformed.") from None
    except BadSignature:
        raise LinkError(403, "Invalid link", "This link's signature is not valid.") from None
    try:
        link = Link(body["s"], body["d"], body["e"], body["n"])
    except (TypeError, KeyError):
        raise LinkError(400, "Broken link", "This link is malformed.") from None
    if not (isinstance(link.step_id, int) and isinstance(link.expires, int)
            and link.decision in DECISIONS and isinstance(link.nonce, str)):  # fmt: skip
        raise LinkError(400, "Broken link", "This link is malformed.")
    return link


def make_links(
    config: Config, secret: bytes, step_id: int, now: float, *, gate_expires_ms: int | None = None
) -> dict[str, Any]:
    """Approve and reject URLs for a waiting gate (`secret`: the server secret).

    They expire after link_ttl_s, or with the gate if it expires sooner; `expires_at`
    is epoch milliseconds, like every time in stepd's JSON.
    """
    expires = int(now + config.link_ttl_s)
    if gate_expires_ms is not None:
        expires = min(expires, gate_expires_ms // 1000)
    base = config.public_url.rstrip("/")
    urls = {
        d: f"{base}/link/{make_token(secret, Link(step_id, d, expires, secrets.token_urlsafe(12)))}"
        for d in DECISIONS
    }
    return {**urls, "expires_at": expires * 1000}


# -- gate rules ------------------------------------------------------------------------


def _may_decide(
    state: dict[str, Any], who: str, perms: Iterable[str], created_by: str | None, config: Config
) -> bool:
    return flows.decision_refusal(
        state.get("approvers"), state.get("allow_self_approval"), who=who, permissions=perms,
        creator=created_by, self_default=config.allow_self_approval,
    ) is None  # fmt: skip


def admits_links(state: dict[str, Any], created_by: str | None, config: Config) -> bool:
    """Whether a gate (its raw flow state) lets LINK_TOKEN decide: the engine's rules."""
    return _may_decide(state, LINK_TOKEN.name, LINK_TOKEN.permissions, created_by, config)


def creator_may_decide(state: dict[str, Any], created_by: str | None, config: Config) -> bool:
    """Whether the workflow's creator may decide this gate itself. Only then may links go to
    the workflow's own notify_url: the creator chose it, so a link sent there is theirs."""
    if created_by is None:
        return _may_decide(state, "", (), created_by, config)
    perms = next((t.permissions for t in config.tokens if t.name == created_by), ())
    return _may_decide(state, created_by, perms, created_by, config)


# -- pages -----------------------------------------------------------------------------


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    return text if len(text) <= PRETTY_LIMIT else text[:PRETTY_LIMIT] + "\n… (cut)"


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


async def _context(request: Request) -> tuple[Link, Step, Workflow, dict[str, Any]]:
    """The link, its step and workflow, checked: signed, not expired, gate admits links."""
    app = request.app.state
    link = parse_token(signing.secret(app.config.state_dir), request.path_params["token"])
    if link.expires < time.time():
        raise LinkError(410, "Link expired", f"This link expired at {_when(link.expires)}.")
    step = await app.store.get_step(link.step_id)
    wf = None if step is None else await app.store.get_workflow(step.workflow_id)
    if step is None or wf is None:
        raise LinkError(404, "Not found", "This step no longer exists.")
    state = flows.raw_state(orjson.loads(wf.flow_json or "{}"), step.path, step.state)
    if step.tool is not None:
        raise LinkError(403, "Not allowed", "This step is not an approval gate.")
    if not admits_links(state, wf.created_by, app.config):
        raise LinkError(403, "Not allowed", "This gate does not accept decisions by link.")
    return link, step, wf, state


def _decided(step: Step) -> LinkError:
    by = f" by {step.decided_by}" if step.decided_by else ""
    text = f"This gate was already decided{by} (step status: {step.status}); nothing changed."
    return LinkError(409, "Already decided", text)


async def _confirm(request: Request, error: str | None = None, status: int = 200) -> Response:
    link, step, wf, _ = await _context(request)
    if step.awaiting != "ready":
        raise _decided(step)
    previous = [s for s in await request.app.state.store.steps(wf.id) if s.id < step.id]
    return page(
        "confirm.html",
        status,
        decision=link.decision,
        workflow=wf,
        step=step,
        input=_pretty(wf.input_json),
        previous=_pretty(previous[-1].result_json) if previous else None,
        previous_name=previous[-1].name if previous else None,
        expires=_when(link.expires),
        gate_expires=_when(step.expires_at / 1000) if step.expires_at else None,
        error=error,
    )


async def _read_form(request: Request) -> dict[str, str]:
    try:
        body = await read_body(request, MAX_FORM)
    except PayloadTooLarge:
        raise LinkError(413, "Too large", "The form is too large.") from None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise LinkError(400, "Bad form", "The form could not be read.") from None
    return {k: v for k, v in reversed(pairs)}  # the first value of each field wins


def _result(text: str) -> Any:
    """The optional JSON result of an approval, checked like an API body."""
    if not text.strip():
        return None
    try:
        return parse_json(text.encode())
    except StepdError as exc:
        raise ValueError(f"The result is not accepted: {exc.text}") from None


async def _decide(request: Request) -> Response:
    form = await _read_form(request)
    link, step, wf, _ = await _context(request)
    if form.get("decision") != link.decision:
        raise LinkError(400, "Wrong decision", f"This link can only {link.decision}.")
    reason = form.get("reason", "").strip()
    try:
        result = _result(form.get("result", "")) if link.decision == "approve" else None
    except ValueError as exc:
        return await _confirm(request, str(exc), 400)
    if link.decision == "reject" and not 0 < len(reason) <= MAX_REASON:
        return await _confirm(request, f"A rejection needs a reason (1 to {MAX_REASON}).", 400)
    store, engine = request.app.state.store, request.app.state.engine
    if await store.link_used(link.nonce):
        raise LinkError(409, "Link already used", "This link was already used; nothing changed.")
    if step.awaiting != "ready":
        raise _decided(step)
    try:  # the link is spent in the decision's own transaction: both happen, or neither
        if link.decision == "approve":
            await engine.approve(step.id, result, token=LINK_TOKEN, link_nonce=link.nonce)
        else:
            await engine.reject(step.id, reason, token=LINK_TOKEN, link_nonce=link.nonce)
    except LinkSpent:
        used = "This link was already used; nothing changed."
        raise LinkError(409, "Link already used", used) from None
    done = "approved" if link.decision == "approve" else "rejected"
    text = f"Gate '{step.name}' of workflow '{wf.name}' ({wf.id}) was {done}."
    return page("message.html", title=done.capitalize(), text=text)


async def endpoint(request: Request) -> Response:
    """GET: the confirmation page. POST: decide. Every failure is a page, never a 500."""
    try:
        if request.method == "POST":
            return await _decide(request)
        return await _confirm(request)
    except LinkError as exc:
        return page("message.html", exc.status, title=exc.title, text=exc.text)
    except StepdError as exc:  # the engine's 403 / 404 / 409, after its own checks
        titles = {403: "Not allowed", 404: "Not found", 409: "Already decided"}
        return page("message.html", exc.status, title=titles.get(exc.status, "Refused"),
                    text=f"{exc.text}; nothing changed.")  # fmt: skip
    except StorageUnavailable as exc:
        log.error("storage fault on a decision link: %s", exc)
        return page("message.html", 503, title="Try again later",
                    text="Storage is unavailable, so nothing was decided. Try again later; "
                         "if the link then says it was used, decide in stepd itself.")  # fmt: skip


def routes() -> list[BaseRoute]:
    return [Mount("/link", routes=[Route("/{token}", endpoint, methods=["GET", "POST"])])]
