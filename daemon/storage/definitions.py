"""Saved definitions, their versions and runs, inbound webhooks and child workflows: the
transaction bodies behind them, shared by every backend (a mixin of BaseStore)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.models import (
    Definition,
    DefinitionVersion,
    NewRun,
    NewStep,
    Step,
    Workflow,
)
from daemon.storage.types import Created, Row, now_ms

if TYPE_CHECKING:
    from daemon.storage.base import BaseStore, Tx

    _Base = BaseStore
else:
    _Base = object


# Child workflows one run may start through call states, at every depth together: depth is
# bounded (5), and this bounds breadth (a map of calls that call themselves multiplies).
MAX_DESCENDANTS = 1000
HOOK_KEY_MS = 24 * 3600 * 1000  # how long a webhook call's Idempotency-Key replays its run


class DefinitionStore(_Base):
    # -- definitions and versions ------------------------------------------------------

    async def create_definition(
        self,
        v: Any,
        *,
        status: str,
        trigger_type: str,
        created_by: str | None,
        now: int | None = None,
    ) -> Definition | None:
        """Insert a definition and its version 1 (`v`: a NewVersion); None if the name is
        taken."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> Definition | None:
            self._one_at_a_time(db, f"definition name {v.name}")
            if db.execute(self.Q["definition_by_name"], {"name": v.name}).fetchone():
                return None
            def_id = self._new_id(now)
            db.execute(
                self.Q["insert_definition"],
                {
                    "id": def_id,
                    "name": v.name,
                    "status": status,
                    "trigger_type": trigger_type,
                    "tags_json": v.tags_json,
                    "description": v.description,
                    "concurrency": v.concurrency,
                    "webhook_mode": v.webhook_mode,
                    "created_by": created_by,
                    "now": now,
                },
            )
            self._insert_version(db, def_id, 1, v, created_by, now)
            row = db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone()
            return Definition.from_row(row)

        return await self.write("create_definition", op)

    def _insert_version(
        self, db: Tx, def_id: int, version: int, v: Any, by: str | None, now: int
    ) -> None:
        db.execute(
            self.Q["insert_definition_version"],
            {
                "definition_id": def_id,
                "version": version,
                "body_json": v.body_json,
                "flow_json": v.flow_json,
                "content_hash": v.content_hash,
                "change_summary": v.change_summary,
                "created_by": by,
                "now": now,
            },
        )

    async def add_version(
        self,
        def_id: int,
        v: Any,
        *,
        created_by: str | None,
        now: int | None = None,
    ) -> tuple[str, Definition | None]:
        """A new version of a definition (NewVersion `v`), unless its content is the latest
        version's. Returns ("ok" | "unchanged", the definition), ("name_taken", None) or
        ("not_found", None)."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> tuple[str, Definition | None]:
            self._one_at_a_time(db, f"definition {def_id}")
            row = db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone()
            if row is None:
                return "not_found", None
            current = Definition.from_row(row)
            latest = db.execute(
                self.Q["definition_version"], {"definition_id": def_id, "version": current.version}
            ).fetchone()
            if latest is not None and latest["content_hash"] == v.content_hash:
                return "unchanged", current
            if v.name != current.name:
                self._one_at_a_time(db, f"definition name {v.name}")
                taken = db.execute(self.Q["definition_name_taken"], {"name": v.name, "id": def_id})
                if taken.fetchone() is not None:
                    return "name_taken", None
            version = current.version + 1
            self._insert_version(db, def_id, version, v, created_by, now)
            db.execute(
                self.Q["update_definition"],
                {
                    "id": def_id,
                    "version": version,
                    "name": v.name,
                    "tags_json": v.tags_json,
                    "description": v.description,
                    "concurrency": v.concurrency,
                    "webhook_mode": v.webhook_mode,
                    "now": now,
                },
            )
            self._promote(db, def_id, now)  # its concurrency may have grown
            row = db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone()
            return "ok", Definition.from_row(row)

        return await self.write("add_version", op)

    async def definition(self, ref: int | str) -> Definition | None:
        """A definition by id (an int) or name (a str)."""
        if isinstance(ref, int):
            row = await self._one(self.Q["definition_by_id"], {"id": ref})
        else:
            row = await self._one(self.Q["definition_by_name"], {"name": ref})
        return Definition.from_row(row) if row else None

    async def definition_by_webhook(self, webhook_id: str) -> Definition | None:
        row = await self._one(self.Q["definition_by_webhook"], {"webhook_id": webhook_id})
        return Definition.from_row(row) if row else None

    async def list_definitions(
        self,
        *,
        status: str | None,
        tag: str | None,
        trigger_type: str | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Definition], int]:
        params = {
            "status": status,
            "tag": tag,
            "trigger_type": trigger_type,
            "limit": limit,
            "offset": offset,
        }
        rows = await self.read_slow(self.Q["list_definitions"], params)
        (total,) = (await self.read_slow(self.Q["count_definitions"], params))[0]
        return [Definition.from_row(r) for r in rows], total

    async def versions(self, def_id: int, *, limit: int = 1 << 31, offset: int = 0) -> list[Row]:
        """Versions of a definition (without their bodies), newest first."""
        params = {"definition_id": def_id, "limit": limit, "offset": offset}
        return await self.read_slow(self.Q["definition_versions"], params)

    async def version(self, def_id: int, version: int) -> DefinitionVersion | None:
        params = {"definition_id": def_id, "version": version}
        row = await self._one(self.Q["definition_version"], params)
        return DefinitionVersion.from_row(row) if row else None

    async def set_definition_status(self, def_id: int, status: str) -> bool:
        now = now_ms()

        def op(db: Tx) -> bool:
            params = {"id": def_id, "status": status, "now": now}
            return bool(db.execute(self.Q["set_definition_status"], params).rowcount)

        return await self.write("set_definition_status", op)

    async def delete_definition(
        self, def_id: int, *, force: bool, by: str | None
    ) -> tuple[str, list[int]]:
        """Delete a definition with its versions. Refused ("busy") while runs of it have
        not ended, unless `force`: then they are cancelled (their records stay). Returns
        ("ok" | "busy" | "not_found", the ids of steps cancelled)."""
        now = now_ms()

        def op(db: Tx) -> tuple[str, list[int]]:
            self._one_at_a_time(db, f"definition {def_id}")
            if db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone() is None:
                return "not_found", []
            db.execute(self.Q["delete_definition"], {"id": def_id})  # no more promotions
            runs = [r[0] for r in db.execute(self.Q["open_runs"], {"definition_id": def_id})]
            if runs and not force:
                raise _Busy()
            cancelled: list[int] = []
            for run_id in runs:
                cancelled += self._cancel_tree(db, run_id, by, now) or []
            return "ok", cancelled

        try:
            outcome, cancelled = await self.write("delete_definition", op)
        except _Busy:
            return "busy", []
        self._cancelled(cancelled)
        return outcome, cancelled

    # -- runs ----------------------------------------------------------------------------

    async def create_run(
        self,
        run: NewRun,
        *,
        concurrency: int | None,
        start_lease_ms: int | None = None,
        now: int | None = None,
    ) -> Created:
        """Start a run of a definition, or queue it when `concurrency` runs of it hold a
        slot already (it starts, oldest first, when one ends). With `start_lease_ms` its
        first tool step may be written as running (Created.started)."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> Created:
            return self._new_run(db, run, concurrency, now, start_lease_ms)

        return await self.write("create_run", op)

    def _new_run(
        self,
        db: Tx,
        run: NewRun,
        concurrency: int | None,
        now: int,
        start_lease_ms: int | None = None,
    ) -> Created:
        queued = False
        if run.definition_id is not None and concurrency is not None:
            queued = self._free_slots(db, run.definition_id, concurrency) <= 0
        wf_id = self._insert_workflow(
            db,
            now,
            name=run.name,
            flow_json=run.flow_json,
            input_json=run.input_json,
            created_by=run.created_by,
            notify_url=run.notify_url,
            dag_json=run.dag_json,
            definition_id=run.definition_id,
            definition_version=run.definition_version,
            run_trigger=run.trigger,
            queued_json=run.first.to_json() if queued else None,
            parent_step_id=run.parent_step_id,
            parent_workflow_id=run.parent_workflow_id,
            call_depth=run.call_depth,
            root_id=run.root_id,
            schedule_id=run.schedule_id,
            fire_at=run.fire_at,
        )
        if queued:
            self._event(db, wf_id, None, "queued", now, {"concurrency": concurrency})
            return Created(wf_id, False)
        if (
            start_lease_ms is not None
            and run.first.tool is not None
            and self._may_start(db, wf_id, now)
        ):
            started = self._insert_started(db, wf_id, run.first, now, start_lease_ms)
            return Created(wf_id, False, started=started, first_step_id=started.id)
        return Created(wf_id, False, first_step_id=self._insert_step(db, wf_id, run.first, now))

    def _free_slots(self, db: Tx, def_id: int, concurrency: int | None = None) -> int | None:
        """How many more runs of a definition may hold a slot now, under `concurrency` (by
        default, the definition's own; None when it was deleted). Takes the definition's
        lock: its runs are counted and started one transaction at a time."""
        self._one_at_a_time(db, f"definition {def_id}")
        if concurrency is None:
            row = db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone()
            if row is None:
                return None
            concurrency = int(row["concurrency"])
        (active,) = db.execute(self.Q["active_runs"], {"definition_id": def_id}).fetchone()
        return concurrency - int(active)

    def _has_slot(self, db: Tx, workflow: Row) -> bool:
        """Whether a run that ended may run again now (a redrive) under its definition's
        concurrency: always for a one-off workflow or a deleted definition's run."""
        if workflow["definition_id"] is None:
            return True
        free = self._free_slots(db, workflow["definition_id"])
        return free is None or free > 0

    def _promote(self, db: Tx, def_id: int, now: int) -> None:
        """Start the oldest queued runs of a definition while it has free slots."""
        free = self._free_slots(db, def_id)
        if free is None or free <= 0:
            return
        params = {"definition_id": def_id, "limit": free}
        for run_id, first_json in db.execute(self.Q["oldest_queued"], params).fetchall():
            if db.execute(self.Q["dequeue_run"], {"id": run_id, "now": now}).rowcount:
                self._event(db, run_id, None, "dequeued", now)
                self._insert_step(db, run_id, NewStep.from_json(first_json), now)

    def _ended(self, db: Tx, workflow_id: int, now: int) -> list[int]:
        """A workflow just ended (completed, failed or cancelled): a queued run of its
        definition takes its slot; the call step that started it (if any) is woken with
        its outcome; its own children (of call states) still running are cancelled.
        Returns the ids of the children's steps cancelled."""
        row = db.execute(self.Q["ended_links"], {"id": workflow_id}).fetchone()
        if row is None:
            return []
        cancelled: list[int] = []
        if row["has_children"]:  # one statement less for every workflow without any
            for (child,) in db.execute(self.Q["children"], {"id": workflow_id}).fetchall():
                cancelled += self._cancel_tree(db, child, "parent workflow ended", now) or []
        if row["schedule_id"] is not None:  # the scheduler may start a buffered tick's run
            self.schedule_run_ended = True
        if row["definition_id"] is not None:
            self._promote(db, row["definition_id"], now)
        if row["parent_step_id"] is not None:
            status = row["status"]
            if status == "completed":
                self._wake(
                    db,
                    row["parent_workflow_id"],
                    row["parent_step_id"],
                    "child",
                    now,
                    result_json=row["output_json"] or "null",
                )
            else:
                error = f"child workflow {workflow_id} {status}"
                if row["error"]:
                    error += f": {row['error']}"
                self._wake(
                    db,
                    row["parent_workflow_id"],
                    row["parent_step_id"],
                    "child",
                    now,
                    error=error,
                    error_type="ChildFailed",
                )
        return cancelled

    def _cancel_tree(self, db: Tx, workflow_id: int, by: str | None, now: int) -> list[int] | None:
        """Cancel a running workflow (queued too) and its children: the cancelled step ids,
        or None when it was not running."""
        if db.execute(self.Q["cancel_workflow"], {"id": workflow_id, "now": now}).rowcount == 0:
            return None
        rows = db.execute(self.Q["cancel_steps"], {"workflow_id": workflow_id, "now": now})
        step_ids = [r[0] for r in rows.fetchall()]
        db.execute(self.Q["cancel_workflow_branches"], {"workflow_id": workflow_id})
        self._event(db, workflow_id, None, "cancelled", now, {"by": by})
        return step_ids + self._ended(db, workflow_id, now)

    async def definition_runs(
        self, def_id: int, *, status: str | None, limit: int, offset: int
    ) -> tuple[list[Workflow], int]:
        params = {"definition_id": def_id, "status": status, "limit": limit, "offset": offset}
        rows = await self.read_slow(self.Q["definition_runs"], params)
        (total,) = (await self.read_slow(self.Q["count_definition_runs"], params))[0]
        return [Workflow.from_row(r) for r in rows], total

    async def delete_run(self, run_id: int) -> bool:
        """Delete a run that ended, with its steps and events."""

        def op(db: Tx) -> bool:
            return bool(db.execute(self.Q["delete_run"], {"id": run_id}).rowcount)

        return await self.write("delete_run", op)

    # -- webhooks --------------------------------------------------------------------------

    async def deploy(self, def_id: int, webhook_id: str, secret: str) -> Definition | None:
        """Give a definition a webhook (a deployed one keeps its id and secret)."""
        return await self._change_definition(
            "deploy_definition", def_id, webhook_id=webhook_id, webhook_secret=secret
        )

    async def undeploy(self, def_id: int) -> Definition | None:
        return await self._change_definition("undeploy_definition", def_id)

    async def arm(self, def_id: int, until: int) -> Definition | None:
        """Open a single-use webhook's window until `until`; the definition, unchanged if
        it has no webhook or a persistent one."""
        return await self._change_definition("arm_definition", def_id, until=until)

    async def _change_definition(self, query: str, def_id: int, **params: Any) -> Definition | None:
        now = now_ms()

        def op(db: Tx) -> Definition | None:
            db.execute(self.Q[query], {"id": def_id, "now": now, **params})
            row = db.execute(self.Q["definition_by_id"], {"id": def_id}).fetchone()
            return Definition.from_row(row) if row else None

        return await self.write(query, op)

    async def fire_hook(
        self, definition: Definition, run: NewRun, *, key: str | None, now: int | None = None
    ) -> tuple[str, int | None]:
        """A webhook call starts a run: at most one per arming of a single-use webhook.
        Returns ("ok", run id), ("replay", the run of an earlier call with the same key),
        or ("not_found" | "gone" (not armed) | the definition's status, None)."""
        now = now_ms() if now is None else now
        webhook_id = definition.webhook_id
        assert webhook_id is not None

        def op(db: Tx) -> tuple[str, int | None]:
            if key is not None:
                self._one_at_a_time(db, f"hook {webhook_id}\n{key}")
                cutoff = now - HOOK_KEY_MS
                db.execute(self.Q["purge_hook_calls"], {"webhook_id": webhook_id, "cutoff": cutoff})
                found = db.execute(
                    self.Q["find_hook_call"], {"webhook_id": webhook_id, "key": key}
                ).fetchone()
                if found is not None:
                    return "replay", found[0]
            row = db.execute(self.Q["definition_by_webhook"], {"webhook_id": webhook_id})
            current = row.fetchone()
            if current is None or current["id"] != definition.id:
                return "not_found", None
            if current["status"] in ("paused", "archived"):
                return current["status"], None
            if current["webhook_mode"] == "single":
                params = {"id": definition.id, "webhook_id": webhook_id, "now": now}
                if db.execute(self.Q["fire_armed"], params).rowcount == 0:
                    return "gone", None
            created = self._new_run(db, run, current["concurrency"], now)
            if key is not None:
                db.execute(
                    self.Q["insert_hook_call"],
                    {"webhook_id": webhook_id, "key": key, "run_id": created.id, "now": now},
                )
            return "ok", created.id

        return await self.write("fire_hook", op)

    # -- child workflows (call states) ----------------------------------------------------

    async def start_child(
        self,
        step: Step,
        run: NewRun,
        *,
        concurrency: int | None,
        expires_at: int | None,
        now: int | None = None,
    ) -> int | None:
        """A call step starts its child workflow and waits for it (awaiting 'child'),
        giving up its run slot. The child's id; None when the attempt no longer owns the
        step (nothing was written)."""
        now = now_ms() if now is None else now

        def op(db: Tx) -> int | None:
            params = {
                "id": step.id,
                "attempt": step.attempt,
                "awaiting": "child",
                "signal": None,
                "expires_at": expires_at,
            }
            if db.execute(self.Q["start_waiting"], params).rowcount == 0:
                return None
            self._hold_point(db, step.workflow_id, now)
            if run.root_id is not None:
                self._one_at_a_time(db, f"calls of {run.root_id}")
                (started,) = db.execute(self.Q["descendants"], {"root_id": run.root_id}).fetchone()
                if started >= MAX_DESCENDANTS:
                    raise TooManyChildren(MAX_DESCENDANTS)
            created = self._new_run(db, run, concurrency, now)
            db.execute(self.Q["set_child"], {"id": step.id, "child_id": created.id})
            self._event(
                db, step.workflow_id, step.id, "child_started", now, {"child_id": created.id}
            )
            # A parent paused meanwhile: its new child starts paused.
            paused = db.execute(self.Q["workflow_paused"], {"workflow_id": step.workflow_id})
            if paused.fetchone()[0] is not None:
                self._pause_one(db, created.id, False, now)
            return created.id

        return await self.write("start_child", op)

    async def parent_of(self, workflow_id: int) -> tuple[int, int] | None:
        """(parent workflow id, call step id) of a child of a call state, else None."""
        row = await self._one(self.Q["ended_links"], {"id": workflow_id})
        if row is None or row["parent_step_id"] is None:
            return None
        return row["parent_workflow_id"], row["parent_step_id"]

    async def time_out_call(
        self, step: Step, *, error: str, error_type: str, now: int | None = None
    ) -> bool:
        """A call step's timeout passed: it is woken with `error` (its flow goes on to a
        retry, on_error or the workflow's failure) and its child workflow is cancelled,
        with the child's own children. False when it was no longer waiting."""
        now = now_ms() if now is None else now
        cancels: list[int] = []

        def op(db: Tx) -> bool:
            cancels.clear()
            self._hold_point(db, step.workflow_id, now)
            woke = self._wake(db, step.workflow_id, step.id, "child", now, attempt=step.attempt,
                              error=error, error_type=error_type)  # fmt: skip
            if woke and step.child_id is not None:
                by = f"the call step timed out (workflow {step.workflow_id})"
                cancels.extend(self._cancel_tree(db, step.child_id, by, now) or [])
            return woke

        woke = await self.write("time_out_call", op)
        self._cancelled(cancels)
        return woke

    def _cancel_calls(self, db: Tx, parent_id: int, step_ids: list[int], now: int) -> list[int]:
        """Steps inside parallel or map step `parent_id` were just cancelled (a sibling
        failed, or it timed out) while its workflow goes on: the children that call steps
        among them wait for are cancelled too, with their own. Their step ids."""
        if not step_ids:
            return []
        row = db.execute(self.Q["get_step"], {"id": parent_id}).fetchone()
        if row is None:
            return []
        cancelled_steps = set(step_ids)
        cancelled: list[int] = []
        for (child,) in db.execute(self.Q["children"], {"id": row["workflow_id"]}).fetchall():
            link = db.execute(self.Q["ended_links"], {"id": child}).fetchone()
            if link is not None and link["parent_step_id"] in cancelled_steps:
                by = "its call step was cancelled"
                cancelled += self._cancel_tree(db, child, by, now) or []
        return cancelled

    def _pause_tree(self, db: Tx, workflow_id: int, unpause: bool, now: int) -> None:
        """Pause (or resume) the running children of a workflow, at every depth."""
        for (child,) in db.execute(self.Q["children"], {"id": workflow_id}).fetchall():
            self._pause_one(db, child, unpause, now)
            self._pause_tree(db, child, unpause, now)

    def _pause_one(self, db: Tx, workflow_id: int, unpause: bool, now: int) -> None:
        params = {"id": workflow_id, "workflow_id": workflow_id, "now": now}
        if unpause:
            if db.execute(self.Q["unpause_workflow"], params).rowcount:
                db.execute(self.Q["release_steps"], params)
                self._event(db, workflow_id, None, "resumed", now, {"by": "parent workflow"})
        elif db.execute(self.Q["pause_workflow"], params).rowcount:
            db.execute(self.Q["hold_steps"], params)
            self._event(db, workflow_id, None, "paused", now, {"by": "parent workflow"})


class TooManyChildren(Exception):
    """A run's tree of call states would pass MAX_DESCENDANTS child workflows (rolls back)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the run that started this tree of calls has started {limit} child "
                         "workflows, the most one run may")  # fmt: skip


class _Busy(Exception):
    """A definition with runs not yet ended cannot be deleted without force (rolls back)."""
