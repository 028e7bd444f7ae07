"""The storage interface, written once for every backend.

`BaseStore` holds what the daemon asks of its database: the public async methods and the
transaction bodies behind them. A transaction body is a plain function of a `Tx` (run in
one transaction by the backend's `_write`) that reads and writes through named queries,
`self.Q[name]`, loaded from the backend's own `queries.sql`: the same names and the same
result columns in every dialect. A backend (daemon/storage/sqlite, daemon/storage/postgres)
provides the connections, `_write`, the reads, ids, and how other processes' changes are
noticed.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib.resources.abc import Traversable
from typing import Any, ClassVar, Protocol, TypeVar

import orjson

from daemon.models import Branches, Finish, NewStep, Step, StepStatus, Workflow, WorkflowStatus
from daemon.storage.definitions import DefinitionStore
from daemon.storage.schedules import ScheduleStore
from daemon.storage.types import (
    NEVER,
    Cancelled,
    Created,
    Gauges,
    LinkSpent,
    Replay,
    Replayed,
    Row,
    WorkflowTooLarge,
    now_ms,
)

T = TypeVar("T")
CommitHook = Callable[[float, int], None]  # (seconds, operations in the transaction)
TOKEN_CACHE = 4096  # workflows whose creating token is remembered
ROW_BYTES = 64  # what a branch or kept signal counts against max_workflow_bytes besides its data

_BLOCK = re.compile(r"^-- (\w+) --\n--[^\n]*\n(.*?)(?=^-- \w+ --$|\Z)", re.M | re.S)


def load_queries(text: str) -> dict[str, str]:
    """Named SQL blocks: a `-- name --` line, one comment line, then the statement."""
    return {m.group(1): m.group(2).strip() for m in _BLOCK.finditer(text)}


def numbered_migrations(folder: Traversable) -> list[tuple[int, str]]:
    """(version, script) for every numbered `NNNN_name.sql` file in `folder`, in order."""
    out = []
    for entry in folder.iterdir():
        m = re.match(r"(\d+)_.*\.sql$", entry.name)
        if m:
            out.append((int(m.group(1)), entry.read_text()))
    return sorted(out)


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """What a transaction body may do: run named queries (`:name` parameters)."""

    def execute(self, sql: str, params: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, params: Any, /) -> Any: ...


def _event_dict(row: Row) -> dict[str, Any]:
    """An event row as a dict, its data decoded."""
    return {**dict(row), "data": orjson.loads(row["data_json"]) if row["data_json"] else None}


def _replay(created_by: str | None, key: str, row: Row) -> Replay:
    return Replay(created_by, key, row["request_hash"], row["status"], row["body_json"])


class BaseStore(ScheduleStore, DefinitionStore):
    """Async access to the daemon's database.

    With `max_running_per_token`, no write starts a tool step (a claim or a hand-off) while
    that many steps run for the token that created its workflow: each token gets a share
    of the run slots, and its other due steps wait for one of its own to finish.
    """

    Q: ClassVar[dict[str, str]]  # the backend's named queries
    backend: ClassVar[str]

    def __init__(self, *, max_running_per_token: int | None = None, node: str = "") -> None:
        self.max_running_per_token = max_running_per_token
        self.node = node  # written as the owner of the steps this process runs
        self._tokens: OrderedDict[int, str | None] = OrderedDict()  # workflow id -> creator
        self._changed = asyncio.Event()  # set, and replaced, after every commit
        self.commit_hooks: list[CommitHook] = []  # (seconds, batch size) per commit
        # A run of a schedule ended in a write (the scheduler may start a buffered tick).
        self.schedule_run_ended = False
        # Called with "commit" after a write of this process, "remote" when another daemon
        # on the database wrote (PostgreSQL's NOTIFY), "reconnect" when such news may have
        # been missed (look at everything again).
        self.change_hooks: list[Callable[[str], None]] = []
        # Tests inject storage faults here: called with an operation's name before it runs;
        # what it raises, the operation raises, having changed nothing.
        self.faults: Callable[[str], None] | None = None
        # Called with the ids of steps a transaction of this process cancelled (a branch
        # failed: its siblings stop), once it committed: the executor stops their tools.
        self.cancel_hooks: list[Callable[[list[int]], None]] = []

    # -- what a backend provides ---------------------------------------------------

    @property
    def is_open(self) -> bool:
        raise NotImplementedError

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def schema_version(self) -> int:
        raise NotImplementedError

    async def _write(self, op: Callable[[Tx], T], *, blocking: bool = False) -> T:
        """Run `op` in one write transaction; its value once committed."""
        raise NotImplementedError

    async def _one(self, sql: str, params: dict[str, Any]) -> Row | None:
        """One row of a small, indexed query."""
        raise NotImplementedError

    async def _all(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """All rows of a small, indexed, LIMITed query."""
        raise NotImplementedError

    async def read_slow(self, sql: str, params: dict[str, Any]) -> list[Row]:
        """All rows of a query that may scan or return much, read off the event loop."""
        raise NotImplementedError

    def _new_id(self, now: int) -> int:
        """A new id shaped like epoch ms, unique and increasing; called inside a write op."""
        raise NotImplementedError

    async def lead(self, job: str) -> bool:
        """Whether this process runs the named singleton job (the notifier's cursor,
        retention, gate expiry): with one daemon per database, always."""
        return True

    async def secret(self, name: str) -> bytes | None:
        """A secret every daemon on this database shares ("server": signs links and
        sessions; "webhook": signs webhooks), made at first use; None when the backend
        keeps none (one daemon per database: the state directory's files hold them)."""
        return None

    def _committed(self, seconds: float, batch: int) -> None:
        """A write of this process committed: wake waiters, run the commit hooks."""
        for hook in self.commit_hooks:
            hook(seconds, batch)
        self.changed("commit")

    def changed(self, kind: str) -> None:
        """Something was written ("commit", "remote" or "reconnect": see change_hooks)."""
        self._changed.set()
        self._changed = asyncio.Event()
        for hook in self.change_hooks:
            hook(kind)

    async def write(self, name: str, op: Callable[[Tx], T], *, blocking: bool = False) -> T:
        """`_write`, after the fault-injection hook had its say about operation `name`."""
        if self.faults is not None:
            self.faults(name)
        return await self._write(op, blocking=blocking)

    def _event(
        self,
        db: Tx,
        workflow_id: int,
        step_id: int | None,
        type_: str,
        now: int,
        data: dict[str, Any] | None = None,
    ) -> None:
        db.execute(
            self.Q["insert_event"],
            {
                "workflow_id": workflow_id,
                "step_id": step_id,
                "type": type_,
                "now": now,
                "data_json": orjson.dumps(data).decode() if data else None,
            },
        )

    def _insert_step(self, db: Tx, workflow_id: int, step: NewStep, now: int) -> int:
        step_id = self._new_id(now)
        db.execute(
            self.Q["insert_step"],
            {
                "id": step_id,
                "workflow_id": workflow_id,
                "state": step.state,
                "name": step.name,
                "tool": step.tool,
                "seq": step.seq,
                "timeout_ms": step.timeout_ms,
                "now": now,
                "parent_id": step.parent_id,
                "branch": step.branch,
                "scope": step.scope,
            },
        )
        if step.tool is None:
            self._event(db, workflow_id, step_id, "gate_waiting", now, {"state": step.state})
        return step_id

    def _may_start(self, db: Tx, workflow_id: int, now: int) -> bool:
        """Whether a step of this workflow written now may be handed off (written as
        running). Not while due steps a claim could take wait in the queue: it joins the
        queue behind them, first come, first served, so a busy chain of hand-offs cannot
        starve what was queued before it (steps of tokens at their share are no such
        steps). Nor while its own token has max_running_per_token steps running."""
        (paused,) = db.execute(self.Q["workflow_paused"], {"workflow_id": workflow_id}).fetchone()
        if paused is not None:
            return False  # its steps are held until it resumes
        oldest = db.execute(self.Q["oldest_due_token"], {"now": now}).fetchone()
        if self.max_running_per_token is None:
            return oldest is None
        token = self._token(db, workflow_id)
        if not self._has_room(db, token):
            return False
        if oldest is None:
            return True
        if oldest[0] == token or self._has_room(db, oldest[0]):
            return False  # the oldest due step could be claimed: it goes first
        return not self._claimable(db, 1, now)

    def _token(self, db: Tx, workflow_id: int) -> str | None:
        """The token that created a workflow (it never changes: cached)."""
        if workflow_id not in self._tokens:
            (token,) = db.execute(self.Q["workflow_token"], {"workflow_id": workflow_id}).fetchone()
            self._remember_token(workflow_id, token)
        return self._tokens[workflow_id]

    def _one_at_a_time(self, db: Tx, key: str) -> None:
        """Transactions that call this with the same key run one after the other from here
        on, and each sees what those before it committed. Writes are serial on SQLite
        already; PostgreSQL takes a transaction advisory lock."""

    def _remember_token(self, workflow_id: int, token: str | None) -> None:
        """Cache a workflow's token, forgetting the oldest past TOKEN_CACHE entries."""
        self._tokens[workflow_id] = token
        while len(self._tokens) > TOKEN_CACHE:
            self._tokens.popitem(last=False)

    def _has_room(self, db: Tx, token: str | None) -> bool:
        """Whether `token` runs fewer steps than its share."""
        if self.max_running_per_token is None:
            return True
        (running,) = db.execute(self.Q["running_of_token"], {"created_by": token}).fetchone()
        return bool(running < self.max_running_per_token)

    def _room(self, running: dict[str | None, int], token: str | None, limit: int) -> int:
        """How many more steps may start for `token` (at most `limit`)."""
        if self.max_running_per_token is None:
            return limit
        return min(limit, self.max_running_per_token - running.get(token, 0))

    def _running(self, db: Tx) -> dict[str | None, int]:
        """How many tool steps run for each token."""
        return {r[0]: r[1] for r in db.execute(self.Q["running_by_token"]).fetchall()}

    def _claimable(
        self, db: Tx, limit: int, now: int, running: dict[str | None, int] | None = None
    ) -> list[int]:
        """Up to `limit` due pending steps, oldest first, of tokens below their share.

        Each token's due steps are read on their own (one index seek, at most `limit`
        rows), so the cost does not grow with any token's backlog, and a token at its
        share holds back only its own steps."""
        running = self._running(db) if running is None else running
        due: list[tuple[int, int]] = []
        for (token,) in db.execute(self.Q["pending_tokens"]).fetchall():
            room = self._room(running, token, limit)
            if room > 0:
                params = {"created_by": token, "now": now, "limit": room}
                due += [(r[0], r[1]) for r in db.execute(self.Q["due_of_token"], params).fetchall()]
        due.sort()  # (run_at, id): oldest first across tokens
        return [step_id for _, step_id in due[:limit]]

    def _insert_started(
        self, db: Tx, workflow_id: int, step: NewStep, now: int, lease_ms: int
    ) -> Step:
        """Insert a tool step as running under a lease (see Finish.start_next_lease_ms)."""
        assert step.tool is not None, "a gate cannot be started"
        started_at = max(now, now_ms())  # the lease runs from the transaction, not the request
        row = db.execute(
            self.Q["insert_started_step"],
            {"id": self._new_id(now), "workflow_id": workflow_id, "state": step.state,
             "name": step.name, "tool": step.tool, "seq": step.seq, "now": now,
             "started_at": started_at, "lease_ms": lease_ms, "node": self.node,
             "parent_id": step.parent_id, "branch": step.branch, "scope": step.scope},
        ).fetchone()  # fmt: skip
        started = Step.from_row(row)
        self._event(db, workflow_id, started.id, "step_started", now,
                    {"state": step.state, "attempt": 1})  # fmt: skip
        return started

    # -- workflows -----------------------------------------------------------------

    async def create_workflow(
        self,
        *,
        name: str,
        flow_json: str,
        input_json: str,
        created_by: str | None,
        first: NewStep,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        notify_url: str | None = None,
        start_lease_ms: int | None = None,
        now: int | None = None,
        dag_json: str | None = None,
    ) -> Created:
        """Insert a workflow and its first step; replays an earlier Idempotency-Key.

        With `start_lease_ms` the first (tool) step is written as running and returned in
        `Created.started`, for the caller to run at once. `dag_json`: the submitted steps
        of a workflow created from the DAG shape, kept beside the compiled flow.
        """
        now = now_ms() if now is None else now

        def op(db: Tx) -> Created:
            if idempotency_key is not None:
                params = {"created_by": created_by, "key": idempotency_key}
                row = db.execute(self.Q["find_idempotent"], params).fetchone()
                if row is not None:
                    return Created(row["id"], True, conflict=row["request_hash"] != request_hash)
            wf_id = self._insert_workflow(db, now, name=name, flow_json=flow_json,
                                          input_json=input_json, created_by=created_by,
                                          key=idempotency_key, request_hash=request_hash,
                                          notify_url=notify_url, dag_json=dag_json)  # fmt: skip
            if (
                start_lease_ms is not None
                and first.tool is not None
                and self._may_start(db, wf_id, now)
            ):
                started = self._insert_started(db, wf_id, first, now, start_lease_ms)
                return Created(wf_id, False, started=started, first_step_id=started.id)
            return Created(wf_id, False, first_step_id=self._insert_step(db, wf_id, first, now))

        return await self.write("create_workflow", op)

    def _insert_workflow(self, db: Tx, now: int, **fields: Any) -> int:
        """Insert a running workflow (without steps) and its `created` event; its id.
        `fields`: the insert_workflow query's, those of a run (see NewRun) defaulting to
        none."""
        wf_id = self._new_id(now)
        params = {"key": None, "request_hash": None, "notify_url": None, "dag_json": None,
                  "definition_id": None, "definition_version": None, "run_trigger": None,
                  "queued_json": None, "parent_step_id": None, "parent_workflow_id": None,
                  "call_depth": 0, "root_id": None, "schedule_id": None, "fire_at": None,
                  **fields, "id": wf_id, "now": now}  # fmt: skip
        params["stored_bytes"] = sum(
            len((params[k] or "").encode()) for k in ("flow_json", "input_json", "dag_json")
        )
        db.execute(self.Q["insert_workflow"], params)
        data: dict[str, Any] = {"by": params["created_by"]}
        if params["definition_id"] is not None:
            data |= {
                "definition_id": params["definition_id"],
                "version": params["definition_version"],
                "trigger": params["run_trigger"],
            }
        self._event(db, wf_id, None, "created", now, data)
        self._remember_token(wf_id, params["created_by"])
        return wf_id

    async def get_workflow(self, workflow_id: int) -> Workflow | None:
        row = await self._one(self.Q["get_workflow"], {"id": workflow_id})
        return Workflow.from_row(row) if row else None

    async def list_workflows(
        self, *, limit: int = 50, status: str | None = None, before: int | None = None
    ) -> list[Workflow]:
        params = {"limit": limit, "status": status, "before": before or NEVER}
        if status in ("paused", "queued"):
            sql = self.Q[f"list_workflows_{status}"]
        else:
            sql = self.Q["list_workflows_by_status"] if status else self.Q["list_workflows"]
        return [Workflow.from_row(r) for r in await self._all(sql, params)]

    async def steps(self, workflow_id: int) -> list[Step]:
        # In a thread: results may add up to many megabytes for a long workflow.
        rows = await self.read_slow(self.Q["workflow_steps"], {"workflow_id": workflow_id})
        return [Step.from_row(r) for r in rows]

    async def get_step(self, step_id: int) -> Step | None:
        row = await self._one(self.Q["get_step"], {"id": step_id})
        return Step.from_row(row) if row else None

    async def events(self, workflow_id: int) -> list[dict[str, Any]]:
        rows = await self._all(self.Q["workflow_events"], {"workflow_id": workflow_id})
        return [_event_dict(r) for r in rows]

    async def cancel_workflow(
        self, workflow_id: int, *, by: str | None, now: int | None = None
    ) -> tuple[Cancelled, list[int]]:
        """Cancel a running workflow and its open steps; returns the cancelled step ids."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> tuple[Cancelled, list[int]]:
            exists = db.execute(self.Q["workflow_exists"], {"id": workflow_id}).fetchone()
            if exists is None:
                return Cancelled.NOT_FOUND, []
            step_ids = self._cancel_tree(db, workflow_id, by, now)  # and its children's
            if step_ids is None:
                return Cancelled.FINISHED, []
            return Cancelled.OK, step_ids

        return await self.write("cancel_workflow", op)

    # -- steps ---------------------------------------------------------------------

    async def claim_steps(
        self, limit: int, *, lease_ms: int = 30_000, now: int | None = None
    ) -> list[Step]:
        """Claim up to `limit` due pending steps, oldest first, skipping those of tokens at
        max_running_per_token; tools become running under a lease, gates start waiting."""

        def op(db: Tx) -> list[Step]:
            # The time the transaction runs, not when it was queued: leases start now.
            at = now_ms() if now is None else now
            # Chosen and taken in one transaction: no other write sees them in between.
            ids = orjson.dumps(self._claimable(db, limit, at)).decode()
            params = {"now": at, "ids": ids, "lease_ms": lease_ms, "node": self.node}
            rows = [Step.from_row(r) for r in db.execute(self.Q["claim_steps"], params).fetchall()]
            for step in rows:
                if step.tool is None:
                    self._event(
                        db, step.workflow_id, step.id, "gate_waiting", at, {"state": step.state}
                    )
                else:
                    self._event(db, step.workflow_id, step.id, "step_started", at,
                                {"state": step.state, "attempt": step.attempt})  # fmt: skip
            rows.sort(key=lambda s: s.id)
            return rows

        return await self.write("claim_steps", op)

    async def finish_step(self, fin: Finish, *, now: int | None = None) -> int | None:
        """Record an attempt and what follows it in one transaction.

        Returns the next step's id (0 when there is none), or None when the attempt
        no longer owns the step (cancelled, or requeued) and nothing was written.
        """
        now = now_ms() if now is None else now
        cancels: list[int] = []
        done = await self.write("finish_step", lambda db: self._finish(db, fin, now, cancels))
        self._cancelled(cancels)
        return None if done is None else done[0]

    async def finish_and_start(
        self, fin: Finish, *, now: int | None = None
    ) -> tuple[int | None, Step | None]:
        """finish_step, and the next step when it was written as running
        (`fin.start_next_lease_ms`): (next id or 0 or None, started step or None)."""
        now = now_ms() if now is None else now
        cancels: list[int] = []
        done = await self.write("finish_and_start", lambda db: self._finish(db, fin, now, cancels))
        self._cancelled(cancels)
        return (None, None) if done is None else done

    def _cancelled(self, step_ids: list[int]) -> None:
        if step_ids:
            for hook in self.cancel_hooks:
                hook(step_ids)

    def _finish(
        self, db: Tx, fin: Finish, now: int, cancels: list[int]
    ) -> tuple[int, Step | None] | None:
        cancels.clear()  # the operation may run again (a retried transaction)
        self._lock_branches_of(db, fin)
        params = {
            "id": fin.step_id,
            "attempt": fin.attempt,
            "now": now,
            "error": fin.error,
            "error_type": fin.error_type,
        }
        if fin.status is StepStatus.PENDING:
            self._hold_point(db, fin.workflow_id, now)  # it is held if paused: see _follow
            cur = db.execute(self.Q["retry_step"], {**params, "run_at": fin.retry_at})
        else:
            cur = db.execute(
                self.Q["finish_step"],
                {**params, "status": fin.status.value, "result_json": fin.result_json},
            )
        if cur.rowcount == 0:
            return None
        touched = self._grow(db, fin, now) or fin.status is StepStatus.PENDING
        return self._follow(db, fin, now, touched=touched, cancels=cancels)

    def _hold_point(self, db: Tx, workflow_id: int, now: int) -> None:
        """Mark the workflow changed before writing a step whose due time depends on
        whether the workflow is paused: on PostgreSQL this takes the workflow's row, so a
        pause (which updates it) either committed before, and the step is written held,
        or waits for this transaction, and then holds the step; without it the pause
        could miss a step written but not yet committed, which then ran while paused."""
        db.execute(self.Q["touch_workflow"], {"id": workflow_id, "now": now})

    def _grow(self, db: Tx, fin: Finish, now: int) -> bool:
        """Count a result against its workflow's storage (and mark the workflow changed:
        True); WorkflowTooLarge, and the whole operation rolled back, if that takes it past
        `fin.max_workflow_bytes`."""
        if fin.result_json is None or fin.max_workflow_bytes is None:
            return False
        self._store_bytes(db, fin.workflow_id, len(fin.result_json.encode()),
                          fin.max_workflow_bytes, now)  # fmt: skip
        return True

    def _store_bytes(
        self, db: Tx, workflow_id: int, size: int, limit: int | None, now: int
    ) -> None:
        """Count `size` bytes against a workflow's storage (marking it changed);
        WorkflowTooLarge, and the whole operation rolled back, past `limit`."""
        params = {"id": workflow_id, "bytes": size, "now": now}
        (total,) = db.execute(self.Q["grow_workflow"], params).fetchone()
        if limit is not None and total > limit:
            raise WorkflowTooLarge(total - size, size, limit)

    def _follow(
        self,
        db: Tx,
        fin: Finish,
        now: int,
        *,
        touched: bool = False,
        cancels: list[int] | None = None,
    ) -> tuple[int, Step | None]:
        """Events, the next step and the workflow's end, after a step changed."""
        wf = fin.workflow_id
        if not touched and fin.workflow_status is None:
            self._hold_point(db, wf, now)  # before the next step is written (_grow was)
            touched = True
        data: dict[str, Any] = {"attempt": fin.attempt}
        if fin.status is StepStatus.PENDING:
            kind = "step_retrying"
            data |= {"error": fin.error, "run_at": fin.retry_at}
        elif fin.status is StepStatus.FAILED:
            kind = "step_failed"
            data["error"] = fin.error
        else:
            kind = "step_done"
        self._event(db, wf, fin.step_id, kind, now, data)
        next_id, started = 0, None
        if (fin.next_step is not None and fin.start_next_lease_ms and fin.next_step.tool
                and self._may_start(db, wf, now)):  # fmt: skip
            started = self._insert_started(db, wf, fin.next_step, now, fin.start_next_lease_ms)
            next_id = started.id
        elif fin.next_step is not None:
            next_id = self._insert_step(db, wf, fin.next_step, now)
        elif fin.branch_end is not None:
            self._settle_branch(db, fin, now, [] if cancels is None else cancels)
        elif fin.workflow_status is not None:
            completed = fin.workflow_status is WorkflowStatus.COMPLETED
            db.execute(
                self.Q["end_workflow"],
                {
                    "id": wf,
                    "status": fin.workflow_status.value,
                    "error": fin.workflow_error,
                    "now": now,
                    "output_json": (fin.result_json or "null") if completed else None,
                },
            )
            children = self._ended(db, wf, now)
            if cancels is not None:
                cancels += children
            if fin.depth and cancels is not None:
                # A step inside a branch failed the whole workflow (its result could not be
                # stored, or stepd broke): what still runs in other branches stops.
                rows = db.execute(self.Q["cancel_steps"], {"workflow_id": wf, "now": now})
                cancels += [r[0] for r in rows.fetchall()]
                db.execute(self.Q["cancel_workflow_branches"], {"workflow_id": wf})
            self._event(
                db,
                wf,
                None,
                fin.workflow_status.value,
                now,
                {"error": fin.workflow_error} if fin.workflow_error else None,
            )
            return next_id, started  # end_workflow marked it changed
        if not touched:
            db.execute(self.Q["touch_workflow"], {"id": wf, "now": now})
        return next_id, started

    async def decide(
        self,
        fin: Finish,
        *,
        awaiting: str,
        decision: str,
        decided_by: str | None,
        reason: str | None = None,
        replay: Replay | None = None,
        link_nonce: str | None = None,
        now: int | None = None,
    ) -> tuple[int, Step | None] | None:
        """Settle a step waiting for a person (`awaiting` "ready" or "decision") and move on.

        One transaction. Returns the next step's id (0 if none) and, with
        `fin.start_next_lease_ms`, the next step written as running; or None if it no
        longer waits (already decided, cancelled, expired). With `replay`, the answer
        is remembered under its Idempotency-Key in the same transaction; with
        `link_nonce`, the one-click link is spent in it (LinkSpent if it was before).
        Raises Replayed, and writes nothing, when `replay`'s key was saved before.
        """
        now = now_ms() if now is None else now

        def op(db: Tx) -> tuple[int, Step | None] | None:
            cancels.clear()
            if replay is not None:
                # Checked here, in the transaction that saves the key: of two requests
                # with one key, the second sees the first's answer (Replayed).
                self._one_at_a_time(db, f"decision {replay.created_by}\n{replay.key}")
                row = db.execute(self.Q["find_decision_key"], replay.params()).fetchone()
                if row is not None:
                    raise Replayed(_replay(replay.created_by, replay.key, row))
            self._lock_branches_of(db, fin)
            if link_nonce is not None:
                params = {"nonce": link_nonce, "step_id": fin.step_id, "now": now}
                if db.execute(self.Q["use_link"], params).rowcount != 1:
                    raise LinkSpent(f"link {link_nonce} was used before")
            cur = db.execute(
                self.Q["decide"],
                {"id": fin.step_id, "attempt": fin.attempt, "awaiting": awaiting,
                 "status": fin.status.value, "result_json": fin.result_json,
                 "error": fin.error, "error_type": fin.error_type, "decided_by": decided_by,
                 "reason": reason, "now": now},
            )  # fmt: skip
            if cur.rowcount == 0:
                return None
            touched = self._grow(db, fin, now)
            kind = "gate_decided" if awaiting == "ready" else "step_decided"
            data = {"decision": decision, "by": decided_by}
            if reason is not None:
                data["reason"] = reason
            self._event(db, fin.workflow_id, fin.step_id, kind, now, data)
            if replay is not None:
                db.execute(self.Q["save_decision_key"], {**replay.params(), "now": now})
            return self._follow(db, fin, now, touched=touched, cancels=cancels)

        cancels: list[int] = []
        decided = await self.write("decide", op)
        self._cancelled(cancels)
        return decided

    async def decision_replay(self, created_by: str | None, key: str) -> Replay | None:
        """The remembered answer to a decision sent with this Idempotency-Key, if any."""
        row = await self._one(self.Q["find_decision_key"], {"created_by": created_by, "key": key})
        return None if row is None else _replay(created_by, key, row)

    async def approvals(
        self, *, limit: int = 100, after: int = 0, max_json: int = 16384
    ) -> list[Row]:
        """Steps waiting for a person after step `after`, oldest first, with their
        workflow's context (input and previous result only up to `max_json` bytes)."""
        params = {"limit": limit, "after": after, "max_json": max_json}
        return await self.read_slow(self.Q["approvals"], params)  # reads flows: in a thread

    async def waiting_count(self) -> int:
        """How many steps wait for a person now."""
        (row,) = await self.read_slow(self.Q["waiting_count"], {})
        return int(row["n"])

    async def waiting_among(self, workflow_ids: Iterable[int]) -> set[int]:
        """Those of `workflow_ids` with a step waiting for a person."""
        ids = orjson.dumps(list(workflow_ids)).decode()
        return {r[0] for r in await self.read_slow(self.Q["waiting_among"], {"ids": ids})}

    async def retry_decided(
        self, step: Step, *, decided_by: str | None, now: int | None = None
    ) -> bool:
        """Queue an interrupted step again because a person said so."""
        params = {"decided_by": decided_by}
        data = {"decision": "retry", "by": decided_by}
        return await self._step_change("retry_decided", step, params, "step_decided", data, now)

    async def requeue(self, step: Step, reason: str, *, now: int | None = None) -> bool:
        """Put a running attempt back in the queue (interrupted); the next claim is attempt + 1."""
        data = {"attempt": step.attempt, "reason": reason}
        return await self._step_change("requeue_step", step, {}, "step_requeued", data, now)

    async def unstart(
        self, step: Step, reason: str, *, run_at: int | None = None, now: int | None = None
    ) -> bool:
        """Queue a running step again with its attempt not counted: it never started, or a
        planned stop cut it off. It is due at `run_at` (default: now)."""
        data = {"attempt": step.attempt, "reason": reason, "attempt_given_back": True}
        params = {"run_at": run_at if run_at is not None else (now_ms() if now is None else now)}
        return await self._step_change("unstart_step", step, params, "step_requeued", data, now)

    async def await_decision(
        self, step: Step, reason: str, *, stopped: bool = False, now: int | None = None
    ) -> bool:
        """An interrupted non-idempotent step waits for a person to retry or fail it.
        `stopped`: a planned stop cut it off, so a retry gives its attempt back (error_type
        'Stopped', where a crash or a lost lease says 'Interrupted')."""
        data = {"attempt": step.attempt, "reason": reason}
        params = {"error": reason, "error_type": "Stopped" if stopped else "Interrupted"}
        return await self._step_change(
            "await_decision", step, params, "decision_waiting", data, now
        )

    async def _step_change(
        self,
        query: str,
        step: Step,
        params: dict[str, Any],
        kind: str,
        data: dict[str, Any],
        now: int | None,
    ) -> bool:
        """A compare-and-set on one attempt of a step, with its event, in one transaction."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> bool:
            if query in ("requeue_step", "unstart_step", "retry_decided"):
                self._hold_point(db, step.workflow_id, now)  # queued again: held if paused
            cur = db.execute(
                self.Q[query], {"id": step.id, "attempt": step.attempt, "now": now, **params}
            )
            if cur.rowcount:
                self._event(db, step.workflow_id, step.id, kind, now, data)
            return bool(cur.rowcount)

        return await self.write(query, op)

    async def interrupted(self, *, limit: int, now: int | None = None) -> list[Step]:
        """Running tool steps whose lease ended before `now`."""
        now = now_ms() if now is None else now
        rows = await self._all(self.Q["interrupted_steps"], {"now": now, "limit": limit})
        return [Step.from_row(r) for r in rows]

    async def recoverable(self, *, limit: int) -> list[Step]:
        """At start-up: tool steps left running by an earlier process of this node, and
        those of any node whose lease ended (never another live daemon's)."""
        params = {"node": self.node, "now": now_ms(), "limit": limit}
        return [Step.from_row(r) for r in await self._all(self.Q["recoverable_steps"], params)]

    async def renew_leases(self, steps: Iterable[Step], lease_until: int) -> None:
        """Extend the leases of steps this process runs (one transaction)."""
        params = [{"id": s.id, "attempt": s.attempt, "lease_until": lease_until} for s in steps]
        if params:
            await self.write(
                "renew_leases", lambda db: db.executemany(self.Q["renew_lease"], params)
            )

    async def purge_finished(self, *, cutoff: int, limit: int, max_steps: int = 5000) -> int:
        """Delete up to `limit` workflows finished before `cutoff` (epoch ms), with their
        rows, but no more than about `max_steps` steps (always one workflow at least): the
        transaction holds up every other write, so its size is bounded by rows, not by
        workflows that may have a thousand steps each. Returns how many were deleted."""
        params = {"cutoff": cutoff, "limit": limit}

        def op(db: Tx) -> int:
            deleted = steps = 0
            for row in db.execute(self.Q["purge_candidates"], params).fetchall():
                steps += row["steps"]
                if deleted and steps > max_steps:
                    break
                db.execute(self.Q["purge_workflow"], {"id": row["id"]})
                deleted += 1
            return deleted

        return await self.write("purge_finished", op, blocking=True)

    async def has_due(self, *, now: int | None = None) -> bool:
        """Whether a pending step is due (a cheap read before a claim transaction)."""
        now = now_ms() if now is None else now
        return await self._one(self.Q["has_due"], {"now": now}) is not None

    async def next_due(self, *, now: int | None = None) -> int | None:
        """When the next gate expires or the next pending step a claim may take is due
        (epoch ms), if any. Steps of a token at max_running_per_token are left out: they
        wait for one of its running steps to finish, which wakes the executor anyway."""
        row = await self._one(self.Q["next_due"], {})
        due = row[0] if row and row[0] < NEVER else None
        now = now_ms() if now is None else now
        if due is None or due > now or self.max_running_per_token is None:
            return due  # nothing, or nothing due yet (a token's share aside: one more tick)
        return await self._next_due_by_token()

    async def _next_due_by_token(self) -> int | None:
        """next_due, token by token: steps due now may be held back by their token's share."""
        times = [(await self._one(self.Q["next_gate_expiry"], {}))[0]]
        running = {r[0]: r[1] for r in await self._all(self.Q["running_by_token"], {})}
        for (token,) in await self._all(self.Q["pending_tokens"], {}):
            if self._room(running, token, 1) > 0:
                row = await self._one(self.Q["next_run_of_token"], {"created_by": token})
                times.append(row[0])
        due = [t for t in times if t is not None]
        return min(due) if due else None

    async def expired_gates(self, limit: int, *, now: int | None = None) -> list[Step]:
        now = now_ms() if now is None else now
        rows = await self._all(self.Q["expired_gates"], {"now": now, "limit": limit})
        return [Step.from_row(r) for r in rows]

    async def scope_steps(
        self, workflow_id: int, before: int, states: Iterable[str] | None = None
    ) -> list[Step]:
        """The latest visit of each state (of `states`, or every one) before step `before`,
        oldest first; read in a thread, their results may add up to megabytes."""
        names = None if states is None else orjson.dumps(sorted(states)).decode()
        params = {"workflow_id": workflow_id, "before": before, "states": names}
        return [Step.from_row(r) for r in await self.read_slow(self.Q["scope_steps"], params)]

    async def previous_step(self, workflow_id: int, before: int) -> Step | None:
        """The step before step `before` in its workflow, if any."""
        row = await self._one(
            self.Q["previous_step"], {"workflow_id": workflow_id, "before": before}
        )
        return Step.from_row(row) if row else None

    async def gauges(self, now: int) -> Gauges:
        """Counts for /metrics, read in a thread: the step counts read partial indexes of
        unfinished steps, but counting workflows reads every workflow's index entry."""
        (pending,) = await self.read_slow(self.Q["gauge_pending"], {"now": now})
        (running,) = await self.read_slow(self.Q["gauge_running"], {})
        waiting = {r["awaiting"]: r["n"] for r in await self.read_slow(self.Q["gauge_waiting"], {})}
        workflows = {
            r["status"]: r["n"] for r in await self.read_slow(self.Q["gauge_workflows"], {})
        }
        return Gauges(
            runnable=pending["due"], delayed=pending["total"] - pending["due"],
            running=running["n"], gates_waiting=waiting.get("ready", 0),
            decisions_waiting=waiting.get("decision", 0), workflows=workflows,
        )  # fmt: skip

    # -- the event log and notifications ---------------------------------------------

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until a write is committed, by this process or (as far as the backend can
        tell) another on the same database (True), or `timeout` passes (False)."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires, which hung shutdown.
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def max_event_id(self) -> int:
        """The newest event's id (0 while the log is empty)."""
        row = await self._one(self.Q["max_event_id"], {})
        return int(row[0]) if row and row[0] is not None else 0

    async def events_after(
        self, after: int, *, workflow_id: int | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Events with ids above `after`, oldest first (of one workflow, or all)."""
        if workflow_id is None:
            rows = await self._all(self.Q["events_after"], {"after": after, "limit": limit})
        else:
            rows = await self._all(
                self.Q["workflow_events_after"],
                {"workflow_id": workflow_id, "after": after, "limit": limit},
            )
        return [_event_dict(r) for r in rows]

    async def events_of_types(
        self,
        after: int,
        types: Iterable[str],
        *,
        limit: int = 500,
        with_url_only: bool = False,
        span: int = 20_000,
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """Events of the given types with ids above `after`, oldest first; the event id up
        to which the log was read (events of other types included); and whether that is
        the newest event. One call reads at most `span` ids of the log (a few ms on the
        loop), so catching up after a long time goes in steps."""
        top_row = await self._one(self.Q["max_event_id"], {})
        top = int(top_row[0]) if top_row and top_row[0] is not None else after
        up_to = min(top, after + span)
        params = {"after": after, "up_to": up_to, "limit": limit, "with_url_only": with_url_only,
                  "types": orjson.dumps(sorted(types)).decode()}  # fmt: skip
        rows = await self._all(self.Q["events_of_types_after"], params)
        events = [_event_dict(r) for r in rows]
        if len(events) == limit:
            up_to = events[-1]["id"]
        up_to = max(up_to, after)
        return events, up_to, up_to >= top

    async def cursor(self, name: str) -> int:
        row = await self._one(self.Q["get_cursor"], {"name": name})
        return int(row[0]) if row else 0

    async def enqueue_deliveries(
        self, name: str, up_to: int, rows: list[dict[str, Any]], *, now: int | None = None
    ) -> None:
        """Add webhook deliveries and move reader `name` to event `up_to`, atomically."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> None:
            db.executemany(self.Q["enqueue_delivery"], [{**r, "now": now} for r in rows])
            db.execute(self.Q["set_cursor"], {"name": name, "event_id": up_to})

        await self.write("enqueue_deliveries", op)

    async def due_deliveries(
        self,
        *,
        per_dest: int,
        per_operator: int,
        busy: Iterable[str] = (),
        limit: int = 50,
        now: int | None = None,
    ) -> list[Row]:
        """Due deliveries: at most `per_dest` of each destination not in `busy`
        (`per_operator` of the operator's), the operator's first, then oldest first. Read
        in a thread: it visits every destination with pending deliveries, and a token can
        make thousands of them (~25 ms per 20,000)."""
        now = now_ms() if now is None else now
        params = {"now": now, "per_dest": per_dest, "per_operator": per_operator,
                  "busy": orjson.dumps(list(busy)).decode(), "limit": limit}  # fmt: skip
        return await self.read_slow(self.Q["due_deliveries"], params)

    async def claim_deliveries(self, ids: list[int], *, visibility_ms: int) -> list[int]:
        """Of the due deliveries `ids`, those this process may send now: with one daemon
        per database, every one (several daemons each claim theirs for `visibility_ms`)."""
        return list(ids)

    async def delivery_done(
        self, delivery_id: int, *, error: str | None = None, next_at: int = 0, dead: bool = False
    ) -> None:
        """Record a delivery attempt: sent (no error), or failed and retried at `next_at`."""

        def op(db: Tx) -> None:
            if error is None:
                db.execute(self.Q["delivery_sent"], {"id": delivery_id})
            else:
                db.execute(
                    self.Q["delivery_failed"],
                    {"id": delivery_id, "error": error, "next_at": next_at, "dead": dead},
                )

        await self.write("delivery_done", op)

    async def link_used(self, nonce: str) -> bool:
        """Whether a one-click link was spent (Store.decide spends it)."""
        return await self._one(self.Q["link_used"], {"nonce": nonce}) is not None

    # -- web sessions -------------------------------------------------------------------

    async def add_web_session(
        self, id_hash: str, token_name: str, token_hash: str, expires_at: int,
        *, now: int | None = None,
    ) -> None:  # fmt: skip
        """Record a sign-in; sessions that expired are forgotten in the same transaction."""
        now = now_ms() if now is None else now
        params = {"id_hash": id_hash, "token_name": token_name, "token_hash": token_hash,
                  "expires_at": expires_at, "now": now}  # fmt: skip

        def op(db: Tx) -> None:
            db.execute(self.Q["purge_web_sessions"], {"now": now})
            db.execute(self.Q["insert_web_session"], params)

        await self.write("add_web_session", op)

    async def web_session(self, id_hash: str, *, now: int | None = None) -> Row | None:
        """A session that has not ended or expired (one read of the primary key)."""
        now = now_ms() if now is None else now
        return await self._one(self.Q["get_web_session"], {"id_hash": id_hash, "now": now})

    async def end_web_session(self, id_hash: str) -> None:
        await self.write(
            "end_web_session",
            lambda db: db.execute(self.Q["delete_web_session"], {"id_hash": id_hash}),
        )

    # -- parallel and map branches, waits and signals ----------------------------------

    def _settle_branch(self, db: Tx, fin: Finish, now: int, cancels: list[int]) -> None:
        """A branch or map item ended (its last step just finished): start the next item,
        join the parallel or map step when none is left, or fail it at once (fail fast,
        or more failed items than tolerated), cancelling what still runs inside it."""
        be = fin.branch_end
        assert be is not None
        # Branches ending at once see each other's outcome: the last one joins.
        self._one_at_a_time(db, f"branches {be.parent_id}")
        error = None if be.ok else (fin.workflow_error or fin.error)
        params = {"parent_id": be.parent_id, "key": be.key,
                  "status": "done" if be.ok else "failed",
                  "result_json": (fin.result_json or "null") if be.ok else None,
                  "error": error,
                  "error_type": None if be.ok else (fin.error_type or "Failed")}  # fmt: skip
        if db.execute(self.Q["settle_branch"], params).rowcount == 0:
            return  # cancelled meanwhile (a sibling failed, or the workflow was cancelled)
        wf = fin.workflow_id
        kind = "branch_done" if be.ok else "branch_failed"
        data: dict[str, Any] = {"parent_id": be.parent_id, "branch": be.key}
        if error is not None:
            data["error"] = error
        self._event(db, wf, fin.step_id, kind, now, data)
        counts = db.execute(self.Q["branch_counts"], params).fetchone()
        failing = not be.ok and (
            (be.kind == "parallel" and be.join == "fail_fast")
            or (be.kind == "map" and counts["failed"] > be.tolerated)
        )
        if failing:
            what = f"branch '{be.key}'" if be.kind == "parallel" else f"item {be.key}"
            cancels += self._cancel_inside(db, be.parent_id, now, "sibling failed")
            self._wake(db, wf, be.parent_id, "branches", now, error=f"{what} failed: {error}",
                       error_type="BranchFailed")  # fmt: skip
            return
        if counts["pending"] and be.first is not None:
            # The next item's path starts after its map step, not after this item's end:
            # the step limit counts one item's path, however many items ran before it.
            (seq,) = db.execute(self.Q["step_seq"], {"id": be.parent_id}).fetchone()
            first = replace(be.first, seq=seq + 1)
            self._start_branches(db, wf, be.parent_id, {"*": first}, 1, now)
            return
        if counts["pending"] or counts["running"]:
            return
        rows = db.execute(self.Q["branch_results"], params).fetchall()
        self._wake(db, wf, be.parent_id, "branches", now,
                   result_json=_joined(rows, be.kind, be.join))  # fmt: skip

    def _lock_branches_of(self, db: Tx, fin: Finish) -> None:
        """A step inside a branch or map item that moves on (its next step, or its branch's
        end) first takes the lock its parallel or map step's branches settle under, before
        it writes anything: a sibling's failure that cancels what runs inside then either
        comes first (this step is cancelled, and nothing is written) or sees the next step
        this one inserts (on PostgreSQL, an insert not yet committed is invisible to it)."""
        parent = fin.next_step.parent_id if fin.next_step is not None else None
        if parent is None and fin.branch_end is not None:
            parent = fin.branch_end.parent_id
        if parent is None:
            return
        # Nested: the enclosing parallel and map steps' locks too, outermost first (as a
        # failure that cancels from further out takes them), so no cancellation from any
        # level misses what this step writes.
        outer = [parent]
        if fin.depth > 1:
            rows = db.execute(self.Q["ancestors"], {"parent_id": parent}).fetchall()
            outer = [r[0] for r in rows]
        for step_id in outer:
            self._one_at_a_time(db, f"branches {step_id}")

    def _cancel_inside(self, db: Tx, parent_id: int, now: int, reason: str) -> list[int]:
        """Cancel every open step and branch inside a parallel or map step."""
        params = {"parent_id": parent_id, "now": now, "reason": reason}
        ids = [r[0] for r in db.execute(self.Q["cancel_descendants"], params).fetchall()]
        db.execute(self.Q["cancel_open_branches"], {"parent_id": parent_id})
        return ids + self._cancel_calls(db, parent_id, ids, now)  # children of call steps

    def _start_branches(
        self,
        db: Tx,
        workflow_id: int,
        parent_id: int,
        firsts: dict[str, NewStep],
        limit: int,
        now: int,
    ) -> int:
        """Start up to `limit` waiting branches of a parallel or map step, in order; each
        begins at its own first step, or a map item at firsts["*"] (see Branches.firsts)."""
        params = {"parent_id": parent_id, "limit": limit}
        started = 0
        for idx, key in db.execute(self.Q["next_branches"], params).fetchall():
            db.execute(self.Q["start_branch"], {"parent_id": parent_id, "idx": idx})
            first = firsts.get(key) or in_branch(firsts["*"], parent_id, key)
            self._insert_step(db, workflow_id, first, now)
            started += 1
        return started

    def _wake(
        self,
        db: Tx,
        workflow_id: int,
        step_id: int,
        awaiting: str,
        now: int,
        *,
        attempt: int | None = None,
        result_json: str | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> bool:
        """A waiting parallel, map or wait step has its outcome: queue it for the executor."""
        cur = db.execute(
            self.Q["wake_step"],
            {"id": step_id, "workflow_id": workflow_id, "awaiting": awaiting, "now": now,
             "attempt": attempt, "result_json": result_json, "error": error,
             "error_type": error_type},
        )  # fmt: skip
        if cur.rowcount:
            kind = "branches_joined" if awaiting == "branches" else "wait_ended"
            self._event(db, workflow_id, step_id, kind, now, {"error": error} if error else None)
        return bool(cur.rowcount)

    async def start_branches(
        self, step: Step, branches: Branches, *, expires_at: int | None = None,
        now: int | None = None,
    ) -> bool:  # fmt: skip
        """A parallel or map step starts its branches (or items): it gives up its run slot
        and waits (awaiting 'branches', until `expires_at` if its state has a timeout)."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> bool:
            params = {"id": step.id, "attempt": step.attempt, "awaiting": "branches",
                      "signal": None, "expires_at": expires_at}  # fmt: skip
            if db.execute(self.Q["start_waiting"], params).rowcount == 0:
                return False
            self._hold_point(db, step.workflow_id, now)
            db.execute(self.Q["delete_branches"], {"parent_id": step.id})  # an earlier attempt's
            # Each branch row counts against what the workflow stores: its item and a row's
            # worth of overhead (a map of maps multiplies rows).
            size = sum(len(k) + len((item or "").encode()) + ROW_BYTES for k, item in branches.keys)
            self._store_bytes(db, step.workflow_id, size, branches.max_bytes, now)
            db.executemany(
                self.Q["insert_branch"],
                [{"parent_id": step.id, "idx": i, "workflow_id": step.workflow_id, "key": key,
                  "item_json": item} for i, (key, item) in enumerate(branches.keys)],
            )  # fmt: skip
            self._event(db, step.workflow_id, step.id, "branches_started", now,
                        {"count": len(branches.keys)})  # fmt: skip
            self._start_branches(db, step.workflow_id, step.id, branches.firsts,
                                 branches.limit, now)  # fmt: skip
            return True

        return await self.write("start_branches", op)

    async def begin_wait(
        self, step: Step, *, awaiting: str, signal: str | None, expires_at: int | None,
        now: int | None = None,
    ) -> str | None:  # fmt: skip
        """A wait state starts waiting ("timer" or "signal"), giving up its run slot; or,
        for a signal that arrived before, consumes it (oldest first) and returns its data
        (JSON text) without waiting. None also when the attempt no longer owns the step."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> str | None:
            wf = step.workflow_id
            if signal is not None:
                self._one_at_a_time(db, f"signal {wf}")
                if step.attempt > 1:  # an attempt that took a signal, then died, keeps it
                    params = {"workflow_id": wf, "step_id": step.id}
                    taken = db.execute(self.Q["signal_of_step"], params).fetchone()
                    if taken is not None:
                        return taken[1] or "null"
                row = db.execute(self.Q["oldest_signal"], {"workflow_id": wf, "name": signal})
                found = row.fetchone()
                if found is not None:
                    db.execute(self.Q["consume_signal"],
                               {"id": found[0], "step_id": step.id, "now": now})  # fmt: skip
                    self._event(db, wf, step.id, "signal_consumed", now, {"name": signal})
                    return found[1] or "null"
            params = {"id": step.id, "attempt": step.attempt, "awaiting": awaiting,
                      "signal": signal, "expires_at": expires_at}  # fmt: skip
            if db.execute(self.Q["start_waiting"], params).rowcount:
                data: dict[str, Any] = {"until": expires_at}
                if signal is not None:
                    data["signal"] = signal
                self._event(db, wf, step.id, "wait_started", now, data)
            return None

        return await self.write("begin_wait", op)

    async def wake(
        self, step: Step, *, result_json: str | None = None, error: str | None = None,
        error_type: str | None = None, now: int | None = None,
    ) -> bool:  # fmt: skip
        """A waiting step's deadline passed: a timer fired (result), a signal wait or a
        parallel or map step timed out (error; what runs inside it is cancelled)."""
        now = now_ms() if now is None else now
        cancels: list[int] = []

        def op(db: Tx) -> bool:
            cancels.clear()
            assert step.awaiting is not None
            self._hold_point(db, step.workflow_id, now)
            if step.awaiting == "branches":  # what runs inside is cancelled: see _settle_branch
                self._one_at_a_time(db, f"branches {step.id}")
            woke = self._wake(db, step.workflow_id, step.id, step.awaiting, now,
                              attempt=step.attempt, result_json=result_json, error=error,
                              error_type=error_type)  # fmt: skip
            if woke and step.awaiting == "branches":
                cancels.extend(self._cancel_inside(db, step.id, now, "timed out"))
            return woke

        woke = await self.write("wake", op)
        self._cancelled(cancels)
        return woke

    async def send_signal(
        self, workflow_id: int, name: str, data_json: str, *, by: str | None,
        max_workflow_bytes: int | None = None, now: int | None = None,
    ) -> str:  # fmt: skip
        """Deliver a signal: to the oldest step waiting for it, or kept for a later wait.
        Returns "ok", "not_found", or the status of a workflow that has ended. Its data
        counts against what the workflow stores (WorkflowTooLarge past the limit)."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> str:
            self._one_at_a_time(db, f"signal {workflow_id}")
            row = db.execute(self.Q["get_workflow"], {"id": workflow_id}).fetchone()
            if row is None:
                return "not_found"
            if row["status"] != "running":
                return str(row["status"])
            self._hold_point(db, workflow_id, now)
            size = len(data_json.encode()) + len(name.encode()) + ROW_BYTES
            self._store_bytes(db, workflow_id, size, max_workflow_bytes, now)
            params = {"workflow_id": workflow_id, "name": name, "data_json": data_json,
                      "sent_by": by, "now": now}  # fmt: skip
            (signal_id,) = db.execute(self.Q["insert_signal"], params).fetchone()
            self._event(db, workflow_id, None, "signal_received", now, {"name": name, "by": by})
            waiter = db.execute(self.Q["signal_waiter"], params).fetchone()
            if waiter is not None:
                db.execute(self.Q["consume_signal"],
                           {"id": signal_id, "step_id": waiter["id"], "now": now})  # fmt: skip
                self._event(db, workflow_id, waiter["id"], "signal_consumed", now, {"name": name})
                self._wake(db, workflow_id, waiter["id"], "signal", now, result_json=data_json)
            return "ok"

        return await self.write("send_signal", op)

    async def branch(self, parent_id: int, key: str) -> Row | None:
        """One branch of a parallel or map step (a map item's value is in item_json)."""
        return await self._one(self.Q["get_branch"], {"parent_id": parent_id, "key": key})

    async def scope_steps_in(
        self, parent_id: int, branch: str, before: int, states: Iterable[str] | None = None
    ) -> list[Step]:
        """scope_steps inside one branch or map item."""
        names = None if states is None else orjson.dumps(sorted(states)).decode()
        params = {"parent_id": parent_id, "branch": branch, "before": before, "states": names}
        return [Step.from_row(r) for r in await self.read_slow(self.Q["scope_steps_in"], params)]

    async def previous_step_in(self, parent_id: int, branch: str, before: int) -> Step | None:
        """The step before step `before` in its branch or map item, if any."""
        params = {"parent_id": parent_id, "branch": branch, "before": before}
        row = await self._one(self.Q["previous_step_in"], params)
        return Step.from_row(row) if row else None

    async def input_rev(self, workflow_id: int) -> int:
        """How many times the workflow's input was changed (intervene)."""
        row = await self._one(self.Q["input_rev"], {"id": workflow_id})
        return 0 if row is None else int(row[0])

    # -- run control -------------------------------------------------------------------

    async def pause(self, workflow_id: int, *, by: str | None, reason: str | None) -> str:
        """Pause a running workflow: its queued steps wait; running tools finish. Returns
        "ok", "not_found", or the workflow's status (also "paused") when it cannot."""
        return await self._control("pause", workflow_id, by, reason)

    async def unpause(self, workflow_id: int, *, by: str | None, reason: str | None) -> str:
        """Resume a paused workflow: its held steps are due when they were."""
        return await self._control("unpause", workflow_id, by, reason)

    async def _control(
        self, what: str, workflow_id: int, by: str | None, reason: str | None
    ) -> str:
        now = now_ms()

        def op(db: Tx) -> str:
            row = db.execute(self.Q["get_workflow"], {"id": workflow_id}).fetchone()
            if row is None:
                return "not_found"
            params = {"id": workflow_id, "workflow_id": workflow_id, "now": now}
            if what == "pause":
                if db.execute(self.Q["pause_workflow"], params).rowcount == 0:
                    return _status(row)
                db.execute(self.Q["hold_steps"], params)
                kind = "paused"
            else:
                if db.execute(self.Q["unpause_workflow"], params).rowcount == 0:
                    return _status(row)
                db.execute(self.Q["release_steps"], params)
                kind = "resumed"
            self._pause_tree(db, workflow_id, what == "unpause", now)  # children of calls
            self._event(db, workflow_id, None, kind, now, _who(by, reason))
            return "ok"

        return await self.write(what, op)

    async def redrive(
        self,
        workflow_id: int,
        plan: Callable[[Step | None], Redrive],
        *,
        by: str | None,
        reason: str | None,
        from_step: str | None,
    ) -> str:
        """Carry on a failed or cancelled workflow. `plan` says, given its latest top-level
        step, what runs again: a new visit of a state, or the failed branches of a parallel
        or map step. Returns "ok", "not_found", or the status that forbids it."""
        now = now_ms()

        def op(db: Tx) -> str:
            row = db.execute(self.Q["get_workflow"], {"id": workflow_id}).fetchone()
            if row is None:
                return "not_found"
            params = {"id": workflow_id, "workflow_id": workflow_id, "now": now}
            if row["status"] in ("failed", "cancelled") and not self._has_slot(db, row):
                return "no_slot"
            if db.execute(self.Q["reopen_workflow"], params).rowcount == 0:
                return _status(row)
            last = db.execute(self.Q["last_top_step"], params).fetchone()
            (seq,) = db.execute(self.Q["max_seq"], params).fetchone()
            todo = plan(None if last is None else Step.from_row(last))
            failed = []
            if todo.parent is not None:
                params = {"parent_id": todo.parent.id}
                failed = db.execute(self.Q["failed_branches"], params).fetchall()
            if failed:  # only the failed and cancelled branches or items run again
                assert todo.parent is not None and todo.firsts is not None
                parent = todo.parent
                db.execute(self.Q["reopen_parent"],
                           {"id": parent.id, "expires_at": todo.expires_at})  # fmt: skip
                for idx, _ in failed:
                    db.execute(self.Q["reopen_branch"], {"parent_id": parent.id, "idx": idx})
                self._start_branches(db, workflow_id, parent.id, todo.firsts, todo.limit, now)
            else:  # a new visit (also of a parallel or map that failed before its branches)
                assert todo.step is not None
                self._insert_step(db, workflow_id, replace(todo.step, seq=(seq or 0) + 1), now)
            data = _who(by, reason) | {"from_step": todo.state}
            self._event(db, workflow_id, None, "redriven", now, data)
            return "ok"

        return await self.write("redrive", op)

    async def intervene(
        self,
        workflow_id: int,
        change: Callable[[str], str],
        *,
        by: str | None,
        reason: str,
        max_workflow_bytes: int | None = None,
    ) -> tuple[str, str | None]:
        """Replace a paused (or gate-waiting) workflow's input by `change(old input JSON)`;
        the event keeps both. Returns ("ok", new input JSON), or ("not_found" or the
        status that forbids it, None)."""
        now = now_ms()

        def op(db: Tx) -> tuple[str, str | None]:
            row = db.execute(self.Q["get_workflow"], {"id": workflow_id}).fetchone()
            if row is None:
                return "not_found", None
            wf = Workflow.from_row(row)
            ids = orjson.dumps([workflow_id]).decode()
            waiting = db.execute(self.Q["waiting_among"], {"ids": ids}).fetchone()
            if wf.status != "running" or (wf.paused_at is None and waiting is None):
                return wf.public_status, None
            old = wf.input_json or "{}"
            new = change(old)
            delta = len(new.encode()) - len(old.encode())
            params = {"id": workflow_id, "input_json": new, "rev": wf.input_rev, "now": now,
                      "delta": delta}  # fmt: skip
            if db.execute(self.Q["set_input"], params).rowcount == 0:
                return wf.public_status, None
            total = row["stored_bytes"] + delta
            if max_workflow_bytes is not None and delta > 0 and total > max_workflow_bytes:
                raise WorkflowTooLarge(total - delta, delta, max_workflow_bytes)
            data = _who(by, reason) | {
                "before": orjson.Fragment(old),
                "after": orjson.Fragment(new),
            }
            self._event(db, workflow_id, None, "intervened", now, data)
            return "ok", new

        return await self.write("intervene", op)

    async def ping(self) -> bool:
        """A cheap read, for health checks."""
        return (await self._one("SELECT 1", {})) is not None


@dataclass(frozen=True)
class Redrive:
    """What a redrive runs again: a new visit of a state (`step`), or the failed and
    cancelled branches of a parallel or map step (`parent`, each starting at `first`, at
    most `limit` at once)."""

    state: str
    step: NewStep | None = None  # with parent: the visit when it has no branch to reopen
    parent: Step | None = None
    firsts: dict[str, NewStep] | None = None  # see Branches.firsts
    limit: int = 1 << 30
    expires_at: int | None = None  # the parent's new deadline (its state's timeout)


def in_branch(first: NewStep, parent_id: int, key: str) -> NewStep:
    """`first` (a map's start state, with the map's scope path in `scope`) for item `key`."""
    prefix = orjson.loads(first.scope or "[]")
    assert prefix and prefix[-1] == "*", first.scope
    scope = orjson.dumps([*prefix[:-1], int(key)]).decode()
    return replace(first, parent_id=parent_id, branch=key, scope=scope)


def _joined(rows: list[Any], kind: str, join: str) -> str:
    """A parallel step's result (an object by branch) or a map step's (a list in item
    order), built from the branches' stored JSON without parsing it."""

    def error(r: Any) -> str:
        return orjson.dumps({"message": r["error"], "type": r["error_type"]}).decode()

    if kind == "map":
        return (
            "["
            + ",".join(
                (r["result_json"] or "null") if r["status"] == "done" else f'{{"error":{error(r)}}}'
                for r in rows
            )
            + "]"
        )
    parts = []
    for r in rows:
        key = orjson.dumps(r["key"]).decode()
        if join == "all_settled":
            if r["status"] == "done":
                value = f'{{"status":"done","result":{r["result_json"] or "null"}}}'
            else:
                value = f'{{"status":"failed","error":{error(r)}}}'
        else:
            value = r["result_json"] or "null"
        parts.append(f"{key}:{value}")
    return "{" + ",".join(parts) + "}"


def _status(row: Any) -> str:
    """A workflow row's status as clients see it."""
    return Workflow.from_row(row).public_status


def _who(by: str | None, reason: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"by": by}
    if reason is not None:
        data["reason"] = reason
    return data
