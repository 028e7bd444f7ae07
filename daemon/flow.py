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
from typing import Any

import orjson

from daemon import templating

STATE_KEYS = {
    "name", "tool", "args", "next", "branch", "done", "timeout", "retry", "on_error",
    "approvers", "allow_self_approval",
}  # fmt: skip
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
class State:
    id: str
    name: str
    tool: str | None  # None: an approval gate
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

    @property
    def conditions(self) -> list[str]:
        """The branch's `if` expressions, in order (the final `else` has none)."""
        return [c.condition for c in self.branch or () if c.condition is not None]

    @property
    def is_gate(self) -> bool:
        return self.tool is None

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
    if len(raw) > max_states:
        errors.append(f"flow has {len(raw)} states; the limit is {max_states}")
        return Validation(None, errors, [])
    # The expressions' size first, from a cheap scan: parsing each costs microseconds
    # per character, so an oversized flow is refused before any of them is parsed.
    size = _expression_size(raw)
    if size is not None:
        return Validation(None, [*errors, size], [])
    states: dict[str, State] = {}
    ids = frozenset(raw)
    for sid, body in raw.items():
        state = _parse_state(sid, body, tools, errors, ids)
        if state is not None:
            states[sid] = state
    for sid, body in raw.items():
        for key, target in _raw_targets(body):
            if target not in raw:
                errors.append(f"state '{sid}': field '{key}' refers to unknown state '{target}'")
    warnings = [f"state '{s}' is unreachable from 'start'" for s in _unreachable(raw)]
    if errors:
        return Validation(None, errors, warnings)
    return Validation(Flow(states), [], warnings)


def _expression_size(raw: dict[str, Any]) -> str | None:
    """Why the flow's expressions are too many or too long together, if they are."""
    count = text = 0
    for body in raw.values():
        if not isinstance(body, dict):
            continue
        for expr in templating.expressions(body.get("args")):
            count, text = count + 1, text + len(expr)
        for case in body.get("branch") if isinstance(body.get("branch"), list) else ():
            if isinstance(case, dict) and isinstance(case.get("if"), str):
                count, text = count + 1, text + len(case["if"])
    if count > MAX_PLACEHOLDERS:
        return (f"flow has {count} placeholders and branch conditions; the limit is "
                f"{MAX_PLACEHOLDERS}")  # fmt: skip
    if text > MAX_EXPRESSION_TEXT:
        return f"flow has {text} characters of expressions; the limit is {MAX_EXPRESSION_TEXT}"
    return None


def _parse_state(
    sid: str, body: Any, tools: Container[str] | None, errors: list[str], ids: frozenset[str]
) -> State | None:
    where = f"state '{sid}'"
    if not isinstance(body, dict):
        errors.append(f"{where}: must be an object")
        return None
    before = len(errors)
    for key in sorted(set(body) - STATE_KEYS):
        errors.append(f"{where}: unknown field '{key}'")
    if "tool" not in body:
        errors.append(f"{where}: field 'tool' is required (a tool name, or null for a gate)")
    tool = body.get("tool")
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
    if tool is None and "retry" in body:
        errors.append(f"{where}: field 'retry' does not apply to a gate (tool null)")
    retry = _parse_retry(where, body.get("retry"), errors)
    on_error = body.get("on_error")
    if on_error is not None and not isinstance(on_error, str):
        errors.append(f"{where}: field 'on_error' must be a state id")
    for key in GATE_ONLY_KEYS:
        if key in body and tool is not None:
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
    if len(errors) > before:
        return None
    return State(
        id=sid,
        name=name,
        tool=tool,
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
    )


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
