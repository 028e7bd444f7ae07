"""The workflow page's flow graph: states as nodes, transitions as edges, parallel branches
and map flows as groups, each node coloured by the live status of its latest visit.

Pure data: the page embeds what `build` returns as JSON, and app.js lays it out (dagre)
and draws it as SVG. A map's item flow is drawn once, its nodes and group labelled with
how many items are done, running, failed and pending, never one node per item.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

MAX_LABEL = 40  # characters of a state name or branch condition drawn
MAX_NODES = 600  # beyond this the graph is not drawn (a flow has at most a few hundred)
PERSON = {"ready", "decision"}  # a gate or an interrupted step waits for a person
WAITS = {"timer", "signal"}
# How a group of visits shows: the first status present wins.
PRECEDENCE = ("failed", "decision", "waiting", "paused", "running", "pending", "cancelled", "done")

Scope = tuple[Any, ...]


def shown_status(step: dict[str, Any]) -> str:
    """The status a step is drawn with: a running step waiting for a person is "waiting"
    (or "decision" for an interrupted one); a timer or signal wait is "waiting" too."""
    status = str(step.get("status") or "pending")
    if status != "running":
        return status
    awaiting = step.get("awaiting")
    if awaiting == "decision":
        return "decision"
    if awaiting == "ready" or awaiting in WAITS:
        return "waiting"
    return "running"


def scope_of(step: dict[str, Any]) -> Scope:
    """The step's scope as a tuple: () at the top level."""
    raw = step.get("scope")
    if isinstance(raw, orjson.Fragment):
        raw = orjson.dumps(raw)
    if isinstance(raw, str | bytes):  # stored JSON text
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raw = None
    return tuple(raw) if isinstance(raw, list) else ()


def pattern(scope: Scope) -> Scope:
    """A scope with its map item indices replaced by "*": the item flow's own scope."""
    return tuple("*" if isinstance(x, int) and not isinstance(x, bool) else x for x in scope)


def summarize(statuses: Iterable[str]) -> str:
    present = set(statuses)
    for status in PRECEDENCE:
        if status in present:
            return status
    return "none"


def clip(text: str, limit: int = MAX_LABEL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Index:
    """Latest visits: by exact (scope, state), and every item's latest under a map pattern."""

    def __init__(self, steps: Sequence[dict[str, Any]]) -> None:
        self.latest: dict[tuple[Scope, str], dict[str, Any]] = {}
        for step in steps:  # in id order: a later visit replaces an earlier one
            key = (scope_of(step), str(step.get("state")))
            prev = self.latest.get(key)
            if prev is None or step.get("id", 0) >= prev.get("id", 0):
                self.latest[key] = step
        self.by_pattern: dict[tuple[Scope, str], list[dict[str, Any]]] = {}
        self.items: dict[Scope, dict[Scope, dict[str, Any]]] = {}  # map scope -> item -> latest
        for (scope, state), step in self.latest.items():
            self.by_pattern.setdefault((pattern(scope), state), []).append(step)
            for i, part in enumerate(scope):
                if isinstance(part, int) and not isinstance(part, bool):
                    item = scope[: i + 1]
                    items = self.items.setdefault(pattern(scope[:i]) + ("*",), {})
                    prev = items.get(item)
                    if prev is None or step.get("id", 0) >= prev.get("id", 0):
                        items[item] = step

    def visits(self, scope: Scope, state: str) -> list[dict[str, Any]]:
        if "*" in scope:
            return self.by_pattern.get((scope, state), [])
        step = self.latest.get((scope, state))
        return [step] if step is not None else []


def item_totals(events: Iterable[dict[str, Any]]) -> dict[int, int]:
    """How many items (or branches) each parallel or map step started: the count of its
    latest branches_started event, by step id."""
    totals: dict[int, int] = {}
    for event in events:
        data = event.get("data")
        if event.get("type") == "branches_started" and isinstance(data, dict):
            count = data.get("count")
            if isinstance(count, int) and isinstance(event.get("step_id"), int):
                totals[event["step_id"]] = count
    return totals


def counts_text(counts: Counter[str]) -> str:
    order = ("done", "running", "waiting", "decision", "failed", "pending", "cancelled")
    return " · ".join(f"{counts[k]} {k}" for k in order if counts.get(k))


class _Builder:
    def __init__(self, index: _Index, item_totals: dict[int, int]) -> None:
        self.index = index
        self.item_totals = item_totals
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.count = 0

    def new_id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def status_of(self, scope: Scope, state: str) -> tuple[str, dict[str, Any] | None, str]:
        """(status, the step to link to, a counts label for item flows)."""
        visits = self.index.visits(scope, state)
        if not visits:
            return "none", None, ""
        if "*" in scope:
            counts = Counter(shown_status(s) for s in visits)
            return summarize(counts), None, counts_text(counts)
        step = visits[0]
        return shown_status(step), step, ""

    def flow(
        self, states: Any, scope: Scope, parent: str | None, exit_id: str | None
    ) -> str | None:
        """Add a flow's states; `exit_id` is where `done` leads (a join or the end).
        Returns the node id of its start state (the entry)."""
        if not isinstance(states, dict) or not states:
            return None
        entry: dict[str, str] = {}  # state id -> node that edges into it reach
        out: dict[str, str] = {}  # state id -> node its transitions leave from
        for state_id, body in states.items():
            if not isinstance(body, dict):
                continue
            entry[state_id], out[state_id] = self.state(str(state_id), body, scope, parent)
        for state_id, body in states.items():
            if state_id not in out:
                continue
            src = out[state_id]
            if isinstance(body.get("next"), str) and body["next"] in entry:
                self.edge(src, entry[body["next"]], None, "next")
            branch = body.get("branch")
            if isinstance(branch, list):
                for case in branch:
                    if not isinstance(case, dict):
                        continue
                    if isinstance(case.get("then"), str) and case["then"] in entry:
                        self.edge(src, entry[case["then"]], clip(str(case.get("if", ""))), "branch")
                    elif isinstance(case.get("else"), str) and case["else"] in entry:
                        self.edge(src, entry[case["else"]], "else", "branch")
            if body.get("done") is True and exit_id is not None:
                self.edge(src, exit_id, None, "done")
            if isinstance(body.get("on_error"), str) and body["on_error"] in entry:
                self.edge(src, entry[body["on_error"]], "on error", "error")
        return entry.get("start")

    def edge(self, source: str, target: str, label: str | None, kind: str) -> None:
        self.edges.append({"source": source, "target": target, "label": label, "kind": kind})

    def node(self, **node: Any) -> str:
        node_id = self.new_id("n")
        self.nodes.append({"id": node_id, **node})
        return node_id

    def state(
        self, state_id: str, body: dict[str, Any], scope: Scope, parent: str | None
    ) -> tuple[str, str]:
        """One state's node(s): (the node edges come into, the node edges leave from)."""
        name = clip(str(body.get("name") or state_id))
        status, step, counts = self.status_of(scope, state_id)
        link = step.get("id") if step else None
        common = {"label": name, "state": state_id, "status": status, "step": link,
                  "counts": counts, "parent": parent}  # fmt: skip
        if isinstance(body.get("parallel"), dict):
            return self.group(state_id, body, scope, parent, common, "parallel")
        if isinstance(body.get("map"), dict):
            return self.group(state_id, body, scope, parent, common, "map")
        if isinstance(body.get("wait"), dict):
            wait = body["wait"]
            if "signal" in wait:
                detail = f"wait for signal {clip(str(wait['signal']), 30)}"
            elif "seconds" in wait:
                detail = f"wait {wait['seconds']} s"
            else:
                detail = f"wait until {clip(str(wait.get('until')), 30)}"
            node_id = self.node(kind="wait", detail=detail, **common)
        elif body.get("tool") is None and "tool" in body:
            node_id = self.node(kind="gate", detail="approval gate", **common)
        elif "call" in body and isinstance(body["call"], dict):
            detail = f"call {clip(str(body['call'].get('workflow')), 30)}"
            node_id = self.node(kind="call", detail=detail, **common)
        else:
            node_id = self.node(kind="tool", detail=clip(str(body.get("tool")), 30), **common)
        return node_id, node_id

    def group(
        self,
        state_id: str,
        body: dict[str, Any],
        scope: Scope,
        parent: str | None,
        common: dict[str, Any],
        kind: str,
    ) -> tuple[str, str]:
        """A parallel or map state: a group holding a fork node (the state itself, where
        edges come in), its branches or item flow, and a join node (where edges leave)."""
        group_id = self.new_id("g")
        if kind == "parallel":
            settled = body.get("join") == "all_settled"
            detail = "parallel" + (" · all settled" if settled else "")
        else:
            spec = body["map"]
            items = spec.get("items")
            over = f"{len(items)} items" if isinstance(items, list) else clip(str(items), 30)
            detail = f"map {clip(str(spec.get('as') or 'item'), 20)} over {over}"
            counts = counts_text(self.item_counts(scope, state_id, spec, common["status"]))
            common = {**common, "counts": counts}
        self.groups.append({"id": group_id, "kind": kind, "label": common["label"],
                            "parent": parent, "status": common["status"],
                            "counts": common["counts"]})  # fmt: skip
        fork = self.node(kind=f"{kind}-fork", detail=detail, **{**common, "parent": group_id})
        join = self.node(kind="join", label="", detail="", state=state_id, status=common["status"],
                         step=None, counts="", parent=group_id)  # fmt: skip
        if kind == "parallel":
            for branch, flow in body["parallel"].items():
                inner = scope + (state_id, branch)
                branch_id = self.new_id("g")
                names = list(flow) if isinstance(flow, dict) else []
                status = summarize(self.status_of(inner, s)[0] for s in names)
                label = clip(str(branch))
                group = {"id": branch_id, "kind": "branch", "label": label, "parent": group_id}
                self.groups.append({**group, "status": status, "counts": ""})
                start = self.flow(flow, inner, branch_id, join)
                if start is not None:
                    self.edge(fork, start, None, "fork")
        else:
            start = self.flow(body["map"].get("flow"), scope + (state_id, "*"), group_id, join)
            if start is not None:
                self.edge(fork, start, None, "fork")
        return fork, join

    def item_counts(
        self, scope: Scope, state_id: str, spec: dict[str, Any], status: str
    ) -> Counter[str]:
        """How many of a map's items are done, running, failed or pending (not started yet
        counts as pending when the number of items is known)."""
        if "*" in scope:  # a map inside a map item: too many to count meaningfully
            items = {}
        else:
            items = self.index.items.get(pattern(scope) + (state_id, "*"), {})
            items = {k: v for k, v in items.items() if k[: len(scope) + 1] == scope + (state_id,)}
        counts = Counter(shown_status(step) for step in items.values())
        total = None
        if isinstance(spec.get("items"), list):
            total = len(spec["items"])
        step = self.index.latest.get((scope, state_id))
        if step is not None and step.get("id") in self.item_totals:
            total = self.item_totals[step["id"]]
        if step is not None and step.get("status") == "done" and step.get("result_json"):
            try:
                result = orjson.loads(step["result_json"])
            except (orjson.JSONDecodeError, TypeError):
                result = None
            if isinstance(result, list):
                total = len(result)
        if total is not None and total > len(items) and status not in ("none", "cancelled"):
            counts["pending"] += total - len(items)
        return counts


def build(
    flow: Any,
    steps: Sequence[dict[str, Any]],
    workflow_status: str = "running",
    item_totals: dict[int, int] | None = None,
) -> dict[str, Any] | None:
    """The graph of a flow (a dict, JSON text or an orjson Fragment) with the statuses of
    `steps`; None when there is nothing to draw or too much. `item_totals`: how many items
    each map step started (by step id; from its branches_started events), so the items
    not started yet count as pending."""
    if isinstance(flow, orjson.Fragment):
        flow = orjson.loads(orjson.dumps(flow))
    elif isinstance(flow, str | bytes):
        flow = orjson.loads(flow)
    if not isinstance(flow, dict) or not flow:
        return None
    builder = _Builder(_Index(steps), item_totals or {})
    first = builder.node(kind="start", label="start", detail="", state="", status="done",
                         step=None, counts="", parent=None)  # fmt: skip
    ended = "done" if workflow_status == "completed" else "none"
    end = builder.node(kind="end", label="done", detail="", state="", status=ended,
                       step=None, counts="", parent=None)  # fmt: skip
    start = builder.flow(flow, (), None, end)
    if start is None or len(builder.nodes) > MAX_NODES:
        return None
    builder.edge(first, start, None, "next")
    return {"nodes": builder.nodes, "edges": builder.edges, "groups": builder.groups}
