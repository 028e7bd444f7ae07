"""The Definitions pages over httpx against the real app: the list and its filters, a
definition's versions, diff, graph and runs, the Run form made from its input schema, the
workflow-token forms (run, deploy, arm, rollback, status) with their CSRF checks, what
read-only tokens see, escaping, and the links between a run and its definition."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from daemon.web import defpages, runform
from tests.helpers import wait_for
from tests.test_web import create_gate, csrf_of, sign_in
from tests.test_web_control import graph_of

SCHEMA = {
    "type": "object",
    "required": ["who"],
    "properties": {
        "who": {"type": "string", "title": "Customer"},
        "n": {"type": "integer", "default": 3},
        "x": {"type": "number"},
        "ok": {"type": "boolean", "default": False},
        "tier": {"enum": ["gold", "silver", 3, None]},
        "tags": {"type": "array"},
        "any": {},
    },
}


# -- the Run form, from a schema and back --------------------------------------------------


def test_a_schema_makes_one_field_per_property():
    fields = runform.fields(SCHEMA)
    assert fields is not None
    kinds = {f.name: f.kind for f in fields}
    assert kinds == {"who": "string", "n": "integer", "x": "number", "ok": "boolean",
                     "tier": "enum", "tags": "json", "any": "json"}  # fmt: skip
    by_name = {f.name: f for f in fields}
    assert by_name["who"].required and by_name["who"].title == "Customer"
    assert not by_name["n"].required and by_name["n"].default == "3"
    assert by_name["ok"].default == "false"
    assert [v for v, _ in by_name["tier"].options] == ['"gold"', '"silver"', "3", "null"]
    assert by_name["who"].form_name == "in.who"


@pytest.mark.parametrize("schema", [None, {}, {"type": "object"}, {"type": "array"},
                                    {"type": "string", "properties": {"a": {}}}, "x",
                                    {"properties": {f"p{i}": {} for i in range(61)}}])  # fmt: skip
def test_without_properties_the_input_is_one_json_box(schema):
    assert runform.fields(schema) is None
    assert runform.read(schema, {"input": ' {"a": [1, 2]} '}) == ({"a": [1, 2]}, [])
    assert runform.read(schema, {"input": ""}) == ({}, [])
    data, problems = runform.read(schema, {"input": "{nope"})
    assert data is None and problems[0].startswith("the input is not valid JSON")


def test_the_form_reads_back_typed_values_and_leaves_empty_fields_out():
    form = {"in.who": " Ada ", "in.n": "5", "in.x": "2.50", "in.ok": "true",
            "in.tier": "3", "in.tags": '["a"]', "in.any": ""}  # fmt: skip
    data, problems = runform.read(SCHEMA, form)
    assert problems == []
    assert data == {"who": " Ada ", "n": 5, "x": 2.5, "ok": True, "tier": 3, "tags": ["a"]}
    assert runform.read(SCHEMA, {"in.x": "7", "in.tier": "null"})[0] == {"x": 7, "tier": None}
    assert runform.read(SCHEMA, {"in.who": "", "in.n": " "}) == ({}, [])  # the schema check says
    assert runform.read(SCHEMA, {"in.who": " "}) == ({"who": " "}, [])  # what is missing


def test_values_that_do_not_fit_their_field_are_all_reported():
    form = {"in.n": "2.5", "in.x": "NaN", "in.ok": "yes", "in.tier": '"bronze"',
            "in.tags": "[1,", "in.who": "ok"}  # fmt: skip
    data, problems = runform.read(SCHEMA, form)
    assert sorted(p.split(":")[0] for p in problems) == ["n", "ok", "tags", "tier", "x"]


# -- over HTTP -------------------------------------------------------------------------------

XSS = "<script>alert('x')</script>"
XSS_NAME = "kyc <img src=x onerror=\"alert('x')\">"  # a name has no '/'


@pytest.fixture
async def web(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: no bearer token, keeps cookies."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as c:
        yield c


def flow(*states: str) -> dict[str, Any]:
    """A chain of echo states, the first named start."""
    names = ["start", *states[1:]] if states else ["start"]
    body: dict[str, Any] = {}
    for i, name in enumerate(names):
        nxt = {"next": names[i + 1]} if i + 1 < len(names) else {"done": True}
        body[name] = {"tool": "echo", "args": {"i": i, "who": "<<input.who>>"}, **nxt}
    return body


async def create_def(client: httpx.AsyncClient, name: str, **extra: Any) -> dict[str, Any]:
    tags = extra.pop("tags", [])
    definition = {"name": name, "flow": extra.pop("flow", flow()), **extra}
    resp = await client.post("/api/workflows", json={"definition": definition, "tags": tags})
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()["workflow"]
    return created


async def new_version(
    client: httpx.AsyncClient, def_id: int, summary: str, **changes: Any
) -> dict[str, Any]:
    current = (await client.get(f"/api/workflows/{def_id}")).json()
    body = {**current["definition"], **changes}
    resp = await client.put(f"/api/workflows/{def_id}",
                            json={"definition": body, "change_summary": summary})  # fmt: skip
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


async def flash_of(web: httpx.AsyncClient, resp: httpx.Response) -> tuple[str, str]:
    """Follow a form's redirect: (where it went, "ok: ..." or "error: ...")."""
    assert resp.status_code == 303, resp.text
    where = resp.headers["location"]
    page = await web.get(where)
    found = re.search(r'<p class="flash (\w+)"[^>]*>(.*?)</p>', page.text, re.S)
    assert found, page.text
    return where, f"{found.group(1)}: {html.unescape(found.group(2))}"


async def test_the_pages_need_a_session_and_the_nav_links_them(web):
    for path in ("/ui/definitions", "/ui/definitions/1", "/ui/definitions/kyc"):
        resp = await web.get(path)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    resp = await web.post("/ui/definitions/1/run", data={})
    assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    await sign_in(web)
    page = await web.get("/ui/approvals")
    assert '<a href="/ui/definitions" >Definitions</a>' in page.text.replace("  ", " ")
    empty = await web.get("/ui/definitions")
    assert empty.status_code == 200 and "No saved definitions yet." in empty.text
    assert 'href="/ui/definitions" aria-current="page"' in empty.text
    for path in ("/ui/definitions/12345", "/ui/definitions/nobody", "/ui/definitions/" + "9" * 40):
        missing = await web.get(path)
        assert missing.status_code == 404 and "There is no such definition." in missing.text


async def test_the_list_shows_and_filters_definitions(web, client):
    a = await create_def(client, "kyc", tags=["finance", "eu"], description="Know your customer")
    b = await create_def(client, "payroll", tags=["finance"])
    c = await create_def(client, "onboarding", tags=["hr"])
    await new_version(client, a["id"], "more states", flow=flow("start", "check"))
    resp = await client.patch(f"/api/workflows/{c['id']}/status", json={"status": "paused"})
    assert resp.status_code == 200, resp.text
    await sign_in(web)

    page = (await web.get("/ui/definitions")).text
    rows = re.findall(r'<a class="row-link" href="/ui/definitions/(\d+)">', page)
    assert sorted(map(int, rows)) == sorted([a["id"], b["id"], c["id"]])
    row = page[page.index(f'href="/ui/definitions/{a["id"]}"') :]
    row = row[: row.index("</li>")]
    assert "kyc" in row and "v2" in row and "s-active" in row and "updated" in row
    assert ">finance</a>" in row and ">eu</a>" in row and "Know your customer" in row

    def names(text: str) -> set[str]:
        return set(re.findall(r'<span class="title">([^<]+) <span class="muted">v', text))

    assert names((await web.get("/ui/definitions?status=paused")).text) == {"onboarding"}
    assert names((await web.get("/ui/definitions?status=active")).text) == {"kyc", "payroll"}
    assert names((await web.get("/ui/definitions?tag=finance")).text) == {"kyc", "payroll"}
    assert names((await web.get("/ui/definitions?tag=eu&status=active")).text) == {"kyc"}
    none = (await web.get("/ui/definitions?tag=nothing")).text
    assert names(none) == set() and "No definitions match." in none
    # An unknown status is no filter; a tag links to its filter.
    assert len(names((await web.get("/ui/definitions?status=bogus")).text)) == 3
    assert 'href="/ui/definitions?tag=hr"' in page


async def test_a_definition_page_shows_versions_diff_graph_and_runs(web, client):
    d = await create_def(client, "kyc")
    await new_version(client, d["id"], "add a check", flow=flow("start", "check"))
    await new_version(client, d["id"], "add a report", flow=flow("start", "check", "report"))
    await sign_in(web)
    here = f"/ui/definitions/{d['id']}"
    page = (await web.get(here)).text
    assert '<h1>kyc <span class="muted">v3</span></h1>' in page

    versions = page[page.index('id="versions"') : page.index('id="diff"')]
    assert re.findall(r">v(\d)</a>", versions) == ["3", "2", "1"]  # newest first
    assert (
        versions.index("add a report")
        < versions.index("add a check")
        < versions.index("Initial version")
    )
    assert "by james" in versions and "<time" in versions

    # The diff: by default the latest against the one before.
    diff = page[page.index('id="diff"') : page.index('id="runs"')]
    assert "v2 → v3:" in diff
    assert '<span class="op-name">add</span> <code class="path">/flow/report</code>' in diff
    assert re.search(r'<option value="2" selected>v2</option>', diff)
    chosen = (await web.get(f"{here}?v1=1&v2=3")).text
    api = (await client.get(f"/api/workflows/{d['id']}/diff?v1=1&v2=3")).json()
    assert f"v1 → v3:</strong> {api['summary']}" in chosen
    assert chosen.count('<li class="op op-') == len(api["diff"]) >= 2
    same = (await web.get(f"{here}?v1=2&v2=2")).text
    assert "The two versions have the same content." in same

    # The graph: the latest version's flow, or the one chosen.
    states = {n["state"] for n in graph_of(page)["nodes"] if n["state"]}
    assert states == {"start", "check", "report"}
    assert all(n["status"] in ("none", "done") for n in graph_of(page)["nodes"])
    first = (await web.get(f"{here}?version=1")).text
    assert {n["state"] for n in graph_of(first)["nodes"] if n["state"]} == {"start"}
    assert 'Flow <span class="muted">of version 1</span>' in first
    assert "No runs yet." in page
    by_name = await web.get("/ui/definitions/kyc")
    assert by_name.status_code == 200 and f"#{d['id']}</span>" in by_name.text


async def test_the_run_form_follows_the_input_schema_and_starts_a_run(web, client):
    schema = {"type": "object", "required": ["who"], "properties": {
        "who": {"type": "string"}, "n": {"type": "integer"}, "vip": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver"]}, "extra": {"type": "object"}}}  # fmt: skip
    d = await create_def(client, "kyc", input_schema=schema)
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    page = (await web.get(here)).text
    form = page[page.index('class="run"') :]
    form = form[: form.index("</form>")]
    assert re.search(r'<input id="in-1" name="in.who" type="text" value="" required', form)
    assert 'name="in.n"' in form and 'inputmode="decimal"' in form
    assert re.search(r'<select id="in-3" name="in.vip">', form)
    assert '<option value="&#34;gold&#34;">gold</option>' in form
    assert re.search(r'<textarea id="in-5" name="in.extra"', form)

    fields = {"csrf": csrf, "version": "1", "in.who": "Ada", "in.n": "7", "in.vip": "true",
              "in.tier": '"gold"', "in.extra": '{"a": 1}'}  # fmt: skip
    where, message = await flash_of(web, await web.post(f"{here}/run", data=fields))
    run_id = int(where.rpartition("/")[2])
    assert message == f"ok: Started run {run_id} of kyc v1."
    run = await wait_for(client, run_id)
    assert run["status"] == "completed", run
    assert run["input"] == {"who": "Ada", "n": 7, "vip": True, "tier": "gold", "extra": {"a": 1}}
    assert run["definition_id"] == d["id"] and run["definition_version"] == 1
    assert run["trigger"] == "manual"

    # The run's page names its definition and version and links back; the definition's page
    # lists the run and links to it.
    run_page = (await web.get(where)).text
    assert f'Run of <a href="{here}">kyc</a> v1' in run_page
    listed = (await web.get(here)).text
    runs = listed[listed.index('id="runs"') :]
    assert f'href="/ui/workflows/{run_id}"' in runs and "s-completed" in runs
    assert "manual" in runs and "started" in runs

    # What the schema refuses, or the form cannot read, starts nothing and says why.
    bad = {**fields, "in.n": "many", "in.tier": '"bronze"'}
    where, message = await flash_of(web, await web.post(f"{here}/run", data=bad))
    assert where == here and message.startswith("error: Nothing changed")
    assert "n: not a whole number" in message and "tier: not one of the choices" in message
    missing = {k: v for k, v in fields.items() if k != "in.who"}
    where, message = await flash_of(web, await web.post(f"{here}/run", data=missing))
    assert where == here and message.startswith("error: Nothing changed") and "who" in message
    runs = (await client.get(f"/api/workflows/{d['id']}/runs")).json()
    assert runs["total"] == 1


async def test_without_a_schema_the_run_form_is_one_json_box(web, client):
    d = await create_def(client, "plain")
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    page = (await web.get(here)).text
    assert '<textarea id="run-input" name="input"' in page and 'name="in.' not in page
    resp = await web.post(f"{here}/run", data={"csrf": csrf, "input": '{"who": "Bo", "n": [1]}'})
    where, message = await flash_of(web, resp)
    run = await wait_for(client, int(where.rpartition("/")[2]))
    assert run["input"] == {"who": "Bo", "n": [1]}
    resp = await web.post(f"{here}/run", data={"csrf": csrf, "input": "{oops"})
    _, message = await flash_of(web, resp)
    assert message.startswith("error: Nothing changed") and "not valid JSON" in message


ACTIONS = {"run": {"input": "{}"}, "deploy": {}, "undeploy": {}, "arm": {},
           "rollback": {"version": "1"}, "status": {"status": "archived"}}  # fmt: skip


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_every_form_needs_its_csrf_token(web, client, action):
    d = await create_def(client, "kyc")
    await new_version(client, d["id"], "v2", flow=flow("start", "check"))
    csrf = await sign_in(web, "james")
    for token in ({}, {"csrf": csrf[:-2] + "xx"}, {"csrf": "0" * 64}):
        resp = await web.post(f"/ui/definitions/{d['id']}/{action}",
                              data={**token, **ACTIONS[action]})  # fmt: skip
        assert resp.status_code == 403 and "Form expired" in resp.text
    after = (await client.get(f"/api/workflows/{d['id']}")).json()
    assert after["version"] == 2 and after["status"] == "active" and not after["deployed"]
    assert (await client.get(f"/api/workflows/{d['id']}/runs")).json()["total"] == 0


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_read_only_tokens_see_no_forms_and_change_nothing(web, client, action):
    d = await create_def(client, "kyc")
    await new_version(client, d["id"], "v2", flow=flow("start", "check"))
    assert (await client.post(f"/api/workflows/{d['id']}/deploy")).status_code == 200
    csrf = await sign_in(web, "approver")
    here = f"/ui/definitions/{d['id']}"
    page = (await web.get(here)).text
    for form in ACTIONS:
        assert f'action="{here}/{form}"' not in page
    assert 'id="manage"' not in page and 'id="run"' not in page
    hook = (await client.get(f"/api/workflows/{d['id']}")).json()["webhook"]
    assert hook["webhook_id"] not in page and hook["webhook_secret"] not in page
    assert "deployed" in page and hook["url"] not in page
    resp = await web.post(f"{here}/{action}", data={"csrf": csrf, **ACTIONS[action]})
    where, message = await flash_of(web, resp)
    assert where == here and message.startswith("error: You may not do this")
    after = (await client.get(f"/api/workflows/{d['id']}")).json()
    assert after["version"] == 2 and after["status"] == "active" and after["deployed"]
    assert after["webhook"]["armed_until"] is None
    assert (await client.get(f"/api/workflows/{d['id']}/runs")).json()["total"] == 0


async def test_deploy_arm_undeploy_rollback_and_status_from_the_page(web, client):
    d = await create_def(client, "kyc")
    await new_version(client, d["id"], "add a check", flow=flow("start", "check"))
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"

    async def act(action: str, **fields: str) -> str:
        resp = await web.post(f"{here}/{action}", data={"csrf": csrf, **fields})
        where, message = await flash_of(web, resp)
        assert where == here
        return message

    assert "not deployed" in (await web.get(here)).text
    message = await act("deploy")
    hook = (await client.get(f"/api/workflows/{d['id']}")).json()["webhook"]
    assert message == f"ok: Deployed: its webhook is {hook['url']}."
    page = (await web.get(here)).text
    assert f'<code id="webhook-id">{hook["webhook_id"]}</code>' in page
    assert f'<code id="webhook-secret">{hook["webhook_secret"]}</code>' in page
    assert "the webhook accepts a call only while armed" in page

    message = await act("arm")
    armed = (await client.get(f"/api/workflows/{d['id']}")).json()["webhook"]["armed_until"]
    assert armed and message == f"ok: Armed: the webhook accepts one call until {armed}."
    page = (await web.get(here)).text
    armed_row = page[page.index('id="armed-until"') :]
    assert armed_row.startswith('id="armed-until">until <time') and armed in armed_row

    assert (await act("undeploy")) == "ok: Undeployed: its webhook no longer answers."
    assert not (await client.get(f"/api/workflows/{d['id']}")).json()["deployed"]
    message = await act("arm")
    assert message.startswith("error: Nothing changed")  # 409: not deployed

    message = await act("rollback", version="1")
    after = (await client.get(f"/api/workflows/{d['id']}")).json()
    assert after["version"] == 3 and message == "ok: Rolled back to version 1 as version 3."
    versions = (await client.get(f"/api/workflows/{d['id']}/versions")).json()
    assert "Rollback to version 1" in str(versions)
    assert "Rollback to version 1" in (await web.get(here)).text

    assert (await act("status", status="paused")) == "ok: The status is paused now."
    page = (await web.get(here)).text
    assert 'id="def-status" class="badge s-paused">paused' in page
    assert re.search(r'<button type="submit" class="ok" disabled', page)
    message = await act("run", input="{}")
    assert message.startswith("error: Nothing changed")  # 409: paused
    assert (await act("status", status="bogus")).startswith("error: the status must be one of")
    assert (await act("rollback", version="x")).startswith("error: choose a version")
    assert (await act("explode")).startswith("error: there is no such")


async def test_names_tags_summaries_and_diffs_are_escaped(web, client):
    d = await create_def(client, XSS_NAME, tags=[XSS], description=XSS,
                         input_schema={"type": "object", "properties": {
                             XSS: {"type": "string", "description": XSS, "title": XSS},
                             "e": {"enum": [XSS]}}})  # fmt: skip
    await new_version(client, d["id"], XSS, flow={**flow(), XSS: {"tool": "echo", "done": True}})
    await sign_in(web, "james")
    for path in ("/ui/definitions", f"/ui/definitions/{d['id']}",
                 f"/ui/definitions/{d['id']}?version=1&v1=2&v2=1"):  # fmt: skip
        page = (await web.get(path)).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page, path
        assert "kyc &lt;img src=x onerror=&#34;alert(&#39;x&#39;)&#34;&gt;" in page, path
    page = (await web.get(f"/ui/definitions/{d['id']}")).text
    # The graph's JSON cannot end its script element.
    data = page[page.index('id="graph-data">') :]
    assert "</script>" not in data[: data.index("</script>")].replace("\\u003c", "")
    csrf = csrf_of(page)
    fields = {"csrf": csrf, f"in.{XSS}": XSS, "in.e": orjson.dumps(XSS).decode()}
    resp = await web.post(f"/ui/definitions/{d['id']}/run", data=fields)
    where, _ = await flash_of(web, resp)
    run = await wait_for(client, int(where.rpartition("/")[2]))
    assert run["input"] == {XSS: XSS, "e": XSS}
    run_page = (await web.get(where)).text
    assert "<script>alert" not in run_page and "<img src=x" not in run_page
    assert "Run of <a" in run_page and "kyc &lt;img" in run_page


async def test_a_call_step_and_its_child_link_to_each_other(web, client):
    d = await create_def(client, "kyc")
    body = {
        "name": "onboard",
        "flow": {"start": {"name": "vet", "call": {"workflow": "kyc", "input": {"who": "Ada"}},
                           "done": True}},
        "input": {},
    }  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    parent_id = resp.json()["id"]
    parent = await wait_for(client, parent_id)
    assert parent["status"] == "completed", parent
    (call,) = parent["steps"]
    child_id = call["child_id"]
    await sign_in(web)

    page = (await web.get(f"/ui/workflows/{parent_id}")).text
    row = page[page.index(f'id="step-{call["id"]}"') :]
    row = row[: row.index("</li>")]
    assert f'<a class="child" href="/ui/workflows/{child_id}">workflow #{child_id}</a>' in row
    assert "run-origin" not in page  # a one-off workflow: no definition, no parent
    assert any(n["kind"] == "call" for n in graph_of(page)["nodes"])

    page = (await web.get(f"/ui/workflows/{child_id}")).text
    origin = page[page.index('class="meta run-origin"') :]
    origin = origin[: origin.index("</p>")]
    assert f'Run of <a href="/ui/definitions/{d["id"]}">kyc</a> v1' in origin
    assert "trigger call" in origin
    link = f'<a href="/ui/workflows/{parent_id}#step-{call["id"]}">workflow #{parent_id}</a>'
    assert f"called by {link}" in origin
    runs = (await web.get(f"/ui/definitions/{d['id']}")).text
    runs = runs[runs.index('id="runs"') :]
    assert f'href="/ui/workflows/{child_id}"' in runs and "<span>call</span>" in runs


async def test_the_workflow_list_marks_runs_of_definitions(web, client):
    d = await create_def(client, "kyc")
    resp = await client.post(f"/api/workflows/{d['id']}/run", json={"input_data": {}})
    assert resp.status_code == 202, resp.text
    await create_gate(client, "one-off")
    await sign_in(web)
    page = (await web.get("/ui/workflows")).text
    assert page.count("run of v1 · manual") == 1


async def test_the_list_and_the_runs_page_through(web, client, monkeypatch):
    monkeypatch.setattr(defpages, "LIST_PAGE", 3)
    monkeypatch.setattr(defpages, "RUNS_PAGE", 2)
    for i in range(4):
        d = await create_def(client, f"def-{i}", tags=["t"])
    for _ in range(3):
        resp = await client.post(f"/api/workflows/{d['id']}/run", json={"input_data": {"who": 1}})
        assert resp.status_code == 202, resp.text
        await wait_for(client, resp.json()["run_id"])
    await sign_in(web)
    first = (await web.get("/ui/definitions?tag=t")).text
    assert first.count('class="row-link"') == 3
    assert 'href="/ui/definitions?tag=t&amp;offset=3">Next' in first and "Previous" not in first
    second = (await web.get("/ui/definitions?tag=t&offset=3")).text
    assert second.count('class="row-link"') == 1
    assert 'href="/ui/definitions?tag=t">← Previous' in second and "Next" not in second
    here = f"/ui/definitions/{d['id']}"
    page = (await web.get(here)).text
    runs = page[page.index('id="runs"') :]
    assert runs.count('href="/ui/workflows/') == 2 and 'Runs <span class="muted">(3)' in runs
    assert f'href="{here}?runs_offset=2#runs">Older' in runs
    older = (await web.get(f"{here}?runs_offset=2")).text
    assert older[older.index('id="runs"') :].count('href="/ui/workflows/') == 1
    for status, count in (("completed", 2), ("queued", 0), ("bogus", 2)):
        shown = (await web.get(f"{here}?runs={status}")).text
        assert shown[shown.index('id="runs"') :].count('href="/ui/workflows/') == count, status
