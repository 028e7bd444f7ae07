"""The shipped workflow templates (daemon/templates/*.json) and their loader, daemon.catalog.

Every template must validate on a stock daemon (built-in tools only), carry an input
schema that is valid JSON Schema 2020-12 and accepts its example input, and run to the
end against loopback HTTP servers standing in for the APIs it talks to.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest

from daemon import catalog, flowschema
from tests.helpers import auth, wait_for, waiting_gate

IDS = [t["id"] for t in catalog.list_templates()]
BUILTIN_TOOLS = {"echo", "sleep", "http"}
DAG_TYPES = {"http_request", "webhook", "wait"}  # the DAG shape's types for built-ins
TEMPLATES = {t: catalog.get_template(t) for t in IDS}
FLOW_BODIES = jsonschema.Draft202012Validator(flowschema.submission())


# --- a loopback stand-in for the APIs the templates call --------------------------------


class Api(ThreadingHTTPServer):
    """GET /records answers `records` (a JSON list), GET /text plain text; any POST is
    recorded and answered {"ok": true, "received": <its JSON body>}; /broken answers 500."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.records: list[Any] = [{"id": i, "total": 10 * i} for i in range(1, 9)]
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: Api

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/records":
            self._answer(200, orjson.dumps(self.server.records), "application/json")
        elif self.path == "/text":
            self._answer(200, b"all systems nominal", "text/plain")
        else:
            self._answer(404, b'{"error": "not found"}', "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/broken":
            self._answer(500, b'{"error": "broken"}', "application/json")
            return
        received = orjson.loads(body) if body else None
        with self.server.lock:
            self.server.posts.append(
                {"path": self.path, "json": received, "headers": dict(self.headers)}
            )
        self._answer(200, orjson.dumps({"ok": True, "received": received}), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def api_server() -> Iterator[Api]:
    server = Api()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def api() -> Iterator[Api]:
    with api_server() as server:
        yield server


def one_off(template_id: str, input_: dict[str, Any]) -> dict[str, Any]:
    """A part-one create body running the template's definition with this input."""
    definition = catalog.get_template(template_id)["definition"]
    shape = "flow" if "flow" in definition else "steps"
    return {"name": definition["name"], shape: definition[shape], "input": input_}


def checked_input(template_id: str, input_: dict[str, Any]) -> dict[str, Any]:
    """`input_`, once the template's input_schema accepts it (as a definition run does)."""
    schema = TEMPLATES[template_id]["definition"]["input_schema"]
    jsonschema.Draft202012Validator(schema).validate(input_)
    return input_


async def run(client: httpx.AsyncClient, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    return await wait_for(client, resp.json()["id"], **kw)


def tools_of(flow: dict[str, Any]) -> Iterator[str | None]:
    """Every tool a flow names, in nested parallel and map flows too."""
    for state in flow.values():
        if "tool" in state:
            yield state["tool"]
        for branch in state.get("parallel", {}).values():
            yield from tools_of(branch)
        if "map" in state:
            yield from tools_of(state["map"]["flow"])


# --- the loader --------------------------------------------------------------------------


def test_the_four_promised_templates_ship() -> None:
    assert {"approval-gated-write", "fetch-and-notify", "fan-out-over-list",
            "daily-report"} <= set(IDS)  # fmt: skip
    assert IDS == sorted(IDS)
    for summary in catalog.list_templates():
        assert set(summary) == {"id", "name", "description", "category", "is_builtin", "tags"}
        assert summary["is_builtin"] is True


def test_files_are_named_after_their_ids_and_installed_as_package_data() -> None:
    folder = resources.files("daemon") / "templates"
    names = sorted(e.name for e in folder.iterdir() if e.name.endswith(".json"))
    assert names == [f"{i}.json" for i in IDS]
    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    assert '"templates/*.json"' in pyproject.read_text()


def test_category_filter_and_lookup() -> None:
    for category in catalog.categories():
        listed = catalog.list_templates(category)
        assert listed and all(t["category"] == category for t in listed)
    assert catalog.list_templates("no-such-category") == []
    assert catalog.get_template("no-such-template") is None
    full = catalog.get_template("daily-report")
    assert full["definition"]["flow"]["start"]["tool"] == "http"
    assert full["is_builtin"] is True
    assert catalog.definition_for("daily-report") == full["definition"]
    assert catalog.definition_for("daily-report", "ops-report")["name"] == "ops-report"
    assert catalog.definition_for("no-such-template") is None


def test_callers_get_copies() -> None:
    first = catalog.get_template("fan-out-over-list")
    first["definition"]["name"] = "mine"
    first["definition"]["flow"].clear()
    catalog.list_templates()[0]["tags"].append("changed")
    again = catalog.get_template("fan-out-over-list")
    assert again["definition"]["name"] == "fan-out-over-list"
    assert again["definition"]["flow"]
    assert "changed" not in catalog.list_templates()[0]["tags"]


@pytest.mark.parametrize(
    ("filename", "template", "problem"),
    [
        ("a.json", {"id": "b"}, "does not match the file name"),
        ("a.json", {"id": "a", "extra": 1}, "unknown field 'extra'"),
        ("a.json", {"id": "a", "tags": "x"}, "field 'tags' must be a list"),
        ("a.json", {"id": "a", "definition": {"name": "a", "flow": {}, "steps": []}},
         "exactly one of 'flow' or 'steps'"),
        ("a.json", {"id": "a", "definition": {"name": "a", "flow": {}, "input": {}}},
         "definition: unknown field 'input'"),
        ("A b.json", {"id": "A b"}, "lowercase letters, digits and dashes"),
        ("a.json", {"id": "a", "definition": {"name": "123", "flow": {}}}, "not all digits"),
        ("a.json", {"id": "a", "definition": {"name": "a", "flow": {}, "concurrency": 0}},
         "'concurrency' must be from 1 to 1000"),
        ("a.json", {"id": "a", "definition": {"name": "a", "flow": {}, "tags": [1]}},
         "definition: field 'tags' must be a list"),
        ("a.json", {"id": "a", "definition": {"name": "runs", "flow": {}}}, "'runs' is reserved"),
    ],
)  # fmt: skip
def test_a_malformed_file_is_refused_naming_it(filename: str, template: dict, problem: str) -> None:
    good = {"id": "a", "name": "A", "description": "d", "category": "c", "tags": [],
            "definition": {"name": "a", "flow": {}}}  # fmt: skip
    with pytest.raises(catalog.CatalogError, match=problem) as caught:
        catalog.parse(filename, orjson.dumps({**good, **template}))
    assert str(caught.value).startswith(f"{filename}: ")
    with pytest.raises(catalog.CatalogError, match="not JSON"):
        catalog.parse("a.json", b"{")


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(catalog.CatalogError, match="no templates"):
        catalog.load_folder(tmp_path)


# --- what each template holds ------------------------------------------------------------


@pytest.mark.parametrize("template_id", IDS)
def test_input_schema_is_json_schema_and_accepts_the_example(template_id: str) -> None:
    template = TEMPLATES[template_id]
    schema = template["definition"]["input_schema"]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(template["example_input"])
    assert list(validator.iter_errors({})), "an empty input should miss required fields"
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{template_id}: input '{name}' has no description"
        if "default" in prop:  # defaults obey their own property's schema
            jsonschema.Draft202012Validator(prop).validate(prop["default"])
        if name not in schema.get("required", []):
            assert "default" in prop, f"{template_id}: optional '{name}' has no default"


@pytest.mark.parametrize("template_id", IDS)
def test_only_built_in_tools(template_id: str) -> None:
    definition = TEMPLATES[template_id]["definition"]
    if "flow" in definition:
        assert set(tools_of(definition["flow"])) <= BUILTIN_TOOLS | {None}
    else:
        for step in definition["steps"]:
            assert step.get("type") in DAG_TYPES or step.get("tool") in BUILTIN_TOOLS | {None}


@pytest.mark.parametrize("template_id", IDS)
def test_body_matches_the_flow_schema(template_id: str) -> None:
    body = one_off(template_id, TEMPLATES[template_id]["example_input"])
    FLOW_BODIES.validate(body)


@pytest.mark.parametrize("template_id", IDS)
async def test_validates_on_a_stock_daemon(make_client: Any, template_id: str) -> None:
    """POST /api/workflow/validate on a daemon with no tool modules (built-ins only):
    valid, with neither errors nor warnings."""
    client, _ = await make_client(tool_modules=())
    tools = (await client.get("/api/tools")).json()
    names = {t["name"] for t in (tools["tools"] if isinstance(tools, dict) else tools)}
    assert names == BUILTIN_TOOLS
    body = one_off(template_id, TEMPLATES[template_id]["example_input"])
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"valid": True, "errors": [], "warnings": []}


# --- end to end, against loopback servers --------------------------------------------------


async def test_fetch_and_notify_runs(client: httpx.AsyncClient, api: Api) -> None:
    input_ = checked_input("fetch-and-notify", {"source_url": api.url("/records"),
                                                 "webhook_url": api.url("/hook")})  # fmt: skip
    wf = await run(client, one_off("fetch-and-notify", input_))
    assert wf["status"] == "completed", wf
    [post] = api.posts
    assert post["path"] == "/hook"
    assert post["json"]["text"] == f"Fetched: {api.url('/records')} answered HTTP 200"
    assert post["json"]["status"] == 200
    assert post["json"]["data"] == api.records
    assert wf["output"]["json"]["ok"] is True

    # A source that answers text passes the text on.
    input_ = {**input_, "source_url": api.url("/text"), "title": "Health"}
    wf = await run(client, one_off("fetch-and-notify", checked_input("fetch-and-notify", input_)))
    assert wf["status"] == "completed", wf
    assert api.posts[1]["json"]["data"] == "all systems nominal"
    assert api.posts[1]["json"]["text"].startswith("Health: ")


async def test_fan_out_runs_every_item_in_order(client: httpx.AsyncClient, api: Api) -> None:
    items = [{"id": f"doc-{i}"} for i in range(12)]
    input_ = checked_input("fan-out-over-list", {"endpoint": api.url("/reindex"), "items": items})
    wf = await run(client, one_off("fan-out-over-list", input_), timeout=30)
    assert wf["status"] == "completed", wf
    out = wf["output"]
    assert out["processed"] == 12
    assert [r["index"] for r in out["results"]] == list(range(12))
    assert [r["response"]["received"]["item"] for r in out["results"]] == items
    assert sorted(p["json"]["index"] for p in api.posts) == list(range(12))
    keys = {p["headers"]["Idempotency-Key"] for p in api.posts}
    assert keys == {f"stepd-{wf['id']}-{i}" for i in range(12)}
    assert {p["json"]["batch"] for p in api.posts} == {wf["id"]}


async def test_fan_out_fails_on_a_failing_item(client: httpx.AsyncClient, api: Api) -> None:
    body = one_off("fan-out-over-list", {"endpoint": api.url("/broken"), "items": [1]})
    # No backoff to wait for: a one-attempt copy of the item's state.
    item = body["flow"]["start"]["map"]["flow"]["start"]
    item["retry"] = {"max_attempts": 1}
    wf = await run(client, body)
    assert wf["status"] == "failed"
    assert "answered 500" in wf["error"]


async def test_daily_report_with_defaults_only(client: httpx.AsyncClient, api: Api) -> None:
    """A schedule passing nothing but the source: every other input takes its default."""
    input_ = checked_input("daily-report", {"source_url": api.url("/records")})
    wf = await run(client, one_off("daily-report", input_))
    assert wf["status"] == "completed", wf
    report = wf["output"]["report"]
    assert report["title"] == "Daily report"
    assert report["count"] == 8
    assert report["highlights"] == api.records[:5]
    assert report["as_of"].endswith(" GMT")  # the source's Date header
    assert report["text"].startswith("Daily report (as of ")
    assert report["text"].endswith(f": 8 records from {api.url('/records')}")
    assert wf["output"]["delivered_to"] is None
    assert api.posts == []
    assert [s["name"] for s in wf["steps"]] == ["Fetch the records", "Write the summary", "Report"]


async def test_daily_report_delivers_to_a_webhook(client: httpx.AsyncClient, api: Api) -> None:
    input_ = checked_input("daily-report", {
        "source_url": api.url("/records"), "title": "Orders", "max_items": 2,
        "webhook_url": api.url("/hook"),
    })  # fmt: skip
    wf = await run(client, one_off("daily-report", input_))
    assert wf["status"] == "completed", wf
    [post] = api.posts
    assert post["json"]["text"].startswith("Orders (as of ")
    assert post["json"]["report"]["highlights"] == api.records[:2]
    assert post["headers"]["Idempotency-Key"] == f"stepd-{wf['id']}"
    assert wf["output"]["delivered_to"] == api.url("/hook")


async def test_approval_gated_write_writes_once_approved(
    client: httpx.AsyncClient, api: Api
) -> None:
    record = {"title": "Travel policy", "scope": "general"}
    input_ = checked_input("approval-gated-write", {"url": api.url("/policies"), "record": record})
    resp = await client.post("/api/workflow", json=one_off("approval-gated-write", input_))
    assert resp.status_code == 201, resp.text
    wf = await wait_for(client, resp.json()["id"], until=waiting_gate)
    gate = waiting_gate(wf)
    assert gate["name"] == "Wait for a reviewer"
    proposal = orjson.loads(wf["steps"][0]["result_json"])  # what the reviewer sees
    assert proposal == {"summary": "(no summary given)", "method": "POST",
                        "url": api.url("/policies"), "record": record}  # fmt: skip
    assert api.posts == []
    # Only a token with the `approve` permission may decide: not the creator's.
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={})
    assert resp.status_code == 403, resp.text
    resp = await client.post(
        f"/api/workflow/{gate['id']}/ready", json={"note": "ok"}, headers=auth("approver")
    )
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf["id"])
    assert wf["status"] == "completed", wf
    [post] = api.posts
    assert post["json"] == record
    assert post["headers"]["Idempotency-Key"] == f"stepd-{wf['id']}"
    assert wf["output"] == {"written": True, "url": api.url("/policies"), "status": 200,
                            "response": {"ok": True, "received": record},
                            "review": {"note": "ok"}}  # fmt: skip


async def test_approval_gated_write_rejected_writes_nothing(
    client: httpx.AsyncClient, api: Api
) -> None:
    input_ = checked_input("approval-gated-write", {
        "url": api.url("/policies"), "record": {"title": "x"}, "summary": "Risky change",
    })  # fmt: skip
    resp = await client.post("/api/workflow", json=one_off("approval-gated-write", input_))
    wf = await wait_for(client, resp.json()["id"], until=waiting_gate)
    assert orjson.loads(wf["steps"][0]["result_json"])["summary"] == "Risky change"
    gate = waiting_gate(wf)
    resp = await client.post(
        f"/api/workflow/{gate['id']}/reject",
        json={"reason": "not this quarter"},
        headers=auth("approver"),
    )
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf["id"])
    assert wf["status"] == "completed", wf
    assert wf["output"]["written"] is False
    assert "not this quarter" in wf["output"]["reason"]
    assert api.posts == []


async def test_await_callback_completes_on_its_signal(client: httpx.AsyncClient, api: Api) -> None:
    job = {"document": "invoice-2041", "format": "pdf"}
    input_ = checked_input("await-callback", {"job_url": api.url("/jobs"), "job": job})
    resp = await client.post("/api/workflow", json=one_off("await-callback", input_))
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id, until=lambda wf: wf["steps"][-1]["awaiting"] == "signal")
    [post] = api.posts
    assert post["json"] == {
        "job": job,
        "callback": {
            "url": f"http://127.0.0.1:8000/api/workflow/{wf_id}/signal",
            "signal": "job.finished",
        },
    }
    assert post["headers"]["Idempotency-Key"] == f"stepd-{wf_id}"
    data = {"status": "succeeded", "url": "https://files.example.com/invoice-2041.pdf"}
    resp = await client.post(f"/api/workflow/{wf_id}/signal",
                             json={"name": "job.finished", "data": data})  # fmt: skip
    assert resp.status_code == 202, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"finished": True, "status": "succeeded", "callback": data,
                            "accepted": {"ok": True, "received": post["json"]}}  # fmt: skip


async def test_await_callback_fails_on_a_failed_job(client: httpx.AsyncClient, api: Api) -> None:
    """A callback sent at once (perhaps before the wait starts) is kept and consumed."""
    input_ = checked_input("await-callback", {
        "job_url": api.url("/jobs"), "job": {}, "stepd_url": "https://stepd.internal:8443",
    })  # fmt: skip
    resp = await client.post("/api/workflow", json=one_off("await-callback", input_))
    wf_id = resp.json()["id"]
    resp = await client.post(f"/api/workflow/{wf_id}/signal", json={
        "name": "job.finished", "data": {"status": "failed", "why": "disk full"}})  # fmt: skip
    assert resp.status_code == 202, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed", wf
    assert "'check'" in wf["error"] and "disk full" in wf["error"]
    assert api.posts[0]["json"]["callback"]["url"].startswith("https://stepd.internal:8443/")


async def test_await_callback_times_out(client: httpx.AsyncClient, api: Api) -> None:
    body = one_off("await-callback", {"job_url": api.url("/jobs"), "job": {}})
    body["flow"]["wait_callback"]["wait"]["timeout"] = 0.2  # instead of a day
    wf = await run(client, body)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"finished": False, "reason": "wait timed out"}


# --- saved as definitions (what installing a template does) --------------------------------


async def install(client: httpx.AsyncClient, template_id: str, name: str) -> dict[str, Any]:
    definition = catalog.definition_for(template_id, name)
    resp = await client.post("/api/workflows", json={"definition": definition})
    assert resp.status_code == 201, resp.text
    return resp.json()["workflow"]


async def run_definition(
    client: httpx.AsyncClient, name: str, input_data: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    resp = await client.post(f"/api/workflows/{name}/run", json={"input_data": input_data})
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["run_id"]
    await wait_for(client, run_id, **kw)
    resp = await client.get(f"/api/workflows/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()["run"]


@pytest.mark.parametrize("template_id", IDS)
async def test_saves_as_a_definition_on_a_stock_daemon(make_client: Any, template_id: str) -> None:
    client, _ = await make_client(tool_modules=())
    definition = catalog.definition_for(template_id)
    resp = await client.post("/api/workflows/validate", json={"definition": definition})
    assert resp.status_code == 200, resp.text
    assert resp.json()["valid"] is True, resp.json()
    saved = await install(client, template_id, f"my-{template_id}")
    assert saved["version"] == 1 and saved["status"] == "active"
    assert saved["definition"] == {**definition, "name": f"my-{template_id}"}
    assert saved["concurrency"] == definition["concurrency"]
    assert saved["tags"] == definition["tags"]
    # Its input_schema is enforced: an empty input misses every required field.
    resp = await client.post(f"/api/workflows/my-{template_id}/run", json={"input_data": {}})
    assert resp.status_code == 422, resp.text
    problems = " ".join(resp.json()["errors"])
    for field in definition["input_schema"]["required"]:
        assert f'"{field}" is a required property' in problems


async def test_installed_fan_out_runs(client: httpx.AsyncClient, api: Api) -> None:
    await install(client, "fan-out-over-list", "reindex")
    items = [{"id": f"doc-{i}"} for i in range(6)]
    run = await run_definition(
        client, "reindex", {"endpoint": api.url("/reindex"), "items": items}, timeout=30
    )
    assert run["status"] == "completed", run
    assert run["workflow_name"] == "reindex" and run["version"] == 1
    assert run["output"]["processed"] == 6
    # The map, two states per item, and the report.
    assert len(run["step_runs"]) == 1 + 2 * 6 + 1
    assert {s["status"] for s in run["step_runs"]} == {"completed"}


async def test_installed_daily_report_runs_with_schedule_input(
    client: httpx.AsyncClient, api: Api
) -> None:
    template = catalog.get_template("daily-report")
    await install(client, "daily-report", "orders-report")
    input_data = {**template["suggested_schedule"]["input_data"], "source_url": api.url("/records")}
    run = await run_definition(client, "orders-report", input_data)
    assert run["status"] == "completed", run
    assert run["output"]["report"]["title"] == "Orders, last 24 hours"
    assert run["output"]["report"]["count"] == 8
    # Inputs the schema does not know are refused, as a schedule's typo would be.
    resp = await client.post("/api/workflows/orders-report/run",
                             json={"input_data": {**input_data, "titel": "x"}})  # fmt: skip
    assert resp.status_code == 422, resp.text
