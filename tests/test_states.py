"""Parallel, map and wait states, signals, and run control, end to end over HTTP on the
backend under test (spec §7 and §8)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.asyncio


def echo(done: bool = True, **args: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"tool": "echo", "args": args}
    if done:
        state["done"] = True
    return state


async def create(client: Any, flow: dict[str, Any], input_: Any = None) -> int:
    resp = await client.post("/api/workflow", json={"name": "t", "flow": flow,
                                                     "input": input_ or {}})  # fmt: skip
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


async def test_parallel_results_by_branch_and_output(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {
        "start": {"parallel": {
            "geo": {"start": echo(q="<<input.addr>>")},
            "crm": {"start": {"tool": "echo", "args": {"n": 1}, "next": "two"},
                    "two": echo(prev="<<result.n>>", top="<<steps.start.result.n>>")},
        }, "next": "merge"},
        "merge": echo(geo="<<steps.start.result.geo.q>>", crm="<<result.crm>>"),
    }  # fmt: skip
    wf = await wait_for(client, await create(client, flow, {"addr": "Main St"}))
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"geo": "Main St", "crm": {"prev": 1, "top": 1}}
    par = next(s for s in wf["steps"] if s["state"] == "start" and s["parent_id"] is None)
    assert par["kind"] == "parallel" and par["status"] == "done"
    inner = [s for s in wf["steps"] if s["parent_id"] == par["id"]]
    assert sorted((tuple(s["scope"]), s["state"]) for s in inner) == [
        (("start", "crm"), "start"),
        (("start", "crm"), "two"),
        (("start", "geo"), "start"),
    ]


async def test_map_keeps_item_order_and_binds_item_and_index(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {"start": {"map": {"items": "<<input.users>>", "as": "user", "max_concurrency": 2,
                              "flow": {"start": echo(to="<<user.email>>", i="<<index>>")}},
                      "done": True}}  # fmt: skip
    users = [{"email": f"u{i}@x"} for i in range(7)]
    wf = await wait_for(client, await create(client, flow, {"users": users}))
    assert wf["status"] == "completed", wf
    assert wf["output"] == [{"to": f"u{i}@x", "i": i} for i in range(7)]


async def test_empty_map_gives_an_empty_list(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {"start": {"map": {"items": [], "flow": {"start": echo()}}, "done": True}}
    wf = await wait_for(client, await create(client, flow))
    assert wf["status"] == "completed" and wf["output"] == []


async def test_parallel_fail_fast_cancels_siblings(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {"start": {"parallel": {
        "bad": {"start": {"tool": "fail", "args": {"message": "nope", "retryable": False},
                          "done": True}},
        "slow": {"start": {"tool": "sleep", "args": {"seconds": 30}, "done": True}},
        "gate": {"start": {"tool": None, "done": True}},
    }, "done": True}}  # fmt: skip
    wf = await wait_for(client, await create(client, flow))
    assert wf["status"] == "failed", wf
    assert "branch 'bad' failed" in wf["error"] and "nope" in wf["error"]
    by_state = {tuple(s["scope"] or ()): s for s in wf["steps"]}
    assert by_state[("start", "slow")]["status"] == "cancelled"
    gate = by_state[("start", "gate")]
    assert gate["status"] == "cancelled" and gate["reason"] == "sibling failed"


async def test_all_settled_reports_each_branch(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {"start": {"parallel": {
        "a": {"start": echo(x=1)},
        "b": {"start": {"tool": "fail", "args": {"message": "bad", "retryable": False},
                        "done": True}},
    }, "join": "all_settled", "done": True}}  # fmt: skip
    wf = await wait_for(client, await create(client, flow))
    assert wf["status"] == "completed", wf
    assert wf["output"]["a"] == {"status": "done", "result": {"x": 1}}
    assert wf["output"]["b"]["status"] == "failed"
    assert "bad" in wf["output"]["b"]["error"]["message"]


async def test_map_tolerated_failures(make_client: Any) -> None:
    client, _ = await make_client()
    inner = {"start": {"branch": [{"if": "result.ok", "then": "fine"}, {"else": "boom"}],
                       "tool": "echo", "args": {"ok": "<<item>>"}},
             "fine": echo(v="<<index>>"),
             "boom": {"tool": "fail", "args": {"retryable": False}, "done": True}}  # fmt: skip
    flow = {"start": {"map": {"items": "<<input.xs>>", "tolerated_failures": 1, "flow": inner},
                      "done": True}}  # fmt: skip
    wf = await wait_for(client, await create(client, flow, {"xs": [True, False, True]}))
    assert wf["status"] == "completed", wf
    assert wf["output"][0] == {"v": 0} and wf["output"][2] == {"v": 2}
    assert "error" in wf["output"][1]
    wf = await wait_for(client, await create(client, flow, {"xs": [False, True, False]}))
    assert wf["status"] == "failed", wf
    assert "item 0 failed" in wf["error"] or "item 2 failed" in wf["error"], wf


async def test_wait_seconds_and_until(make_client: Any) -> None:
    client, _ = await make_client(poll_interval=0.2)
    flow = {
        "start": {"wait": {"seconds": 0.3}, "next": "then"},
        "then": {"wait": {"until": "<<input.at>>"}, "next": "end"},
        "end": echo(),
    }
    wf_id = await create(client, flow, {"at": "2000-01-01T00:00:00Z"})
    wf = await wait_for(client, wf_id, lambda w: any(s["awaiting"] == "timer"
                                                     for s in w["steps"]))  # fmt: skip
    assert wf["status"] == "running"
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    first = wf["steps"][0]  # started when it began waiting, not when it was woken
    assert first["completed_at"] - first["started_at"] >= 300, first


async def test_signal_buffered_and_waiting(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {
        "start": {"tool": None, "next": "w1"},
        "w1": {"wait": {"signal": "go"}, "next": "w2"},
        "w2": {"wait": {"signal": "go"}, "next": "end"},
        "end": echo(first="<<steps.w1.result>>", second="<<steps.w2.result>>"),
    }
    wf_id = await create(client, flow)
    # Sent before any wait is reached: kept, and consumed first in first out.
    for data in ({"n": 1}, {"n": 2}):
        resp = await client.post(f"/api/workflow/{wf_id}/signal", json={"name": "go", "data": data})
        assert resp.status_code == 202 and resp.json() == {"accepted": True}
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
    wf = await wait_for(client, wf_id)
    assert wf["output"] == {"first": {"n": 1}, "second": {"n": 2}}, wf
    resp = await client.post(f"/api/workflow/{wf_id}/signal", json={"name": "go"})
    assert resp.status_code == 409


async def test_signal_wakes_a_waiting_step_and_times_out(make_client: Any) -> None:
    client, _ = await make_client(poll_interval=0.2)
    flow = {"start": {"wait": {"signal": "paid", "timeout": 60}, "done": True}}
    wf_id = await create(client, flow)
    await wait_for(client, wf_id, lambda w: w["steps"][0]["awaiting"] == "signal")
    resp = await client.post(f"/api/workflow/{wf_id}/signal",
                             json={"name": "paid", "data": [1, 2]})  # fmt: skip
    assert resp.status_code == 202
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == [1, 2]
    flow = {"start": {"wait": {"signal": "paid", "timeout": 0.3}, "on_error": "late",
                      "done": True}, "late": echo(e="<<error.message>>")}  # fmt: skip
    wf = await wait_for(client, await create(client, flow))
    assert wf["status"] == "completed" and wf["output"] == {"e": "wait timed out"}, wf


async def test_pause_resume(make_client: Any) -> None:
    client, app = await make_client()
    flow = {"start": {"tool": "sleep", "args": {"seconds": 0.5}, "next": "b"}, "b": echo()}
    wf_id = await create(client, flow)
    resp = await client.post(f"/api/workflow/{wf_id}/pause", json={"reason": "look"})
    assert resp.status_code == 200 and resp.json() == {"id": wf_id, "status": "paused"}
    assert (await client.post(f"/api/workflow/{wf_id}/pause")).status_code == 409
    await asyncio.sleep(1.0)
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "paused"
    assert [s["status"] for s in wf["steps"]] == ["done", "pending"]
    resp = await client.post(f"/api/workflow/{wf_id}/resume")
    assert resp.json() == {"id": wf_id, "status": "running", "redriven": False}
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed"
    assert (await client.post(f"/api/workflow/{wf_id}/resume")).status_code == 409
    events = await app.state.store.events(wf_id)
    paused = next(e for e in events if e["type"] == "paused")
    assert paused["data"] == {"by": "james", "reason": "look"}


async def test_redrive_runs_only_failed_items(make_client: Any) -> None:
    client, _ = await make_client()
    inner = {"start": {"tool": "flaky", "args": {"fail_times": "<<item>>"}, "done": True}}
    flow = {"start": {"map": {"items": "<<input.xs>>", "flow": inner, "max_concurrency": 1},
                      "done": True}}  # fmt: skip
    wf_id = await create(client, flow, {"xs": [0, 5, 0]})
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed", wf
    before = {s["id"] for s in wf["steps"]}
    finished = {s["scope"][1] for s in wf["steps"] if s["scope"] and s["status"] == "done"}
    assert finished == {0}
    resp = await client.post(f"/api/workflow/{wf_id}/resume")
    assert resp.json()["redriven"] is True
    wf = await wait_for(client, wf_id)
    rerun = {s["scope"][1] for s in wf["steps"] if s["id"] not in before and s["scope"]}
    # Item 1 ran again (and failed again: item 2, never started, waits behind it).
    assert rerun == {1}, rerun
    # The map step itself is visited once: its failed items ran again inside it.
    assert [s["state"] for s in wf["steps"] if s["parent_id"] is None] == ["start"]


async def test_intervene_changes_input(make_client: Any) -> None:
    client, _ = await make_client()
    flow = {"start": {"tool": None, "next": "b"}, "b": echo(v="<<input.v>>", w="<<input.w>>")}
    wf_id = await create(client, flow, {"v": 1, "w": {"a": 1, "b": 2}})
    patch = {"input": {"v": 2, "w": {"b": None}}, "reason": "fix"}
    resp = await client.post(f"/api/workflow/{wf_id}/intervene", json=patch)
    assert resp.status_code == 200, resp.text
    assert resp.json()["input"] == {"v": 2, "w": {"a": 1}}
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
    await client.post(f"/api/workflow/{gate['id']}/ready")
    wf = await wait_for(client, wf_id)
    assert wf["output"] == {"v": 2, "w": {"a": 1}}
    resp = await client.post(f"/api/workflow/{wf_id}/intervene", json={"input": {"v": 3}})
    assert resp.status_code == 409


async def test_cancel_reaches_every_branch_and_item(make_client: Any) -> None:
    client, app = await make_client()
    flow = {"start": {"parallel": {
        "gate": {"start": {"tool": None, "done": True}},
        "items": {"start": {"map": {"items": [1, 2, 3, 4], "max_concurrency": 2,
                                    "flow": {"start": {"tool": "sleep", "args": {"seconds": 30},
                                                       "done": True}}}, "done": True}},
    }, "done": True}}  # fmt: skip
    wf_id = await create(client, flow)
    await wait_for(client, wf_id, lambda w: sum(s["status"] == "running" and s["kind"] == "tool"
                                                for s in w["steps"]) == 2)  # fmt: skip
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 200
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "cancelled"
    assert {s["status"] for s in wf["steps"]} == {"cancelled"}, wf["steps"]
    await asyncio.sleep(0.3)
    assert app.state.executor.running == 0  # the sleeping tools were stopped


async def test_pause_holds_items_not_yet_started_and_resume_runs_them(make_client: Any) -> None:
    client, _ = await make_client()
    inner = {"start": {"tool": "sleep", "args": {"seconds": 0.3}, "done": True}}
    flow = {"start": {"map": {"items": [1, 2, 3, 4, 5], "max_concurrency": 2, "flow": inner},
                      "done": True}}  # fmt: skip
    wf_id = await create(client, flow)
    await wait_for(client, wf_id, lambda w: sum(s["kind"] == "tool" and s["status"] == "running"
                                                for s in w["steps"]) == 2)  # fmt: skip
    assert (await client.post(f"/api/workflow/{wf_id}/pause")).status_code == 200
    await asyncio.sleep(1.0)
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "paused"
    items = [s for s in wf["steps"] if s["kind"] == "tool"]
    # The two running items finished; the items they started wait, held.
    assert sum(s["status"] == "done" for s in items) == 2
    assert all(s["status"] in ("done", "pending") for s in items), items
    assert (await client.post(f"/api/workflow/{wf_id}/resume")).status_code == 200
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and len(wf["output"]) == 5


async def test_run_control_errors(make_client: Any) -> None:
    client, _ = await make_client()
    missing = 1_700_000_000_000
    for action in ("pause", "resume", "signal", "intervene"):
        body = {"pause": {}, "resume": {}, "signal": {"name": "x"}, "intervene": {"input": {}}}
        resp = await client.post(f"/api/workflow/{missing}/{action}", json=body[action])
        assert resp.status_code == 404 and "not found" in resp.json()["error"]
    wf_id = await create(client, {"start": {"tool": None, "done": True}})
    bad = [("pause", {"why": 1}, 400), ("resume", {"from_step": 3}, 400),
           ("signal", {"data": 1}, 400), ("signal", {"name": ""}, 400),
           ("intervene", {"input": [1]}, 400), ("intervene", {}, 400),
           ("resume", {}, 409)]  # fmt: skip
    for action, body, status in bad:
        resp = await client.post(f"/api/workflow/{wf_id}/{action}", json=body)
        assert resp.status_code == status, (action, body, resp.text)
        assert "error" in resp.json()
    await client.delete(f"/api/workflow/{wf_id}")
    resp = await client.post(f"/api/workflow/{wf_id}/resume", json={"from_step": "nope"})
    assert resp.status_code == 422 and "nope" in resp.json()["error"]
    approver = {"Authorization": "Bearer tok-approver"}
    resp = await client.post(f"/api/workflow/{wf_id}/pause", headers=approver)
    assert resp.status_code == 403


async def test_nested_map_in_parallel_fails_fast_from_the_inside(make_client: Any) -> None:
    client, _ = await make_client()
    inner = {"start": {"branch": [{"if": "result.x == 2", "then": "bad"}, {"else": "ok"}],
                       "tool": "echo", "args": {"x": "<<item>>"}},
             "ok": {"tool": "sleep", "args": {"seconds": "<<item * 0.2>>"}, "done": True},
             "bad": {"tool": "fail", "args": {"retryable": False}, "done": True}}  # fmt: skip
    flow = {"start": {"parallel": {
        "items": {"start": {"map": {"items": [1, 2, 30], "flow": inner}, "done": True}},
        "slow": {"start": {"tool": "sleep", "args": {"seconds": 30}, "done": True}},
    }, "done": True}}  # fmt: skip
    wf = await wait_for(client, await create(client, flow))
    assert wf["status"] == "failed", wf
    assert "branch 'items' failed" in wf["error"] and "item 1 failed" in wf["error"], wf["error"]
    # Nothing is left open anywhere; the long sleeps were cancelled, not waited for.
    assert not [s for s in wf["steps"] if s["status"] in ("pending", "running")]
    first_item = ["start", "items", "start", 0]
    slow = [s for s in wf["steps"] if s["tool"] == "sleep" and s["scope"] != first_item]
    assert slow and all(s["status"] == "cancelled" for s in slow), slow
    # Three levels deep: each inner step's scope names the path down to it.
    assert ["start", "items", "start", 0] in [s["scope"] for s in wf["steps"]]


async def test_signals_count_against_what_a_workflow_may_store(make_client: Any) -> None:
    client, _ = await make_client(max_workflow_bytes=20_000)
    wf_id = await create(client, {"start": {"wait": {"signal": "never"}, "done": True}})
    data = "x" * 6000
    answers = [(await client.post(f"/api/workflow/{wf_id}/signal",
                                  json={"name": "spam", "data": data})).status_code
               for _ in range(5)]  # fmt: skip
    assert answers[:2] == [202, 202] and answers[-1] == 413, answers
    resp = await client.post(f"/api/workflow/{wf_id}/signal", json={"name": "spam", "data": data})
    assert resp.status_code == 413 and "max_workflow_bytes" in resp.json()["error"]
    # A refused signal changed nothing: a small one still fits.
    resp = await client.post(f"/api/workflow/{wf_id}/signal", json={"name": "never", "data": 1})
    assert resp.status_code == 202
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed" and wf["output"] == 1


async def test_a_dag_over_the_state_limit_is_refused_before_compiling(make_client: Any) -> None:
    client, _ = await make_client()
    chain = [{"id": "s0", "tool": "echo"}] + [
        {"id": f"s{i}", "tool": "echo", "depends_on": [f"s{i - 1}"]} for i in range(1, 5000)
    ]
    resp = await client.post("/api/workflow", json={"name": "long", "steps": chain})
    assert resp.status_code == 422
    assert "5000 steps; the limit is 200" in resp.json()["error"]


async def test_redrive_of_a_map_that_failed_before_its_items_visits_it_again(
    make_client: Any,
) -> None:
    client, _ = await make_client()
    flow = {"start": {"map": {"items": "<<input.users>>", "flow": {"start": echo()}},
                      "done": True}}  # fmt: skip
    wf_id = await create(client, flow, {"users": 5})
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed" and "not a list" in wf["error"]
    assert (await client.post(f"/api/workflow/{wf_id}/resume")).status_code == 200
    wf = await wait_for(client, wf_id)  # it ends again (the input is still wrong), not stuck
    assert wf["status"] == "failed"
    assert [s["status"] for s in wf["steps"]] == ["failed", "failed"]


async def test_redrive_of_a_timed_out_parallel_gives_it_its_time_again(make_client: Any) -> None:
    client, _ = await make_client(poll_interval=0.1)
    flow = {"start": {"parallel": {"a": {"start": {"tool": None, "done": True}},
                                   "b": {"start": echo(x=1)}},
                      "timeout": 0.5, "done": True}}  # fmt: skip
    wf_id = await create(client, flow)
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "failed" and "timed out" in wf["error"]
    assert (await client.post(f"/api/workflow/{wf_id}/resume")).status_code == 200
    wf = await wait_for(client, wf_id, lambda w: any(s["awaiting"] == "ready"
                                                     for s in w["steps"]))  # fmt: skip
    assert wf["status"] == "running"
    gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
    wf = await wait_for(client, wf_id)
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"a": None, "b": {"x": 1}}


async def test_the_step_limit_counts_one_items_path(make_client: Any) -> None:
    client, _ = await make_client(step_limit=10)
    inner = {"start": {"tool": "echo", "args": {}, "next": "b"}, "b": echo(i="<<index>>")}
    flow = {"start": {"map": {"items": list(range(12)), "max_concurrency": 1, "flow": inner},
                      "done": True}}  # fmt: skip
    wf = await wait_for(client, await create(client, flow), timeout=30)
    assert wf["status"] == "completed", wf["error"]
    assert wf["output"] == [{"i": i} for i in range(12)]


async def test_map_items_count_against_what_a_workflow_may_store(make_client: Any) -> None:
    client, _ = await make_client(max_workflow_bytes=60_000)
    inner = {"start": {"map": {"items": "<<input.big>>", "flow": {"start": echo()}},
                       "done": True}}  # fmt: skip
    flow = {"start": {"map": {"items": [1, 2, 3, 4], "flow": inner}, "done": True}}
    wf = await wait_for(client, await create(client, flow, {"big": ["x" * 100] * 100}))
    assert wf["status"] == "failed", wf
    assert "storage limit" in wf["error"], wf["error"]
