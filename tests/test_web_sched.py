"""Schedules on the Definitions pages over httpx against the real app: the Schedules
section (next runs with their offsets), the add form and what it refuses, pause, resume,
run now, delete and backfill, a schedule's tick history paged and filtered, the CSRF checks
of every form, what read-only tokens see, and escaping."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from daemon.errors import Unprocessable
from daemon.web import schedactions, schedpages
from tests.helpers import wait_for
from tests.test_web import sign_in
from tests.test_web_defs import XSS, XSS_NAME, create_def, flash_of

NEVER_SOON = "0 0 1 1 *"  # fires at new year only: no tick comes by itself during a test


# -- times --------------------------------------------------------------------------------------


def test_fire_times_are_shown_with_their_offset():
    local = schedpages.local
    assert local("2026-12-04T09:00:00-05:00") == "Fri 2026-12-04 09:00 UTC-05:00"
    assert local("2026-07-03T09:00:00+02:00") == "Fri 2026-07-03 09:00 UTC+02:00"
    assert local("2026-12-04T09:15:00+05:45") == "Fri 2026-12-04 09:15 UTC+05:45"
    assert local("2026-12-04T09:00:30+00:00") == "Fri 2026-12-04 09:00:30 UTC"
    assert local("2026-12-04T09:00:00Z") == "Fri 2026-12-04 09:00 UTC"
    assert local("2026-03-08T03:00:00-04:00") == "Sun 2026-03-08 03:00 UTC-04:00"
    assert local("not a time") == "not a time" and local(None) == ""


def test_a_backfill_window_is_read_in_the_zone_given():
    def instant(value: str, zone: str = "America/New_York") -> str:
        return schedactions.instant({"start": value}, "start", zone)

    assert instant("2026-12-01T09:00") == "2026-12-01T09:00:00-05:00"
    assert instant("2026-07-01T09:00:05") == "2026-07-01T09:00:05-04:00"
    assert instant("2026-12-01T09:00", "Asia/Kathmandu") == "2026-12-01T09:00:00+05:45"
    assert instant("2026-12-01T09:00:00+01:00") == "2026-12-01T09:00:00+01:00"  # as given
    assert instant("2026-12-01T09:00:00Z") == "2026-12-01T09:00:00+00:00"
    for bad, zone in (("", "UTC"), ("yesterday", "UTC"), ("2026-13-01T00:00", "UTC"),
                      ("2026-12-01T09:00", "Mars/Olympus"), ("9" * 500, "UTC")):  # fmt: skip
        with pytest.raises(Unprocessable):
            instant(bad, zone)


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
async def web(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client: no bearer token, keeps cookies."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as c:
        yield c


async def schedules_of(client: httpx.AsyncClient, def_id: int) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/workflows/{def_id}/schedules")
    assert resp.status_code == 200, resp.text
    found: list[dict[str, Any]] = resp.json()["schedules"]
    return found


async def add_schedule(client: httpx.AsyncClient, def_id: int, **body: Any) -> dict[str, Any]:
    body.setdefault("cron_expression", NEVER_SOON)
    resp = await client.post(f"/api/workflows/{def_id}/schedules", json=body)
    assert resp.status_code == 201, resp.text
    schedule: dict[str, Any] = resp.json()["schedule"]
    return schedule


def part(page: str, start: str, end: str | None = None) -> str:
    """The page from the first `start` on, up to the next `end`."""
    rest = page[page.index(start) :]
    return rest[: rest.index(end)] if end else rest


def card(page: str, sid: int) -> str:
    return part(page, f'id="schedule-{sid}"', "</article>")


async def test_the_pages_need_a_session_and_an_existing_schedule(web, client):
    d = await create_def(client, "kyc")
    other = await create_def(client, "payroll")
    s = await add_schedule(client, other["id"])
    here = f"/ui/definitions/{d['id']}"
    for path in (f"{here}/schedules/{s['schedule_id']}",):
        resp = await web.get(path)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    for path in (f"{here}/schedules", f"{here}/schedules/{s['schedule_id']}/pause"):
        resp = await web.post(path, data={})
        assert resp.status_code == 303 and resp.headers["location"].startswith("/ui/login")
    await sign_in(web, "james")
    # Another definition's schedule, one that does not exist, one of no definition.
    for path in (f"{here}/schedules/{s['schedule_id']}", f"{here}/schedules/12345",
                 f"{here}/schedules/{'9' * 40}", "/ui/definitions/nobody/schedules/1"):  # fmt: skip
        resp = await web.get(path)
        assert resp.status_code == 404 and "There is no such schedule." in resp.text, path
    mine = await web.get(f"/ui/definitions/{other['id']}/schedules/{s['schedule_id']}")
    assert mine.status_code == 200
    by_name = await web.get(f"/ui/definitions/payroll/schedules/{s['schedule_id']}")
    assert by_name.status_code == 200
    page = (await web.get(here)).text
    assert "No schedules: runs start only when asked." in page
    assert re.search(r'<details class="add-schedule-fold" id="add-schedule-fold" open>', page)


async def test_adding_a_schedule_shows_its_next_runs_with_offsets(web, client):
    d = await create_def(client, "kyc", input_schema={
        "type": "object", "properties": {"who": {"type": "string"}}})  # fmt: skip
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    form = {"csrf": csrf, "next": here, "cron_expression": " 0 9  * * 1-5 ",
            "timezone": "America/New_York", "input_data": '{"who": "Ada"}',
            "overlap": "buffer_one", "catchup_window": "300"}  # fmt: skip
    where, message = await flash_of(web, await web.post(f"{here}/schedules", data=form))
    assert where == here
    (s,) = await schedules_of(client, d["id"])
    assert s["cron_expression"] == "0 9 * * 1-5" and s["timezone"] == "America/New_York"
    assert s["input_data"] == {"who": "Ada"} and s["overlap"] == "buffer_one"
    assert s["catchup_window"] == 300 and s["paused"] is False and s["created_by"] == "james"
    assert message == (
        f"ok: Added the schedule “0 9 * * 1-5” (America/New_York): "
        f"next run {schedpages.local(s['next_run'])}."
    )

    page = (await web.get(here)).text
    assert 'Schedules <span class="muted">(1)</span>' in page
    shown = card(page, s["schedule_id"])
    assert (
        '<code class="cron">0 9 * * 1-5</code> <span class="muted">America/New_York</span>' in shown
    )
    assert f'<p class="cron-words">{s["description"]}</p>' in shown
    assert "Monday" in s["description"]
    runs = re.findall(r'<li><time datetime="([^"]+)" title="[^"]+">([^<]+)</time></li>', shown)
    assert [iso for iso, _ in runs] == s["next_runs"] and len(runs) == 5
    for iso, text in runs:  # New York in its zone: -05:00 in winter, -04:00 in summer
        offset = datetime.fromisoformat(iso).utcoffset()
        assert text.endswith("UTC-05:00" if offset == timedelta(hours=-5) else "UTC-04:00")
        assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri) \d{4}-\d\d-\d\d 09:00 UTC-0[45]:00", text)
    assert f'datetime="{s["next_run"]}"' in part(shown, 'class="next-run"', "</dd>")
    assert "<code>buffer_one</code>" in shown and "300 s" in shown
    assert 'class="last-fired">never' in shown and "by james" in shown
    assert "&#34;who&#34;: &#34;Ada&#34;" in shown
    assert f'href="{here}/schedules/{s["schedule_id"]}">Tick history' in shown
    for action in ("pause", "trigger", "delete", "backfill"):
        assert f'action="{here}/schedules/{s["schedule_id"]}/{action}"' in shown
    assert 'name="overlap"' in part(shown, 'class="backfill"', "</form>")
    assert re.search(r'<option value="buffer_all" selected>', part(shown, 'class="backfill"'))
    assert '<details class="add-schedule-fold" id="add-schedule-fold">' in page  # closed now

    # Paused from the start: no next run, the five it would make once resumed.
    form = {**form, "cron_expression": "@daily", "timezone": "Asia/Kathmandu", "paused": "on",
            "input_data": "", "overlap": "skip", "catchup_window": ""}  # fmt: skip
    _, message = await flash_of(web, await web.post(f"{here}/schedules", data=form))
    assert message.endswith("it is paused: it fires once resumed."), message
    paused = next(x for x in await schedules_of(client, d["id"]) if x["paused"])
    assert paused["input_data"] == {} and paused["catchup_window"] == 60
    shown = card((await web.get(here)).text, paused["schedule_id"])
    assert 'class="next-run">none while paused' in shown and "Once resumed" in shown
    assert shown.count("00:00 UTC+05:45</time></li>") == 5
    assert f'action="{here}/schedules/{paused["schedule_id"]}/resume"' in shown
    assert "/pause" not in shown and 'class="badge s-paused">paused' in shown


BAD_FORMS = [
    ({"cron_expression": ""}, "needs a cron expression"),
    ({"cron_expression": "0 9 * *"}, "five fields"),
    ({"cron_expression": "61 * * * *"}, "cron"),
    ({"cron_expression": "0 0 30 2 *"}, "cron"),
    ({"timezone": "Mars/Olympus"}, "Mars/Olympus"),
    ({"input_data": "{oops"}, "not valid JSON"),
    ({"input_data": "[1, 2]"}, "must be a JSON object"),
    ({"input_data": '{"who": 5}'}, "who"),  # the input_schema says string
    ({"catchup_window": "-1"}, "whole number of seconds"),
    ({"catchup_window": "1.5"}, "whole number of seconds"),
    ({"catchup_window": "99999999"}, "whole number of seconds"),
    ({"overlap": "whenever"}, "overlap"),
]


@pytest.mark.parametrize(("change", "says"), BAD_FORMS)
async def test_a_bad_schedule_says_why_and_creates_nothing(web, client, change, says):
    d = await create_def(client, "kyc", input_schema={
        "type": "object", "properties": {"who": {"type": "string"}}})  # fmt: skip
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    form = {"csrf": csrf, "next": here, "cron_expression": "*/5 * * * *", "timezone": "UTC",
            "input_data": "", "overlap": "skip", "catchup_window": "60", **change}  # fmt: skip
    where, message = await flash_of(web, await web.post(f"{here}/schedules", data=form))
    assert where == here
    assert message.startswith("error: Nothing changed:") and says in message, message
    assert await schedules_of(client, d["id"]) == []


async def test_pause_resume_run_now_and_delete_from_the_page(web, client):
    d = await create_def(client, "kyc")
    s = await add_schedule(client, d["id"], timezone="Europe/Paris", input_data={"who": "Bo"})
    sid = s["schedule_id"]
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    base = f"{here}/schedules/{sid}"

    async def act(action: str, next_url: str = here, **fields: str) -> tuple[str, str]:
        data = {"csrf": csrf, "next": next_url, **fields}
        return await flash_of(web, await web.post(f"{base}/{action}", data=data))

    where, message = await act("pause")
    assert where == here
    assert (
        message
        == "ok: Paused the schedule “0 0 1 1 *” (Europe/Paris): it fires no more until resumed."
    )
    assert (await client.get(f"/api/workflows/schedules/{sid}")).json()["paused"] is True
    assert 'class="next-run">none while paused' in card((await web.get(here)).text, sid)

    where, message = await act("resume", next_url=base)
    assert where == base  # back to the page the form was on
    after = (await client.get(f"/api/workflows/schedules/{sid}")).json()
    assert after["paused"] is False and after["next_run"]
    assert message == (f"ok: Resumed the schedule “0 0 1 1 *” (Europe/Paris): "
                       f"next run {schedpages.local(after['next_run'])}.")  # fmt: skip
    assert "+01:00" in after["next_run"]

    where, message = await act("trigger")
    run_id = int(where.rpartition("/")[2])
    assert where == f"/ui/workflows/{run_id}"
    assert message == f"ok: Started run {run_id} of the schedule “0 0 1 1 *” (Europe/Paris)."
    run = await wait_for(client, run_id)
    assert run["status"] == "completed" and run["trigger"] == "schedule"
    assert run["input"] == {"who": "Bo"} and run["definition_id"] == d["id"]
    assert run["schedule"]["schedule_id"] == sid
    run_page = (await web.get(where)).text
    fired_by = part(run_page, 'class="fired-by"', "</span>")
    assert f'fired by <a href="{base}">schedule #{sid}</a> for 20' in fired_by
    assert fired_by.endswith(" UTC")
    page = (await web.get(base)).text
    ticks = part(page, 'id="ticks"')
    assert 'Ticks <span class="muted">(1)</span>' in ticks
    assert f'<a class="run" href="/ui/workflows/{run_id}">run #{run_id}</a>' in ticks
    assert '<span class="kind">trigger</span>' in ticks and ">fired</span>" in ticks
    assert "UTC+01:00</time>" in part(ticks, 'class="fire"', "</span>")
    assert "UTC+01:00" in part(page, 'class="last-fired"', "</dd>")

    where, message = await act("delete", next_url=base)
    assert where == here  # the schedule's own page is gone
    assert (
        message == "ok: Deleted the schedule “0 0 1 1 *” (Europe/Paris); the runs it started stay."
    )
    assert await schedules_of(client, d["id"]) == []
    assert (await client.get(f"/api/workflow/{run_id}")).status_code == 200
    assert (await web.get(base)).status_code == 404
    where, message = await act("pause")
    assert where == here and message.startswith("error: Nothing changed"), message
    where, message = await act("explode")
    assert message.startswith("error: there is no such schedule or action")


async def test_run_now_obeys_the_overlap(web, client):
    d = await create_def(client, "slow", flow={"start": {"tool": None, "done": True}})  # a gate
    s = await add_schedule(client, d["id"], overlap="skip")
    csrf = await sign_in(web, "james")
    base = f"/ui/definitions/{d['id']}/schedules/{s['schedule_id']}"
    where, message = await flash_of(web, await web.post(f"{base}/trigger", data={"csrf": csrf}))
    assert message.startswith("ok: Started run")
    first = int(where.rpartition("/")[2])
    await wait_for(client, first, lambda w: any(x["awaiting"] == "ready" for x in w["steps"]))
    resp = await web.post(f"{base}/trigger", data={"csrf": csrf, "next": base})
    where, message = await flash_of(web, resp)
    assert where == base and message.startswith("info: Skipped: no run started: "), message
    assert str(first) in message
    page = (await web.get(base)).text
    assert ">skipped</span>" in page and 'class="reason">' in page


def hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


async def test_backfill_from_the_page_reads_local_times(web, client):
    d = await create_def(client, "kyc")
    s = await add_schedule(client, d["id"], cron_expression="0 * * * *", timezone="UTC",
                           overlap="allow_all")  # fmt: skip
    sid = s["schedule_id"]
    csrf = await sign_in(web, "james")
    here = f"/ui/definitions/{d['id']}"
    base = f"{here}/schedules/{sid}"
    # Three whole UTC hours, typed as Kathmandu wall-clock times (UTC+05:45).
    kathmandu = ZoneInfo("Asia/Kathmandu")
    start = hour(datetime.now(UTC)) - timedelta(hours=4)
    end = start + timedelta(hours=2)
    fields = {"csrf": csrf, "next": here, "zone": "Asia/Kathmandu",
              "start": start.astimezone(kathmandu).strftime("%Y-%m-%dT%H:%M"),
              "end": end.astimezone(kathmandu).strftime("%Y-%m-%dT%H:%M")}  # fmt: skip
    assert fields["start"].endswith(":45")
    where, message = await flash_of(web, await web.post(f"{base}/backfill", data=fields))
    assert where == here
    bounds = (start.astimezone(kathmandu).isoformat(), end.astimezone(kathmandu).isoformat())
    assert message.startswith(f"ok: Backfilled 3 fire times from {bounds[0]} to {bounds[1]}: ")
    assert message.endswith(" 0 skipped."), message
    ticks = (await client.get(f"/api/workflows/schedules/{sid}/ticks")).json()
    assert ticks["total"] == 3 and {t["kind"] for t in ticks["ticks"]} == {"backfill"}
    fired = sorted(datetime.fromisoformat(t["fire_time"]) for t in ticks["ticks"])
    assert fired == [start, start + timedelta(hours=1), end]

    # The same window again: every fire time was backfilled before.
    _, message = await flash_of(web, await web.post(f"{base}/backfill", data=fields))
    assert message.endswith(": 0 fired, 0 buffered, 3 skipped (already backfilled)."), message
    page = (await web.get(base)).text
    assert part(page, 'id="ticks"').count('<li class="tick') == 3  # not stored again

    # An ISO time with its offset is taken as it is; a bad window says why.
    iso_fields = {**fields, "start": (start - timedelta(hours=1)).isoformat(),
                  "end": (start - timedelta(minutes=30)).isoformat()}  # fmt: skip
    _, message = await flash_of(web, await web.post(f"{base}/backfill", data=iso_fields))
    assert message.startswith("ok: Backfilled 1 fire time from "), message
    later = datetime.now(UTC) + timedelta(days=1)
    for bad in ({"end": later.strftime("%Y-%m-%dT%H:%M"), "zone": "UTC"},
                {"start": fields["end"], "end": fields["start"]},
                {"start": "soon"}, {"zone": "Mars/Olympus"}, {"end": ""}):  # fmt: skip
        _, message = await flash_of(web, await web.post(f"{base}/backfill",
                                                        data={**fields, **bad}))  # fmt: skip
        assert message.startswith("error: Nothing changed:"), (bad, message)
    assert (await client.get(f"/api/workflows/schedules/{sid}/ticks")).json()["total"] == 4


async def test_the_tick_history_pages_and_filters(web, client, monkeypatch):
    monkeypatch.setattr(schedpages, "TICKS_PAGE", 2)
    d = await create_def(client, "kyc")
    s = await add_schedule(client, d["id"], cron_expression="0 * * * *")
    sid = s["schedule_id"]
    start = hour(datetime.now(UTC)) - timedelta(hours=6)
    body = {"start": start.isoformat(), "end": (start + timedelta(hours=4)).isoformat(),
            "overlap": "allow_all"}  # fmt: skip
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["fire_times"] == 5, resp.json()
    assert resp.json()["fired"] == 5, resp.json()
    await sign_in(web, "approver")
    base = f"/ui/definitions/{d['id']}/schedules/{sid}"

    def rows(page: str) -> list[str]:
        return re.findall(r'<li class="tick o-\w+" id="tick-(\d+)">', page)

    api = (await client.get(f"/api/workflows/schedules/{sid}/ticks?limit=6")).json()
    order = [str(t["id"]) for t in api["ticks"]]
    first = (await web.get(base)).text
    assert 'Ticks <span class="muted">(5)</span>' in first
    assert rows(first) == order[:2]
    assert f'href="{base}?offset=2#ticks">Older' in first and "Newer" not in first
    last = (await web.get(f"{base}?offset=4")).text
    assert rows(last) == order[4:]
    assert f'href="{base}?offset=2#ticks">← Newer' in last and "Older" not in last
    fired = (await web.get(f"{base}?outcome=fired")).text
    assert len(rows(fired)) == 2, part(fired, 'id="ticks"')
    assert f'href="{base}?outcome=fired&amp;offset=2#ticks"' in fired, part(fired, 'id="ticks"')
    assert 'aria-current="true">fired</a>' in fired
    assert "No missed ticks." in (await web.get(f"{base}?outcome=missed")).text
    assert len(rows((await web.get(f"{base}?outcome=bogus&offset=x")).text)) == 2
    runs = re.findall(r'<a class="run" href="/ui/workflows/(\d+)">', first)
    assert len(runs) == 2 and {int(r) for r in runs} <= {t["run_id"] for t in api["ticks"]}


ACTIONS = {"add": {"cron_expression": "*/5 * * * *"}, "pause": {}, "resume": {},
           "trigger": {}, "delete": {},
           "backfill": {"start": "2026-01-01T00:00", "end": "2026-01-02T00:00"}}  # fmt: skip


def action_path(def_id: int, sid: int, action: str) -> str:
    here = f"/ui/definitions/{def_id}"
    return f"{here}/schedules" if action == "add" else f"{here}/schedules/{sid}/{action}"


async def unchanged(client: httpx.AsyncClient, def_id: int, sid: int) -> None:
    (after,) = await schedules_of(client, def_id)
    assert after["schedule_id"] == sid and after["paused"] is False
    ticks = (await client.get(f"/api/workflows/schedules/{sid}/ticks")).json()
    assert ticks["total"] == 0
    assert (await client.get(f"/api/workflows/{def_id}/runs")).json()["total"] == 0


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_every_schedule_form_needs_its_csrf_token(web, client, action):
    d = await create_def(client, "kyc")
    s = await add_schedule(client, d["id"])
    csrf = await sign_in(web, "james")
    path = action_path(d["id"], s["schedule_id"], action)
    for token in ({}, {"csrf": csrf[:-2] + "xx"}, {"csrf": "0" * 64}):
        resp = await web.post(path, data={**token, **ACTIONS[action]})
        assert resp.status_code == 403 and "Form expired" in resp.text
    await unchanged(client, d["id"], s["schedule_id"])


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_read_only_tokens_see_schedules_but_no_forms(web, client, action):
    d = await create_def(client, "kyc")
    s = await add_schedule(client, d["id"], timezone="America/New_York")
    sid = s["schedule_id"]
    csrf = await sign_in(web, "approver")
    here = f"/ui/definitions/{d['id']}"
    for path in (here, f"{here}/schedules/{sid}"):
        page = (await web.get(path)).text
        shown = card(page, sid)
        assert "0 0 1 1 *" in shown and shown.count("UTC-05:00</time></li>") == 5, path
        assert "<form" not in shown and "Backfill" not in shown, path
        assert f'action="{here}/schedules' not in page and "Add a schedule" not in page, path
        assert 'id="tz-list"' not in page
    resp = await web.post(action_path(d["id"], sid, action),
                          data={"csrf": csrf, **ACTIONS[action]})  # fmt: skip
    where, message = await flash_of(web, resp)
    assert where == here and message.startswith("error: You may not do this"), message
    await unchanged(client, d["id"], sid)


async def test_a_schedule_of_another_definition_cannot_be_reached_through_this_one(web, client):
    d = await create_def(client, "kyc")
    other = await create_def(client, "payroll")
    s = await add_schedule(client, other["id"])
    csrf = await sign_in(web, "james")
    for action in ("pause", "trigger", "delete"):
        resp = await web.post(action_path(d["id"], s["schedule_id"], action), data={"csrf": csrf})
        _, message = await flash_of(web, resp)
        assert message == "error: Nothing changed: this definition has no such schedule.", message
    await unchanged(client, other["id"], s["schedule_id"])


async def test_schedule_input_and_names_are_escaped(web, client):
    d = await create_def(client, XSS_NAME)
    s = await add_schedule(client, d["id"], input_data={XSS: XSS})
    await sign_in(web, "james")
    for path in (
        f"/ui/definitions/{d['id']}",
        f"/ui/definitions/{d['id']}/schedules/{s['schedule_id']}",
    ):
        page = (await web.get(path)).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page, path
    page = (await web.get(f"/ui/definitions/{d['id']}/schedules/{s['schedule_id']}")).text
    assert "kyc &lt;img src=x onerror=&#34;alert(&#39;x&#39;)&#34;&gt;</a>" in page
