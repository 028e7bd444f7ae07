"""Synchronous execution across `stepd serve` processes on one PostgreSQL database: a
request waiting on one daemon learns of what the others write (their NOTIFY wakes its
event hub)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_multi_daemon import APPROVER, Cluster, cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(180)]

FLOW = {
    "start": {
        "tool": "echo",
        "args": {},
        "branch": [{"if": "input.hold == true", "then": "approve"}, {"else": "end"}],
    },
    "approve": {"tool": None, "next": "end"},
    "end": {"tool": "echo", "args": {"ok": True}, "done": True},
}


def test_an_execute_waiting_on_one_daemon_sees_its_run_end_on_others(
    cluster: Callable[..., Cluster],  # noqa: F811
) -> None:
    c = cluster(poll_interval=1.0)
    a, b, approver = c["a"].client(), c["b"].client(), c["c"].client(APPROVER)
    c.clients.extend([a, b, approver])
    definition = {"name": "one-at-a-time", "concurrency": 1, "flow": FLOW}
    assert a.post("/api/workflows", json={"definition": definition}).status_code == 201
    # A run at a gate holds the definition's one slot.
    held = a.post("/api/workflows/one-at-a-time/execute", json={"variables": {"hold": True}})
    assert held.status_code == 202, held.text
    [gate] = held.json()["awaiting"]

    with ThreadPoolExecutor(1) as pool:
        began = time.monotonic()
        waiting = pool.submit(
            b.post, "/api/workflows/one-at-a-time/execute?timeout=60",
            json={"variables": {"hold": False}}, timeout=90,
        )  # fmt: skip
        time.sleep(1.0)
        runs = a.get("/api/workflows/one-at-a-time/runs").json()["runs"]
        assert sorted(r["status"] for r in runs) == ["queued", "running"], runs
        assert not waiting.done()
        approved = time.monotonic()
        resp = approver.post(f"/api/workflow/{gate['step_id']}/ready", json={})
        assert resp.status_code == 200, resp.text
        answer = waiting.result(timeout=60)
        took = time.monotonic() - approved
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed" and answer.json()["output"] == {"ok": True}
    assert took < 5, took  # 0.1 to 0.4 s here: each commit elsewhere wakes daemon b's hub
    assert time.monotonic() - began < 30
