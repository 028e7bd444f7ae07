"""Checks of a flow beyond its structure (spec §7 "Validation also reports").

On the raw flow object, into parallel branches and map flows:
- a template or branch condition reading `steps.X` where X is no state the expression can
  see (its own flow's states, then the enclosing flows'): an error naming the state and
  the field;
- a top-level name other than input, steps, result, error, workflow (and, inside a map
  flow, item or the map's `as` name, and index): an error;
- a loop that can never reach `done`: a set of states reachable from `start` that lead
  only to each other (no path from any of them to a `done` state, on_error included): an
  error;
- a loop with no gate or wait state in it: a warning (the step limit is what stops it);
  found among the states that do not wait, so a gate on one path of a larger loop does
  not hide a shorter loop that spins without it;
- an unknown tool: the parser's message gains `did you mean 'x'?` when a registered
  name is close (difflib).

States no transition reaches from `start` are left out of the loop checks: they never
run, and the parser already warns about them.

Names are read from each expression's syntax tree (the sandbox's own parser, so what is a
name is exactly what the evaluator will look up; a plain path is read by
templating.path without parsing). templating.needs is not used for this: it over-
approximates by design (any word in the text, string literals included), right for
loading the scope, wrong for errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import nodes

from daemon import sandbox, templating

NAMES = frozenset({"input", "steps", "result", "error", "workflow"})
MAP_NAMES = frozenset({"index"})  # with the map's `as` name (default item)
LISTED = 10  # states named in a message about a loop
MAX_DEPTH = 8  # nested flows looked into (the parser refuses more than 5 levels)
_UNKNOWN_TOOL = re.compile(r"unknown tool '(?P<name>[^']*)'$")


@dataclass(frozen=True)
class Refs:
    """What one expression reads: top-level names, and the states `steps.X` names (None
    when `steps` is used in a way that does not say which, e.g. `steps[input.k]`)."""

    names: frozenset[str]
    states: frozenset[str]


def refs(expr: str) -> Refs | None:
    """The names `expr` reads, or None when it does not parse or is too long (the parser
    reports that). Only expressions within the length limit are cached, as the parser's."""
    expr = expr.strip()
    if len(expr) > sandbox.MAX_EXPRESSION:
        return None
    return _refs(expr)


@lru_cache(maxsize=4096)
def _refs(expr: str) -> Refs | None:
    found = templating.path(expr)
    if found is not None:
        root, keys = found
        states = {keys[0][0]} if root == "steps" and keys and isinstance(keys[0][0], str) else ()
        return Refs(frozenset({root}), frozenset(states))
    if templating.check_expression(expr) is not None:
        return None
    tree = sandbox.parse(expr)
    names: set[str] = set()
    states: set[str] = set()
    for node in (tree, *tree.find_all((nodes.Name, nodes.Getattr, nodes.Getitem))):
        if isinstance(node, nodes.Name) and node.ctx == "load":
            names.add(node.name)
        elif isinstance(node, nodes.Getattr) and _is_steps(node.node):
            states.add(node.attr)
        elif (
            isinstance(node, nodes.Getitem)
            and _is_steps(node.node)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
        ):
            states.add(node.arg.value)
    return Refs(frozenset(names - sandbox.RESERVED_NAMES), frozenset(states))


def _is_steps(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "steps"


def check(raw: Any, tools: Container[str] | None = None) -> tuple[list[str], list[str]]:
    """(errors, warnings) about templates and loops of a raw flow, nested flows included."""
    errors: list[str] = []
    warnings: list[str] = []
    if isinstance(raw, dict):
        _flow(raw, "", (), NAMES, errors, warnings, 0)
    return errors, warnings


def amend(
    raw: Any, tools: Container[str] | None, errors: list[str], warnings: list[str]
) -> tuple[list[str], list[str]]:
    """The parser's errors and warnings with these checks': unknown tools get a suggestion,
    and check()'s errors and warnings are added (what the parser said already is not
    repeated)."""
    names = _tool_names(tools)
    out = [_suggest(e, names) for e in errors]
    more_errors, more_warnings = check(raw, tools)
    out += [e for e in more_errors if e not in out]
    return out, [*warnings, *(w for w in more_warnings if w not in warnings)]


def _tool_names(tools: Container[str] | None) -> list[str]:
    if tools is None:
        return []
    if hasattr(tools, "names"):
        return list(tools.names())
    return [t for t in tools if isinstance(t, str)] if isinstance(tools, Iterable) else []


def _suggest(error: str, names: list[str]) -> str:
    m = _UNKNOWN_TOOL.search(error)
    if m is None or not names:
        return error
    close = difflib.get_close_matches(m["name"], names, n=1)
    return f"{error}; did you mean '{close[0]}'?" if close else error


def _flow(
    raw: dict[str, Any],
    where: str,
    outer: tuple[frozenset[str], ...],
    names: frozenset[str],
    errors: list[str],
    warnings: list[str],
    depth: int,
) -> None:
    """Check one flow: `where` is the path to it ('' at the top), `outer` the state ids of
    the enclosing flows, `names` the top-level names its expressions may use."""
    if depth > MAX_DEPTH:
        return
    visible = (frozenset(raw), *outer)
    for sid, body in raw.items():
        if not isinstance(body, dict):
            continue
        at = f"{where}state '{sid}'"
        for field, expr in _expressions(body):
            _expression(at, field, expr, visible, names, errors)
        if isinstance(body.get("parallel"), dict):
            for branch, sub in body["parallel"].items():
                if isinstance(sub, dict):
                    sub_at = f"{at}: branch '{branch}': "
                    _flow(sub, sub_at, visible, names, errors, warnings, depth + 1)
        spec = body.get("map")
        if isinstance(spec, dict) and isinstance(spec.get("flow"), dict):
            item = spec.get("as", "item")
            inner = names | MAP_NAMES | ({item} if isinstance(item, str) else set())
            _flow(spec["flow"], f"{at}: map: ", visible, inner, errors, warnings, depth + 1)
    _loops(raw, where, errors, warnings)


def _expressions(body: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, expression) of every template and condition of one state (the map's items,
    a wait's until and a call's input are read in the state's own flow, as its args are)."""
    for expr in templating.expressions(body.get("args")):
        yield "field 'args'", expr
    cases = body.get("branch")
    for i, case in enumerate(cases if isinstance(cases, list) else ()):
        if isinstance(case, dict) and isinstance(case.get("if"), str):
            yield f"branch[{i}]", case["if"]
    spec = body.get("map")
    if isinstance(spec, dict) and isinstance(spec.get("items"), str):
        for expr in templating.expressions(spec["items"]):
            yield "map.items", expr
    spec = body.get("wait")
    if isinstance(spec, dict) and isinstance(spec.get("until"), str):
        for expr in templating.expressions(spec["until"]):
            yield "wait.until", expr
    spec = body.get("call")
    if isinstance(spec, dict):
        for expr in templating.expressions(spec.get("input")):
            yield "call.input", expr


def _expression(
    at: str,
    field: str,
    expr: str,
    visible: tuple[frozenset[str], ...],
    names: frozenset[str],
    errors: list[str],
) -> None:
    found = refs(expr)
    if found is None:
        return
    for name in sorted(found.names - names):
        known = ", ".join(sorted(names))
        errors.append(f"{at}: {field}: '{name}' in '{expr.strip()}' is not a name templates "
                      f"know ({known})")  # fmt: skip
    if "steps" not in found.names:
        return
    for state in sorted(found.states):
        if not any(state in ids for ids in visible):
            errors.append(f"{at}: {field}: '{expr.strip()}' reads steps.{state}, a state "
                          "that does not exist here")  # fmt: skip


# -- loops ---------------------------------------------------------------------------------


def _edges(raw: dict[str, Any]) -> dict[str, list[str]]:
    """Each state's transitions to states of this flow (next, branch targets, on_error)."""
    out: dict[str, list[str]] = {}
    for sid, body in raw.items():
        targets: list[str] = []
        if isinstance(body, dict):
            for key in ("next", "on_error"):
                if isinstance(body.get(key), str):
                    targets.append(body[key])
            for case in body.get("branch") if isinstance(body.get("branch"), list) else ():
                if isinstance(case, dict):
                    targets += [case[k] for k in ("then", "else") if isinstance(case.get(k), str)]
        out[sid] = [t for t in targets if t in raw]
    return out


def _loops(raw: dict[str, Any], where: str, errors: list[str], warnings: list[str]) -> None:
    if "start" not in raw:
        return
    edges = _edges(raw)
    reachable, todo = {"start"}, ["start"]
    while todo:
        for target in edges[todo.pop()]:
            if target not in reachable:
                reachable.add(target)
                todo.append(target)
    done = {s for s, b in raw.items() if isinstance(b, dict) and b.get("done") is True}
    finishing = set(done)  # states from which a done state can be reached
    back: dict[str, list[str]] = {s: [] for s in raw}
    for sid, targets in edges.items():
        for t in targets:
            back[t].append(sid)
    todo = list(done)
    while todo:
        for source in back[todo.pop()]:
            if source not in finishing:
                finishing.add(source)
                todo.append(source)
    order = {s: i for i, s in enumerate(s for s in raw if s in reachable)}
    stuck: set[str] = set()
    for group in _loops_among(order, edges):
        if not finishing & set(group):
            stuck.update(group)
            errors.append(f"{where}loop through {_listed(group)} can never reach a state "
                          "with done: true (nor leave it by on_error)")  # fmt: skip
    # Without the states that wait (gates, waits), what still loops spins on its own.
    spinning = {s: i for s, i in order.items() if s not in stuck and not _pauses(raw[s])}
    for group in _loops_among(spinning, edges):
        warnings.append(f"{where}loop through {_listed(group)} has no gate or wait: only "
                        "the step limit stops it if it never leaves")  # fmt: skip


def _loops_among(order: dict[str, int], edges: dict[str, list[str]]) -> Iterator[list[str]]:
    """The loops (strongly connected sets with a cycle) among these states, each in the
    flow's order."""
    sub = {s: [t for t in edges[s] if t in order] for s in order}
    for group in components(list(order), sub):
        if len(group) > 1 or group[0] in sub[group[0]]:
            yield sorted(group, key=order.__getitem__)


def _listed(group: list[str]) -> str:
    listed = ", ".join(f"'{s}'" for s in group[:LISTED])
    if len(group) > LISTED:
        listed += f" and {len(group) - LISTED} more states"
    return listed


def _pauses(body: Any, depth: int = 0) -> bool:
    """A gate, a wait, or a parallel or map with one inside: the loop waits there."""
    if not isinstance(body, dict) or depth > MAX_DEPTH:
        return False
    if ("tool" in body and body["tool"] is None) or "wait" in body:
        return True
    flows = list(body["parallel"].values()) if isinstance(body.get("parallel"), dict) else []
    if isinstance(body.get("map"), dict):
        flows.append(body["map"].get("flow"))
    return any(
        isinstance(f, dict) and any(_pauses(b, depth + 1) for b in f.values()) for f in flows
    )


def components(nodes_: list[str], edges: dict[str, list[str]]) -> Iterator[list[str]]:
    """Strongly connected components (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in nodes_:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(edges.get(root, ())))]
        while work:
            node, it = work[-1]
            for succ in it:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges.get(succ, ()))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    yield group
