"""The flow format: typed model, complete validation, and the pure transition function.

Nothing here does I/O: the executor and the API read, call `after_success` /
`after_failure`, and write what these return.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from daemon import flowcheck, placeholders, templating

STATE_KEYS = {
    "name", "tool", "args", "next", "branch", "done", "timeout", "retry", "on_error",
    "approvers", "allow_self_approval", "parallel", "map", "wait", "join", "call",
}  # fmt: skip
ACTIONS = ("tool", "parallel", "map", "wait", "call")  # a state has exactly one
# The `tool` column of a step row for the states that run no tool: the executor runs them
# itself (a colon starts no registered tool's name).
KIND_TOOLS = {"parallel": ":parallel", "map": ":map", "wait": ":wait", "call": ":call"}
JOINS = ("fail_fast", "all_settled")
MAP_KEYS = {"items", "as", "max_concurrency", "tolerated_failures", "flow"}
WAIT_KEYS = {"seconds", "until", "signal", "timeout"}
CALL_KEYS = {"workflow", "version", "input"}
MAX_REF = 200  # characters of a called definition's name (as definition names)
TOP_NAMES = frozenset({"input", "steps", "result", "error", "workflow"})
MAX_DEPTH = 5  # parallel and map states nested in each other
GATE_ONLY_KEYS = ("approvers", "allow_self_approval")
RETRY_KEYS = {"max_attempts", "backoff_s", "backoff_factor", "max_backoff_s"}
MISSING_START = "Flow must have a 'start' key"
MAX_SECONDS = 366 * 86400  # longest timeout or backoff: a year
MAX_PLACEHOLDERS = 1000  # per flow: each is parsed at validation
MAX_EXPRESSION_TEXT = 50_000  # characters of expressions per flow (parsing costs ~3 us each)


@dataclass(frozen=True)
class Retry:
    max_attempts: int = 1
    backoff_s: float = 1.0
    backoff_factor: float = 2.0
    max_backoff_s: float = 300.0

    def delay(self, attempt: int, rand: float) -> float:
        """Backoff before attempt `attempt + 1`, with jitter from `rand` in [0, 1)."""
        try:
            base = min(self.max_backoff_s, self.backoff_s * self.backoff_factor ** (attempt - 1))
        except OverflowError:
            base = self.max_backoff_s
        return base * (0.5 + rand / 2)


@dataclass(frozen=True)
class Case:
    condition: str | None  # None for the final `else`
    target: str


@dataclass(frozen=True)
class MapSpec:
    items: Any  # a list, or a string with one placeholder giving a list
    as_: str
    max_concurrency: int
    tolerated_failures: int
    flow: Flow


@dataclass(frozen=True)
class WaitSpec:
    seconds: float | None = None
    until: Any = None  # ISO 8601 text, epoch ms, or a placeholder giving either
    signal: str | None = None
    timeout: float | None = None  # for a signal: how long it may wait


@dataclass(frozen=True)
class CallSpec:
    workflow: str | int  # a saved definition's name, or its id
    version: int | None  # None: the definition's latest version when the call starts
    input: Any  # the child's input: an object whose strings may hold placeholders, or one
    # placeholder giving an object


@dataclass(frozen=True)
class State:
    id: str
    name: str
    tool: str | None  # None: an approval gate (or a parallel, map, wait or call: see kind)
    args: dict[str, Any]
    next: str | None = None
    branch: tuple[Case, ...] | None = None
    done: bool = False
    timeout: float | None = None
    retry: Retry = field(default_factory=Retry)
    on_error: str | None = None
    templated: bool = False  # args contain placeholders
    approvers: tuple[str, ...] | None = None  # gate: token names or permissions who may decide
    allow_self_approval: bool | None = None  # gate: None = the config's default
    needs: templating.Needs = templating.NO_NEEDS  # what its args and conditions read
    kind: str = "tool"  # tool, gate, parallel, map, wait or call
    branches: dict[str, Flow] | None = None  # parallel
    join: str = "fail_fast"  # parallel: fail_fast or all_settled
    map: MapSpec | None = None
    wait: WaitSpec | None = None
    call: CallSpec | None = None

    @property
    def step_tool(self) -> str | None:
        """What a visit's step row records as its tool (see KIND_TOOLS)."""
        return KIND_TOOLS.get(self.kind, self.tool)

    @property
    def conditions(self) -> list[str]:
        """The branch's `if` expressions, in order (the final `else` has none)."""
        return [c.condition for c in self.branch or () if c.condition is not None]

    @property
    def is_gate(self) -> bool:
        return self.kind == "gate"

    def targets(self) -> Iterator[str]:
        if self.next is not None:
            yield self.next
        for case in self.branch or ():
            yield case.target
        if self.on_error is not None:
            yield self.on_error


@dataclass(frozen=True)
class Flow:
    states: dict[str, State]

    def __getitem__(self, state_id: str) -> State:
        return self.states[state_id]

    def resolve(self, scope: Sequence[Any] | None) -> Flow:
        """The flow a step of `scope` runs in: scope is a path of (state id, branch name
        or item index) pairs from the workflow's flow inwards (None or empty: this flow)."""
        flow = self
        for i in range(0, len(scope or ()), 2):
            assert scope is not None
            state = flow[scope[i]]
            if state.branches is not None:
                flow = state.branches[scope[i + 1]]
            else:
                assert state.map is not None
                flow = state.map.flow
        return flow

    def walk(self, scope: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], State]]:
        """Every state with the scope path of its flow, nested flows included."""
        for state in self.states.values():
            yield scope, state
            for name, sub in (state.branches or {}).items():
                yield from sub.walk((*scope, state.id, name))
            if state.map is not None:
                yield from state.map.flow.walk((*scope, state.id, "*"))


@dataclass(frozen=True)
class Validation:
    flow: Flow | None
    errors: list[str]
    warnings: list[str]


# Moves: what happens after a state's attempt.
@dataclass(frozen=True)
class Advance:
    target: str


@dataclass(frozen=True)
class Complete:
    pass


@dataclass(frozen=True)
class Fail:
    error: str


@dataclass(frozen=True)
class RetryLater:
    delay_s: float


Move = Advance | Complete | Fail | RetryLater


class ParseCache:
    """Valid flows parsed before, by their JSON text.

    Clients submit the same flow again and again, and validating every state and
    template was about 5 % of the daemon's CPU per workflow. Only valid flows up to
    `max_text` characters are kept, at most `entries` of them (least recently used
    goes first), so the cache stays within a few megabytes. One cache serves one
    registry: validity depends on which tools exist. A flow larger than `inline`
    characters is parsed in a thread (`aparse`): its expressions may take a hundred
    milliseconds to parse, which the event loop must not wait for.
    """

    def __init__(self, entries: int = 256, max_text: int = 16 * 1024, inline: int = 4096) -> None:
        self.entries = entries
        self.max_text = max_text
        self.inline = inline
        self._parsed: OrderedDict[tuple[str, int], Validation] = OrderedDict()
        self._lock = threading.Lock()  # parse() runs on the loop and in threads

    def parse(
        self,
        text: str,
        tools: Container[str] | None = None,
        max_states: int = 200,
        raw: Any = None,
    ) -> Validation:
        """parse(raw) where `text` is raw's JSON (raw is loaded from it when not given)."""
        key = (text, max_states)
        hit = self._hit(key)
        if hit is not None:
            return hit
        result = parse(orjson.loads(text) if raw is None else raw, tools, max_states)
        if result.flow is not None and len(text) <= self.max_text:
            with self._lock:
                self._parsed[key] = result
                if len(self._parsed) > self.entries:
                    self._parsed.popitem(last=False)
        return result

    async def aparse(
        self,
        text: str,
        tools: Container[str] | None = None,
        max_states: int = 200,
        raw: Any = None,
    ) -> Validation:
        """parse(), in a thread when the flow is large and not cached."""
        if len(text) <= self.inline or self._hit((text, max_states)) is not None:
            return self.parse(text, tools, max_states, raw)
        return await asyncio.to_thread(self.parse, text, tools, max_states, raw)

    def _hit(self, key: tuple[str, int]) -> Validation | None:
        with self._lock:
            hit = self._parsed.get(key)
            if hit is not None:
                self._parsed.move_to_end(key)
            return hit


def parse(raw: Any, tools: Container[str] | None = None, max_states: int = 200) -> Validation:
    """Validate a raw flow object completely; every problem is reported at once."""
    if not isinstance(raw, dict):
        return Validation(None, ["flow must be an object of states keyed by state id"], [])
    errors: list[str] = []
    if "start" not in raw:
        errors.append(MISSING_START)
    count = _count_states(raw, 0)
    if count > max_states:
        errors.append(f"flow has {count} states; the limit is {max_states}")
        return Validation(None, errors, [])
    # The expressions' size first, from a cheap scan: parsing each costs microseconds
    # per character, so an oversized flow is refused before any of them is parsed.
    size = _expression_size(raw)
    if size is not None:
        return Validation(None, [*errors, size], [])
    warnings: list[str] = []
    flow = _parse_flow(raw, tools, errors, warnings, "", frozenset(), 0)
    errors, warnings = flowcheck.amend(raw, tools, errors, warnings)
    if errors or flow is None:
        return Validation(None, errors, warnings)
    return Validation(flow, [], warnings)


def _nested(body: Any) -> Iterator[Any]:
    """The raw flows nested in a raw state (parallel branches, a map's flow)."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("parallel"), dict):
        yield from body["parallel"].values()
    if isinstance(body.get("map"), dict) and "flow" in body["map"]:
        yield body["map"]["flow"]


def _count_states(raw: Any, depth: int) -> int:
    """States in a raw flow and the flows nested in it (deeper than MAX_DEPTH: not
    counted further; parsing reports the depth)."""
    if not isinstance(raw, dict) or depth > MAX_DEPTH:
        return 0
    return len(raw) + sum(_count_states(sub, depth + 1) for b in raw.values() for sub in _nested(b))


def _state_expressions(body: dict[str, Any]) -> Iterator[str]:
    """Every expression of a raw state: args, branch conditions, map items, wait until,
    call input."""
    yield from templating.expressions(body.get("args"))
    for case in body.get("branch") if isinstance(body.get("branch"), list) else ():
        if isinstance(case, dict) and isinstance(case.get("if"), str):
            yield case["if"]
    if isinstance(body.get("map"), dict):
        yield from templating.expressions(body["map"].get("items"))
    if isinstance(body.get("wait"), dict):
        yield from templating.expressions(body["wait"].get("until"))
    if isinstance(body.get("call"), dict):
        yield from templating.expressions(body["call"].get("input"))


def _expression_size(raw: dict[str, Any], depth: int = 0) -> str | None:
    """Why the flow's expressions are too many or too long together, if they are."""
    count = text = 0
    todo = [(raw, depth)]
    while todo:
        flow, d = todo.pop()
        if d > MAX_DEPTH:
            continue
        for body in flow.values():
            if not isinstance(body, dict):
                continue
            for expr in _state_expressions(body):
                count, text = count + 1, text + len(expr)
            todo += [(sub, d + 1) for sub in _nested(body) if isinstance(sub, dict)]
    if count > MAX_PLACEHOLDERS:
        return (f"flow has {count} placeholders and branch conditions; the limit is "
                f"{MAX_PLACEHOLDERS}")  # fmt: skip
    if text > MAX_EXPRESSION_TEXT:
        return f"flow has {text} characters of expressions; the limit is {MAX_EXPRESSION_TEXT}"
    return None


def _parse_flow(
    raw: Any,
    tools: Container[str] | None,
    errors: list[str],
    warnings: list[str],
    where: str,
    outer: frozenset[str],
    depth: int,
) -> Flow | None:
    """Parse one flow (the workflow's, or one nested in a parallel or map state); `where`
    prefixes its messages, `outer` holds the state ids of the flows around it."""
    if not isinstance(raw, dict) or (where and not raw):
        errors.append(f"{where}must be a flow: an object of states keyed by state id")
        return None
    if where and "start" not in raw:
        errors.append(f"{where}{MISSING_START}")
    states: dict[str, State] = {}
    ids = frozenset(raw)
    for sid, body in raw.items():
        state = _parse_state(sid, body, tools, errors, warnings, where, ids | outer, depth)
        if state is not None:
            states[sid] = state
    for sid, body in raw.items():
        for key, target in _raw_targets(body):
            if target not in raw:
                errors.append(
                    f"{where}state '{sid}': field '{key}' refers to unknown state '{target}'"
                )
    warnings += [f"{where}state '{s}' is unreachable from 'start'" for s in _unreachable(raw)]
    return Flow(states) if len(states) == len(raw) else None


def _parse_state(
    sid: str,
    body: Any,
    tools: Container[str] | None,
    errors: list[str],
    warnings: list[str],
    prefix: str,
    ids: frozenset[str],
    depth: int,
) -> State | None:
    where = f"{prefix}state '{sid}'"
    if not isinstance(body, dict):
        errors.append(f"{where}: must be an object")
        return None
    before = len(errors)
    for key in sorted(set(body) - STATE_KEYS):
        errors.append(f"{where}: unknown field '{key}'")
    actions = [k for k in ACTIONS if k in body]
    if not actions:
        errors.append(f"{where}: field 'tool' is required (a tool name, or null for a gate), "
                      "unless the state is a 'parallel', 'map', 'wait' or 'call'")  # fmt: skip
    elif len(actions) > 1:
        errors.append(f"{where}: has {len(actions)} actions ({', '.join(actions)}); a state "
                      "has exactly one of 'tool', 'parallel', 'map', 'wait' or 'call'")  # fmt: skip
    action = actions[0] if len(actions) == 1 else "tool"
    tool = body.get("tool")
    kind = action if action != "tool" else ("gate" if tool is None else "tool")
    if tool is not None and not isinstance(tool, str):
        errors.append(f"{where}: field 'tool' must be a string or null")
    elif isinstance(tool, str) and tools is not None and tool not in tools:
        errors.append(f"{where}: unknown tool '{tool}'")
    name = body.get("name", sid)
    if not isinstance(name, str) or not name:
        errors.append(f"{where}: field 'name' must be a non-empty string")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        errors.append(f"{where}: field 'args' must be an object")
        args = {}
    if "args" in body and kind not in ("tool", "gate"):
        errors.append(f"{where}: field 'args' applies only to a tool or a gate")
    if "join" in body and kind != "parallel":
        errors.append(f"{where}: field 'join' applies only to a parallel state")
    exprs = list(templating.expressions(args))
    for expr in exprs[:MAX_PLACEHOLDERS]:
        problem = templating.check_expression(expr)
        if problem:
            errors.append(f"{where}: field 'args': {problem}")
    if isinstance(tool, str) and tools is not None and hasattr(tools, "get"):
        spec = tools.get(tool)
        if spec is not None:
            # A templated value's type is known only once rendered: the executor checks it.
            later = [
                k for k, v in args.items() if next(templating.expressions(v), None) is not None
            ]
            errors += [f"{where}: tool '{tool}': {p}" for p in spec.check_args(args, later=later)]
    branch = _parse_transitions(where, body, errors)
    timeout = body.get("timeout")
    if timeout is not None and (not _is_number(timeout) or not 0 < timeout <= MAX_SECONDS):
        errors.append(
            f"{where}: field 'timeout' must be a number of seconds > 0 and <= {MAX_SECONDS}"
        )
    if kind == "gate" and "retry" in body:
        errors.append(f"{where}: field 'retry' does not apply to a gate (tool null)")
    retry = _parse_retry(where, body.get("retry"), errors)
    on_error = body.get("on_error")
    if on_error is not None and not isinstance(on_error, str):
        errors.append(f"{where}: field 'on_error' must be a state id")
    for key in GATE_ONLY_KEYS:
        if key in body and kind != "gate":
            errors.append(f"{where}: field '{key}' applies only to a gate (tool null)")
    approvers = body.get("approvers")
    if approvers is not None and (
        not isinstance(approvers, list)
        or not approvers
        or not all(isinstance(a, str) and a for a in approvers)
    ):
        errors.append(f"{where}: field 'approvers' must be a non-empty list of token names "
                      "or permissions")  # fmt: skip
    self_ok = body.get("allow_self_approval")
    if self_ok is not None and not isinstance(self_ok, bool):
        errors.append(f"{where}: field 'allow_self_approval' must be true or false")
    join = body.get("join", "fail_fast")
    if join not in JOINS:
        errors.append(f"{where}: field 'join' must be 'fail_fast' or 'all_settled'")
    if kind in ("parallel", "map") and depth >= MAX_DEPTH:
        errors.append(f"{where}: parallel and map states may be nested at most {MAX_DEPTH} deep")
        return None
    branches = mapped = waited = called = None
    if kind == "parallel":
        branches = _parse_parallel(where, body["parallel"], tools, errors, warnings, ids, depth)
    elif kind == "map":
        mapped = _parse_map(where, body["map"], tools, errors, warnings, ids, depth)
        if mapped is not None and isinstance(mapped.items, str):
            exprs += templating.expressions(mapped.items)
    elif kind == "wait":
        waited = _parse_wait(where, body["wait"], errors)
        if waited is not None:
            exprs += templating.expressions(waited.until)
    elif kind == "call":
        called = _parse_call(where, body["call"], errors)
        if called is not None:
            exprs += templating.expressions(called.input)
    if len(errors) > before:
        return None
    return State(
        id=sid,
        name=name,
        tool=tool if kind == "tool" else None,
        args=args,
        next=body.get("next"),
        branch=branch,
        done=body.get("done") is True,
        timeout=float(timeout) if timeout is not None else None,
        retry=retry,
        on_error=on_error,
        templated=bool(exprs),
        needs=templating.needs([*exprs, *(c.condition for c in branch if c.condition)], ids),
        approvers=tuple(approvers) if approvers else None,
        allow_self_approval=self_ok,
        kind=kind,
        branches=branches,
        join=join,
        map=mapped,
        wait=waited,
        call=called,
    )


def _parse_parallel(
    where: str,
    raw: Any,
    tools: Container[str] | None,
    errors: list[str],
    warnings: list[str],
    ids: frozenset[str],
    depth: int,
) -> dict[str, Flow] | None:
    if not isinstance(raw, dict) or not raw:
        errors.append(f"{where}: field 'parallel' must be an object of branches, each a flow")
        return None
    branches: dict[str, Flow] = {}
    for name, sub in raw.items():
        flow = _parse_flow(
            sub, tools, errors, warnings, f"{where}: branch '{name}': ", ids, depth + 1
        )
        if flow is not None:
            branches[name] = flow
    return branches if len(branches) == len(raw) else None


def _parse_map(
    where: str,
    raw: Any,
    tools: Container[str] | None,
    errors: list[str],
    warnings: list[str],
    ids: frozenset[str],
    depth: int,
) -> MapSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: field 'map' must be an object with 'items' and 'flow'")
        return None
    before = len(errors)
    for key in sorted(set(raw) - MAP_KEYS):
        errors.append(f"{where}: map: unknown field '{key}'")
    items = raw.get("items")
    if "items" not in raw:
        errors.append(f"{where}: map: field 'items' is required (a list, or \"<<expr>>\")")
    elif isinstance(items, str):
        exprs = list(templating.expressions(items))
        if len(exprs) != 1 or placeholders.whole(items) is None:
            errors.append(f"{where}: map: field 'items' must be a list or one placeholder "
                          'such as "<<input.users>>"')  # fmt: skip
        for expr in exprs:
            problem = templating.check_expression(expr)
            if problem:
                errors.append(f"{where}: map: field 'items': {problem}")
    elif not isinstance(items, list):
        errors.append(f"{where}: map: field 'items' must be a list or one placeholder")
    as_ = raw.get("as", "item")
    if not isinstance(as_, str) or not as_.isidentifier() or as_ in TOP_NAMES | {"index"}:
        errors.append(f"{where}: map: field 'as' must be a name (not one of "
                      f"{', '.join(sorted(TOP_NAMES | {'index'}))})")  # fmt: skip
    limit = raw.get("max_concurrency", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        errors.append(f"{where}: map: field 'max_concurrency' must be an integer from 1 to 1000")
    tolerated = raw.get("tolerated_failures", 0)
    if isinstance(tolerated, bool) or not isinstance(tolerated, int) or tolerated < 0:
        errors.append(f"{where}: map: field 'tolerated_failures' must be an integer >= 0")
    if "flow" not in raw:
        errors.append(f"{where}: map: field 'flow' is required")
        return None
    flow = _parse_flow(raw["flow"], tools, errors, warnings, f"{where}: map: ", ids, depth + 1)
    if flow is None or len(errors) > before:
        return None
    return MapSpec(items, as_, limit, tolerated, flow)


def _parse_wait(where: str, raw: Any, errors: list[str]) -> WaitSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: field 'wait' must be an object: seconds, until or signal")
        return None
    before = len(errors)
    for key in sorted(set(raw) - WAIT_KEYS):
        errors.append(f"{where}: wait: unknown field '{key}'")
    kinds = [k for k in ("seconds", "until", "signal") if k in raw]
    if len(kinds) != 1:
        errors.append(f"{where}: wait: needs exactly one of 'seconds', 'until' or 'signal'")
    seconds = raw.get("seconds")
    if "seconds" in raw and (not _is_number(seconds) or not 0 <= seconds <= MAX_SECONDS):
        errors.append(f"{where}: wait: field 'seconds' must be a number from 0 to {MAX_SECONDS}")
    until = raw.get("until")
    if "until" in raw:
        if isinstance(until, str) and next(templating.expressions(until), None) is not None:
            for expr in templating.expressions(until):
                problem = templating.check_expression(expr)
                if problem:
                    errors.append(f"{where}: wait: field 'until': {problem}")
        elif parse_instant(until) is None:
            errors.append(f"{where}: wait: field 'until' must be an ISO 8601 time with a time "
                          "zone, epoch milliseconds, or a placeholder giving one")  # fmt: skip
    signal = raw.get("signal")
    if "signal" in raw and (not isinstance(signal, str) or not 0 < len(signal) <= 200):
        errors.append(f"{where}: wait: field 'signal' must be a name of 1 to 200 characters")
    timeout = raw.get("timeout")
    if timeout is not None:
        if "signal" not in raw:
            errors.append(f"{where}: wait: field 'timeout' applies only to a signal wait")
        elif not _is_number(timeout) or not 0 < timeout <= MAX_SECONDS:
            errors.append(f"{where}: wait: field 'timeout' must be a number of seconds > 0 "
                          f"and <= {MAX_SECONDS}")  # fmt: skip
    if len(errors) > before:
        return None
    return WaitSpec(
        seconds=float(seconds) if seconds is not None else None,
        until=until,
        signal=signal,
        timeout=float(timeout) if timeout is not None else None,
    )


def _parse_call(where: str, raw: Any, errors: list[str]) -> CallSpec | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: field 'call' must be an object: workflow, and optionally "
                      "version and input")  # fmt: skip
        return None
    before = len(errors)
    for key in sorted(set(raw) - CALL_KEYS):
        errors.append(f"{where}: call: unknown field '{key}'")
    ref = raw.get("workflow")
    if "workflow" not in raw:
        errors.append(f"{where}: call: field 'workflow' is required (a saved definition's "
                      "name or id)")  # fmt: skip
    elif isinstance(ref, bool) or not (
        (isinstance(ref, str) and 0 < len(ref) <= MAX_REF)
        or (isinstance(ref, int) and 1 <= ref < 2**63)
    ):
        errors.append(f"{where}: call: field 'workflow' must be a saved definition's name "
                      f"(1 to {MAX_REF} characters) or id")  # fmt: skip
    version = raw.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31
    ):
        errors.append(f"{where}: call: field 'version' must be a version number (an integer "
                      ">= 1)")  # fmt: skip
    value = raw.get("input")
    if value is None:
        value = {}
    if isinstance(value, str):
        exprs = list(templating.expressions(value))
        if len(exprs) != 1 or placeholders.whole(value) is None:
            errors.append(f"{where}: call: field 'input' must be an object or one placeholder "
                          'such as "<<input>>"')  # fmt: skip
    elif not isinstance(value, dict):
        errors.append(f"{where}: call: field 'input' must be an object (the child's input)")
    for expr in list(templating.expressions(value))[:MAX_PLACEHOLDERS]:
        problem = templating.check_expression(expr)
        if problem:
            errors.append(f"{where}: call: field 'input': {problem}")
    if len(errors) > before:
        return None
    return CallSpec(ref, version, value)


def parse_instant(value: Any) -> int | None:
    """Epoch milliseconds from epoch milliseconds or an ISO 8601 time with its offset (a
    time without one is ambiguous: refused)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and _is_number(value) and 0 <= value < 2**53:
        return int(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            return None
        return int(when.timestamp() * 1000)
    return None


def _parse_transitions(where: str, body: dict[str, Any], errors: list[str]) -> tuple[Case, ...]:
    present = [k for k in ("next", "branch", "done") if k in body]
    if len(present) != 1:
        found = ", ".join(present) if present else "none"
        errors.append(f"{where}: needs exactly one of 'next', 'branch' or 'done' (found: {found})")
    if "next" in body and not isinstance(body["next"], str):
        errors.append(f"{where}: field 'next' must be a state id")
    if "done" in body and body["done"] is not True:
        errors.append(f"{where}: field 'done' must be true")
    if "branch" not in body:
        return ()
    raw = body["branch"]
    if not isinstance(raw, list) or not raw:
        errors.append(f"{where}: field 'branch' must be a non-empty list")
        return ()
    cases: list[Case] = []
    for i, item in enumerate(raw):
        at = f"{where}: branch[{i}]"
        if isinstance(item, dict) and set(item) == {"else"} and isinstance(item["else"], str):
            if i != len(raw) - 1:
                errors.append(f"{at}: 'else' must be the last case")
            cases.append(Case(None, item["else"]))
        elif (
            isinstance(item, dict)
            and set(item) == {"if", "then"}
            and isinstance(item["if"], str)
            and isinstance(item["then"], str)
        ):
            problem = templating.check_expression(item["if"].strip())
            if problem:
                errors.append(f"{at}: {problem}")
            cases.append(Case(item["if"].strip(), item["then"]))
        else:
            errors.append(
                f'{at}: must be {{"if": "<expr>", "then": "<state>"}} or {{"else": "<state>"}}'
            )
    return tuple(cases)


def _parse_retry(where: str, raw: Any, errors: list[str]) -> Retry:
    if raw is None:
        return Retry()
    if not isinstance(raw, dict):
        errors.append(f"{where}: field 'retry' must be an object")
        return Retry()
    for key in sorted(set(raw) - RETRY_KEYS):
        errors.append(f"{where}: retry: unknown field '{key}'")
    attempts = raw.get("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
        errors.append(f"{where}: retry.max_attempts must be an integer from 1 to 100")
        attempts = 1
    values = {}
    for key, default in (("backoff_s", 1.0), ("backoff_factor", 2.0), ("max_backoff_s", 300.0)):
        v = raw.get(key, default)
        top = math.inf if key == "backoff_factor" else MAX_SECONDS  # a factor is no duration
        if not _is_number(v) or not 0 <= v <= top:
            errors.append(f"{where}: retry.{key} must be a number from 0 to {top:g}")
            v = default
        values[key] = float(v)
    return Retry(max_attempts=attempts, **values)


def _raw_targets(body: Any) -> Iterator[tuple[str, str]]:
    """(field, target) pairs of a state, read before (or despite) other errors."""
    if not isinstance(body, dict):
        return
    for key in ("next", "on_error"):
        if isinstance(body.get(key), str):
            yield key, body[key]
    if isinstance(body.get("branch"), list):
        for i, case in enumerate(body["branch"]):
            if isinstance(case, dict):
                for key in ("then", "else"):
                    if isinstance(case.get(key), str):
                        yield f"branch[{i}].{key}", case[key]


def _is_number(v: Any) -> bool:
    """A JSON number that is a finite float (so later arithmetic cannot overflow)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _unreachable(raw: dict[str, Any]) -> list[str]:
    """States no transition leads to from start (read from the raw flow, despite errors)."""
    if "start" not in raw:
        return []
    seen, todo = {"start"}, ["start"]
    while todo:
        for _, target in _raw_targets(raw[todo.pop()]):
            if target in raw and target not in seen:
                seen.add(target)
                todo.append(target)
    return [s for s in raw if s not in seen]


def raw_state(raw: Any, scope: Sequence[Any], state_id: str) -> dict[str, Any]:
    """A state of a raw (stored) flow, in the flow nested at `scope` (see Flow.resolve);
    {} when there is none."""
    flow = raw if isinstance(raw, dict) else {}
    for i in range(0, len(scope), 2):
        state = flow.get(scope[i])
        state = state if isinstance(state, dict) else {}
        if isinstance(state.get("parallel"), dict):
            flow = state["parallel"].get(scope[i + 1], {})
        else:
            flow = (state.get("map") or {}).get("flow", {})
        flow = flow if isinstance(flow, dict) else {}
    found = flow.get(state_id)
    return found if isinstance(found, dict) else {}


def after_success(
    flow: Flow, state_id: str, *, matched: int = -1, error: str | None = None, result: Any = None
) -> Move:
    """Where to go once a state succeeded. For a branch, the executor evaluated its
    conditions against `result`, the state's own result: `matched` is the index of the
    first that held (-1: none), `error` why evaluating them failed."""
    state = flow[state_id]
    if state.done:
        return Complete()
    if state.next is not None:
        return Advance(state.next)
    if error is not None:
        return Fail(f"state '{state_id}': branch condition failed: {error}")
    cases = [c for c in state.branch or () if c.condition is not None]
    if matched >= 0:
        return Advance(cases[matched].target)
    for case in state.branch or ():
        if case.condition is None:
            return Advance(case.target)
    shown = templating.truncate_json(result)
    return Fail(f"state '{state_id}': no branch matched result {shown}")


def after_failure(
    flow: Flow, state_id: str, error: str, *, attempt: int, retryable: bool, rand: float
) -> Move:
    """Where to go once an attempt failed: retry later, the `on_error` state, or fail."""
    state = flow[state_id]
    if retryable and attempt < state.retry.max_attempts:
        return RetryLater(state.retry.delay(attempt, rand))
    if state.on_error is not None:
        return Advance(state.on_error)
    return Fail(f"state '{state_id}': {error}")


def limit_steps(move: Move, step_count: int, step_limit: int) -> Move:
    """Stop runaway loops: advancing past the per-workflow step limit fails the workflow."""
    if isinstance(move, Advance) and step_count >= step_limit:
        return Fail(f"step limit of {step_limit} reached; not starting state '{move.target}'")
    return move


def decision_refusal(
    approvers: Sequence[str] | None,
    allow_self_approval: bool | None,
    *,
    who: str,
    permissions: Iterable[str],
    creator: str | None,
    self_default: bool,
) -> str | None:
    """Why `who` may not decide a gate with these rules, or None if they may.

    `approvers` lists token names or permissions; `allow_self_approval` None means
    `self_default` (the config's).
    """
    if approvers is not None and who not in approvers and not set(permissions) & set(approvers):
        return f"'{who}' is not among the approvers of this gate"
    self_ok = self_default if allow_self_approval is None else allow_self_approval
    if not self_ok and who == creator:
        return f"'{who}' created this workflow and may not decide its gates"
    return None
