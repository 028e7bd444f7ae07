"""Inbound webhooks (spec §10): deploy, arm, signed calls, the single-use window under
concurrent calls, persistent mode, Idempotency-Key, and what a caller without the secret
gets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from daemon.notify import sign
from tests.helpers import auth, wait_for

DEFINITION = {
    "name": "hooked",
    "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    "flow": {"start": {"tool": "echo", "args": {"n": "<<input.n>>"}, "done": True}},
}


async def deployed(client: httpx.AsyncClient, **extra: Any) -> tuple[int, str, str]:
    resp = await client.post("/api/workflows", json={"definition": {**DEFINITION, **extra}})
    assert resp.status_code == 201, resp.text
    def_id = resp.json()["id"]
    resp = await client.post(f"/api/workflows/{def_id}/deploy")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["url"] == f"/hooks/{body['webhook_id']}"
    return def_id, body["webhook_id"], body["webhook_secret"]


def signed(secret: str, payload: Any, *, ts: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    ts = int(time.time()) if ts is None else ts
    headers = {
        "X-Stepd-Timestamp": str(ts),
        "X-Stepd-Signature": sign(secret.encode(), ts, body),
        "Content-Type": "application/json",
    }
    return body, headers


async def call(
    client: httpx.AsyncClient, hook: str, secret: str, payload: Any, **headers: str
) -> httpx.Response:
    body, signed_headers = signed(secret, payload)
    # No bearer token: the signature is the credential.
    return await client.post(
        f"/hooks/{hook}", content=body, headers={**signed_headers, **headers, "Authorization": ""}
    )


async def runs(client: httpx.AsyncClient, def_id: int) -> int:
    return (await client.get(f"/api/workflows/{def_id}/runs")).json()["total"]


async def test_armed_hook_fires_once(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    resp = await call(client, hook, secret, {"n": 1})
    assert resp.status_code == 410, resp.text  # deployed, not armed
    resp = await client.post(f"/api/workflows/{def_id}/arm")
    assert resp.status_code == 200, resp.text
    armed = resp.json()
    assert armed["ok"] is True and armed["armed_until"].endswith("Z")
    resp = await call(client, hook, secret, {"n": 7})
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["run_id"]
    wf = await wait_for(client, run_id)
    assert wf["status"] == "completed" and wf["output"] == {"n": 7}
    assert wf["trigger"] == "webhook"
    resp = await call(client, hook, secret, {"n": 8})
    assert resp.status_code == 410, resp.text
    assert await runs(client, def_id) == 1


async def test_twenty_concurrent_calls_one_wins(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    for r in range(3):  # three armings, each with twenty callers (different calls) at once
        assert (await client.post(f"/api/workflows/{def_id}/arm")).status_code == 200
        answers = await asyncio.gather(
            *(call(client, hook, secret, {"n": 100 * r + i}) for i in range(20))
        )
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] + [410] * 19, codes
    assert await runs(client, def_id) == 3


async def test_signature_and_timestamp_checked(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    await client.post(f"/api/workflows/{def_id}/arm")
    body, headers = signed(secret, {"n": 1})
    no_bearer = {"Authorization": ""}
    cases = [
        {**headers, "X-Stepd-Signature": "v1=" + "0" * 64},
        {
            **headers,
            "X-Stepd-Signature": sign(b"other secret", int(headers["X-Stepd-Timestamp"]), body),
        },
        {k: v for k, v in headers.items() if k != "X-Stepd-Signature"},
        {k: v for k, v in headers.items() if k != "X-Stepd-Timestamp"},
        {**headers, "X-Stepd-Timestamp": "soon"},
        dict(signed(secret, {"n": 1}, ts=int(time.time()) - 301)[1]),
        dict(signed(secret, {"n": 1}, ts=int(time.time()) + 301)[1]),
    ]
    for bad in cases:
        resp = await client.post(f"/hooks/{hook}", content=body, headers={**bad, **no_bearer})
        assert resp.status_code == 401, (bad, resp.text)
        assert "www-authenticate" not in resp.headers  # a signature, not a bearer, is wanted
    # The body is signed: a changed body with the old signature fails.
    resp = await client.post(f"/hooks/{hook}", content=orjson.dumps({"n": 2}),
                             headers={**headers, **no_bearer})  # fmt: skip
    assert resp.status_code == 401
    assert await runs(client, def_id) == 0
    # Still armed: the real call goes through.
    resp = await client.post(f"/hooks/{hook}", content=body, headers={**headers, **no_bearer})
    assert resp.status_code == 202, resp.text


async def test_unknown_and_undeployed_hooks_are_404(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    await client.post(f"/api/workflows/{def_id}/arm")
    assert (await call(client, "nope", secret, {})).status_code == 404
    assert (await client.post(f"/api/workflows/{def_id}/undeploy")).status_code == 200
    assert (await call(client, hook, secret, {"n": 1})).status_code == 404
    resp = await client.post(f"/api/workflows/{def_id}/arm")
    assert resp.status_code == 409, resp.text  # not deployed
    # Deploying again gives a new id and secret; the old ones stay dead.
    body = (await client.post(f"/api/workflows/{def_id}/deploy")).json()
    assert body["webhook_id"] != hook and body["webhook_secret"] != secret
    await client.post(f"/api/workflows/{def_id}/arm")
    assert (await call(client, hook, secret, {"n": 1})).status_code == 404
    assert (
        await call(client, body["webhook_id"], body["webhook_secret"], {"n": 1})
    ).status_code == 202


async def test_persistent_mode(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client, webhook={"mode": "persistent"})
    for i in range(3):
        resp = await call(client, hook, secret, {"n": i})
        assert resp.status_code == 202, resp.text
    assert (await client.post(f"/api/workflows/{def_id}/arm")).status_code == 409
    await client.patch(f"/api/workflows/{def_id}/status", json={"status": "paused"})
    assert (await call(client, hook, secret, {"n": 9})).status_code == 409
    assert await runs(client, def_id) == 3


async def test_idempotency_key_replays_the_run(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    await client.post(f"/api/workflows/{def_id}/arm")
    first = await call(client, hook, secret, {"n": 1}, **{"Idempotency-Key": "abc"})
    assert first.status_code == 202, first.text
    again = await call(client, hook, secret, {"n": 1}, **{"Idempotency-Key": "abc"})
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    other = await call(client, hook, secret, {"n": 1}, **{"Idempotency-Key": "def"})
    assert other.status_code == 410
    assert await runs(client, def_id) == 1


async def test_the_same_signed_call_again_is_the_same_run(client: httpx.AsyncClient) -> None:
    """A repeated delivery (the same timestamp, body and signature: a retrying proxy, or a
    captured call sent again) answers the first call's run and starts nothing."""
    def_id, hook, secret = await deployed(client, webhook={"mode": "persistent"})
    body, headers = signed(secret, {"n": 5})
    headers["Authorization"] = ""
    first = await client.post(f"/hooks/{hook}", content=body, headers=headers)
    assert first.status_code == 202, first.text
    again = await asyncio.gather(
        *(client.post(f"/hooks/{hook}", content=body, headers=headers) for _ in range(5))
    )
    assert {r.status_code for r in again} == {202}
    assert {r.json()["run_id"] for r in again} == {first.json()["run_id"]}
    assert all(r.headers.get("idempotent-replayed") == "true" for r in again)
    assert await runs(client, def_id) == 1


async def test_bad_input_keeps_the_arm(client: httpx.AsyncClient) -> None:
    def_id, hook, secret = await deployed(client)
    await client.post(f"/api/workflows/{def_id}/arm")
    resp = await call(client, hook, secret, {"n": "not a number"})
    assert resp.status_code == 422 and resp.json()["error_code"] == "VALIDATION_ERROR"
    resp = await call(client, hook, secret, [1, 2])
    assert resp.status_code == 400
    assert (await call(client, hook, secret, {"n": 3})).status_code == 202


@pytest.mark.parametrize("who", ["approver"])
async def test_secret_only_for_workflow_tokens(client: httpx.AsyncClient, who: str) -> None:
    def_id, hook, secret = await deployed(client)
    shown = (await client.get(f"/api/workflows/{def_id}", headers=auth(who))).json()
    assert secret not in str(shown) and hook not in str(shown)
    assert shown["webhook"]["deployed"] is True
    export = (await client.get(f"/api/workflows/{def_id}/export")).json()
    assert secret not in str(export) and hook not in str(export)
    assert (
        await client.post(f"/api/workflows/{def_id}/deploy", headers=auth(who))
    ).status_code == 403
