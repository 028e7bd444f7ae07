"""Saved definitions with three real `stepd serve` processes on one PostgreSQL database:
an armed webhook called through every daemon at once starts one run, and a definition's
concurrency limit holds across daemons (runs queued on one start when another's end)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from daemon.notify import sign
from tests.test_multi_daemon import NAMES, Cluster, cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.postgresql_only, pytest.mark.timeout(180)]


def clients(c: Cluster) -> list[httpx.Client]:
    made = [c[name].client() for name in NAMES]
    c.clients.extend(made)
    return made


def test_an_armed_hook_called_through_three_daemons_starts_one_run(
    cluster: Callable[..., Cluster],  # noqa: F811
) -> None:
    c = cluster(poll_interval=1.0)
    a, b, cc = clients(c)
    definition = {"name": "hook", "flow": {"start": {"tool": "whereami", "args": {}, "done": True}}}
    resp = a.post("/api/workflows", json={"definition": definition})
    assert resp.status_code == 201, resp.text
    def_id = resp.json()["id"]
    hook = b.post(f"/api/workflows/{def_id}/deploy").json()
    bodies = iter(range(1000))

    def call(client: httpx.Client) -> int:
        body = orjson.dumps({"n": next(bodies)})  # each caller's own call
        ts = int(time.time())
        headers = {
            "X-Stepd-Timestamp": str(ts),
            "Content-Type": "application/json",
            "X-Stepd-Signature": sign(hook["webhook_secret"].encode(), ts, body),
        }
        return client.post(
            f"/hooks/{hook['webhook_id']}", content=body, headers=headers
        ).status_code

    with ThreadPoolExecutor(21) as pool:
        for _ in range(3):
            assert cc.post(f"/api/workflows/{def_id}/arm").status_code == 200
            codes = sorted(pool.map(call, [a, b, cc] * 7))
            assert codes == [202] + [410] * 20, codes
    runs = a.get(f"/api/workflows/{def_id}/runs").json()
    assert runs["total"] == 3, runs


def test_concurrency_limit_holds_across_daemons(cluster: Callable[..., Cluster]) -> None:  # noqa: F811
    c = cluster(poll_interval=1.0)
    a, b, cc = clients(c)
    definition = {
        "name": "limited",
        "concurrency": 3,
        "flow": {"start": {"tool": "linger", "args": {"seconds": 0.3}, "done": True}},
    }
    def_id = a.post("/api/workflows", json={"definition": definition}).json()["id"]

    def start(client: httpx.Client) -> int:
        resp = client.post(f"/api/workflows/{def_id}/run", json={"input_data": {}})
        assert resp.status_code == 202, resp.text
        return int(resp.json()["run_id"])

    with ThreadPoolExecutor(12) as pool:
        run_ids = list(pool.map(start, [a, b, cc] * 10))
    deadline = time.monotonic() + 60
    while True:
        runs = a.get(f"/api/workflows/{def_id}/runs?limit=200").json()["runs"]
        if all(r["status"] == "completed" for r in runs) and len(runs) == 30:
            break
        assert time.monotonic() < deadline, (runs, c.logs())
        time.sleep(0.2)
    # A run holds its slot from its first step's creation (when it left the queue) to its
    # end: at no instant did more than three overlap.
    spans: list[tuple[int, int]] = []
    nodes = set()
    for run_id in run_ids:
        wf: dict[str, Any] = a.get(f"/api/workflow/{run_id}").json()
        spans.append((wf["steps"][0]["created_at"], wf["completed_at"]))
        nodes.add(orjson.loads(wf["steps"][0]["result_json"])["node"])
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = running = 0
    for _, delta in edges:
        running += delta
        most = max(most, running)
    assert most == 3, (most, spans)
    assert len(nodes) >= 2, nodes  # the runs really spread over the daemons
