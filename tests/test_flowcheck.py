"""Checks beyond structure: names templates read, loops, tool name suggestions.

Pure tables through daemon.flowcheck.check and through daemon.flow.parse (which calls
it), and one pass through the real app's validate route.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import flowcheck
from daemon.flow import parse

END = {"tool": "x", "done": True}


def tool(**fields: Any) -> dict[str, Any]:
    return {"tool": "x", **fields}


def args(expr: str, **fields: Any) -> dict[str, Any]:
    return {"tool": "x", "args": {"v": expr}, **fields}


def branch_flow(inner: dict[str, Any], **outer: Any) -> dict[str, Any]:
    """A flow whose 'start' is a parallel of one branch 'b' with `inner` as its flow."""
    return {"start": {"parallel": {"b": inner}, "next": "end"}, "end": END, **outer}


def map_flow(inner: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"start": {"map": {"items": [1, 2], "flow": inner, **spec}, "done": True}}


# (id, flow, expected errors: each a tuple of needles that one message must all contain)
CASES: list[tuple[str, dict[str, Any], list[tuple[str, ...]]]] = [
    ("known-state", {"start": tool(next="b"), "b": args("<<steps.start.result>>", done=True)}, []),
    ("unknown-state", {"start": args("<<steps.nope.result>>", done=True)},
     [("state 'start'", "field 'args'", "steps.nope", "does not exist")]),
    ("unknown-state-subscript", {"start": args("{{ steps['no pe'].status }}", done=True)},
     [("state 'start'", "field 'args'", "steps.no pe")]),
    ("unknown-state-in-expression", {"start": args("<<(steps.a.result or 1) + 2>>", done=True)},
     [("state 'start'", "steps.a")]),
    ("unknown-state-in-condition",
     {"start": tool(branch=[{"if": "steps.gone.result > 1", "then": "start"}, {"else": "end"}]),
      "end": END},
     [("state 'start'", "branch[0]", "steps.gone")]),
    ("string-literal-is-not-a-read", {"start": args("<<'steps.nope' ~ input.a>>", done=True)}, []),
    ("attributes-and-filters-are-not-names",
     {"start": tool(args={"a": "<<input.items | length>>", "b": "<<result.score > 0.8>>",
                          "c": "<<input.x | default('y') | upper>>", "d": "<<error.message>>",
                          "e": "<<workflow.id>>", "f": "<<'admin' in result.roles>>"},
                    done=True)}, []),
    ("unknown-name", {"start": args("<<inputs.title>>", done=True)},
     [("state 'start'", "field 'args'", "'inputs'", "input, ")]),
    ("unknown-name-in-condition",
     {"start": tool(branch=[{"if": "res == 1", "then": "end"}, {"else": "end"}]), "end": END},
     [("state 'start'", "branch[0]", "'res'")]),
    ("item-outside-a-map", {"start": args("<<item.email>>", done=True)},
     [("state 'start'", "'item'")]),
    ("index-outside-a-map", {"start": args("<<index + 1>>", done=True)},
     [("state 'start'", "'index'")]),
    ("item-and-index-in-a-map", map_flow({"start": args("<<item ~ index>>", done=True)}), []),
    ("as-name-in-a-map", map_flow({"start": args("<<user.email>>", done=True)}, **{"as": "user"}),
     []),
    ("item-when-as-renames-it",
     map_flow({"start": args("<<item.email>>", done=True)}, **{"as": "user"}),
     [("state 'start': map: state 'start'", "'item'")]),
    ("map-items-read-in-the-enclosing-flow",
     {"start": {"map": {"items": "<<item>>", "flow": {"start": END}}, "done": True}},
     [("state 'start'", "map.items", "'item'")]),
    ("map-items-from-a-state", {"start": tool(next="m"),
                                "m": {"map": {"items": "<<steps.start.result>>",
                                              "flow": {"start": END}}, "done": True}}, []),
    ("wait-until-names", {"start": {"wait": {"until": "<<input.at>>"}, "next": "w"},
                          "w": {"wait": {"until": "<<deadline>>"}, "done": True}},
     [("state 'w'", "wait.until", "'deadline'")]),
    ("branch-sees-its-own-and-enclosing-states",
     {"pre": tool(next="start"),
      **branch_flow({"start": tool(next="two"),
                     "two": args("<<[steps.start.result, steps.pre.result]>>", done=True)})},
     []),
    ("branch-does-not-see-a-sibling-branch",
     {"start": {"parallel": {"a": {"start": tool(next="inner"), "inner": END},
                             "b": {"start": args("<<steps.inner.result>>", done=True)}},
                "done": True}},
     [("state 'start': branch 'b': state 'start'", "steps.inner")]),
    ("after-the-join-the-branch-result-is-the-parallel-state",
     {"start": {"parallel": {"geo": {"start": tool(next="inner"), "inner": END}}, "next": "m"},
      "m": args("<<steps.start.result.geo>>", done=True)}, []),
    ("after-the-join-inner-states-are-not-visible",
     {"start": {"parallel": {"geo": {"start": tool(next="inner"), "inner": END}}, "next": "m"},
      "m": args("<<steps.inner.result>>", done=True)},
     [("state 'm'", "steps.inner")]),
    ("map-item-in-a-parallel-inside-a-map",
     map_flow({"start": {"parallel": {"p": {"start": args("<<item>>", done=True)}},
                         "done": True}}), []),
    # loops
    ("self-loop-never-done", {"start": tool(next="start")},
     [("loop through 'start'", "never reach", "done")]),
    ("loop-never-done", {"start": tool(next="a"), "a": tool(next="b"), "b": tool(next="a")},
     [("loop through 'a', 'b'", "never reach")]),
    ("loop-with-a-branch-out", {"start": tool(branch=[{"if": "result", "then": "end"},
                                                      {"else": "start"}]), "end": END}, []),
    ("loop-with-an-on-error-exit", {"start": tool(next="start", on_error="end"), "end": END}, []),
    ("loop-whose-on-error-stays-in-it",
     {"start": tool(next="a", on_error="a"), "a": tool(next="start")},
     [("loop through 'start', 'a'", "never reach")]),
    ("branch-without-else-that-only-loops",
     {"start": tool(branch=[{"if": "result", "then": "start"}])},
     [("loop through 'start'", "never reach")]),
    ("unreachable-loop-is-left-to-the-unreachable-warning",
     {"start": END, "i1": tool(next="i2"), "i2": tool(next="i1")}, []),
    ("loop-never-done-inside-a-branch",
     branch_flow({"start": tool(next="x"), "x": tool(next="start")}),
     [("state 'start': branch 'b': loop through 'start', 'x'", "never reach")]),
    ("loop-never-done-inside-a-map", map_flow({"start": {"wait": {"seconds": 1}, "next": "start"}}),
     [("state 'start': map: loop through 'start'", "never reach")]),
]  # fmt: skip


def has(messages: list[str], needles: tuple[str, ...]) -> bool:
    return any(all(n in m for n in needles) for m in messages)


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors(raw: dict[str, Any], expected: list[tuple[str, ...]]) -> None:
    errors, _ = flowcheck.check(raw)
    assert len(errors) == len(expected), errors
    for needles in expected:
        assert has(errors, needles), (needles, errors)


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_reports_them(raw: dict[str, Any], expected: list[tuple[str, ...]]) -> None:
    v = parse(raw)
    for needles in expected:
        assert has(v.errors, needles), (needles, v.errors)
    if not expected:
        assert v.errors == [] and v.flow is not None


# (id, flow, warning needles or None for no warning)
LOOP_WARNINGS: list[tuple[str, dict[str, Any], tuple[str, ...] | None]] = [
    ("loop-of-tools", {"start": tool(branch=[{"if": "result", "then": "end"},
                                             {"else": "start"}]), "end": END},
     ("loop through 'start'", "no gate or wait", "step limit")),
    ("loop-with-a-gate", {"start": tool(next="g"),
                          "g": {"tool": None, "branch": [{"if": "result", "then": "end"},
                                                         {"else": "start"}]}, "end": END}, None),
    ("loop-with-a-wait", {"start": tool(next="w"),
                          "w": {"wait": {"seconds": 60}, "next": "c"},
                          "c": tool(branch=[{"if": "result", "then": "end"}, {"else": "start"}]),
                          "end": END}, None),
    ("loop-with-a-gate-inside-a-parallel",
     {"start": {"parallel": {"p": {"start": {"tool": None, "done": True}}},
                "branch": [{"if": "result.p", "then": "end"}, {"else": "start"}]}, "end": END},
     None),
    ("loop-in-a-branch", branch_flow({"start": tool(branch=[{"if": "result", "then": "e"},
                                                             {"else": "start"}]), "e": END}),
     ("state 'start': branch 'b': loop through 'start'", "no gate or wait")),
    ("no-loop", {"start": tool(next="end"), "end": END}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "needles"), [c[1:] for c in LOOP_WARNINGS], ids=[c[0] for c in LOOP_WARNINGS]
)
def test_loop_warnings(raw: dict[str, Any], needles: tuple[str, ...] | None) -> None:
    v = parse(raw)
    assert v.errors == [] and v.flow is not None
    if needles is None:
        assert v.warnings == []
    else:
        assert len(v.warnings) == 1 and has(v.warnings, needles), v.warnings


# -- unknown tools --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("serch", "state 'start': unknown tool 'serch'; did you mean 'search'?"),
        ("ech", "state 'start': unknown tool 'ech'; did you mean 'echo'?"),
        ("zzzzzz", "state 'start': unknown tool 'zzzzzz'"),
    ],
)
def test_unknown_tool_suggests_a_close_name(name: str, message: str) -> None:
    v = parse({"start": {"tool": name, "done": True}}, tools={"search", "echo", "http"})
    assert v.errors == [message]


def test_unknown_tool_in_a_branch_gets_a_suggestion_too() -> None:
    raw = branch_flow({"start": {"tool": "serch", "done": True}})
    errors = parse(raw, tools={"search", "x"}).errors
    assert has(errors, ("branch 'b'", "unknown tool 'serch'; did you mean 'search'?")), errors


def test_suggestions_from_a_registry() -> None:
    from daemon.tools import Registry, builtin

    reg = Registry()
    reg.add_module(builtin)
    errors = parse({"start": {"tool": "htp", "args": {}, "done": True}}, tools=reg).errors
    assert errors == ["state 'start': unknown tool 'htp'; did you mean 'http'?"]


# -- what the parser already said is not said twice ------------------------------------------


def test_syntax_errors_are_the_parsers_alone() -> None:
    errors = parse({"start": args("<<steps.nope.result +>>", done=True)}).errors
    assert len(errors) == 1 and "syntax" in errors[0], errors


def test_reserved_names_are_the_parsers_alone() -> None:
    errors = parse({"start": args("<<loop.index>>", done=True)}).errors
    assert len(errors) == 1, errors


def test_refs_of_plain_paths_and_expressions() -> None:
    assert flowcheck.refs("steps.a.result[0].id") == flowcheck.Refs(
        frozenset({"steps"}), frozenset({"a"})
    )
    assert flowcheck.refs("steps['a b'].status == 'done' and input.x") == flowcheck.Refs(
        frozenset({"steps", "input"}), frozenset({"a b"})
    )
    assert flowcheck.refs("steps[input.k]") == flowcheck.Refs(
        frozenset({"steps", "input"}), frozenset()
    )
    assert flowcheck.refs("input.(") is None


# -- the app ---------------------------------------------------------------------------------


async def test_validate_reports_them(client: httpx.AsyncClient) -> None:
    flow = {
        "start": {"tool": "ech", "args": {"a": "<<steps.nope.result>>"}, "next": "loop"},
        "loop": {"tool": "echo", "branch": [{"if": "result", "then": "end"}, {"else": "loop"}]},
        "end": {"tool": "echo", "args": {"b": "<<inputs.b>>"}, "done": True},
    }
    resp = await client.post("/api/workflow/validate", json={"name": "c", "flow": flow})
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["valid"] is False
    errors = answer["errors"]
    assert "state 'start': unknown tool 'ech'; did you mean 'echo'?" in errors
    assert has(errors, ("state 'start'", "field 'args'", "steps.nope"))
    assert has(errors, ("state 'end'", "'inputs'"))
    assert len(errors) == 3, errors
    assert has(answer["warnings"], ("loop through 'loop'", "no gate or wait"))


async def test_create_refuses_a_loop_that_never_ends(client: httpx.AsyncClient) -> None:
    flow = {"start": {"tool": "echo", "next": "start"}}
    resp = await client.post("/api/workflow", json={"name": "c", "flow": flow})
    assert resp.status_code == 422
    assert "loop through 'start' can never reach a state with done: true" in resp.json()["error"]


def test_a_long_loop_is_named_by_its_first_states() -> None:
    raw = {"start": tool(next="s1"), **{f"s{i}": tool(next=f"s{i + 1}") for i in range(1, 30)},
           "s30": tool(next="start")}  # fmt: skip
    (error,) = flowcheck.check(raw)[0]
    assert error.startswith("loop through 'start', 's1', 's2', 's3', 's4', 's5', 's6', 's7', "
                            "'s8', 's9' and 21 more states can never reach")  # fmt: skip


def test_a_gate_on_one_path_does_not_hide_a_loop_without_one() -> None:
    # a <-> b spins on its own; the gate only sits on the way b -> g -> a.
    raw = {
        "start": tool(next="a"),
        "a": tool(branch=[{"if": "result", "then": "end"}, {"else": "b"}]),
        "b": tool(branch=[{"if": "result", "then": "g"}, {"else": "a"}]),
        "g": {"tool": None, "next": "a"},
        "end": END,
    }
    v = parse(raw)
    assert v.errors == []
    assert v.warnings == ["loop through 'a', 'b' has no gate or wait: only the step limit "
                          "stops it if it never leaves"]  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(
        ["start", "a", "<<steps.a.result>>", "<<item>>", "{{ x +", "result"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["start", "a", "tool", "next", "branch", "done", "args",
                                       "parallel", "map", "wait", "flow", "items", "as", "if",
                                       "then", "else", "on_error", "until"]), inner, max_size=4),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_junk_never_raises(raw: Any) -> None:
    errors, warnings = flowcheck.check(raw)
    assert all(isinstance(m, str) for m in [*errors, *warnings])


def test_deep_nesting_is_looked_into_only_so_far() -> None:
    raw: dict[str, Any] = {"start": args("<<nope>>", done=True)}
    for _ in range(200):
        raw = {"start": {"parallel": {"p": raw}, "done": True}}
    assert flowcheck.check(raw) == ([], [])
