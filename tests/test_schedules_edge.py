"""Schedule routes at the edges of their inputs: answers that must be a 4xx with a JSON
error, never a 500 (found by fuzzing the schedule routes, tests/test_fuzz.py)."""

from __future__ import annotations

import httpx
import pytest

DEFINITION = {"name": "edge", "flow": {"start": {"tool": "echo", "args": {}, "done": True}}}


async def scheduled(client: httpx.AsyncClient, timezone: str) -> int:
    resp = await client.post("/api/workflows", json={"definition": DEFINITION})
    assert resp.status_code == 201, resp.text
    body = {"cron_expression": "0 0 * * *", "timezone": timezone, "paused": True}
    resp = await client.post("/api/workflows/edge/schedules", json=body)
    assert resp.status_code == 201, resp.text
    return int(resp.json()["schedule_id"])


# A window that starts at the first instant datetime can hold (or, in the schedule's zone,
# before it): the fire times before `start` cannot be reckoned (OverflowError in
# daemon/cron.py Cron.between / Cron.after). The window is valid ISO 8601 with an offset and
# ends in the past, so the answer should be 202 or 422, not a 500.
YEAR_ONE = [
    ("UTC", "0001-01-01T00:00:00+00:00"),
    ("UTC", "0001-01-01T00:00:00+14:00"),
    ("America/New_York", "0001-01-01T03:00:00Z"),  # still year 0 in New York (-04:56 LMT)
]


@pytest.mark.xfail(
    strict=True,
    reason="500: OverflowError 'date value out of range' in cron.Cron.between/after for a "
    "backfill window starting at (or, in the schedule's zone, before) 0001-01-01",
)
@pytest.mark.parametrize(("timezone", "start"), YEAR_ONE, ids=[f"{z} {s}" for z, s in YEAR_ONE])
async def test_backfill_from_year_one_is_not_a_server_error(
    client: httpx.AsyncClient, timezone: str, start: str
) -> None:
    sid = await scheduled(client, timezone)
    body = {"start": start, "end": "0001-01-03T00:00:00Z"}
    resp = await client.post(f"/api/workflows/schedules/{sid}/backfill", json=body)
    assert resp.status_code in (202, 422), resp.text
    if resp.status_code == 422:
        assert isinstance(resp.json()["error"], str)
