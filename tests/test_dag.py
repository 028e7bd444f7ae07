"""The DAG input shape: compiled into a named-state flow (pure tables), and accepted by
create and validate in place of `flow` (the real app)."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import openapi
from daemon.dag import compile_steps
from daemon.flow import parse


def compiled(steps: list[Any]) -> dict[str, Any]:
    flow, errors = compile_steps(steps)
    assert errors == [], errors
    assert flow is not None
    return flow


def errors_of(steps: Any) -> list[str]:
    flow, errors = compile_steps(steps)
    assert flow is None and errors
    return errors


def step(sid: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"id": sid, "tool": "echo", **({"depends_on": list(deps)} if deps else {}), **fields}


def order(flow: dict[str, Any]) -> list[str]:
    """The top-level state ids in run order, from 'start' along `next`."""
    out, sid = [], "start"
    while True:
        out.append(sid)
        if flow[sid].get("done"):
            return out
        sid = flow[sid]["next"]


# -- compiling: the shapes ----------------------------------------------------------------


def test_a_chain_is_a_chain_of_states_named_after_the_steps() -> None:
    flow = compiled([step("a"), step("b", "a"), step("c", "b")])
    assert order(flow) == ["start", "b", "c"]
    assert flow["start"] == {"name": "a", "tool": "echo", "args": {}, "next": "b"}
    assert flow["c"] == {"name": "c", "tool": "echo", "args": {}, "done": True}


def test_input_order_does_not_matter() -> None:
    flow = compiled([step("c", "b"), step("b", "a"), step("a")])
    assert order(flow) == ["start", "b", "c"]
    assert flow["start"]["name"] == "a"


def test_independent_steps_run_in_a_parallel_state_with_branches_named_after_them() -> None:
    flow = compiled([step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")])
    assert order(flow) == ["start", "parallel_1", "d"]
    par = flow["parallel_1"]
    assert set(par["parallel"]) == {"b", "c"}
    assert par["parallel"]["b"] == {"start": {"name": "b", "tool": "echo", "args": {},
                                              "done": True}}  # fmt: skip
    assert par["next"] == "d"


def test_independent_first_steps_are_the_start_state() -> None:
    flow = compiled([step("x"), step("y"), step("z", "x", "y")])
    assert order(flow) == ["start", "z"]
    assert set(flow["start"]["parallel"]) == {"x", "y"}


def test_levels_of_a_general_dag() -> None:
    # a -> b -> d, a -> c, e alone: levels [a, e], [b, c], [d]
    flow = compiled([step("a"), step("b", "a"), step("c", "a"), step("d", "b"), step("e")])
    assert order(flow) == ["start", "parallel_2", "d"]
    assert set(flow["start"]["parallel"]) == {"a", "e"}
    assert set(flow["parallel_2"]["parallel"]) == {"b", "c"}


def test_needs_human_puts_a_gate_before_the_step() -> None:
    flow = compiled([step("a"), step("b", "a", needs_human=True)])
    assert order(flow) == ["start", "approve_b", "b"]
    assert flow["approve_b"]["tool"] is None and flow["approve_b"]["next"] == "b"


def test_needs_human_on_the_first_step_makes_start_the_gate() -> None:
    flow = compiled([step("a", needs_human=True), step("b", "a")])
    assert order(flow) == ["start", "a", "b"]
    assert flow["start"]["tool"] is None


def test_needs_human_in_a_parallel_level_gates_only_its_branch() -> None:
    flow = compiled([step("a"), step("b", needs_human=True), step("c", "a", "b")])
    branches = flow["start"]["parallel"]
    assert branches["a"] == {"start": {"name": "a", "tool": "echo", "args": {}, "done": True}}
    assert branches["b"]["start"]["tool"] is None and branches["b"]["start"]["next"] == "b"
    assert branches["b"]["b"]["done"] is True


def test_generated_ids_never_take_a_step_id() -> None:
    flow = compiled([step("approve_b"), step("parallel_1"), step("b", "approve_b", "parallel_1",
                                                                  needs_human=True)])  # fmt: skip
    assert order(flow) == ["start", "approve_b_2", "b"]
    flow = compiled([step("x"), step("y"), step("parallel_2", "x"), step("q", "x"),
                     step("z", "parallel_2", "q")])  # fmt: skip
    assert order(flow) == ["start", "parallel_2_2", "z"]
    assert set(flow["parallel_2_2"]["parallel"]) == {"parallel_2", "q"}


def test_a_step_named_start_later_in_the_flow() -> None:
    flow = compiled([step("a"), step("start", "a")])
    assert order(flow) == ["start", "start_2"]
    assert flow["start_2"]["name"] == "start"


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        ({"type": "http_request", "config": {"url": "https://x.test/a"}},
         {"tool": "http", "args": {"method": "GET", "url": "https://x.test/a"}}),
        ({"type": "webhook", "config": {"url": "https://x.test/h", "json": {"a": 1}}},
         {"tool": "http", "args": {"method": "POST", "url": "https://x.test/h", "json": {"a": 1}}}),
        ({"type": "http_request", "config": {"url": "https://x.test", "method": "PUT"}},
         {"tool": "http", "args": {"method": "PUT", "url": "https://x.test"}}),
        ({"type": "wait", "config": {"seconds": 30}}, {"wait": {"seconds": 30}}),
        ({"type": "wait", "config": {"signal": "paid", "timeout": 60}},
         {"wait": {"signal": "paid", "timeout": 60}}),
        ({"type": "agent_task", "config": {"goal": "g"}},
         {"tool": "agent_task", "args": {"goal": "g"}}),
        ({"tool": "echo", "args": {"a": 1}}, {"tool": "echo", "args": {"a": 1}}),
        ({"tool": None}, {"tool": None, "args": {}}),
        ({"agent": "web_search", "action": "SEARCH_WEB", "args": {"query": "q"}, "outputs": ["r"]},
         {"tool": "web_search", "args": {"query": "q"}}),
        ({"tool": "echo", "timeout": 5, "retry": {"max_attempts": 2}, "name": "Echo"},
         {"tool": "echo", "args": {}, "timeout": 5, "retry": {"max_attempts": 2}, "name": "Echo"}),
    ],
)  # fmt: skip
def test_step_types(fields: dict[str, Any], state: dict[str, Any]) -> None:
    flow = compiled([{"id": "s", **fields}])
    assert flow["start"] == {"name": "s", **state, "done": True}


def test_the_seeds_create_example() -> None:
    steps = [
        {"id": "fetch", "type": "http_request",
         "config": {"method": "GET", "url": "https://api.example.com/data"}},
        {"id": "notify", "type": "agent_task",
         "config": {"agent_id": "agent_123", "goal": "Summarize the fetched data"},
         "depends_on": ["fetch"]},
    ]  # fmt: skip
    flow = compiled(steps)
    assert flow == {
        "start": {"name": "fetch", "tool": "http",
                  "args": {"method": "GET", "url": "https://api.example.com/data"},
                  "next": "notify"},
        "notify": {"name": "notify", "tool": "agent_task",
                   "args": {"agent_id": "agent_123", "goal": "Summarize the fetched data"},
                   "done": True},
    }  # fmt: skip


# -- compiling: templates that read other steps ------------------------------------------


def test_reading_the_first_step_reads_the_start_state() -> None:
    flow = compiled([step("a"), step("b", "a", args={"x": "<<steps.a.result.n>>",
                                                     "y": "{{ steps['a'].status }}"})])  # fmt: skip
    assert flow["b"]["args"] == {"x": "<<steps.start.result.n>>", "y": "{{ steps.start.status }}"}


def test_reading_a_step_that_ran_in_parallel_reads_its_branch_slot() -> None:
    flow = compiled([
        step("a"), step("b"), step("c", "a", "b", args={
            "both": "<<[steps.a.result, steps.b.status]>>", "text": "got <<steps.b.result.v>>!",
            "literal": "<<'steps.a.result' ~ steps.a.result>>"}),
    ])  # fmt: skip
    assert flow["c"]["args"] == {
        "both": "<<[steps.start.result.a, steps.start.status]>>",
        "text": "got <<steps.start.result.b.v>>!",
        "literal": "<<'steps.a.result' ~ steps.start.result.a>>",
    }


def test_a_step_id_that_is_no_name_is_read_with_brackets() -> None:
    read = {"x": "<<steps['my-a'].result>>"}
    flow = compiled([step("my-a"), step("b"), step("c", "my-a", "b", args=read)])
    assert flow["c"]["args"] == {"x": "<<steps.start.result['my-a']>>"}


def test_a_branch_reading_the_start_step_gets_a_no_op_start() -> None:
    # Inside a branch `steps.start` is the branch's own first state, so the step the
    # branches read may not be the flow's 'start'.
    flow = compiled([step("a"), step("b", "a", args={"x": "<<steps.a.result>>"}), step("c", "a")])
    assert order(flow) == ["start", "a", "parallel_1"]
    assert flow["start"] == {"name": "start", "tool": "echo", "args": {}, "next": "a"}
    assert flow["parallel_1"]["parallel"]["b"]["start"]["args"] == {"x": "<<steps.a.result>>"}


def test_names_that_are_not_steps_are_left_alone() -> None:
    args = {"x": "<<input.steps>>", "y": "<<steps.zzz.result>>", "z": "<<result.a>>"}
    flow = compiled([step("a", args=args)])
    assert flow["start"]["args"] == args


# -- validation ---------------------------------------------------------------------------

INVALID: list[tuple[str, Any, list[str]]] = [
    ("not-a-list", {"a": 1}, ["field 'steps' must be a non-empty list of steps"]),
    ("empty", [], ["field 'steps' must be a non-empty list of steps"]),
    ("missing-dependency", [step("notify", "fetch")],
     ["Step 'notify' depends on 'fetch' which doesn't exist"]),
    ("cycle", [step("step_a", "step_b"), step("step_b", "step_a")],
     ["Cycle detected: step_a → step_b → step_a"]),
    ("self-cycle", [step("a", "a")], ["Cycle detected: a → a"]),
    ("long-cycle", [step("a", "c"), step("b", "a"), step("c", "b"), step("d", "c")],
     ["Cycle detected: a → b → c → a"]),
    ("two-cycles", [step("a", "b"), step("b", "a"), step("c", "d"), step("d", "c")],
     ["Cycle detected: a → b → a", "Cycle detected: c → d → c"]),
    ("duplicate", [step("a"), step("a")], ["Duplicate step id 'a'"]),
    ("missing-id", [{"tool": "echo"}], ["steps[0]: field 'id' is required (a non-empty string)"]),
    ("id-int", [{"id": 3, "tool": "echo"}],
     ["steps[0]: field 'id' is required (a non-empty string)"]),
    ("not-object", [step("a"), "b"], ["steps[1]: must be an object"]),
    ("no-tool", [{"id": "a"}], ["step 'a': needs exactly one of 'tool' or 'type' (found: none)"]),
    ("tool-and-type", [{"id": "a", "tool": "x", "type": "y"}],
     ["step 'a': needs exactly one of 'tool' or 'type' (found: tool, type)"]),
    ("tool-int", [{"id": "a", "tool": 1}],
     ["step 'a': field 'tool' must be a tool name or null (a gate)"]),
    ("type-empty", [{"id": "a", "type": ""}],
     ["step 'a': field 'type' must be a non-empty string"]),
    ("args-list", [step("a", args=[1])], ["step 'a': field 'args' must be an object"]),
    ("config-string", [{"id": "a", "type": "x", "config": "c"}],
     ["step 'a': field 'config' must be an object"]),
    ("args-and-config", [step("a", args={}, config={})],
     ["step 'a': has both 'args' and 'config'; give one"]),
    ("depends-string", [step("a", depends_on="b")],
     ["step 'a': field 'depends_on' must be a list of step ids"]),
    ("needs-human-string", [step("a", needs_human="yes")],
     ["step 'a': field 'needs_human' must be true or false"]),
    ("unknown-field", [step("a", dependson=["b"])], ["step 'a': unknown field 'dependson'"]),
    ("wait-config", [{"id": "w", "type": "wait", "config": {"duration": 5}}],
     ["step 'w': a wait's config has no field 'duration' "
      "(seconds, until, or signal with timeout)"]),
    ("reads-a-step-it-does-not-depend-on", [step("a"), step("b", args={"x": "<<steps.a.result>>"})],
     ["Step 'b' reads steps.a but does not depend on 'a' (add it to depends_on)"]),
    ("reads-attempt-of-a-parallel-step",
     [step("a"), step("b"), step("c", "a", "b", args={"n": "<<steps.a.attempt>>"})],
     ["Step 'c' reads steps.a.attempt: a step that ran in parallel with others keeps only "
      ".result and .status"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_steps_are_reported_in_these_words(steps: Any, expected: list[str]) -> None:
    assert errors_of(steps) == expected


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of([step("a", "ghost"), step("b", "c"), step("c", "b"), {"id": "d"}])
    assert errors == [
        "step 'd': needs exactly one of 'tool' or 'type' (found: none)",
        "Step 'a' depends on 'ghost' which doesn't exist",
        "Cycle detected: b → c → b",
    ]


def test_a_long_chain_compiles_without_recursion() -> None:
    steps = [step("s0")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, 3000)]
    flow = compiled(steps)
    assert len(flow) == 3000 and flow["s2999"]["done"] is True
    cyclic = [step("s0", "s2999")] + steps[1:]
    (error,) = errors_of(cyclic)
    assert error.startswith("Cycle detected: s0 → s1 → s2") and error.endswith("s2999 → s0")


# -- the API ------------------------------------------------------------------------------


async def test_validate_accepts_the_dag_shape(client: httpx.AsyncClient) -> None:
    body = {"name": "dag", "steps": [
        step("a"), step("b", "a", args={"x": "<<steps.a.result>>"}), step("c", "a"),
        {"id": "fetch", "type": "http_request", "config": {"url": "https://example.test/x"},
         "depends_on": ["a"]},
        {"id": "hold", "type": "wait", "config": {"seconds": 5}, "depends_on": ["b"]},
        {"id": "hook", "type": "webhook", "config": {"url": "https://example.test/h",
                                                     "json": "<<steps.fetch.result>>"},
         "depends_on": ["fetch"], "needs_human": True},
        step("d", "b", "c", "hold", "hook", needs_human=True,
             args={"all": "<<[steps.b.result, steps.c.status, steps.hook.result]>>"}),
    ]}  # fmt: skip
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"valid": True, "errors": [], "warnings": []}


async def test_validate_a_chain_with_a_gate(client: httpx.AsyncClient) -> None:
    body = {"name": "dag", "steps": [step("a", args={"v": "<<input.v>>"}),
                                      step("b", "a", args={"got": "<<steps.a.result>>"},
                                           needs_human=True)]}  # fmt: skip
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.json() == {"valid": True, "errors": [], "warnings": []}


async def test_validate_reports_dag_errors_in_the_seed_words(client: httpx.AsyncClient) -> None:
    body = {"name": "dag", "steps": [step("notify", "fetch"), step("step_a", "step_b"),
                                      step("step_b", "step_a")]}  # fmt: skip
    resp = await client.post("/api/workflow/validate", json=body)
    assert resp.json() == {
        "valid": False,
        "errors": ["Step 'notify' depends on 'fetch' which doesn't exist",
                   "Cycle detected: step_a → step_b → step_a"],
        "warnings": [],
    }  # fmt: skip


async def test_validate_reports_problems_of_the_compiled_flow(client: httpx.AsyncClient) -> None:
    body = {"name": "dag", "steps": [step("a"), {"id": "b", "tool": "no_such_tool",
                                                 "depends_on": ["a"]}]}  # fmt: skip
    answer = (await client.post("/api/workflow/validate", json=body)).json()
    assert answer["valid"] is False
    assert any("'b'" in e and "no_such_tool" in e for e in answer["errors"]), answer


async def test_flow_and_steps_together_is_an_error(client: httpx.AsyncClient) -> None:
    body = {"name": "x", "steps": [step("a")],
            "flow": {"start": {"tool": "echo", "done": True}}}  # fmt: skip
    answer = (await client.post("/api/workflow/validate", json=body)).json()
    assert answer["valid"] is False
    assert "give either 'flow' or 'steps' (the DAG shape), not both" in answer["errors"]
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422, resp.text


async def test_neither_flow_nor_steps_is_400(client: httpx.AsyncClient) -> None:
    resp = await client.post("/api/workflow", json={"name": "x"})
    assert resp.status_code == 400
    assert resp.json() == {"error": "Missing required field: flow"}


async def test_create_from_steps_runs_the_compiled_flow(client: httpx.AsyncClient) -> None:
    from tests.helpers import wait_for

    body = {"name": "dag-run", "input": {"v": 7},
            "steps": [step("a", args={"v": "<<input.v>>"}),
                      step("b", "a", args={"got": "<<steps.a.result.v>>"})]}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "completed", wf
    assert [s["name"] for s in wf["steps"]] == ["a", "b"]
    assert wf["flow"]["b"]["args"] == {"got": "<<steps.start.result.v>>"}
    assert wf["steps"][1]["result_json"] == '{"got":7}'
    assert wf["dag"] == body["steps"]  # the submitted steps, beside the compiled flow
    doc = openapi.document()
    schema = {"$ref": "#/components/schemas/Workflow", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(wf)


async def test_a_workflow_from_a_flow_has_no_dag(client: httpx.AsyncClient) -> None:
    from tests.helpers import wait_for

    body = {"name": "plain", "flow": {"start": {"tool": "echo", "done": True}}}
    resp = await client.post("/api/workflow", json=body)
    wf = await wait_for(client, resp.json()["id"])
    assert wf["dag"] is None


async def test_parallel_steps_run_and_later_steps_read_them(client: httpx.AsyncClient) -> None:
    from tests.helpers import wait_for

    body = {"name": "dag-par", "input": {"v": 2}, "steps": [
        step("a", args={"v": "<<input.v>>"}),
        step("b", "a", args={"x": "<<steps.a.result.v * 10>>"}),
        step("c", "a", args={"y": "<<steps.a.result.v + 1>>"}),
        step("d", "b", "c", args={"sum": "<<steps.b.result.x + steps.c.result.y>>",
                                  "st": "<<steps.b.status>>"}),
    ]}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "completed", wf
    assert wf["output"] == {"sum": 23, "st": "done"}
    assert sorted(wf["flow"]) == ["a", "d", "parallel_1", "start"]  # echo start: see dag.py


# -- random DAGs ---------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Steps s0..sN, each depending on some earlier ones (acyclic), some gated, some
    reading what they depend on, in a shuffled order."""
    n = draw(st.integers(1, 12))
    steps = []
    for i in range(n):
        deps = sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
        reads = {f"r{d}": f"<<steps.s{d}.result>>" for d in deps if draw(st.booleans())}
        steps.append(step(f"s{i}", *(f"s{d}" for d in deps), args=reads,
                          needs_human=draw(st.booleans())))  # fmt: skip
    return draw(st.permutations(steps))


def runs(flow: dict[str, Any]) -> list[list[str]]:
    """The step ids each top-level state runs, in run order (gates and no-ops left out)."""
    out = []
    for sid in order(flow):
        state = flow[sid]
        if "parallel" in state:
            out.append(sorted(state["parallel"]))
        elif state.get("tool") is not None and not (
            sid == "start" and state["tool"] == "echo" and state["name"] == "start"
        ):
            out.append([state["name"]])
    return out


@settings(max_examples=200, deadline=None)
@given(dags())
def test_random_dags_run_each_step_once_after_what_it_depends_on(steps: list[Any]) -> None:
    flow = compiled(steps)
    v = parse(flow)
    assert v.errors == [], v.errors
    done_before: set[str] = set()
    seen = []
    for level in runs(flow):
        for sid in level:
            deps = next(s for s in steps if s["id"] == sid).get("depends_on", [])
            assert set(deps) <= done_before, (sid, deps, done_before)
        done_before |= set(level)
        seen += level
    assert sorted(seen) == sorted(s["id"] for s in steps)
