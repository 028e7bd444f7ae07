"""The error table and hostile input: right status, {"error": ...} body, nothing changed."""

from __future__ import annotations

import asyncio
import copy
import gc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from daemon import bodies
from daemon.api import create_app
from daemon.auth import hash_token
from daemon.config import TokenConfig
from tests.helpers import TOKENS, Watch, auth, make_config, wait_for, waiting_gate

MISSING_START = "Flow must have a 'start' key"
JSON_CT = {"Content-Type": "application/json"}

ECHO_FLOW = {"start": {"name": "s", "tool": "echo", "args": {"x": 1}, "done": True}}
GATE_FLOW = {
    "start": {"name": "gate", "tool": None, "args": {}, "next": "after"},
    "after": {"name": "after", "tool": "echo", "args": {}, "done": True},
}


_ECHO = object()


def body(flow: Any = _ECHO, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "t", "flow": copy.deepcopy(ECHO_FLOW if flow is _ECHO else flow)}
    out["input"] = {}
    out.update(fields)
    return out


# -- helpers -----------------------------------------------------------------------


async def count(client: httpx.AsyncClient) -> int:
    resp = await client.get("/api/workflow", params={"limit": 1000}, headers=auth("james"))
    assert resp.status_code == 200, resp.text
    return len(resp.json())


def assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """`{"error": "<non-empty string>"}` with `status` (422 may add a list of `errors`)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    data = resp.json()
    assert isinstance(data, dict), data
    assert isinstance(data.get("error"), str) and data["error"].strip(), data
    extra = set(data) - {"error"}
    assert extra <= {"errors"}, data
    if "errors" in data:
        assert data["errors"] and all(isinstance(e, str) and e for e in data["errors"])
    return data


async def rejected(
    client: httpx.AsyncClient, status: int, method: str, url: str, **kwargs: Any
) -> dict[str, Any]:
    """Send a request that must fail with `status` and change nothing."""
    before = await count(client)
    resp = await client.request(method, url, **kwargs)
    data = assert_error(resp, status)
    assert await count(client) == before
    return data


async def create(client: httpx.AsyncClient, payload: dict[str, Any]) -> int:
    resp = await client.post("/api/workflow", json=payload)
    assert resp.status_code == 201, resp.text
    wf_id: int = resp.json()["id"]
    return wf_id


async def gated(client: httpx.AsyncClient) -> tuple[int, int]:
    wf_id = await create(client, body(GATE_FLOW))
    wf = await wait_for(client, wf_id, lambda w: waiting_gate(w) is not None)
    gate = waiting_gate(wf)
    assert gate is not None
    return wf_id, gate["id"]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


StartApp = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def start_app(tmp_path: Path) -> StartApp:
    """Start the real app with config overrides; yields a client authenticated as james."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        application = create_app(make_config(tmp_path, **overrides))
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://stepd", headers=auth("james")
            ) as c:
                yield c

    return start


# -- 400 ---------------------------------------------------------------------------

BAD_JSON_BYTES = {
    "invalid-json": b'{"name": "t", "flow": ',
    "trailing-garbage": orjson.dumps(body()) + b" x",
    "empty": b"",
    "whitespace-only": b"  \n ",
    "array": b"[1, 2]",
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "non-utf8": b'{"name": "t\xff\xfe", "flow": {}}',
    "lone-surrogate": b'{"name": "t\\ud800", "flow": {}}',
    "int-1e400-as-digits": b'{"name": "t", "flow": {}, "input": {"n": 1' + b"0" * 400 + b"}}",
    "float-1e400": b'{"name": "t", "flow": {}, "input": {"n": 1e400}}',
    "nan": b'{"name": "t", "flow": {}, "input": {"n": NaN}}',
    "infinity": b'{"name": "t", "flow": {}, "input": {"n": -Infinity}}',
    "single-quotes": b"{'name': 't'}",
    "deeply-nested-10000": b'{"name": "t", "flow": {}, "input": {"n": '
    + b"[" * 10_000
    + b"]" * 10_000
    + b"}}",
}


NON_OBJECTS = {"array", "string", "number", "null"}


@pytest.mark.parametrize("raw", list(BAD_JSON_BYTES.values()), ids=list(BAD_JSON_BYTES))
@pytest.mark.parametrize("url", ["/api/workflow", "/api/workflow/validate"])
async def test_unparseable_body_is_400(client: httpx.AsyncClient, url: str, raw: bytes) -> None:
    if url.endswith("/validate") and raw in {BAD_JSON_BYTES[k] for k in NON_OBJECTS}:
        # validate may answer a well-formed non-object with 200 {"valid": false, ...}.
        resp = await client.post(url, content=raw, headers=JSON_CT)
        if resp.status_code == 200:
            data = resp.json()
            assert data["valid"] is False and data["errors"], data
            return
    await rejected(client, 400, "POST", url, content=raw, headers=JSON_CT)


async def test_missing_name_is_400_reference(client: httpx.AsyncClient) -> None:
    data = await rejected(client, 400, "POST", "/api/workflow", json={"flow": ECHO_FLOW})
    assert "name" in data["error"]


@pytest.mark.parametrize("name", [5, None, True, ["t"], {"n": "t"}, "", "   "])
async def test_bad_name_is_400(client: httpx.AsyncClient, name: Any) -> None:
    data = await rejected(client, 400, "POST", "/api/workflow", json=body(name=name))
    assert "name" in data["error"]


async def test_missing_flow_is_an_error(client: httpx.AsyncClient) -> None:
    data = await rejected(client, 400, "POST", "/api/workflow", json={"name": "t"})
    assert "flow" in data["error"]


@pytest.mark.parametrize(
    "big",
    [2**64 + 1, 2**70 + 1, 2**128 + 1, -(2**63) - 1],
    ids=["2**64+1", "2**70+1", "2**128+1", "-2**63-1"],
)  # none of these fits an int64 / uint64
async def test_integer_over_64_bits_is_400_or_exact(client: httpx.AsyncClient, big: int) -> None:
    """Never silently stored as a rounded float: rejected, or returned digit for digit."""
    raw = b'{"name": "t", "flow": %s, "input": {"n": %d}}' % (orjson.dumps(ECHO_FLOW), big)
    before = await count(client)
    resp = await client.post("/api/workflow", content=raw, headers=JSON_CT)
    if resp.status_code == 201:
        wf = (await client.get(f"/api/workflow/{resp.json()['id']}")).json()
        assert wf["input"]["n"] == big and isinstance(wf["input"]["n"], int), wf["input"]
    else:
        assert_error(resp, 400)
        assert await count(client) == before


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=100000",
        "limit=99999999999999999999999999",
        "status=bogus",
        "status=RUNNING",
        "before=x",
        "before=-5",
        "before=99999999999999999999999999",
    ],
)
async def test_bad_list_query_is_400(client: httpx.AsyncClient, query: str) -> None:
    await create(client, body())
    await rejected(client, 400, "GET", f"/api/workflow?{query}")


# -- 422 ---------------------------------------------------------------------------


async def test_missing_start_is_422_exact_reference_body(client: httpx.AsyncClient) -> None:
    payload = {"name": "t", "flow": {"other": {"tool": "echo", "done": True}}, "input": {}}
    before = await count(client)
    resp = await client.post("/api/workflow", json=payload)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {"error": MISSING_START}
    assert await count(client) == before


def state(**fields: Any) -> dict[str, Any]:
    return {"start": {"tool": "echo", "args": {}, **fields}}


INVALID_FLOWS: dict[str, tuple[Any, list[str]]] = {
    # case: (flow, words the error must contain)
    "flow-not-object": ([1, 2], ["flow"]),
    "flow-null": (None, ["flow"]),
    "state-not-object": ({"start": "echo"}, ["start"]),
    "tool-key-missing": ({"start": {"args": {}, "done": True}}, ["start", "tool"]),
    "unknown-tool": (state(tool="no_such_tool", done=True), ["start", "no_such_tool"]),
    "tool-a-number": (state(tool=5, done=True), ["start", "tool"]),
    "unknown-next": (state(next="ghost"), ["start", "ghost"]),
    "unknown-branch-target": (
        state(branch=[{"if": "result", "then": "ghost"}, {"else": "start"}]),
        ["start", "ghost"],
    ),
    "unknown-on-error": (state(done=True, on_error="ghost"), ["start", "ghost"]),
    "zero-transitions": (state(), ["start", "next"]),
    "two-transitions": (
        {"start": {"tool": "echo", "next": "b", "done": True}, "b": state(done=True)["start"]},
        ["start", "next"],
    ),
    "done-false": (state(done=False), ["start", "done"]),
    "args-not-object": ({"start": {"tool": "echo", "args": [1], "done": True}}, ["start", "args"]),
    "args-a-string": ({"start": {"tool": "echo", "args": "x", "done": True}}, ["start", "args"]),
    "name-a-number": (state(name=5, done=True), ["start", "name"]),
    "branch-not-list": (state(branch="start"), ["start", "branch"]),
    "branch-empty": (state(branch=[]), ["start", "branch"]),
    "template-syntax-error": (
        {"start": {"tool": "echo", "args": {"q": "<<input.>>"}, "done": True}},
        ["start", "input."],
    ),
    "template-syntax-error-braces": (
        {"start": {"tool": "echo", "args": {"q": "{{ input. }}"}, "done": True}},
        ["start", "args"],
    ),
    "sandbox-escape-args": (
        {"start": {"tool": "echo", "args": {"q": "<<''.__class__.__mro__>>"}, "done": True}},
        ["start", "__class__"],
    ),
    "sandbox-escape-nested-args": (
        {
            "start": {
                "tool": "echo",
                "args": {"a": [{"b": "x <<input['__class__']>>"}]},
                "done": True,
            }
        },
        ["start", "__class__"],
    ),  # fmt: skip
    "sandbox-escape-branch": (
        {
            "start": {
                "tool": "echo",
                "branch": [{"if": "result.__class__.__base__", "then": "end"}],
            },
            "end": {"tool": "echo", "done": True},
        },
        ["start", "__class__"],
    ),
    "branch-syntax-error": (
        {
            "start": {"tool": "echo", "branch": [{"if": "result ==", "then": "end"}]},
            "end": {"tool": "echo", "done": True},
        },
        ["start", "branch"],
    ),
    "unknown-state-field": (state(done=True, bogus=1), ["start", "bogus"]),
    "timeout-negative": (state(done=True, timeout=-1), ["start", "timeout"]),
    "retry-not-object": (state(done=True, retry=3), ["start", "retry"]),
}


@pytest.mark.parametrize(("flow", "words"), list(INVALID_FLOWS.values()), ids=list(INVALID_FLOWS))
async def test_invalid_flow_is_422(client: httpx.AsyncClient, flow: Any, words: list[str]) -> None:
    data = await rejected(client, 422, "POST", "/api/workflow", json=body(flow))
    for word in words:
        assert word in data["error"], data


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (body(input=[1]), "input"),
        (body(input="x"), "input"),
        (body(input=5), "input"),
        (body(bogus=1), "bogus"),
        (body(name="x" * 10_000), "name"),
    ],
    ids=["input-list", "input-string", "input-number", "unknown-top-level", "name-too-long"],
)
async def test_invalid_body_field_is_422(
    client: httpx.AsyncClient, payload: dict[str, Any], word: str
) -> None:
    data = await rejected(client, 422, "POST", "/api/workflow", json=payload)
    assert word in data["error"]


async def test_too_many_states_is_422(start_app: StartApp) -> None:
    flow = {f"s{i}": {"tool": "echo", "next": f"s{i + 1}"} for i in range(5)}
    flow["start"] = {"tool": "echo", "next": "s0"}
    flow["s5"] = {"tool": "echo", "done": True}
    async with start_app(max_states=3) as c:
        data = await rejected(c, 422, "POST", "/api/workflow", json=body(flow))
        assert "3" in data["error"] and "states" in data["error"]
        resp = await c.post("/api/workflow/validate", json=body(flow))
        assert resp.status_code == 200 and resp.json()["valid"] is False
        small = {"start": {"tool": "echo", "next": "b"}, "b": {"tool": "echo", "done": True}}
        assert (await c.post("/api/workflow", json=body(small))).status_code == 201


# -- 404 ---------------------------------------------------------------------------

BIG = "9" * 30  # an integer id far beyond SQLite's 64-bit INTEGER


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/api/workflow/123"),
        ("DELETE", "/api/workflow/123"),
        ("POST", "/api/workflow/123/ready"),
        ("GET", f"/api/workflow/{BIG}"),
        ("DELETE", f"/api/workflow/{BIG}"),
        ("POST", f"/api/workflow/{BIG}/ready"),
        ("GET", "/api/workflow/9223372036854775808"),
        ("GET", "/api/workflow/" + "9" * 5000),  # beyond what int() converts: not a 500
        ("POST", "/api/workflow/" + "9" * 5000 + "/ready"),
        ("GET", "/api/workflow/" + "9" * 5000 + "/events"),
        ("GET", "/api/workflow/abc"),
        ("DELETE", "/api/workflow/abc"),
        ("POST", "/api/workflow/abc/ready"),
        ("GET", "/api/workflow/-1"),
        ("GET", "/api/workflow/1.5"),
        ("GET", "/api/nothing"),
        ("GET", "/api"),
        ("GET", "/"),
        ("POST", "/api/workflow/123/reject-me"),
    ],
)
async def test_not_found_is_404(client: httpx.AsyncClient, method: str, url: str) -> None:
    await create(client, body())
    await rejected(client, 404, method, url)


async def test_step_id_is_not_a_workflow_id(client: httpx.AsyncClient) -> None:
    wf_id, step_id = await gated(client)
    await rejected(client, 404, "GET", f"/api/workflow/{step_id}")
    await rejected(client, 404, "POST", f"/api/workflow/{wf_id}/ready")
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["status"] == "running" and waiting_gate(wf) is not None


# -- 405 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("PUT", "/api/workflow"),
        ("PATCH", "/api/workflow"),
        ("DELETE", "/api/workflow"),
        ("GET", "/api/workflow/validate"),
        ("PUT", "/api/workflow/123"),
        ("POST", "/api/workflow/123"),
        ("GET", "/api/workflow/123/ready"),
        ("POST", "/api/tools"),
        ("POST", "/healthz"),
    ],
)
async def test_wrong_method_is_405(client: httpx.AsyncClient, method: str, url: str) -> None:
    await create(client, body())
    await rejected(client, 405, method, url, json=body())


async def test_405_names_the_allowed_methods(client: httpx.AsyncClient) -> None:
    resp = await client.put("/api/workflow", json=body())
    assert_error(resp, 405)
    assert set(resp.headers.get("allow", "").replace(" ", "").split(",")) >= {"GET", "POST"}


# -- 409 ---------------------------------------------------------------------------


async def test_delete_completed_workflow_is_409(client: httpx.AsyncClient) -> None:
    wf_id = await create(client, body())
    done = await wait_for(client, wf_id)
    assert done["status"] == "completed"
    await rejected(client, 409, "DELETE", f"/api/workflow/{wf_id}")
    assert (await client.get(f"/api/workflow/{wf_id}")).json() == done


async def test_delete_twice_is_409(client: httpx.AsyncClient) -> None:
    wf_id, _ = await gated(client)
    resp = await client.delete(f"/api/workflow/{wf_id}")
    assert resp.status_code == 200 and resp.json() == {"cancelled": True}
    cancelled = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert cancelled["status"] == "cancelled"
    await rejected(client, 409, "DELETE", f"/api/workflow/{wf_id}")
    assert (await client.get(f"/api/workflow/{wf_id}")).json() == cancelled


async def test_ready_on_a_done_tool_step_is_409(client: httpx.AsyncClient) -> None:
    wf_id = await create(client, body())
    done = await wait_for(client, wf_id)
    step_id = done["steps"][0]["id"]
    assert done["steps"][0]["status"] == "done"
    await rejected(client, 409, "POST", f"/api/workflow/{step_id}/ready")
    assert (await client.get(f"/api/workflow/{wf_id}")).json() == done


async def test_ready_on_a_running_tool_step_is_409(client: httpx.AsyncClient) -> None:
    flow = {"start": {"tool": "sleep", "args": {"seconds": 30}, "done": True}}
    wf_id = await create(client, body(flow))
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    step_id = wf["steps"][0]["id"]
    await rejected(client, 409, "POST", f"/api/workflow/{step_id}/ready", json={"x": 1})
    after = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert after["status"] == "running" and after["steps"][0]["result_json"] is None
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 200


async def test_ready_twice_is_409(client: httpx.AsyncClient) -> None:
    wf_id, step_id = await gated(client)
    resp = await client.post(f"/api/workflow/{step_id}/ready", json={"by": "first"})
    assert resp.status_code == 200 and resp.json() == {"queued": True}
    await rejected(client, 409, "POST", f"/api/workflow/{step_id}/ready", json={"by": "second"})
    wf = await wait_for(client, wf_id)
    gate = next(s for s in wf["steps"] if s["id"] == step_id)
    assert orjson.loads(gate["result_json"]) == {"by": "first"}
    assert len(wf["steps"]) == 2 and wf["status"] == "completed"


async def test_ready_on_gate_of_cancelled_workflow_is_409(client: httpx.AsyncClient) -> None:
    wf_id, step_id = await gated(client)
    assert (await client.delete(f"/api/workflow/{wf_id}")).status_code == 200
    cancelled = (await client.get(f"/api/workflow/{wf_id}")).json()
    await rejected(client, 409, "POST", f"/api/workflow/{step_id}/ready")
    assert (await client.get(f"/api/workflow/{wf_id}")).json() == cancelled
    assert cancelled["steps"][0]["status"] == "cancelled"


# -- 413 ---------------------------------------------------------------------------

LIMIT = 1000


def padded(size: int) -> bytes:
    """A valid create body of about `size` bytes."""
    raw = orjson.dumps(body(input={"pad": ""}))
    return raw.replace(b'"pad":""', b'"pad":"' + b"x" * (size - len(raw)) + b'"')


@pytest.mark.parametrize("url", ["/api/workflow", "/api/workflow/validate", "ready"])
async def test_body_over_limit_with_content_length_is_413(start_app: StartApp, url: str) -> None:
    async with start_app(max_body_bytes=LIMIT) as c:
        step_id = None
        if url == "ready":
            wf_id, step_id = await gated(c)
            url = f"/api/workflow/{step_id}/ready"
        raw = padded(5000)
        assert len(raw) == 5000
        await rejected(c, 413, "POST", url, content=raw, headers=JSON_CT)
        if step_id is not None:
            wf = (await c.get(f"/api/workflow/{wf_id}")).json()
            assert waiting_gate(wf) is not None
        # Just under the limit is fine.
        if url == "/api/workflow":
            ok = await c.post(url, content=padded(LIMIT - 10), headers=JSON_CT)
            assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("url", ["/api/workflow", "/api/workflow/validate"])
async def test_streamed_body_over_limit_is_413_while_reading(start_app: StartApp, url: str) -> None:
    raw = padded(50_000)
    chunk = 100
    sent: list[int] = []

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), chunk):
            sent.append(i)
            yield raw[i : i + chunk]

    async with start_app(max_body_bytes=LIMIT) as c:
        before = await count(c)
        resp = await c.post(url, content=stream(), headers=JSON_CT)
        assert "content-length" not in resp.request.headers
        assert_error(resp, 413)
        assert await count(c) == before
    # Refused once the limit was passed, not after reading all 50 kB.
    assert len(sent) * chunk <= LIMIT + 2 * chunk, len(sent)


async def test_lying_small_content_length_is_still_limited(start_app: StartApp) -> None:
    """A Content-Length under the limit does not let a longer body through."""

    async def stream() -> AsyncIterator[bytes]:
        yield padded(5000)

    async with start_app(max_body_bytes=LIMIT) as c:
        before = await count(c)
        headers = {**JSON_CT, "Content-Length": "100"}
        resp = await c.post("/api/workflow", content=stream(), headers=headers)
        assert resp.status_code in (400, 413), resp.text
        assert_error(resp, resp.status_code)
        assert await count(c) == before


# -- 415 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"],
)
@pytest.mark.parametrize("url", ["/api/workflow", "/api/workflow/validate"])
async def test_wrong_content_type_is_415(client: httpx.AsyncClient, url: str, ctype: str) -> None:
    raw = orjson.dumps(body())
    await rejected(client, 415, "POST", url, content=raw, headers={"Content-Type": ctype})


@pytest.mark.parametrize(
    "ctype",
    ["application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"],
)
async def test_json_content_type_variants_are_accepted(
    client: httpx.AsyncClient, ctype: str
) -> None:
    resp = await client.post(
        "/api/workflow", content=orjson.dumps(body()), headers={"Content-Type": ctype}
    )
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(
    ("raw", "ctype", "status"),
    [
        (b'{"ok": ', "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"NaN", "application/json", 400),
        (b'{"ok": true}', "text/plain", 415),
        (b"ok=1", "application/x-www-form-urlencoded", 415),
    ],
    ids=["invalid-json", "non-utf8", "nan", "text-plain", "form"],
)
async def test_bad_ready_body_leaves_gate_waiting(
    client: httpx.AsyncClient, raw: bytes, ctype: str, status: int
) -> None:
    wf_id, step_id = await gated(client)
    url = f"/api/workflow/{step_id}/ready"
    await rejected(client, status, "POST", url, content=raw, headers={"Content-Type": ctype})
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    gate = waiting_gate(wf)
    assert wf["status"] == "running" and gate is not None and gate["result_json"] is None
    # The reference's bare `curl -X POST .../ready` (no body, no Content-Type) still works.
    assert (await client.post(url)).json() == {"queued": True}
    assert (await wait_for(client, wf_id))["status"] == "completed"


# -- NUL bytes, nesting, odd values ------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        body(name="a\u0000b"),
        body(input={"k": "x\u0000y"}),
        body(input={"k\u0000": "v"}),
        body({"start": {"tool": "echo", "args": {"v": "p\u0000q"}, "done": True}}),
    ],
    ids=["name", "input-value", "input-key", "arg-value"],
)
async def test_nul_characters_are_rejected(
    client: httpx.AsyncClient, payload: dict[str, Any]
) -> None:
    before = await count(client)
    data = await rejected(client, 400, "POST", "/api/workflow", json=payload)
    assert "NUL" in data["error"]
    assert await count(client) == before


async def test_duplicate_keys_are_rejected(client: httpx.AsyncClient) -> None:
    before = await count(client)
    raw = (
        b'{"name": "a", "name": "b", "flow": {"start": {"tool": "echo", "done": true}}}',
        b'{"name": "a", "flow": {"start": {"tool": "echo", "done": true}}, '
        b'"input": {"k": 1, "k": 2}}',
    )
    for content in raw:
        resp = await client.post(
            "/api/workflow", content=content, headers={"Content-Type": "application/json"}
        )
        assert_error(resp, 400)
        assert "duplicate key" in resp.json()["error"]
    assert await count(client) == before


@pytest.mark.parametrize("depth", [100, 300, 1000, 10_000])
@pytest.mark.parametrize("where", ["input", "args", "ready"])
async def test_deep_nesting_is_never_a_500(
    client: httpx.AsyncClient, where: str, depth: int
) -> None:
    """Parsed-but-deep JSON is stored faithfully, or refused with 400/413/422."""
    deep = nested(depth)
    raw = b"[" * depth + b"[]" + b"]" * depth  # orjson cannot dump this deep itself
    if where == "input":
        prefix, suffix = (
            b'{"name": "t", "flow": %s, "input": {"n": ' % orjson.dumps(ECHO_FLOW),
            b"}}",
        )
        url = "/api/workflow"
    elif where == "args":
        prefix = b'{"name": "t", "flow": {"start": {"tool": "echo", "done": true, "args": {"n": '
        suffix = b"}}}}"
        url = "/api/workflow"
    else:
        wf_id, step_id = await gated(client)
        prefix, suffix, url = b'{"n": ', b"}", f"/api/workflow/{step_id}/ready"
    before = await count(client)
    resp = await client.post(url, content=prefix + raw + suffix, headers=JSON_CT)
    assert resp.status_code in (200, 201, 400, 413, 422), resp.text[:300]
    if resp.status_code >= 400:
        assert_error(resp, resp.status_code)
        assert await count(client) == before
        if where == "ready":
            wf = (await client.get(f"/api/workflow/{wf_id}")).json()
            assert waiting_gate(wf) is not None
        return
    if where == "input":
        wf = await wait_for(client, resp.json()["id"])
        assert wf["input"] == {"n": deep}
    elif where == "ready":
        wf = await wait_for(client, wf_id)
        assert wf["status"] == "completed"


async def test_unicode_is_stored_faithfully(client: httpx.AsyncClient) -> None:
    text = 'héllo – 世界 🚀 \u2028 "q" \\ </script>'
    wf_id = await create(client, body(name=text, input={text: [text, 2**63 - 1, -(2**63), 0.1]}))
    wf = (await client.get(f"/api/workflow/{wf_id}")).json()
    assert wf["name"] == text
    assert wf["input"] == {text: [text, 2**63 - 1, -(2**63), 0.1]}


# -- Idempotency-Key ---------------------------------------------------------------


async def test_idempotency_same_key_same_body_replays(client: httpx.AsyncClient) -> None:
    before = await count(client)
    headers = {"Idempotency-Key": "order-1"}
    first = await client.post("/api/workflow", json=body(), headers=headers)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    # Same body with keys in another order is the same request.
    reordered = dict(reversed(list(body().items())))
    second = await client.post("/api/workflow", json=reordered, headers=headers)
    assert second.status_code == 201, second.text
    assert second.json() == first.json() == {"id": first.json()["id"], "status": "started"}
    assert second.headers["idempotent-replayed"] == "true"
    assert await count(client) == before + 1


async def test_idempotency_same_key_other_body_is_409(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-2"}
    first = await client.post("/api/workflow", json=body(), headers=headers)
    assert first.status_code == 201
    other = body(input={"changed": True})
    await rejected(client, 409, "POST", "/api/workflow", json=other, headers=headers)
    wf = (await client.get(f"/api/workflow/{first.json()['id']}")).json()
    assert wf["input"] == {}


async def test_idempotency_invalid_body_with_key_does_not_burn_it(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "order-3"}
    await rejected(client, 422, "POST", "/api/workflow", json=body({"x": {}}), headers=headers)
    resp = await client.post("/api/workflow", json=body(), headers=headers)
    assert resp.status_code == 201 and "idempotent-replayed" not in resp.headers


async def test_idempotency_keys_are_per_token(start_app: StartApp) -> None:
    tokens = (
        *(TokenConfig(n, hash_token(t), p) for n, (t, p) in TOKENS.items()),
        TokenConfig("alice", hash_token("tok-alice"), ("workflow",)),
    )
    async with start_app(tokens=tokens) as c:
        headers = {"Idempotency-Key": "shared"}
        james = await c.post("/api/workflow", json=body(), headers=headers)
        alice = await c.post(
            "/api/workflow",
            json=body(),
            headers={**headers, "Authorization": "Bearer tok-alice"},
        )
        assert james.status_code == alice.status_code == 201
        assert "idempotent-replayed" not in alice.headers
        assert james.json()["id"] != alice.json()["id"]
        listed = (await c.get("/api/workflow")).json()
        assert sorted(w["created_by"] for w in listed) == ["alice", "james"]


@pytest.mark.parametrize("key", ["k" * 300, ""], ids=["300-chars", "empty"])
async def test_bad_idempotency_key_is_400(client: httpx.AsyncClient, key: str) -> None:
    data = await rejected(
        client, 400, "POST", "/api/workflow", json=body(), headers={"Idempotency-Key": key}
    )
    assert "Idempotency-Key" in data["error"]


# -- validate ----------------------------------------------------------------------


async def test_validate_lists_every_problem(client: httpx.AsyncClient) -> None:
    flow = {
        "start": {"tool": "no_such_tool", "args": {}, "next": "ghost"},
        "b": {"tool": "echo", "args": [1], "done": True},
        "c": {"tool": "echo", "args": {"q": "<<input.>>"}, "next": "b", "done": True},
    }
    before = await count(client)
    resp = await client.post("/api/workflow/validate", json=body(flow))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["valid"] is False
    # start leads only to the missing "ghost": b and c are unreachable (read from the raw flow).
    assert sorted(data["warnings"]) == [
        "state 'b' is unreachable from 'start'",
        "state 'c' is unreachable from 'start'",
    ]
    errors = data["errors"]

    def has(*words: str) -> bool:
        return any(all(w in e for w in words) for e in errors)

    assert has("'start'", "no_such_tool"), errors
    assert has("'start'", "ghost"), errors
    assert has("'b'", "args"), errors
    assert has("'c'", "input."), errors
    assert has("'c'", "next", "done"), errors
    assert len(errors) >= 5
    assert await count(client) == before


async def test_validate_missing_start_is_listed(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/api/workflow/validate", json=body({"a": {"tool": "echo", "done": True}})
    )
    assert resp.json() == {"valid": False, "errors": [MISSING_START], "warnings": []}


async def test_validate_warns_about_unreachable_state(client: httpx.AsyncClient) -> None:
    flow = {**ECHO_FLOW, "island": {"tool": "echo", "args": {}, "done": True}}
    before = await count(client)
    resp = await client.post("/api/workflow/validate", json=body(flow))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["valid"] is True and data["errors"] == []
    assert len(data["warnings"]) == 1 and "island" in data["warnings"][0]
    assert await count(client) == before


async def test_validate_accepts_valid_reference_example(client: httpx.AsyncClient) -> None:
    flow = {
        "start": {"name": "greet", "tool": "get_greeting", "args": {}, "next": "count"},
        "count": {"name": "count", "tool": "get_counter", "args": {}, "done": True},
    }
    resp = await client.post("/api/workflow/validate", json={"name": "my", "flow": flow})
    assert resp.json() == {"valid": True, "errors": [], "warnings": []}


@pytest.mark.parametrize(
    "shape",
    [[1] * 1_200_000, {f"k{i}": 1 for i in range(350_000)}],
    ids=["integers", "keys"],
)
async def test_a_large_body_is_checked_off_the_event_loop(make_client, shape) -> None:
    # The duplicate-key and 64-bit checks call Python for each item: about 100 ms per
    # megabyte of small items, which must not hold every other request. Checked on the loop,
    # the longest stall was the check plus the rest of the request (237 and 417 ms); in a
    # thread it is the rest alone (23-36 and 91-104 ms: storing the input, freeing the body).
    # The bound is the check's own time, measured here in the same run, so that a loaded
    # machine slows both sides alike; the garbage collector is kept out of both, as it walks
    # the whole test process's heap here where the daemon freezes its start-up objects.
    client, _ = await make_client(max_body_bytes=4 * 2**20)
    body = orjson.dumps({"name": "b", "input": {"x": shape},
                         "flow": {"start": {"tool": None, "done": True}}})  # fmt: skip
    gc.collect()
    gc.disable()
    try:
        checks = []
        for _ in range(3):
            began = time.perf_counter()
            bodies.parse_json(body)
            checks.append(time.perf_counter() - began)
        check = sorted(checks)[1]
        async with Watch() as watch:
            resp = await client.post("/api/workflow", content=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    finally:
        gc.enable()
    assert resp.status_code == 201, resp.text
    assert watch.lag < check, (
        f"the event loop stalled {watch.lag * 1000:.0f} ms; the check takes {check * 1000:.0f} ms"
    )


async def test_bodies_being_received_are_bounded_together(make_client) -> None:
    # Clients that stall near the end of a large body: each is within max_body_bytes, and
    # together they may hold at most BODIES_IN_MEMORY of them; the next one is a 503.
    client, app = await make_client(max_body_bytes=10_000)
    release = asyncio.Event()

    async def stalling() -> Any:
        yield b'{"name": "x", "pad": "' + b"p" * 9_900  # 9,922 bytes of the 10,000
        await release.wait()
        yield b'", "flow": {"start": {"tool": "echo", "done": true}}}'

    headers = {"Content-Type": "application/json"}
    held = [asyncio.create_task(client.post("/api/workflow", content=stalling(), headers=headers))
            for _ in range(bodies.BODIES_IN_MEMORY)]  # fmt: skip
    while app.state.body_bytes < bodies.BODIES_IN_MEMORY * 9_922:
        await asyncio.sleep(0.01)
    over = await client.post("/api/workflow", content=stalling(), headers=headers)
    assert over.status_code == 503, over.text
    assert "retry later" in over.json()["error"]
    release.set()
    assert {(await t).status_code for t in held} == {422}  # "pad" is no field: all were read
    assert app.state.body_bytes == 0
