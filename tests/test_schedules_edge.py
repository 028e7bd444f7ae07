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
# before it): the fire times before `start` cannot be reckoned (OverflowError in
# daemon/cron.py Cron.between / Cron.after). The window is valid ISO 8601 with an offset and
# ends in the past, so the answer should be 202 or 422, not a 500.
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


@pytest.mark.xfail(
    strict=True,
    reason="500: OverflowError 'date value out of range' (cron.Cron.between/after) or "
    "ValueError 'year 0 is out of range' (cron._first_change) for a backfill window "
    "starting in year 1 or 2",
)
@pytest.mark.parametrize(
    ("expression", "timezone", "start"), YEAR_ONE, ids=[" ".join(case) for case in YEAR_ONE]
)
async def test_backfill_from_year_one_is_not_a_server_error(
    client: httpx.AsyncClient, expression: str, timezone: str, start: str
) -> None:
    sid = await scheduled(client, expression, timezone)
    body = {"start": start, "end": "0002-01-03T00:00:00Z"}
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code in (202, 422), resp.text
    if resp.status_code == 422:
        assert isinstance(resp.json()["error"], str)
