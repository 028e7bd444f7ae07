"""The workflow page's run control (pause, resume or redrive, intervene, signal), its flow
graph and folded steps, and the live inbox and list, over httpx against the real app."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from daemon.web import graph, pages
from daemon.web.actions import merge_patch
from tests.helpers import wait_for, waiting_gate
from tests.test_web import create_gate, sign_in

ACTIONS = ("pause", "resume", "intervene", "signal")
FIELDS = {"name": "go", "input": "{}", "reason": "r"}


@pytest.fixture
async def web(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: no bearer token, keeps cookies."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as c:
        yield c


def graph_of(html: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', html, re.S)
    assert found, "no graph on the page"
    data: dict[str, Any] = orjson.loads(found.group(1))
    return data


async def flash_after(web: Any, resp: Any) -> str:
    assert resp.status_code == 303, resp.text
    page = await web.get(resp.headers["location"])
    found = re.search(r'<p class="flash (\w+)"[^>]*>(.*?)</p>', page.text, re.S)
    assert found, page.text
    return f"{found.group(1)}: {found.group(2)}"


# -- who may use the forms ---------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
async def test_run_control_without_the_csrf_token_is_refused(web, client, action):
    wf_id, _ = await create_gate(client)
    csrf = await sign_in(web, "james")
    for form in ({}, {"csrf": csrf[:-2] + "xx"}):
        resp = await web.post(f"/ui/workflows/{wf_id}/{action}", data={**form, **FIELDS})
        assert resp.status_code == 403 and "Form expired" in resp.text
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and wf["input"] == {"title": "New Policy"}


@pytest.mark.parametrize("action", ACTIONS)
async def test_approve_tokens_neither_see_nor_use_run_control(web, client, action):
    wf_id, _ = await create_gate(client)
    csrf = await sign_in(web, "approver")
    page = (await web.get(f"/ui/workflows/{wf_id}")).text
    assert "Run control" not in page and f"{wf_id}/pause" not in page
    resp = await web.post(f"/ui/workflows/{wf_id}/{action}", data={"csrf": csrf, **FIELDS})
    assert resp.headers["location"] == f"/ui/workflows/{wf_id}"
    message = await flash_after(web, resp)
    assert message.startswith("error: You may not do this")
    assert "lacks the &#39;workflow&#39; permission" in message
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and wf["input"] == {"title": "New Policy"}


async def test_workflow_tokens_see_the_forms_that_fit_the_status(web, client):
    wf_id, _ = await create_gate(client)
    await sign_in(web, "james")
    page = (await web.get(f"/ui/workflows/{wf_id}")).text
    assert "Run control" in page
    assert f'action="/ui/workflows/{wf_id}/pause"' in page
    assert f'action="/ui/workflows/{wf_id}/signal"' in page
    assert f'action="/ui/workflows/{wf_id}/intervene"' in page  # waiting at a gate
    assert f'action="/ui/workflows/{wf_id}/resume"' not in page
    found = re.search(r'<textarea id="intervene-input"[^>]*>(.*?)</textarea>', page, re.S)
    assert found and "&#34;title&#34;: &#34;New Policy&#34;" in found.group(1)  # ready to edit


async def test_an_unknown_action_or_workflow_is_a_message_not_a_500(web, client):
    wf_id, _ = await create_gate(client)
    csrf = await sign_in(web, "james")
    resp = await web.post(f"/ui/workflows/{wf_id}/explode", data={"csrf": csrf})
    assert "there is no such workflow or action" in await flash_after(web, resp)


async def test_bad_json_changes_nothing_and_says_why(web, client):
    wf_id, _ = await create_gate(client)
    csrf = await sign_in(web, "james")
    here = f"/ui/workflows/{wf_id}"
    resp = await web.post(f"{here}/intervene", data={"csrf": csrf, "input": "{nope", "reason": "x"})
    assert "error: The input is not valid JSON" in await flash_after(web, resp)
    resp = await web.post(f"{here}/intervene", data={"csrf": csrf, "input": "[1]", "reason": "x"})
    assert "the input must be a JSON object" in await flash_after(web, resp)
    resp = await web.post(f"{here}/intervene", data={"csrf": csrf, "input": "{}", "reason": " "})
    assert "needs a reason" in await flash_after(web, resp)
    resp = await web.post(f"{here}/signal", data={"csrf": csrf, "name": "go", "data": "{x"})
    assert "error: The signal&#39;s data is not valid JSON" in await flash_after(web, resp)
    resp = await web.post(f"{here}/signal", data={"csrf": csrf, "name": ""})
    assert "A signal needs a name" in await flash_after(web, resp)
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["input"] == {"title": "New Policy"}


# -- the forms at work ---------------------------------------------------------------------------

SIGNAL_FLOW = {
    "start": {"wait": {"signal": "go"}, "next": "review"},
    "review": {"tool": None, "next": "publish"},
    "publish": {"tool": "echo", "args": {"v": "<<input.v>>", "got": "<<steps.start.result>>"},
                "done": True},
}  # fmt: skip


async def test_pause_intervene_resume_and_signal_through_the_forms(web, client, app):
    resp = await client.post("/api/workflow", json={"name": "signalled", "flow": SIGNAL_FLOW,
                                                    "input": {"v": 1, "drop": True}})  # fmt: skip
    wf_id = resp.json()["id"]
    here = f"/ui/workflows/{wf_id}"
    await wait_for(client, wf_id, lambda w: any(s["awaiting"] == "signal" for s in w["steps"]))
    csrf = await sign_in(web, "james")
    page = (await web.get(here)).text
    assert "waiting for a signal" in page and f'action="{here}/intervene"' not in page

    resp = await web.post(f"{here}/pause", data={"csrf": csrf, "reason": "check the data"})
    assert await flash_after(web, resp) == (
        f"ok: Paused workflow {wf_id}: nothing new starts until it is resumed."
    )
    page = (await web.get(here)).text
    assert 'id="wf-status" class="badge s-paused">paused<' in page
    assert f'action="{here}/resume"' in page and f'action="{here}/pause"' not in page
    assert f'action="{here}/intervene"' in page
    assert 'name="from_step"' not in page  # a paused workflow carries on where it stopped

    resp = await web.post(f"{here}/pause", data={"csrf": csrf})
    message = await flash_after(web, resp)
    assert message.startswith(f"error: Nothing changed: workflow {wf_id} is paused"), message

    new_input = '{"v": 2}'  # "drop" removed, "v" changed
    form = {"csrf": csrf, "input": new_input, "reason": "v was wrong"}
    resp = await web.post(f"{here}/intervene", data=form)
    assert await flash_after(web, resp) == f"ok: Changed the input of workflow {wf_id}."
    assert (await client.get(f"/api/workflow/{wf_id}")).json()["input"] == {"v": 2}
    resp = await web.post(f"{here}/intervene",
                          data={"csrf": csrf, "input": new_input, "reason": "again"})  # fmt: skip
    assert "unchanged" in await flash_after(web, resp)

    resp = await web.post(f"{here}/resume", data={"csrf": csrf, "reason": "fixed"})
    assert await flash_after(web, resp) == f"ok: Resumed workflow {wf_id}."
    resp = await web.post(f"{here}/signal", data={"csrf": csrf, "name": "go",
                                                  "data": '{"ok": true}'})  # fmt: skip
    assert await flash_after(web, resp) == f"ok: Sent signal “go” to workflow {wf_id}."
    wf = await wait_for(client, wf_id, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))
    gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
    await client.post(f"/api/workflow/{gate['id']}/ready")
    wf = await wait_for(client, wf_id)
    assert wf["output"] == {"v": 2, "got": {"ok": True}}

    # The workflow has ended: each form answers with the engine's 409, as a message.
    page = (await web.get(here)).text
    assert "Run control" not in page
    for action, form in (("pause", {}), ("resume", {}), ("signal", {"name": "go"}),
                         ("intervene", {"input": "{}", "reason": "late"})):  # fmt: skip
        resp = await web.post(f"{here}/{action}", data={"csrf": csrf, **form})
        message = await flash_after(web, resp)
        assert message.startswith("error: Nothing changed: workflow"), (action, message)
        assert "completed" in message
    events = [e["type"] for e in await app.state.store.events(wf_id)]
    assert {"paused", "intervened", "resumed", "signal_received"} <= set(events)


async def test_a_paused_wait_that_got_its_signal_shows_without_a_time(web, client):
    resp = await client.post("/api/workflow", json={"name": "held", "flow": SIGNAL_FLOW,
                                                    "input": {"v": 1}})  # fmt: skip
    wf_id = resp.json()["id"]
    await wait_for(client, wf_id, lambda w: any(s["awaiting"] == "signal" for s in w["steps"]))
    assert (await client.post(f"/api/workflow/{wf_id}/pause")).status_code == 200
    resp = await client.post(f"/api/workflow/{wf_id}/signal", json={"name": "go", "data": 1})
    assert resp.status_code == 202
    await sign_in(web, "james")
    # The woken step waits for the resume: its run_at is past any date shown.
    page = await web.get(f"/ui/workflows/{wf_id}")
    assert page.status_code == 200, page.text
    assert "next try" not in page.text and "s-paused" in page.text


async def test_redrive_a_rejected_workflow_from_a_chosen_state(web, client):
    wf_id, step_id = await create_gate(client)
    await client.post(f"/api/workflow/{step_id}/reject", json={"reason": "not yet"})
    await wait_for(client, wf_id)
    here = f"/ui/workflows/{wf_id}"
    csrf = await sign_in(web, "james")
    page = (await web.get(here)).text
    assert '<option value="start">from start</option>' in page and "Redrive" in page
    resp = await web.post(f"{here}/resume", data={"csrf": csrf, "from_step": "nowhere"})
    message = await flash_after(web, resp)
    assert message.startswith("error: Nothing changed: from_step: the flow has no top-level")
    resp = await web.post(f"{here}/resume", data={"csrf": csrf, "from_step": "start"})
    assert await flash_after(web, resp) == f"ok: Redriven workflow {wf_id} from start."
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    assert wf["status"] == "running"


async def test_a_gate_in_a_parallel_branch_is_drawn_folded_and_decided_from_the_page(web, client):
    flow = {
        "start": {"parallel": {
            "geo": {"start": {"tool": "echo", "args": {}, "done": True}},
            "crm": {"start": {"name": "check contracts", "tool": None, "done": True}},
        }, "next": "fan"},
        "fan": {"map": {"items": [1, 2, 3], "flow": {"start": {"tool": "echo", "args": {},
                                                               "done": True}}}, "done": True},
    }  # fmt: skip
    resp = await client.post("/api/workflow", json={"name": "nested", "flow": flow})
    wf_id = resp.json()["id"]
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    gate = waiting_gate(wf)
    assert gate is not None
    csrf = await sign_in(web, "approver")
    here = f"/ui/workflows/{wf_id}"
    page = (await web.get(here)).text
    g = graph_of(page)
    check = next(n for n in g["nodes"] if n["label"] == "check contracts")
    assert check["status"] == "waiting" and check["step"] == gate["id"]
    # The gate's row is folded under its parallel's row, and the fold starts open.
    fold = re.search(r'<details class="inner" id="inner-(\d+)" open>', page)
    assert fold, page
    assert page.index(f'id="step-{gate["id"]}"') > fold.start()
    assert "<span>in <code>start / crm</code></span>" in page
    resp = await web.post(f"/ui/steps/{gate['id']}/approve", data={"csrf": csrf, "next": here})
    assert resp.headers["location"] == here
    assert "ok: Approved" in await flash_after(web, resp)
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    g = graph_of((await web.get(here)).text)
    fork = next(n for n in g["nodes"] if n["kind"] == "map-fork")
    assert fork["status"] == "done" and fork["counts"] == "3 done"
    assert next(n for n in g["nodes"] if n["kind"] == "end")["status"] == "done"


# -- the live inbox and list -------------------------------------------------------------------


async def test_the_inbox_and_the_list_follow_every_workflows_events(web, client):
    assert (await web.get("/ui/events")).status_code == 401
    await create_gate(client)
    await sign_in(web)
    for path in ("/ui/approvals", "/ui/workflows"):
        page = (await web.get(path)).text
        found = re.search(r'<div id="live" data-events="/ui/events\?after=(\d+)"', page)
        assert found, page
        assert int(found.group(1)) > 0
    # (The stream itself never ends: tests/test_browser.py watches the pages follow it.)


# -- pure helpers ------------------------------------------------------------------------------


def test_merge_patch_turns_the_old_input_into_the_new():
    before = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "f": "same"}
    after = {"a": 2, "b": {"c": 2}, "e": [1], "f": "same", "g": None}
    patch = merge_patch(before, after)
    assert patch == {"a": 2, "b": {"d": None}, "e": [1], "g": None}
    assert merge_patch({"x": 1}, {"x": 1}) == {}


FLOW = {
    "start": {"name": "fetch order", "tool": "fetch", "next": "enrich"},
    "enrich": {
        "parallel": {
            "geo": {"start": {"tool": "geocode", "done": True}},
            "crm": {
                "start": {"tool": "crm", "next": "check"},
                "check": {"tool": None, "done": True},
            },
        },
        "next": "notify",
    },  # fmt: skip
    "notify": {
        "map": {
            "items": "<<input.users>>",
            "as": "user",
            "flow": {"start": {"tool": "send", "done": True}},
        },
        "next": "review",
        "on_error": "oops",
    },  # fmt: skip
    "review": {"tool": None, "branch": [{"if": "result.ok", "then": "settle"}, {"else": "oops"}]},
    "settle": {"wait": {"signal": "paid"}, "done": True},
    "oops": {"tool": "echo", "done": True},
}


def step(id: int, state: str, status: str, scope: Any = None, **more: Any) -> dict[str, Any]:
    return {"id": id, "state": state, "status": status, "scope": scope, "awaiting": None, **more}


def test_the_graph_has_groups_for_parallels_and_maps_and_live_statuses():
    steps = [
        step(1, "start", "failed"),
        step(2, "start", "done"),  # a later visit of the same state wins
        step(3, "enrich", "running", awaiting="branches"),
        step(4, "start", "done", ["enrich", "geo"], parent_id=3),
        step(5, "start", "done", ["enrich", "crm"], parent_id=3),
        step(6, "check", "running", ["enrich", "crm"], parent_id=3, awaiting="ready"),
        step(7, "notify", "running", awaiting="branches"),
        *(
            step(10 + i, "start", ("done", "running", "failed")[i % 3], ["notify", i], parent_id=7)
            for i in range(7)
        ),  # fmt: skip
    ]
    g = graph.build(FLOW, steps)
    assert g is not None
    groups = {(x["kind"], x["label"]): x for x in g["groups"]}
    assert set(groups) == {("parallel", "enrich"), ("branch", "geo"), ("branch", "crm"),
                           ("map", "notify")}  # fmt: skip
    assert groups[("branch", "crm")]["status"] == "waiting"
    assert groups[("branch", "geo")]["status"] == "done"
    assert groups[("branch", "geo")]["parent"] == groups[("parallel", "enrich")]["id"]
    assert groups[("map", "notify")]["counts"] == "3 done · 2 running · 2 failed"
    # Items not started yet are pending, once the map's branches_started event tells how many.
    totals = graph.item_totals([{"type": "branches_started", "step_id": 7, "data": {"count": 10}}])
    counted = graph.build(FLOW, steps, item_totals=totals)
    assert counted is not None
    assert [x["counts"] for x in counted["groups"] if x["kind"] == "map"] == [
        "3 done · 2 running · 2 failed · 3 pending"
    ]
    nodes = {(n["kind"], n["label"]): n for n in g["nodes"]}
    assert nodes[("tool", "fetch order")]["status"] == "done"
    assert nodes[("tool", "fetch order")]["step"] == 2
    assert nodes[("gate", "check")]["status"] == "waiting"
    assert nodes[("gate", "check")]["parent"] == groups[("branch", "crm")]["id"]
    assert nodes[("tool", "start")]["status"] in ("done", "failed")
    item_node = next(n for n in g["nodes"] if n["parent"] == groups[("map", "notify")]["id"]
                     and n["kind"] == "tool")  # fmt: skip
    assert item_node["status"] == "failed" and item_node["counts"].startswith("3 done")
    assert nodes[("wait", "settle")]["detail"] == "wait for signal paid"
    assert nodes[("wait", "settle")]["status"] == "none"
    by_id = {n["id"]: n for n in g["nodes"]}
    edges = {(by_id[e["source"]]["label"] or by_id[e["source"]]["kind"],
              by_id[e["target"]]["label"] or by_id[e["target"]]["kind"], e["kind"], e["label"])
             for e in g["edges"]}  # fmt: skip
    assert ("review", "settle", "branch", "result.ok") in edges
    assert ("review", "oops", "branch", "else") in edges
    assert ("join", "oops", "error", "on error") in edges  # from the map's join
    assert ("enrich", "start", "fork", None) in edges
    assert ("settle", "done", "done", None) in edges


def test_a_map_of_many_items_is_one_group_with_counts():
    steps = [step(1, "notify", "running", awaiting="branches")]
    steps += [step(2 + i, "start", "done" if i < 9000 else "running", ["notify", i], parent_id=1)
              for i in range(9500)]  # fmt: skip
    flow = {"notify": {"map": {"items": list(range(10_000)),
                               "flow": {"start": {"tool": "send", "done": True}}}, "done": True},
            "start": {"tool": "echo", "next": "notify"}}  # fmt: skip
    g = graph.build(flow, steps)
    assert g is not None and len(g["nodes"]) < 10
    group = next(x for x in g["groups"] if x["kind"] == "map")
    assert group["counts"] == "9000 done · 500 running · 500 pending"


def test_folds_show_the_latest_inner_steps_and_count_them_all():
    steps = [step(1, "notify", "running", awaiting="branches")]
    steps += [step(2 + i, "start", "failed" if i == 3 else "done", ["notify", i], parent_id=1)
              for i in range(120)]  # fmt: skip
    top, inner = pages.step_tree(steps)
    assert [s["id"] for s in top] == [1]
    fold = pages.fold(inner, 1)
    assert fold["total"] == 120 and fold["hidden"] == 120 - pages.INNER_ROWS
    assert [s["id"] for s in fold["rows"]] == list(range(72, 122))
    assert fold["counts"] == "119 done · 1 failed" and fold["open"]


def test_the_page_keeps_csrf_in_every_control_form():
    # Every form the control template renders carries the session's CSRF token field.
    source = pages.ENV.loader.get_source(pages.ENV, "_control.html")[0]  # type: ignore[union-attr]
    assert source.count("<form") == source.count("m.hidden(page_url)") == 4
