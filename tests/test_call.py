"""The call state end to end over HTTP (spec §7): a flow runs a saved definition as a
child workflow and takes its output as the result; failures, retries, timeouts, cancel,
pause and resume reach the child; depth is limited; the version can be pinned."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import Config
from tests.helpers import TERMINAL, auth, make_config, wait_for, waiting_gate

ECHO_X = {"start": {"tool": "echo", "args": {"got": "<<input.x>>"}, "done": True}}
GATED = {
    "start": {"tool": None, "next": "end"},
    "end": {"tool": "echo", "args": {"approved": True}, "done": True},
}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, tool_modules=("daemon.tools.demo", "tests.sample_tools"),
                       poll_interval=0.2)  # fmt: skip


async def define(client: httpx.AsyncClient, name: str, flow: dict[str, Any], **extra: Any) -> int:
    body = {"definition": {"name": name, "flow": flow, **extra}}
    resp = await client.post("/api/workflows", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def start(client: httpx.AsyncClient, flow: dict[str, Any], input: Any = None) -> int:
    resp = await client.post("/api/workflow", json={"name": "parent", "flow": flow,
                                                    "input": input or {}})  # fmt: skip
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def step(wf: dict[str, Any], state: str) -> dict[str, Any]:
    """The latest visit of a state (at any depth)."""
    found = [s for s in wf["steps"] if s["state"] == state]
    assert found, (state, wf["steps"])
    return found[-1]


async def runs(client: httpx.AsyncClient, ref: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/workflows/{ref}/runs?limit=200")
    assert resp.status_code == 200, resp.text
    return sorted(resp.json()["runs"], key=lambda r: r["id"])


async def until(check: Any, timeout: float = 10.0) -> Any:
    """Poll an async check until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def _two(listed: Any) -> Any:
    """The list when it has two entries (for until())."""
    got = await listed
    return got if len(got) == 2 else None


async def gate_of(client: httpx.AsyncClient, wf_id: int) -> dict[str, Any]:
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    gate = waiting_gate(wf)
    assert gate is not None
    return gate


async def test_the_child_output_is_the_result(client: httpx.AsyncClient) -> None:
    def_id = await define(client, "child", ECHO_X)
    flow = {
        "start": {"call": {"workflow": "child", "input": {"x": "<<input.v>>"}}, "next": "after"},
        "after": {"tool": "echo", "args": {"seen": "<<steps.start.result.got>>",
                                           "prev": "<<result>>"}, "done": True},
    }  # fmt: skip
    wf_id = await start(client, flow, {"v": [1, "two"]})
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"seen": [1, "two"], "prev": {"got": [1, "two"]}}
    call = step(wf, "start")
    assert call["kind"] == "call" and call["tool"] is None and call["status"] == "done"
    assert call["result_json"] == '{"got":[1,"two"]}'
    child_id = call["child_id"]
    assert isinstance(child_id, int)
    child = (await client.get(f"/api/workflow/{child_id}")).json()
    assert child["status"] == "completed" and child["output"] == {"got": [1, "two"]}
    assert child["parent"] == {"workflow_id": wf_id, "step_id": call["id"]}
    assert child["trigger"] == "call" and child["definition_id"] == def_id
    assert child["definition_version"] == 1 and child["created_by"] == "james"
    assert wf["parent"] is None
    # The runs API shows it too.
    (listed,) = await runs(client, "child")
    assert listed["id"] == child_id and listed["trigger"] == "call"
    run = (await client.get(f"/api/workflows/runs/{child_id}")).json()["run"]
    assert run["parent"] == {"workflow_id": wf_id, "step_id": call["id"]}
    # The parent's event log says which child it started.
    events = (await client.get(f"/api/workflow/{wf_id}/events")).text  # SSE, ended
    assert '"type":"child_started","at":' in events
    assert f'"data":{{"child_id":{child_id}}}' in events


async def test_a_call_by_id_with_the_whole_input(client: httpx.AsyncClient) -> None:
    def_id = await define(client, "child", ECHO_X)
    flow = {"start": {"call": {"workflow": def_id, "input": "<<input>>"}, "done": True}}
    wf = await wait_for(client, await start(client, flow, {"x": 7}))
    assert wf["status"] == "completed" and wf["output"] == {"got": 7}


async def test_a_failed_child_fails_the_call_into_on_error(client: httpx.AsyncClient) -> None:
    await define(client, "broken", {"start": {"tool": "fail", "args": {"message": "no luck",
                                                                      "retryable": False},
                                              "done": True}})  # fmt: skip
    flow = {
        "start": {"call": {"workflow": "broken"}, "on_error": "handle", "done": True},
        "handle": {"tool": "echo", "args": {"type": "<<error.type>>",
                                            "message": "<<error.message>>"}, "done": True},
    }  # fmt: skip
    wf = await wait_for(client, await start(client, flow))
    assert wf["status"] == "completed", wf
    call = step(wf, "start")
    assert call["status"] == "failed" and call["attempt"] == 1
    child_id = call["child_id"]
    assert wf["output"]["type"] == "ChildFailed"
    assert wf["output"]["message"].startswith(f"child workflow {child_id} failed: ")
    assert "no luck" in wf["output"]["message"]
    child = (await client.get(f"/api/workflow/{child_id}")).json()
    assert child["status"] == "failed"


async def test_without_on_error_the_parent_fails(client: httpx.AsyncClient) -> None:
    await define(client, "broken", {"start": {"tool": "fail", "args": {"retryable": False},
                                              "done": True}})  # fmt: skip
    wf = await wait_for(client, await start(client, {"start": {"call": {"workflow": "broken"},
                                                               "done": True}}))  # fmt: skip
    assert wf["status"] == "failed"
    assert wf["error"].startswith("state 'start': child workflow ")


async def test_a_retry_of_a_call_starts_a_new_child(client: httpx.AsyncClient) -> None:
    # get_counter counts across steps: the first child sees 1 and fails, the second 2.
    await define(client, "second-time", {
        "start": {"tool": "get_counter",
                  "branch": [{"if": "result < 2", "then": "boom"}, {"else": "ok"}]},
        "boom": {"tool": "fail", "args": {"message": "first time", "retryable": False},
                 "done": True},
        "ok": {"tool": "echo", "args": {"count": "<<steps.start.result>>"}, "done": True},
    })  # fmt: skip
    flow = {"start": {"call": {"workflow": "second-time"},
                      "retry": {"max_attempts": 3, "backoff_s": 0.05}, "done": True}}  # fmt: skip
    wf = await wait_for(client, await start(client, flow))
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"count": 2}
    call = step(wf, "start")
    assert call["attempt"] == 2
    first, second = await runs(client, "second-time")
    assert first["status"] == "failed" and second["status"] == "completed"
    assert call["child_id"] == second["id"]
    for r in (first, second):
        child = (await client.get(f"/api/workflow/{r['id']}")).json()
        assert child["parent"] == {"workflow_id": wf["id"], "step_id": call["id"]}


async def test_cancelling_the_parent_cancels_child_and_grandchild(
    client: httpx.AsyncClient,
) -> None:
    await define(client, "leaf", GATED)
    await define(client, "mid", {"start": {"call": {"workflow": "leaf"}, "done": True}})
    wf_id = await start(client, {"start": {"call": {"workflow": "mid"}, "done": True}})
    (leaf,) = await until(lambda: runs(client, "leaf"))
    gate = await gate_of(client, leaf["id"])
    (mid,) = await runs(client, "mid")
    resp = await client.delete(f"/api/workflow/{wf_id}")
    assert resp.status_code in (200, 202, 204), resp.text
    for wid in (wf_id, mid["id"], leaf["id"]):
        wf = await wait_for(client, wid)
        assert wf["status"] == "cancelled", wf
        assert all(s["status"] == "cancelled" for s in wf["steps"]), wf["steps"]
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 409, resp.text
    # A redrive visits the call state again: new children, and the old ones stay cancelled.
    resp = await client.post(f"/api/workflow/{wf_id}/resume", json={})
    assert resp.status_code == 200, resp.text
    _, leaf2 = await until(lambda: _two(runs(client, "leaf")))
    gate = await gate_of(client, leaf2["id"])
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == {"approved": True}
    assert [r["status"] for r in await runs(client, "mid")] == ["cancelled", "completed"]


async def test_pause_reaches_the_child_and_resume_releases_it(
    client: httpx.AsyncClient,
) -> None:
    await define(client, "gated", GATED)
    await define(client, "mid", {"start": {"call": {"workflow": "gated"}, "done": True}})
    wf_id = await start(client, {"start": {"call": {"workflow": "mid"}, "next": "after"},
                                 "after": {"tool": "echo", "args": {"r": "<<result>>"},
                                           "done": True}})  # fmt: skip
    (leaf,) = await until(lambda: runs(client, "gated"))
    gate = await gate_of(client, leaf["id"])
    (mid,) = await runs(client, "mid")
    resp = await client.post(f"/api/workflow/{wf_id}/pause", json={"reason": "look first"})
    assert resp.status_code == 200, resp.text
    for wid in (wf_id, mid["id"], leaf["id"]):
        wf = (await client.get(f"/api/workflow/{wid}")).json()
        assert wf["status"] == "paused", wf
    # A decision while paused is kept; what follows it waits for the resume.
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    await asyncio.sleep(0.6)
    leaf_wf = (await client.get(f"/api/workflow/{leaf['id']}")).json()
    assert leaf_wf["status"] == "paused"
    assert step(leaf_wf, "end")["status"] == "pending"
    resp = await client.post(f"/api/workflow/{wf_id}/resume", json={})
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"r": {"approved": True}}
    for wid in (mid["id"], leaf["id"]):
        assert (await client.get(f"/api/workflow/{wid}")).json()["status"] == "completed"


async def test_a_call_started_while_paused_starts_its_child_paused(
    client: httpx.AsyncClient,
) -> None:
    await define(client, "child", ECHO_X)
    flow = {
        "start": {"tool": "sleep", "args": {"seconds": 0.5}, "next": "call"},
        "call": {"call": {"workflow": "child", "input": {"x": 1}}, "done": True},
    }
    wf_id = await start(client, flow)
    await wait_for(client, wf_id, lambda w: step(w, "start")["status"] == "running")
    resp = await client.post(f"/api/workflow/{wf_id}/pause", json={})
    assert resp.status_code == 200, resp.text
    await asyncio.sleep(0.8)  # the sleep ends; the call waits for the resume
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "paused"
    assert await runs(client, "child") == []
    assert (await client.post(f"/api/workflow/{wf_id}/resume", json={})).status_code == 200
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == {"got": 1}


async def test_depth_beyond_five_fails_cleanly(client: httpx.AsyncClient) -> None:
    await define(client, "again", {"start": {"call": {"workflow": "again"}, "done": True}})
    resp = await client.post("/api/workflows/again/run", json={"input_data": {}})
    assert resp.status_code == 202, resp.text
    top = await wait_for(client, resp.json()["run_id"])
    assert top["status"] == "failed", top
    listed = await runs(client, "again")
    assert len(listed) == 6  # the run, and children at depths 1 to 5
    assert all(r["status"] == "failed" for r in listed)
    deepest = (await client.get(f"/api/workflow/{listed[-1]['id']}")).json()
    call = step(deepest, "start")
    assert call["child_id"] is None and call["attempt"] == 1
    assert call["error"] == ("call state 'start' cannot start workflow 'again': a call may "
                             "nest at most 5 workflows deep")  # fmt: skip
    assert "at most 5 workflows deep" in top["error"]
    # Each level points at the one above it.
    for upper, lower in zip(listed, listed[1:], strict=False):
        child = (await client.get(f"/api/workflow/{lower['id']}")).json()
        assert child["parent"]["workflow_id"] == upper["id"]


async def test_the_child_is_pinned_to_the_version(client: httpx.AsyncClient) -> None:
    def_id = await define(client, "versioned", {"start": {"tool": "echo", "args": {"v": 1},
                                                          "done": True}})  # fmt: skip
    resp = await client.put(f"/api/workflows/{def_id}", json={"definition": {
        "name": "versioned", "flow": {"start": {"tool": "echo", "args": {"v": 2}, "done": True}},
    }})  # fmt: skip
    assert resp.status_code == 200 and resp.json()["version"] == 2, resp.text
    flow = {
        "start": {"call": {"workflow": "versioned", "version": 1}, "next": "latest"},
        "latest": {"call": {"workflow": "versioned"}, "next": "gone"},
        "gone": {"call": {"workflow": "versioned", "version": 9}, "on_error": "end",
                 "next": "end"},
        "end": {"tool": "echo", "args": {"one": "<<steps.start.result>>",
                                         "latest": "<<steps.latest.result>>",
                                         "error": "<<error.message>>"}, "done": True},
    }  # fmt: skip
    wf = await wait_for(client, await start(client, flow))
    assert wf["status"] == "completed", wf
    assert wf["output"]["one"] == {"v": 1} and wf["output"]["latest"] == {"v": 2}
    assert wf["output"]["error"].endswith("workflow definition 'versioned' has no version 9 "
                                          "(latest: 2)")  # fmt: skip
    versions = [r["version"] for r in await runs(client, "versioned")]
    assert versions == [1, 2]


async def test_a_call_inside_a_map_starts_a_child_per_item(client: httpx.AsyncClient) -> None:
    await define(client, "child", ECHO_X, concurrency=2)
    flow = {"start": {"map": {"items": "<<input.xs>>", "as": "x", "max_concurrency": 5,
                              "flow": {"start": {"call": {"workflow": "child",
                                                          "input": {"x": "<<x>>"}},
                                                 "done": True}}},
                      "done": True}}  # fmt: skip
    wf = await wait_for(client, await start(client, flow, {"xs": [1, 2, 3, 4, 5]}))
    assert wf["status"] == "completed", wf
    assert wf["output"] == [{"got": i} for i in range(1, 6)]
    calls = [s for s in wf["steps"] if s["kind"] == "call"]
    assert len(calls) == 5 and all(s["parent_id"] is not None for s in calls)
    children = await runs(client, "child")
    assert sorted(r["id"] for r in children) == sorted(s["child_id"] for s in calls)
    assert all(r["status"] == "completed" for r in children)


async def test_the_parent_waits_for_a_gate_in_the_child(client: httpx.AsyncClient) -> None:
    await define(client, "gated", GATED)
    wf_id = await start(client, {"start": {"call": {"workflow": "gated"}, "done": True}})
    (child,) = await until(lambda: runs(client, "gated"))
    gate = await gate_of(client, child["id"])
    await asyncio.sleep(0.3)
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running"
    call = step(wf, "start")
    assert call["status"] == "running" and call["awaiting"] == "child"
    assert call["child_id"] == child["id"]
    # The inbox shows the child's gate with the workflow and call step above it.
    inbox = (await client.get("/api/approvals", headers=auth("approver"))).json()
    items = inbox["approvals"] if isinstance(inbox, dict) else inbox
    (item,) = [i for i in items if i["step_id"] == gate["id"]]
    assert item["parent"] == {"workflow_id": wf_id, "step_id": call["id"]}
    assert item["workflow_id"] == child["id"]
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={"ok": 1},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == {"approved": True}


async def test_a_timeout_fails_the_call_and_cancels_the_child(client: httpx.AsyncClient) -> None:
    await define(client, "gated", GATED)
    await define(client, "mid", {"start": {"call": {"workflow": "gated"}, "done": True}})
    flow = {
        "start": {"call": {"workflow": "mid"}, "timeout": 0.5, "on_error": "late", "done": True},
        "late": {"tool": "echo", "args": {"type": "<<error.type>>",
                                          "message": "<<error.message>>"}, "done": True},
    }  # fmt: skip
    wf = await wait_for(client, await start(client, flow))
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"type": "Timeout", "message": "timed out after 0.5s"}
    for name in ("mid", "gated"):
        (run,) = await runs(client, name)
        child = await wait_for(client, run["id"])
        assert child["status"] == "cancelled", child


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("nope", "workflow definition 'nope' not found"),
        ("strict", "input_schema"),
        ("resting", "is paused"),
    ],
)
async def test_a_call_that_cannot_start_fails_for_good(
    client: httpx.AsyncClient, target: str, needle: str
) -> None:
    await define(client, "strict", ECHO_X, input_schema={"type": "object", "required": ["x"]})
    await define(client, "resting", ECHO_X)
    resp = await client.patch("/api/workflows/resting/status", json={"status": "paused"})
    assert resp.status_code == 200, resp.text
    flow = {
        "start": {"call": {"workflow": target, "input": {"y": 1}},
                  "retry": {"max_attempts": 3, "backoff_s": 0}, "on_error": "handle",
                  "done": True},
        "handle": {"tool": "echo", "args": {"type": "<<error.type>>",
                                            "message": "<<error.message>>"}, "done": True},
    }  # fmt: skip
    wf = await wait_for(client, await start(client, flow))
    assert wf["status"] == "completed", wf
    call = step(wf, "start")
    assert call["attempt"] == 1 and call["status"] == "failed" and call["child_id"] is None
    assert wf["output"]["type"] == "CallFailed"
    assert wf["output"]["message"].startswith(f"call state 'start' cannot start workflow "
                                              f"'{target}': ")  # fmt: skip
    assert needle in wf["output"]["message"]
    for name in ("strict", "resting"):
        assert await runs(client, name) == []


async def test_a_call_of_a_missing_definition_fails_the_workflow(
    client: httpx.AsyncClient,
) -> None:
    wf = await wait_for(client, await start(client, {"start": {"call": {"workflow": "nope"},
                                                               "done": True}}))  # fmt: skip
    assert wf["status"] == "failed"
    assert wf["error"] == ("state 'start': call state 'start' cannot start workflow 'nope': "
                           "workflow definition 'nope' not found")  # fmt: skip


async def test_a_bad_call_state_is_refused(client: httpx.AsyncClient) -> None:
    for call, needle in [
        ({"input": {}}, "field 'workflow' is required"),
        ({"workflow": "x", "version": 0}, "field 'version' must be a version number"),
        ({"workflow": "x", "input": [1]}, "field 'input' must be an object"),
        ({"workflow": "x", "input": {"a": "<<steps.nope.result>>"}}, "steps.nope"),
        ({"workflow": "x", "with": 1}, "call: unknown field 'with'"),
    ]:
        resp = await client.post("/api/workflow", json={"name": "p", "flow": {
            "start": {"call": call, "done": True}}})  # fmt: skip
        assert resp.status_code == 422, resp.text
        assert needle in resp.json()["error"], (needle, resp.json())
    # A definition may call one that does not exist yet: it is looked up when it runs.
    await define(client, "caller", {"start": {"call": {"workflow": "later"}, "done": True}})


async def test_redrive_of_a_failed_call_starts_a_new_child(client: httpx.AsyncClient) -> None:
    flow = {"start": {"call": {"workflow": "later", "input": {"x": 3}}, "done": True}}
    wf_id = await start(client, flow)
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed" and "not found" in wf["error"]
    await define(client, "later", ECHO_X)
    resp = await client.post(f"/api/workflow/{wf_id}/resume", json={})
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf_id, lambda w: w["status"] in TERMINAL and w["output"])
    assert wf["status"] == "completed" and wf["output"] == {"got": 3}


async def test_a_call_cancelled_inside_a_parallel_cancels_its_child(
    client: httpx.AsyncClient,
) -> None:
    """A sibling branch fails (fail fast): the call step in the other branch is cancelled,
    and so is the child it waits for, while the parent workflow goes on (on_error)."""
    await define(client, "gated", GATED)
    flow = {
        "start": {"parallel": {
            "calls": {"start": {"call": {"workflow": "gated"}, "done": True}},
            "fails": {"start": {"tool": "sleep", "args": {"seconds": 0.3}, "next": "boom"},
                      "boom": {"tool": "fail", "args": {"retryable": False}, "done": True}}},
            "on_error": "after", "done": True},
        "after": {"tool": None, "done": True},
    }  # fmt: skip
    wf_id = await start(client, flow)
    wf = await wait_for(
        client,
        wf_id,
        lambda w: (
            step(w, "after")["awaiting"] == "ready"
            if any(s["state"] == "after" for s in w["steps"])
            else False
        ),
    )
    call = [s for s in wf["steps"] if s["kind"] == "call"][0]
    assert call["status"] == "cancelled"
    (run,) = await runs(client, "gated")
    assert call["child_id"] == run["id"]
    child = await wait_for(client, run["id"], timeout=3)
    assert child["status"] == "cancelled", child
    assert wf["status"] == "running"


async def test_a_child_waits_queued_for_a_slot_of_its_definition(
    client: httpx.AsyncClient,
) -> None:
    await define(client, "one-at-a-time", GATED, concurrency=1)
    resp = await client.post("/api/workflows/one-at-a-time/run", json={"input_data": {}})
    assert resp.status_code == 202, resp.text
    first = resp.json()["run_id"]
    first_gate = await gate_of(client, first)
    wf_id = await start(client, {"start": {"call": {"workflow": "one-at-a-time"}, "done": True}})
    wf = await wait_for(client, wf_id, lambda w: step(w, "start")["awaiting"] == "child")
    child_id = step(wf, "start")["child_id"]
    child = (await client.get(f"/api/workflow/{child_id}")).json()
    assert child["status"] == "queued" and child["steps"] == []
    resp = await client.post(f"/api/workflow/{first_gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    gate = await gate_of(client, child_id)
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == {"approved": True}


def test_stepd_show_names_the_child_a_call_waits_for() -> None:
    from daemon import cli

    t0 = 1_800_000_000_000
    wf = {"id": 7, "name": "p", "status": "running", "created_at": t0, "steps": [
        {"id": 8, "name": "check", "state": "check", "kind": "call", "tool": None,
         "status": "running", "awaiting": "child", "child_id": 9, "attempt": 1,
         "started_at": t0, "parent_id": None, "scope": None}]}  # fmt: skip
    (row,) = [line for line in cli._render_workflow(wf) if line.startswith("8 ")]
    assert "(call)" in row
    assert row.endswith("awaiting child: waits for child workflow 9 (stepd show 9)"), row


async def test_what_a_run_waits_for_is_found_through_its_children(
    client: httpx.AsyncClient, app: Any
) -> None:
    from daemon.calls import stopped_waiting

    store = app.state.engine.store
    await define(client, "gated", GATED)
    await define(client, "mid", {"start": {"call": {"workflow": "gated"}, "done": True}})
    wf_id = await start(client, {"start": {"call": {"workflow": "mid"}, "done": True}})
    (leaf,) = await until(lambda: runs(client, "gated"))
    gate = await gate_of(client, leaf["id"])
    assert await stopped_waiting(store, wf_id) == [
        {"workflow_id": leaf["id"], "step_id": gate["id"], "state": "start", "awaiting": "ready"}
    ]
    assert (await client.post(f"/api/workflow/{wf_id}/pause", json={})).status_code == 200
    assert await stopped_waiting(store, wf_id) is None
    assert (await client.post(f"/api/workflow/{wf_id}/resume", json={})).status_code == 200
    resp = await client.post(f"/api/workflow/{gate['id']}/ready", json={},
                             headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    await wait_for(client, wf_id)
    assert await stopped_waiting(store, wf_id) is None


async def test_cancelling_the_child_fails_the_call(client: httpx.AsyncClient) -> None:
    await define(client, "gated", GATED)
    flow = {
        "start": {"call": {"workflow": "gated"}, "on_error": "handle", "done": True},
        "handle": {"tool": "echo", "args": {"m": "<<error.message>>"}, "done": True},
    }  # fmt: skip
    wf_id = await start(client, flow)
    (child,) = await until(lambda: runs(client, "gated"))
    await gate_of(client, child["id"])
    resp = await client.delete(f"/api/workflow/{child['id']}")
    assert resp.status_code in (200, 202, 204), resp.text
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"m": f"child workflow {child['id']} cancelled"}


async def test_a_tree_of_calls_starts_at_most_max_descendants(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map of calls that call themselves multiplies (3 items: 3, 9, 27, ... runs a level);
    depth is capped at 5, and the whole tree at MAX_DESCENDANTS child workflows."""
    from daemon.storage import definitions as stored

    monkeypatch.setattr(stored, "MAX_DESCENDANTS", 20)
    flow = {
        "start": {
            "map": {
                "items": "<<input.items>>",
                "flow": {
                    "start": {
                        "call": {"workflow": "fan", "input": {"items": "<<input.items>>"}},
                        "done": True,
                    }
                },
            },
            "done": True,
        }
    }
    resp = await client.post(
        "/api/workflows", json={"definition": {"name": "fan", "concurrency": 1000, "flow": flow}}
    )
    assert resp.status_code == 201, resp.text
    resp = await client.post("/api/workflows/fan/run", json={"input_data": {"items": [1, 2, 3]}})
    root = resp.json()["run_id"]
    wf = await wait_for(client, root, timeout=60)
    assert wf["status"] == "failed", wf
    runs = (await client.get("/api/workflows/fan/runs?limit=200")).json()
    assert runs["total"] == 21, runs["total"]  # the root and 20 children
    errors = [r["error"] or "" for r in runs["runs"]]
    assert any("started 20 child workflows" in e for e in errors), errors
