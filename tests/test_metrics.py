"""GET /metrics: the real app over HTTP, scraped and parsed like Prometheus would.

The counters and histograms are process-wide (one registry), so the tests compare a
scrape before with one after; the gauges are read from the database, so they are checked
for their exact values.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import config as configuration
from daemon import metrics, openapi
from daemon.api import create_app
from daemon.config import Config
from daemon.errors import ConfigError
from daemon.storage.sqlite.store import SqliteStore
from daemon.tools import Registry, build_registry
from tests.helpers import auth, make_config, wait_for, waiting_gate

MODULES = ("daemon.tools.demo", "tests.sample_tools")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def serving(
    config: Config, registry: Registry | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan running, and a client with james' token."""
    app = create_app(config, registry=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://stepd", headers=auth("james")
        ) as client:
            yield client


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of one scrape, by name and labels."""
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; a labelled child not created yet counts as 0."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def one_step(tool: str | None, args: dict[str, Any] | None = None, **state: Any) -> dict[str, Any]:
    """A workflow of one state (a gate when `tool` is None)."""
    start = {"tool": tool, "args": args or {}, "done": True, **state}
    return {"name": f"one-{tool}", "flow": {"start": start}}


async def create(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    return int(resp.json()["id"])


def last_step(wf: dict[str, Any]) -> dict[str, Any]:
    return wf["steps"][-1] if wf["steps"] else {}


# -- the recording API ------------------------------------------------------------------


def test_recording_functions_move_the_registry():
    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    started = sample("stepd_steps_started_total", tool="t-api")
    metrics.step_started("t-api")
    metrics.step_started("t-api")
    assert sample("stepd_steps_started_total", tool="t-api") == started + 2

    for outcome, seconds in (("done", 0.01), ("retrying", 0.2), ("failed", 3.0)):
        metrics.step_finished("t-api", outcome, seconds)
        assert sample("stepd_steps_finished_total", tool="t-api", outcome=outcome) == 1
    assert sample("stepd_step_duration_seconds_count", tool="t-api") == 3
    assert sample("stepd_step_duration_seconds_sum", tool="t-api") == pytest.approx(3.21)
    assert sample("stepd_step_duration_seconds_bucket", tool="t-api", le="0.25") == 2
    with pytest.raises(ValueError, match="outcome"):
        metrics.step_finished("t-api", "exploded", 1.0)

    lags = sample("stepd_claim_lag_seconds_count")
    metrics.claimed(0.004)
    metrics.claimed(-0.5)  # the clocks of two processes disagree: counted as no lag
    assert sample("stepd_claim_lag_seconds_count") == lags + 2
    assert sample("stepd_claim_lag_seconds_bucket", le="0.001") >= 1

    commits = sample("stepd_commit_duration_seconds_count")
    ops = sample("stepd_commit_batch_size_sum")
    metrics.committed(0.002, 7)
    assert sample("stepd_commit_duration_seconds_count") == commits + 1
    assert sample("stepd_commit_batch_size_sum") == ops + 7


# -- gauges from the database -----------------------------------------------------------


async def test_gauges_show_queue_gates_running_steps_and_workflows(tmp_path):
    # One slot: a running sleep keeps the next workflow's step in the queue.
    config = make_config(tmp_path, concurrency=1, tool_modules=MODULES, shutdown_grace=0.0)
    async with serving(config) as client:
        empty = await scrape(client)
        for name in ("stepd_steps_runnable", "stepd_steps_delayed", "stepd_steps_running",
                     "stepd_gates_waiting", "stepd_decisions_waiting"):  # fmt: skip
            assert value(empty, name) == 0, name
        for status in metrics.WORKFLOW_STATUSES:
            assert value(empty, "stepd_workflows", status=status) == 0

        done = await create(client, one_step("echo", {"x": 1}))
        failed = await create(client, one_step("fail", {"retryable": False}))
        for wf_id in (done, failed):
            await wait_for(client, wf_id)
        gate = await create(client, one_step(None))
        await wait_for(client, gate, lambda wf: waiting_gate(wf) is not None)
        retry = {"max_attempts": 3, "backoff_s": 3600}
        delayed = await create(client, one_step("fail", retry=retry))
        await wait_for(client, delayed, lambda wf: last_step(wf).get("error") is not None)
        sleeper = await create(client, one_step("sleep", {"seconds": 60}))
        await wait_for(client, sleeper, lambda wf: last_step(wf).get("status") == "running")
        queued = await create(client, one_step("echo"))

        now = await scrape(client)
        assert value(now, "stepd_steps_runnable") == 1  # `queued`: due, no free slot
        assert value(now, "stepd_steps_delayed") == 1  # `delayed`: its retry is an hour away
        assert value(now, "stepd_steps_running") == 1  # `sleeper`
        assert value(now, "stepd_gates_waiting") == 1  # `gate`
        assert value(now, "stepd_decisions_waiting") == 0
        counts = {s: value(now, "stepd_workflows", status=s) for s in metrics.WORKFLOW_STATUSES}
        assert counts == {"running": 4, "completed": 1, "failed": 1, "cancelled": 0}

        for wf_id in (sleeper, gate):
            assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 200
        await wait_for(client, queued)  # the slot is free again

        after = await scrape(client)
        assert value(after, "stepd_steps_runnable") == 0
        assert value(after, "stepd_steps_delayed") == 1
        assert value(after, "stepd_steps_running") == 0
        assert value(after, "stepd_gates_waiting") == 0
        counts = {s: value(after, "stepd_workflows", status=s) for s in metrics.WORKFLOW_STATUSES}
        assert counts == {"running": 1, "completed": 2, "failed": 1, "cancelled": 2}


async def hold(seconds: float = 60.0) -> dict[str, float]:
    """A slow tool with a side effect: interrupted, its step waits for retry-or-fail."""
    await asyncio.sleep(seconds)
    return {"held": seconds}


async def test_interrupted_non_idempotent_steps_count_as_decisions_waiting(tmp_path):
    config = make_config(tmp_path, shutdown_grace=0.0)
    registry = build_registry(config.tool_modules)
    registry.add("hold", hold, idempotent=False)
    async with serving(config, registry) as client:  # stops while the tool runs
        wf_id = await create(client, one_step("hold"))
        await wait_for(client, wf_id, lambda wf: last_step(wf).get("status") == "running")
    async with serving(config, registry) as client:
        samples = await scrape(client)
        assert value(samples, "stepd_decisions_waiting") == 1
        assert value(samples, "stepd_gates_waiting") == 0
        assert value(samples, "stepd_steps_running") == 0
        assert value(samples, "stepd_workflows", status="running") == 1


@pytest.mark.sqlite_only  # SQLite's query plans
async def test_gauge_queries_read_only_their_indexes(tmp_path):
    """The scrape must stay cheap with millions of finished rows: every step query reads
    a partial index of unfinished steps, the workflow count a covering index."""
    async with serving(make_config(tmp_path)) as client:
        await scrape(client)  # the schema exists
    expected = {
        SqliteStore.Q["gauge_pending"]: "SCAN steps USING INDEX steps_runnable",
        SqliteStore.Q["gauge_running"]: "SCAN steps USING INDEX steps_leases",
        SqliteStore.Q["gauge_waiting"]: "SCAN steps USING INDEX steps_waiting",
        SqliteStore.Q["gauge_workflows"]: "SCAN workflows USING COVERING INDEX workflows_status",
    }
    db = sqlite3.connect(tmp_path / "stepd.db")
    try:
        for sql, access in expected.items():
            plan = [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, {"now": 1})]
            tables = [line for line in plan if " steps" in line or " workflows" in line]
            assert tables == [access], (sql, plan)
    finally:
        db.close()


# -- counters and histograms fed by the executor and the store --------------------------
# These depend on the calls into daemon.metrics in daemon/executor.py and daemon/storage/base.py.


async def test_counters_and_histograms_move_when_workflows_run(tmp_path):
    config = make_config(tmp_path, tool_modules=MODULES)
    async with serving(config) as client:
        before = await scrape(client)
        two_echoes = {
            "name": "two",
            "flow": {
                "start": {"tool": "echo", "args": {"n": 1}, "next": "second"},
                "second": {"tool": "echo", "args": {"prev": "<<result>>"}, "done": True},
            },
        }
        retry = {"max_attempts": 2, "backoff_s": 0}
        ids = [
            await create(client, two_echoes),
            await create(client, one_step("fail", {"retryable": False})),
            await create(client, one_step("flaky", {"fail_times": 1}, retry=retry)),
        ]
        for wf_id in ids:
            await wait_for(client, wf_id)
        after = await scrape(client)

    assert delta(before, after, "stepd_steps_started_total", tool="echo") == 2
    assert delta(before, after, "stepd_steps_finished_total", tool="echo", outcome="done") == 2
    assert delta(before, after, "stepd_step_duration_seconds_count", tool="echo") == 2
    assert delta(before, after, "stepd_steps_started_total", tool="fail") == 1
    assert delta(before, after, "stepd_steps_finished_total", tool="fail", outcome="failed") == 1
    assert delta(before, after, "stepd_steps_started_total", tool="flaky") == 2
    for outcome in ("retrying", "done"):
        assert delta(before, after, "stepd_steps_finished_total", tool="flaky",
                     outcome=outcome) == 1  # fmt: skip
    assert delta(before, after, "stepd_step_duration_seconds_count", tool="flaky") == 2

    # Five attempts were claimed; each claim records its lag.
    assert delta(before, after, "stepd_claim_lag_seconds_count") >= 5
    commits = delta(before, after, "stepd_commit_duration_seconds_count")
    assert commits >= 1
    assert delta(before, after, "stepd_commit_batch_size_count") == commits
    assert delta(before, after, "stepd_commit_batch_size_sum") >= commits  # >= 1 op each


# -- auth and the document --------------------------------------------------------------


async def test_metrics_need_a_token_by_default_and_any_token_will_do(client):
    resp = await client.get("/metrics", headers={"Authorization": ""})
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert "error" in resp.json()
    bad = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert (await client.get("/metrics", headers=auth("approver"))).status_code == 200


async def test_metrics_are_open_with_auth_false_and_nothing_else_is(tmp_path):
    async with serving(make_config(tmp_path, metrics_auth=False)) as client:
        client.headers.pop("Authorization")
        resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert "stepd_workflows" in resp.text
        assert (await client.get("/api/workflow")).status_code == 401
        assert (await client.get("/openapi.json")).status_code == 401


async def test_content_types_are_the_documented_ones(client):
    documented = openapi.document()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    plain = await client.get("/metrics")
    assert plain.headers["content-type"].split(";")[0] in documented
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    om = await client.get("/metrics", headers=accept)
    assert om.status_code == 200
    assert om.headers["content-type"].split(";")[0] == "application/openmetrics-text"
    assert om.headers["content-type"].split(";")[0] in documented
    assert om.text.endswith("# EOF\n")


@pytest.mark.parametrize(
    "accept",
    ["application/openmetrics-text; version=abc", "text/plain; version=abc", "nonsense;;;="],
)
async def test_an_accept_header_it_cannot_read_gets_the_text_format(client, accept):
    resp = await client.get("/metrics", headers={"Accept": accept})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "stepd_workflows" in resp.text


async def test_no_created_series_beside_counters_and_histograms(client):
    await client.post("/api/workflow", json=one_step("echo"))
    text = (await client.get("/metrics")).text
    assert "stepd_commit_batch_size_count" in text
    assert "_created" not in text


def test_metrics_config_section():
    assert configuration.from_dict({}).metrics_auth is True
    assert configuration.from_dict({"metrics": {"auth": False}}).metrics_auth is False
    with pytest.raises(ConfigError, match=r"\[metrics\] auth: wrong type str"):
        configuration.from_dict({"metrics": {"auth": "no"}})
    with pytest.raises(ConfigError, match="unknown key 'token' in \\[metrics\\]"):
        configuration.from_dict({"metrics": {"token": "x"}})


def test_example_config_documents_the_metrics_section():
    text = (Path(__file__).parent.parent / "config.example.toml").read_text()
    assert "\n[metrics]\n" in text and "\nauth = true\n" in text
