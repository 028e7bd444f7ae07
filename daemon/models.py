"""Domain data as frozen dataclasses; statuses as StrEnums."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Self

import orjson

from daemon.limits import MAX_ERROR


class WorkflowStatus(StrEnum):
    RUNNING = "running"  # has a pending, running or waiting step
    COMPLETED = "completed"  # a `done: true` state finished
    FAILED = "failed"  # a step failed with nowhere to go, or the flow broke
    CANCELLED = "cancelled"  # DELETE /api/workflow/{id}
    PAUSED = "paused"  # POST /api/workflow/{id}/pause (stored as running with paused_at)
    QUEUED = "queued"  # a run waiting for a slot under its definition's concurrency


# The statuses a workflow ends in (also the names of the events that end it).
TERMINAL = frozenset({WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED})


class StepStatus(StrEnum):
    PENDING = "pending"  # queued, or waiting for a retry's backoff (run_at)
    RUNNING = "running"  # a tool is running, or a gate waits (awaiting = "ready")
    DONE = "done"  # finished with result_json
    FAILED = "failed"  # finished with error
    CANCELLED = "cancelled"  # its workflow was cancelled


class _Row:
    @classmethod
    def from_row(cls, row: Any) -> Self:
        return cls(**{name: row[i] for name, i in _columns(cls, tuple(row.keys()))})


@functools.lru_cache(maxsize=256)
def _columns(cls: type, keys: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(field, column index) for the fields of `cls` a query's columns have: worked out
    once per query shape, not per row (this runs for every step the executor handles)."""
    index = {key: i for i, key in enumerate(keys)}
    return tuple((f.name, index[f.name]) for f in fields(cls) if f.name in index)


@dataclass(frozen=True)
class Workflow(_Row):
    id: int
    name: str
    status: str
    created_by: str | None
    created_at: int
    updated_at: int
    error: str | None = None
    completed_at: int | None = None
    cancelled_at: int | None = None
    flow_json: str | None = None
    input_json: str | None = None
    notify_url: str | None = None
    paused_at: int | None = None
    output_json: str | None = None
    dag_json: str | None = None
    input_rev: int = 0
    definition_id: int | None = None  # a run of a saved definition
    definition_version: int | None = None
    run_trigger: str | None = None  # manual, execute, webhook, schedule, call
    queued_json: str | None = None  # a queued run's first step (see NewStep.to_json)
    queued: bool = False  # (list queries give this instead of queued_json)
    parent_step_id: int | None = None  # a child of a call state
    parent_workflow_id: int | None = None
    call_depth: int = 0
    root_id: int | None = None  # a child of a call state: the top of its tree of calls
    schedule_id: int | None = None  # a run a schedule started, for the fire time fire_at
    fire_at: int | None = None

    @property
    def public_status(self) -> str:
        """The status clients see: a paused workflow is stored as running with paused_at,
        a queued run as running with queued_json."""
        if self.status != "running":
            return self.status
        if self.queued_json is not None or self.queued:
            return "queued"
        return "paused" if self.paused_at is not None else self.status

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.public_status,
            "created_by": self.created_by,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "completed_at": self.completed_at,
            "cancelled_at": self.cancelled_at,
            "paused_at": self.paused_at,
            "definition_id": self.definition_id,
            "definition_version": self.definition_version,
            "trigger": self.run_trigger,
        }


@dataclass(frozen=True)
class Step(_Row):
    id: int
    workflow_id: int
    state: str
    name: str
    tool: str | None
    status: str
    seq: int
    attempt: int
    run_at: int
    created_at: int
    expires_at: int | None = None
    awaiting: str | None = None
    result_json: str | None = None
    error: str | None = None
    error_type: str | None = None
    decided_by: str | None = None
    decided_at: int | None = None
    reason: str | None = None
    started_at: int | None = None
    completed_at: int | None = None
    parent_id: int | None = None
    branch: str | None = None
    scope: str | None = None  # JSON: the path of its flow (see flow.Flow.resolve)
    signal: str | None = None
    held_at: int | None = None
    woken: int | None = None
    child_id: int | None = None  # a call step: the child workflow of its latest attempt

    @property
    def kind(self) -> str:
        """tool, gate, parallel, map or wait (see flow.KIND_TOOLS)."""
        if self.tool is None:
            return "gate"
        return self.tool[1:] if self.tool.startswith(":") else "tool"

    @property
    def path(self) -> tuple[Any, ...]:
        return tuple(_scope(self.scope)) if self.scope else ()

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "kind": self.kind,
            "tool": None if self.tool is None or self.tool.startswith(":") else self.tool,
            "parent_id": self.parent_id,
            "child_id": self.child_id,
            "scope": None if self.scope is None else orjson.Fragment(self.scope),
            "status": self.status,
            "awaiting": self.awaiting,
            "attempt": self.attempt,
            "result_json": self.result_json,
            "error": self.error,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "reason": self.reason,
            "run_at": self.run_at,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }


@functools.lru_cache(maxsize=4096)
def _scope(text: str) -> tuple[Any, ...]:
    return tuple(orjson.loads(text))


@dataclass(frozen=True)
class NewStep:
    """A state visit to insert: a pending tool step, or a gate that starts waiting."""

    state: str
    name: str
    tool: str | None
    seq: int
    timeout_ms: int | None = None  # for a gate: how long it may wait
    parent_id: int | None = None  # inside a parallel branch or map item: see Step
    branch: str | None = None
    scope: str | None = None

    def to_json(self) -> str:
        return orjson.dumps({f.name: getattr(self, f.name) for f in fields(self)}).decode()

    @classmethod
    def from_json(cls, text: str) -> NewStep:
        return cls(**orjson.loads(text))


@dataclass(frozen=True)
class BranchEnd:
    """A parallel branch or map item reached its end (done, or failed with nowhere to go):
    settled in the transaction that finishes its last step."""

    parent_id: int
    key: str
    ok: bool
    kind: str  # parallel or map
    join: str = "fail_fast"  # parallel: fail_fast or all_settled
    tolerated: int = 0  # map: failed items allowed
    first: NewStep | None = None  # map: the first step of the next item to start


@dataclass(frozen=True)
class Branches:
    """The branches (or items) a parallel or map step starts: (key, item JSON) in order,
    at most `limit` at once, each beginning with `first(key)`."""

    keys: list[tuple[str, str | None]]
    limit: int
    firsts: dict[str, NewStep]  # parallel: per branch; map: under "*"
    max_bytes: int | None = None  # the workflow's max_workflow_bytes


@dataclass(frozen=True)
class Finish:
    """The outcome of one attempt, written in one transaction with what follows it."""

    step_id: int
    workflow_id: int
    attempt: int
    status: StepStatus  # DONE or FAILED, or PENDING for a retry
    result_json: str | None = None
    error: str | None = None
    error_type: str | None = None
    retry_at: int | None = None  # with PENDING: when to try again
    next_step: NewStep | None = None  # the state to visit next
    # With a lease: the next step (a tool step) is written as running, handed straight to
    # this process's executor instead of queued for the next claim.
    start_next_lease_ms: int | None = None
    workflow_status: WorkflowStatus | None = None  # COMPLETED / FAILED ends the workflow
    workflow_error: str | None = None
    # With a result: refuse it (WorkflowTooLarge) if the workflow would then store more.
    max_workflow_bytes: int | None = None
    branch_end: BranchEnd | None = None  # the end of a branch or item instead of the workflow's
    depth: int = 0  # how many parallel or map steps the step runs inside

    def __post_init__(self) -> None:
        # Every error stored with a step or a workflow passes here: a tool's exception or
        # an expression's message can be megabytes long.
        for name in ("error", "workflow_error"):
            text = getattr(self, name)
            if text is not None and len(text) > MAX_ERROR:
                object.__setattr__(self, name, text[:MAX_ERROR] + " ... (cut)")


@dataclass(frozen=True)
class Definition(_Row):
    """A saved definition; its content is in its versions (DefinitionVersion)."""

    id: int
    name: str
    status: str  # draft, active, paused, archived
    version: int  # the latest: what runs by default
    trigger_type: str
    tags_json: str
    concurrency: int
    created_at: int
    updated_at: int
    description: str | None = None
    webhook_id: str | None = None
    webhook_secret: str | None = None
    webhook_mode: str = "single"
    armed_until: int | None = None
    created_by: str | None = None


@dataclass(frozen=True)
class DefinitionVersion(_Row):
    definition_id: int
    version: int
    body_json: str
    flow_json: str
    content_hash: str
    created_at: int
    change_summary: str | None = None
    created_by: str | None = None


@dataclass(frozen=True)
class NewVersion:
    """A definition's content to store as a version, with the settings copied from it."""

    name: str
    body_json: str
    flow_json: str
    content_hash: str
    tags_json: str
    description: str | None
    concurrency: int
    webhook_mode: str
    change_summary: str | None


@dataclass(frozen=True)
class NewRun:
    """A workflow to start from a definition's version (or a one-off one: no definition)."""

    name: str
    flow_json: str
    input_json: str
    created_by: str | None
    first: NewStep
    trigger: str
    definition_id: int | None = None
    definition_version: int | None = None
    dag_json: str | None = None
    notify_url: str | None = None
    parent_step_id: int | None = None
    parent_workflow_id: int | None = None
    call_depth: int = 0
    root_id: int | None = None
    schedule_id: int | None = None
    fire_at: int | None = None


@dataclass(frozen=True)
class Schedule(_Row):
    id: int
    definition_id: int
    cron: str
    timezone: str
    input_json: str
    overlap: str
    catchup_ms: int
    paused: int
    created_at: int
    updated_at: int
    next_at: int | None = None
    last_fired_at: int | None = None
    created_by: str | None = None
    definition_name: str | None = None  # (joined by the queries that show a schedule)
    buffered: int = 0


@dataclass(frozen=True)
class Tick(_Row):
    id: int
    schedule_id: int
    kind: str
    fire_at: int
    outcome: str
    recorded_at: int
    run_id: int | None = None
    reason: str | None = None
