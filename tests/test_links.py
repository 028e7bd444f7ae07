"""One-click links: the confirmation page decides nothing; the form decides once, as "link"."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from itsdangerous import URLSafeSerializer

from daemon import links, signing
from daemon.config import Config
from tests.helpers import wait_for, waiting_gate
from tests.test_notify import GATE_FLOW, Receiver, fast_notifier, running, start_gate, until

__all__ = ["fast_notifier"]  # the autouse fixture, shared with test_notify


class Env:
    """The running app, an API client (james), a bare browser client, and the receiver."""

    def __init__(self, app: Any, api: httpx.AsyncClient, receiver: Receiver, tmp: Path):
        self.app, self.api, self.receiver, self.tmp = app, api, receiver, tmp
        self.browser = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://stepd"
        )

    @property
    def config(self) -> Config:
        config: Config = self.app.state.config
        return config

    async def gate(self, **extra: Any) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """A waiting gate and its gate_waiting notification body."""
        wf_id, gate = await start_gate(self.api, **extra)
        bodies = await until(
            lambda: [
                b for b in self.receiver.bodies("gate_waiting") if b["step"]["id"] == gate["id"]
            ]
        )
        return wf_id, gate, bodies[0]

    async def workflow(self, wf_id: int) -> dict[str, Any]:
        resp = await self.api.get(f"/api/workflow/{wf_id}")
        assert resp.status_code == 200
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
async def env(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Env]:
    async with running(tmp_path, webhook_url=receiver.url) as (app, api):
        e = Env(app, api, receiver, tmp_path)
        async with e.browser:
            yield e


def step_of(wf: dict[str, Any], step_id: int) -> dict[str, Any]:
    return next(s for s in wf["steps"] if s["id"] == step_id)


def assert_page(resp: httpx.Response, status: int, *texts: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["x-robots-tag"].startswith("noindex")
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["cache-control"] == "no-store"
    for text in texts:
        assert text in resp.text, f"{text!r} not on the page"


async def test_confirmation_page_shows_context_and_decides_nothing(env: Env) -> None:
    wf_id, gate, body = await env.gate(input={"title": "<b>New Policy</b>"})
    for url in (body["links"]["approve"], body["links"]["approve"]):  # twice: still nothing
        resp = await env.browser.get(url)
        assert_page(resp, 200, "review-article", "review", "james", "Approve", "expires")
        assert "&lt;b&gt;New Policy&lt;/b&gt;" in resp.text  # input, escaped
        assert "<b>New Policy" not in resp.text
        assert "prepare" in resp.text  # the previous step's result is shown
        assert (await env.browser.head(url)).status_code == 200
    resp = await env.browser.get(body["links"]["reject"])
    assert_page(resp, 200, "Reject", "reason")
    wf = await env.workflow(wf_id)
    assert wf["status"] == "running" and waiting_gate(wf)["id"] == gate["id"]  # type: ignore[index]


async def test_approve_link_approves_once(env: Env) -> None:
    wf_id, gate, body = await env.gate()
    url = body["links"]["approve"]
    resp = await env.browser.post(url, data={"decision": "approve", "result": '{"ok": 1}'})
    assert_page(resp, 200, "approved")
    wf = await wait_for(env.api, wf_id)
    assert wf["status"] == "completed"
    decided = step_of(wf, gate["id"])
    assert decided["decided_by"] == "link" and decided["result_json"] == '{"ok":1}'

    again = await env.browser.post(url, data={"decision": "approve"})
    assert_page(again, 409, "already used")
    other = await env.browser.post(body["links"]["reject"], data={"decision": "reject",
                                                                  "reason": "late"})  # fmt: skip
    assert_page(other, 409, "already decided")
    assert_page(await env.browser.get(url), 409, "already decided")


async def test_reject_link_needs_a_reason_then_fails_the_gate(env: Env) -> None:
    wf_id, gate, body = await env.gate()
    url = body["links"]["reject"]
    empty = await env.browser.post(url, data={"decision": "reject", "reason": "  "})
    assert_page(empty, 400, "needs a reason")
    assert waiting_gate(await env.workflow(wf_id)) is not None  # nothing spent, nothing decided

    resp = await env.browser.post(url, data={"decision": "reject", "reason": "not <now>"})
    assert_page(resp, 200, "rejected")
    wf = await wait_for(env.api, wf_id)
    assert wf["status"] == "failed"
    failed = step_of(wf, gate["id"])
    assert failed["status"] == "failed" and failed["decided_by"] == "link"
    assert "not <now>" in failed["error"] and failed["reason"] == "not <now>"


async def test_bad_json_result_is_refused_without_spending_the_link(env: Env) -> None:
    wf_id, _, body = await env.gate()
    url = body["links"]["approve"]
    resp = await env.browser.post(url, data={"decision": "approve", "result": "{nope"})
    assert_page(resp, 400, "invalid JSON")
    resp = await env.browser.post(url, data={"decision": "approve", "result": '{"a": 1, "a": 2}'})
    assert_page(resp, 400, "duplicate key")
    assert waiting_gate(await env.workflow(wf_id)) is not None
    assert_page(await env.browser.post(url, data={"decision": "approve"}), 200, "approved")


async def test_approve_link_cannot_reject(env: Env) -> None:
    wf_id, _, body = await env.gate()
    url = body["links"]["approve"]
    resp = await env.browser.post(url, data={"decision": "reject", "reason": "sneaky"})
    assert_page(resp, 400, "can only approve")
    # Nor can the decision inside the token be switched: the signature covers it.
    mac = url.rsplit("/", 1)[1].rpartition(".")[2]
    reject_payload = body["links"]["reject"].rsplit("/", 1)[1].rpartition(".")[0]
    forged = f"http://stepd/link/{reject_payload}.{mac}"
    resp = await env.browser.post(forged, data={"decision": "reject", "reason": "sneaky"})
    assert_page(resp, 403, "signature")
    assert waiting_gate(await env.workflow(wf_id)) is not None


@pytest.mark.parametrize(
    ("mangle", "status", "text"),
    [
        (lambda t: t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB"), 403, "signature"),
        (lambda t: "x" + t, 403, "signature"),
        (lambda t: t.partition(".")[0], 400, "malformed"),
        (lambda t: "a" * 2000 + "." + "b", 400, "malformed"),
    ],
)
async def test_tampered_links_are_refused(env: Env, mangle: Any, status: int, text: str) -> None:
    wf_id, _, body = await env.gate()
    token = body["links"]["approve"].rsplit("/", 1)[1]
    url = f"http://stepd/link/{mangle(token)}"
    assert_page(await env.browser.get(url), status, text)
    assert_page(await env.browser.post(url, data={"decision": "approve"}), status, text)
    assert waiting_gate(await env.workflow(wf_id)) is not None


async def test_expired_link_is_refused(env: Env) -> None:
    wf_id, gate, _ = await env.gate()
    secret = signing.secret(env.config.state_dir)
    old = links.make_links(env.config, secret, gate["id"], time.time() - 2 * env.config.link_ttl_s)
    assert_page(await env.browser.get(old["approve"]), 410, "expired")
    assert_page(await env.browser.post(old["approve"], data={"decision": "approve"}), 410)
    assert waiting_gate(await env.workflow(wf_id)) is not None


async def test_link_for_a_step_decided_elsewhere(env: Env) -> None:
    wf_id, gate, body = await env.gate()
    assert (await env.api.post(f"/api/workflow/{gate['id']}/ready")).status_code == 200
    url = body["links"]["approve"]
    assert_page(await env.browser.get(url), 409, "already decided", "james")
    assert_page(await env.browser.post(url, data={"decision": "approve"}), 409, "already decided")
    wf = await wait_for(env.api, wf_id)
    assert step_of(wf, gate["id"])["decided_by"] == "james"


async def test_cancelled_workflow_link(env: Env) -> None:
    wf_id, _, body = await env.gate()
    assert (await env.api.delete(f"/api/workflow/{wf_id}")).status_code == 200
    url = body["links"]["reject"]
    resp = await env.browser.post(url, data={"decision": "reject", "reason": "x"})
    assert_page(resp, 409, "already decided")


async def test_gate_restricted_to_named_approvers_gets_no_links(env: Env) -> None:
    flow = {**GATE_FLOW, "gate": {**GATE_FLOW["gate"], "approvers": ["alice"]}}
    wf_id, gate, body = await env.gate(flow=flow)
    assert "links" not in body
    made = links.make_links(
        env.config, signing.secret(env.config.state_dir), gate["id"], time.time()
    )
    assert_page(await env.browser.get(made["approve"]), 403, "does not accept decisions by link")
    resp = await env.browser.post(made["approve"], data={"decision": "approve"})
    assert_page(resp, 403, "does not accept decisions by link")
    assert waiting_gate(await env.workflow(wf_id)) is not None


async def test_gate_for_approvers_by_permission_takes_links(env: Env) -> None:
    flow = {**GATE_FLOW, "gate": {**GATE_FLOW["gate"], "approvers": ["approve"]}}
    wf_id, gate, body = await env.gate(flow=flow)
    resp = await env.browser.post(body["links"]["approve"], data={"decision": "approve"})
    assert_page(resp, 200, "approved")
    wf = await wait_for(env.api, wf_id)
    assert wf["status"] == "completed" and step_of(wf, gate["id"])["decided_by"] == "link"


async def test_link_for_a_missing_step(env: Env) -> None:
    made = links.make_links(env.config, signing.secret(env.config.state_dir), 12345, time.time())
    assert_page(await env.browser.get(made["approve"]), 404, "no longer exists")
    assert_page(await env.browser.post(made["reject"], data={"decision": "reject"}), 404)
    assert (await env.browser.put(made["approve"])).status_code == 405


def test_tokens_round_trip_and_need_the_same_secret_and_purpose() -> None:
    secret = b"server-secret"
    link = links.Link(7, "reject", 1_900_000_000, "abc")
    token = links.make_token(secret, link)
    assert links.parse_token(secret, token) == link
    body = {"s": 7, "d": "reject", "e": 1_900_000_000, "n": "abc"}
    for other in (
        links.make_token(b"other-secret", link),  # another daemon's
        signing.serializer(secret, "session").dumps(body),  # signed for another use
        signing.timed_serializer(secret, "flash").dumps(body),
    ):
        with pytest.raises(links.LinkError) as exc:
            links.parse_token(secret, other)
        assert exc.value.status == 403
    # The key is derived from the server secret, never the secret itself.
    plain = URLSafeSerializer(secret, salt=b"stepd.link", signer_kwargs={
        "key_derivation": "none", "digest_method": hashlib.sha256})  # fmt: skip
    with pytest.raises(links.LinkError):
        links.parse_token(secret, plain.dumps(body))


async def test_links_of_the_old_format_no_longer_work(env: Env) -> None:
    wf_id, gate, _ = await env.gate()
    # The earlier hand-made format: base64url(JSON).base64url(HMAC(HMAC(secret, "stepd-links"))).
    key = hmac.new(signing.secret(env.config.state_dir), b"stepd-links", hashlib.sha256).digest()
    payload = base64.urlsafe_b64encode(orjson.dumps(
        {"s": gate["id"], "d": "approve", "e": int(time.time()) + 600, "n": "old"}
    )).rstrip(b"=").decode()  # fmt: skip
    mac = base64.urlsafe_b64encode(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    old = f"http://stepd/link/{payload}.{mac.rstrip(b'=').decode()}"
    assert_page(await env.browser.post(old, data={"decision": "approve"}), 403, "signature")
    assert waiting_gate(await env.workflow(wf_id)) is not None
