"""The web pages over httpx: sessions, CSRF, every page with and without data, the forms."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon import signing
from daemon.api import create_app
from daemon.auth import server_secret
from daemon.web import pages
from daemon.web import session as sessions
from tests import backend
from tests.helpers import TOKENS, make_config, wait_for, waiting_gate
from tests.test_recovery import CHARGE, MODULES, interrupted_workflow


@pytest.fixture
async def web(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: no bearer token, keeps cookies."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stepd"
    ) as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([A-Za-z0-9_-]+)"', html)
    assert found, html
    return found.group(1)


async def sign_in(web: httpx.AsyncClient, name: str = "approver") -> str:
    """Sign in through the form; the CSRF token of the signed-in pages."""
    page = await web.get("/ui/login")
    form = {"csrf": csrf_of(page.text), "token": TOKENS[name][0], "next": "/ui/approvals"}
    resp = await web.post("/ui/login", data=form)
    assert resp.status_code == 303, resp.text
    inbox = await web.get("/ui/approvals")
    assert inbox.status_code == 200
    return csrf_of(inbox.text)


def gate_body(name: str = "gated", **gate: Any) -> dict[str, Any]:
    return {
        "name": name,
        "flow": {
            "start": {"name": "review", "tool": None, "next": "after", **gate},
            "after": {"tool": "echo", "args": {"got": "<<result>>"}, "done": True},
        },
        "input": {"title": "New Policy"},
    }


async def create_gate(
    client: httpx.AsyncClient, name: str = "gated", **gate: Any
) -> tuple[int, int]:
    """A workflow waiting at its gate: (workflow id, step id)."""
    resp = await client.post("/api/workflow", json=gate_body(name, **gate))
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    step = waiting_gate(wf)
    assert step is not None
    return wf_id, step["id"]


def cookie_header(resp: httpx.Response, name: str) -> str:
    for value in resp.headers.get_list("set-cookie"):
        if value.startswith(f"{name}="):
            return value
    raise AssertionError(f"no {name} cookie in {resp.headers.get_list('set-cookie')}")


# -- signing in and out --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ui/approvals", "/ui/workflows", "/ui/workflows/1",
                                  "/ui/workflows?status=failed", "/ui/nowhere"])  # fmt: skip
async def test_pages_redirect_to_sign_in_when_not_signed_in(web, path):
    resp = await web.get(path)
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("/ui/login?next=/ui/")
    assert (await web.get("/ui/")).headers["location"] == "/ui/approvals"


async def test_sign_in_sets_a_strict_httponly_session_cookie(web, config):
    page = await web.get("/ui/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    login_cookie = cookie_header(page, sessions.LOGIN_COOKIE).lower()
    assert "httponly" in login_cookie and "samesite=strict" in login_cookie
    resp = await web.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "tok-james",
                                             "next": "/ui/workflows"})  # fmt: skip
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/workflows"
    cookie = cookie_header(resp, sessions.SESSION_COOKIE)
    flags = [f.strip().lower() for f in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert f"max-age={int(config.session_ttl_s)}" in flags
    assert "secure" not in flags  # plain http here
    assert "tok-james" not in cookie
    page = await web.get("/ui/workflows")
    assert page.status_code == 200 and ">james</span>" in page.text


async def test_the_session_cookie_is_secure_over_https(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://stepd") as web:
        page = await web.get("/ui/login")
        resp = await web.post("/ui/login", data={"csrf": csrf_of(page.text),
                                                 "token": "tok-james"})  # fmt: skip
        assert "secure" in cookie_header(resp, sessions.SESSION_COOKIE).lower()


async def test_a_bad_token_is_refused_with_401(web):
    page = await web.get("/ui/login")
    resp = await web.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "nope"})
    assert resp.status_code == 401
    assert "That token is not valid." in resp.text
    assert sessions.SESSION_COOKIE not in resp.cookies
    assert (await web.get("/ui/approvals")).status_code == 303


@pytest.mark.parametrize("csrf", [None, "", "0" * 64])
async def test_sign_in_without_its_csrf_token_is_refused(web, csrf):
    await web.get("/ui/login")  # the nonce cookie
    form = {"token": "tok-james"} | ({} if csrf is None else {"csrf": csrf})
    resp = await web.post("/ui/login", data=form)
    assert resp.status_code == 403 and "expired" in resp.text
    assert sessions.SESSION_COOKIE not in resp.cookies


async def test_sign_in_needs_the_nonce_cookie_too(web):
    page = await web.get("/ui/login")
    web.cookies.clear()
    resp = await web.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "tok-james"})
    assert resp.status_code == 403


@pytest.mark.parametrize("next_url", ["https://evil.example/", "//evil.example/ui/",
                                      "/api/workflow", "/ui//evil.example"])  # fmt: skip
async def test_sign_in_goes_only_to_pages_of_this_site(web, next_url):
    page = await web.get("/ui/login")
    resp = await web.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "tok-james",
                                             "next": next_url})  # fmt: skip
    assert resp.headers["location"] == "/ui/approvals"


async def test_sign_out_ends_the_session(web):
    csrf = await sign_in(web)
    refused = await web.post("/ui/logout", data={"csrf": "0" * 64})
    assert refused.status_code == 403
    assert (await web.get("/ui/approvals")).status_code == 200  # still signed in
    resp = await web.post("/ui/logout", data={"csrf": csrf})
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login"
    assert "max-age=0" in cookie_header(resp, sessions.SESSION_COOKIE).lower()
    page = await web.get("/ui/login")
    assert "Signed out approver." in page.text
    assert (await web.get("/ui/approvals")).status_code == 303


async def test_sign_out_ends_every_copy_of_the_session(app, web):
    csrf = await sign_in(web)
    copied = {"Cookie": f"{sessions.SESSION_COOKIE}={web.cookies[sessions.SESSION_COOKIE]}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as other:
        assert (await other.get("/ui/approvals", headers=copied)).status_code == 200
        resp = await web.post("/ui/logout", data={"csrf": csrf})
        assert resp.status_code == 303
        for path in ("/ui/approvals", "/ui/workflows"):
            resp = await other.get(path, headers=copied)
            assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
        assert 'name="token"' in (await other.get("/ui/login", headers=copied)).text
        assert (await other.get("/ui/workflows/1/events", headers=copied)).status_code == 401
        refused = await other.post("/ui/logout", headers=copied, data={"csrf": csrf})
        assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/login")


async def test_a_session_ends_when_its_token_is_removed_or_rotated(app, web, config):
    await sign_in(web, "approver")
    others = tuple(t for t in config.tokens if t.name != "approver")
    app.state.config = replace(config, tokens=others)
    resp = await web.get("/ui/approvals")
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    assert "max-age=0" in cookie_header(resp, sessions.SESSION_COOKIE).lower()

    app.state.config = config
    await sign_in(web, "approver")
    rotated = tuple(replace(t, sha256="ab" * 32) if t.name == "approver" else t
                    for t in config.tokens)  # fmt: skip
    app.state.config = replace(config, tokens=rotated)
    assert (await web.get("/ui/approvals")).status_code == 303


async def test_expired_and_forged_sessions_do_not_work(app, web, config):
    store, token = app.state.store, config.tokens[0]
    expired = await sessions.issue(store, config, token, now=0)
    forged = (await sessions.issue(store, config, token))[:-4] + "AAAA"
    other_key = await sessions.issue(
        store, replace(config, state_dir=config.state_dir / "other"), token
    )
    session_id = (await sessions.issue(store, config, token)).rpartition(".")[0]
    for_a_flash = signing.timed_serializer(sessions.secret(config), "flash").dumps(session_id)
    for_csrf = signing.signer(sessions.secret(config), "csrf").sign(session_id).decode()
    for value in (expired, forged, other_key, session_id, for_a_flash, for_csrf, "garbage",
                  "a.b.c", "x" * 5000):  # fmt: skip
        resp = await web.get("/ui/approvals", headers={"Cookie": f"stepd_session={value}"})
        assert resp.status_code == 303, value
    good = await sessions.issue(store, config, token)
    resp = await web.get("/ui/approvals", headers={"Cookie": f"stepd_session={good}"})
    assert resp.status_code == 200


async def test_session_cookies_of_the_old_format_no_longer_work(web, config):
    # The earlier hand-made format: base64url(JSON) + "." + hex HMAC("session\0" + body).
    data = {"n": "james", "h": config.tokens[0].sha256[:16], "exp": int(time.time()) + 3600}
    body = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()
    key = server_secret(config.state_dir)
    mac = hmac.new(key, f"session\x00{body}".encode(), hashlib.sha256).hexdigest()
    resp = await web.get("/ui/approvals", headers={"Cookie": f"stepd_session={body}.{mac}"})
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")


async def test_the_database_keeps_session_hashes_and_forgets_expired_ones(app, web, config):
    store, token = app.state.store, config.tokens[0]
    await sessions.issue(store, config, token, now=time.time() - 2 * config.session_ttl_s)
    await sign_in(web)
    session_id = web.cookies[sessions.SESSION_COOKIE].rpartition(".")[0]
    rows = backend.query(config.db_path, "SELECT id_hash, token_name FROM web_sessions")
    assert rows == [(hashlib.sha256(session_id.encode()).hexdigest(), "approver")]


# -- pages -----------------------------------------------------------------------------------


async def test_empty_pages_say_what_to_do(web):
    await sign_in(web)
    inbox = await web.get("/ui/approvals")
    assert "Nothing is waiting for you." in inbox.text and '"tool": null' in inbox.text
    listing = await web.get("/ui/workflows")
    assert "No workflows yet." in listing.text and "stepd submit" in listing.text
    filtered = await web.get("/ui/workflows?status=failed")
    assert "No failed workflows." in filtered.text
    missing = await web.get("/ui/workflows/12345")
    assert missing.status_code == 404 and "There is no workflow 12345." in missing.text
    huge = await web.get(f"/ui/workflows/{1 << 64}")
    assert huge.status_code == 404
    assert (await web.get("/ui/workflows/" + "9" * 5000)).status_code == 404
    assert (await web.get("/ui/workflows/" + "9" * 5000 + "/events")).status_code == 404
    unknown = await web.get("/ui/no/such/page")
    assert unknown.status_code == 404 and "There is no such page." in unknown.text


async def test_pages_show_workflows_gates_and_steps(web, client):
    wf_id, step_id = await create_gate(client, "Publish the policy")
    done = await client.post("/api/workflow", json={"name": "quick", "flow": {
        "start": {"tool": "echo", "args": {"n": 7}, "done": True}}})  # fmt: skip
    await wait_for(client, done.json()["id"])
    await sign_in(web)

    inbox = (await web.get("/ui/approvals")).text
    assert "Publish the policy" in inbox and f'href="/ui/workflows/{wf_id}"' in inbox
    assert f'action="/ui/steps/{step_id}/approve"' in inbox
    assert f'action="/ui/steps/{step_id}/reject"' in inbox
    assert "by james" in inbox and "&#34;title&#34;: &#34;New Policy&#34;" in inbox
    assert 'id="inbox-count">1<' in inbox
    assert re.search(r'<time data-ms="\d+"', inbox)

    listing = (await web.get("/ui/workflows")).text
    assert "Publish the policy" in listing and "quick" in listing
    assert 'class="badge s-waiting"' in listing and 'class="badge s-completed"' in listing
    running = (await web.get("/ui/workflows?status=running")).text
    assert "Publish the policy" in running and ">quick<" not in running

    detail = await web.get(f"/ui/workflows/{wf_id}")
    assert detail.status_code == 200
    assert '<span id="wf-status" class="badge s-running">running</span>' in detail.text
    assert f'data-events="/ui/workflows/{wf_id}/events?after=' in detail.text
    assert f'action="/ui/steps/{step_id}/approve"' in detail.text
    finished = (await web.get(f"/ui/workflows/{done.json()['id']}")).text
    assert "data-events" not in finished  # nothing more will happen: no live stream
    assert "&#34;n&#34;: 7" in finished


async def test_pages_send_security_headers_and_static_files(web):
    await sign_in(web)
    resp = await web.get("/ui/approvals")
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    assert resp.headers["cache-control"] == "no-store"
    for name in ("app.css", "app.js", "icon.svg"):
        assert (await web.get(f"/ui/static/{name}")).status_code == 200


async def test_names_are_escaped(web, client):
    evil = "<script>alert(1)</script>"
    wf_id, _ = await create_gate(client, evil)
    await sign_in(web)
    for path in ("/ui/approvals", "/ui/workflows", f"/ui/workflows/{wf_id}"):
        text = (await web.get(path)).text
        assert evil not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path


# -- decisions -------------------------------------------------------------------------------


async def test_approve_through_the_form_with_a_result_and_a_comment(web, client):
    wf_id, step_id = await create_gate(client)
    csrf = await sign_in(web)
    resp = await web.post(f"/ui/steps/{step_id}/approve", data={
        "csrf": csrf, "next": f"/ui/workflows/{wf_id}", "key": "k1",
        "result": '{"approved": true}', "comment": "fine by me"})  # fmt: skip
    assert resp.status_code == 303 and resp.headers["location"] == f"/ui/workflows/{wf_id}"
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert wf["steps"][0]["decided_by"] == "approver"
    assert wf["steps"][0]["result_json"] == '{"approved":true}'
    assert wf["steps"][0]["reason"] == "fine by me"
    page = await web.get(f"/ui/workflows/{wf_id}")
    assert f"Approved “review” of workflow {wf_id}." in page.text
    assert "max-age=0" in cookie_header(page, sessions.FLASH_COOKIE).lower()
    again = await web.get(f"/ui/workflows/{wf_id}")
    assert "Approved “review”" not in again.text  # a flash shows once

    # The same form sent twice (a double click) is answered as the first time.
    form = {"csrf": csrf, "key": "k1", "result": '{"approved": true}', "comment": "fine by me"}
    repeat = await web.post(f"/ui/steps/{step_id}/approve", data=form)
    assert "Approved" in (await web.get(repeat.headers["location"])).text


async def test_approve_without_a_result(web, client):
    wf_id, step_id = await create_gate(client)
    csrf = await sign_in(web)
    await web.post(f"/ui/steps/{step_id}/approve", data={"csrf": csrf})
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["steps"][0]["result_json"] is None


async def test_reject_through_the_form(web, client):
    wf_id, step_id = await create_gate(client)
    csrf = await sign_in(web)
    resp = await web.post(f"/ui/steps/{step_id}/reject", data={
        "csrf": csrf, "reason": "  too risky ", "next": "/ui/approvals"})  # fmt: skip
    assert resp.headers["location"] == "/ui/approvals"
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed"
    assert wf["steps"][0]["reason"] == "too risky"
    page = (await web.get(f"/ui/workflows/{wf_id}")).text
    assert (
        "rejected by approver: too risky" in page and "Decided by <strong>approver</strong>" in page
    )


async def test_only_flash_messages_signed_as_such_are_shown(web, config):
    await sign_in(web)
    key = sessions.secret(config)
    message = ["ok", "Planted message"]
    planted = [
        base64.urlsafe_b64encode(orjson.dumps(message)).decode(),  # unsigned
        signing.serializer(key, "link").dumps(message),  # signed for another use
        signing.timed_serializer(b"another daemon", "flash").dumps(message),
    ]
    for value in planted:
        web.cookies.set(sessions.FLASH_COOKIE, value, path="/ui")
        assert "Planted message" not in (await web.get("/ui/approvals")).text, value
    web.cookies.set(sessions.FLASH_COOKIE, signing.timed_serializer(key, "flash").dumps(message),
                    path="/ui")  # fmt: skip
    assert "Planted message" in (await web.get("/ui/approvals")).text


@pytest.mark.parametrize(("action", "form", "message"), [
    ("reject", {"reason": "   "}, "A rejection needs a reason"),
    ("approve", {"result": "{nope"}, "The result was refused (invalid JSON"),
    ("approve", {"result": '{"a": 1, "a": 2}'}, "duplicate key"),
    ("approve", {"result": "[" * 70 + "]" * 70}, "nested more than"),
    ("explode", {}, "There is no such step or action."),
])  # fmt: skip
async def test_bad_forms_change_nothing_and_say_why(web, client, action, form, message):
    wf_id, step_id = await create_gate(client)
    csrf = await sign_in(web)
    resp = await web.post(f"/ui/steps/{step_id}/{action}", data={"csrf": csrf, **form})
    assert resp.status_code == 303
    page = await web.get(resp.headers["location"])
    assert page.status_code == 200 and message in page.text and 'class="flash error"' in page.text
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert waiting_gate(wf) is not None


@pytest.mark.parametrize("csrf", [None, "", "f" * 64, "james"])
@pytest.mark.parametrize("action", ["approve", "reject"])
async def test_decisions_without_the_csrf_token_are_refused(web, client, app, csrf, action):
    wf_id, step_id = await create_gate(client)
    await sign_in(web)
    if csrf == "james":  # a genuine CSRF token, of someone else's session
        config, store = app.state.config, app.state.store
        value = await sessions.issue(store, config, config.tokens[0])
        other = await sessions.load(store, config, value)
        assert other is not None
        csrf = other.csrf(config)
    form = {"reason": "no", "result": "1"} | ({} if csrf is None else {"csrf": csrf})
    resp = await web.post(f"/ui/steps/{step_id}/{action}", data=form)
    assert resp.status_code == 403 and "nothing was changed" in resp.text
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert waiting_gate(wf) is not None


async def test_a_form_must_be_url_encoded(web, client):
    _, step_id = await create_gate(client)
    csrf = await sign_in(web)
    resp = await web.post(f"/ui/steps/{step_id}/approve", json={"csrf": csrf})
    assert resp.status_code == 415


async def test_engine_refusals_show_a_friendly_message(web, client, make_app):
    wf_id, step_id = await create_gate(client, approvers=["someone-else"])
    csrf = await sign_in(web)
    resp = await web.post(f"/ui/steps/{step_id}/approve", data={"csrf": csrf})
    page = await web.get(resp.headers["location"])
    assert "You may not decide this: &#39;approver&#39; is not among the approvers" in page.text
    assert "approvers: someone-else" in page.text

    other_wf, other_step = await create_gate(client)
    await client.post(f"/api/workflow/{other_step}/ready")
    resp = await web.post(f"/ui/steps/{other_step}/reject", data={"csrf": csrf, "reason": "x"})
    page = await web.get(resp.headers["location"])
    assert page.status_code == 200 and "Nothing changed: step" in page.text
    assert "someone may have decided it already" in page.text
    resp = await web.post("/ui/steps/999/approve", data={"csrf": csrf})
    assert "Nothing changed: step 999 not found" in (await web.get(resp.headers["location"])).text


async def test_only_workflow_tokens_see_and_use_cancel(web, client, app):
    wf_id, _ = await create_gate(client)
    csrf = await sign_in(web, "approver")
    page = (await web.get(f"/ui/workflows/{wf_id}")).text
    assert "Cancel workflow" not in page
    resp = await web.post(f"/ui/workflows/{wf_id}/cancel", data={"csrf": csrf})
    page = (await web.get(resp.headers["location"])).text
    assert "lacks the &#39;workflow&#39; permission" in page
    assert (await client.get(f"/api/workflow/{wf_id}")).json()["status"] == "running"

    web.cookies.clear()
    csrf = await sign_in(web, "james")
    page = (await web.get(f"/ui/workflows/{wf_id}")).text
    assert "Cancel workflow" in page
    refused = await web.post(f"/ui/workflows/{wf_id}/cancel", data={})
    assert refused.status_code == 403
    resp = await web.post(f"/ui/workflows/{wf_id}/cancel", data={"csrf": csrf})
    assert resp.headers["location"] == f"/ui/workflows/{wf_id}"
    assert f"Cancelled workflow {wf_id}." in (await web.get(resp.headers["location"])).text
    assert (await client.get(f"/api/workflow/{wf_id}")).json()["status"] == "cancelled"


async def test_retry_and_fail_interrupted_steps(tmp_path: Path):
    first = await interrupted_workflow(tmp_path / "stepd.db", CHARGE)
    second = await interrupted_workflow(tmp_path / "stepd.db", CHARGE)
    app = create_app(make_config(tmp_path, tool_modules=MODULES))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://stepd") as web,
            httpx.AsyncClient(
                transport=transport,
                base_url="http://stepd",
                headers={"Authorization": "Bearer tok-james"},
            ) as client,  # fmt: skip
        ):
            steps = []
            for wf_id in (first, second):
                wf = await wait_for(
                    client, wf_id, lambda w: w["steps"][0]["awaiting"] == "decision"
                )
                steps.append(wf["steps"][0]["id"])
            csrf = await sign_in(web)
            inbox = (await web.get("/ui/approvals")).text
            assert inbox.count("needs a decision") == 2
            assert f'action="/ui/steps/{steps[0]}/retry"' in inbox
            assert f'action="/ui/steps/{steps[1]}/fail"' in inbox
            assert "interrupted" in inbox

            await web.post(f"/ui/steps/{steps[0]}/retry", data={"csrf": csrf})
            await web.post(f"/ui/steps/{steps[1]}/fail", data={"csrf": csrf, "reason": "ran"})
            assert (await wait_for(client, first))["steps"][0]["status"] == "done"
            failed = await wait_for(client, second)
            assert failed["steps"][0]["error"] == "failed by approver: ran"


# -- the live stream ---------------------------------------------------------------------------


async def test_the_event_stream_needs_a_session_and_sends_unnamed_events(web, client):
    wf_id, step_id = await create_gate(client)
    assert (await web.get(f"/ui/workflows/{wf_id}/events")).status_code == 401
    await client.post(f"/api/workflow/{step_id}/ready")
    await wait_for(client, wf_id)
    await sign_in(web)
    resp = await web.get(f"/ui/workflows/{wf_id}/events")  # finished: the stream ends
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert "event:" not in resp.text
    assert '"type":"gate_waiting"' in resp.text and '"type":"completed"' in resp.text
    assert (await web.get("/ui/workflows/999/events")).status_code == 404


# -- helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("delta_s", "text"), [
    (0, "just now"), (42, "42 s ago"), (5 * 60, "5 min ago"), (3 * 3600, "3 h ago"),
    (2 * 86400, "2 d ago"), (-120, "in 2 min"), (40 * 86400, "2026-01-01"),
])  # fmt: skip
def test_relative_times(delta_s, text):
    then = 1767225600000  # 2026-01-01T00:00:00Z
    assert pages.ago(then, then + delta_s * 1000) == text


def test_durations_and_pretty_json():
    assert [pages.duration(ms) for ms in (40, 12_400, 185_000, 7_800_000)] == [
        "< 0.1 s", "12 s", "3 min 5 s", "2 h 10 min"]  # fmt: skip
    assert pages.pretty('{"a":[1,2]}') == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert pages.pretty("not json") == "not json"
    assert pages.pretty(None) == ""
    assert pages.pretty('"' + "x" * 30_000 + '"').endswith("more characters")


@pytest.mark.parametrize("value", ["²", "x", "99999999999999999999"])
async def test_a_bad_paging_cursor_is_ignored_not_a_500(web, value):
    await sign_in(web)
    resp = await web.get("/ui/workflows", params={"before": value})
    assert resp.status_code == 200
    resp = await web.get("/ui/workflows/1/events", params={"after": value})
    assert resp.status_code in (400, 404)
