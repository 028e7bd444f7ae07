"""The OpenAPI document stays true: routes, parameters, validity, and real responses."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema_rs  # schemathesis' JSON Schema validator (it comes with it)
import schemathesis
from starlette.routing import Mount, Route

from daemon import openapi
from daemon.api import create_app
from daemon.config import Config
from daemon.notify import sign
from daemon.storage import StorageUnavailable
from daemon.tools import Registry, build_registry
from tests.helpers import auth, make_config, wait_for, waiting_gate
from tests.test_reference import APPROVAL, LINEAR

DOC = openapi.document()
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
DOC_URI = "urn:stepd:openapi"
REGISTRY = jsonschema_rs.Registry([(DOC_URI, DOC)])


def pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref (responses are shared through components)."""
    while "$ref" in node:
        target: Any = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in DOC["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def served_routes(tmp_path: Path) -> dict[str, Route]:
    """The app's routes by path template without convertors ({id:int} -> {id})."""
    routes = create_app(make_config(tmp_path)).routes  # not started: nothing is opened
    # The API is plain routes; the web pages (/ui) and signed links (/link) are mounted
    # HTML apps outside the API's document.
    api = [r for r in routes if not isinstance(r, Mount)]
    assert all(isinstance(r, Route) for r in api), api
    assert {r.path for r in routes if isinstance(r, Mount)} <= {"/ui", "/link"}
    return {re.sub(r"{(\w+):\w+}", r"{\1}", r.path): r for r in api}  # type: ignore[misc]


# -- the document against the app ------------------------------------------------------


def test_every_served_route_and_method_is_documented_and_nothing_else(tmp_path):
    # Starlette answers HEAD wherever it serves GET; the document leaves HEAD implied.
    served = {
        p: {m.lower() for m in r.methods or ()} - {"head"}
        for p, r in served_routes(tmp_path).items()
    }
    documented = {p: {m for m in item if m in METHODS} for p, item in DOC["paths"].items()}
    assert served == documented


# A route's convertor and the type its documented parameter has: ids are integers, a
# definition's version a small integer, a definition ref (id or name) and a webhook id text.
CONVERTORS = {
    ("IdConvertor", "integer"),
    ("IntegerConvertor", "integer"),
    ("StringConvertor", "string"),
}


def test_path_parameters_match_the_routes(tmp_path):
    routes = served_routes(tmp_path)
    for path, method, op in operations():
        route = routes[path]
        params = [resolve(p) for p in DOC["paths"][path].get("parameters", [])]
        params += [resolve(p) for p in op.get("parameters", [])]
        in_path = {p["name"]: p for p in params if p["in"] == "path"}
        assert set(in_path) == set(route.param_convertors), (method, path)
        assert set(in_path) == set(re.findall(r"{(\w+)}", path)), (method, path)
        for name, param in in_path.items():
            assert param["required"] is True
            convertor = type(route.param_convertors[name]).__name__
            assert (convertor, param["schema"]["type"]) in CONVERTORS, (method, path, name)


def test_document_is_valid_openapi_3_1():
    doc = DOC
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema

    # ...and every embedded schema is a valid JSON Schema 2020-12 (the meta-schema above
    # lets any object through as a schema).
    def schemas(node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(node.get("schema"), dict):
                yield node["schema"]
            for value in node.values():
                yield from schemas(value)
        elif isinstance(node, list):
            for value in node:
                yield from schemas(value)

    found = [
        *schemas(doc["paths"]),
        *schemas(doc["components"]),
        *doc["components"]["schemas"].values(),
    ]
    assert len(found) > 20
    for schema in found:
        jsonschema_rs.meta.validate(schema)


def test_every_operation_documents_its_errors():
    assert len({op["operationId"] for _, _, op in operations()}) == len(operations())
    for path, method, op in operations():
        codes = set(op["responses"])
        if op.get("security") == []:
            assert path == "/healthz"
            continue
        if op.get("security") == openapi.HOOK_SECURITY:
            # Signed with the definition's secret instead of a bearer token; any body.
            assert path.startswith("/hooks/"), path
            assert {"400", "401", "404", "413"} <= codes and "403" not in codes, path
            continue
        assert "security" not in op, (method, path)  # the bearer token
        assert {"401", "403"} <= codes, (method, path)
        if "requestBody" in op:
            assert {"400", "413", "415"} <= codes, (method, path)
        if "{" in path:
            assert "404" in codes, (method, path)


# -- real responses against the document ------------------------------------------------

TEXT_PARAMS = ("{ref}", "{webhook_id}", "{template_id}", "{sid}")  # in the path as text


def template_rx(path: str) -> re.Pattern[str]:
    for name in TEXT_PARAMS:
        path = path.replace(name, "[^/]+")
    return re.compile("^" + re.sub(r"{\w+}", r"[0-9]+", path) + "$")


TEMPLATES = [
    (template_rx(p), p)
    for p in sorted(DOC["paths"], key=lambda p: p.count("{"))  # literal paths win
]


def conforms(resp: httpx.Response) -> Any:
    """Assert `resp` is what the document says its operation answers; return its JSON."""
    method = resp.request.method.lower()
    path = next(t for rx, t in TEMPLATES if rx.match(resp.request.url.path))
    op = DOC["paths"][path][method]
    status = str(resp.status_code)
    assert status in op["responses"], f"{method.upper()} {path}: undocumented {status}: {resp.text}"
    response = resolve(op["responses"][status])
    for name, header in response.get("headers", {}).items():
        if header.get("required") or name in resp.headers:
            assert name in resp.headers, f"{status} lacks the {name} header"
            jsonschema_rs.validate(header["schema"], resp.headers[name])
    if resp.status_code == 204:
        assert not resp.content and "content" not in response
        return None
    assert resp.headers["content-type"].split(";")[0] == "application/json"
    data = resp.json()
    ptr = pointer("paths", path, method, "responses", status)
    if "$ref" in op["responses"][status]:
        ptr = op["responses"][status]["$ref"].removeprefix("#/")
    ref = f"{DOC_URI}#/{quote(ptr, safe='/~')}/content/{pointer('application/json')}/schema"
    validator = jsonschema_rs.validator_for({"$ref": ref}, registry=REGISTRY)
    errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, f"{method.upper()} {path} {status}: {errors}\n{data}"
    return data


async def test_create_list_get_and_replay_conform(client):
    created = conforms(await client.post("/api/workflow", json=LINEAR))
    wf = await wait_for(client, created["id"])
    assert wf["status"] == "completed"
    wf = conforms(await client.get(f"/api/workflow/{created['id']}"))
    assert [s["status"] for s in wf["steps"]] == ["done", "done"]
    assert all(s["result_json"] is not None for s in wf["steps"])

    listed = conforms(await client.get("/api/workflow", params={"limit": 10}))
    assert [w["id"] for w in listed] == [created["id"]]
    conforms(await client.get("/api/workflow", params={"status": "running", "before": 5}))

    key = {"Idempotency-Key": "k-1"}
    first = await client.post("/api/workflow", json=LINEAR, headers=key)
    again = await client.post("/api/workflow", json=LINEAR, headers=key)
    assert conforms(first)["id"] == conforms(again)["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = {**LINEAR, "name": "other"}
    assert (await client.post("/api/workflow", json=other, headers=key)).status_code == 409
    conforms(await client.post("/api/workflow", json=other, headers=key))


async def test_gate_ready_cancel_and_decisions_conform(client):
    created = conforms(await client.post("/api/workflow", json=APPROVAL))
    wf = await wait_for(client, created["id"], lambda w: waiting_gate(w) is not None)
    wf = conforms(await client.get(f"/api/workflow/{created['id']}"))
    gate = waiting_gate(wf)
    assert gate is not None and gate["tool"] is None and gate["status"] == "running"

    # retry / fail are for interrupted non-idempotent tools, not gates: 409
    assert (await client.post(f"/api/workflow/{gate['id']}/retry")).status_code == 409
    conforms(await client.post(f"/api/workflow/{gate['id']}/retry"))
    resp = await client.post(f"/api/workflow/{gate['id']}/fail", json={"reason": "no"})
    assert resp.status_code == 409
    conforms(resp)

    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={"approved": True})
    assert conforms(resp) == {"queued": True}
    conforms(await client.get(f"/api/workflow/{created['id']}"))
    await wait_for(client, created["id"])
    assert conforms(await client.get(f"/api/workflow/{created['id']}"))["status"] == "completed"
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 409
    conforms(await client.post(f"/api/workflow/{gate['id']}/ready"))
    assert (await client.delete(f"/api/workflow/{created['id']}")).status_code == 409
    conforms(await client.delete(f"/api/workflow/{created['id']}"))

    running = conforms(await client.post("/api/workflow", json=APPROVAL))
    await wait_for(client, running["id"], lambda w: waiting_gate(w) is not None)
    assert conforms(await client.delete(f"/api/workflow/{running['id']}")) == {"cancelled": True}
    wf = conforms(await client.get(f"/api/workflow/{running['id']}"))
    assert wf["status"] == "cancelled" and wf["cancelled_at"] is not None


async def hold(seconds: float = 60.0) -> dict[str, float]:
    """A slow tool with a side effect: when interrupted, its step waits for retry-or-fail."""
    await asyncio.sleep(seconds)
    return {"held": seconds}


HOLD_FLOWS = [  # each step is interrupted, then waits for POST .../retry or .../fail
    {"start": {"tool": "hold", "next": "end"}, "end": {"tool": "echo", "done": True}},
    {
        "start": {"tool": "hold", "args": {"seconds": 30}, "on_error": "end", "next": "end"},
        "end": {"tool": "echo", "args": {"error": "<<error>>"}, "done": True},
    },
]


@asynccontextmanager
async def serving(config: Config, registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config, registry=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as client:
            client.headers.update(auth("james"))
            yield client


async def test_interrupted_steps_retry_and_fail_conform(tmp_path):
    config = make_config(tmp_path, shutdown_grace=0.0)
    registry = build_registry(config.tool_modules)
    registry.add("hold", hold, idempotent=False)
    async with serving(config, registry) as client:  # stops while the tools run
        ids = []
        for flow in HOLD_FLOWS:
            ids.append(
                conforms(await client.post("/api/workflow", json={"name": "h", "flow": flow}))["id"]
            )
        for wf_id in ids:
            await wait_for(client, wf_id, lambda w: w["steps"][0]["status"] == "running")
    async with serving(config, registry) as client:
        wfs = [conforms(await client.get(f"/api/workflow/{i}")) for i in ids]
        steps = [wf["steps"][0] for wf in wfs]
        assert [s["awaiting"] for s in steps] == ["decision", "decision"]
        resp = await client.post(f"/api/workflow/{steps[0]['id']}/ready")  # not a gate
        assert resp.status_code == 409
        conforms(resp)
        resp = await client.post(f"/api/workflow/{steps[0]['id']}/retry")
        assert conforms(resp) == {"queued": True}
        resp = await client.post(f"/api/workflow/{steps[1]['id']}/fail", json={"reason": "no"})
        assert conforms(resp) == {"failed": True}
        wf = await wait_for(client, ids[1])
        assert conforms(await client.get(f"/api/workflow/{ids[1]}"))["status"] == "completed"
        assert [s["status"] for s in wf["steps"]] == ["failed", "done"]
        assert wf["steps"][0]["decided_by"] == "james"
        # Cut off by a planned stop: the retry runs it again as the same attempt.
        wf = await wait_for(client, ids[0], lambda w: w["steps"][0]["status"] == "running"
                            and w["steps"][0]["awaiting"] is None)  # fmt: skip
        assert conforms(await client.get(f"/api/workflow/{ids[0]}"))["steps"][0]["attempt"] == 1
        for step in steps:
            assert (await client.post(f"/api/workflow/{step['id']}/fail")).status_code == 409


async def test_validate_tools_openapi_and_healthz_conform(client):
    result = conforms(await client.post("/api/workflow/validate", json=LINEAR))
    assert result == {"valid": True, "errors": [], "warnings": []}
    bad = {"name": "x", "flow": {"other": {"tool": "nope", "done": True}}}
    result = conforms(await client.post("/api/workflow/validate", json=bad))
    assert result["valid"] is False and result["errors"]
    tools = conforms(await client.get("/api/tools"))
    assert {"echo", "get_greeting", "knowledge_add"} <= {t["name"] for t in tools}
    assert any(p.get("default") is not None for t in tools for p in t["parameters"])
    names = [t["name"] for t in tools]
    assert conforms(await client.get("/openapi.json")) == openapi.document(names)
    assert conforms(await client.get("/healthz", headers={"Authorization": ""})) == {"status": "ok"}


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
LONG_KEY = {"Idempotency-Key": "k" * 201}


async def test_errors_conform(client):
    some_id = 1 << 40
    cases: list[tuple[int, httpx.Request]] = [
        (400, client.build_request("POST", "/api/workflow", json={"flow": {}})),
        (400, client.build_request("POST", "/api/workflow", content=b"{", headers=JSON)),
        (400, client.build_request("GET", "/api/workflow", params={"limit": 0})),
        (400, client.build_request("GET", "/api/workflow", params={"status": "odd"})),
        (400, client.build_request("POST", "/api/workflow", json=LINEAR, headers=LONG_KEY)),
        (400, client.build_request("POST", f"/api/workflow/{some_id}/fail", json={"r": 1})),
        (401, client.build_request("GET", "/api/workflow", headers={"Authorization": ""})),
        (401, client.build_request("GET", "/openapi.json", headers={"Authorization": "Bearer x"})),
        (403, client.build_request("POST", "/api/workflow", json=LINEAR, headers=auth("approver"))),
        (404, client.build_request("GET", f"/api/workflow/{some_id}")),
        (404, client.build_request("DELETE", f"/api/workflow/{some_id}")),
        (404, client.build_request("POST", f"/api/workflow/{some_id}/ready")),
        (404, client.build_request("POST", f"/api/workflow/{some_id}/retry")),
        (404, client.build_request("POST", f"/api/workflow/{some_id}/fail")),
        (413, client.build_request("POST", "/api/workflow/validate", json={"x": "y" * 2**21})),
        (415, client.build_request("POST", "/api/workflow", content=b"{}", headers=TEXT)),
        (422, client.build_request("POST", "/api/workflow", json={"name": "x", "flow": {}})),
    ]
    for status, request in cases:
        resp = await client.send(request)
        assert resp.status_code == status, (request.method, request.url, resp.text)
        assert isinstance(conforms(resp)["error"], str)
    resp = await client.get("/api/workflow", headers={"Authorization": ""})
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_storage_fault_conforms(app, client, monkeypatch):
    async def locked(*args: Any, **kwargs: Any) -> None:
        raise StorageUnavailable("database is locked")

    monkeypatch.setattr(app.state.store, "list_workflows", locked)
    resp = await client.get("/api/workflow")
    assert resp.status_code == 503
    assert "storage unavailable" in conforms(resp)["error"]


# -- saved definitions and webhooks ------------------------------------------------------

DEFINITION = {
    "name": "greet",
    "description": "Say hello",
    "input_schema": {
        "type": "object",
        "properties": {"who": {"type": "string"}},
        "required": ["who"],
    },
    "tags": ["demo"],
    "webhook": {"mode": "single"},
    "flow": {"start": {"tool": "echo", "args": {"hello": "<<input.who>>"}, "done": True}},
}
GATED = {"name": "gated", "concurrency": 1, "flow": {"start": {"tool": None, "done": True}}}


def signed(secret: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "X-Stepd-Timestamp": str(ts),
        "X-Stepd-Signature": sign(secret.encode(), ts, body),
        "Content-Type": "application/json",
    }


async def test_definitions_versions_and_runs_conform(client):
    made = conforms(await client.post("/api/workflows", json={"definition": DEFINITION}))
    def_id = made["id"]
    assert made["workflow"]["webhook"] == {"mode": "single", "deployed": False,
                                           "armed_until": None}  # fmt: skip
    for ref in (def_id, "greet"):
        assert conforms(await client.get(f"/api/workflows/{ref}"))["id"] == def_id
    listed = conforms(await client.get("/api/workflows", params={"tag": "demo", "limit": 5}))
    assert listed["total"] == 1
    conforms(await client.get("/api/workflows", params={"status": "paused", "offset": 3}))
    # PUT: a new version, then the same content again (no version).
    v2 = {**DEFINITION, "description": "v2"}
    body = {"definition": v2, "change_summary": "describe"}
    changed = conforms(await client.put("/api/workflows/greet", json=body))
    assert (changed["version"], changed["changed"]) == (2, True)
    same = conforms(await client.put(f"/api/workflows/{def_id}", json=body))
    assert (same["version"], same["changed"]) == (2, False)
    versions = conforms(await client.get("/api/workflows/greet/versions"))["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    assert conforms(await client.get("/api/workflows/greet/versions/1"))["version"] == 1
    diff = conforms(await client.get("/api/workflows/greet/diff", params={"v1": 1, "v2": 2}))
    assert diff["diff"] and diff["summary"]
    back = conforms(await client.post("/api/workflows/greet/rollback", json={"version": 1}))
    assert back["version"] == 3
    status = {"status": "draft"}
    assert conforms(await client.patch("/api/workflows/greet/status", json=status))["status"] == (
        "draft"
    )
    # Runs: one completes; over concurrency 1 a second waits as queued.
    run_id = conforms(
        await client.post("/api/workflows/greet/run", json={"input_data": {"who": "ann"}})
    )["run_id"]
    await wait_for(client, run_id)
    wf = conforms(await client.get(f"/api/workflow/{run_id}"))
    assert (wf["definition_id"], wf["definition_version"], wf["trigger"]) == (def_id, 3, "manual")
    got = conforms(await client.get(f"/api/workflows/runs/{run_id}"))["run"]
    assert got["status"] == "completed" and got["step_runs"][0]["status"] == "completed"
    runs = conforms(await client.get("/api/workflows/greet/runs", params={"status": "completed"}))
    assert [r["id"] for r in runs["runs"]] == [run_id]
    gated = conforms(await client.post("/api/workflows", json={"definition": GATED}))["id"]
    first = conforms(await client.post(f"/api/workflows/{gated}/run"))["run_id"]
    second = conforms(await client.post(f"/api/workflows/{gated}/run", json={}))["run_id"]
    await wait_for(client, first, lambda w: waiting_gate(w) is not None)
    assert conforms(await client.get(f"/api/workflow/{second}"))["status"] == "queued"
    assert conforms(await client.get("/api/workflow", params={"status": "queued"}))[0]["id"] == (
        second
    )
    queued = conforms(await client.get(f"/api/workflows/runs/{second}"))["run"]
    assert queued["status"] == "queued" and queued["step_runs"] == []
    cancelled = conforms(await client.post(f"/api/workflows/runs/{second}/cancel"))
    assert cancelled == {"run_id": second, "status": "cancelled"}
    # Its definition's one slot is taken (by `first`): no redrive until it frees.
    resumed = await client.post(f"/api/workflows/runs/{second}/resume")
    assert resumed.status_code == 409 and "slots" in conforms(resumed)["error"]
    conforms(await client.delete(f"/api/workflows/runs/{run_id}"))
    # Errors: their codes and extra fields.
    cases: list[tuple[int, httpx.Request]] = [
        (400, client.build_request("GET", "/api/workflows", params={"limit": 201})),
        (400, client.build_request("GET", "/api/workflows", params={"trigger_type": "odd"})),
        (400, client.build_request("GET", "/api/workflows/greet/diff", params={"v1": 1})),
        (400, client.build_request("GET", "/api/workflows/greet/versions/0")),
        (400, client.build_request("DELETE", "/api/workflows/greet", params={"force": "x"})),
        (400, client.build_request("POST", "/api/workflows", json={"definition": "x"})),
        (400, client.build_request("POST", "/api/workflows/import", json=[])),
        (401, client.build_request("GET", "/api/workflows", headers={"Authorization": ""})),
        (403, client.build_request("POST", "/api/workflows/greet/run", headers=auth("approver"))),
        (404, client.build_request("GET", "/api/workflows/nope")),
        (404, client.build_request("GET", "/api/workflows/greet/versions/99")),
        (404, client.build_request("GET", f"/api/workflows/runs/{1 << 40}")),
        (409, client.build_request("POST", "/api/workflows", json={"definition": DEFINITION})),
        (409, client.build_request("DELETE", f"/api/workflows/runs/{first}")),
        (409, client.build_request("POST", "/api/workflows/greet/arm")),
        (415, client.build_request("POST", "/api/workflows", content=b"{}", headers=TEXT)),
        (422, client.build_request("POST", "/api/workflows/greet/run", json={"input": {}})),
        (422, client.build_request("POST", "/api/workflows", json={"definition": {"name": "x"}})),
    ]
    for status, request in cases:
        resp = await client.send(request)
        assert resp.status_code == status, (request.method, request.url, resp.text)
        assert isinstance(conforms(resp)["error"], str)
    resp = await client.get("/api/workflows/nope")
    assert conforms(resp)["error_code"] == "WORKFLOW_NOT_FOUND"
    resp = await client.post("/api/workflows/greet/run", json={"input_data": {"who": 1}})
    assert conforms(resp)["error_code"] == "VALIDATION_ERROR" and resp.json()["errors"]
    resp = await client.delete(f"/api/workflows/{gated}")  # a run waits at its gate
    assert resp.status_code == 409, resp.text
    conforms(resp)
    conforms(await client.delete(f"/api/workflows/{gated}", params={"force": "true"}))
    assert (await client.get(f"/api/workflow/{first}")).json()["status"] == "cancelled"


async def test_webhooks_export_and_import_conform(client):
    conforms(await client.post("/api/workflows", json={"definition": DEFINITION}))
    deployed = conforms(await client.post("/api/workflows/greet/deploy"))
    secret, url = deployed["webhook_secret"], deployed["url"]
    webhook = conforms(await client.get("/api/workflows/greet"))["webhook"]
    assert webhook["webhook_id"] == deployed["webhook_id"] and webhook["url"] == url
    hidden = conforms(await client.get("/api/workflows/greet", headers=auth("approver")))
    assert set(hidden["webhook"]) == {"mode", "deployed", "armed_until"}
    payload = b'{"who": "hook"}'
    no_bearer = {"Authorization": ""}
    resp = await client.post(url, content=payload, headers={**signed(secret, payload),
                                                            **no_bearer})  # fmt: skip
    assert resp.status_code == 410, resp.text  # not armed
    conforms(resp)
    armed = conforms(await client.post("/api/workflows/greet/arm"))
    assert armed["armed_until"].endswith("Z")
    key = {"Idempotency-Key": "hook-1", **no_bearer}
    first = await client.post(url, content=payload, headers={**signed(secret, payload), **key})
    again = await client.post(url, content=payload, headers={**signed(secret, payload), **key})
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert conforms(first) == conforms(again)
    assert again.headers["Idempotent-Replayed"] == "true"
    cases = [
        (401, {**signed(secret, payload, ts=int(time.time()) - 1000), **no_bearer}),
        (401, {**signed("other", payload), **no_bearer}),
        (401, no_bearer),
    ]
    for status, headers in cases:
        resp = await client.post(url, content=payload, headers=headers)
        assert resp.status_code == status, resp.text
        conforms(resp)
    resp = await client.post("/hooks/nope", content=payload, headers=signed(secret, payload))
    assert resp.status_code == 404, resp.text
    conforms(resp)
    conforms(await client.post("/api/workflows/greet/undeploy"))

    export = conforms(await client.get("/api/workflows/export"))
    assert [w["name"] for w in export["workflows"]] == ["greet"]
    one = conforms(await client.get("/api/workflows/greet/export"))
    assert one["workflows"][0]["versions"][0]["change_summary"] == "Initial version"
    skipped = conforms(await client.post("/api/workflows/import", json=export))
    assert skipped["skipped"][0]["name"] == "greet"
    renamed = {**one["workflows"][0], "name": "greet2"}
    renamed["versions"] = [{**v, "definition": {**v["definition"], "name": "greet2"}}
                           for v in renamed["versions"]]  # fmt: skip
    done = await client.post("/api/workflows/import", params={"mode": "upsert"}, json=renamed)
    assert conforms(done)["created"] == ["greet2"]
    bad = {"workflows": [{"name": "x", "versions": []}]}
    resp = await client.post("/api/workflows/import", json=bad)
    assert resp.status_code == 422 and conforms(resp)["errors"]
    resp = await client.post("/api/workflows/import", params={"mode": "merge"}, json=export)
    assert resp.status_code == 400
    conforms(resp)


async def test_templates_conform(client):
    listed = conforms(await client.get("/api/workflows/templates"))
    assert listed["total"] == len(listed["templates"]) >= 4
    conforms(await client.get("/api/workflows/templates", params={"category": "x", "limit": 1}))
    for summary in listed["templates"]:
        template = conforms(await client.get(f"/api/workflows/templates/{summary['id']}"))
        assert template["definition"]["name"]
    first = listed["templates"][0]["id"]
    made = await client.post(f"/api/workflows/templates/{first}/install", json={"name": "mine"})
    assert made.status_code == 201, made.text
    workflow_id = conforms(made)["workflow_id"]
    assert conforms(await client.get("/api/workflows/mine"))["id"] == workflow_id
    for status, resp in [
        (
            409,
            await client.post(f"/api/workflows/templates/{first}/install", json={"name": "mine"}),
        ),
        (404, await client.get("/api/workflows/templates/nope")),
        (404, await client.post("/api/workflows/templates/nope/install")),
        (400, await client.post(f"/api/workflows/templates/{first}/install", json={"x": 1})),
        (422, await client.post(f"/api/workflows/templates/{first}/install", json={"name": "1"})),
    ]:
        assert resp.status_code == status, resp.text
        conforms(resp)


# -- schedules and the recurring shape ----------------------------------------------------


async def test_schedules_conform(client):
    conforms(await client.post("/api/workflows", json={"definition": DEFINITION}))
    conforms(await client.post("/api/workflows", json={"definition": GATED}))
    body = {
        "cron_expression": "0 9 * * 1-5",
        "timezone": "America/New_York",
        "input_data": {"who": "ann"},
    }
    made = await client.post("/api/workflows/greet/schedules", json=body)
    assert made.status_code == 201, made.text
    sid = conforms(made)["schedule_id"]
    listed = conforms(await client.get("/api/workflows/greet/schedules", params={"limit": 5}))
    assert [s["schedule_id"] for s in listed["schedules"]] == [sid] and listed["total"] == 1
    got = conforms(await client.get(f"/api/workflows/schedules/{sid}"))
    assert len(got["next_runs"]) == 5 and got["ticks"] == []
    paused = conforms(await client.patch(f"/api/workflows/schedules/{sid}", json={"paused": True}))
    assert paused["paused"] is True and paused["next_run"] is None

    # Run now: fired (202) and the run it started; then, while a gated run of the same
    # schedule waits, skipped (200).
    fired = await client.post(f"/api/workflows/schedules/{sid}/trigger")
    assert fired.status_code == 202, fired.text
    run_id = conforms(fired)["run_id"]
    await wait_for(client, run_id)
    wf = conforms(await client.get(f"/api/workflow/{run_id}"))
    assert wf["trigger"] == "schedule" and wf["schedule"]["schedule_id"] == sid
    gated = {"cron_expression": "@hourly", "paused": True}
    gsid = conforms(await client.post("/api/workflows/gated/schedules", json=gated))["schedule_id"]
    first = conforms(await client.post(f"/api/workflows/schedules/{gsid}/trigger", json={}))
    await wait_for(client, first["run_id"], lambda w: waiting_gate(w) is not None)
    skipped = await client.post(f"/api/workflows/schedules/{gsid}/trigger")
    assert skipped.status_code == 200, skipped.text
    assert conforms(skipped)["outcome"] == "skipped" and skipped.json()["run_id"] is None

    # Backfill: the past two hours of an hourly schedule, buffered behind the gated run.
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(hours=2) + timedelta(seconds=1)  # two top-of-hours, always
    window = {"start": start.isoformat(), "end": now.isoformat()}
    done = await client.post(f"/api/workflows/schedules/{gsid}/backfill", json=window)
    assert done.status_code == 202, done.text
    assert conforms(done)["fire_times"] == 2 == done.json()["buffered"]
    again = await client.post(f"/api/workflows/schedules/{gsid}/backfill", json=window)
    assert again.status_code == 202, again.text
    assert [(t["id"], t["reason"]) for t in conforms(again)["ticks"]] == [
        (0, "already backfilled")
    ] * 2
    ticks = conforms(await client.get(f"/api/workflows/schedules/{gsid}/ticks"))
    assert ticks["total"] == 4
    only = {"outcome": "buffered", "limit": 1, "offset": 1}
    assert (
        conforms(await client.get(f"/api/workflows/schedules/{gsid}/ticks", params=only))["total"]
        == 2
    )
    assert len(conforms(await client.get(f"/api/workflows/schedules/{gsid}"))["ticks"]) == 4

    # The recurring shape reaches the same schedules.
    recurring = conforms(await client.get("/api/workflows/recurring", params={"offset": 0}))
    assert {s["schedule_id"] for s in recurring["schedules"]} == {sid, gsid}
    made = await client.post("/api/workflows/recurring", json={"workflow": "greet", **body})
    assert made.status_code == 201, made.text
    rsid = conforms(made)["schedule_id"]
    assert conforms(await client.delete(f"/api/workflows/recurring/{rsid}")) == {"deleted": True}
    assert conforms(await client.delete(f"/api/workflows/schedules/{sid}")) == {"deleted": True}

    # Errors: their codes and bodies.
    gone, sched = 1 << 40, f"/api/workflows/schedules/{gsid}"
    cases: list[tuple[int, httpx.Request]] = [
        (400, client.build_request("POST", "/api/workflows/greet/schedules", json=[])),
        (400, client.build_request("PATCH", sched, json="paused")),
        (400, client.build_request("POST", f"{sched}/trigger", json={"x": 1})),
        (400, client.build_request("POST", f"{sched}/backfill", json=[1])),
        (400, client.build_request("GET", f"{sched}/ticks", params={"outcome": "odd"})),
        (400, client.build_request("GET", f"{sched}/ticks", params={"limit": 501})),
        (400, client.build_request("GET", "/api/workflows/recurring", params={"limit": 0})),
        (400, client.build_request("POST", "/api/workflows/recurring", json=1)),
        (401, client.build_request("GET", sched, headers={"Authorization": ""})),
        (403, client.build_request("POST", f"{sched}/trigger", headers=auth("approver"))),
        (403, client.build_request("DELETE", sched, headers=auth("approver"))),
        (404, client.build_request("GET", f"/api/workflows/schedules/{gone}")),
        (404, client.build_request("GET", "/api/workflows/schedules/x1")),
        (404, client.build_request("PATCH", f"/api/workflows/schedules/{gone}", json={})),
        (404, client.build_request("DELETE", f"/api/workflows/recurring/{gone}")),
        (404, client.build_request("POST", f"/api/workflows/schedules/{gone}/trigger")),
        (404, client.build_request("POST", "/api/workflows/nope/schedules", json=body)),
        (404, client.build_request("GET", "/api/workflows/nope/schedules")),
        (415, client.build_request("PATCH", sched, content=b"{}", headers=TEXT)),
        (422, client.build_request("POST", "/api/workflows/greet/schedules", json={})),
        (422, client.build_request("PATCH", sched, json={"timezone": "Mars/Olympus"})),
        (422, client.build_request("PATCH", sched, json={"cron_expression": "61 * * * *"})),
        (422, client.build_request("POST", f"{sched}/backfill", json={"start": "yesterday"})),
        (422, client.build_request("POST", "/api/workflows/recurring", json=body)),
    ]
    for status, request in cases:
        resp = await client.send(request)
        assert resp.status_code == status, (request.method, request.url, resp.text)
        assert isinstance(conforms(resp)["error"], str)
    bad_input = {**body, "input_data": {"who": 1}}
    resp = await client.post("/api/workflows/greet/schedules", json=bad_input)
    assert resp.status_code == 422 and conforms(resp)["errors"], resp.text
