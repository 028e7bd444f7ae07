"""Every example of the reference API, end to end against the real app and a real SQLite file."""

from __future__ import annotations

import orjson

from tests.helpers import wait_for, waiting_gate

LINEAR = {
    "name": "my-workflow",
    "flow": {
        "start": {"name": "greet", "tool": "get_greeting", "args": {}, "next": "count"},
        "count": {"name": "count", "tool": "get_counter", "args": {}, "done": True},
    },
    "input": {},
}

SEARCH = {
    "name": "knowledge-search",
    "flow": {
        "start": {
            "name": "search",
            "tool": "knowledge_search",
            "args": {"query": "{{input.topic}}"},
            "done": True,
        }
    },
    "input": {"topic": "access control permissions"},
}

APPROVAL = {
    "name": "write-with-approval",
    "flow": {
        "start": {"name": "await_approval", "tool": None, "args": {}, "next": "do_write"},
        "do_write": {
            "name": "do_write",
            "tool": "knowledge_add",
            "args": {
                "title": "{{input.title}}",
                "content": "{{input.content}}",
                "scope": "general",
            },
            "done": True,
        },
    },
    "input": {
        "title": "New Policy",
        "content": "All agents must request approval before writing.",
    },
}


def branch_demo(tool: str = "is_admin", args: dict | None = None) -> dict:
    return {
        "name": "branch-demo",
        "flow": {
            "start": {
                "name": "check",
                "tool": tool,
                "args": args or {},
                "branch": [
                    {"if": "result == true", "then": "admin_path"},
                    {"if": "result == false", "then": "user_path"},
                ],
            },
            "admin_path": {
                "name": "admin_path",
                "tool": "get_greeting",
                "args": {"name": "World"},
                "done": True,
            },
            "user_path": {"name": "user_path", "tool": "get_counter", "args": {}, "done": True},
        },
        "input": {},
    }


async def test_create_and_run_linear_flow(client):
    resp = await client.post("/api/workflow", json=LINEAR)
    assert resp.status_code == 201
    body = resp.json()
    assert set(body) == {"id", "status"} and body["status"] == "started"
    assert isinstance(body["id"], int) and body["id"] > 1_700_000_000_000  # ms epoch

    wf = await wait_for(client, body["id"])
    assert wf["status"] == "completed"
    assert wf["created_by"] == "james"
    assert [s["name"] for s in wf["steps"]] == ["greet", "count"]
    greet, count = wf["steps"]
    assert greet["status"] == count["status"] == "done"
    assert greet["attempt"] == 1
    assert orjson.loads(greet["result_json"]) == "Hello, World!"
    assert isinstance(orjson.loads(count["result_json"]), int)
    assert greet["started_at"] <= greet["completed_at"] <= count["started_at"]
    assert wf["completed_at"] is not None and wf["cancelled_at"] is None


async def test_input_templating_reaches_the_tool(client):
    resp = await client.post("/api/workflow", json=SEARCH)
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "completed"
    (step,) = wf["steps"]
    assert step["name"] == "search" and step["tool"] == "knowledge_search"
    hits = orjson.loads(step["result_json"])
    assert hits[0]["title"] == "Access Control"
    assert 0 < hits[0]["score"] <= 1


async def test_approval_gate_walkthrough(client):
    # Step 1: create.
    resp = await client.post("/api/workflow", json=APPROVAL)
    assert resp.status_code == 201
    wf_id = resp.json()["id"]

    # Step 2: the gate waits: status running, awaiting ready; the workflow is running.
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running"
    gate = wf["steps"][0]
    assert gate["name"] == "await_approval" and gate["tool"] is None
    assert gate["status"] == "running" and gate["awaiting"] == "ready"

    # Step 3: approve.
    resp = await client.post(f"/api/workflow/{gate['id']}/ready")
    assert resp.status_code == 200
    assert resp.json() == {"queued": True}

    # Step 4: completed; the write ran with the templated input.
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert wf["steps"][0]["decided_by"] == "james"
    assert wf["steps"][1]["status"] == "done"
    written = orjson.loads(wf["steps"][1]["result_json"])
    assert written["title"] == "New Policy" and written["created"] is True

    # The article is now searchable.
    search = {**SEARCH, "input": {"topic": "agents approval writing"}}
    wf = await wait_for(client, (await client.post("/api/workflow", json=search)).json()["id"])
    titles = [hit["title"] for hit in orjson.loads(wf["steps"][0]["result_json"])]
    assert "New Policy" in titles


async def test_gate_does_not_move_without_ready(client, app):
    wf_id = (await client.post("/api/workflow", json=APPROVAL)).json()["id"]
    await app.state.executor.tick()
    await app.state.executor.tick()
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and len(wf["steps"]) == 1
    assert waiting_gate(wf) is not None


async def test_ready_body_becomes_gate_result_and_drives_branch(client):
    flow = {
        "name": "approve-or-not",
        "flow": {
            "start": {
                "tool": None,
                "branch": [
                    {"if": "result.approved", "then": "yes"},
                    {"else": "no"},
                ],
            },
            "yes": {"tool": "echo", "args": {"said": "<<steps.start.result.note>>"}, "done": True},
            "no": {"tool": "echo", "args": {}, "done": True},
        },
    }
    wf_id = (await client.post("/api/workflow", json=flow)).json()["id"]
    wf = await wait_for(client, wf_id, waiting_gate)
    resp = await client.post(
        f"/api/workflow/{waiting_gate(wf)['id']}/ready",
        json={"approved": True, "note": "ship it"},
    )
    assert resp.status_code == 200
    wf = await wait_for(client, wf_id)
    assert [s["state"] for s in wf["steps"]] == ["start", "yes"]
    assert orjson.loads(wf["steps"][0]["result_json"]) == {"approved": True, "note": "ship it"}
    assert orjson.loads(wf["steps"][1]["result_json"]) == {"said": "ship it"}


async def test_branching_admin_path(client):
    # The token is "james", an admin in the demo data.
    resp = await client.post("/api/workflow", json=branch_demo())
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "completed"
    assert [s["name"] for s in wf["steps"]] == ["check", "admin_path"]
    assert orjson.loads(wf["steps"][0]["result_json"]) is True


async def test_branching_user_path(client):
    body = branch_demo(args={"user": "mallory"})
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    assert [s["name"] for s in wf["steps"]] == ["check", "user_path"]


async def test_branch_without_match_fails_the_workflow(client):
    body = branch_demo(tool="echo", args={"x": 1})  # result is {"x": 1}: neither true nor false
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "failed"
    assert "state 'start'" in wf["error"] and "no branch matched" in wf["error"]
    assert '{"x":1}' in wf["error"]


async def test_list_newest_first_with_limit(client):
    ids = [(await client.post("/api/workflow", json=APPROVAL)).json()["id"] for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5

    listed = (await client.get("/api/workflow")).json()
    assert [w["id"] for w in listed] == ids[::-1]
    first = listed[0]
    for key in ("id", "updated_at", "name", "status", "created_by", "completed_at",
                "cancelled_at"):  # fmt: skip
        assert key in first
    assert first["name"] == "write-with-approval" and first["status"] == "running"

    two = (await client.get("/api/workflow?limit=2")).json()
    assert [w["id"] for w in two] == ids[:-3:-1]
    page = (await client.get(f"/api/workflow?limit=2&before={two[-1]['id']}")).json()
    assert [w["id"] for w in page] == [ids[2], ids[1]]
    assert (await client.get("/api/workflow?status=completed")).json() == []


async def test_list_default_limit_is_50(client):
    for _ in range(55):
        assert (await client.post("/api/workflow", json=APPROVAL)).status_code == 201
    assert len((await client.get("/api/workflow")).json()) == 50
    assert len((await client.get("/api/workflow?limit=55")).json()) == 55


async def test_cancel(client):
    wf_id = (await client.post("/api/workflow", json=APPROVAL)).json()["id"]
    resp = await client.delete(f"/api/workflow/{wf_id}")
    assert resp.status_code == 200 and resp.json() == {"cancelled": True}
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "cancelled" and wf["cancelled_at"] is not None
    assert wf["steps"][0]["status"] == "cancelled" and wf["steps"][0]["awaiting"] is None
    # A cancelled gate cannot be released; a finished workflow cannot be cancelled.
    resp = await client.post(f"/api/workflow/{wf['steps'][0]['id']}/ready")
    assert resp.status_code == 409
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 409


async def test_reference_error_table(client):
    resp = await client.post("/api/workflow", json={"flow": LINEAR["flow"]})
    assert resp.status_code == 400 and "name" in resp.json()["error"]

    resp = await client.post("/api/workflow", json={"name": "x", "flow": {"other": {}}})
    assert resp.status_code == 422
    assert resp.json()["error"].startswith("Flow must have a 'start' key")

    resp = await client.post(
        "/api/workflow", json={"name": "x", "flow": {"start": {"tool": "echo", "done": True}}}
    )
    assert resp.status_code == 201
    resp = await client.get("/api/workflow/1")
    assert resp.status_code == 404 and resp.json() == {"error": "workflow 1 not found"}


async def test_missing_start_message_is_exactly_the_reference(client):
    resp = await client.post("/api/workflow", json={"name": "x", "flow": {}})
    assert resp.status_code == 422
    assert resp.json()["error"] == "Flow must have a 'start' key"
