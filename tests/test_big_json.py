"""Big JSON never holds the event loop: a workflow page of big results."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from daemon.web import pages
from tests.test_template_limits import Watch
from tests.test_web import sign_in

DICTS = 330_000  # `{}` items: about 1 MB of JSON


async def test_a_page_of_30_mb_of_results_is_cut_without_holding_the_loop(make_client):
    client, app = await make_client(max_body_bytes=2 * 2**20)
    flow: dict[str, Any] = {
        ("start" if i == 0 else f"s{i}"): {"tool": "echo", "args": {"v": "{{input.x}}"},
                                           "next": f"s{i + 1}"}
        for i in range(30)
    }  # fmt: skip
    flow["s30"] = {"tool": "echo", "args": {}, "done": True}
    body = orjson.dumps({"name": "big", "flow": flow, "input": {"x": [{}] * DICTS}})
    resp = await client.post(
        "/api/workflow", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 201, resp.text
    wf_id = resp.json()["id"]
    for _ in range(1200):  # the list, not the 30 MB workflow, while it runs
        listed = (await client.get("/api/workflow")).json()
        if next(w for w in listed if w["id"] == wf_id)["status"] != "running":
            break
        await asyncio.sleep(0.05)
    listed = (await client.get("/api/workflow")).json()
    assert next(w for w in listed if w["id"] == wf_id)["status"] == "completed"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stepd") as web:
        await sign_in(web, "james")
        async with Watch() as watch:
            page = await web.get(f"/ui/workflows/{wf_id}")
    assert page.status_code == 200
    assert watch.lag < 0.25, f"the page held the event loop for {watch.lag * 1000:.0f} ms"
    assert page.text.count("more characters") == 30  # every result, cut from its text
    assert "more bytes" in page.text  # the input too
    assert len(page.content) < 2 * 2**20


def test_pretty_cuts_long_values_before_parsing_them():
    long = orjson.dumps([{}] * 20_000).decode()  # 60,000 characters
    shown = pages.pretty(long)
    assert (
        shown
        == long[: pages.PRETTY_LIMIT] + f"\n… {len(long) - pages.PRETTY_LIMIT} more characters"
    )
    fragment = orjson.Fragment(long)
    assert pages.pretty(fragment).endswith(f"{len(long) - pages.PRETTY_LIMIT} more bytes")
    assert pages.pretty('{"a":1}') == '{\n  "a": 1\n}'  # short ones are still indented
    assert pages.is_empty_json(orjson.Fragment("{}")) and pages.is_empty_json("null")
    assert not pages.is_empty_json(long) and not pages.is_empty_json('{"a":1}')
    # Not valid JSON though it looks like it: shown as it is, never an error.
    assert pages.pretty("[" * 3000) == "[" * 3000
