"""Property-based fuzzing of the running app from its own OpenAPI document (schemathesis).

Every documented operation gets deterministic positive and negative examples (plus
schemathesis' coverage cases: boundaries, missing and wrong-typed parts, a bad or no
token, unexpected methods) against the real app on a fresh SQLite file. Every answer must
not be a 5xx, and must have a documented status code, content type, headers and body.
Run with -s to see how many requests each operation got and what it answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks
from schemathesis.core import NotSet
from schemathesis.python import asgi

from daemon import catalog, openapi
from daemon.api import create_app
from daemon.notify import sign
from daemon.tools import build_registry
from tests.helpers import TOKENS, make_config
from tests.test_openapi import HOLD_FLOWS, hold, serving
from tests.test_reference import APPROVAL, LINEAR

# Examples per operation in the fuzzing phase; the coverage phase adds its own cases. The
# default keeps the file at ~10 s; raise it for a deeper search: STEPD_FUZZ_EXAMPLES=1000.
MAX_EXAMPLES = int(os.environ.get("STEPD_FUZZ_EXAMPLES", "30"))
TOKEN = TOKENS["james"][0]  # "workflow" permission: every route
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all"},  # positive and negative examples
        "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    }
)
# Explicitly chosen. Left out: positive_data_acceptance (a schema-valid flow can still be
# invalid as a graph: unknown tool, missing state, so 422 is right) and
# negative_data_rejection (/validate answers 200 {"valid": false} for an invalid workflow
# by design, and the JSON Schema cannot say "no NUL characters" everywhere);
# ignored_auth, use_after_free and the like need the whole run's state, which the per-item
# apps below do not share.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]

# The tools of the app under test (see the app fixture): the document names them.
DOCUMENT = openapi.document([*build_registry(make_config(Path(".")).tool_modules).names(), "hold"])
# Fuzzed from the document the app serves (the fixture checks they are equal), loaded
# without starting an app at collection time.
# Event streams never end by themselves (/api/events) or end only with their workflow:
# tests/test_events.py covers them with real streams.
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).exclude(
    operation_id=[
        "streamWorkflowEvents",
        "streamEvents",
        "streamRunEvents",
        "executeDefinitionStream",
    ]
)
GET_WORKFLOW = schema["/api/workflow/{id}"]["GET"]


def gate_flow(branch: list[dict[str, str]] | None) -> dict[str, Any]:
    after = {"tool": "echo", "args": {"got": "<<steps.start.result>>"}, "done": True}
    start = {"tool": None, **({"branch": branch} if branch else {"next": "yes"})}
    return {"start": start, "yes": after, "no": after}


# Workflows the app under test starts with, beside the HOLD_FLOWS: gates whose fuzzed
# `ready` bodies meet branch conditions, a completed workflow.
SEEDS = [
    LINEAR,
    APPROVAL,
    {"name": "gate", "flow": gate_flow(None)},
    {"name": "gate-if", "flow": gate_flow([{"if": "result.ok", "then": "yes"}, {"else": "no"}])},
    {"name": "gate-cmp", "flow": gate_flow([{"if": "result > 3", "then": "yes"}])},
    {"name": "gate-in", "flow": gate_flow([{"if": "'a' in result", "then": "yes"}])},
    {"name": "gate-len", "flow": gate_flow([{"if": "result | length > 1", "then": "no"}])},
]


# Saved definitions the app under test starts with: one with an input_schema, two versions
# and a persistent webhook (fuzzed /hooks calls are signed with its secret), one whose
# concurrency of 1 keeps a run waiting at a gate and one queued (deployed, single mode: it
# can be armed), one in the DAG shape.
HOOKED = {
    "name": "fuzz-echo",
    "description": "echo the input",
    "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}},
    "tags": ["fuzz"],
    "webhook": {"mode": "persistent"},
    "flow": {"start": {"tool": "echo", "args": {"who": "<<input.who>>"}, "done": True}},
}
SEED_DEFINITIONS = [
    HOOKED,
    {"name": "fuzz-gated", "concurrency": 1, "flow": {"start": {"tool": None, "done": True}}},
    {"name": "fuzz-dag", "steps": [{"id": "a", "tool": "echo"}, {"id": "b", "tool": "echo",
                                                                  "depends_on": ["a"]}]},
]  # fmt: skip


class Known:
    """Ids that exist in the app under test, handed out in turn."""

    def __init__(self, workflows: list[dict[str, Any]], saved: dict[str, Any]) -> None:
        self.ids: dict[str, list[Any]] = {
            "id": [wf["id"] for wf in workflows],
            "step_id": [s["id"] for wf in workflows for s in wf["steps"]],
            "ref": saved["refs"],
            "run_id": saved["runs"],
            "version": [1, 2],
            "webhook_id": [saved["webhook_id"]],
            "template_id": [t["id"] for t in catalog.list_templates()],
            "sid": saved["schedules"],
        }
        self.workflow_of = {s["id"]: wf["id"] for wf in workflows for s in wf["steps"]}
        self.secret: str = saved["webhook_secret"]
        self.turn = itertools.count()

    def next(self, name: str) -> Any:
        pool = self.ids.get(name)
        return pool[next(self.turn) % len(pool)] if pool else None


# Schedules of the seeded definitions: one fires at 09:00 on weekdays in New York (and was
# run now once, so it has a tick), one is paused with a buffer policy.
SEED_SCHEDULES = [
    ("fuzz-echo", {"cron_expression": "0 9 * * 1-5", "timezone": "America/New_York",
                   "input_data": {"who": "cron"}}),
    ("fuzz-gated", {"cron_expression": "@yearly", "overlap": "buffer_one", "paused": True}),
]  # fmt: skip


def save_definitions(client: Any) -> dict[str, Any]:
    """SEED_DEFINITIONS saved, deployed and run, and their SEED_SCHEDULES: {"refs", "runs",
    "webhook_id", "webhook_secret", "schedules" (their ids as path text)}."""
    refs: list[str] = []
    for definition in SEED_DEFINITIONS:
        resp = client.post("/api/workflows", json={"definition": definition})
        assert resp.status_code == 201, resp.text
        refs += [definition["name"], str(resp.json()["id"])]
    second = {"definition": {**HOOKED, "description": "v2"}, "change_summary": "v2"}
    assert client.put("/api/workflows/fuzz-echo", json=second).status_code == 200
    deployed = client.post("/api/workflows/fuzz-echo/deploy").json()
    assert client.post("/api/workflows/fuzz-gated/deploy").status_code == 200  # to arm
    runs = [
        client.post(f"/api/workflows/{name}/run", json={"input_data": {"who": "x"}}).json()[
            "run_id"
        ]
        for name in ("fuzz-echo", "fuzz-gated", "fuzz-gated", "fuzz-dag")
    ]
    schedules = []
    for ref, body in SEED_SCHEDULES:
        resp = client.post(f"/api/workflows/{ref}/schedules", json=body)
        assert resp.status_code == 201, resp.text
        schedules.append(str(resp.json()["schedule_id"]))
    fired = client.post(f"/api/workflows/schedules/{schedules[0]}/trigger")
    assert fired.status_code == 202, fired.text
    runs.append(fired.json()["run_id"])
    return {
        "schedules": schedules,
        "refs": refs,
        "runs": runs,
        "webhook_id": deployed["webhook_id"],
        "webhook_secret": deployed["webhook_secret"],
    }


KNOWN: list[Known] = []  # the current app's
SEEN: Counter[str] = Counter()  # "operation -> status": how many


def poll(client: Any, ids: list[int], ready: Any) -> list[dict[str, Any]]:
    for _ in range(1000):
        wfs = [client.get(f"/api/workflow/{i}").json() for i in ids]
        if all(ready(wf) for wf in wfs):
            return wfs
        time.sleep(0.01)
    raise AssertionError(f"the seeded workflows did not get there: {wfs}")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    """The real app on a fresh SQLite file, lifespan running, with SEEDS and HOLD_FLOWS in it.

    One app per operation: schemathesis' pytest plugin ends every ASGI lifespan after each
    test item, and an app is not meant to run a second lifespan. Entering schemathesis'
    ASGI client starts an app's lifespan (store open, executor polling) in schemathesis'
    event-loop thread; it runs until shutdown_lifespans().
    """
    config = make_config(tmp_path, shutdown_grace=0.0)
    registry = build_registry(config.tool_modules)
    registry.add("hold", hold, idempotent=False)
    # A first daemon stops while its `hold` steps run: they will await a decision...
    first = create_app(config, registry=registry)
    with asgi.get_client(first) as client:
        client.headers.update(AUTH)
        held = [client.post("/api/workflow", json={"name": "h", "flow": f}) for f in HOLD_FLOWS]
        held_ids = [r.json()["id"] for r in held]
        poll(client, held_ids, lambda wf: wf["steps"] and wf["steps"][0]["status"] == "running")
    asgi.shutdown_lifespans()
    # ...in the one under test, on the same database.
    application = create_app(config, registry=registry)
    with asgi.get_client(application) as client:
        client.headers.update(AUTH)
        served = client.get("/openapi.json")
        assert served.status_code == 200 and served.json() == DOCUMENT
        seeded = [client.post("/api/workflow", json=body).json()["id"] for body in SEEDS]
        saved = save_definitions(client)
        workflows = poll(client, held_ids + seeded + saved["runs"], settled)
    assert [wf["steps"][0]["awaiting"] for wf in workflows[:2]] == ["decision", "decision"]
    assert [wf["status"] for wf in workflows[-5:]] == ["completed", "running", "queued",
                                                       "completed", "completed"]  # fmt: skip
    KNOWN[:] = [Known(workflows, saved)]
    yield application
    asgi.shutdown_lifespans()


def settled(wf: dict[str, Any]) -> bool:
    """Finished, waiting for a person, or queued behind its definition's concurrency."""
    return wf.get("status", "gone") not in ("running", "paused") or any(
        s["awaiting"] for s in wf["steps"]
    )


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\nfuzz: {sum(SEEN.values())} requests, {MAX_EXAMPLES} examples per operation")
    for key, n in sorted(SEEN.items()):
        print(f"  {n:5}  {key}")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,  # and nothing replayed from earlier runs
    # One app per operation (see `app`), shared by that operation's examples on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_api(case: Any, app: Any) -> None:
    known = KNOWN[0]
    # Random ids almost never exist: every other valid one becomes an existing id, so the
    # 200 and 409 answers of get / cancel / ready / retry / fail are fuzzed too.
    # Names too: a definition's ref of even length becomes an existing name or id.
    params = case.path_parameters or {}
    for name, value in params.items():
        if (isinstance(value, int) and value % 2 == 0) or (
            isinstance(value, str) and len(value) % 2 == 0
        ):
            params[name] = known.next(name) or value
    positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
    if positive and isinstance(case.body, dict):
        for holder in (case.body, case.body.get("definition")):
            if isinstance(holder, dict) and isinstance(holder.get("flow"), dict):
                holder["flow"] = runnable(holder["flow"])
    if positive and case.path == "/hooks/{webhook_id}":
        sign_hook(case, known)
    op_id = case.operation.definition.raw.get("operationId")
    if positive and isinstance(case.body, dict) and op_id in SCHEDULE_BODIES:
        plausible_schedule(case.body, known)

    checks_ = CHECKS
    if case.operation.definition.raw.get("operationId") == "executeDefinition":
        # A run that fails is a 500 and one that outlives ?timeout= a 504, by design; the
        # fuzzer waits 2 s at most (a queued run waits for its whole timeout).
        checks_ = [c for c in CHECKS if c is not checks.not_a_server_error] + [execute_outcome]
        query = case.query if case.query is not None else {}
        timeout = query.get("timeout")
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 2:
            query["timeout"] = 2
        elif timeout is None and positive:
            query["timeout"] = 2
        case.query = query

    response = case.call_and_validate(checks=checks_, app=app)
    SEEN[f"{case.operation.label} -> {response.status_code}"] += 1

    # A change was accepted: what the executor makes of it must match the document too.
    if case.method != "GET" and response.status_code in (200, 201):
        if case.path.startswith("/api/workflows"):
            changed = params.get("run_id")  # a definition's run (cancel, resume)
        elif "step_id" in params:
            changed = known.workflow_of.get(params["step_id"])
        else:
            changed = params.get("id") or response.json().get("id")
        if changed is not None:
            with asgi.get_client(app) as client:
                poll_until = time.monotonic() + 1.0
                while not settled(client.get(f"/api/workflow/{changed}", headers=AUTH).json()):
                    if time.monotonic() > poll_until:
                        break  # e.g. a `hold` step runs again after a retry
                    time.sleep(0.005)
            after = GET_WORKFLOW.Case(path_parameters={"id": changed})
            got = after.call_and_validate(checks=CHECKS, app=app, headers=AUTH)
            SEEN[f"{GET_WORKFLOW.label} (after a change) -> {got.status_code}"] += 1


# Generated cron expressions and zone names are almost never valid: every other one (of
# even length) becomes one of these, so that schedules are made and edited too.
CRONS = ["0 9 * * 1-5", "@hourly", "0 0 L * *", "*/15 * * * *", "0 0 * * 1#2", "30 2 * * 0"]
ZONES = ["UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kathmandu"]
SCHEDULE_BODIES = {"createSchedule", "updateSchedule", "createRecurring"}


def plausible_schedule(body: dict[str, Any], known: Known) -> None:
    turn = next(known.turn)
    for key, pool in (("cron_expression", CRONS), ("timezone", ZONES)):
        value = body.get(key)
        if isinstance(value, str) and len(value) % 2 == 0:
            body[key] = pool[turn % len(pool)]
    for key in ("workflow", "workflow_id"):  # recurring: the definition
        value = body.get(key)
        if isinstance(value, str | int) and len(str(value)) % 2 == 0:
            body[key] = known.next("ref")


def execute_outcome(ctx: Any, response: Any, case: Any) -> None:
    """An execute's 5xx is the run's outcome: 500 EXECUTION_FAILED or 504
    EXECUTION_TIMEOUT, with the run's id."""
    if response.status_code >= 500:
        codes = {500: "EXECUTION_FAILED", 504: "EXECUTION_TIMEOUT"}
        body = response.json()
        assert response.status_code in codes, response.status_code
        assert body.get("error_code") == codes[response.status_code], body
        assert isinstance(body.get("run_id"), int), body


def sign_hook(case: Any, known: Known) -> None:
    """A positive /hooks call goes to the seeded webhook, signed with its secret: the body
    as the bytes sent, a timestamp of now. Nothing else is changed (the fuzzer's
    Idempotency-Key stays)."""
    case.path_parameters["webhook_id"] = known.ids["webhook_id"][0]
    if isinstance(case.body, NotSet):
        raw = b""
    else:
        raw = json.dumps(case.body, allow_nan=False).encode()
    case.body = raw
    ts = int(time.time())
    headers = case.headers if case.headers is not None else {}
    headers["X-Stepd-Timestamp"] = str(ts)
    headers["X-Stepd-Signature"] = sign(known.secret.encode(), ts, raw)
    headers["Content-Type"] = "application/json"
    case.headers = headers


def runnable(flow: dict[str, Any]) -> dict[str, Any]:
    """A generated flow with fewer reasons for a 422, so that fuzzed workflows also run.

    Tools become `echo` (it takes any arguments), transitions lead to an added final state,
    and branch conditions become a valid expression; the rest (state ids, names, arguments,
    timeouts, retries, gates, extra states) stays as generated.
    """
    out: dict[str, Any] = {}
    for sid, state in flow.items():
        if isinstance(state, dict):
            state = dict(state)
            if isinstance(state.get("tool"), str):
                state["tool"] = "echo"
            for key in ("next", "on_error"):
                if key in state:
                    state[key] = "fuzz_end"
            if isinstance(state.get("branch"), list):
                state["branch"] = [{"if": "result is mapping", "then": "fuzz_end"}] * len(
                    state["branch"]
                )
        out[sid] = state
    out["fuzz_end"] = {"tool": "echo", "args": {}, "done": True}
    return out


# -- hostile bodies for the schedule routes ------------------------------------------------
# Chosen by hand beside the generated ones: wrong types, huge strings, deep nesting, odd
# ISO 8601 times, zone names that are paths or carry a NUL, cron strings with other digits
# and Quartz letters. Whatever the answer, it is never a 5xx, a 4xx is a JSON {"error"},
# and each comes within a few seconds; a schedule accepted that way reads back and lists.


def nested(depth: int) -> Any:
    """A list `depth` deep; past what json.dumps recurses into, a marker dump() expands."""
    if depth > 500:
        return f"\x01deep {depth}\x01"
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def dump(body: Any) -> bytes:
    text = json.dumps(body)
    for depth in (5000,):
        text = text.replace(json.dumps(nested(depth)), "[" * depth + "]" * depth)
    return text.encode()


WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 1.5, -0.0, 2**63 - 1, "", " ", "x" * 100_000,
                          "\u202e", [], ["skip"], {}, {"a": {"b": [1]}}, nested(60),
                          nested(5000)]  # fmt: skip
HOSTILE_CRONS = [
    "L * * * *", "0 0 L * *", "0 0 LW * *", "0 0 15W * *", "0 0 W * *", "0 0 * * 5L",
    "0 0 * * L", "0 0 * * 1#2", "0 0 * * 1#6", "0 0 * * 0#5", "0 0 ? * *", "0 0 * * ?",
    "0 0 ? * ?", "0 0 L-3 * *", "0 0 1-L * *", "0 0 30 2 *", "0 0 31 2 *", "0 0 30 2 1#5",
    "٣ * * * *", "１ * * * *", "𝟏 * * * *", "¹ * * * *", "Ⅻ * * * *", "0 ۹ * * *",
    "\u2003*\u2003* * * *", "*\u00a0* * * *", "* * * * *\u0085", "*\u200b* * * *",
    ",".join(str(i) for i in range(60)) + " * * * *",  # over 200 characters
    ",".join(str(i) for i in range(50)) + " * * * *",  # under
    ",".join(["1"] * 99) + " * * * *", "1-59/1,1-59/2,1-59/3 * * * *",
    "*/0 * * * *", "0-59/0 * * * *", "*/99999999999999999999 * * * *", "-1 * * * *",
    "59-1 * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *", "* * * 13 *",
    "* * * * 8", "* * * * * * *", "* * * *", "* * * * * *", "@reboot", "@every 1s",
    "@HOURLY", "@", "@@daily", "0 0 1 1 * 2099", "* * * JAN-DEC SUN-SAT", "* * * jan mon",
    "% * * * *", "$(reboot) * * * *", "* * * * *;", "*/1-5 * * * *", "1--5 * * * *",
]  # fmt: skip
HOSTILE_ZONES = [
    "/etc/localtime", "UTC\x00", "UTC\u0000x", "Europe/../../etc/passwd", "../../../../etc/passwd",
    "/usr/share/zoneinfo/UTC", "Europe/Paris/", "Europe//Paris", "./UTC", "UTC/", "utc",
    "Utc", " UTC", "UTC ", "UTC\n", "Etc/GMT+15", "GMT+5", "+05:00", "Z", "\u202eUTC",
    "Ｕ Ｔ Ｃ", "right/UTC", "posix/UTC", "zone.tab", "tzdata.zi", "Europe/" + "x" * 10_000,
    "America/Argentina/ComodRivadavia", "Antarctica/Troll", "Pacific/Kiritimati",
    "Australia/Lord_Howe", "Asia/Kathmandu", "America/St_Johns", "EST5EDT", "Factory",
]  # fmt: skip
HOSTILE_TIMES = [
    "", "Z", "NaN", "now", "x" * 64, "x" * 65, "2020-01-01", "2020-01-01T00:00:00",
    "2020-02-30T00:00:00Z", "2020-13-01T00:00:00Z", "2020-01-01T24:00:00Z",
    "2020-01-01T23:59:60Z", "2020-01-01T00:00:00+99:99", "2020-01-01T00:00:00+24:00",
    "2020-01-01T00:00:00+23:59", "2020-01-01T00:00:00-23:59", "2020-01-01T00:00:00-00:00",
    "2020-01-01T00:00:00+00:00:30.5", "20200101T000000Z", "2020-001T00:00:00Z",
    "2020-W01-1T00:00:00Z", "2020-01-01T00:00:00.1234567890123Z", " 2020-01-01T00:00:00Z",
    "2020-01-01T00:00:00Z\n", "2020-01-01T00:00:00\u00a0Z", "２０２０-01-01T00:00:00Z",
    "2020-01-01t00:00:00z", "2020-01-01 00:00:00Z", "2020-01-01T00:00:00ZZ",
    "9999-12-31T23:59:59.999999+00:00", "9999-12-31T23:59:59-23:59", "1970-01-01T00:00:00Z",
    "1969-12-31T23:59:59.999999Z", "0002-01-01T00:00:00Z", "0002-01-01T00:00:00-23:59",
    "2019-12-31T23:00:00-01:00",
    # A start in year 1 answers 500 for now: tests/test_schedules_edge.py.
]  # fmt: skip
FIELDS = ("cron_expression", "timezone", "input_data", "overlap", "catchup_window", "paused")
SAFE = {"cron_expression": "0 0 1 1 *", "paused": True}  # a valid schedule that never fires


def schedule_bodies() -> list[Any]:
    """Create and edit bodies: each field with each wrong type, hostile crons and zones,
    and odd bodies."""
    out: list[Any] = [{**SAFE, key: value} for key in FIELDS for value in WRONG_TYPES]
    out += [{**SAFE, "cron_expression": expr} for expr in HOSTILE_CRONS]
    out += [{**SAFE, "timezone": zone} for zone in HOSTILE_ZONES]
    out += [{**SAFE, "catchup_window": n} for n in (31_622_401, 10**18, 1e300, "60", 60.0)]
    out += [{**SAFE, "overlap": o} for o in ("SKIP", "skip ", "buffer", "none", "cancel-other")]
    out += [
        [], "x", 0, None, nested(100),
        {**SAFE, "k" * 100_000: 1},
        {**SAFE, **{f"extra{i}": i for i in range(5000)}},
        {**SAFE, "input_data": {"who": "x" * 500_000}},
        {**SAFE, "input_data": {"who": "x" * 2_000_000}},  # over max_body_bytes
        {**SAFE, "input_data": {str(i): nested(3) for i in range(10_000)}},
    ]  # fmt: skip
    return out


def backfill_bodies() -> list[Any]:
    start, end = "2019-06-01T00:00:00Z", "2020-06-01T00:00:00+02:00"
    out: list[Any] = [{"start": t, "end": end} for t in HOSTILE_TIMES]
    out += [{"start": start, "end": t} for t in HOSTILE_TIMES]
    out += [{"start": value, "end": end} for value in WRONG_TYPES]
    out += [{"start": start, "end": value} for value in WRONG_TYPES]
    out += [{"start": start, "end": end, "overlap": value} for value in WRONG_TYPES]
    out += [[], "x", 1, None, {}, {"start": start}, {"end": end}, {"start": start, "end": end,
            "x": 1}, {"start": end, "end": start}, {"start": start, "end": start}]  # fmt: skip
    return out


async def test_schedule_routes_take_hostile_bodies(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    failures: list[str] = []
    seen: Counter[str] = Counter()
    async with serving(config, build_registry(config.tool_modules)) as client:

        async def send(method: str, path: str, body: Any = None, **kw: Any) -> Any:
            if body is not None or method in ("POST", "PATCH"):
                kw.setdefault("content", dump(body))
                kw.setdefault("headers", {"Content-Type": "application/json"})
            what = f"{method} {path} {kw.get('content', b'')[:200]!r}"
            try:
                resp = await asyncio.wait_for(client.request(method, path, **kw), 10)
            except TimeoutError:
                failures.append(f"no answer within 10 s: {what}")
                return None
            except Exception as exc:  # noqa: BLE001 - an unhandled error is a 500
                failures.append(f"raised {type(exc).__name__}: {exc}: {what}")
                return None
            seen[f"{method} {path.split('/')[3]} -> {resp.status_code}"] += 1
            if resp.status_code >= 500:
                failures.append(f"{resp.status_code} {resp.text[:200]}: {what}")
            elif resp.status_code >= 400:
                try:
                    answer = resp.json()
                except ValueError:
                    answer = None
                error = answer.get("error") if isinstance(answer, dict) else None
                if not (resp.headers["content-type"].startswith("application/json")
                        and isinstance(error, str) and error):  # fmt: skip
                    failures.append(f"{resp.status_code} without a JSON error: {what}")
            return resp

        made = await client.post("/api/workflows", json={"definition": {
            "name": "hostile", "input_schema": {"type": "object"},
            "flow": {"start": {"tool": "echo", "done": True}}}})  # fmt: skip
        assert made.status_code == 201, made.text
        resp = await client.post("/api/workflows/hostile/schedules", json=SAFE)
        assert resp.status_code == 201, resp.text
        sid = resp.json()["schedule_id"]
        one = f"/api/workflows/schedules/{sid}"

        async def reads_back(new_sid: Any) -> None:
            one_ = f"/api/workflows/schedules/{new_sid}"
            paths = [one_, f"{one_}/ticks", "/api/workflows/hostile/schedules",
                     "/api/workflows/recurring"]  # fmt: skip
            for path in paths:
                got = await send("GET", path)
                if got is not None and got.status_code != 200:
                    failures.append(f"accepted, then GET {path} -> {got.status_code}")

        for body in schedule_bodies():
            for method, path, extra in (
                ("POST", "/api/workflows/hostile/schedules", {}),
                ("POST", "/api/workflows/recurring", {"workflow": "hostile"}),
                ("PATCH", one, {}),
            ):
                sent = {**body, **extra} if isinstance(body, dict) else body
                resp = await send(method, path, sent)
                if resp is None or resp.status_code >= 300:
                    continue
                if method == "POST":  # a hostile body accepted: it reads back, then goes
                    new_sid = resp.json()["schedule_id"]
                    await reads_back(new_sid)
                    await send("DELETE", f"/api/workflows/schedules/{new_sid}")
                else:
                    await reads_back(sid)
                    await send("PATCH", one, {**SAFE, "timezone": "UTC", "input_data": {}})
        for who in WRONG_TYPES + ["", "x" * 100_000, "hostile/..", "HOSTILE", " hostile"]:
            await send("POST", "/api/workflows/recurring", {**SAFE, "workflow": who})
            await send("POST", "/api/workflows/recurring", {**SAFE, "workflow_id": who})
        for body in backfill_bodies():
            await send("POST", f"{one}/backfill", body)
        for body in ([], "x", 0, {"a": 1}, nested(100), {"": None}):
            await send("POST", f"{one}/trigger", body)
        for raw in (b"\xff\xfe", b'{"cron_expression": "\\ud800"}', b"{" * 100_000,
                    b'{"cron_expression": "0 0 1 1 *"' + b", " * 3 + b"}", b"1e999"):  # fmt: skip
            for method, path in (("POST", "/api/workflows/hostile/schedules"),
                                 ("PATCH", one), ("POST", f"{one}/backfill"),
                                 ("POST", f"{one}/trigger")):  # fmt: skip
                await send(method, path, content=raw,
                           headers={"Content-Type": "application/json"})  # fmt: skip
        # Still answering, and the seeded schedule is what it was.
        assert (await client.get("/healthz")).status_code == 200
        got = await send("GET", one)
        assert got is not None and got.status_code == 200, got
        kept = {k: got.json()[k] for k in ("cron_expression", "timezone", "paused")}
        assert kept == {**SAFE, "timezone": "UTC"}
    print(f"\nhostile schedule bodies: {sum(seen.values())} requests")
    for key, n in sorted(seen.items()):
        print(f"  {n:5}  {key}")
    assert not failures, "\n".join(failures)
