"""Synchronous execution and run streams, end to end over the app on the backend under test:
`POST /api/workflow?wait=` (daemon/outcome.py) and the run event streams (daemon/runstream.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from daemon import outcome, runstream
from daemon.api import engine_of
from daemon.bodies import read_json
from tests.helpers import auth, waiting_gate

TOOLS = ("daemon.tools.demo", "tests.sample_tools")


def one(name: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "flow": {"start": {**state, "done": True}}}


ECHO = one("echo", {"tool": "echo", "args": {"x": 1}})


def sleeper(seconds: float) -> dict[str, Any]:
    return one("sleeper", {"tool": "sleep", "args": {"seconds": seconds}})


GATED = {
    "name": "gated",
    "flow": {
        "start": {"tool": "echo", "args": {"a": 1}, "next": "approve"},
        "approve": {"tool": None, "next": "after"},
        "after": {"tool": "echo", "args": {"b": 2}, "done": True},
    },
}


@pytest.fixture
async def client(make_client: Any) -> httpx.AsyncClient:
    c, _ = await make_client(tool_modules=TOOLS)
    return c


async def timed(coro: Any) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    resp = await coro
    return resp, time.monotonic() - began


# -- POST /api/workflow?wait= -----------------------------------------------------------


async def test_wait_answers_the_finished_workflow_with_200(client: httpx.AsyncClient):
    resp = await client.post("/api/workflow?wait=5", json=ECHO)
    assert resp.status_code == 200, resp.text
    wf = resp.json()
    assert wf["status"] == "completed" and wf["output"] == {"x": 1}
    assert [s["status"] for s in wf["steps"]] == ["done"]
    assert wf == (await client.get(f"/api/workflow/{wf['id']}")).json()


async def test_a_failed_workflow_is_finished_too(client: httpx.AsyncClient):
    body = one("boom", {"tool": "fail", "args": {"message": "nope", "retryable": False}})
    resp = await client.post("/api/workflow?wait=5", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "failed" and "nope" in resp.json()["steps"][0]["error"]


async def test_still_running_at_the_deadline_is_202(client: httpx.AsyncClient):
    resp, took = await timed(client.post("/api/workflow?wait=0.3", json=sleeper(1.5)))
    assert resp.status_code == 202, resp.text
    assert 0.3 <= took < 1.4
    wf = resp.json()
    assert wf["status"] == "running" and wf["steps"][0]["status"] == "running"


async def test_a_gate_answers_202_at_once(client: httpx.AsyncClient):
    resp, took = await timed(client.post("/api/workflow?wait=10", json=GATED))
    assert resp.status_code == 202, resp.text
    assert took < 5
    wf = resp.json()
    assert wf["status"] == "running" and waiting_gate(wf)["state"] == "approve"


@pytest.mark.parametrize(
    "wait",
    [{"seconds": 3600}, {"signal": "go", "timeout": 3600}],
    ids=["timer", "signal"],
)
async def test_a_timer_or_signal_wait_answers_202_at_once(client: httpx.AsyncClient, wait):
    # A wait state starts waiting without touching its workflow's row: the log tells.
    body = {
        "name": "waits",
        "flow": {
            "start": {"tool": "echo", "args": {}, "next": "w"},
            "w": {"wait": wait, "done": True},
        },
    }
    resp, took = await timed(client.post("/api/workflow?wait=10", json=body))
    assert resp.status_code == 202, resp.text
    assert took < 5
    assert [s["awaiting"] for s in resp.json()["steps"]] == [
        None,
        "signal" if "signal" in wait else "timer",
    ]


async def test_a_gate_beside_a_running_branch_is_not_yet_waiting(client: httpx.AsyncClient):
    body = {
        "name": "par",
        "flow": {
            "start": {
                "parallel": {
                    "person": {"start": {"tool": None, "done": True}},
                    "tool": {"start": {"tool": "sleep", "args": {"seconds": 0.6}, "done": True}},
                },
                "done": True,
            }
        },
    }
    resp, took = await timed(client.post("/api/workflow?wait=10", json=body))
    assert resp.status_code == 202, resp.text
    assert 0.55 <= took < 5  # answered once the sleeping branch finished, not before
    steps = resp.json()["steps"]
    assert [s["awaiting"] for s in steps if s["status"] == "running"] == [
        "branches",
        "ready",
    ]


async def test_a_replayed_create_waits_too(client: httpx.AsyncClient):
    key = {"Idempotency-Key": "k-1"}
    first = await client.post("/api/workflow", json=sleeper(0.3), headers=key)
    assert first.status_code == 201
    again = await client.post("/api/workflow?wait=5", json=sleeper(0.3), headers=key)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "completed"


@pytest.mark.parametrize("wait", ["0", "-1", "300.5", "abc", "nan", "inf", ""])
async def test_wait_must_be_seconds_up_to_300(client: httpx.AsyncClient, wait: str):
    resp = await client.post(f"/api/workflow?wait={wait}", json=ECHO)
    assert resp.status_code == 400, resp.text
    assert "wait" in resp.json()["error"]


async def test_without_wait_create_is_unchanged(client: httpx.AsyncClient):
    resp = await client.post("/api/workflow", json=ECHO)
    assert resp.status_code == 201 and resp.json()["status"] == "started"


# -- settle without the hub ---------------------------------------------------------------


async def test_settle_reads_the_log_itself_without_a_hub(make_client: Any):
    _, app = await make_client(tool_modules=TOOLS)
    engine = app.state.engine
    hooks = len(engine.store.change_hooks)
    for body, status in ((sleeper(0.2), "completed"), (GATED, "waiting")):
        created = await engine.create(body, created_by="james")
        got = await outcome.settle(engine.store, created.id, 5)
        assert got.status == status
    created = await engine.create(sleeper(1), created_by="james")
    got = await outcome.settle(engine.store, created.id, 0.2)
    assert got.status == "timeout" and got.workflow.status == "running"
    assert len(engine.store.change_hooks) == hooks  # each waiter took its hook away


# -- run streams, on one-off workflows --------------------------------------------------


async def _start_and_stream(request: Request) -> Response:
    """Test route: create a workflow, stream it as execute/stream does."""
    engine = engine_of(request)
    created = await engine.create(await read_json(request), created_by="james")
    timeout = float(request.query_params.get("timeout", "30"))
    return await runstream.execute_stream(request, created.id, timeout)


async def _stream(request: Request) -> Response:
    return runstream.run_stream(request, request.path_params["id"])


@pytest.fixture
async def streaming(make_client: Any) -> httpx.AsyncClient:
    c, app = await make_client(tool_modules=TOOLS)
    app.router.routes[:0] = [
        Route("/test/execute/stream", _start_and_stream, methods=["POST"]),
        Route("/test/runs/{id:int}/stream", _stream, methods=["GET"]),
    ]
    return c


def parse_sse(text: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(id, event, data) of each event of a whole SSE body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
        if "data" in fields:
            out.append(
                (fields.get("id"), fields.get("event", "message"), orjson.loads(fields["data"]))
            )
    return out


CHAIN = {
    "name": "chain",
    "flow": {
        "start": {"tool": "echo", "args": {"n": 1}, "next": "nap"},
        "nap": {"tool": "sleep", "args": {"seconds": 0.05}, "next": "last"},
        "last": {"tool": "echo", "args": {"n": 3}, "done": True},
    },
}


async def test_execute_stream_shows_each_step_then_the_end(streaming: httpx.AsyncClient):
    resp = await streaming.post("/test/execute/stream", json=CHAIN)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    names = [(e, d.get("step_id")) for _, e, d in events]
    assert names == [
        ("step_started", "start"), ("step_completed", "start"),
        ("step_started", "nap"), ("step_completed", "nap"),
        ("step_started", "last"), ("step_completed", "last"),
        ("run_completed", None),
    ]  # fmt: skip
    run_id = events[0][2]["run_id"]
    assert all(d["run_id"] == run_id for _, _, d in events)
    assert events[1][2]["output"] == {"n": 1}
    assert events[-1][2]["status"] == "completed" and events[-1][2]["output"] == {"n": 3}
    assert events[-1][2]["duration_seconds"] >= 0.05
    assert events[0][2]["timestamp"].endswith("Z")
    ids = [int(i) for i, _, _ in events]
    assert ids == sorted(ids)

    # The run's own stream replays the same events, and resumes after Last-Event-ID.
    again = await streaming.get(f"/test/runs/{run_id}/stream")
    assert parse_sse(again.text) == events
    resumed = await streaming.get(
        f"/test/runs/{run_id}/stream", headers={"Last-Event-ID": events[3][0]}
    )
    assert parse_sse(resumed.text) == events[4:]


async def test_execute_stream_of_a_failure(streaming: httpx.AsyncClient):
    body = one("boom", {"tool": "fail", "args": {"message": "nope", "retryable": False}})
    events = parse_sse((await streaming.post("/test/execute/stream", json=body)).text)
    assert [e for _, e, _ in events] == ["step_started", "step_failed", "run_failed"]
    assert "nope" in events[1][2]["error"]
    assert events[-1][2]["status"] == "failed" and events[-1][2]["error"]


async def test_execute_stream_ends_when_the_run_waits(streaming: httpx.AsyncClient):
    events = parse_sse((await streaming.post("/test/execute/stream", json=GATED)).text)
    assert [(e, d.get("step_id")) for _, e, d in events] == [
        ("step_started", "start"), ("step_completed", "start"),
        ("step_started", "approve"), ("step_waiting", "approve"),
        ("run_waiting", None),
    ]  # fmt: skip
    gate = events[3][2]
    assert gate["awaiting"] == "ready"
    assert events[-1][2]["awaiting"] == [
        {
            "step_id": gate["id"],
            "state": "approve",
            "awaiting": "ready",
            "workflow_id": gate["run_id"],
        }
    ]
    run_id = gate["run_id"]

    # Approved, the run goes on; its stream shows it to the end.
    resp = await streaming.post(f"/api/workflow/{gate['id']}/ready", json={"ok": True},
                                headers=auth("approver"))  # fmt: skip
    assert resp.status_code == 200, resp.text
    resumed = {"Last-Event-ID": events[3][0]}
    tail = parse_sse((await streaming.get(f"/test/runs/{run_id}/stream", headers=resumed)).text)
    assert [(e, d.get("step_id")) for _, e, d in tail] == [
        ("step_completed", "approve"), ("step_started", "after"), ("step_completed", "after"),
        ("run_completed", None),
    ]  # fmt: skip
    assert tail[0][2]["output"] == {"ok": True}


async def test_execute_stream_times_out_with_an_error_event(streaming: httpx.AsyncClient):
    resp, took = await timed(streaming.post("/test/execute/stream?timeout=0.3", json=sleeper(0.8)))
    events = parse_sse(resp.text)
    assert [e for _, e, _ in events] == ["step_started", "error"]
    error = events[-1][2]
    assert error["type"] == "error" and error["error_code"] == "EXECUTION_TIMEOUT"
    assert error["run_id"] == events[0][2]["run_id"]
    assert took < 0.75
    # The run goes on.
    tail = parse_sse((await streaming.get(f"/test/runs/{error['run_id']}/stream")).text)
    assert [e for _, e, _ in tail][-1] == "run_completed"


async def test_cancelled_run_stream(streaming: httpx.AsyncClient):
    created = (await streaming.post("/api/workflow", json=sleeper(5))).json()["id"]
    stream = asyncio.create_task(streaming.get(f"/test/runs/{created}/stream"))
    await asyncio.sleep(0.2)
    assert (await streaming.delete(f"/api/workflow/{created}")).status_code == 200
    events = parse_sse((await stream).text)
    assert events[-1][1] == "run_failed"
    assert events[-1][2]["status"] == "cancelled" and "james" in events[-1][2]["error"]


# -- saved definitions: execute, execute/stream, runs/{id}/stream ------------------------


async def define(client: httpx.AsyncClient, name: str, flow: dict[str, Any], **extra: Any) -> int:
    definition = {"name": name, "flow": flow, **extra}
    resp = await client.post("/api/workflows", json={"definition": definition})
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


GREET = {"start": {"tool": "echo", "args": {"hello": "<<input.who>>"}, "done": True}}


async def test_execute_answers_the_output(client: httpx.AsyncClient):
    def_id = await define(client, "greet", GREET)
    for ref, body in ((def_id, {"variables": {"who": "Al"}}), ("greet", {"input": {"who": "Bo"}})):
        resp = await client.post(f"/api/workflows/{ref}/execute", json=body)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert (
            got["status"] == "completed"
            and got["output"]["hello"] == body.get("variables", body.get("input"))["who"]
        )
        run = (await client.get(f"/api/workflow/{got['run_id']}")).json()
        assert run["trigger"] == "execute" and run["definition_id"] == def_id
        assert run["created_by"] == "james"


async def test_execute_of_a_failing_run_is_500(client: httpx.AsyncClient):
    flow = {
        "start": {"tool": "fail", "args": {"message": "nope", "retryable": False}, "done": True}
    }
    await define(client, "broken", flow)
    resp = await client.post("/api/workflows/broken/execute", json={})
    assert resp.status_code == 500, resp.text
    got = resp.json()
    assert got["error_code"] == "EXECUTION_FAILED" and "nope" in got["error"]
    assert got["status"] == "failed"
    run = (await client.get(f"/api/workflows/runs/{got['run_id']}")).json()["run"]
    assert run["status"] == "failed"


async def test_execute_of_a_cancelled_run_is_500(client: httpx.AsyncClient):
    await define(client, "slow", {"start": {"tool": "sleep", "args": {"seconds": 5}, "done": True}})
    call = asyncio.create_task(client.post("/api/workflows/slow/execute", json={}))
    for _ in range(200):
        runs = (await client.get("/api/workflows/slow/runs")).json()["runs"]
        if runs:
            break
        await asyncio.sleep(0.02)
    assert (await client.post(f"/api/workflows/runs/{runs[0]['id']}/cancel")).status_code == 200
    resp = await call
    assert resp.status_code == 500, resp.text
    assert resp.json()["status"] == "cancelled" and resp.json()["error_code"] == "EXECUTION_FAILED"


async def test_execute_that_reaches_a_gate_is_202_waiting(client: httpx.AsyncClient):
    await define(client, "gated", GATED["flow"])
    resp, took = await timed(client.post("/api/workflows/gated/execute", json={}))
    assert resp.status_code == 202, resp.text
    assert took < 5
    got = resp.json()
    assert got["status"] == "waiting" and [a["state"] for a in got["awaiting"]] == ["approve"]
    gate = got["awaiting"][0]
    assert gate["awaiting"] == "ready"
    approved = await client.post(f"/api/workflow/{gate['step_id']}/ready", headers=auth("approver"))
    assert approved.status_code == 200, approved.text


async def test_execute_past_its_timeout_is_504_and_the_run_goes_on(client: httpx.AsyncClient):
    await define(client, "ten", {"start": {"tool": "sleep", "args": {"seconds": 10}, "done": True}})
    resp, took = await timed(client.post("/api/workflows/ten/execute?timeout=5", json={}))
    assert resp.status_code == 504, resp.text
    assert 5 <= took < 8
    got = resp.json()
    assert got["error_code"] == "EXECUTION_TIMEOUT" and isinstance(got["run_id"], int)
    run = (await client.get(f"/api/workflows/runs/{got['run_id']}")).json()["run"]
    assert run["status"] == "running"
    # The run completes anyway; its stream shows it.
    events = parse_sse((await client.get(f"/api/workflows/runs/{got['run_id']}/stream")).text)
    assert [e for _, e, _ in events] == ["step_started", "step_completed", "run_completed"]
    assert events[-1][2]["duration_seconds"] >= 10


async def test_execute_errors(client: httpx.AsyncClient):
    resp = await client.post("/api/workflows/nope/execute", json={})
    assert resp.status_code == 404
    assert resp.json()["error_code"] == "WORKFLOW_NOT_FOUND"
    assert (await client.post("/api/workflows/424242/execute/stream", json={})).status_code == 404
    schema = {"type": "object", "required": ["who"], "properties": {"who": {"type": "string"}}}
    def_id = await define(client, "greet", GREET, input_schema=schema)
    resp = await client.post(f"/api/workflows/{def_id}/execute", json={"variables": {"who": 5}})
    assert resp.status_code == 422 and resp.json()["error_code"] == "VALIDATION_ERROR"
    for bad in ("0", "301", "x"):
        resp = await client.post(f"/api/workflows/{def_id}/execute?timeout={bad}", json={})
        assert resp.status_code == 400, resp.text
    resp = await client.post(f"/api/workflows/{def_id}/execute", json={"vars": {}})
    assert resp.status_code == 400 and "vars" in resp.json()["error"]
    await client.patch(f"/api/workflows/{def_id}/status", json={"status": "paused"})
    assert (await client.post(f"/api/workflows/{def_id}/execute", json={})).status_code == 409
    assert (await client.get("/api/workflows/runs/424242/stream")).status_code == 404
    reader = await client.post(
        f"/api/workflows/{def_id}/execute", json={}, headers=auth("approver")
    )
    assert reader.status_code == 403


async def test_execute_stream_and_run_stream(client: httpx.AsyncClient):
    await define(client, "chain", CHAIN["flow"])
    resp = await client.post("/api/workflows/chain/execute/stream", json={})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [(e, d.get("step_id")) for _, e, d in events] == [
        ("step_started", "start"), ("step_completed", "start"),
        ("step_started", "nap"), ("step_completed", "nap"),
        ("step_started", "last"), ("step_completed", "last"),
        ("run_completed", None),
    ]  # fmt: skip
    run_id = events[0][2]["run_id"]
    assert events[-1][2] == {"run_id": run_id, "status": "completed", "output": {"n": 3},
                             "duration_seconds": events[-1][2]["duration_seconds"]}  # fmt: skip
    again = await client.get(f"/api/workflows/runs/{run_id}/stream", headers=auth("approver"))
    assert parse_sse(again.text) == events


async def test_execute_stream_times_out(client: httpx.AsyncClient):
    await define(client, "nap", {"start": {"tool": "sleep", "args": {"seconds": 1}, "done": True}})
    resp = await client.post("/api/workflows/nap/execute/stream?timeout=0.3", json={})
    events = parse_sse(resp.text)
    assert [e for _, e, _ in events] == ["step_started", "error"]
    error = events[-1][2]
    assert error == {"type": "error", "error_code": "EXECUTION_TIMEOUT",
                     "run_id": events[0][2]["run_id"], "error": error["error"]}  # fmt: skip


async def test_execute_waits_through_a_call_for_its_childs_gate(client: httpx.AsyncClient):
    # The child runs a tool first: the parent waits for the world only once the child's
    # gate is reached, which only the child's events tell.
    child = {
        "start": {"tool": "sleep", "args": {"seconds": 0.3}, "next": "approve"},
        "approve": {"tool": None, "done": True},
    }
    await define(client, "child", child)
    parent = {
        "start": {"call": {"workflow": "child", "input": {}}, "next": "after"},
        "after": {"tool": "echo", "args": {"got": "<<result>>"}, "done": True},
    }
    await define(client, "parent", parent)
    resp, took = await timed(client.post("/api/workflows/parent/execute?timeout=10", json={}))
    assert resp.status_code == 202, resp.text
    assert 0.3 <= took < 5
    got = resp.json()
    [gate] = got["awaiting"]
    assert gate["state"] == "approve" and gate["awaiting"] == "ready"
    assert gate["workflow_id"] != got["run_id"]
    steps = (await client.get(f"/api/workflow/{got['run_id']}")).json()["steps"]
    assert steps[0]["child_id"] == gate["workflow_id"]

    # Approved, the child ends and so does the parent; the parent's stream shows its call
    # step once, however often it was taken up.
    approve = client.post(f"/api/workflow/{gate['step_id']}/ready", json={"ok": 1},
                          headers=auth("approver"))  # fmt: skip
    assert (await approve).status_code == 200
    stream = parse_sse((await client.get(f"/api/workflows/runs/{got['run_id']}/stream")).text)
    assert [(e, d.get("step_id")) for _, e, d in stream] == [
        ("step_started", "start"), ("step_completed", "start"),
        ("step_started", "after"), ("step_completed", "after"),
        ("run_completed", None),
    ]  # fmt: skip
    assert stream[-1][2]["output"] == {"got": {"ok": 1}}


async def test_a_signal_wait_in_the_streams(streaming: httpx.AsyncClient):
    body = {
        "name": "signalled",
        "flow": {"start": {"wait": {"signal": "go", "timeout": 60}, "done": True}},
    }
    events = parse_sse((await streaming.post("/test/execute/stream", json=body)).text)
    assert [(e, d.get("step_id")) for _, e, d in events] == [
        ("step_started", "start"), ("step_waiting", "start"), ("run_waiting", None),
    ]  # fmt: skip
    assert events[1][2]["awaiting"] == "signal"
    assert events[-1][2]["awaiting"][0]["awaiting"] == "signal"
    run_id = events[0][2]["run_id"]
    sent = await streaming.post(f"/api/workflow/{run_id}/signal", json={"name": "go", "data": 7})
    assert sent.status_code == 202
    resumed = {"Last-Event-ID": events[1][0]}
    tail = parse_sse((await streaming.get(f"/test/runs/{run_id}/stream", headers=resumed)).text)
    assert [(e, d.get("step_id")) for _, e, d in tail] == [
        ("step_completed", "start"), ("run_completed", None),
    ]  # fmt: skip
    assert tail[0][2]["output"] == 7 and tail[-1][2]["output"] == 7


async def test_waiting_requests_do_not_pace_event_streams(make_client: Any):
    # Event streams to clients space their writes by how many streams are open; requests
    # waiting for their workflows write nothing and do not count.
    client, app = await make_client(tool_modules=TOOLS)
    hub = app.state.events
    waiting = asyncio.create_task(client.post("/api/workflow?wait=5", json=sleeper(0.5)))
    for _ in range(100):
        if hub.subscribers:
            break
        await asyncio.sleep(0.01)
    assert hub.subscribers == 1 and hub._writers == 0
    assert (await waiting).status_code == 200
    assert hub.subscribers == 0 and hub._writers == 0


async def test_a_waiting_request_lets_go_when_its_client_hangs_up(tmp_path):
    # Over a real HTTP server: a ?wait request whose client went away stops waiting.
    import uvicorn

    from daemon.api import create_app
    from tests.helpers import TOKENS, make_config
    from tests.process_helpers import free_port

    app = create_app(make_config(tmp_path, tool_modules=TOOLS))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_config=None, access_log=False))  # fmt: skip
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        hub = app.state.events
        body = orjson.dumps(sleeper(3))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /api/workflow?wait=60 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKENS['james'][0]}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body
        )  # fmt: skip
        for _ in range(200):
            if hub.subscribers:
                break
            await asyncio.sleep(0.01)
        assert hub.subscribers == 1
        writer.close()
        for _ in range(100):
            if not hub.subscribers:
                break
            await asyncio.sleep(0.01)
        assert hub.subscribers == 0  # long before its workflow ends
    finally:
        server.should_exit = True
        await serving
