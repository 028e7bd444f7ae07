"""Saved definitions end to end over HTTP (spec §9): versions, diff, rollback, status,
runs pinned to their version, the concurrency limit, the S1 run shape, export and import."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import jsonpatch
import pytest

from tests.helpers import TERMINAL, auth, wait_for

ECHO = {
    "name": "greet",
    "description": "Say hello",
    "input_schema": {
        "type": "object",
        "properties": {"who": {"type": "string"}, "times": {"type": "integer", "minimum": 1}},
        "required": ["who"],
    },
    "tags": ["demo"],
    "flow": {"start": {"tool": "echo", "args": {"hello": "<<input.who>>"}, "done": True}},
}


def with_flow(flow: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**ECHO, "flow": flow, **extra}


async def create(client: httpx.AsyncClient, definition: dict[str, Any], **body: Any) -> dict:
    resp = await client.post("/api/workflows", json={"definition": definition, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def run(client: httpx.AsyncClient, ref: Any, input_data: Any, **body: Any) -> int:
    resp = await client.post(f"/api/workflows/{ref}/run", json={"input_data": input_data, **body})
    assert resp.status_code == 202, resp.text
    return resp.json()["run_id"]


async def test_create_get_list_by_id_and_name(client: httpx.AsyncClient) -> None:
    made = await create(client, ECHO, trigger_type="manual")
    def_id = made["id"]
    assert isinstance(def_id, int)
    wf = made["workflow"]
    assert wf["name"] == "greet" and wf["version"] == 1 and wf["status"] == "active"
    assert wf["tags"] == ["demo"] and wf["definition"] == ECHO
    assert wf["created_at"].endswith("Z")
    for ref in (def_id, "greet"):
        resp = await client.get(f"/api/workflows/{ref}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == def_id
    listed = (await client.get("/api/workflows")).json()
    assert listed["total"] == 1 and listed["workflows"][0]["name"] == "greet"
    assert (await client.get("/api/workflows?tag=demo")).json()["total"] == 1
    assert (await client.get("/api/workflows?tag=other")).json()["total"] == 0
    assert (await client.get("/api/workflows?status=paused")).json()["total"] == 0
    resp = await client.get("/api/workflows/nope")
    assert resp.status_code == 404
    assert resp.json()["error_code"] == "WORKFLOW_NOT_FOUND"


@pytest.mark.parametrize(
    ("definition", "status", "needle"),
    [
        ({**ECHO, "name": "12345"}, 422, "all digits"),
        ({**ECHO, "name": "templates"}, 422, "must not be one of"),
        ({**ECHO, "name": "a/b"}, 422, "without '/'"),
        ({**ECHO, "concurrency": 0}, 422, "concurrency"),
        ({**ECHO, "input_schema": {"type": "nonsense"}}, 422, "input_schema"),
        ({**ECHO, "extra": 1}, 422, "unknown field 'extra'"),
        ({**ECHO, "flow": {"start": {"tool": "nope", "done": True}}}, 422, "nope"),
        ({k: v for k, v in ECHO.items() if k != "flow"}, 422, "flow"),
        ({k: v for k, v in ECHO.items() if k != "name"}, 400, "name"),
        ("not an object", 400, "definition"),
    ],
)
async def test_bad_definitions_change_nothing(
    client: httpx.AsyncClient, definition: Any, status: int, needle: str
) -> None:
    resp = await client.post("/api/workflows", json={"definition": definition})
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]
    assert (await client.get("/api/workflows")).json()["total"] == 0


async def test_duplicate_name_is_409(client: httpx.AsyncClient) -> None:
    await create(client, ECHO)
    resp = await client.post("/api/workflows", json={"definition": ECHO})
    assert resp.status_code == 409, resp.text
    assert (await client.get("/api/workflows")).json()["total"] == 1


async def test_versions_diff_rollback(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    v2 = with_flow(
        {
            "start": {"tool": "echo", "args": {"hello": "<<input.who>>"}, "next": "again"},
            "again": {"tool": "echo", "args": {"twice": True}, "done": True},
        }
    )
    resp = await client.put(
        f"/api/workflows/{def_id}", json={"definition": v2, "change_summary": "Second step"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == 2 and resp.json()["changed"] is True
    # Unchanged content makes no version.
    resp = await client.put(f"/api/workflows/{def_id}", json={"definition": v2})
    assert resp.json()["version"] == 2 and resp.json()["changed"] is False
    versions = (await client.get(f"/api/workflows/{def_id}/versions")).json()["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["change_summary"] == "Second step"
    assert versions[1]["change_summary"] == "Initial version"
    assert versions[0]["created_by"] == "james"
    one = (await client.get(f"/api/workflows/{def_id}/versions/1")).json()
    assert one["definition"] == ECHO
    diff = (await client.get(f"/api/workflows/{def_id}/diff?v1=1&v2=2")).json()
    assert diff["v1"] == 1 and diff["v2"] == 2
    assert diff["summary"] == "Added 1 step, modified 1 step"
    # The operations are RFC 6902: applied to v1 they give v2.
    assert jsonpatch.apply_patch(ECHO, diff["diff"]) == v2
    resp = await client.post(f"/api/workflows/{def_id}/rollback", json={"version": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == 3 and resp.json()["definition"] == ECHO
    versions = (await client.get(f"/api/workflows/{def_id}/versions")).json()["versions"]
    assert versions[0]["change_summary"] == "Rollback to version 1"
    for bad in ("v1=1&v2=9", "v1=0&v2=1", "v1=1"):
        resp = await client.get(f"/api/workflows/{def_id}/diff?{bad}")
        assert resp.status_code in (400, 404), resp.text
    resp = await client.post(f"/api/workflows/{def_id}/rollback", json={"version": 99})
    assert resp.status_code == 404


async def test_run_pinned_to_its_version(client: httpx.AsyncClient) -> None:
    flow = {
        "start": {"tool": None, "next": "say"},
        "say": {"tool": "echo", "args": {"v": 1, "who": "<<input.who>>"}, "done": True},
    }
    def_id = (await create(client, with_flow(flow)))["id"]
    run_id = await run(client, def_id, {"who": "ann"})
    wf = await wait_for(client, run_id, lambda w: any(s["awaiting"] == "ready" for s in w["steps"]))
    assert wf["definition_id"] == def_id and wf["definition_version"] == 1
    assert wf["trigger"] == "manual"
    # Edit the definition while the run waits at its gate.
    flow2 = {**flow, "say": {"tool": "echo", "args": {"v": 2}, "done": True}}
    resp = await client.put(f"/api/workflows/{def_id}", json={"definition": with_flow(flow2)})
    assert resp.json()["version"] == 2
    gate = next(s for s in wf["steps"] if s["awaiting"] == "ready")
    assert (await client.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
    wf = await wait_for(client, run_id)
    assert wf["status"] == "completed" and wf["output"] == {"v": 1, "who": "ann"}
    # A new run takes version 2; an explicit version 1 still runs version 1.
    new = await wait_for(
        client,
        await run(client, def_id, {"who": "bo"}),
        lambda w: any(s["awaiting"] == "ready" for s in w["steps"]),
    )
    assert new["definition_version"] == 2
    old = await run(client, def_id, {"who": "cy"}, version=1)
    assert (await client.get(f"/api/workflow/{old}")).json()["definition_version"] == 1


async def test_input_schema_checked_with_every_problem(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    resp = await client.post(
        f"/api/workflows/{def_id}/run", json={"input_data": {"times": 0, "who": 5}}
    )
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error_code"] == "VALIDATION_ERROR"
    assert len(body["errors"]) == 2
    assert any("times" in e for e in body["errors"]) and any("who" in e for e in body["errors"])
    resp = await client.post(f"/api/workflows/{def_id}/run", json={"input_data": {}})
    assert resp.status_code == 422 and '"who" is a required property' in resp.json()["error"]
    runs = (await client.get(f"/api/workflows/{def_id}/runs")).json()
    assert runs["total"] == 0


async def test_run_shape_and_runs_list(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    run_id = await run(client, "greet", {"who": "ann"})
    await wait_for(client, run_id)
    got = (await client.get(f"/api/workflows/runs/{run_id}")).json()["run"]
    assert got["id"] == run_id and got["workflow_id"] == def_id
    assert got["status"] == "completed" and got["trigger"] == "manual"
    assert got["output"] == {"hello": "ann"} and got["version"] == 1
    assert got["duration_seconds"] >= 0 and got["started_at"].endswith("Z")
    (step,) = got["step_runs"]
    assert step["step_id"] == "start" and step["status"] == "completed"
    assert step["output"] == {"hello": "ann"} and step["duration_seconds"] >= 0
    runs = (await client.get(f"/api/workflows/{def_id}/runs?status=completed")).json()
    assert runs["total"] == 1 and runs["runs"][0]["id"] == run_id
    assert (await client.get(f"/api/workflows/{def_id}/runs?status=failed")).json()["total"] == 0
    # Delete: only a run that ended.
    assert (await client.delete(f"/api/workflows/runs/{run_id}")).status_code == 204
    assert (await client.get(f"/api/workflows/runs/{run_id}")).status_code == 404


async def test_status_refuses_runs(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    for status in ("paused", "archived"):
        resp = await client.patch(f"/api/workflows/{def_id}/status", json={"status": status})
        assert resp.status_code == 200 and resp.json()["status"] == status
        resp = await client.post(f"/api/workflows/{def_id}/run", json={"input_data": {"who": "x"}})
        assert resp.status_code == 409, resp.text
    resp = await client.patch(f"/api/workflows/{def_id}/status", json={"status": "gone"})
    assert resp.status_code == 400
    await client.patch(f"/api/workflows/{def_id}/status", json={"status": "draft"})
    await run(client, def_id, {"who": "x"})


async def test_concurrency_limit_queues_oldest_first(client: httpx.AsyncClient) -> None:
    flow = {
        "start": {"tool": "sleep", "args": {"seconds": 0.2}, "next": "end"},
        "end": {"tool": "echo", "args": {"n": "<<input.n>>"}, "done": True},
    }
    definition = {"name": "limited", "concurrency": 3, "flow": flow}
    def_id = (await create(client, definition))["id"]
    run_ids = await asyncio.gather(*(run(client, def_id, {"n": i}) for i in range(30)))
    most = 0
    finished: list[int] = []
    while len(finished) < 30:
        runs = (await client.get(f"/api/workflows/{def_id}/runs?limit=200")).json()["runs"]
        active = [r for r in runs if r["status"] in ("running", "paused")]
        most = max(most, len(active))
        finished = [r["id"] for r in runs if r["status"] in TERMINAL]
        await asyncio.sleep(0.02)
    assert most <= 3, most
    assert most == 3
    # Oldest first: runs started in the order they were created.
    starts = []
    for run_id in sorted(run_ids):
        wf = (await client.get(f"/api/workflow/{run_id}")).json()
        assert wf["status"] == "completed", wf
        starts.append(wf["steps"][0]["started_at"])
    assert starts == sorted(starts)


async def test_cancel_queued_and_delete(client: httpx.AsyncClient) -> None:
    flow = {"start": {"tool": None, "done": True}}
    def_id = (await create(client, {"name": "gated", "concurrency": 1, "flow": flow}))["id"]
    first = await run(client, def_id, {})
    second = await run(client, def_id, {})
    assert (await client.get(f"/api/workflow/{second}")).json()["status"] == "queued"
    queued = (await client.get("/api/workflow?status=queued")).json()
    assert [w["id"] for w in queued] == [second]
    resp = await client.delete(f"/api/workflows/{def_id}")
    assert resp.status_code == 409, resp.text
    resp = await client.post(f"/api/workflows/runs/{second}/cancel")
    assert resp.status_code == 200, resp.text
    assert (await client.get(f"/api/workflow/{second}")).json()["status"] == "cancelled"
    resp = await client.delete(f"/api/workflows/{def_id}?force=true")
    assert resp.status_code == 204, resp.text
    assert (await client.get(f"/api/workflow/{first}")).json()["status"] == "cancelled"
    assert (await client.get(f"/api/workflows/{def_id}")).status_code == 404


async def test_dag_shape_definition(client: httpx.AsyncClient) -> None:
    definition = {
        "name": "dag",
        "steps": [
            {"id": "a", "type": "echo", "config": {"x": 1}},
            {"id": "b", "type": "echo", "config": {"y": 2}, "depends_on": ["a"]},
        ],
    }
    def_id = (await create(client, definition))["id"]
    wf = await wait_for(client, await run(client, def_id, {}))
    assert wf["status"] == "completed" and wf["dag"] == definition["steps"]
    resp = await client.post(
        "/api/workflows/validate",
        json={
            "definition": {
                "name": "x",
                "steps": [
                    {"id": "a", "type": "echo", "depends_on": ["b"]},
                    {"id": "b", "type": "echo", "depends_on": ["a"]},
                ],
            }
        },
    )
    body = resp.json()
    assert body["valid"] is False and any("Cycle detected" in e for e in body["errors"])


async def test_export_import_round_trip(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    await client.put(
        f"/api/workflows/{def_id}",
        json={"definition": {**ECHO, "description": "v2"}, "change_summary": "d"},
    )
    await client.post(f"/api/workflows/{def_id}/deploy")
    export = (await client.get("/api/workflows/export")).json()
    assert export["stepd_export"] == 1
    assert "webhook_secret" not in str(export) and "webhook_id" not in str(export)
    (one,) = export["workflows"]
    assert [v["version"] for v in one["versions"]] == [1, 2]
    # Malformed: nothing is imported, every problem listed.
    bad = {
        "workflows": [
            one,
            {"name": "x", "versions": [{"definition": {"name": "x"}}]},
            {"name": "y", "versions": []},
        ]
    }
    resp = await client.post("/api/workflows/import?mode=upsert", json=bad)
    assert resp.status_code == 422, resp.text
    assert len(resp.json()["errors"]) >= 2
    assert (await client.get("/api/workflows/greet/versions")).json()["versions"][0]["version"] == 2
    # create mode skips what exists; upsert adds a version when the content differs.
    resp = await client.post("/api/workflows/import?mode=create", json=export)
    assert resp.json() == {
        "created": [],
        "updated": [],
        "skipped": [{"name": "greet", "reason": resp.json()["skipped"][0]["reason"]}],
    }
    changed = {
        **one,
        "versions": [
            *one["versions"][:1],
            {**one["versions"][1], "definition": {**ECHO, "description": "v3"}},
        ],
    }
    resp = await client.post("/api/workflows/import?mode=upsert", json={"workflows": [changed]})
    assert resp.json()["updated"] == ["greet"]


async def test_import_into_a_fresh_daemon(client: httpx.AsyncClient, tmp_path: Any) -> None:
    from daemon.api import create_app
    from tests.helpers import make_config

    def_id = (await create(client, ECHO))["id"]
    await client.put(
        f"/api/workflows/{def_id}",
        json={"definition": {**ECHO, "description": "v2"}, "change_summary": "d"},
    )
    export = (await client.get("/api/workflows/export")).json()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    app = create_app(make_config(fresh))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stepd", headers=auth()
        ) as other,
    ):
        resp = await other.post("/api/workflows/import", json=export)
        assert resp.status_code == 200, resp.text
        assert resp.json()["created"] == ["greet"]
        again = (await other.get("/api/workflows/export")).json()
    strip = ("created_at", "version")
    for a, b in zip(export["workflows"], again["workflows"], strict=True):
        assert [{k: v for k, v in x.items() if k not in strip} for x in a["versions"]] == [
            {k: v for k, v in x.items() if k not in strip} for x in b["versions"]
        ]
        assert {k: v for k, v in a.items() if k != "versions"} == {
            k: v for k, v in b.items() if k != "versions"
        }


async def test_approver_reads_but_cannot_write(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    await client.post(f"/api/workflows/{def_id}/deploy")
    approver = auth("approver")
    got = await client.get(f"/api/workflows/{def_id}", headers=approver)
    assert got.status_code == 200
    assert "webhook_secret" not in got.json()["webhook"]
    assert "webhook_secret" in (await client.get(f"/api/workflows/{def_id}")).json()["webhook"]
    for method, path, body in [
        ("POST", "/api/workflows", {"definition": {**ECHO, "name": "other"}}),
        ("PUT", f"/api/workflows/{def_id}", {"definition": ECHO}),
        ("DELETE", f"/api/workflows/{def_id}", None),
        ("POST", f"/api/workflows/{def_id}/run", {"input_data": {"who": "x"}}),
        ("POST", f"/api/workflows/{def_id}/arm", None),
        ("PATCH", f"/api/workflows/{def_id}/status", {"status": "paused"}),
    ]:
        resp = await client.request(method, path, json=body, headers=approver)
        assert resp.status_code == 403, (method, path, resp.text)
    assert (
        await client.get(f"/api/workflows/{def_id}/versions", headers=approver)
    ).status_code == 200


async def test_concurrent_edits_and_runs_each_get_one_version(client: httpx.AsyncClient) -> None:
    """Twelve edits and twelve runs at once: every edit is its own version (none lost,
    none doubled), and each run is pinned to a version that existed when it started and
    runs exactly that version's flow."""
    def_id = (await create(client, ECHO))["id"]

    def version_body(i: int) -> dict[str, Any]:
        flow = {"start": {"tool": "echo", "args": {"edit": i}, "done": True}}
        return {"definition": with_flow(flow), "change_summary": f"edit {i}"}

    edits = [client.put(f"/api/workflows/{def_id}", json=version_body(i)) for i in range(12)]
    runs = [
        client.post(f"/api/workflows/{def_id}/run", json={"input_data": {"who": "x"}})
        for _ in range(12)
    ]
    answers = await asyncio.gather(*edits, *runs)
    assert all(r.status_code in (200, 202) for r in answers), [r.text for r in answers]
    versions = (await client.get(f"/api/workflows/{def_id}/versions")).json()["versions"]
    assert [v["version"] for v in versions] == list(range(13, 0, -1))
    assert sorted(v["change_summary"] for v in versions[:-1]) == sorted(
        f"edit {i}" for i in range(12)
    )
    by_version = {v["version"]: v["change_summary"] for v in versions}
    for resp in answers[12:]:
        wf = await wait_for(client, resp.json()["run_id"])
        pinned = wf["definition_version"]
        expected = {"hello": "x"} if pinned == 1 else {"edit": int(by_version[pinned].split()[1])}
        assert wf["output"] == expected, (pinned, wf["output"])


async def test_templates_listed_shown_and_installed(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/api/workflows/templates")).json()
    ids = {t["id"] for t in listed["templates"]}
    assert {"approval-gated-write", "fetch-and-notify", "fan-out-over-list", "daily-report"} <= ids
    assert listed["total"] == len(listed["templates"])
    assert all(t["is_builtin"] is True for t in listed["templates"])
    one = (await client.get("/api/workflows/templates/fan-out-over-list")).json()
    assert one["definition"]["input_schema"]["type"] == "object"
    assert (await client.get("/api/workflows/templates/nope")).status_code == 404
    resp = await client.post(
        "/api/workflows/templates/fan-out-over-list/install", json={"name": "my fan-out"}
    )
    assert resp.status_code == 201, resp.text
    def_id = resp.json()["workflow_id"]
    got = (await client.get(f"/api/workflows/{def_id}")).json()
    assert got["name"] == "my fan-out" and got["version"] == 1
    again = await client.post(
        "/api/workflows/templates/fan-out-over-list/install", json={"name": "my fan-out"}
    )
    assert again.status_code == 409
    resp = await client.post("/api/workflows/templates/nope/install", json={})
    assert resp.status_code == 404
    resp = await client.post(
        "/api/workflows/templates/daily-report/install", headers=auth("approver")
    )
    assert resp.status_code == 403


async def test_import_keeps_every_version(client: httpx.AsyncClient) -> None:
    versions = [
        {"version": i, "change_summary": f"v{i}", "definition": {**ECHO, "description": f"d{i}"}}
        for i in range(1, 206)
    ]
    resp = await client.post(
        "/api/workflows/import", json={"workflows": [{"name": "greet", "versions": versions}]}
    )
    assert resp.status_code == 200 and resp.json()["created"] == ["greet"], resp.text
    got = (await client.get("/api/workflows/greet")).json()
    assert got["version"] == 205 and got["description"] == "d205"
    listed = (await client.get("/api/workflows/greet/versions")).json()
    assert [v["change_summary"] for v in listed["versions"][:2]] == ["v205", "v204"]
    assert len(listed["versions"]) == 50 and listed["total"] == 205
    tail = (await client.get("/api/workflows/greet/versions?limit=10&offset=200")).json()
    assert [v["version"] for v in tail["versions"]] == [5, 4, 3, 2, 1]


async def test_an_edit_without_a_summary_is_described(client: httpx.AsyncClient) -> None:
    def_id = (await create(client, ECHO))["id"]
    edited = {
        **ECHO,
        "description": "Say hello twice",
        "flow": {
            "start": {"tool": "echo", "args": {"hello": "<<input.who>>", "n": 2}, "done": True}
        },
    }
    resp = await client.put(f"/api/workflows/{def_id}", json={"definition": edited})
    assert resp.status_code == 200 and resp.json()["version"] == 2
    versions = (await client.get(f"/api/workflows/{def_id}/versions")).json()["versions"]
    assert versions[0]["change_summary"] == "Modified 1 step; changed description"
