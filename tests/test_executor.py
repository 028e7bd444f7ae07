"""Executor behaviour through the real app: wake-ups, polling, concurrency, cancel, failures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from daemon.api import create_app
from tests import backend, sample_tools
from tests.helpers import auth, make_config, wait_for, waiting_gate

MODULES = ("daemon.tools.demo", "tests.sample_tools")


def single(tool: str | None, args: dict | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": f"t-{tool}", "flow": {"start": {"tool": tool, "args": args or {},
                                                   "done": True, **extra}}}  # fmt: skip


def chain(*tools: tuple[str, dict]) -> dict[str, Any]:
    flow = {}
    for i, (name, args) in enumerate(tools):
        sid = "start" if i == 0 else f"s{i}"
        flow[sid] = {"tool": name, "args": args}
        if i + 1 < len(tools):
            flow[sid]["next"] = f"s{i + 1}"
        else:
            flow[sid]["done"] = True
    return {"name": "chain", "flow": flow}


async def test_api_wakes_the_executor_without_waiting_for_a_poll(make_client):
    client, _ = await make_client(poll_interval=30.0)
    t0 = time.monotonic()
    wf_id = (await client.post("/api/workflow", json=chain(("echo", {}), ("echo", {})))).json()[
        "id"
    ]
    wf = await wait_for(client, wf_id, timeout=5)
    assert wf["status"] == "completed"
    assert time.monotonic() - t0 < 2  # with a 30 s poll, only wake-ups can do this


async def test_ready_wakes_the_executor(make_client):
    client, _ = await make_client(poll_interval=30.0)
    flow = {"name": "g", "flow": {"start": {"tool": None, "next": "go"},
                                 "go": {"tool": "echo", "args": {}, "done": True}}}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=flow)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    t0 = time.monotonic()
    await client.post(f"/api/workflow/{gate['id']}/ready")
    assert (await wait_for(client, wf_id, timeout=5))["status"] == "completed"
    assert time.monotonic() - t0 < 2


async def test_poll_picks_up_rows_written_by_another_process(make_client, tmp_path):
    client, app = await make_client(poll_interval=0.1)
    # Another writer: a workflow and its first step inserted in one transaction of its own.
    now = int(time.time() * 1000)
    flow = {"start": {"tool": "echo", "args": {"from": "outside"}, "done": True}}
    params = {"wf": now - 5000, "step": now - 4999, "flow": orjson.dumps(flow).decode(), "now": now}
    backend.write(
        tmp_path / "stepd.db",
        ("INSERT INTO workflows (id, name, flow_json, input_json, status, created_at, updated_at)"
         " VALUES (:wf, 'outside', :flow, '{}', 'running', :now, :now)", params),
        ("INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, run_at, created_at)"
         " VALUES (:step, :wf, 'start', 'start', 'echo', 'pending', 1, :now, :now)", params),
    )  # fmt: skip
    wf = await wait_for(client, now - 5000, timeout=5)
    assert wf["status"] == "completed"
    assert orjson.loads(wf["steps"][0]["result_json"]) == {"from": "outside"}


async def test_concurrency_limit_and_parallelism(make_client):
    client, app = await make_client(concurrency=3, max_running_per_token=3)
    sample_tools.STARTED.clear()
    ids = [
        (await client.post("/api/workflow", json=single("track", {"label": str(i), "seconds": 0.3}))
         ).json()["id"]
        for i in range(6)
    ]  # fmt: skip
    peak = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        peak = max(peak, app.state.executor.running)
        assert app.state.executor.running <= 3
        listed = (await client.get("/api/workflow?status=running")).json()
        if not listed:
            break
        await asyncio.sleep(0.01)
    assert peak == 3  # the limit was reached: steps ran concurrently
    for wf_id in ids:
        assert (await wait_for(client, wf_id))["status"] == "completed"


async def test_sync_tools_run_in_threads_without_blocking_the_loop(make_client):
    client, _ = await make_client()
    slow = (await client.post("/api/workflow", json=single("blocking_sleep", {"seconds": 1.0}))
            ).json()["id"]  # fmt: skip
    t0 = time.monotonic()
    fast = (await client.post("/api/workflow", json=single("echo", {"a": 1}))).json()["id"]
    assert (await wait_for(client, fast))["status"] == "completed"
    assert time.monotonic() - t0 < 0.8  # the blocked thread did not hold up the loop
    wf = await wait_for(client, slow)
    assert orjson.loads(wf["steps"][0]["result_json"])["thread"].startswith("stepd-tool")


async def test_cancel_stops_a_running_tool_and_discards_its_result(make_client):
    client, app = await make_client()
    wf_id = (await client.post("/api/workflow", json=single("sleep", {"seconds": 30}))).json()["id"]
    await wait_for(client, wf_id, lambda wf: wf["steps"][0]["status"] == "running")
    t0 = time.monotonic()
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 200
    for _ in range(200):
        if app.state.executor.running == 0:
            break
        await asyncio.sleep(0.01)
    assert app.state.executor.running == 0 and time.monotonic() - t0 < 2
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "cancelled"
    assert wf["steps"][0]["status"] == "cancelled" and wf["steps"][0]["result_json"] is None


async def test_late_sync_result_after_cancel_is_discarded(make_client):
    client, app = await make_client()
    wf_id = (await client.post("/api/workflow", json=single("blocking_sleep", {"seconds": 0.3}))
             ).json()["id"]  # fmt: skip
    await wait_for(client, wf_id, lambda wf: wf["steps"][0]["status"] == "running")
    await client.delete(f"/api/workflow/{wf_id}")
    await asyncio.sleep(0.5)  # the thread finishes after the cancel
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "cancelled" and wf["steps"][0]["status"] == "cancelled"
    assert wf["steps"][0]["result_json"] is None


async def test_step_limit_stops_a_runaway_loop(make_client):
    client, _ = await make_client(step_limit=5)
    flow = {
        "name": "loop",
        "flow": {
            "start": {"tool": "echo", "args": {}, "next": "again"},
            # A way out that is never taken: a loop that cannot reach done is refused.
            "again": {
                "tool": "echo",
                "args": {"stop": False},
                "branch": [{"if": "result.stop", "then": "end"}, {"else": "start"}],
            },
            "end": {"tool": "echo", "done": True},
        },
    }
    wf = await wait_for(client, (await client.post("/api/workflow", json=flow)).json()["id"])
    assert wf["status"] == "failed"
    assert "step limit of 5" in wf["error"]
    assert len(wf["steps"]) == 5


async def test_undefined_template_variable_fails_naming_it(make_client):
    client, _ = await make_client()
    body = single("echo", {"q": "{{input.topic}}"})
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "failed"
    step = wf["steps"][0]
    assert step["status"] == "failed" and "topic" in step["error"]
    assert "topic" in wf["error"] and "state 'start'" in wf["error"]


async def test_results_flow_between_steps_with_types(make_client):
    client, _ = await make_client()
    body = {
        "name": "types",
        "flow": {
            "start": {"tool": "echo", "args": {"n": "<<input.n>>", "tags": "<<input.tags>>"},
                      "next": "use"},
            "use": {"tool": "echo", "args": {"prev": "<<result>>", "n": "<<steps.start.result.n>>",
                                             "text": "n is {{ result.n + 1 }}"}, "done": True},
        },
        "input": {"n": 41, "tags": ["a", "b"]},
    }  # fmt: skip
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed", wf
    out = orjson.loads(wf["steps"][1]["result_json"])
    assert out == {"prev": {"n": 41, "tags": ["a", "b"]}, "n": 41, "text": "n is 42"}


async def test_tool_error_fails_the_workflow_with_its_message(make_client):
    client, _ = await make_client()
    body = single("fail", {"message": "disk on fire", "retryable": False})
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "failed" and "disk on fire" in wf["error"]
    assert wf["steps"][0]["status"] == "failed" and wf["steps"][0]["error"] == "disk on fire"


@pytest.mark.parametrize(
    ("tool", "args", "needle"),
    [
        ("exit_daemon", {}, "SystemExit"),
        ("base_exception", {}, "tool raised Boom"),
        ("base_exception_in_thread", {}, "tool raised Boom"),
        ("not_json", {}, "not JSON-serialisable"),
        ("big", {"size": 2_000_000}, "the limit is"),
        ("echo", {"x": 1}, None),
    ],
)
async def test_bad_tools_fail_the_step_not_the_daemon(make_client, tool, args, needle):
    client, app = await make_client()
    wf = await wait_for(client, (await client.post("/api/workflow", json=single(tool, args))
                                 ).json()["id"])  # fmt: skip
    if needle is None:
        assert wf["status"] == "completed"
    else:
        assert wf["status"] == "failed" and needle in wf["steps"][0]["error"]
    assert app.state.executor.alive
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_bad_arguments_fail_at_once(make_client):
    client, _ = await make_client()
    # Arguments are checked at create time where they are literal ...
    resp = await client.post("/api/workflow", json=single("sleep", {"secs": 1}))
    assert resp.status_code == 422 and "unknown argument 'secs'" in resp.json()["error"]
    resp = await client.post("/api/workflow", json=single("sleep", {"seconds": "soon"}))
    assert resp.status_code == 422
    assert "argument 'seconds' must be float, got str" in resp.json()["error"]
    # ... and at run time, where a templated value renders to the wrong type.
    body = single("sleep", {"seconds": "{{input.s}}"}, retry={"max_attempts": 3})
    wf = await wait_for(client, (await client.post(
        "/api/workflow", json={**body, "input": {"s": "soon"}}
    )).json()["id"])  # fmt: skip
    step = wf["steps"][0]
    assert wf["status"] == "failed" and step["attempt"] == 1
    assert step["error"] == "tool 'sleep': argument 'seconds' must be float, got str"


async def test_retry_then_succeed(make_client):
    client, _ = await make_client()
    body = single("flaky", {"fail_times": 2},
                  retry={"max_attempts": 3, "backoff_s": 0.01})  # fmt: skip
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    step = wf["steps"][0]
    assert step["attempt"] == 3 and orjson.loads(step["result_json"]) == {"attempt": 3}


async def test_timeout_and_on_error(make_client):
    client, _ = await make_client()
    body = {
        "name": "t",
        "flow": {
            "start": {"tool": "sleep", "args": {"seconds": 5}, "timeout": 0.05,
                      "on_error": "handle", "done": True},
            "handle": {"tool": "echo", "args": {"err": "<<error.message>>",
                                                "state": "<<error.state>>"}, "done": True},
        },
    }  # fmt: skip
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    assert wf["steps"][0]["status"] == "failed"
    assert orjson.loads(wf["steps"][1]["result_json"]) == {
        "err": "timed out after 0.05s",
        "state": "start",
    }


async def test_get_tools_lists_parameters(make_client):
    client, _ = await make_client()
    tools = {t["name"]: t for t in (await client.get("/api/tools")).json()}
    for name in ("echo", "sleep", "http", "get_greeting", "get_counter", "is_admin",
                 "knowledge_search", "knowledge_add"):  # fmt: skip
        assert name in tools
    search = tools["knowledge_search"]
    assert search["parameters"][0] == {"name": "query", "required": True, "type": "str"}
    assert all(p["name"] != "ctx" for p in search["parameters"])
    assert tools["echo"]["accepts_any_args"] is True


async def test_events_record_the_history(make_client):
    client, app = await make_client()
    flow = {"name": "g", "flow": {"start": {"tool": None, "next": "go"},
                                 "go": {"tool": "echo", "args": {}, "done": True}}}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=flow)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    await client.post(f"/api/workflow/{gate['id']}/ready")
    await wait_for(client, wf_id)
    events = await app.state.store.events(wf_id)
    assert [e["type"] for e in events] == [
        "created", "gate_waiting", "gate_decided", "step_done",  # the gate
        "step_started", "step_done", "completed",  # the echo step, then the end
    ]  # fmt: skip
    assert events[2]["data"] == {"decision": "approve", "by": "james"}


async def test_an_error_text_sqlite_cannot_store_still_fails_the_workflow(make_client):
    client, _ = await make_client()
    wf = await wait_for(client, (await client.post(
        "/api/workflow", json=single("surrogate_error"))).json()["id"])  # fmt: skip
    assert wf["status"] == "failed"
    assert "\\udcff" in wf["steps"][0]["error"]


async def test_a_tool_raising_cancelled_error_itself_is_an_ordinary_failure(make_client):
    client, app = await make_client()
    body = single("self_cancel", retry={"max_attempts": 2, "backoff_s": 0.01})
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    assert orjson.loads(wf["steps"][0]["result_json"]) == {"attempt": 2}
    # The step's task ends just after its outcome is committed (and seen over HTTP).
    for _ in range(100):
        if app.state.executor.running == 0:
            break
        await asyncio.sleep(0.01)
    assert app.state.executor.running == 0


async def test_a_tools_own_timeout_error_is_retried_like_any_error(make_client):
    client, _ = await make_client()
    body = single("own_timeout", retry={"max_attempts": 2, "backoff_s": 0.01})
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed" and wf["steps"][0]["attempt"] == 2


async def test_each_attempt_gets_a_fresh_copy_of_the_args(make_client):
    client, _ = await make_client()
    body = single("mutate_then_fail", {"items": ["a"]},
                  retry={"max_attempts": 3, "backoff_s": 0.01})  # fmt: skip
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed"
    assert orjson.loads(wf["steps"][0]["result_json"]) == ["a", "trailer"]
    assert wf["flow"]["start"]["args"] == {"items": ["a"]}


async def test_a_gate_expires_after_its_timeout_into_on_error(make_client):
    client, _ = await make_client(poll_interval=30.0)
    body = {"name": "expiring", "flow": {
        "start": {"tool": None, "timeout": 0.2, "on_error": "late", "next": "go"},
        "go": {"tool": "echo", "args": {}, "done": True},
        "late": {"tool": "echo", "args": {"why": "<<error.message>>"}, "done": True},
    }}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate))
    assert gate["expires_at"] is not None
    wf = await wait_for(client, wf_id, timeout=5)  # the loop sleeps until the deadline
    assert wf["status"] == "completed"
    assert [(s["state"], s["status"]) for s in wf["steps"]] == [
        ("start", "failed"),
        ("late", "done"),
    ]
    assert orjson.loads(wf["steps"][1]["result_json"]) == {
        "why": "gate expired after 0.2s without a decision"
    }
    assert wf["steps"][0]["awaiting"] is None
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 409


async def test_a_gate_without_on_error_fails_the_workflow_when_it_expires(make_client):
    client, _ = await make_client()
    body = {"name": "expiring", "flow": {"start": {"tool": None, "timeout": 0.1, "done": True}}}
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "failed" and "gate expired" in wf["error"]


async def test_retry_is_rejected_on_a_gate(make_client):
    client, _ = await make_client()
    body = {"name": "g", "flow": {"start": {"tool": None, "retry": {"max_attempts": 2},
                                            "done": True}}}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422 and "does not apply to a gate" in resp.json()["error"]


async def test_placeholder_edges_render_as_validated(make_client):
    client, _ = await make_client()
    body = single("echo", {"a": "<<input.n>>>", "b": "{{input.n}}}"})
    body["input"] = {"n": 41}
    wf = await wait_for(client, (await client.post("/api/workflow", json=body)).json()["id"])
    assert wf["status"] == "completed", wf
    assert orjson.loads(wf["steps"][0]["result_json"]) == {"a": "41>", "b": "41}"}


@pytest.mark.timeout(20)
async def test_validating_a_megabyte_of_openers_is_linear(make_client):
    client, _ = await make_client(max_body_bytes=2_000_000)
    body = single("echo", {"a": "<" * 600_000, "b": "{" * 300_000 + "<<"})
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.status_code == 200 and resp.json()["valid"] is True


async def test_the_app_can_start_again_after_a_stop(tmp_path):
    app = create_app(make_config(tmp_path, tool_modules=MODULES))
    body = {"name": "e", "flow": {"start": {"tool": "blocking_sleep", "args": {"seconds": 0},
                                            "done": True}}}  # fmt: skip
    for _ in range(2):
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://stepd", headers=auth()
            ) as client:
                wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
                assert (await wait_for(client, wf_id))["status"] == "completed"
                assert (await client.get("/healthz")).status_code == 200
