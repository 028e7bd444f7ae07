"""Schedule routes at the edges of their inputs: answers that must be a 4xx with a JSON
error, never a 500 (found by fuzzing the schedule routes, tests/test_fuzz.py)."""

from __future__ import annotations

import httpx
import pytest

DEFINITION = {"name": "edge", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}


async def scheduled(client: httpx.AsyncClient, expression: str, timezone: str) -> int:
    resp = await client.post("/api/workflows", json={"definition": DEFINITION})
    assert resp.status_code == 201, resp.text
    body = {"cron_expression": expression, "timezone": timezone, "paused": True}
    resp = await client.post("/api/workflows/edge/schedules", json=body)
    assert resp.status_code == 201, resp.text
    return int(resp.json()["schedule_id"])


# A window that starts at the first instant datetime can hold (or, in the schedule's zone,
# before it): the fire times before `start` could not be reckoned (OverflowError in
# daemon/cron.py Cron.between / Cron.after), a 500; a window must lie from 1970 to 9000.
# A schedule that follows real time (a wildcard minute or hour) in a zone other than UTC
# reads the zone's offset changes from the year before the window's start: year 0 for a
# start in year 1 or 2 (ValueError 'year 0 is out of range' in cron._first_change).
YEAR_ONE = [
    ("0 0 * * *", "UTC", "0001-01-01T00:00:00+00:00"),
    ("0 0 * * *", "UTC", "0001-01-01T00:00:00+14:00"),
    ("0 0 * * *", "America/New_York", "0001-01-01T03:00:00Z"),  # year 0 there (-04:56 LMT)
    ("*/15 * * * *", "America/New_York", "0002-01-01T00:00:00Z"),
    ("@hourly", "Europe/Paris", "0001-01-02T00:00:00Z"),
]


@pytest.mark.parametrize(
    ("expression", "timezone", "start"), YEAR_ONE, ids=[" ".join(case) for case in YEAR_ONE]
)
async def test_backfill_from_year_one_is_not_a_server_error(
    client: httpx.AsyncClient, expression: str, timezone: str, start: str
) -> None:
    sid = await scheduled(client, expression, timezone)
    body = {"start": start, "end": "0002-01-03T00:00:00Z"}
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code == 422, resp.text
    assert "between 1970 and 9000" in resp.json()["error"]
