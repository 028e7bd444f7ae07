"""Saved definitions, their runs and inbound webhooks under hostile or careless input: input
schemas that cannot be used (references that do not resolve or loop, patterns that
backtrack for ever), webhook calls replayed or reusing an Idempotency-Key with another body,
and a redriven run against its definition's concurrency. Real app over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from daemon.notify import sign

ECHO = {"start": {"tool": "echo", "args": {"s": "<<input.s>>"}, "done": True}}
WAIT = {
    "start": {"wait": {"signal": "go", "timeout": 3600}, "next": "end"},
    "end": {"tool": "echo", "args": {"v": 1}, "done": True},
}


async def create(client: httpx.AsyncClient, name: str, flow: Any, **extra: Any) -> httpx.Response:
    return await client.post(
        "/api/workflows", json={"definition": {"name": name, "flow": flow, **extra}}
    )


async def status_of(client: httpx.AsyncClient, run_id: int) -> str:
    resp = await client.get(f"/api/workflows/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    status: str = resp.json()["run"]["status"]
    return status


async def until(client: httpx.AsyncClient, run_id: int, wanted: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while (now := await status_of(client, run_id)) != wanted:
        assert time.monotonic() < deadline, f"run {run_id} is {now}, not {wanted}"
        await asyncio.sleep(0.05)


# -- input schemas that cannot be used ------------------------------------------------------


async def test_an_input_schema_ref_that_cannot_resolve_is_a_422_not_a_500(client):
    """A $ref to a document stepd never fetches was saved, then every run was a 500
    (jsonschema's Unresolvable escaped)."""
    schema = {"$ref": "https://example.com/schema.json"}
    resp = await create(client, "remote-ref", ECHO, input_schema=schema)
    if resp.status_code == 422:
        assert "$ref" in resp.text
        return
    assert resp.status_code == 201, resp.text
    resp = await client.post("/api/workflows/remote-ref/run", json={"input_data": {}})
    assert resp.status_code == 422, resp.text
    assert "$ref" in resp.json()["error"]
    assert (await client.get("/api/workflows/remote-ref/runs")).json()["total"] == 0


async def test_an_input_schema_ref_never_reads_a_file_or_a_url(client, tmp_path):
    """jsonschema fetched a $ref it had no document for with urllib: file:// read a local
    file, http:// reached any address (outside the [http] egress policy, on the event
    loop), and the run's 422 quoted what it read."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "object", "required": ["LEAKED-abc123"]}')
    for name, ref in (("file-ref", secret.as_uri()), ("inner-ref", f"{secret.as_uri()}#/required")):
        resp = await create(client, name, ECHO, input_schema={"$ref": ref})
        assert resp.status_code == 422, resp.text
        assert "LEAKED" not in resp.text and "does not resolve" in resp.text
    nested = {"type": "object", "properties": {"x": {"$ref": secret.as_uri()}}}
    resp = await create(client, "nested-ref", ECHO, input_schema=nested)
    assert resp.status_code == 422, resp.text  # every reference is resolved when saved
    assert "LEAKED" not in resp.text and "does not resolve" in resp.json()["error"]
    assert (await client.get("/api/workflows")).json()["total"] == 0


async def test_an_input_schema_ref_that_loops_answers(client):
    """{"$ref": "#/$defs/a"} with a = {"$ref": "#/$defs/a"}: a RecursionError in the run's
    schema check; a real daemon reset the connection without an answer. Now: a 422 when
    saved, or runs that are answered (such a reference constrains nothing)."""
    schema = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    resp = await create(client, "ref-loop", ECHO, input_schema=schema)
    if resp.status_code == 422:
        assert "$ref" in resp.text or "input_schema" in resp.text
        return
    assert resp.status_code == 201, resp.text
    resp = await client.post("/api/workflows/ref-loop/run", json={"input_data": {}})
    assert resp.status_code in (202, 422), resp.text


@pytest.mark.timeout(60)
async def test_a_backtracking_pattern_in_an_input_schema_does_not_stall_the_daemon(client):
    """ "pattern": "^(a+)+$" against 'aaa...a!' backtracks exponentially in Python's re, on
    the event loop: 27 characters held a real daemon (every request, the executor) for
    11 s; 32 for minutes. A run, a webhook call or a call state can carry such input."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    resp = await create(client, "redos", ECHO, input_schema=schema)
    if resp.status_code == 422:
        return  # refusing such a pattern when saved is a fix too
    assert resp.status_code == 201, resp.text

    async def other_request() -> float:
        started = time.monotonic()  # a stalled loop wakes this sleep late: count it
        await asyncio.sleep(0.2)
        assert (await client.get("/api/workflows")).status_code == 200
        return time.monotonic() - started - 0.2

    other = asyncio.ensure_future(other_request())
    await asyncio.sleep(0.05)  # the other request is waiting for its turn
    started = time.monotonic()
    resp = await client.post("/api/workflows/redos/run", json={"input_data": {"s": "a" * 25 + "!"}})
    waited = await other
    assert resp.status_code in (202, 422), resp.text
    assert waited < 1.0, f"another request waited {waited:.1f} s behind one schema check"
    assert time.monotonic() - started < 2.0


# -- inbound webhooks ------------------------------------------------------------------------


async def deployed(client: httpx.AsyncClient, name: str, mode: str) -> dict[str, Any]:
    resp = await create(client, name, ECHO, webhook={"mode": mode})
    assert resp.status_code == 201, resp.text
    hook = (await client.post(f"/api/workflows/{name}/deploy")).json()
    return {"id": hook["webhook_id"], "secret": hook["webhook_secret"]}


async def call_hook(
    client: httpx.AsyncClient,
    hook: dict[str, Any],
    body: bytes,
    ts: int | None = None,
    **headers: str,
) -> httpx.Response:
    ts = int(time.time()) if ts is None else ts
    signed = {
        "X-Stepd-Timestamp": str(ts),
        "X-Stepd-Signature": sign(hook["secret"].encode(), ts, body),
        "Content-Type": "application/json",
        **headers,
    }
    # no bearer token: the signature is the credential
    return await client.post(
        f"/hooks/{hook['id']}", content=body, headers={**signed, "Authorization": ""}
    )


async def test_an_idempotency_key_reused_with_another_body_is_refused(client):
    """POST /api/workflow answers 409 when an Idempotency-Key comes back with another body;
    /hooks answered 202 with the first call's run, silently dropping the second input."""
    hook = await deployed(client, "keyed", "persistent")
    first = await call_hook(client, hook, b'{"s": "first"}', **{"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    again = await call_hook(client, hook, b'{"s": "first"}', **{"Idempotency-Key": "k1"})
    assert again.status_code == 202 and again.json() == first.json()
    other = await call_hook(client, hook, b'{"s": "second"}', **{"Idempotency-Key": "k1"})
    assert other.status_code == 409, other.text


async def test_a_replayed_signed_call_starts_no_second_run(client):
    """The same signed request (same timestamp, signature and body) sent again inside the
    5-minute tolerance started a second run of a persistent webhook: whoever sees one
    call (a proxy log, a retrying middlebox) can repeat it for five minutes."""
    hook = await deployed(client, "replayed", "persistent")
    ts = int(time.time())
    first = await call_hook(client, hook, b'{"s": "x"}', ts=ts)
    assert first.status_code == 202, first.text
    replay = await call_hook(client, hook, b'{"s": "x"}', ts=ts)
    assert replay.status_code != 202 or replay.json() == first.json(), replay.text
    assert (await client.get("/api/workflows/replayed/runs")).json()["total"] == 1


# -- concurrency -----------------------------------------------------------------------------


async def test_a_redriven_run_waits_for_a_slot_like_a_new_one(client):
    """concurrency 1: A waits at a signal, B is queued; A cancelled, B starts; A redriven
    ran beside B: two runs held the definition's one slot."""
    assert (await create(client, "one-slot", WAIT, concurrency=1)).status_code == 201
    a = (await client.post("/api/workflows/one-slot/run", json={})).json()["run_id"]
    await until(client, a, "running")
    b = (await client.post("/api/workflows/one-slot/run", json={})).json()["run_id"]
    assert await status_of(client, b) == "queued"
    assert (await client.post(f"/api/workflows/runs/{a}/cancel")).status_code == 200
    await until(client, b, "running")
    resp = await client.post(f"/api/workflows/runs/{a}/resume", json={})
    assert resp.status_code in (200, 409), resp.text
    await asyncio.sleep(0.5)
    running = (await client.get("/api/workflows/one-slot/runs?status=running")).json()
    assert running["total"] <= 1, orjson.dumps(running).decode()


# -- diffs -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_large_diff_does_not_stall_the_daemon(client, app):
    """A diff is a read (an approve token asks for it): jsonpatch over a reordered list of
    32,000 items took 4.6 s on the event loop of a real daemon; every other request, the
    executor included, waited that long."""
    items = list(range(32_000))
    schema = {"enum": items}
    assert (await create(client, "big-diff", ECHO, input_schema=schema)).status_code == 201
    body = {"name": "big-diff", "flow": ECHO, "input_schema": {"enum": items[::-1]}}
    resp = await client.put("/api/workflows/big-diff", json={"definition": body})
    assert resp.status_code == 200, resp.text

    async def other_request() -> float:
        started = time.monotonic()  # a stalled loop wakes this sleep late: count it
        await asyncio.sleep(0.3)
        assert (await client.get("/api/workflows?limit=1")).status_code == 200
        return time.monotonic() - started - 0.3

    other = asyncio.ensure_future(other_request())
    await asyncio.sleep(0.05)  # the other request is waiting for its turn
    diff = await client.get("/api/workflows/big-diff/diff?v1=1&v2=2")
    waited = await other
    assert diff.status_code == 200 and diff.json()["diff"], diff.text[:300]
    assert waited < 1.0, f"another request waited {waited:.1f} s behind a diff"
