"""The auth matrix over every route, identities recorded, and the Authenticator itself."""

from __future__ import annotations

import hmac
import re
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon import openapi
from daemon.auth import (
    GENERATED_TOKEN_FILE,
    Authenticator,
    active_tokens,
    hash_token,
)
from daemon.config import TokenConfig
from daemon.errors import Forbidden, Unauthorized
from daemon.notify import sign
from tests.helpers import auth, wait_for, waiting_gate

ECHO_BODY = {
    "name": "auth-echo",
    "flow": {"start": {"name": "s", "tool": "echo", "args": {"x": 1}, "done": True}},
    "input": {},
}
GATE_BODY = {
    "name": "auth-gate",
    "flow": {
        "start": {"name": "gate", "tool": None, "args": {}, "next": "after"},
        "after": {"name": "after", "tool": "echo", "args": {"ok": True}, "done": True},
    },
    "input": {},
}

DEFINITION = {"name": "d", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}
OTHER_DEFINITION = {**DEFINITION, "name": "d2"}
IMPORT = {"stepd_export": 1, "workflows": [{"name": "d3", "versions": [
    {"definition": {**DEFINITION, "name": "d3"}}]}]}  # fmt: skip

TEMPLATE = "fetch-and-notify"
YEARLY = {"cron_expression": "0 0 1 1 *"}  # never fires while a test runs
BACKFILL = {"start": "2020-01-01T00:00:00Z", "end": "2020-01-02T00:00:00+00:00"}  # one tick
# Routes that land later (synchronous execution and run streams): the 401 matrix holds
# them now (the bearer check comes before routing); the approver and workflow-token tests
# run them once the document has them (it has every served route and nothing else).
# (method, path, body, documented path, workflow token's status, approver may)
UPCOMING: list[tuple[str, str, Any, str, int, bool]] = [
    ("POST", "/api/workflows/{def}/execute", {"variables": {}},
     "/api/workflows/{ref}/execute", 200, False),
    ("POST", "/api/workflows/{def}/execute/stream", {"variables": {}},
     "/api/workflows/{ref}/execute/stream", 200, False),
    ("GET", "/api/workflows/runs/{run}/stream", None,
     "/api/workflows/runs/{run_id}/stream", 200, True),
]  # fmt: skip
DOCUMENTED = openapi.document()["paths"]


def upcoming(who: str) -> list[Any]:
    """Test parameters of the UPCOMING routes, skipped while a route is not served: for
    "forbidden" those the approver may not call (method, path, body); for "approver" those
    it may (..., 200); for "workflow" all, with the workflow token's status."""
    out = []
    for method, path, body, documented, code, may in UPCOMING:
        if who == "forbidden" and may or who == "approver" and not may:
            continue
        status = {"forbidden": (), "approver": (200,), "workflow": (code,)}[who]
        served = method.lower() in DOCUMENTED.get(documented, {})
        mark = pytest.mark.skipif(not served, reason="not served yet")
        out.append(pytest.param(method, path, body, *status, id=f"{method} {path}", marks=mark))
    return out


def params(rows: list[Any]) -> list[Any]:
    """pytest parameters named "METHOD path"."""
    # (a pytest.param is a named tuple: only plain tuples are wrapped)
    return [pytest.param(*r, id=f"{r[0]} {r[1]}") if type(r) is tuple else r
            for r in rows]  # fmt: skip


# (method, path template, JSON body); {wf} and {step} are a running gated workflow, {def}
# the id of the saved definition "d", {run} a run of it that completed, {sched} a schedule
# of it.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/workflow", None),
    ("POST", "/api/workflow", ECHO_BODY),
    ("GET", "/api/workflow/{wf}", None),
    ("DELETE", "/api/workflow/{wf}", None),
    ("POST", "/api/workflow/{step}/ready", None),
    ("POST", "/api/workflow/validate", ECHO_BODY),
    ("GET", "/api/tools", None),
    ("GET", "/api/schema/flow", None),
    ("GET", "/api/unknown", None),
    ("GET", "/", None),
    ("POST", "/api/workflow/{wf}/nope", None),
    # saved definitions
    ("GET", "/api/workflows", None),
    ("POST", "/api/workflows", {"definition": OTHER_DEFINITION}),
    ("POST", "/api/workflows/validate", {"definition": OTHER_DEFINITION}),
    ("GET", "/api/workflows/export", None),
    ("POST", "/api/workflows/import", IMPORT),
    ("GET", "/api/workflows/runs/{run}", None),
    ("DELETE", "/api/workflows/runs/{run}", None),
    ("POST", "/api/workflows/runs/{run}/cancel", None),
    ("POST", "/api/workflows/runs/{run}/resume", None),
    ("GET", "/api/workflows/{def}", None),
    ("GET", "/api/workflows/d", None),
    ("PUT", "/api/workflows/{def}", {"definition": {**DEFINITION, "description": "v2"}}),
    ("DELETE", "/api/workflows/{def}", None),
    ("PATCH", "/api/workflows/{def}/status", {"status": "paused"}),
    ("GET", "/api/workflows/{def}/versions", None),
    ("GET", "/api/workflows/{def}/versions/1", None),
    ("GET", "/api/workflows/{def}/diff?v1=1&v2=1", None),
    ("POST", "/api/workflows/{def}/rollback", {"version": 1}),
    ("POST", "/api/workflows/{def}/run", {"input_data": {}}),
    ("GET", "/api/workflows/{def}/runs", None),
    ("POST", "/api/workflows/{def}/deploy", None),
    ("POST", "/api/workflows/{def}/undeploy", None),
    ("POST", "/api/workflows/{def}/arm", None),
    ("GET", "/api/workflows/{def}/export", None),
    ("GET", "/api/workflows/{def}/nope", None),
    ("GET", "/api/workflows/templates", None),
    ("GET", f"/api/workflows/templates/{TEMPLATE}", None),
    ("POST", f"/api/workflows/templates/{TEMPLATE}/install", {"name": "installed"}),
    # schedules, and the recurring shape
    ("GET", "/api/workflows/{def}/schedules", None),
    ("POST", "/api/workflows/{def}/schedules", YEARLY),
    ("GET", "/api/workflows/schedules/{sched}", None),
    ("PATCH", "/api/workflows/schedules/{sched}", {"paused": True}),
    ("DELETE", "/api/workflows/schedules/{sched}", None),
    ("GET", "/api/workflows/schedules/{sched}/ticks", None),
    ("POST", "/api/workflows/schedules/{sched}/trigger", None),
    ("POST", "/api/workflows/schedules/{sched}/backfill", BACKFILL),
    ("GET", "/api/workflows/recurring", None),
    ("POST", "/api/workflows/recurring", {"workflow": "d", **YEARLY}),
    ("DELETE", "/api/workflows/recurring/{sched}", None),
    *[r[:3] for r in UPCOMING],
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ROUTES]

BAD_HEADERS = {
    "missing": None,
    "wrong-token": "Bearer not-a-token",
    "basic": "Basic x",
    "basic-with-real-token": "Basic tok-james",
    "bearer-no-token": "Bearer",
    "bearer-blank": "Bearer   ",
    "token-without-scheme": "tok-james",
    "token-with-suffix": "Bearer tok-james extra",
}


def headers_for(value: str | None) -> dict[str, str]:
    # An explicit header set per request; `client`'s default Authorization is replaced.
    return {"Authorization": value} if value is not None else {}


async def request(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    ids: dict[str, int],
) -> httpx.Response:
    url = path.format(**ids)
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return await client.request(method, url, **kwargs)


async def count(client: httpx.AsyncClient) -> int:
    resp = await client.get("/api/workflow", params={"limit": 1000}, headers=auth("james"))
    assert resp.status_code == 200, resp.text
    return len(resp.json())


@pytest.fixture
async def gated(client: httpx.AsyncClient) -> dict[str, int]:
    """A running workflow whose gate waits: {"wf": id, "step": gate step id}."""
    resp = await client.post("/api/workflow", json=GATE_BODY)
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    gate = waiting_gate(wf)
    assert gate is not None
    return {"wf": wf_id, "step": gate["id"]}


@pytest.fixture
async def ids(client: httpx.AsyncClient, gated: dict[str, int]) -> dict[str, int]:
    """`gated`, and the saved definition "d" ({def}) with a run that completed ({run}) and a
    schedule ({sched})."""
    resp = await client.post("/api/workflows", json={"definition": DEFINITION})
    assert resp.status_code == 201, resp.text
    def_id = resp.json()["id"]
    resp = await client.post(f"/api/workflows/{def_id}/run", json={"input_data": {}})
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["run_id"]
    await wait_for(client, run_id)
    resp = await client.post(f"/api/workflows/{def_id}/schedules", json=YEARLY)
    assert resp.status_code == 201, resp.text
    return {**gated, "def": def_id, "run": run_id, "sched": resp.json()["schedule_id"]}


async def definitions_state(client: httpx.AsyncClient, ids: dict[str, int]) -> Any:
    """What the definition routes could change: every definition, "d" as GET shows it (its
    latest version, status, webhook), its versions and runs, and its run; every schedule,
    and d's schedule with its ticks."""
    james = auth("james")
    paths = [
        "/api/workflows",
        f"/api/workflows/{ids['def']}",
        f"/api/workflows/{ids['def']}/versions",
        f"/api/workflows/{ids['def']}/runs",
        f"/api/workflows/runs/{ids['run']}",
        "/api/workflows/recurring",
        f"/api/workflows/{ids['def']}/schedules",
        f"/api/workflows/schedules/{ids['sched']}",
        f"/api/workflows/schedules/{ids['sched']}/ticks",
    ]
    state = []
    for path in paths:
        resp = await client.get(path, headers=james)
        assert resp.status_code == 200, resp.text
        state.append(resp.json())
    return state


async def assert_unchanged(
    client: httpx.AsyncClient, ids: dict[str, int], n: int, before: Any = None
) -> None:
    """The rejected request changed nothing: same count, workflow running, gate waiting,
    and (given the state before) the same definitions, versions and runs."""
    assert await count(client) == n
    if before is not None:
        assert await definitions_state(client, ids) == before
    resp = await client.get(f"/api/workflow/{ids['wf']}", headers=auth("james"))
    wf = resp.json()
    assert wf["status"] == "running"
    gate = waiting_gate(wf)
    assert gate is not None and gate["id"] == ids["step"]
    assert gate["decided_by"] is None


def assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str) and body["error"].strip()
    return body


# -- 401 ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=ROUTE_IDS)
async def test_unauthenticated_is_401_everywhere(
    client: httpx.AsyncClient,
    ids: dict[str, int],
    method: str,
    path: str,
    body: Any,
    header: str | None,
) -> None:
    n, before = await count(client), await definitions_state(client, ids)
    # httpx merges client headers into the request: drop the default token explicitly.
    client.headers.pop("Authorization", None)
    resp = await request(client, method, path, body, headers_for(header), ids)
    assert_error(resp, 401)
    assert resp.headers["www-authenticate"].lower().startswith("bearer")
    await assert_unchanged(client, ids, n, before)


async def test_401_body_has_no_hint_of_valid_tokens(client: httpx.AsyncClient) -> None:
    client.headers.pop("Authorization", None)
    resp = await client.get("/api/workflow", headers={"Authorization": "Bearer tok-jame"})
    body = assert_error(resp, 401)
    assert "tok-james" not in resp.text and "james" not in body["error"]


async def test_scheme_is_case_insensitive(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/workflow", headers={"Authorization": "bearer tok-james"})
    assert resp.status_code == 200, resp.text


# -- 403 and allowed ---------------------------------------------------------------

APPROVER_FORBIDDEN = [r for r in ROUTES if r[:2] in {
    ("POST", "/api/workflow"),
    ("DELETE", "/api/workflow/{wf}"),
    ("POST", "/api/workflow/validate"),
    # saved definitions: every write needs the workflow permission
    ("POST", "/api/workflows"),
    ("POST", "/api/workflows/validate"),
    ("POST", "/api/workflows/import"),
    ("DELETE", "/api/workflows/runs/{run}"),
    ("POST", "/api/workflows/runs/{run}/cancel"),
    ("POST", "/api/workflows/runs/{run}/resume"),
    ("PUT", "/api/workflows/{def}"),
    ("DELETE", "/api/workflows/{def}"),
    ("PATCH", "/api/workflows/{def}/status"),
    ("POST", "/api/workflows/{def}/rollback"),
    ("POST", "/api/workflows/{def}/run"),
    ("POST", "/api/workflows/{def}/deploy"),
    ("POST", "/api/workflows/{def}/undeploy"),
    ("POST", "/api/workflows/{def}/arm"),
    ("POST", f"/api/workflows/templates/{TEMPLATE}/install"),
    # schedules: every write too
    ("POST", "/api/workflows/{def}/schedules"),
    ("PATCH", "/api/workflows/schedules/{sched}"),
    ("DELETE", "/api/workflows/schedules/{sched}"),
    ("POST", "/api/workflows/schedules/{sched}/trigger"),
    ("POST", "/api/workflows/schedules/{sched}/backfill"),
    ("POST", "/api/workflows/recurring"),
    ("DELETE", "/api/workflows/recurring/{sched}"),
}]  # fmt: skip
APPROVER_FORBIDDEN += upcoming("forbidden")
APPROVER_ALLOWED = [
    ("GET", "/api/workflow", None, 200),
    ("GET", "/api/workflow/{wf}", None, 200),
    ("GET", "/api/tools", None, 200),
    ("GET", "/api/schema/flow", None, 200),
    ("POST", "/api/workflow/{step}/ready", None, 200),
    # saved definitions: reads
    *[(m, p, b, 200) for m, p, b in ROUTES if m == "GET" and p.startswith("/api/workflows")
      and not p.endswith("/nope") and (m, p) not in {r[:2] for r in UPCOMING}],
    *upcoming("approver"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body"),
    params(APPROVER_FORBIDDEN),
)
async def test_approve_only_token_is_403_on_writes(
    client: httpx.AsyncClient, ids: dict[str, int], method: str, path: str, body: Any
) -> None:
    n, before = await count(client), await definitions_state(client, ids)
    resp = await request(client, method, path, body, auth("approver"), ids)
    assert_error(resp, 403)
    await assert_unchanged(client, ids, n, before)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    params(APPROVER_ALLOWED),
)
async def test_approve_only_token_may_read_and_ready(
    client: httpx.AsyncClient,
    ids: dict[str, int],
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    resp = await request(client, method, path, body, auth("approver"), ids)
    assert resp.status_code == status, resp.text


async def test_approve_only_token_gets_404_on_unknown_path(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/unknown", headers=auth("approver"))
    assert_error(resp, 404)


WORKFLOW_ALLOWED = [
    ("GET", "/api/workflow", None, 200),
    ("POST", "/api/workflow", ECHO_BODY, 201),
    ("GET", "/api/workflow/{wf}", None, 200),
    ("POST", "/api/workflow/{step}/ready", None, 200),
    ("DELETE", "/api/workflow/{wf}", None, 200),
    ("POST", "/api/workflow/validate", ECHO_BODY, 200),
    ("GET", "/api/tools", None, 200),
    ("GET", "/api/schema/flow", None, 200),
    ("GET", "/api/unknown", None, 404),
    # saved definitions; 409: allowed, but not in the state the fixture leaves it in
    ("GET", "/api/workflows", None, 200),
    ("POST", "/api/workflows", {"definition": OTHER_DEFINITION}, 201),
    ("POST", "/api/workflows/validate", {"definition": OTHER_DEFINITION}, 200),
    ("GET", "/api/workflows/export", None, 200),
    ("POST", "/api/workflows/import", IMPORT, 200),
    ("GET", "/api/workflows/runs/{run}", None, 200),
    ("DELETE", "/api/workflows/runs/{run}", None, 204),
    ("POST", "/api/workflows/runs/{run}/cancel", None, 409),  # it completed
    ("POST", "/api/workflows/runs/{run}/resume", None, 409),
    ("GET", "/api/workflows/{def}", None, 200),
    ("GET", "/api/workflows/d", None, 200),
    ("PUT", "/api/workflows/{def}", {"definition": {**DEFINITION, "description": "v2"}}, 200),
    ("DELETE", "/api/workflows/{def}", None, 204),
    ("PATCH", "/api/workflows/{def}/status", {"status": "paused"}, 200),
    ("GET", "/api/workflows/{def}/versions", None, 200),
    ("GET", "/api/workflows/{def}/versions/1", None, 200),
    ("GET", "/api/workflows/{def}/diff?v1=1&v2=1", None, 200),
    ("POST", "/api/workflows/{def}/rollback", {"version": 1}, 200),
    ("POST", "/api/workflows/{def}/run", {"input_data": {}}, 202),
    ("GET", "/api/workflows/{def}/runs", None, 200),
    ("POST", "/api/workflows/{def}/deploy", None, 200),
    ("POST", "/api/workflows/{def}/undeploy", None, 200),
    ("POST", "/api/workflows/{def}/arm", None, 409),  # not deployed
    ("GET", "/api/workflows/{def}/export", None, 200),
    ("GET", "/api/workflows/templates", None, 200),
    ("GET", f"/api/workflows/templates/{TEMPLATE}", None, 200),
    ("POST", f"/api/workflows/templates/{TEMPLATE}/install", {"name": "installed"}, 201),
    ("GET", "/api/workflows/{def}/schedules", None, 200),
    ("POST", "/api/workflows/{def}/schedules", YEARLY, 201),
    ("GET", "/api/workflows/schedules/{sched}", None, 200),
    ("PATCH", "/api/workflows/schedules/{sched}", {"paused": True}, 200),
    ("DELETE", "/api/workflows/schedules/{sched}", None, 200),
    ("GET", "/api/workflows/schedules/{sched}/ticks", None, 200),
    ("POST", "/api/workflows/schedules/{sched}/trigger", None, 202),  # fired
    ("POST", "/api/workflows/schedules/{sched}/backfill", BACKFILL, 202),
    ("GET", "/api/workflows/recurring", None, 200),
    ("POST", "/api/workflows/recurring", {"workflow": "d", **YEARLY}, 201),
    ("DELETE", "/api/workflows/recurring/{sched}", None, 200),
    *upcoming("workflow"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    params(WORKFLOW_ALLOWED),
)
async def test_workflow_token_is_allowed_everywhere(
    client: httpx.AsyncClient,
    ids: dict[str, int],
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    resp = await request(client, method, path, body, auth("james"), ids)
    assert resp.status_code == status, resp.text


METHODS = {"get", "post", "put", "patch", "delete"}


def route_rx(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"{\w+}", "[^/]+", template) + "$")


def test_matrix_covers_every_definition_route() -> None:
    """Every documented operation under /api/workflows is in the 401 matrix, and the
    approver is either refused or allowed it."""
    documented = openapi.document()["paths"]
    templates = [
        (route_rx(t), t)
        for t in sorted(documented, key=lambda t: t.count("{"))  # literal paths first
        if t.startswith("/api/workflows")
    ]

    def covered(rows: list[Any]) -> set[tuple[str, str]]:
        """(method, documented path) of each row's request."""
        out = set()
        for row in rows:
            method, path = (row if type(row) is tuple else row.values)[:2]
            path = re.sub(r"{\w+}", "1", path).partition("?")[0]
            found = next((t for rx, t in templates if rx.match(path)), None)
            if found is not None:
                out.add((method.lower(), found))
        return out

    wanted = {(m, t) for _, t in templates for m in documented[t] if m in METHODS}
    assert wanted <= covered(ROUTES)
    assert wanted <= covered(APPROVER_FORBIDDEN) | covered(APPROVER_ALLOWED)
    assert not covered(APPROVER_FORBIDDEN) & covered(APPROVER_ALLOWED)


async def test_hooks_take_a_signature_not_a_bearer(
    client: httpx.AsyncClient, ids: dict[str, int]
) -> None:
    """/hooks/{webhook_id} is outside the bearer check: a valid token does not stand in for
    the signature, and no token (or a bad one) is needed with it."""
    deployed = (await client.post(f"/api/workflows/{ids['def']}/deploy")).json()
    persistent = {**DEFINITION, "webhook": {"mode": "persistent"}}
    resp = await client.put(f"/api/workflows/{ids['def']}", json={"definition": persistent})
    assert resp.status_code == 200, resp.text
    secret, url, body = deployed["webhook_secret"], deployed["url"], b"{}"
    for token in ("james", "approver"):
        resp = await client.post(url, content=body, headers=auth(token))
        assert_error(resp, 401)
        assert "X-Stepd-" in resp.json()["error"]
    client.headers.pop("Authorization", None)
    for header in (None, "Bearer not-a-token"):
        ts = int(time.time())
        signature = sign(secret.encode(), ts, body)
        headers = {"X-Stepd-Timestamp": str(ts), "X-Stepd-Signature": signature,
                   **headers_for(header)}  # fmt: skip
        resp = await client.post(url, content=body, headers=headers)
        assert resp.status_code == 202, resp.text


@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic x"])
async def test_healthz_needs_no_token(client: httpx.AsyncClient, header: str | None) -> None:
    client.headers.pop("Authorization", None)
    resp = await client.get("/healthz", headers=headers_for(header))
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "ok"


# -- identities --------------------------------------------------------------------


async def test_created_by_is_the_token_name(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/workflow", json=ECHO_BODY)
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id)
    assert wf["created_by"] == "james"
    listed = (await client.get("/api/workflow")).json()
    assert [w["created_by"] for w in listed if w["id"] == wf_id] == ["james"]


async def test_gate_released_by_approver_records_decided_by(
    client: httpx.AsyncClient, gated: dict[str, int]
) -> None:
    resp = await client.post(f"/api/workflow/{gated['step']}/ready", headers=auth("approver"))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"queued": True}
    wf = await wait_for(client, gated["wf"])
    assert wf["status"] == "completed"
    gate = next(s for s in wf["steps"] if s["id"] == gated["step"])
    assert gate["status"] == "done"
    assert gate["decided_by"] == "approver"
    assert wf["created_by"] == "james"


# -- Authenticator and the generated token -----------------------------------------

SEVERAL = {"alice": "tok-a", "bob": "tok-b", "carol": "tok-c"}


def several() -> Authenticator:
    return Authenticator(
        [TokenConfig(name, hash_token(tok), ("workflow",)) for name, tok in SEVERAL.items()]
    )


@pytest.mark.parametrize(("name", "token"), list(SEVERAL.items()))
def test_each_configured_token_authenticates_as_its_name(name: str, token: str) -> None:
    assert several().identify(f"Bearer {token}").name == name


@pytest.mark.parametrize("header", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_authenticator_rejects_bad_headers(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        several().identify(header)


@pytest.mark.parametrize("token", [*SEVERAL.values(), "nope"])
def test_authenticator_compares_against_every_hash(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """No early exit: every configured hash is compared, whichever token (if any) matches."""
    authenticator = several()
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    try:
        authenticator.identify(f"Bearer {token}")
    except Unauthorized:
        assert token == "nope"
    assert len(calls) == len(SEVERAL)
    assert {c.hex() for c in calls} == {hash_token(t) for t in SEVERAL.values()}


def test_require_checks_permissions() -> None:
    approver = TokenConfig("approver", hash_token("x"), ("approve",))
    admin = TokenConfig("admin", hash_token("y"), ("workflow",))
    for need in ("read", "approve"):
        Authenticator.require(approver, need)
    with pytest.raises(Forbidden):
        Authenticator.require(approver, "workflow")
    for need in ("read", "approve", "workflow"):
        Authenticator.require(admin, need)


def test_first_start_token_is_made_once_then_reloaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = active_tokens((), state)
    (cfg,), token = made.tokens, made.new_token
    assert token is not None
    path = state / GENERATED_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    assert path.read_text().strip() == hash_token(token) == cfg.sha256
    assert cfg.permissions == ("workflow",)
    assert Authenticator([cfg]).identify(f"Bearer {token}").name == cfg.name

    content, mtime = path.read_bytes(), path.stat().st_mtime_ns
    reloaded = active_tokens((), state)
    (again,) = reloaded.tokens
    assert reloaded.new_token is None
    assert again == cfg
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime
    assert Authenticator([again]).identify(f"Bearer {token}").name == cfg.name
    assert [p.name for p in state.iterdir()] == [GENERATED_TOKEN_FILE]
