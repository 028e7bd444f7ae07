"""Schedules (spec §11) over HTTP on the backend under test: shapes, errors, ticks that
fire, overlap policies for ticks, trigger and backfill, paused definitions, recurring."""

from __future__ import annotations

import asyncio
import copy
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from daemon import retention
from daemon.storage import now_ms
from daemon.storage import schedules as schedule_store
from tests.helpers import wait_for, waiting_gate

ECHO = {
    "name": "nightly",
    "input_schema": {
        "type": "object",
        "properties": {"who": {"type": "string"}},
        "required": ["who"],
    },
    "flow": {"start": {"tool": "echo", "args": {"hello": "<<input.who>>"}, "done": True}},
}
GATED = {"name": "gated", "flow": {"start": {"tool": None, "done": True}}}
OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")


async def define(client: httpx.AsyncClient, definition: dict[str, Any]) -> int:
    resp = await client.post("/api/workflows", json={"definition": definition})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def schedule(client: httpx.AsyncClient, ref: Any, **body: Any) -> dict[str, Any]:
    resp = await client.post(f"/api/workflows/{ref}/schedules", json=body)
    assert resp.status_code == 201, resp.text
    data = resp.json()
    assert data["schedule"]["schedule_id"] == data["schedule_id"]
    return data["schedule"]


async def show(client: httpx.AsyncClient, sid: int) -> dict[str, Any]:
    resp = await client.get(f"/api/workflows/schedules/{sid}")
    assert resp.status_code == 200, resp.text
    return resp.json()


async def ticks(client: httpx.AsyncClient, sid: int, **params: Any) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/workflows/schedules/{sid}/ticks", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()["ticks"]


async def trigger(client: httpx.AsyncClient, sid: int) -> dict[str, Any]:
    resp = await client.post(f"/api/workflows/schedules/{sid}/trigger")
    assert resp.status_code in (200, 202), resp.text
    data = resp.json()
    assert (resp.status_code == 200) == (data["outcome"] == "skipped")
    return data


async def status_of(client: httpx.AsyncClient, run_id: int) -> str:
    resp = await client.get(f"/api/workflow/{run_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()["status"]


async def ready(client: httpx.AsyncClient, run_id: int) -> None:
    """Open the gate a run of GATED waits at."""
    wf = await wait_for(client, run_id, until=lambda wf: waiting_gate(wf) is not None)
    step = waiting_gate(wf)
    assert step is not None
    resp = await client.post(f"/api/workflow/{step['id']}/ready", json={})
    assert resp.status_code == 200, resp.text


async def until(check: Any, timeout: float = 10.0) -> None:
    """Poll the async predicate `check()` until it holds, or fail the test."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_create_show_list_edit_delete(client: httpx.AsyncClient) -> None:
    def_id = await define(client, ECHO)
    made = await schedule(
        client, "nightly", cron_expression="30 2 * * *", timezone="America/New_York",
        input_data={"who": "ops"}, overlap="buffer_one", catchup_window=120,
    )  # fmt: skip
    sid = made["schedule_id"]
    assert made["workflow_id"] == def_id and made["workflow_name"] == "nightly"
    assert made["cron_expression"] == "30 2 * * *"
    assert made["timezone"] == "America/New_York" and made["overlap"] == "buffer_one"
    assert made["catchup_window"] == 120 and made["paused"] is False
    assert made["input_data"] == {"who": "ops"}
    assert made["description"] == "At 02:30 every day"
    assert len(made["next_runs"]) == 5 and all(OFFSET.match(t) for t in made["next_runs"])
    assert made["next_run"] == made["next_runs"][0]
    assert all(t[11:19] in ("02:30:00", "03:00:00") for t in made["next_runs"])
    firsts = [datetime.fromisoformat(t) for t in made["next_runs"]]
    assert firsts == sorted(firsts) and firsts[0] > datetime.now(UTC)

    got = await show(client, sid)
    assert got["ticks"] == [] and got["next_runs"] == made["next_runs"]
    listed = (await client.get(f"/api/workflows/{def_id}/schedules")).json()
    assert listed["total"] == 1 and listed["schedules"][0]["schedule_id"] == sid
    everything = (await client.get("/api/workflows/recurring")).json()
    assert [s["schedule_id"] for s in everything["schedules"]] == [sid]

    resp = await client.patch(f"/api/workflows/schedules/{sid}", json={"paused": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["paused"] is True and resp.json()["next_run"] is None
    assert len(resp.json()["next_runs"]) == 5  # what it would do once resumed
    resp = await client.patch(
        f"/api/workflows/schedules/{sid}",
        json={"paused": False, "cron_expression": "@hourly", "timezone": "Asia/Kolkata"},
    )
    assert resp.status_code == 200, resp.text
    edited = resp.json()
    assert edited["paused"] is False and edited["next_run"].endswith("+05:30")
    assert edited["next_run"][14:19] == "00:00" and edited["overlap"] == "buffer_one"

    resp = await client.delete(f"/api/workflows/schedules/{sid}")
    assert resp.status_code == 200 and resp.json() == {"deleted": True}
    assert (await client.get(f"/api/workflows/schedules/{sid}")).status_code == 404
    assert (await client.delete(f"/api/workflows/schedules/{sid}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"cron_expression": "61 * * * *"}, "invalid cron_expression"),
        ({"cron_expression": "* * *"}, "five fields"),
        ({"cron_expression": "@reboot"}, "unknown cron macro"),
        ({"cron_expression": "0 0 30 2 *"}, "invalid cron_expression"),
        ({"cron_expression": "0 9 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron_expression": "0 9 * * *", "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"cron_expression": "0 9 * * *", "overlap": "sometimes"}, "overlap"),
        ({"cron_expression": "0 9 * * *", "catchup_window": -1}, "catchup_window"),
        ({"cron_expression": "0 9 * * *", "catchup_window": True}, "catchup_window"),
        ({"cron_expression": "0 9 * * *", "paused": "yes"}, "paused"),
        ({"cron_expression": "0 9 * * *", "input_data": []}, "input_data"),
        ({"cron_expression": "0 9 * * *", "input_data": {"who": 5}}, "input_data"),
        ({"cron_expression": "0 9 * * *", "input_data": {}}, "who"),
        ({"cron_expression": "0 9 * * *", "colour": "red"}, "unknown field 'colour'"),
        ({"timezone": "UTC"}, "missing field 'cron_expression'"),
        ({"cron_expression": 5}, "must be a string"),
    ],
)
async def test_bad_schedules_are_422_and_change_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    await define(client, ECHO)
    body = {"input_data": {"who": "x"}, **body}
    resp = await client.post("/api/workflows/nightly/schedules", json=body)
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["error"]
    assert (await client.get("/api/workflows/recurring")).json()["total"] == 0


async def test_missing_things_are_404_and_bodies_400(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/workflows/nope/schedules", json={"cron_expression": "@daily"})
    assert resp.status_code == 404 and "not found" in resp.json()["error"]
    for path in ("/api/workflows/schedules/123", "/api/workflows/schedules/abc",
                 "/api/workflows/schedules/123/ticks"):  # fmt: skip
        assert (await client.get(path)).status_code == 404, path
    assert (await client.post("/api/workflows/schedules/1/trigger")).status_code == 404
    assert (await client.delete("/api/workflows/recurring/1")).status_code == 404
    await define(client, ECHO)
    resp = await client.post(
        "/api/workflows/nightly/schedules", content=b"[1]",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status_code == 400
    resp = await client.post("/api/workflows/recurring", json={"cron_expression": "@daily"})
    assert resp.status_code == 422 and "workflow" in resp.json()["error"]


async def test_recurring_routes_reach_the_same_schedules(client: httpx.AsyncClient) -> None:
    def_id = await define(client, ECHO)
    resp = await client.post(
        "/api/workflows/recurring",
        json={"workflow": "nightly", "cron_expression": "0 9 * * 1-5",
              "timezone": "Europe/Paris", "input_data": {"who": "a"}},
    )  # fmt: skip
    assert resp.status_code == 201, resp.text
    sid = resp.json()["schedule_id"]
    listed = (await client.get(f"/api/workflows/{def_id}/schedules")).json()["schedules"]
    assert [s["schedule_id"] for s in listed] == [sid]
    assert listed[0]["description"] == "At 09:00 on Monday through Friday"
    resp = await client.delete(f"/api/workflows/recurring/{sid}")
    assert resp.status_code == 200
    assert (await client.get(f"/api/workflows/{def_id}/schedules")).json()["total"] == 0


async def test_ticks_fire_runs_of_the_latest_version(client: httpx.AsyncClient) -> None:
    await define(client, ECHO)
    lag_before = await metric(client, "stepd_schedule_lag_seconds_count")
    made = await schedule(client, "nightly", cron_expression="* * * * * *",
                          input_data={"who": "tick"})  # fmt: skip
    sid = made["schedule_id"]

    async def fired() -> list[dict[str, Any]]:
        return [t for t in await ticks(client, sid) if t["outcome"] == "fired"]

    await until(lambda: _at_least(fired, 2))
    await client.patch(f"/api/workflows/schedules/{sid}", json={"paused": True})
    done = await fired()
    times = [t["fire_time"] for t in done]
    assert len(times) == len(set(times))
    run_id = done[-1]["run_id"]
    await wait_for(client, run_id)
    wf = (await client.get(f"/api/workflow/{run_id}")).json()
    assert wf["trigger"] == "schedule" and wf["definition_version"] == 1
    assert wf["schedule"]["schedule_id"] == sid
    assert wf["output"] == {"hello": "tick"} or "tick" in str(wf["output"])
    assert all(t["kind"] == "cron" for t in done)
    shown = await show(client, sid)
    assert shown["last_fired_at"] is not None and shown["ticks"][0]["outcome"] == "fired"
    assert await metric(client, "stepd_schedule_lag_seconds_count") >= lag_before + len(done)
    assert await metric(client, 'stepd_schedule_ticks_total{outcome="fired"}') >= len(done)


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


async def _at_least(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


async def test_trigger_obeys_overlap_skip_buffer_and_cancel(client: httpx.AsyncClient) -> None:
    await define(client, GATED)
    sid = (await schedule(client, "gated", cron_expression="0 0 1 1 *"))["schedule_id"]
    first = await trigger(client, sid)
    assert first["outcome"] == "fired" and first["tick_id"] > 0
    skipped = await trigger(client, sid)
    assert skipped["outcome"] == "skipped" and skipped["run_id"] is None
    assert f"run {first['run_id']}" in skipped["reason"] and "overlap skip" in skipped["reason"]

    await client.patch(f"/api/workflows/schedules/{sid}", json={"overlap": "buffer_one"})
    buffered = await trigger(client, sid)
    assert buffered["outcome"] == "buffered" and buffered["run_id"] is None
    full = await trigger(client, sid)
    assert full["outcome"] == "skipped" and "buffer is full" in full["reason"]
    assert (await show(client, sid))["buffered"] == 1

    await ready(client, first["run_id"])  # the first run ends: the buffered one starts
    await wait_for(client, first["run_id"])

    async def tick_fired() -> bool:
        return any(t["id"] == buffered["tick_id"] and t["outcome"] == "fired"
                   for t in await ticks(client, sid))  # fmt: skip

    await until(tick_fired)
    history = await ticks(client, sid)
    started = next(t for t in history if t["id"] == buffered["tick_id"])
    assert started["outcome"] == "fired" and started["run_id"] is not None
    second = started["run_id"]
    assert await status_of(client, second) == "running"

    await client.patch(f"/api/workflows/schedules/{sid}", json={"overlap": "cancel_other"})
    third = await trigger(client, sid)
    assert third["outcome"] == "fired"
    assert await status_of(client, second) == "cancelled"
    assert await status_of(client, third["run_id"]) == "running"

    await client.patch(f"/api/workflows/schedules/{sid}", json={"overlap": "allow_all"})
    fourth = await trigger(client, sid)
    assert fourth["outcome"] == "fired"
    assert await status_of(client, third["run_id"]) == "running"
    assert await status_of(client, fourth["run_id"]) == "running"


async def test_buffer_all_runs_every_tick_one_after_another(client: httpx.AsyncClient) -> None:
    await define(client, GATED)
    sid = (await schedule(client, "gated", cron_expression="0 0 1 1 *",
                          overlap="buffer_all"))["schedule_id"]  # fmt: skip
    outcomes = [(await trigger(client, sid))["outcome"] for _ in range(4)]
    assert outcomes == ["fired", "buffered", "buffered", "buffered"]
    seen: list[int] = []

    async def next_started() -> bool:
        return any(t["outcome"] == "fired" and t["run_id"] not in seen
                   for t in await ticks(client, sid))  # fmt: skip

    for _ in range(4):
        await until(next_started)
        running = [t["run_id"] for t in await ticks(client, sid)
                   if t["outcome"] == "fired" and t["run_id"] not in seen]  # fmt: skip
        assert len(running) == 1, running  # one at a time
        seen.append(running[0])
        await ready(client, running[0])
        await wait_for(client, running[0])
    assert all(t["outcome"] == "fired" for t in await ticks(client, sid))


async def test_backfill_defaults_to_buffer_all_and_is_once_per_fire_time(
    client: httpx.AsyncClient,
) -> None:
    await define(client, GATED)
    sid = (await schedule(client, "gated", cron_expression="0 * * * *",
                          timezone="Europe/Berlin"))["schedule_id"]  # fmt: skip
    end = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(hours=1)
    start = end - timedelta(hours=2, minutes=30)
    body = {"start": start.isoformat(), "end": end.isoformat()}
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code == 202, resp.text
    data = resp.json()
    assert data["fire_times"] == 3 and data["fired"] == 1 and data["buffered"] == 2
    assert [t["kind"] for t in data["ticks"]] == ["backfill"] * 3
    assert all(t["fire_time"].endswith(("+01:00", "+02:00")) for t in data["ticks"])
    again = (await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)).json()
    assert again["fired"] == 0 and again["skipped"] == 3
    assert {t["reason"] for t in again["ticks"]} == {"already backfilled"}

    for bad, needle in [
        ({"start": "2026-01-01T00:00:00", "end": end.isoformat()}, "UTC offset"),
        ({"start": end.isoformat(), "end": start.isoformat()}, "before"),
        ({"start": start.isoformat(), "end": "2999-01-01T00:00:00Z"}, "future"),
        ({"start": "2000-01-01T00:00:00Z", "end": end.isoformat()}, "more than 1000"),
        ({"start": "yesterday", "end": end.isoformat()}, "ISO 8601"),
        ({"start": start.isoformat(), "end": end.isoformat(), "overlap": "x"}, "overlap"),
        ({"start": start.isoformat(), "end": end.isoformat(), "x": 1}, "unknown field"),
    ]:
        resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=bad)
        assert resp.status_code == 422, (bad, resp.text)
        assert needle in resp.json()["error"], (needle, resp.text)
    assert len(await ticks(client, sid)) == 3


async def test_a_paused_definition_skips_its_ticks(client: httpx.AsyncClient) -> None:
    await define(client, ECHO)
    sid = (await schedule(client, "nightly", cron_expression="@daily",
                          input_data={"who": "x"}))["schedule_id"]  # fmt: skip
    resp = await client.patch("/api/workflows/nightly/status", json={"status": "paused"})
    assert resp.status_code == 200, resp.text
    got = await trigger(client, sid)
    assert got["outcome"] == "skipped" and got["reason"] == "definition is paused"
    await client.patch("/api/workflows/nightly/status", json={"status": "archived"})
    got = await trigger(client, sid)
    assert got["reason"] == "definition is archived"
    assert [t["outcome"] for t in await ticks(client, sid, outcome="skipped")] == ["skipped"] * 2
    assert await ticks(client, sid, outcome="fired") == []


async def test_export_and_import_carry_schedules(client: httpx.AsyncClient) -> None:
    await define(client, ECHO)
    await schedule(client, "nightly", cron_expression="30 2 * * *", timezone="Europe/London",
                   input_data={"who": "a"}, overlap="buffer_all", catchup_window=600)  # fmt: skip
    await schedule(client, "nightly", cron_expression="@hourly", input_data={"who": "b"},
                   paused=True)  # fmt: skip
    doc = (await client.get("/api/workflows/nightly/export")).json()
    exported = doc["workflows"][0]["schedules"]
    assert exported == [
        {"cron_expression": "30 2 * * *", "timezone": "Europe/London", "input_data": {"who": "a"},
         "overlap": "buffer_all", "catchup_window": 600, "paused": False},
        {"cron_expression": "@hourly", "timezone": "UTC", "input_data": {"who": "b"},
         "overlap": "skip", "catchup_window": 60, "paused": True},
    ]  # fmt: skip
    assert "schedule_id" not in str(doc)

    bad = copy.deepcopy(doc)
    bad["workflows"][0] |= {"name": "other", "schedules": [{"cron_expression": "nope"}]}
    for version in bad["workflows"][0]["versions"]:
        version["definition"] = {**version["definition"], "name": "other"}
    resp = await client.post("/api/workflows/import", json=bad)
    assert resp.status_code == 422 and "schedules[0]" in resp.json()["error"]
    assert (await client.get("/api/workflows/other")).status_code == 404

    resp = await client.delete("/api/workflows/nightly", params={"force": "true"})
    assert resp.status_code in (200, 204), resp.text
    assert (await client.get("/api/workflows/recurring")).json()["total"] == 0
    resp = await client.post("/api/workflows/import", json=doc)
    assert resp.status_code == 200 and resp.json()["created"] == ["nightly"], resp.text
    again = (await client.get("/api/workflows/nightly/export")).json()["workflows"][0]
    assert again["schedules"] == exported
    resp = await client.post("/api/workflows/import", params={"mode": "upsert"}, json=doc)
    assert resp.status_code == 200, resp.text
    assert (await client.get("/api/workflows/recurring")).json()["total"] == 2


async def test_the_daily_report_templates_suggested_schedule_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    template = (await client.get("/api/workflows/templates/daily-report")).json()
    resp = await client.post("/api/workflows/templates/daily-report/install", json={})
    assert resp.status_code == 201, resp.text
    def_id = resp.json()["workflow_id"]
    made = await schedule(client, def_id, **template["suggested_schedule"])
    assert made["description"] == "At 09:00 on Monday through Friday"
    assert made["next_run"].endswith(("-05:00", "-04:00")) and made["overlap"] == "skip"


@pytest.mark.sqlite_only
async def test_buffered_ticks_do_not_copy_the_flow(client: httpx.AsyncClient, tmp_path) -> None:
    # A backfill of 500 fire times of a definition with a large flow: the buffered ticks
    # keep their fire times only (their runs are made when they start), not 500 flows.
    padding = "x" * 200_000
    big = {"name": "big", "description": "big",
           "flow": {"start": {"tool": None, "args": {"pad": padding}, "done": True}}}  # fmt: skip
    await define(client, big)
    sid = (await schedule(client, "big", cron_expression="* * * * *"))["schedule_id"]
    db = tmp_path / "stepd.db"
    before = db.stat().st_size + (tmp_path / "stepd.db-wal").stat().st_size
    end = datetime.now(UTC) - timedelta(hours=1)
    body = {"start": (end - timedelta(minutes=499)).isoformat(), "end": end.isoformat()}
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code == 202, resp.text
    got = resp.json()
    assert got["fired"] == 1 and got["buffered"] == got["fire_times"] - 1 >= 498
    after = db.stat().st_size + (tmp_path / "stepd.db-wal").stat().st_size
    assert after - before < 5 * 2**20, f"the database grew {(after - before) / 2**20:.1f} MB"


async def test_retention_purges_old_ticks_but_not_buffered_ones(make_client) -> None:
    client, app = await make_client()
    await define(client, GATED)
    sid = (await schedule(client, "gated", cron_expression="@yearly",
                          overlap="buffer_one"))["schedule_id"]  # fmt: skip
    outcomes = [(await trigger(client, sid))["outcome"] for _ in range(4)]
    assert outcomes == ["fired", "buffered", "skipped", "skipped"]
    store = app.state.engine.store
    await retention.purge(store, days=1, batch=2, now=now_ms() + 2 * retention.DAY_MS)
    assert [t["outcome"] for t in await ticks(client, sid)] == ["buffered"]


async def test_allow_all_stops_at_a_bound_of_runs_going(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedule_store, "MAX_RUNNING", 2)
    await define(client, GATED)
    sid = (await schedule(client, "gated", cron_expression="@yearly",
                          overlap="allow_all"))["schedule_id"]  # fmt: skip
    got = [await trigger(client, sid) for _ in range(3)]
    assert [g["outcome"] for g in got] == ["fired", "fired", "skipped"]
    assert "2 runs of this schedule are still going" in got[2]["reason"]


async def test_a_long_outage_records_its_first_missed_ticks_and_fires_the_window(
    make_client,
) -> None:
    client, app = await make_client()
    await define(client, ECHO)
    sid = (await schedule(client, "nightly", cron_expression="* * * * * *", catchup_window=5,
                          input_data={"who": "x"}, paused=True))["schedule_id"]  # fmt: skip
    store = app.state.engine.store
    ago = now_ms() - 600_000  # as if no daemon ran for the last 10 minutes

    def rewind(current: Any, now: int) -> dict[str, Any]:
        fields = ("cron", "timezone", "input_json", "overlap", "catchup_ms")
        return {**{f: getattr(current, f) for f in fields}, "paused": 0,
                "next_at": ago - ago % 1000 + 1000}  # fmt: skip

    await store.update_schedule(sid, rewind)
    app.state.engine.scheds.wake()

    async def fired_some() -> bool:
        return bool(await ticks(client, sid, outcome="fired"))

    await until(fired_some)
    await client.patch(f"/api/workflows/schedules/{sid}", json={"paused": True})
    missed = (await client.get(f"/api/workflows/schedules/{sid}/ticks",
                               params={"outcome": "missed", "limit": 500})).json()  # fmt: skip
    assert missed["total"] == 100, missed["total"]  # of ~595: the rest passed over
    assert "passed over" in missed["ticks"][0]["reason"]
    fired = await ticks(client, sid, outcome="fired", limit=500)
    first_fired = min(datetime.fromisoformat(t["fire_time"]) for t in fired)
    assert datetime.now(UTC) - first_fired < timedelta(seconds=10)  # only the window's
