"""The flow's JSON Schema agrees with the parser, and is served.

Anti-drift: every flow below, and random ones, goes through both the schema (the
`jsonschema` library) and daemon.flow.parse. A flow the schema rejects is a structural
problem, which the parser must reject too; a flow the parser rejects must be rejected by
the schema, unless its problem is one the schema does not describe (listed in
SEMANTIC: a transition to a state that does not exist, expressions and the names they
read, loops that never reach done, unknown tools and their arguments, `else` before the
last case, the configured limits). Tool names are not
checked here (parse without a registry): they are outside the schema.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from daemon import flowcheck, flowschema, openapi
from daemon.flow import parse
from tests.helpers import auth
from tests.test_flow import INVALID, REFERENCE_FLOWS

SCHEMA = flowschema.document()
FLOWS = jsonschema.Draft202012Validator(SCHEMA)
BODIES = jsonschema.Draft202012Validator(flowschema.submission())

# test_flow.INVALID rows whose problem is outside the schema.
SEMANTIC = {
    "next-unknown", "next-unknown-in-second-state", "branch-then-unknown",
    "branch-else-unknown", "on-error-unknown", "else-not-last", "template-syntax-error",
    "template-syntax-error-braces", "template-empty", "template-unsafe-attribute",
    "condition-syntax-error", "condition-unsafe-attribute", "condition-unsafe-item",
}  # fmt: skip


def parser_has_new_kinds() -> bool:
    return parse({"start": {"wait": {"seconds": 5}, "done": True}}).errors == []


NEW_KINDS = pytest.mark.skipif(
    not parser_has_new_kinds(), reason="the parser does not know parallel/map/wait yet"
)

END = {"tool": "x", "done": True}

# (id, flow): valid in both.
VALID: list[tuple[str, dict[str, Any]]] = [
    *((f"reference-{k}", v) for k, v in REFERENCE_FLOWS.items()),
    ("gate-approvers", {"start": {"tool": None, "approvers": ["ops"], "allow_self_approval": False,
                                  "timeout": 60, "on_error": "end", "next": "end"}, "end": END}),
    ("nulls", {"start": {"tool": "x", "args": None, "timeout": None, "retry": None,
                         "on_error": None, "done": True}}),
    ("retry-full", {"start": {"tool": "x", "retry": {"max_attempts": 5, "backoff_s": 0.5,
                              "backoff_factor": 3, "max_backoff_s": 60}, "done": True}}),
    ("branch-else", {"start": {"tool": "x", "branch": [{"if": "result", "then": "end"},
                                                       {"else": "start"}]}, "end": END}),
]  # fmt: skip
VALID_NEW: list[tuple[str, dict[str, Any]]] = [
    ("parallel", {"start": {"parallel": {
        "geo": {"start": {"tool": "geocode", "args": {"q": "<<input.addr>>"}, "done": True}},
        "crm": {"start": {"tool": "crm", "args": {}, "done": True}}}, "next": "end"},
        "end": END}),
    ("parallel-all-settled", {"start": {"parallel": {"a": {"start": END}}, "join": "all_settled",
                                        "timeout": 30, "done": True}}),
    ("map", {"start": {"map": {"items": "<<input.users>>", "as": "user", "max_concurrency": 5,
                               "tolerated_failures": 1,
                               "flow": {"start": {"tool": "send", "args": {"to": "<<user.email>>"},
                                                  "done": True}}}, "next": "end"}, "end": END}),
    ("map-literal", {"start": {"map": {"items": [1, 2], "flow": {"start": END}}, "done": True}}),
    ("wait-seconds", {"start": {"wait": {"seconds": 3600}, "next": "end"}, "end": END}),
    ("wait-zero", {"start": {"wait": {"seconds": 0, "timeout": None}, "done": True}}),
    ("wait-until-float-ms", {"start": {"wait": {"until": 1893456000000.5}, "done": True}}),
    ("wait-until-expr", {"start": {"wait": {"until": "<<input.deadline>>"}, "done": True}}),
    ("wait-until-iso", {"start": {"wait": {"until": "2030-01-01T00:00:00Z"}, "done": True}}),
    ("wait-until-ms", {"start": {"wait": {"until": 1893456000000}, "done": True}}),
    ("wait-signal", {"start": {"wait": {"signal": "payment.settled", "timeout": 86400},
                               "on_error": "end", "retry": {"max_attempts": 2}, "next": "end"},
                     "end": END}),
    ("nested", {"start": {"parallel": {"a": {"start": {"map": {"items": [1], "flow": {
        "start": {"wait": {"seconds": 1}, "done": True}}}, "done": True}}}, "done": True}}),
    ("call", {"start": {"call": {"workflow": "kyc", "version": 3,
                                 "input": {"who": "<<input.who>>", "n": 1}},
                        "timeout": 60, "retry": {"max_attempts": 2}, "on_error": "end",
                        "next": "end"}, "end": END}),
    ("call-by-id", {"start": {"call": {"workflow": 1733239000000}, "done": True}}),
    ("call-input-placeholder", {"start": {"call": {"workflow": "kyc", "input": "<<input>>"},
                                          "done": True}}),
    ("call-nulls", {"start": {"call": {"workflow": "kyc", "version": None, "input": None},
                              "done": True}}),
    ("call-in-map", {"start": {"map": {"items": "<<input.people>>", "as": "person", "flow": {
        "start": {"call": {"workflow": "kyc", "input": {"p": "<<person>>"}}, "done": True}}},
        "done": True}}),
]  # fmt: skip

# (id, flow): structurally invalid: both reject.
INVALID_MORE: list[tuple[str, dict[str, Any]]] = [
    ("gate-retry", {"start": {"tool": None, "retry": {"max_attempts": 2}, "done": True}}),
    ("gate-retry-null", {"start": {"tool": None, "retry": None, "done": True}}),
    ("tool-approvers", {"start": {"tool": "x", "approvers": ["a"], "done": True}}),
    ("tool-approvers-null", {"start": {"tool": "x", "approvers": None, "done": True}}),
    ("tool-self-approval", {"start": {"tool": "x", "allow_self_approval": True, "done": True}}),
    ("approvers-empty", {"start": {"tool": None, "approvers": [], "done": True}}),
    ("approvers-blank", {"start": {"tool": None, "approvers": [""], "done": True}}),
    ("self-approval-string", {"start": {"tool": None, "allow_self_approval": "no", "done": True}}),
    ("timeout-over-a-year", {"start": {"tool": "x", "timeout": 366 * 86400 + 1, "done": True}}),
    ("next-null", {"start": {"tool": "x", "next": None}}),
    ("branch-then-int", {"start": {"tool": "x", "branch": [{"if": "result", "then": 1}]}}),
    ("start-missing", {"a": END}),
    ("empty", {}),
]  # fmt: skip
INVALID_NEW: list[tuple[str, dict[str, Any]]] = [
    ("tool-and-wait", {"start": {"tool": "x", "wait": {"seconds": 1}, "done": True}}),
    ("parallel-and-map", {"start": {"parallel": {"a": {"start": END}},
                                    "map": {"items": [], "flow": {"start": END}}, "done": True}}),
    ("parallel-empty", {"start": {"parallel": {}, "done": True}}),
    ("parallel-branch-without-start", {"start": {"parallel": {"a": {"x": END}}, "done": True}}),
    ("parallel-branch-bad-state", {"start": {"parallel": {"a": {"start": {"tool": "x"}}},
                                             "done": True}}),
    ("parallel-args", {"start": {"parallel": {"a": {"start": END}}, "args": {}, "done": True}}),
    ("join-unknown", {"start": {"parallel": {"a": {"start": END}}, "join": "any",
                                "done": True}}),
    ("join-on-tool", {"start": {"tool": "x", "join": "all_settled", "done": True}}),
    ("map-no-flow", {"start": {"map": {"items": [1]}, "done": True}}),
    ("map-no-items", {"start": {"map": {"flow": {"start": END}}, "done": True}}),
    ("map-items-int", {"start": {"map": {"items": 3, "flow": {"start": END}}, "done": True}}),
    ("map-concurrency-zero", {"start": {"map": {"items": [1], "max_concurrency": 0,
                                                "flow": {"start": END}}, "done": True}}),
    ("map-tolerated-negative", {"start": {"map": {"items": [1], "tolerated_failures": -1,
                                                  "flow": {"start": END}}, "done": True}}),
    ("map-as-input", {"start": {"map": {"items": [1], "as": "input", "flow": {"start": END}},
                                "done": True}}),
    ("map-unknown-field", {"start": {"map": {"items": [1], "flow": {"start": END}, "each": 1},
                                     "done": True}}),
    ("map-flow-without-start", {"start": {"map": {"items": [1], "flow": {"a": END}},
                                          "done": True}}),
    ("wait-empty", {"start": {"wait": {}, "done": True}}),
    ("wait-seconds-and-signal", {"start": {"wait": {"seconds": 1, "signal": "s"}, "done": True}}),
    ("wait-seconds-negative", {"start": {"wait": {"seconds": -1}, "done": True}}),
    ("wait-seconds-string", {"start": {"wait": {"seconds": "1"}, "done": True}}),
    ("wait-signal-empty", {"start": {"wait": {"signal": ""}, "done": True}}),
    ("wait-until-bool", {"start": {"wait": {"until": True}, "done": True}}),
    ("wait-args", {"start": {"wait": {"seconds": 1}, "args": {}, "done": True}}),
    ("wait-approvers", {"start": {"wait": {"seconds": 1}, "approvers": ["a"], "done": True}}),
    ("wait-no-transition", {"start": {"wait": {"seconds": 1}}}),
    ("wait-seconds-with-timeout", {"start": {"wait": {"seconds": 1, "timeout": 5}, "done": True}}),
    ("wait-signal-too-long", {"start": {"wait": {"signal": "s" * 201}, "done": True}}),
    ("map-items-two-placeholders", {"start": {"map": {"items": "<<a>> <<b>>",
                                                      "flow": {"start": END}}, "done": True}}),
    ("map-items-plain-text", {"start": {"map": {"items": "users", "flow": {"start": END}},
                                        "done": True}}),
    ("map-concurrency-too-high", {"start": {"map": {"items": [1], "max_concurrency": 1001,
                                                    "flow": {"start": END}}, "done": True}}),
    ("parallel-branch-empty", {"start": {"parallel": {"a": {}}, "done": True}}),
    ("parallel-list", {"start": {"parallel": [{"start": END}], "done": True}}),
    ("call-string", {"start": {"call": "kyc", "done": True}}),
    ("call-no-workflow", {"start": {"call": {"input": {}}, "done": True}}),
    ("call-workflow-empty", {"start": {"call": {"workflow": ""}, "done": True}}),
    ("call-workflow-too-long", {"start": {"call": {"workflow": "k" * 201}, "done": True}}),
    ("call-workflow-zero", {"start": {"call": {"workflow": 0}, "done": True}}),
    ("call-workflow-bool", {"start": {"call": {"workflow": True}, "done": True}}),
    ("call-workflow-list", {"start": {"call": {"workflow": ["kyc"]}, "done": True}}),
    ("call-version-zero", {"start": {"call": {"workflow": "k", "version": 0}, "done": True}}),
    ("call-version-string", {"start": {"call": {"workflow": "k", "version": "3"},
                                       "done": True}}),
    ("call-version-bool", {"start": {"call": {"workflow": "k", "version": True}, "done": True}}),
    ("call-input-list", {"start": {"call": {"workflow": "k", "input": [1]}, "done": True}}),
    ("call-input-text", {"start": {"call": {"workflow": "k", "input": "who"}, "done": True}}),
    ("call-input-two-placeholders", {"start": {"call": {"workflow": "k",
                                                        "input": "<<a>> <<b>>"}, "done": True}}),
    ("call-unknown-field", {"start": {"call": {"workflow": "k", "args": {}}, "done": True}}),
    ("call-and-tool", {"start": {"call": {"workflow": "k"}, "tool": "x", "done": True}}),
    ("call-and-wait", {"start": {"call": {"workflow": "k"}, "wait": {"seconds": 1},
                                 "done": True}}),
    ("call-args", {"start": {"call": {"workflow": "k"}, "args": {}, "done": True}}),
    ("call-join", {"start": {"call": {"workflow": "k"}, "join": "all_settled", "done": True}}),
    ("call-approvers", {"start": {"call": {"workflow": "k"}, "approvers": ["a"], "done": True}}),
    ("call-no-transition", {"start": {"call": {"workflow": "k"}}}),
]  # fmt: skip


def schema_ok(raw: Any) -> bool:
    return FLOWS.is_valid(raw)


def parser_ok(raw: Any) -> bool:
    return parse(copy.deepcopy(raw)).errors == []


def test_the_schema_is_a_valid_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(flowschema.submission())
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("raw", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_flows_are_valid_in_both(raw: dict[str, Any]) -> None:
    assert schema_ok(raw), list(FLOWS.iter_errors(raw))
    assert parser_ok(raw), parse(raw).errors


@NEW_KINDS
@pytest.mark.parametrize("raw", [c[1] for c in VALID_NEW], ids=[c[0] for c in VALID_NEW])
def test_valid_new_kinds_are_valid_in_both(raw: dict[str, Any]) -> None:
    assert schema_ok(raw), list(FLOWS.iter_errors(raw))
    assert parser_ok(raw), parse(raw).errors


@pytest.mark.parametrize("raw", [c[1] for c in VALID_NEW], ids=[c[0] for c in VALID_NEW])
def test_the_schema_accepts_the_new_kinds(raw: dict[str, Any]) -> None:
    assert schema_ok(raw), list(FLOWS.iter_errors(raw))


TABLE = [(c[0], c[1]) for c in INVALID] + INVALID_MORE


@pytest.mark.parametrize("raw", [c[1] for c in TABLE], ids=[c[0] for c in TABLE])
def test_invalid_flows_agree(request: pytest.FixtureRequest, raw: dict[str, Any]) -> None:
    name = request.node.callspec.id
    assert not parser_ok(raw)
    assert schema_ok(raw) == (name in SEMANTIC)


@NEW_KINDS
@pytest.mark.parametrize("raw", [c[1] for c in INVALID_NEW], ids=[c[0] for c in INVALID_NEW])
def test_invalid_new_kinds_agree(raw: dict[str, Any]) -> None:
    assert not schema_ok(raw)
    assert not parser_ok(raw), "the parser accepted what the schema refuses"


@pytest.mark.parametrize("raw", [c[1] for c in INVALID_NEW], ids=[c[0] for c in INVALID_NEW])
def test_the_schema_refuses_malformed_new_kinds(raw: dict[str, Any]) -> None:
    assert not schema_ok(raw)


@NEW_KINDS
def test_wait_seconds_null_is_refused_by_both() -> None:
    raw = {"start": {"wait": {"seconds": None}, "done": True}}
    assert not schema_ok(raw)
    assert not parser_ok(raw)


# -- random flows: the two agree on structure ----------------------------------------------

IDS = ["start", "a", "b"]
VALUES = st.sampled_from([None, True, False, 0, 1, -1, 2.5, 101, "", "a", "start", [], ["a"],
                          [""], {}, {"a": 1}, 366 * 86400 + 1])  # fmt: skip
TARGET = st.sampled_from(IDS) | VALUES
CASE = st.one_of(
    st.fixed_dictionaries({"if": st.sampled_from(["result", "result.ok"]) | VALUES,
                           "then": TARGET}),
    st.fixed_dictionaries({"else": TARGET}),
    st.dictionaries(st.sampled_from(["if", "then", "else"]), TARGET, max_size=3),
    VALUES,
)  # fmt: skip
RETRY = (
    st.dictionaries(
        st.sampled_from(["max_attempts", "backoff_s", "backoff_factor", "max_backoff_s", "jitter"]),
        st.sampled_from([0, 1, 3, 100, 101, 0.5, -1, None, "1", True]),
        max_size=3,
    )
    | VALUES
)
OPTIONAL = {
    "tool": st.sampled_from([None, "x"]) | VALUES,
    "name": st.sampled_from(["n", ""]) | VALUES,
    "args": st.sampled_from([{}, {"k": 1}, None]) | VALUES,
    "next": TARGET,
    "branch": st.lists(CASE, max_size=3) | VALUES,
    "done": st.sampled_from([True]) | VALUES,
    "timeout": st.sampled_from([1, 0.5, 60]) | VALUES,
    "retry": RETRY,
    "on_error": TARGET,
    "approvers": st.sampled_from([["ops"], None]) | VALUES,
    "allow_self_approval": st.sampled_from([True, None]) | VALUES,
    "other": VALUES,
}
SUBFLOW = st.sampled_from([{"start": END}, {}, {"x": END}, {"start": {"tool": "x"}},
                           {"start": {"wait": {"seconds": 1}, "done": True}}])  # fmt: skip
KINDS = {
    "parallel": st.dictionaries(st.sampled_from(["a", "b"]), SUBFLOW, max_size=2) | VALUES,
    "join": st.sampled_from(["fail_fast", "all_settled"]) | VALUES,
    "map": st.fixed_dictionaries(
        {},
        optional={
            "items": st.sampled_from([[1], "<<input.u>>", "u", "<<a>><<b>>"]) | VALUES,
            "as": st.sampled_from(["user", "index", "input"]) | VALUES,
            "max_concurrency": st.sampled_from([1, 1000, 1001]) | VALUES,
            "tolerated_failures": VALUES,
            "flow": SUBFLOW | VALUES,
            "other": VALUES,
        },
    )
    | VALUES,
    "wait": st.fixed_dictionaries(
        {},
        optional={
            "seconds": st.sampled_from([0, 5, 366 * 86400 + 1, -1, "1", True, []]),
            "until": st.sampled_from(["2030-01-01T00:00:00Z", "<<input.t>>", 1, -1, None, True]),
            "signal": st.sampled_from(["s", "", None, 1]),
            "timeout": st.sampled_from([5, 0, None, "5"]),
            "other": VALUES,
        },
    )
    | VALUES,
    "call": st.fixed_dictionaries(
        {},
        optional={
            "workflow": st.sampled_from(["kyc", 7, "", 0, "k" * 201, True, None, ["k"]]),
            "version": st.sampled_from([1, 3, 0, -1, None, "1", True]),
            "input": st.sampled_from(
                [{}, {"a": "<<input.a>>"}, "<<input>>", None, "a", "<<a>><<b>>", [1], 3]
            ),
            "other": VALUES,
        },
    )
    | VALUES,
}
BASES = [
    {"tool": "x", "done": True},
    {"tool": None, "next": "start"},
    {"parallel": {"a": {"start": END}}, "done": True},
    {"map": {"items": [1], "flow": {"start": END}}, "next": "a"},
    {"wait": {"seconds": 1}, "done": True},
    {"wait": {"signal": "s", "timeout": 5}, "on_error": "start", "done": True},
    {"call": {"workflow": "kyc", "input": {"a": 1}}, "next": "a"},
]


@st.composite
def mutated(draw: st.DrawFn, keys: dict[str, Any]) -> Any:
    """A valid state with up to two fields set, replaced or removed (or not a state)."""
    if draw(st.integers(0, 20)) == 0:
        return draw(VALUES)
    body = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(keys)))
        if key in body and draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(keys[key])
    return body


def flows(keys: dict[str, Any]) -> Any:
    state = mutated(keys)
    return st.fixed_dictionaries({"start": state}, optional={"a": state, "b": state})


FLOW = flows(OPTIONAL)
NEW_FLOW = flows({**OPTIONAL, **KINDS})


def semantic_only(raw: dict[str, Any]) -> bool:
    """The flow has a problem the schema does not describe: a transition to a state that
    does not exist, an `else` before the last case, or one of daemon.flowcheck's (a
    loop that never reaches done, a template naming no state or an unknown name)."""
    if flowcheck.check(raw)[0]:
        return True
    for body in raw.values():
        if not isinstance(body, dict):
            continue
        for key in ("next", "on_error"):
            if isinstance(body.get(key), str) and body[key] not in raw:
                return True
        cases = body.get("branch")
        if isinstance(cases, list):
            for i, case in enumerate(cases):
                if not isinstance(case, dict):
                    continue
                for key in ("then", "else"):
                    if isinstance(case.get(key), str) and case[key] not in raw:
                        return True
                if set(case) == {"else"} and i != len(cases) - 1:
                    return True
    return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FLOW)
def test_random_flows_agree(raw: dict[str, Any]) -> None:
    assume(not semantic_only(raw))
    assert schema_ok(raw) == parser_ok(raw), (parse(raw).errors, FLOWS.is_valid(raw))


@NEW_KINDS
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NEW_FLOW)
def test_random_flows_with_the_new_kinds_agree(raw: dict[str, Any]) -> None:
    assume(not semantic_only(raw))
    assume(not any(isinstance(b, dict) and isinstance(b.get("wait"), dict)
                   and "seconds" in b["wait"] and b["wait"]["seconds"] is None
                   for b in raw.values()))  # fmt: skip
    assert schema_ok(raw) == parser_ok(raw), (parse(raw).errors, FLOWS.is_valid(raw))


# -- the create body ------------------------------------------------------------------------

BODY_CASES: list[tuple[str, Any, bool]] = [
    ("flow", {"name": "n", "flow": {"start": END}}, True),
    ("flow-input-notify", {"name": "n", "flow": {"start": END}, "input": {"a": 1},
                           "notify_url": "https://hooks.test/x"}, True),
    ("steps", {"name": "n", "steps": [{"id": "a", "tool": "x"},
                                      {"id": "b", "type": "http_request", "config": {"url": "u"},
                                       "depends_on": ["a"], "needs_human": True}]}, True),
    ("steps-local-engine", {"name": "n", "steps": [
        {"id": "s1", "agent": "web_search", "action": "SEARCH_WEB", "args": {"query": "q"},
         "depends_on": [], "outputs": ["results"]}]}, True),
    ("neither", {"name": "n"}, False),
    ("both", {"name": "n", "flow": {"start": END}, "steps": [{"id": "a", "tool": "x"}]}, False),
    ("no-name", {"flow": {"start": END}}, False),
    ("blank-name", {"name": "  ", "flow": {"start": END}}, False),
    ("unknown-field", {"name": "n", "flow": {"start": END}, "x": 1}, False),
    ("steps-empty", {"name": "n", "steps": []}, False),
    ("step-no-id", {"name": "n", "steps": [{"tool": "x"}]}, False),
    ("step-tool-and-type", {"name": "n", "steps": [{"id": "a", "tool": "x", "type": "y"}]}, False),
    ("step-args-and-config", {"name": "n", "steps": [{"id": "a", "tool": "x", "args": {},
                                                      "config": {}}]}, False),
    ("step-unknown-field", {"name": "n", "steps": [{"id": "a", "tool": "x", "after": ["b"]}]},
     False),
    ("input-list", {"name": "n", "flow": {"start": END}, "input": []}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "valid"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
def test_create_bodies(body: Any, valid: bool) -> None:
    assert BODIES.is_valid(body) == valid, list(BODIES.iter_errors(body))


@pytest.mark.parametrize(
    ("body", "valid"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
async def test_create_bodies_agree_with_validate(
    client: httpx.AsyncClient, body: Any, valid: bool
) -> None:
    """Structure only: tool names are the registry's (echo exists, x does not)."""
    body = copy.deepcopy(body)
    for s in body.get("steps") or []:
        if isinstance(s, dict) and s.get("tool") == "x":
            s["tool"] = "echo"
    if isinstance(body.get("flow"), dict):
        body["flow"] = {"start": {"tool": "echo", "done": True}}
    if valid and "steps" in body and not all(s.get("tool") for s in body["steps"]):
        return  # types and agents name tools this registry lacks
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.status_code == 200
    assert resp.json()["valid"] == valid, resp.json()


# -- served ---------------------------------------------------------------------------------


async def test_served_at_api_schema_flow(client: httpx.AsyncClient, app: Any) -> None:
    resp = await client.get("/api/schema/flow")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    names = app.state.engine.registry.names()
    assert resp.json() == flowschema.document(names)
    # It names this daemon's tools: a flow of another tool is refused by the schema too.
    served = jsonschema.Draft202012Validator(resp.json())
    assert served.is_valid({"start": {"tool": names[0], "done": True}})
    assert served.is_valid({"start": {"tool": None, "done": True}})
    assert not served.is_valid({"start": {"tool": "no_such_tool", "done": True}})
    served_api = (await client.get("/openapi.json")).json()
    tool = served_api["components"]["schemas"]["ToolState"]["properties"]["tool"]
    assert tool["enum"] == [*names, None]


async def test_served_schema_needs_a_token_with_read(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/schema/flow", headers={"Authorization": ""})).status_code == 401
    resp = await client.get("/api/schema/flow", headers=auth("approver"))
    assert resp.status_code == 200


def test_openapi_create_body_is_the_same_schema() -> None:
    doc = openapi.document()
    body = doc["paths"]["/api/workflow"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/Submission"}
    schemas = doc["components"]["schemas"]
    prefixed = flowschema.definitions("#/components/schemas/")
    for name, schema in prefixed.items():
        assert schemas[name] == schema, name


# -- random DAG steps: the schema agrees with compiling and parsing ----------------------------

DAG_VALUES = st.sampled_from([None, True, 0, -1, "", "a", [], ["a"], {}, {"k": 1}])
DAG_FIELDS = {
    "tool": st.sampled_from(["echo", None]) | DAG_VALUES,
    "type": st.sampled_from(["http_request", "webhook", "wait", "agent_task"]) | DAG_VALUES,
    "agent": st.sampled_from(["web_search"]) | DAG_VALUES,
    "args": st.sampled_from([{}, {"url": "u"}, None, {"seconds": 5}]) | DAG_VALUES,
    "config": st.sampled_from([{"url": "u"}, {"seconds": 5}, {"signal": "s", "timeout": 9},
                               {"seconds": 1, "timeout": 9}, {"until": True}, {"minutes": 1},
                               {}]) | DAG_VALUES,
    "depends_on": st.sampled_from([["a"], ["b"], [], None, "a", [1]]),
    "needs_human": st.sampled_from([True, False, None, "yes"]),
    "name": st.sampled_from(["Step", "", None, 3]),
    "timeout": st.sampled_from([5, 0, None, "5"]),
    "retry": st.sampled_from([{"max_attempts": 2}, {"max_attempts": 0}, None, 3]),
    "action": DAG_VALUES,
    "after": DAG_VALUES,
}  # fmt: skip
DAG_STEP = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b"])}, optional=DAG_FIELDS
) | st.fixed_dictionaries({}, optional={"id": DAG_VALUES, "tool": DAG_FIELDS["tool"]})
SEMANTIC_DAG = ("Step '", "Cycle detected", "Duplicate step id")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DAG_STEP, min_size=1, max_size=3))
def test_random_dag_steps_agree(steps: list[Any]) -> None:
    from daemon.dag import compile_steps

    flow, errors = compile_steps(copy.deepcopy(steps))
    assume(not any(e.startswith(SEMANTIC_DAG) for e in errors))
    ok = flow is not None and parse(flow).errors == []
    body = {"name": "n", "steps": steps}
    assert BODIES.is_valid(body) == ok, (errors, flow and parse(flow).errors)
