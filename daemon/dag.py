"""The DAG input shape, compiled into a named-state flow.

A create or validate body may carry `"steps"` instead of `"flow"` (spec §7), the shape
of the DAG-style APIs:

    [{"id": "fetch", "type": "http_request", "config": {"url": "..."}},
     {"id": "sum", "tool": "summarize", "args": {"text": "<<steps.fetch.result.json>>"},
      "depends_on": ["fetch"], "needs_human": true}]

Fields of a step: `id` (required, unique), `tool` or `type` (or `agent`, the local
engine's word: one of them), `args` or `config` (an object), `depends_on` (step ids),
`needs_human` (a gate before the step), and optionally `name`, `timeout`, `retry`, as a
state has them. `action` and `outputs` (the local engine's) are accepted and not used.
`type` maps: `http_request` and `webhook` are the `http` tool (`webhook` defaults to
method POST), `wait` is a wait state whose object is the config (`seconds`, `until`,
or `signal` with an optional `timeout`); any other type, and `tool`, names a tool
(`tool: null` makes the step itself a gate).

How it compiles (simple and correct for every DAG, not the most parallel schedule):
steps are put in topological levels (a step's level is one more than the highest level
of what it depends on). Each level is one state of the flow, chained with `next`; the
last one is `done`. A level of one step is that step's state, with the step's id as its
state id (the first level's state is `start`, as every flow's first state must be). A
level of several steps is a `parallel` state (ids `parallel_1`, `parallel_2`, ...)
whose branches are named after the step ids, each branch a one-state flow (two with
`needs_human`: the gate is the branch's `start`, the step the state after it, so other
branches go on while one waits for a person). `needs_human` on a level of one step puts
a gate state `approve_<id>` before it. Generated ids never take a step's id: a clash
gets a `_2`, `_3`, ... suffix. A step waits for its whole previous level, not only for
what it depends on: that costs parallelism in some DAGs, never correctness.

Reading another step's result: templates of the DAG keep saying `steps.<id>.result`
(and `.status`); the compiler rewrites them to where the value is in the flow: the
state's id where it differs from the step's (`steps.start.result`), and for a step that
ran in a parallel level, the branch's slot in the level's result after the join,
`steps.parallel_1.result.<id>` (its `.status` is the level's: a level is only left
when every branch is done). `steps.<id>.attempt` of a step that ran in parallel is not
kept after the join, and is an error here. A step may read only steps it depends on
(directly or not): any other is still to run, or racing it. `result` is the previous
state's result: after a parallel level, an object keyed by step id.

The submitted steps are kept beside the compiled flow (GET shows both).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from daemon.flowcheck import components
from daemon.placeholders import scan

HTTP_TYPES = {"http_request": "GET", "webhook": "POST"}  # type -> default method
WAIT_KEYS = {"seconds", "until", "signal", "timeout"}
STEP_KEYS = {
    "id", "tool", "type", "agent", "args", "config", "depends_on", "needs_human", "name",
    "timeout", "retry", "action", "outputs",
}  # fmt: skip
PASSED_KEYS = ("timeout", "retry")  # copied onto the step's state as they are
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A string literal (skipped), or a reference to a step: `steps.x` / `steps['x']`, with the
# field after it when it is one of a step's.
_REF = re.compile(
    r"""(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
    r"""|(?<![\w.])steps\s*(?:\.\s*(?P<dot>[A-Za-z_][A-Za-z0-9_]*)"""
    r"""|\[\s*(?P<q>['"])(?P<key>[^'"\\]*)(?P=q)\s*\])"""
    r"""(?P<tail>\s*\.\s*(?P<field>result|status|attempt)\b)?"""
)


def compile_steps(steps: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """(flow, []) for a valid DAG, else (None, every problem found)."""
    if not isinstance(steps, list) or not steps:
        return None, ["field 'steps' must be a non-empty list of steps"]
    errors: list[str] = []
    by_id: dict[str, dict[str, Any]] = {}
    for i, step in enumerate(steps):
        sid = _check_step(i, step, errors)
        if sid is None:
            continue
        if sid in by_id:
            errors.append(f"Duplicate step id '{sid}'")
            continue
        by_id[sid] = step
    deps: dict[str, list[str]] = {}
    for sid, step in by_id.items():
        deps[sid] = []
        listed = step.get("depends_on")
        for dep in listed if isinstance(listed, list) else []:
            if not isinstance(dep, str):
                continue  # reported by _check_step
            if dep not in by_id:
                errors.append(f"Step '{sid}' depends on '{dep}' which doesn't exist")
            elif dep not in deps[sid]:
                deps[sid].append(dep)
    errors += [f"Cycle detected: {' → '.join(c)}" for c in _cycles(by_id, deps)]
    if errors:
        return None, errors
    levels = _levels(by_id, deps)
    ancestors = _ancestors(by_id, deps)
    where, heads = _placement(levels, by_id)
    reads: list[tuple[str, str]] = []  # (step, step it reads)
    for sid, step in by_id.items():
        errors += _check_refs(sid, step, where, ancestors[sid], reads)
    if errors:
        return None, errors
    # Inside a branch, `steps.start` is the branch's own first state: a step that runs in
    # a branch and reads what the flow's 'start' holds needs that under another name, so
    # the flow then begins with a no-op 'start' (echo) and the first level is named as
    # the others are.
    if any(where[s].branch is not None and where[o].state == "start" for s, o in reads):
        where, heads = _placement(levels, by_id, lead_in=True)
        flow = _build(levels, by_id, where, heads[1:])
        return {"start": {"name": "start", "tool": "echo", "args": {}, "next": heads[1]},
                **flow}, []  # fmt: skip
    return _build(levels, by_id, where, heads), []


def _check_step(i: int, step: Any, errors: list[str]) -> str | None:
    """The step's id if it is usable; its problems go into `errors`."""
    if not isinstance(step, dict):
        errors.append(f"steps[{i}]: must be an object")
        return None
    sid = step.get("id")
    if not isinstance(sid, str) or not sid:
        errors.append(f"steps[{i}]: field 'id' is required (a non-empty string)")
        return None
    where = f"step '{sid}'"
    for key in sorted(set(step) - STEP_KEYS):
        errors.append(f"{where}: unknown field '{key}'")
    kinds = [k for k in ("tool", "type", "agent") if k in step]
    if len(kinds) != 1:
        found = ", ".join(kinds) if kinds else "none"
        errors.append(f"{where}: needs exactly one of 'tool' or 'type' (found: {found})")
    elif kinds[0] == "tool" and step["tool"] is not None and not isinstance(step["tool"], str):
        errors.append(f"{where}: field 'tool' must be a tool name or null (a gate)")
    elif kinds[0] != "tool" and (not isinstance(step[kinds[0]], str) or not step[kinds[0]]):
        errors.append(f"{where}: field '{kinds[0]}' must be a non-empty string")
    if "args" in step and "config" in step:
        errors.append(f"{where}: has both 'args' and 'config'; give one")
    args = step.get("args", step.get("config", {}))
    if args is not None and not isinstance(args, dict):
        key = "args" if "args" in step else "config"
        errors.append(f"{where}: field '{key}' must be an object")
    elif step.get("type") == "wait":
        for key in sorted(set(args or {}) - WAIT_KEYS):
            errors.append(f"{where}: a wait's config has no field '{key}' "
                          "(seconds, until, or signal with timeout)")  # fmt: skip
    depends = step.get("depends_on", [])
    if depends is not None and (
        not isinstance(depends, list) or not all(isinstance(d, str) for d in depends)
    ):
        errors.append(f"{where}: field 'depends_on' must be a list of step ids")
    if "needs_human" in step and not isinstance(step["needs_human"], bool):
        errors.append(f"{where}: field 'needs_human' must be true or false")
    return sid


def _cycles(by_id: dict[str, Any], deps: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected set of steps, in run order (a dependency before
    the step that depends on it), from its first step in the input."""
    order = {sid: i for i, sid in enumerate(by_id)}
    after: dict[str, list[str]] = {sid: [] for sid in by_id}  # dependency -> dependents
    for sid, ds in deps.items():
        for d in ds:
            if d in after:
                after[d].append(sid)
    found = []
    for group in components(list(by_id), after):
        if len(group) == 1 and group[0] not in after[group[0]]:
            continue
        members = set(group)
        first = min(group, key=order.__getitem__)
        path = _path_back(first, after, members)
        found.append(path)
    return sorted(found, key=lambda p: order[p[0]])


def _path_back(first: str, after: dict[str, list[str]], members: set[str]) -> list[str]:
    """A shortest cycle through `first` inside its component (breadth first)."""
    parent: dict[str, str] = {}
    todo = [first]
    while todo:
        nxt = []
        for node in todo:
            for succ in after[node]:
                if succ not in members:
                    continue
                if succ == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(parent[path[-1]])
                    return [*reversed(path), first]
                if succ not in parent:
                    parent[succ] = node
                    nxt.append(succ)
        todo = nxt
    return [first, first]  # not reached: `first` is on a cycle of its component


def _levels(by_id: dict[str, Any], deps: dict[str, list[str]]) -> list[list[str]]:
    level: dict[str, int] = {}

    def of(sid: str) -> int:
        todo = [sid]
        while todo:
            top = todo[-1]
            missing = [d for d in deps[top] if d not in level]
            if missing:
                todo.extend(missing)
                continue
            todo.pop()
            level[top] = 1 + max((level[d] for d in deps[top]), default=-1)
        return level[sid]

    out: list[list[str]] = []
    for sid in by_id:  # input order within a level
        n = of(sid)
        while len(out) <= n:
            out.append([])
    for sid in by_id:
        out[level[sid]].append(sid)
    return out


def _ancestors(by_id: dict[str, Any], deps: dict[str, list[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for level in _levels(by_id, deps):
        for sid in level:
            out[sid] = set(deps[sid]).union(*(out[d] for d in deps[sid]))
    return out


class _Place:
    """Where a step's state is: `state` is the state id at the top level; `branch` is set
    when the step ran in a parallel level (then `state` is the parallel state's id)."""

    def __init__(self, state: str, branch: str | None = None) -> None:
        self.state = state
        self.branch = branch


def _placement(
    levels: list[list[str]], by_id: dict[str, dict[str, Any]], *, lead_in: bool = False
) -> tuple[dict[str, _Place], list[str]]:
    """Where each step's state is, and the state each level begins with (its gate, for a
    one-step level that needs a human). A one-step level's state is its step id; the first
    level begins with 'start'; a parallel level's state is `parallel_<n>`; generated ids
    never take a step's id. With `lead_in`, 'start' is a state of its own before the
    first level (heads[0])."""
    taken = {"start"} | {sid for level in levels for sid in level}
    where: dict[str, _Place] = {}
    heads: list[str] = ["start"] if lead_in else []
    parallels = 0
    for n, level in enumerate(levels):
        i = n + 1 if lead_in else n  # 0: the level that is the flow's 'start'
        if len(level) > 1:
            parallels += 1
            pid = "start" if i == 0 else _unique(f"parallel_{parallels}", taken)
            where.update((sid, _Place(pid, sid)) for sid in level)
            heads.append(pid)
            continue
        sid = level[0]
        gated = by_id[sid].get("needs_human") is True
        state = _unique("start", taken) if sid == "start" and (i > 0 or gated) else sid
        if i == 0 and not gated:
            state = "start"
        where[sid] = _Place(state)
        if i == 0:
            heads.append("start")
        else:
            heads.append(_unique(f"approve_{sid}", taken) if gated else state)
    return where, heads


def _unique(name: str, taken: set[str]) -> str:
    found, n = name, 1
    while found in taken:
        n += 1
        found = f"{name}_{n}"
    taken.add(found)
    return found


def _check_refs(
    sid: str,
    step: dict[str, Any],
    where: dict[str, _Place],
    ancestors: set[str],
    reads: list[tuple[str, str]],
) -> list[str]:
    """Problems with the steps a step's templates read; what it reads goes into `reads`."""
    errors = []
    for expr in _expressions(_args(step)):
        for m in _REF.finditer(expr):
            if m["str"] is not None:
                continue
            other = m["dot"] if m["dot"] is not None else m["key"]
            if other not in where:
                continue  # not a step: the flow's own checks name it
            reads.append((sid, other))
            if other not in ancestors:
                errors.append(f"Step '{sid}' reads steps.{other} but does not depend on "
                              f"'{other}' (add it to depends_on)")  # fmt: skip
            elif where[other].branch is not None and m["field"] not in ("result", "status"):
                errors.append(f"Step '{sid}' reads steps.{other}{m['tail'] or ''}: a step "
                              "that ran in parallel with others keeps only .result and "
                              ".status")  # fmt: skip
    return errors


def _args(step: dict[str, Any]) -> dict[str, Any]:
    return step.get("args", step.get("config")) or {}


def _expressions(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        for _, _, expr in scan(value):
            yield expr
    elif isinstance(value, list):
        for v in value:
            yield from _expressions(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _expressions(v)


def _rewrite(value: Any, where: dict[str, _Place]) -> Any:
    """`value` with every placeholder's references to steps pointed at their states."""
    if isinstance(value, str):
        if "<<" not in value and "{{" not in value:
            return value
        out, pos = [], 0
        for start, end, expr in scan(value):
            opener = value[start : start + 2]
            closer = value[end - 2 : end]
            out += [value[pos:start], opener, _rewrite_expr(expr, where), closer]
            pos = end
        out.append(value[pos:])
        return "".join(out)
    if isinstance(value, list):
        return [_rewrite(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v, where) for k, v in value.items()}
    return value


def _key(name: str) -> str:
    return f".{name}" if _IDENT.fullmatch(name) else f"[{name!r}]"


def _rewrite_expr(expr: str, where: dict[str, _Place]) -> str:
    def one(m: re.Match[str]) -> str:
        if m["str"] is not None:
            return m[0]
        other = m["dot"] if m["dot"] is not None else m["key"]
        place = where.get(other)
        if place is None:
            return m[0]
        if place.branch is None:
            if place.state == other:
                return m[0]
            return f"steps{_key(place.state)}{m['tail'] or ''}"
        if m["field"] == "result":
            return f"steps{_key(place.state)}.result{_key(place.branch)}"
        return f"steps{_key(place.state)}{m['tail'] or ''}"  # .status: the level's

    return _REF.sub(one, expr)


def _state(step: dict[str, Any], where: dict[str, _Place]) -> dict[str, Any]:
    """The state of one step, without its transition."""
    sid = step["id"]
    args = _rewrite(_args(step), where)
    kind = step.get("type")
    out: dict[str, Any] = {"name": step.get("name", sid)}
    if kind == "wait":
        out["wait"] = args
    elif kind in HTTP_TYPES:
        out["tool"] = "http"
        out["args"] = {"method": HTTP_TYPES[kind], **args}
    else:
        out["tool"] = step["tool"] if "tool" in step else step.get("type", step.get("agent"))
        out["args"] = args
    for key in PASSED_KEYS:
        if key in step:
            out[key] = step[key]
    return out


def _gate(sid: str) -> dict[str, Any]:
    return {"name": f"approve {sid}", "tool": None, "args": {}}


def _build(
    levels: list[list[str]],
    by_id: dict[str, dict[str, Any]],
    where: dict[str, _Place],
    heads: list[str],
) -> dict[str, Any]:
    flow: dict[str, Any] = {}
    for i, level in enumerate(levels):
        then: dict[str, Any] = {"next": heads[i + 1]} if i + 1 < len(levels) else {"done": True}
        if len(level) > 1:
            branches = {sid: _branch(by_id[sid], where) for sid in level}
            flow[heads[i]] = {"name": heads[i], "parallel": branches, **then}
            continue
        sid = level[0]
        state_id = where[sid].state
        if heads[i] != state_id:
            flow[heads[i]] = {**_gate(sid), "next": state_id}
        flow[state_id] = {**_state(by_id[sid], where), **then}
    return flow


def _branch(step: dict[str, Any], where: dict[str, _Place]) -> dict[str, Any]:
    """The one-step flow of a branch (with a gate first when the step needs a human)."""
    state = _state(step, where)
    if step.get("needs_human") is not True:
        return {"start": {**state, "done": True}}
    inner = step["id"] if step["id"] != "start" else "start_2"
    return {"start": {**_gate(step["id"]), "next": inner}, inner: {**state, "done": True}}
