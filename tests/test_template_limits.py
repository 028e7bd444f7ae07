"""Expressions cannot hold the daemon: an adversarial corpus through the real app.

Every expression but a plain path runs in the sandbox process (daemon/evaluator.py),
which is stopped past [limits] template_ms of CPU or template_mb of growth. These tests
run each attack as a real workflow and check that it fails clearly (naming the state,
not retried), that the event loop kept answering, and that this process (the daemon)
did not grow; the bounds are generous, the attacks cost minutes and gigabytes in-process.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from daemon import evaluator
from daemon.evaluator import Evaluator
from daemon.placeholders import TemplateError
from daemon.sandbox import render_value
from daemon.templating import Fallback, Scope, _check, check_expression, needs, path, read
from tests.helpers import Watch, wait_for, waiting_gate

SPLITS = "[" + ",".join(["('ab '*333333).split()"] * 20) + "]|length"  # 462 MB, 470 characters
# template_ms or template_mb: whichever is reached first (sorting and concatenating lists
# also churn the address space the sandbox limits)
CPU_OR_MEMORY = "template_m"
# (expression, what the error says)
CORPUS = [
    # quadratic filters: list concatenation in sum, sorting a million characters
    ("([[0]] * 333333)|sum(start=[])|length", CPU_OR_MEMORY),
    ("('a' * 999999)|list|sort|join('x')|length", CPU_OR_MEMORY),
    ("(('ab ' * 333333).split())|unique|list|sort|reverse|join(' ')|length", CPU_OR_MEMORY),
    # big repeats and allocations: 462 MB of split strings in half a second
    (SPLITS, CPU_OR_MEMORY),
    ("[" + ",".join(["('x'*999999)|list"] * 20) + "]|length", CPU_OR_MEMORY),
    # big repeats refused outright (a big range names `range`, no name templates know:
    # refused at create, below)
    ("'a' * 10**9", "would build"),
    ("[1] * 10**9", "would build"),
    ("(2 ** 10000) ** 1000", "too large"),
    # string formatting
    ("'%s%s%s' % (1, 2, 3)", "formatting"),
    ("'{0:>999999999}'.format(1)", "not allowed"),
    # text conversions never show object addresses
    ("input.s.lower|string", "not JSON"),
    ("input.s.lower ~ ''", "not JSON"),
    ("[input.s.lower]|join(',')", "not JSON"),
    ("input.s.lower|title", "not JSON"),
]


@pytest.fixture
async def started(make_client: Any) -> AsyncIterator[Any]:
    client, app = await make_client()
    yield client, app


async def _run(client: Any, args: Any = None, branch: str | None = None) -> dict[str, Any]:
    start: dict[str, Any] = {"tool": "echo", "args": args or {}}
    if branch is None:
        start["done"] = True
    else:
        start["branch"] = [{"if": branch, "then": "end"}, {"else": "end"}]
    body = {"name": "attack", "input": {"s": "text", "n": 1},
            "flow": {"start": start, "end": {"tool": "echo", "done": True}}}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 201, resp.text
    return await wait_for(client, resp.json()["id"], timeout=30)


@pytest.mark.parametrize(("expr", "says"), CORPUS, ids=[c[0][:40] for c in CORPUS])
async def test_attack_in_args_fails_the_step_and_leaves_the_daemon_alone(
    started: Any, expr: str, says: str
) -> None:
    client, _ = started
    async with Watch() as watch:
        wf = await _run(client, {"v": "{{" + expr + "}}"})
    assert wf["status"] == "failed"
    step = wf["steps"][0]
    assert step["attempt"] == 1  # not retried
    assert says in step["error"], step["error"]
    assert "state 'start'" in wf["error"]
    assert "0x" not in wf["error"]
    assert watch.lag < 1.0, f"the event loop stalled for {watch.lag:.2f}s"
    assert watch.rss - watch.rss_before < 64 * 2**20
    # The daemon, and the sandbox after being stopped, work as before.
    assert (await client.get("/healthz")).status_code == 200
    ok = await _run(client, {"v": "{{ input.n + 1 }}", "w": "<<input.s>>"})
    assert ok["status"] == "completed"
    assert ok["steps"][0]["result_json"] == '{"v":2,"w":"text"}'


async def test_a_global_such_as_range_is_refused_at_create(started: Any) -> None:
    client, _ = started
    body = {"name": "attack", "flow": {"start": {"tool": "echo", "args": {
        "v": "{{range(10**9)|length}}"}, "done": True}}}  # fmt: skip
    resp = await client.post("/api/workflow", json=body)
    assert resp.status_code == 422
    assert "'range'" in resp.json()["error"] and "not a name" in resp.json()["error"]


@pytest.mark.parametrize(
    "expr", [CORPUS[0][0], SPLITS, "input.s.lower ~ ''"], ids=["cpu", "memory", "address"]
)
async def test_attack_in_a_branch_condition_fails_the_workflow(started: Any, expr: str) -> None:
    client, _ = started
    async with Watch() as watch:
        wf = await _run(client, branch=f"({expr}) > 0")
    assert wf["status"] == "failed"
    assert "state 'start': branch condition failed" in wf["error"]
    assert watch.lag < 1.0


async def test_many_attacks_at_once_are_all_contained(started: Any) -> None:
    client, _ = started
    async with Watch() as watch:
        runs = [_run(client, {"v": "{{" + expr + "}}"}) for expr, _ in CORPUS[:5]]
        done = await asyncio.gather(*runs)
    assert [wf["status"] for wf in done] == ["failed"] * 5
    assert watch.lag < 1.0
    assert watch.rss - watch.rss_before < 64 * 2**20


@pytest.mark.parametrize(
    "expr",
    [
        "(" * 100 + "1" + ")" * 100,
        "[" * 40 + "1" + "]" * 40,
        "-" * 200 + "1",
        "not " * 30 + "input.n",
        "input" + "|first" * 5 + "|length" * 30,
    ],
    ids=["parens", "lists", "negations", "nots", "filters"],
)
async def test_deep_nesting_is_refused_at_create(started: Any, expr: str) -> None:
    client, _ = started
    for flow in (
        {"start": {"tool": "echo", "args": {"v": "{{" + expr + "}}"}, "done": True}},
        {"start": {"tool": "echo", "branch": [{"if": expr, "then": "start"}]}},
    ):
        resp = await client.post("/api/workflow", json={"name": "deep", "flow": flow})
        assert resp.status_code == 422, resp.text
        assert "nested" in resp.json()["error"]
        check = await client.post("/api/workflow/validate", json={"name": "deep", "flow": flow})
        assert check.json()["valid"] is False


async def test_a_tighter_limit_applies(make_client: Any) -> None:
    client, _ = await make_client(template_ms=5.0)
    wf = await _run(client, {"v": "{{ ([1] * 450000)|unique|list|length }}"})  # CPU, no memory
    assert wf["status"] == "failed"
    assert "5 ms" in wf["error"]


async def test_a_plain_path_and_an_expression_render_alike(started: Any) -> None:
    client, _ = started
    args = {"a": "<<input.s>>", "b": "{{ input.s ~ '' }}", "c": "n={{input.n}}/{{input.n * 2}}"}
    wf = await _run(client, args)
    assert wf["steps"][0]["result_json"] == '{"a":"text","b":"text","c":"n=1/2"}'


# -- plain paths, read in the daemon --------------------------------------------------

SCOPE = {
    "input": {"items": [1, 2, 3], "a b": {"c": None}, "nested": [{"x": [10, 20]}], "s": "str"},
    "steps": {"search": {"result": [{"id": 1}, {"id": 2}], "status": "done"}},
}
PATHS = [
    "input.items",
    "input.items[0]",
    "input.items[-1]",
    "input.items.1",
    "input['a b'].c",
    'input["a b"]',
    "input.nested[0].x[1]",
    "steps.search.result[1].id",
    "steps.search.status",
    "input.missing",
    "nope",
    "input.items[7]",  # misses the sandbox words itself: read there
    "input.s.upper",
    "input.items.x",
    "input['missing']",
]


def _scope(values: dict[str, Any]) -> Scope:
    return Scope({name: orjson.dumps(value).decode() for name, value in values.items()})


@pytest.mark.parametrize("expr", PATHS)
async def test_plain_paths_read_in_the_daemon_match_the_sandbox(expr: str) -> None:
    assert path(expr) is not None
    try:
        expected: Any = render_value("{{" + expr + "}}", SCOPE)
    except TemplateError as exc:
        expected = ("error", str(exc))
    evaluator = Evaluator()
    try:
        got: Any = await evaluator.render("{{" + expr + "}}", _scope(SCOPE))
    except TemplateError as exc:
        got = ("error", str(exc))
    finally:
        await evaluator.close()
    assert got == expected


@pytest.mark.parametrize(
    "expr", ["true", "none", "not", "loop.index", "input._x", "input [0]", "a.b-c", "input.x()"]
)
def test_only_plain_paths_are_read_in_the_daemon(expr: str) -> None:
    assert path(expr) is None


def test_a_missing_list_index_falls_back_to_the_sandbox() -> None:
    with pytest.raises(Fallback):
        read("input.items[7]", SCOPE)


def test_needs_names_the_states_an_expression_reads() -> None:
    ids = {"search", "load", "values"}
    assert needs(["steps.search.result", "steps['load']"], ids).states == {"search", "load"}
    assert needs(["steps.search.result", "steps|length"], ids).states is None
    assert needs(["steps[input.which]"], ids).states is None
    assert needs(["steps.keys()"], ids).states is None  # 'keys' is no state: all of them
    assert needs(["input.x"], ids).names == {"input", "x"}


async def test_steps_read_as_a_whole_see_every_state(started: Any) -> None:
    client, _ = started
    flow = {
        "start": {"tool": "echo", "args": {"n": 1}, "next": "two"},
        "two": {"tool": "echo", "args": {"n": 2}, "next": "three"},
        "three": {"tool": "echo", "args": {"count": "{{ steps|length }}",
                                            "two": "<<steps.two.result.n>>"}, "done": True},
    }  # fmt: skip
    resp = await client.post("/api/workflow", json={"name": "all", "flow": flow})
    wf = await wait_for(client, resp.json()["id"])
    assert wf["steps"][-1]["result_json"] == '{"count":2,"two":2}'


async def test_a_cancelled_caller_leaves_the_sandbox_usable() -> None:
    evaluator = Evaluator()
    try:
        scope = _scope({"input": {"n": 1}})
        assert await evaluator.render("{{ input.n + 1 }}", scope) == 2
        slow = asyncio.ensure_future(
            evaluator.render("{{ ([[0]] * 333333)|sum(start=[])|length }}", scope)
        )
        await asyncio.sleep(0.05)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await evaluator.render("{{ input.n + 2 }}", scope) == 3
        assert await evaluator.choose(["input.n > 5", "input.n == 1"], scope) == 1
    finally:
        await evaluator.close()


async def test_memory_is_bounded_when_cpu_would_allow_more(make_client: Any) -> None:
    client, _ = await make_client(template_ms=10_000.0, template_mb=32)
    async with Watch() as watch:
        wf = await _run(client, {"v": "{{" + SPLITS + "}}"})
    assert wf["status"] == "failed"
    assert "more than 32 MB ([limits] template_mb)" in wf["error"]
    assert watch.lag < 1.0
    assert watch.rss - watch.rss_before < 32 * 2**20


async def test_many_expressions_of_one_step_share_a_budget(make_client: Any) -> None:
    client, _ = await make_client(template_ms=60.0)
    # Each takes a millisecond or a few, well within 60 (a loaded machine once stretched one
    # past 30); 900 of them together take more than the step's 600.
    expr = "((input.s * 1000)|list|sort|length) + "
    args = {f"a{i}": "{{ " + expr + str(i) + " }}" for i in range(900)}
    wf = await _run(client, args)
    assert wf["status"] == "failed"
    assert "together" in wf["error"], wf["error"]


@pytest.mark.parametrize(
    "args",
    [
        {f"k{i}": "<<input.blob>>" for i in range(100)},
        {"text": "".join(f"{i}:<<input.blob>>" for i in range(100))},
        {"text": "{{input.list}}" * 100},
    ],
    ids=["references", "interpolated", "json"],
)
async def test_plain_paths_cannot_blow_up_the_args(make_client: Any, args: Any) -> None:
    client, _ = await make_client(template_mb=16)  # rendered args: at most 2 MiB of JSON
    body = {"name": "copies", "input": {"blob": "b" * 100_000, "list": list(range(30_000))},
            "flow": {"start": {"tool": "echo", "args": args, "done": True}}}  # fmt: skip
    async with Watch() as watch:
        resp = await client.post("/api/workflow", json=body)
        wf = await wait_for(client, resp.json()["id"])
    assert wf["status"] == "failed"
    assert "template_mb / 8" in wf["error"]
    assert watch.lag < 1.0


async def test_a_huge_message_from_an_expression_is_cut(started: Any) -> None:
    client, _ = started
    wf = await _run(client, {"v": "{{ {}['k' * 999999] }}"})
    assert wf["status"] == "failed"
    assert len(wf["error"]) < 4100 and len(wf["steps"][0]["error"]) < 4100


async def test_reading_all_of_a_large_history_is_bounded(started: Any) -> None:
    # Eight results of 900 kB of `{}` each: ~170 MB once parsed. The daemon never parses
    # them for an expression that is not a plain path; the sandbox does, within its limit.
    client, _ = started
    flow: dict[str, Any] = {
        f"s{i}": {"tool": "empties", "args": {"n": 300_000}, "next": f"s{i + 1}"} for i in range(8)
    }
    flow["start"] = flow.pop("s0")
    flow["s8"] = {"tool": None, "next": "s9"}  # measured from here on
    flow["s9"] = {"tool": "echo", "args": {"count": "{{ steps|length }}"}, "done": True}
    wf_id = (await client.post("/api/workflow", json={"name": "hoard", "flow": flow})).json()["id"]
    gate = waiting_gate(await wait_for(client, wf_id, waiting_gate, timeout=60))
    assert gate is not None
    gc.collect()
    async with Watch() as watch:
        await client.post(f"/api/workflow/{gate['id']}/ready")
        while (await client.get("/api/workflow", params={"limit": 1})).json()[0][
            "status"
        ] == "running":
            await asyncio.sleep(0.01)
    wf = (await client.get("/api/workflow", params={"limit": 1})).json()[0]
    assert wf["status"] == "failed"
    assert "state 's9'" in wf["error"] and "template_mb" in wf["error"], wf["error"]
    assert watch.lag < 0.5
    assert watch.rss - watch.rss_before < 48 * 2**20


async def test_a_large_value_named_many_times_is_not_copied_past_the_limit(started: Any) -> None:
    client, _ = started
    body = {"name": "copies", "input": {"x": [{}] * 300_000},
            "flow": {"start": {"tool": "echo", "args": {f"a{i}": "{{input.x}}" for i in range(7)},
                               "done": True}}}  # fmt: skip
    async with Watch() as watch:
        resp = await client.post("/api/workflow", json=body)
        wf = await wait_for(client, resp.json()["id"], timeout=30)
    assert wf["status"] == "failed"
    assert CPU_OR_MEMORY in wf["error"], wf["error"]  # two copies fit in 64 MB, or 50 ms
    assert watch.lag < 0.5
    assert watch.rss - watch.rss_before < 96 * 2**20


async def test_a_sandbox_that_cannot_start_fails_no_step(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's fault, not the step's: the step waits in the queue without using an
    # attempt, /healthz says why, and the step runs once the sandbox starts again.
    monkeypatch.setattr(evaluator, "COMMAND", (sys.executable, "-c", "raise SystemExit(3)"))
    client, _ = await make_client()
    body = {"name": "waits", "input": {"n": 1},
            "flow": {"start": {"tool": "echo", "args": {"v": "{{ input.n + 1 }}"},
                               "done": True}}}  # fmt: skip
    wf_id = (await client.post("/api/workflow", json=body)).json()["id"]
    deadline = asyncio.get_running_loop().time() + 10
    while (health := await client.get("/healthz")).status_code == 200:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert health.status_code == 503
    assert "did not start" in health.json()["expression_sandbox"]
    # The step is given back to the queue just after the sandbox is found broken.
    wf = await wait_for(client, wf_id, lambda w: w["steps"][0]["status"] == "pending", timeout=5)
    assert wf["status"] == "running" and wf["steps"][0]["attempt"] == 0
    monkeypatch.undo()
    wf = await wait_for(client, wf_id, timeout=20)
    assert wf["status"] == "completed" and wf["steps"][0]["attempt"] == 1
    assert wf["steps"][0]["result_json"] == '{"v":2}'
    assert (await client.get("/healthz")).status_code == 200


async def test_a_sandbox_killed_while_idle_is_replaced() -> None:
    ev = Evaluator()
    scope = _scope({"input": {"n": 1}})
    try:
        assert await ev.render("{{ input.n + 1 }}", scope) == 2
        (worker,) = ev._idle
        worker.proc.kill()
        await worker.proc.wait()
        assert await ev.render("{{ input.n + 2 }}", scope) == 3
    finally:
        await ev.close()


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("input.s|truncate(9, true, '~', 0)", "some tex~"),
        ("input.s|truncate", "some text that is long enough"),
        ("input.d.get('k')", 1),
        ("input.d.get('missing', 5)", 5),
        ("input.d.keys()|list", ["k"]),
    ],
)
def test_text_filters_and_dict_methods_work(expr: str, value: Any) -> None:
    scope = {"input": {"s": "some text that is long enough", "d": {"k": 1}}}
    assert render_value("{{" + expr + "}}", scope) == value


async def test_tool_errors_keep_no_object_addresses(started: Any) -> None:
    client, _ = started
    flow = {"start": {"tool": "fail", "args": {
        "message": "broke at <Thing object at 0x7fe4a5364f10>", "retryable": False},
        "done": True}}  # fmt: skip
    resp = await client.post("/api/workflow", json={"name": "leak", "flow": flow})
    wf = await wait_for(client, resp.json()["id"])
    assert "0x7fe4" not in wf["steps"][0]["error"] and "<Thing object>" in wf["steps"][0]["error"]


async def test_refused_long_expressions_are_not_cached(started: Any) -> None:
    # Each create carried one distinct 48,000-character expression: the caches keyed by
    # the text kept them all (+385 MB for 12,000 refused creates).
    client, _ = started
    assert not hasattr(check_expression, "cache_info")  # the public check is not a cache
    sizes = _check.cache_info().currsize, path.cache_info().currsize
    for i in range(20):
        expr = "input.x" + ".y" * 24_000 + f".z{i}"
        start = {"tool": "echo", "args": {"v": "{{" + expr + "}}"}, "done": True}
        body = {"name": "long", "flow": {"start": start}}
        resp = await client.post("/api/workflow", json=body)
        assert resp.status_code == 422
        assert "longer than 500 characters" in resp.json()["error"]
    assert (_check.cache_info().currsize, path.cache_info().currsize) == sizes
