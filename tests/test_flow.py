"""The flow format: validation tables, the pure state machine, and finish_for.

Everything here is pure: no store, no event loop, no clock.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import flow as flows
from daemon.executor import WorkflowInfo, finish_for
from daemon.flow import (
    MISSING_START,
    Advance,
    Complete,
    Fail,
    Retry,
    RetryLater,
    after_failure,
    limit_steps,
    parse,
)
from daemon.models import NewStep, Step, StepStatus, WorkflowStatus
from daemon.placeholders import TemplateError
from daemon.sandbox import first_true
from daemon.tools import Registry, builtin, demo

# -- helpers ----------------------------------------------------------------------------


def after_success(flow: flows.Flow, state_id: str, scope: dict[str, Any]) -> flows.Move:
    """flows.after_success with the branch evaluated as the executor does (here with the
    sandbox's functions in this process, instead of the sandbox process)."""
    state = flow[state_id]
    try:
        matched = first_true(state.conditions, scope)
    except TemplateError as exc:
        return flows.after_success(flow, state_id, error=str(exc))
    return flows.after_success(flow, state_id, matched=matched, result=scope.get("result"))


def ok(raw: Any, **kwargs: Any) -> flows.Flow:
    """Parse a flow that must be valid."""
    v = parse(raw, **kwargs)
    assert v.errors == [], v.errors
    assert v.flow is not None
    return v.flow


def errors_of(raw: Any, **kwargs: Any) -> list[str]:
    v = parse(raw, **kwargs)
    assert v.flow is None, "an invalid flow must not produce a Flow"
    assert v.errors, "an invalid flow must report at least one error"
    return v.errors


def has_error(errors: list[str], *needles: str) -> bool:
    """Some single message contains every needle."""
    return any(all(n in e for n in needles) for e in errors)


def state(**fields: Any) -> dict[str, Any]:
    return {"tool": "x", **fields}


DONE = {"tool": "x", "done": True}


# -- validation: one error per row -----------------------------------------------------

# (id, flow, needles that must all appear in one error message)
INVALID: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    (
        "next-unknown",
        {"start": state(next="nowhere")},
        ("state 'start'", "'next'", "nowhere"),
    ),
    (
        "next-unknown-in-second-state",
        {"start": state(next="second"), "second": state(next="ghost")},
        ("state 'second'", "'next'", "ghost"),
    ),
    (
        "branch-then-unknown",
        {"start": state(branch=[{"if": "result", "then": "nope"}, {"else": "start"}])},
        ("state 'start'", "branch[0].then", "nope"),
    ),
    (
        "branch-else-unknown",
        {"start": state(branch=[{"if": "result", "then": "start"}, {"else": "nope2"}])},
        ("state 'start'", "branch[1].else", "nope2"),
    ),
    (
        "on-error-unknown",
        {"start": state(done=True, on_error="cleanup")},
        ("state 'start'", "'on_error'", "cleanup"),
    ),
    ("zero-transitions", {"start": state()}, ("state 'start'", "'next'", "'branch'", "'done'")),
    (
        "next-and-done",
        {"start": state(next="start", done=True)},
        ("state 'start'", "next, done"),
    ),
    (
        "next-and-branch",
        {"start": state(next="start", branch=[{"else": "start"}])},
        ("state 'start'", "next, branch"),
    ),
    ("done-false", {"start": state(done=False)}, ("state 'start'", "'done'", "true")),
    ("done-string", {"start": state(done="yes")}, ("state 'start'", "'done'")),
    ("done-one", {"start": state(done=1)}, ("state 'start'", "'done'")),
    ("tool-missing", {"start": {"done": True}}, ("state 'start'", "'tool'", "required")),
    ("tool-int", {"start": {"tool": 5, "done": True}}, ("state 'start'", "'tool'")),
    ("tool-list", {"start": {"tool": ["x"], "done": True}}, ("state 'start'", "'tool'")),
    ("args-list", {"start": state(args=[1], done=True)}, ("state 'start'", "'args'")),
    ("args-string", {"start": state(args="a=1", done=True)}, ("state 'start'", "'args'")),
    ("name-int", {"start": state(name=3, done=True)}, ("state 'start'", "'name'")),
    ("name-empty", {"start": state(name="", done=True)}, ("state 'start'", "'name'")),
    ("name-null", {"start": state(name=None, done=True)}, ("state 'start'", "'name'")),
    ("next-int", {"start": state(next=5)}, ("state 'start'", "'next'")),
    ("branch-string", {"start": state(branch="a")}, ("state 'start'", "'branch'")),
    ("branch-empty", {"start": state(branch=[])}, ("state 'start'", "'branch'")),
    (
        "branch-if-int",
        {"start": state(branch=[{"if": 1, "then": "start"}])},
        ("state 'start'", "branch[0]"),
    ),
    (
        "branch-case-missing-then",
        {"start": state(branch=[{"if": "result"}])},
        ("state 'start'", "branch[0]"),
    ),
    (
        "branch-case-mixed",
        {"start": state(branch=[{"else": "start", "if": "result"}])},
        ("state 'start'", "branch[0]"),
    ),
    (
        "branch-case-not-object",
        {"start": state(branch=["start"])},
        ("state 'start'", "branch[0]"),
    ),
    (
        "else-not-last",
        {"start": state(branch=[{"else": "start"}, {"if": "result", "then": "start"}])},
        ("state 'start'", "branch[0]", "else", "last"),
    ),
    ("timeout-negative", {"start": state(done=True, timeout=-1)}, ("state 'start'", "'timeout'")),
    ("timeout-zero", {"start": state(done=True, timeout=0)}, ("state 'start'", "'timeout'")),
    ("timeout-string", {"start": state(done=True, timeout="5")}, ("state 'start'", "'timeout'")),
    ("timeout-bool", {"start": state(done=True, timeout=True)}, ("state 'start'", "'timeout'")),
    ("retry-int", {"start": state(done=True, retry=3)}, ("state 'start'", "'retry'")),
    ("retry-list", {"start": state(done=True, retry=[3])}, ("state 'start'", "'retry'")),
    (
        "retry-attempts-zero",
        {"start": state(done=True, retry={"max_attempts": 0})},
        ("state 'start'", "max_attempts"),
    ),
    (
        "retry-attempts-float",
        {"start": state(done=True, retry={"max_attempts": 2.5})},
        ("state 'start'", "max_attempts"),
    ),
    (
        "retry-attempts-bool",
        {"start": state(done=True, retry={"max_attempts": True})},
        ("state 'start'", "max_attempts"),
    ),
    (
        "retry-attempts-too-many",
        {"start": state(done=True, retry={"max_attempts": 101})},
        ("state 'start'", "max_attempts"),
    ),
    (
        "retry-backoff-negative",
        {"start": state(done=True, retry={"backoff_s": -1})},
        ("state 'start'", "backoff_s"),
    ),
    (
        "retry-backoff-string",
        {"start": state(done=True, retry={"backoff_s": "1s"})},
        ("state 'start'", "backoff_s"),
    ),
    (
        "retry-factor-null",
        {"start": state(done=True, retry={"backoff_factor": None})},
        ("state 'start'", "backoff_factor"),
    ),
    (
        "retry-max-backoff-bool",
        {"start": state(done=True, retry={"max_backoff_s": False})},
        ("state 'start'", "max_backoff_s"),
    ),
    (
        "retry-unknown-field",
        {"start": state(done=True, retry={"jitter": 1})},
        ("state 'start'", "retry", "jitter"),
    ),
    ("on-error-int", {"start": state(done=True, on_error=3)}, ("state 'start'", "'on_error'")),
    (
        "unknown-field-typo",
        {"start": state(nxt="start", done=True)},
        ("state 'start'", "unknown field", "nxt"),
    ),
    (
        "template-syntax-error",
        {"start": state(args={"a": "<<input.a +>>"}, done=True)},
        ("state 'start'", "'args'", "syntax"),
    ),
    (
        "template-syntax-error-braces",
        {"start": state(args={"a": {"b": ["{{ input.( }}"]}}, done=True)},
        ("state 'start'", "'args'", "syntax"),
    ),
    (
        "template-empty",
        {"start": state(args={"a": "<< >>"}, done=True)},
        ("state 'start'", "'args'"),
    ),
    (
        "template-unsafe-attribute",
        {"start": state(args={"a": ["<<input.__class__>>"]}, done=True)},
        ("state 'start'", "'args'", "__class__"),
    ),
    (
        "condition-syntax-error",
        {"start": state(branch=[{"if": "result ==", "then": "start"}])},
        ("state 'start'", "branch[0]", "syntax"),
    ),
    (
        "condition-unsafe-attribute",
        {"start": state(branch=[{"if": "result.__class__", "then": "start"}])},
        ("state 'start'", "branch[0]", "__class__"),
    ),
    (
        "condition-unsafe-item",
        {"start": state(branch=[{"if": "result['__init__']", "then": "start"}])},
        ("state 'start'", "branch[0]", "__init__"),
    ),
    ("state-not-object", {"start": ["x"]}, ("state 'start'", "object")),
]


@pytest.mark.parametrize(("raw", "needles"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_flow_names_state_and_field(raw: dict[str, Any], needles: tuple[str, ...]) -> None:
    errors = errors_of(raw)
    assert has_error(errors, *needles), errors


@pytest.mark.parametrize("raw", [{}, {"other": DONE}, {"a": DONE, "b": state(next="a")}])
def test_missing_start_is_exactly_the_reference_message(raw: dict[str, Any]) -> None:
    assert errors_of(raw) == ["Flow must have a 'start' key"]
    assert MISSING_START == "Flow must have a 'start' key"


@pytest.mark.parametrize("raw", [None, [], [DONE], "start", 3, True])
def test_flow_that_is_not_an_object_is_an_error(raw: Any) -> None:
    assert len(errors_of(raw)) == 1


def test_unknown_tool_when_a_tools_container_is_given() -> None:
    raw = {"start": {"tool": "zzz", "next": "b"}, "b": {"tool": "x", "done": True}}
    assert has_error(errors_of(raw, tools={"x"}), "state 'start'", "tool", "zzz")
    ok(raw, tools={"x", "zzz"})
    ok(raw)  # no container: tool names are not checked


def test_gate_needs_no_tool_registration() -> None:
    ok({"start": {"tool": None, "next": "b"}, "b": {"tool": "x", "done": True}}, tools={"x"})


def test_more_states_than_max_states() -> None:
    raw = {"start": state(next="a"), "a": state(next="b"), "b": DONE}
    ok(raw, max_states=3)
    errors = errors_of(raw, max_states=2)
    assert has_error(errors, "3", "2"), errors


def test_several_problems_are_reported_at_once() -> None:
    raw = {
        "start": {"tool": "x", "nxt": "b", "next": "b"},  # typo'd field
        "b": {"tool": "x", "next": "ghost"},  # unknown target
        "c": {"tool": 7, "done": True, "timeout": -1},  # two wrong types
        "d": {"tool": "x"},  # no transition
    }
    errors = parse(raw).errors
    assert has_error(errors, "state 'start'", "nxt")
    assert has_error(errors, "state 'b'", "ghost")
    assert has_error(errors, "state 'c'", "'tool'")
    assert has_error(errors, "state 'c'", "'timeout'")
    assert has_error(errors, "state 'd'", "'next'")
    assert len(errors) == 5, errors


def test_missing_start_is_reported_with_other_problems() -> None:
    errors = parse({"a": {"tool": "x", "next": "ghost"}}).errors
    assert MISSING_START in errors
    assert has_error(errors, "state 'a'", "ghost")


def test_unreachable_states_are_warnings_not_errors() -> None:
    raw = {
        "start": {"tool": None, "next": "b"},
        "b": DONE,
        "island": state(next="island2"),
        "island2": state(next="island"),
    }
    v = parse(raw)
    assert v.errors == []
    assert v.flow is not None
    assert len(v.warnings) == 2
    assert has_error(v.warnings, "island'", "unreachable")
    assert has_error(v.warnings, "island2", "unreachable")


def test_states_reached_by_branch_and_on_error_are_reachable() -> None:
    raw = {
        "start": state(branch=[{"if": "result", "then": "a"}, {"else": "b"}], on_error="c"),
        "a": DONE,
        "b": DONE,
        "c": DONE,
    }
    assert parse(raw).warnings == []


def test_no_false_unreachable_warning_behind_an_invalid_state() -> None:
    # 'c' is reachable (start -> b -> c); only b's tool type is wrong. The warning
    # list must not claim otherwise.
    raw = {"start": state(next="b"), "b": {"tool": 5, "next": "c"}, "c": DONE}
    v = parse(raw)
    assert has_error(v.errors, "state 'b'", "'tool'")
    assert not has_error(v.warnings, "'c'"), v.warnings


def test_parse_does_not_modify_its_input() -> None:
    raw = {
        "start": {
            "tool": "x",
            "args": {"a": ["<<input.a>>"]},
            "branch": [{"if": " result ", "then": "b"}],
        },
        "b": {"tool": None, "done": True, "retry": {"max_attempts": 2}},
    }
    before = copy.deepcopy(raw)
    parse(raw)
    assert raw == before


# -- validation: the typed model ---------------------------------------------------------


def test_parsed_state_defaults_and_fields() -> None:
    flow = ok(
        {
            "start": {"tool": "x", "next": "gate"},
            "gate": {
                "tool": None,
                "name": "await approval",
                "args": None,
                "branch": [{"if": "  result.ok  ", "then": "end"}, {"else": "end"}],
                "timeout": 5,
                "on_error": "end",
            },
            "end": {
                "tool": "x",
                "args": {"t": "<<input.t>>", "n": 1},
                "retry": {"max_attempts": 4, "backoff_s": 2},
                "done": True,
            },
        }
    )
    start, gate, end = flow["start"], flow["gate"], flow["end"]
    assert (start.name, start.args, start.next, start.retry) == ("start", {}, "gate", Retry())
    assert start.retry.max_attempts == 1
    assert not start.is_gate and not start.templated
    assert gate.is_gate and gate.name == "await approval" and gate.args == {}
    assert gate.branch == (flows.Case("result.ok", "end"), flows.Case(None, "end"))
    assert gate.timeout == 5.0
    assert gate.retry == Retry()
    assert end.retry == Retry(max_attempts=4, backoff_s=2.0, backoff_factor=2.0)
    assert gate.on_error == "end"
    assert end.done and end.templated


# -- validation: tool arguments against a registry --------------------------------------


def _search(query: str, limit: int = 5, *, ctx: Any = None) -> list[Any]:
    return []


def _anything(**kwargs: Any) -> dict[str, Any]:
    return kwargs


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.add("search", _search)
    reg.add("anything", _anything)
    return reg


def one_state(tool: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"start": {"tool": tool, "args": args, "done": True}}


@pytest.mark.parametrize(
    "args",
    [{"query": "q"}, {"query": "<<input.q>>", "limit": 2}, {"query": "q", "limit": "<<input.n>>"}],
)
def test_registry_accepts_matching_arguments(registry: Registry, args: dict[str, Any]) -> None:
    ok(one_state("search", args), tools=registry)


def test_registry_unknown_argument_is_an_error(registry: Registry) -> None:
    errors = errors_of(one_state("search", {"query": "q", "limt": 3}), tools=registry)
    assert has_error(errors, "state 'start'", "search", "unknown argument 'limt'"), errors


def test_registry_missing_required_argument_is_an_error(registry: Registry) -> None:
    errors = errors_of(one_state("search", {"limit": 3}), tools=registry)
    assert has_error(errors, "state 'start'", "search", "missing required argument 'query'")


def test_registry_ctx_is_not_a_user_argument(registry: Registry) -> None:
    errors = errors_of(one_state("search", {"query": "q", "ctx": 1}), tools=registry)
    assert has_error(errors, "state 'start'", "unknown argument 'ctx'"), errors


@pytest.mark.parametrize("args", [{}, {"a": 1, "whatever": [1, 2], "query": "<<input.q>>"}])
def test_registry_kwargs_tool_accepts_anything(registry: Registry, args: dict[str, Any]) -> None:
    ok(one_state("anything", args), tools=registry)


def test_registry_unknown_tool(registry: Registry) -> None:
    errors = errors_of(one_state("serch", {"query": "q"}), tools=registry)
    assert has_error(errors, "state 'start'", "unknown tool 'serch'")


# -- the reference's flows ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_registry() -> Registry:
    reg = Registry()
    reg.add_module(builtin)
    reg.add_module(demo)
    return reg


REFERENCE_FLOWS = {
    "linear": {
        "start": {"name": "greet", "tool": "get_greeting", "args": {}, "next": "count"},
        "count": {"name": "count", "tool": "get_counter", "args": {}, "done": True},
    },
    "input-templating": {
        "start": {
            "name": "search",
            "tool": "knowledge_search",
            "args": {"query": "{{input.topic}}"},
            "done": True,
        }
    },
    "approval-gate": {
        "start": {"name": "await_approval", "tool": None, "args": {}, "next": "do_write"},
        "do_write": {
            "name": "do_write",
            "tool": "knowledge_add",
            "args": {
                "title": "{{input.title}}",
                "content": "{{input.content}}",
                "scope": "general",
            },
            "done": True,
        },
    },
    "design-card": {
        "start": {"name": "await_approval", "tool": None, "args": {}, "next": "do_write"},
        "do_write": {
            "name": "do_write",
            "tool": "knowledge_add",
            "args": {"title": "<<input.title>>", "scope": "general"},
            "done": True,
        },
    },
    "branching": {
        "start": {
            "name": "check",
            "tool": "is_admin",
            "args": {},
            "branch": [
                {"if": "result == true", "then": "admin_path"},
                {"if": "result == false", "then": "user_path"},
            ],
        },
        "admin_path": {
            "name": "admin_path",
            "tool": "get_greeting",
            "args": {"name": "World"},
            "done": True,
        },
        "user_path": {"name": "user_path", "tool": "get_counter", "args": {}, "done": True},
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE_FLOWS))
def test_reference_flows_parse(name: str, demo_registry: Registry) -> None:
    v = parse(REFERENCE_FLOWS[name], tools=demo_registry)
    assert v.errors == [] and v.warnings == []
    assert v.flow is not None


def test_reference_branching_walks_both_ways() -> None:
    flow = ok(REFERENCE_FLOWS["branching"])
    assert after_success(flow, "start", {"result": True}) == Advance("admin_path")
    assert after_success(flow, "start", {"result": False}) == Advance("user_path")
    assert after_success(flow, "admin_path", {"result": "Hello, World!"}) == Complete()


# -- the state machine: after_success ------------------------------------------------------

MACHINE = ok(
    {
        "start": {"tool": "x", "next": "router"},
        "router": {
            "tool": "x",
            "branch": [
                {"if": "result.score > 0.8", "then": "high"},
                {"if": "result.score > 0.5", "then": "mid"},
                {"if": "'admin' in result.roles", "then": "admin"},
            ],
        },
        "flags": {
            "tool": "x",
            "branch": [{"if": "result == true", "then": "high"}, {"else": "low"}],
        },
        "high": {"tool": "x", "done": True},
        "mid": {"tool": "x", "done": True},
        "admin": {"tool": "x", "done": True},
        "low": {"tool": "x", "done": True},
        "flaky": {
            "tool": "x",
            "next": "high",
            "retry": {"max_attempts": 3, "backoff_s": 1, "backoff_factor": 2, "max_backoff_s": 60},
        },
        "guarded": {
            "tool": "x",
            "done": True,
            "retry": {"max_attempts": 2},
            "on_error": "low",
        },
    }
)


@pytest.mark.parametrize(
    ("state_id", "result", "move"),
    [
        ("start", None, Advance("router")),
        ("start", {"anything": 1}, Advance("router")),
        ("high", None, Complete()),
        ("low", [1, 2], Complete()),
        # first true condition wins, even when a later one is also true
        ("router", {"score": 0.9, "roles": ["admin"]}, Advance("high")),
        ("router", {"score": 0.6, "roles": ["admin"]}, Advance("mid")),
        ("router", {"score": 0.1, "roles": ["user", "admin"]}, Advance("admin")),
        ("flags", True, Advance("high")),
        ("flags", False, Advance("low")),
        ("flags", 1, Advance("high")),
        ("flags", "true", Advance("low")),
        ("flags", None, Advance("low")),
    ],
)
def test_after_success(state_id: str, result: Any, move: flows.Move) -> None:
    assert after_success(MACHINE, state_id, {"result": result, "input": {}}) == move


def test_after_success_no_branch_matches_names_state_and_result() -> None:
    move = after_success(MACHINE, "router", {"result": {"score": 0.1, "roles": ["guest"]}})
    assert isinstance(move, Fail)
    assert "router" in move.error
    assert "no branch matched" in move.error
    assert '{"score":0.1,"roles":["guest"]}' in move.error


def test_after_success_no_match_truncates_a_huge_result() -> None:
    result = {"score": 0, "roles": ["x" * 10_000]}
    move = after_success(MACHINE, "router", {"result": result})
    assert isinstance(move, Fail)
    assert "router" in move.error and len(move.error) < 500


@pytest.mark.parametrize("result", [None, {"roles": []}, {"score": "high"}, 5])
def test_after_success_condition_error_fails_with_the_state(result: Any) -> None:
    move = after_success(MACHINE, "router", {"result": result})
    assert isinstance(move, Fail)
    assert "router" in move.error


def test_after_success_condition_can_read_other_scope_names() -> None:
    flow = ok(
        {
            "start": {
                "tool": "x",
                "branch": [
                    {"if": "result > input.threshold", "then": "big"},
                    {"if": "steps.start.attempt > 1", "then": "retried"},
                    {"else": "small"},
                ],
            },
            "big": DONE,
            "retried": DONE,
            "small": DONE,
        }
    )
    scope = {"input": {"threshold": 3}, "steps": {"start": {"attempt": 1}}}
    assert after_success(flow, "start", {**scope, "result": 4}) == Advance("big")
    assert after_success(flow, "start", {**scope, "result": 2}) == Advance("small")
    scope["steps"]["start"]["attempt"] = 2
    assert after_success(flow, "start", {**scope, "result": 2}) == Advance("retried")


# -- the state machine: after_failure ------------------------------------------------------


@pytest.mark.parametrize(("attempt", "rand"), [(1, 0.0), (1, 0.999), (2, 0.5)])
def test_after_failure_retries_while_attempts_remain(attempt: int, rand: float) -> None:
    move = after_failure(MACHINE, "flaky", "boom", attempt=attempt, retryable=True, rand=rand)
    assert isinstance(move, RetryLater)
    assert move.delay_s == MACHINE["flaky"].retry.delay(attempt, rand)
    base = 1.0 * 2.0 ** (attempt - 1)
    assert 0.5 * base <= move.delay_s <= base


def test_after_failure_last_attempt_fails_with_state_and_error() -> None:
    move = after_failure(MACHINE, "flaky", "boom: 503", attempt=3, retryable=True, rand=0.5)
    assert isinstance(move, Fail)
    assert "flaky" in move.error and "boom: 503" in move.error


def test_after_failure_non_retryable_fails_at_once() -> None:
    move = after_failure(MACHINE, "flaky", "bad args", attempt=1, retryable=False, rand=0.5)
    assert isinstance(move, Fail)
    assert "flaky" in move.error and "bad args" in move.error


def test_after_failure_default_retry_is_a_single_attempt() -> None:
    move = after_failure(MACHINE, "start", "boom", attempt=1, retryable=True, rand=0.5)
    assert isinstance(move, Fail) and "start" in move.error


@pytest.mark.parametrize(
    ("attempt", "retryable", "move"),
    [
        (1, True, RetryLater(MACHINE["guarded"].retry.delay(1, 0.25))),
        (2, True, Advance("low")),
        (1, False, Advance("low")),
    ],
)
def test_after_failure_on_error_after_the_last_attempt(
    attempt: int, retryable: bool, move: flows.Move
) -> None:
    got = after_failure(MACHINE, "guarded", "boom", attempt=attempt, retryable=retryable, rand=0.25)
    assert got == move


# -- the state machine: limit_steps ------------------------------------------------------


@pytest.mark.parametrize(
    ("move", "count", "limit", "expected"),
    [
        (Advance("a"), 1, 10, Advance("a")),
        (Advance("a"), 9, 10, Advance("a")),
        (Complete(), 10, 10, Complete()),
        (Complete(), 5000, 10, Complete()),
        (Fail("x"), 10, 10, Fail("x")),
        (RetryLater(1.0), 10, 10, RetryLater(1.0)),
    ],
)
def test_limit_steps_leaves_moves_alone(
    move: flows.Move, count: int, limit: int, expected: flows.Move
) -> None:
    assert limit_steps(move, count, limit) == expected


@pytest.mark.parametrize(("count", "limit"), [(10, 10), (11, 10), (1, 1)])
def test_limit_steps_fails_an_advance_past_the_limit(count: int, limit: int) -> None:
    move = limit_steps(Advance("loop_back"), count, limit)
    assert isinstance(move, Fail)
    assert "step limit" in move.error
    assert str(limit) in move.error
    assert "loop_back" in move.error


# -- finish_for ---------------------------------------------------------------------------


def _info(flow: flows.Flow) -> WorkflowInfo:
    return WorkflowInfo(id=42, name="wf", created_by="james", flow=flow, input_json="{}")


def _step(state_id: str, seq: int = 1, attempt: int = 1) -> Step:
    return Step(
        id=1000 + seq,
        workflow_id=42,
        state=state_id,
        name=state_id,
        tool="x",
        status=StepStatus.RUNNING,
        seq=seq,
        attempt=attempt,
        run_at=0,
        created_at=0,
    )


FINISH_FLOW = ok(
    {
        "start": {"tool": "get_greeting", "next": "gate"},
        "gate": {"tool": None, "name": "await approval", "next": "end"},
        "end": {"tool": "echo", "name": "write it", "done": True},
    }
)


def test_finish_for_advance_makes_the_next_step() -> None:
    fin = finish_for(
        _info(FINISH_FLOW),
        _step("start", seq=3, attempt=2),
        Advance("gate"),
        StepStatus.DONE,
        1000,
        result_json='"hi"',
    )
    assert fin.step_id == 1003 and fin.workflow_id == 42 and fin.attempt == 2
    assert fin.status == StepStatus.DONE and fin.result_json == '"hi"'
    assert fin.next_step == NewStep(state="gate", name="await approval", tool=None, seq=4)
    assert fin.workflow_status is None and fin.workflow_error is None


def test_finish_for_advance_to_a_tool_state() -> None:
    fin = finish_for(_info(FINISH_FLOW), _step("gate", seq=1), Advance("end"), StepStatus.DONE, 10)
    assert fin.next_step == NewStep(state="end", name="write it", tool="echo", seq=2)


def test_finish_for_complete() -> None:
    fin = finish_for(_info(FINISH_FLOW), _step("end", seq=5), Complete(), StepStatus.DONE, 10)
    assert fin.next_step is None
    assert fin.workflow_status == WorkflowStatus.COMPLETED
    assert fin.workflow_error is None


def test_finish_for_fail_carries_the_error() -> None:
    fin = finish_for(
        _info(FINISH_FLOW),
        _step("start"),
        Fail("state 'start': boom"),
        StepStatus.FAILED,
        10,
        error="boom",
        error_type="ToolError",
    )
    assert fin.status == StepStatus.FAILED and fin.error == "boom" and fin.error_type == "ToolError"
    assert fin.next_step is None
    assert fin.workflow_status == WorkflowStatus.FAILED
    assert fin.workflow_error == "state 'start': boom"


def test_finish_for_applies_the_step_limit() -> None:
    info = _info(FINISH_FLOW)
    under = finish_for(info, _step("start", seq=9), Advance("gate"), StepStatus.DONE, 10)
    assert under.next_step is not None and under.next_step.seq == 10
    over = finish_for(info, _step("start", seq=10), Advance("gate"), StepStatus.DONE, 10)
    assert over.next_step is None
    assert over.workflow_status == WorkflowStatus.FAILED
    assert over.workflow_error is not None and "step limit" in over.workflow_error
    done = finish_for(info, _step("end", seq=10), Complete(), StepStatus.DONE, 10)
    assert done.workflow_status == WorkflowStatus.COMPLETED


# -- Retry.delay ----------------------------------------------------------------------------


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(
    backoff_s=finite,
    factor=st.floats(min_value=0, max_value=10, allow_nan=False),
    max_backoff_s=finite,
    attempt=st.integers(min_value=1, max_value=100),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_retry_delay_is_jittered_capped_exponential(
    backoff_s: float, factor: float, max_backoff_s: float, attempt: int, rand: float
) -> None:
    retry = Retry(
        max_attempts=100, backoff_s=backoff_s, backoff_factor=factor, max_backoff_s=max_backoff_s
    )
    base = min(max_backoff_s, backoff_s * factor ** (attempt - 1))
    delay = retry.delay(attempt, rand)
    tol = 1e-9 * max(1.0, base)
    assert 0.5 * base - tol <= delay <= base + tol
    assert delay <= max_backoff_s + tol


def test_retry_delay_examples() -> None:
    r = Retry(max_attempts=5, backoff_s=1, backoff_factor=2, max_backoff_s=5)
    assert [r.delay(a, 0.0) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.5]
    assert r.delay(2, 0.999999) == pytest.approx(2.0, rel=1e-5)


def test_retry_delay_with_a_huge_factor_is_capped_not_an_overflow() -> None:
    # parse() accepts any backoff_factor >= 0 and max_attempts up to 100, so the delay
    # for a late attempt must be the cap, not an OverflowError out of the executor.
    flow = ok(
        {
            "start": state(
                done=True,
                retry={"max_attempts": 100, "backoff_factor": 1e10, "max_backoff_s": 60},
            )
        }
    )
    retry = flow["start"].retry
    assert retry.delay(50, 0.0) == pytest.approx(30.0)
    move = after_failure(flow, "start", "boom", attempt=50, retryable=True, rand=0.0)
    assert move == RetryLater(pytest.approx(30.0))


# -- random linear flows ----------------------------------------------------------------------

state_ids = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s != "start")


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(state_ids, min_size=0, max_size=25, unique=True),
    tools=st.lists(st.sampled_from([None, "echo", "sleep", "x"]), min_size=26, max_size=26),
)
def test_random_linear_flow_reaches_complete_in_n_steps(
    ids: list[str], tools: list[str | None]
) -> None:
    chain = ["start", *ids]
    raw = {}
    for i, sid in enumerate(chain):
        body: dict[str, Any] = {"tool": tools[i], "args": {"i": i}}
        if i + 1 < len(chain):
            body["next"] = chain[i + 1]
        else:
            body["done"] = True
        raw[sid] = body
    v = parse(raw)
    assert v.errors == [] and v.warnings == []
    assert v.flow is not None
    current, steps = "start", 0
    while True:
        steps += 1
        move = after_success(v.flow, current, {"result": None})
        if isinstance(move, Complete):
            break
        assert isinstance(move, Advance)
        current = move.target
        assert steps < 100
    assert steps == len(chain)
    assert current == chain[-1]


# -- junk never raises ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(
        ["start", "x", "<<input.a>>", "{{ result }}", "<<", "{{ x.__class__ }}", "<< ( >>", ""]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(sorted(flows.STATE_KEYS | {"nxt", "if", "then", "else"}))
branch_cases = st.lists(
    st.dictionaries(st.sampled_from(["if", "then", "else", "x"]), json_values, max_size=3),
    max_size=3,
)
state_bodies = st.dictionaries(
    field_names,
    json_values
    | branch_cases
    | st.dictionaries(st.sampled_from(sorted(flows.RETRY_KEYS)), json_values, max_size=4),
    max_size=6,
)
junk_flows = (
    json_values
    | st.dictionaries(st.sampled_from(["start", "a", "b"]) | st.text(max_size=4), state_bodies)
    | st.dictionaries(st.sampled_from(["start", "a", "b"]), json_values)
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(raw=junk_flows)
def test_junk_never_raises(raw: Any) -> None:
    v = parse(raw, tools={"x", "echo"}, max_states=5)
    assert isinstance(v.errors, list) and isinstance(v.warnings, list)
    assert (v.flow is None) == bool(v.errors)
    if v.flow is not None:
        assert "start" in v.flow.states


@pytest.mark.parametrize(
    "body",
    [
        {"tool": "x", "done": True, "timeout": 10**400},
        {"tool": "x", "done": True, "retry": {"backoff_s": 10**400}},
        {"tool": "x", "done": True, "retry": {"max_backoff_s": -(10**400)}},
    ],
    ids=["timeout", "backoff_s", "max_backoff_s"],
)
def test_huge_integers_are_errors_not_exceptions(body: dict[str, Any]) -> None:
    # Python's json module (and any caller of parse) can hand over integers that do
    # not fit a float; parse must report them, not raise OverflowError.
    v = parse({"start": body})
    assert v.flow is None or v.errors == []


def test_parse_cache_returns_the_same_validation_for_the_same_text() -> None:
    cache = flows.ParseCache(entries=2)
    text = '{"start": {"tool": "echo", "args": {"x": "<<input.x>>"}, "done": true}}'
    first = cache.parse(text, {"echo"})
    assert first.flow is not None and cache.parse(text, {"echo"}) is first
    # Invalid flows are not kept: every request gets its errors worked out afresh.
    bad = '{"start": {"tool": "nope", "done": true}}'
    assert cache.parse(bad, {"echo"}).errors and cache.parse(bad, {"echo"}) is not (
        cache.parse(bad, {"echo"})
    )
    # Least recently used goes first.
    other = '{"start": {"tool": "echo", "done": true}}'
    third = '{"start": {"tool": "echo", "args": {}, "done": true}}'
    cache.parse(other, {"echo"})
    cache.parse(third, {"echo"})
    assert cache.parse(text, {"echo"}) is not first
    # Texts beyond max_text are parsed but not kept.
    small = flows.ParseCache(max_text=10)
    assert small.parse(text, {"echo"}) is not small.parse(text, {"echo"})
