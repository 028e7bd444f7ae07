"""Workflow operations shared by the API and the CLI: create, validate, ready, cancel, read."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import httpx
import orjson

from daemon import dag, egress
from daemon import flow as flows
from daemon.config import TokenConfig
from daemon.definitions import Definitions, iso
from daemon.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    Unprocessable,
)
from daemon.evaluator import SandboxUnavailable
from daemon.executor import (
    Executor,
    WorkflowInfo,
    failed_for_good,
    finish_for,
    log_gate_waiting,
    new_step,
)
from daemon.limits import MAX_REASON
from daemon.models import TERMINAL, Finish, NewRun, Step, StepStatus
from daemon.schedules import Schedules
from daemon.storage import Cancelled, Created, Replay, Replayed, WorkflowTooLarge, now_ms
from daemon.storage.base import BaseStore, Redrive
from daemon.tools import Registry

BODY_KEYS = {"name", "flow", "steps", "input", "notify_url"}
INBOX_JSON = 16384  # bytes of an input or result shown in the approvals inbox


@dataclass(frozen=True)
class Submission:
    """A checked create request."""

    name: str
    flow: flows.Flow
    flow_json: str
    input: dict[str, Any]
    warnings: list[str]
    notify_url: str | None = None
    dag_json: str | None = None  # the submitted `steps` when the body had the DAG shape


class Engine:
    def __init__(
        self,
        store: BaseStore,
        registry: Registry,
        executor: Executor,
        *,
        max_states: int = 200,
        policy: egress.Policy | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.executor = executor
        self.max_states = max_states
        self.policy = policy or egress.Policy()
        self._flows = flows.ParseCache()
        self.defs = Definitions(self)
        self.scheds = Schedules(self)
        executor.defs = self.defs  # call states start runs of saved definitions

    # -- create and validate -----------------------------------------------------------

    async def check(self, body: Any) -> tuple[Submission | None, list[str], list[str]]:
        """Every problem with a create body: (submission or None, errors, warnings).

        Raises BadRequest for a body that is not an object or lacks `name` or both `flow`
        and `steps`. A body with `steps` (the DAG shape) is compiled into a flow first.
        """
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRequest("Missing required field: name")
        if "flow" not in body and "steps" not in body:
            raise BadRequest("Missing required field: flow")
        errors = [f"unknown field '{k}'" for k in sorted(set(body) - BODY_KEYS)]
        if "flow" in body and "steps" in body:
            errors.append("give either 'flow' or 'steps' (the DAG shape), not both")
        notify_url = body.get("notify_url")
        if notify_url is not None and (
            not isinstance(notify_url, str)
            or not notify_url.startswith(("http://", "https://"))
            or len(notify_url) > 2000
        ):
            errors.append("field 'notify_url' must be an http:// or https:// URL")
        elif notify_url is not None:
            errors += self._refused_url("notify_url", notify_url)
        input_ = body.get("input", {})
        if input_ is None:
            input_ = {}
        if not isinstance(input_, dict):
            errors.append("field 'input' must be an object")
        if len(name) > 200:
            errors.append("field 'name' must be at most 200 characters")
        raw_flow, dag_json = body.get("flow"), None
        if "flow" not in body:
            try:
                dag_json = orjson.dumps(body["steps"]).decode()
            except TypeError as exc:  # not from a JSON body
                raise BadRequest(f"field 'steps' is not JSON: {exc}") from None
            steps = body["steps"]
            if isinstance(steps, list) and len(steps) > self.max_states:
                # Refused before compiling: its work grows faster than the step count.
                return None, [*errors, f"field 'steps' has {len(steps)} steps; the limit is "
                              f"{self.max_states}"], []  # fmt: skip
            raw_flow, dag_errors = dag.compile_steps(steps)
            if raw_flow is None:
                return None, errors + dag_errors, []
        try:
            flow_json = orjson.dumps(raw_flow).decode()
        except TypeError as exc:  # not from a JSON body (the parser refuses such numbers)
            raise BadRequest(f"field 'flow' is not JSON: {exc}") from None
        result = await self._flows.aparse(flow_json, self.registry, self.max_states, raw=raw_flow)
        errors += result.errors
        if errors or result.flow is None:
            return None, errors, result.warnings
        sub = Submission(
            name, result.flow, flow_json, input_, result.warnings, notify_url, dag_json
        )
        return sub, [], result.warnings

    def _refused_url(self, field: str, url: str) -> list[str]:
        """The URL's problem when its host is an address the egress policy refuses (a
        name is judged on what it resolves to, when the connection is made)."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            return [f"field '{field}' is not a valid URL: {exc}"]
        host = parsed.host
        if not host or "%" in host or not 0 < (parsed.port or 80) < 65536:
            return [f"field '{field}' is not a valid URL: no valid host and port"]
        address = egress.literal_address(host)
        decision = None if address is None else self.policy.decide(address)
        if decision is None or decision.allowed:
            return []
        return [f"field '{field}' is refused by the egress policy: {decision.reason()}"]

    async def validate(self, body: Any) -> dict[str, Any]:
        try:
            sub, errors, warnings = await self.check(body)
        except BadRequest as exc:
            return {"valid": False, "errors": [exc.text], "warnings": []}
        return {"valid": sub is not None, "errors": errors, "warnings": warnings}

    async def create(
        self, body: Any, *, created_by: str | None, idempotency_key: str | None = None
    ) -> Created:
        sub, errors, _ = await self.check(body)
        if sub is None:
            raise Unprocessable("; ".join(errors))
        input_json = orjson.dumps(sub.input).decode()
        stored = len(sub.flow_json.encode()) + len(input_json.encode())
        if sub.dag_json is not None:  # kept beside the compiled flow
            stored += len(sub.dag_json.encode())
        if stored > self.executor.config.max_workflow_bytes:
            raise PayloadTooLarge(f"the flow and input are {stored} bytes; a workflow may store "
                                  f"{self.executor.config.max_workflow_bytes} "
                                  "([limits] max_workflow_bytes)")  # fmt: skip
        request_hash = None
        if idempotency_key is not None:
            canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
            request_hash = hashlib.sha256(canonical).hexdigest()
        # Shielded: once the write is queued it may commit, and then its step must run
        # even if this request is cancelled (the client went away).
        created = await asyncio.shield(
            self._insert(sub, input_json, created_by, idempotency_key, request_hash)
        )
        if created.conflict:
            raise Conflict("Idempotency-Key was already used for a different request")
        return created

    async def _insert(
        self,
        sub: Submission,
        input_json: str,
        created_by: str | None,
        idempotency_key: str | None,
        request_hash: str | None,
    ) -> Created:
        start = sub.flow["start"]
        # A free run slot: the first step is written as running and starts when the write
        # commits, without waiting for a claim.
        lease_ms = self.executor.reserve() if start.step_tool is not None else None
        created: Created | None = None
        try:
            created = await self.store.create_workflow(
                name=sub.name,
                flow_json=sub.flow_json,
                input_json=input_json,
                created_by=created_by,
                first=new_step(start, seq=1),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                notify_url=sub.notify_url,
                start_lease_ms=lease_ms,
                dag_json=sub.dag_json,
            )
        finally:
            if lease_ms is not None:  # also when the write failed: then nothing runs
                if created is not None and created.started is not None:
                    info = WorkflowInfo(created.id, sub.name, created_by, sub.flow, input_json,
                                        len(sub.flow_json) + len(input_json))  # fmt: skip
                    self.executor.remember(info)
                self.executor.release(created.started if created is not None else None)
        if not created.replayed:
            first = new_step(start, seq=1)
            log_gate_waiting(created.id, created.first_step_id, first)
            # A queued tool step is for the executor to claim, and a gate's deadline may
            # be sooner than its next pass; a gate without one is written waiting, with
            # nothing for the executor to do (a wake-up would cost a pass of reads).
            if lease_ms is None and (first.tool is not None or first.timeout_ms is not None):
                self.executor.wake()
        return created

    async def start_run(self, run: NewRun, *, concurrency: int | None) -> Created:
        """Start a run of a saved definition (queued past its `concurrency`). Shielded like
        create: once written, its first step runs even if the request is gone."""
        return await asyncio.shield(self._start_run(run, concurrency))

    async def _start_run(self, run: NewRun, concurrency: int | None) -> Created:
        lease_ms = self.executor.reserve() if run.first.tool is not None else None
        created: Created | None = None
        try:
            created = await self.store.create_run(run, concurrency=concurrency,
                                                  start_lease_ms=lease_ms)  # fmt: skip
        finally:
            if lease_ms is not None:
                self.executor.release(created.started if created is not None else None)
        if created.first_step_id is not None:
            log_gate_waiting(created.id, created.first_step_id, run.first)
        if lease_ms is None:
            self.executor.wake()
        return created

    # -- gates and cancel -------------------------------------------------------------

    async def approve(
        self,
        step_id: int,
        result: Any,
        *,
        token: TokenConfig,
        idempotency_key: str | None = None,
        comment: str | None = None,
        link_nonce: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Release a waiting gate; `result` (any JSON value, or None) becomes its result and
        `comment` is kept as the step's reason.

        Returns the answer (status, body): the first one again for a repeated
        Idempotency-Key.
        """
        return await self._decide_gate(
            step_id, "approve", result, comment, token, idempotency_key, link_nonce
        )

    async def reject(
        self,
        step_id: int,
        reason: str,
        *,
        token: TokenConfig,
        idempotency_key: str | None = None,
        link_nonce: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Reject a waiting gate: it fails with `reason`; the flow goes to on_error or fails.

        With `link_nonce`, a one-click link is spent in the same transaction.
        """
        return await self._decide_gate(
            step_id, "reject", None, reason, token, idempotency_key, link_nonce
        )

    async def _decide_gate(
        self,
        step_id: int,
        decision: str,
        result: Any,
        reason: str | None,
        token: TokenConfig,
        key: str | None,
        link_nonce: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        _check_reason(reason)
        answer = {"queued": True} if decision == "approve" else {"rejected": True}
        replay = None
        if key is not None:
            request = orjson.dumps([step_id, decision, result, reason], option=orjson.OPT_SORT_KEYS)
            replay = Replay(
                token.name,
                key,
                hashlib.sha256(request).hexdigest(),
                200,
                orjson.dumps(answer).decode(),
            )
            earlier = await self.store.decision_replay(token.name, key)
            if earlier is not None:
                return _replayed(earlier, replay)
        step = await self.store.get_step(step_id)
        if step is None:
            raise NotFound(f"step {step_id} not found")
        if step.tool is not None or step.awaiting != "ready":
            raise Conflict(f"step {step_id} is not a waiting gate (status: {step.status})")
        info = await self.executor.workflow_info(step.workflow_id)
        self.check_decider(info, step, token)
        if decision == "approve":
            try:
                move = await self.executor.after_success(info, step, result)
            except SandboxUnavailable as exc:
                raise Unavailable(f"{exc}; nothing was decided, try again") from None
            result_json = None if result is None else orjson.dumps(result).decode()
            fin = finish_for(
                info,
                step,
                move,
                StepStatus.DONE,
                self.executor.config.step_limit,
                result_json=result_json,
                max_workflow_bytes=self.executor.config.max_workflow_bytes,
            )
        else:
            error = f"rejected by {token.name}: {reason}"  # reason is required to reject
            fin = failed_for_good(info, step, error, "Rejected", self.executor.config.step_limit)
        try:
            decided = await self._decide(
                fin,
                awaiting="ready",
                decision=decision,
                decided_by=token.name,
                reason=reason,
                replay=replay,
                link_nonce=link_nonce,
            )
        except Replayed as exc:  # the same key, committed since the check above
            assert replay is not None
            return _replayed(exc.earlier, replay)
        except WorkflowTooLarge as exc:
            raise PayloadTooLarge(f"{exc}; nothing was decided") from None
        if not decided:
            raise Conflict(f"step {step_id} is no longer waiting")
        return 200, answer

    async def _decide(self, fin: Finish, **decision: Any) -> bool:
        """BaseStore a decision; a next tool step starts at once when a run slot is free.

        Shielded like create: a decision that commits must start its next step."""
        return await asyncio.shield(self._decide_and_start(fin, **decision))

    async def _decide_and_start(self, fin: Finish, **decision: Any) -> bool:
        lease_ms = None
        if fin.next_step is not None and fin.next_step.tool is not None:
            lease_ms = self.executor.reserve()
        started = None
        try:
            if lease_ms is not None:
                fin = replace(fin, start_next_lease_ms=lease_ms)
            decided = await self.store.decide(fin, **decision)
            if decided is not None:
                started = decided[1]
                log_gate_waiting(fin.workflow_id, decided[0], fin.next_step)
        finally:
            if lease_ms is not None:
                self.executor.release(started)
        if lease_ms is None:
            self.executor.wake()
        return decided is not None

    def check_decider(self, info: WorkflowInfo, step: Step, token: TokenConfig) -> None:
        """The gate's rules: who may decide (approvers), and whether its creator may."""
        state = info.state(step)  # a gate inside a parallel branch or a map item too
        refusal = flows.decision_refusal(
            state.approvers,
            state.allow_self_approval,
            who=token.name,
            permissions=token.permissions,
            creator=info.created_by,
            self_default=self.executor.config.allow_self_approval,
        )
        if refusal is not None:
            raise Forbidden(refusal)

    async def approvals(self, *, limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
        """What waits for a person now, oldest first: gates, and interrupted steps. An
        input or previous result over INBOX_JSON bytes is left out (null, with its size)."""
        out = []
        parents: dict[int, dict[str, int] | None] = {}  # of children of call states
        for r in await self.store.approvals(limit=limit, after=after, max_json=INBOX_JSON):
            if r["workflow_id"] not in parents:
                link = await self.store.parent_of(r["workflow_id"])
                parents[r["workflow_id"]] = (
                    None if link is None else {"workflow_id": link[0], "step_id": link[1]}
                )
            approvers = orjson.loads(r["approvers_json"]) if r["approvers_json"] else None
            if r["scope"] is not None:  # a gate inside a branch: its own state's approvers
                info = await self.executor.workflow_info(r["workflow_id"])
                state = info.flow.resolve(orjson.loads(r["scope"]))[r["state"]]
                approvers = list(state.approvers) if state.approvers else None
            out.append({
                "step_id": r["step_id"],
                "workflow_id": r["workflow_id"],
                "workflow_name": r["workflow_name"],
                "state": r["state"],
                "name": r["name"],
                "awaiting": r["awaiting"],
                "reason": r["error"] if r["awaiting"] == "decision" else None,
                "created_by": r["created_by"],
                "input": None if r["input_json"] is None else orjson.Fragment(r["input_json"]),
                "input_bytes": r["input_bytes"],
                "previous_result_json": r["previous_result_json"],
                "previous_result_bytes": r["previous_result_bytes"],
                "approvers": approvers if isinstance(approvers, list) else None,
                "waiting_since": r["started_at"],
                "expires_at": r["expires_at"],
                "parent": parents[r["workflow_id"]],
            })  # fmt: skip
        return out

    async def _awaiting_decision(self, step_id: int) -> Step:
        step = await self.store.get_step(step_id)
        if step is None:
            raise NotFound(f"step {step_id} not found")
        if step.awaiting != "decision":
            raise Conflict(
                f"step {step_id} is not waiting for a retry-or-fail decision "
                f"(status: {step.status})"
            )
        return step

    async def retry(self, step_id: int, *, by: str | None) -> None:
        """Run an interrupted non-idempotent step again, as a person decided."""
        step = await self._awaiting_decision(step_id)
        if not await self.store.retry_decided(step, decided_by=by):
            raise Conflict(f"step {step_id} is no longer waiting")
        self.executor.wake()

    async def fail(self, step_id: int, reason: str | None, *, by: str | None) -> None:
        """Fail an interrupted non-idempotent step; the flow continues at on_error or fails."""
        _check_reason(reason)
        step = await self._awaiting_decision(step_id)
        info = await self.executor.workflow_info(step.workflow_id)
        error = f"failed by {by}: {reason}" if reason else f"failed by {by} after an interruption"
        fin = failed_for_good(info, step, error, "Interrupted", self.executor.config.step_limit)
        if not await self._decide(fin, awaiting="decision", decision="fail", decided_by=by):
            raise Conflict(f"step {step_id} is no longer waiting")

    # -- run control ------------------------------------------------------------------

    async def pause(self, workflow_id: int, *, by: str | None, reason: str | None = None) -> None:
        """Nothing new starts; running tools finish and their results are kept; timers and
        signals that come due wait."""
        _check_reason(reason)
        outcome = await self.store.pause(workflow_id, by=by, reason=reason)
        _controlled(outcome, workflow_id, "paused", "a running")

    async def resume(
        self,
        workflow_id: int,
        *,
        by: str | None,
        from_step: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Carry on a paused workflow, or redrive a failed or cancelled one (at the state
        that failed, or at `from_step`; inside a parallel or map only the failed branches
        or items run again). Returns whether it was a redrive."""
        _check_reason(reason)
        wf = await self.store.get_workflow(workflow_id)
        if wf is None:
            raise NotFound(f"workflow {workflow_id} not found")
        if wf.public_status == "paused":
            if from_step is not None:
                raise Conflict(f"workflow {workflow_id} is paused: resume it without "
                               "from_step (it redrives a failed or cancelled one)")  # fmt: skip
            outcome = await self.store.unpause(workflow_id, by=by, reason=reason)
            _controlled(outcome, workflow_id, "resumed", "a paused, failed or cancelled")
            self.executor.wake()
            return False
        info = await self.executor.workflow_info(workflow_id)
        if from_step is not None and from_step not in info.flow.states:
            known = ", ".join(sorted(info.flow.states)[:50])
            shown = from_step if len(from_step) <= 100 else from_step[:100] + "..."
            raise Unprocessable(f"from_step: the flow has no top-level state '{shown}' "
                                f"(states: {known})")  # fmt: skip
        outcome = await self.store.redrive(
            workflow_id,
            lambda last: redrive_plan(info, last, from_step),
            by=by,
            reason=reason,
            from_step=from_step,
        )
        if outcome == "no_slot":
            raise Conflict(f"workflow {workflow_id} is a run of a definition whose concurrency "
                           "slots are all taken; redrive it when one of its runs ends")  # fmt: skip
        _controlled(outcome, workflow_id, "resumed", "a paused, failed or cancelled")
        self.executor.wake()
        return True

    async def intervene(
        self, workflow_id: int, patch: Any, *, by: str | None, reason: str | None = None
    ) -> Any:
        """Merge-patch (RFC 7386) the input of a paused workflow or of one waiting at a
        gate; later templates see the new input. Returns the new input."""
        _check_reason(reason)
        if not isinstance(patch, dict):
            raise BadRequest("field 'input' must be an object (a JSON merge patch)")

        def change(old: str) -> str:
            return orjson.dumps(merge_patch(orjson.loads(old), patch)).decode()

        try:
            outcome, new = await self.store.intervene(
                workflow_id, change, by=by, reason=reason,
                max_workflow_bytes=self.executor.config.max_workflow_bytes,
            )  # fmt: skip
        except WorkflowTooLarge as exc:
            raise PayloadTooLarge(f"{exc}; the input was not changed") from None
        if outcome != "ok" and outcome in TERMINAL | {"running"}:
            raise Conflict(f"workflow {workflow_id} is {outcome} and not waiting at a gate; "
                           "its input can change only while paused or at a gate")  # fmt: skip
        _controlled(outcome, workflow_id, "intervened", "a paused")
        self.executor.forget(workflow_id)
        assert new is not None
        return orjson.Fragment(new)

    async def signal(self, workflow_id: int, name: Any, data: Any, *, by: str | None) -> None:
        """Send a signal: the oldest wait for it takes it, or it is kept, first in first
        out, for a wait reached later."""
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise BadRequest("field 'name' must be a signal name of 1 to 200 characters")
        try:
            outcome = await self.store.send_signal(
                workflow_id, name, orjson.dumps(data).decode(), by=by,
                max_workflow_bytes=self.executor.config.max_workflow_bytes,
            )  # fmt: skip
        except WorkflowTooLarge as exc:
            raise PayloadTooLarge(f"{exc}; the signal was not sent") from None
        if outcome == "not_found":
            raise NotFound(f"workflow {workflow_id} not found")
        if outcome != "ok":
            raise Conflict(f"workflow {workflow_id} is {outcome}; signals go to running or "
                           "paused workflows")  # fmt: skip
        self.executor.wake()

    async def cancel(self, workflow_id: int, *, by: str | None) -> None:
        outcome, step_ids = await self.store.cancel_workflow(workflow_id, by=by)
        if outcome is Cancelled.NOT_FOUND:
            raise NotFound(f"workflow {workflow_id} not found")
        if outcome is Cancelled.FINISHED:
            wf = await self.store.get_workflow(workflow_id)
            raise Conflict(f"workflow {workflow_id} is already {wf.status if wf else 'finished'}")
        self.executor.cancel_steps(step_ids)
        self.executor.wake()  # a queued run of its definition may have taken its slot

    # -- reads ------------------------------------------------------------------------

    async def get(self, workflow_id: int) -> dict[str, Any]:
        wf = await self.store.get_workflow(workflow_id)
        if wf is None:
            raise NotFound(f"workflow {workflow_id} not found")
        steps = await self.store.steps(workflow_id)
        return {
            **wf.summary(),
            "input": orjson.Fragment(wf.input_json or "{}"),
            "output": orjson.Fragment(wf.output_json or "null"),
            "flow": orjson.Fragment(wf.flow_json or "{}"),
            "dag": orjson.Fragment(wf.dag_json) if wf.dag_json else None,
            "schedule": None
            if wf.schedule_id is None
            else {"schedule_id": wf.schedule_id, "fire_time": iso(wf.fire_at)},
            "parent": None
            if wf.parent_workflow_id is None
            else {"workflow_id": wf.parent_workflow_id, "step_id": wf.parent_step_id},
            "steps": [s.public() for s in steps],
        }

    async def list(
        self, *, limit: int, status: str | None, before: int | None
    ) -> list[dict[str, Any]]:
        rows = await self.store.list_workflows(limit=limit, status=status, before=before)
        return [w.summary() for w in rows]


def _controlled(outcome: str, workflow_id: int, done: str, allowed: str) -> None:
    """Raise for a run-control outcome other than "ok": 404, or 409 naming the status."""
    if outcome == "not_found":
        raise NotFound(f"workflow {workflow_id} not found")
    if outcome != "ok":
        raise Conflict(f"workflow {workflow_id} is {outcome}; only {allowed} workflow can be "
                       f"{done}")  # fmt: skip


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def redrive_plan(info: WorkflowInfo, last: Step | None, from_step: str | None) -> Redrive:
    """What a redrive runs again: `from_step`; else the failed or cancelled branches of a
    parallel or map step that failed; else a new visit of the latest top-level state (the
    one that failed, or was cancelled)."""
    if from_step is not None or last is None:
        state = info.flow[from_step or "start"]
        return Redrive(state.id, step=new_step(state, 0))
    state = info.state(last)
    visit = new_step(state, 0)  # also when a parallel or map failed before its branches ran
    if state.kind in ("parallel", "map") and last.status in ("failed", "cancelled"):
        # Its timeout (if any) starts again with the redrive.
        expires = None if state.timeout is None else now_ms() + int(state.timeout * 1000)
        if state.map is not None:
            first = new_step(state.map.flow["start"], last.seq + 1)
            scope = orjson.dumps([state.id, "*"]).decode()
            firsts = {"*": replace(first, scope=scope)}
            return Redrive(state.id, step=visit, parent=last, firsts=firsts,
                           limit=state.map.max_concurrency, expires_at=expires)  # fmt: skip
        assert state.branches is not None
        firsts = {}
        for name, sub in state.branches.items():
            first = new_step(sub["start"], last.seq + 1)
            scope = orjson.dumps([state.id, name]).decode()
            firsts[name] = replace(first, parent_id=last.id, branch=name, scope=scope)
        return Redrive(state.id, step=visit, parent=last, firsts=firsts, expires_at=expires)
    return Redrive(state.id, step=visit)


def _replayed(earlier: Replay, now: Replay) -> tuple[int, dict[str, Any]]:
    """The first answer to a decision's Idempotency-Key, if this is the same request."""
    if earlier.request_hash != now.request_hash:
        raise Conflict("Idempotency-Key was already used for a different decision")
    return earlier.status, orjson.loads(earlier.body_json)


def _check_reason(reason: str | None) -> None:
    if reason is not None and len(reason) > MAX_REASON:
        raise BadRequest(f"a reason or comment may be at most {MAX_REASON} characters")
