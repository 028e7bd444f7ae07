"""Table tests of the pure parts of parallel, map and wait states: the join, redrive
planning, scope resolution and wait times (no database, no clock)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from daemon import flow as flows
from daemon.engine import merge_patch, redrive_plan
from daemon.executor import WorkflowInfo, build_scope
from daemon.models import NewStep, Step
from daemon.storage.base import _joined, in_branch
from daemon.templating import needs


def row(key: str, status: str, result: Any = None, error: str | None = None) -> dict[str, Any]:
    return {"key": key, "status": status, "error": error, "error_type": error and "ToolError",
            "result_json": None if result is None else orjson.dumps(result).decode()}  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "kind", "join", "expected"),
    [
        ([row("a", "done", 1), row("b", "done", {"x": 2})], "parallel", "fail_fast",
         {"a": 1, "b": {"x": 2}}),
        ([row("a", "done", 1), row("b", "failed", error="no")], "parallel", "all_settled",
         {"a": {"status": "done", "result": 1},
          "b": {"status": "failed", "error": {"message": "no", "type": "ToolError"}}}),
        ([row("0", "done", "x"), row("1", "failed", error="e"), row("2", "done", None)],
         "map", "fail_fast", ["x", {"error": {"message": "e", "type": "ToolError"}}, None]),
        ([], "map", "fail_fast", []),
        ([row('we"ird', "done", True)], "parallel", "fail_fast", {'we"ird': True}),
    ],
)  # fmt: skip
def test_join(rows: list[dict[str, Any]], kind: str, join: str, expected: Any) -> None:
    assert orjson.loads(_joined(rows, kind, join)) == expected


FLOW = flows.parse({
    "start": {"parallel": {"a": {"start": {"tool": "echo", "done": True}},
                           "b": {"start": {"tool": "echo", "next": "c"},
                                 "c": {"tool": "echo", "done": True}}}, "next": "m"},
    "m": {"map": {"items": "<<input.xs>>", "as": "x",
                  "flow": {"start": {"tool": "echo", "args": {"v": "<<x>>"}, "done": True}}},
          "next": "w"},
    "w": {"wait": {"seconds": 5}, "done": True},
}).flow  # fmt: skip
INFO = WorkflowInfo(1, "t", "james", FLOW, "{}")


def step(state: str, scope: list[Any] | None = None, status: str = "failed", **kw: Any) -> Step:
    return Step(id=kw.pop("id", 10), workflow_id=1, state=state, name=state, tool="echo",
                status=status, seq=3, attempt=1, run_at=0, created_at=0,
                scope=None if scope is None else orjson.dumps(scope).decode(), **kw)  # fmt: skip


def test_scopes_resolve_to_nested_flows() -> None:
    assert FLOW.resolve(None) is FLOW
    assert set(FLOW.resolve(["start", "b"]).states) == {"start", "c"}
    assert FLOW.resolve(["m", 7])["start"].args == {"v": "<<x>>"}
    assert INFO.state(step("c", ["start", "b"])).id == "c"
    assert [(scope, s.id) for scope, s in FLOW.walk()][:4] == [
        ((), "start"), (("start", "a"), "start"), (("start", "b"), "start"),
        (("start", "b"), "c")]  # fmt: skip


def test_redrive_plans() -> None:
    # A plain state is visited again.
    plan = redrive_plan(INFO, step("w"), None)
    assert plan.state == "w" and plan.step is not None and plan.step.tool == ":wait"
    # from_step wins over where it failed.
    plan = redrive_plan(INFO, step("w"), "m")
    assert plan.step is not None and plan.step.state == "m" and plan.step.tool == ":map"
    # A failed parallel reopens its failed branches, each at its own start.
    par = step("start", status="failed", id=5)
    plan = redrive_plan(INFO, par, None)
    assert plan.parent is par and plan.firsts is not None and set(plan.firsts) == {"a", "b"}
    assert plan.firsts["b"].scope == '["start","b"]' and plan.firsts["b"].parent_id == 5
    # A failed map reopens its failed items, at most max_concurrency at once.
    plan = redrive_plan(INFO, step("m", status="cancelled", id=6), None)
    assert plan.limit == 10 and plan.firsts is not None
    item = in_branch(plan.firsts["*"], 6, "4")
    assert (item.parent_id, item.branch, item.scope) == (6, "4", '["m",4]')
    # A parallel that succeeded but whose workflow failed after it: visited again.
    assert redrive_plan(INFO, step("start", status="done"), None).step is not None


def test_first_step_of_a_map_item_needs_its_scope() -> None:
    with pytest.raises(AssertionError):
        in_branch(NewStep("start", "start", "echo", 1), 6, "1")


def test_branch_steps_override_the_enclosing_flows() -> None:
    outer = step("start", status="done", result_json='{"n": 1}', id=1)
    inner = step("start", ["start", "a"], status="done", result_json='{"n": 2}', id=2)
    scope = build_scope(INFO, [outer, inner], None, needs(["steps.start.result.n"], {"start"}),
                        {"x": "[1]", "index": "0"})  # fmt: skip
    assert orjson.loads(scope.payload())["steps"]["start"]["result"] == {"n": 2}
    scope = build_scope(INFO, [], None, needs(["x", "index"], set()), {"x": "[1]", "index": "3"})
    assert orjson.loads(scope.payload()) == {"x": [1], "index": 3}


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1_700_000_000_000, 1_700_000_000_000),
        ("2026-12-03T10:00:00Z", 1796292000000),
        ("2026-12-03T11:00:00+01:00", 1796292000000),
        ("2026-12-03T10:00:00", None),  # no offset: ambiguous
        ("tomorrow", None),
        (True, None),
        (-1, None),
        (float("nan"), None),
    ],
)
def test_wait_until_instants(value: Any, ms: int | None) -> None:
    assert flows.parse_instant(value) == ms


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}},
         {"a": 1, "b": {"d": 3, "e": 4}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": 1}, {"a": {"b": None}}, {"a": {}}),
        ({}, {"new": {"x": 1}}, {"new": {"x": 1}}),
    ],
)  # fmt: skip
def test_merge_patch_rfc_7386(target: Any, patch: Any, expected: Any) -> None:
    assert merge_patch(target, patch) == expected
