"""Saved definitions: versions, diffs, runs, webhooks, export and import (spec §9, §10).

A definition's content lives in immutable versions; a run is a part-one workflow that
copies its version's compiled flow, so nothing done to the definition later changes it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import jsonpatch
import orjson

from daemon import catalog, inputschema
from daemon.bodies import parse_body
from daemon.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    StepdError,
    Unauthorized,
    Unprocessable,
)
from daemon.executor import new_step
from daemon.models import Definition, NewRun, NewVersion, Workflow
from daemon.notify import sign
from daemon.placeholders import off_loop_if_large

if TYPE_CHECKING:
    from daemon.engine import Engine

# Words a definition may not be named: they are routes under /api/workflows.
RESERVED = frozenset(
    {"templates", "export", "import", "validate", "runs", "schedules", "recurring"}
)
DEFINITION_KEYS = frozenset(
    {
        "name",
        "flow",
        "steps",
        "description",
        "input_schema",
        "concurrency",
        "tags",
        "webhook",
        "notify_url",
    }
)
STATUSES = ("draft", "active", "paused", "archived")
TRIGGER_TYPES = ("manual", "webhook", "schedule", "api")
RUN_TRIGGERS = ("manual", "api", "execute", "webhook", "schedule", "call")
DEFAULT_CONCURRENCY = 10
MAX_CONCURRENCY = 1000
ARM_MS = 600_000  # an armed webhook's window: ten minutes
HOOK_TOLERANCE_S = 300  # how far a webhook call's timestamp may be from now
MAX_CALL_DEPTH = 5  # a child of a child ... of a call state
MAX_PROBLEMS = 50  # input_schema problems listed in one answer


class Gone(StepdError):
    status = 410
    message = "gone"


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC (the /api/workflows family's times)."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ref(ref: str) -> int | str:
    """A definition's id (all digits) or name."""
    return int(ref) if ref.isascii() and ref.isdigit() and len(ref) <= 18 else ref


def not_found(ref: Any) -> NotFound:
    return NotFound(
        f"workflow definition '{_cut(str(ref))}' not found", error_code="WORKFLOW_NOT_FOUND"
    )


def _cut(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[:width] + "..."


class Definitions:
    """The operations behind /api/workflows, the CLI's `def` commands and the page."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store

    # -- checking a definition ----------------------------------------------------------

    async def check(self, definition: Any) -> tuple[NewVersion | None, list[str], list[str]]:
        """(the version to store or None, errors, warnings) of a definition body."""
        if not isinstance(definition, dict):
            raise BadRequest("field 'definition' must be an object")
        name = definition.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRequest("Missing required field: definition.name")
        errors = [
            f"definition: unknown field '{k}'" for k in sorted(set(definition) - DEFINITION_KEYS)
        ]
        if len(name) > 200 or "/" in name or name != name.strip():
            errors.append(
                "definition: 'name' must be 1 to 200 characters, without '/' or spaces around it"
            )
        elif name.isascii() and name.isdigit():
            errors.append("definition: 'name' must not be all digits (that addresses an id)")
        elif name.lower() in RESERVED:
            errors.append(f"definition: 'name' must not be one of {', '.join(sorted(RESERVED))}")
        description = definition.get("description")
        if description is not None and (
            not isinstance(description, str) or len(description) > 10_000
        ):
            errors.append("definition: 'description' must be text of at most 10000 characters")
        tags = definition.get("tags", [])
        if (
            not isinstance(tags, list)
            or len(tags) > 50
            or not all(isinstance(t, str) and 0 < len(t) <= 100 for t in tags)
        ):
            errors.append(
                "definition: 'tags' must be a list of at most 50 names of 1 to 100 characters"
            )
            tags = []
        concurrency = definition.get("concurrency", DEFAULT_CONCURRENCY)
        if (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not (1 <= concurrency <= MAX_CONCURRENCY)
        ):
            errors.append(
                f"definition: 'concurrency' must be an integer from 1 to {MAX_CONCURRENCY}"
            )
            concurrency = DEFAULT_CONCURRENCY
        webhook = definition.get("webhook")
        mode = "single"
        if webhook is not None:
            if (
                not isinstance(webhook, dict)
                or set(webhook) - {"mode"}
                or webhook.get("mode", "single") not in ("single", "persistent")
            ):
                errors.append('definition: \'webhook\' must be {"mode": "single" | "persistent"}')
            else:
                mode = webhook.get("mode", "single")
        schema = definition.get("input_schema")
        if schema is not None:
            if not isinstance(schema, dict | bool):
                errors.append("definition: 'input_schema' must be a JSON Schema (an object)")
            else:
                problem = inputschema.meta_problem(schema)
                if problem is not None:
                    errors.append(f"definition: 'input_schema' is not a valid JSON Schema{problem}")
                else:
                    why = inputschema.unusable(schema)
                    if why is not None:
                        errors.append(f"definition: 'input_schema' cannot be used: {why}")
        body = {k: definition[k] for k in ("flow", "steps", "notify_url") if k in definition}
        if "flow" not in body and "steps" not in body:
            return None, [*errors, "definition: missing required field 'flow' (or 'steps')"], []
        sub, problems, warnings = await self.engine.check({"name": name, **body})
        errors += problems
        if errors or sub is None:
            return None, errors, warnings
        try:
            canonical = orjson.dumps(definition, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise BadRequest(f"field 'definition' is not JSON: {exc}") from None
        if len(canonical) + len(sub.flow_json) > self.engine.executor.config.max_workflow_bytes:
            raise PayloadTooLarge(
                f"the definition is {len(canonical)} bytes; with its compiled "
                "flow it must fit in [limits] max_workflow_bytes"
            )
        version = NewVersion(
            name=name,
            body_json=orjson.dumps(definition).decode(),
            flow_json=sub.flow_json,
            content_hash=hashlib.sha256(canonical).hexdigest(),
            tags_json=orjson.dumps(tags).decode(),
            description=description,
            concurrency=concurrency,
            webhook_mode=mode,
            change_summary=None,
        )
        return version, [], warnings

    async def _checked(self, definition: Any) -> tuple[NewVersion, list[str]]:
        version, errors, warnings = await self.check(definition)
        if version is None:
            raise Unprocessable("; ".join(errors), errors=errors)
        return version, warnings

    async def validate(self, body: Any) -> dict[str, Any]:
        """POST /api/workflows/validate {"definition"}: {"valid", "errors", "warnings"}."""
        definition = body.get("definition") if isinstance(body, dict) else None
        if definition is None and isinstance(body, dict) and ("flow" in body or "steps" in body):
            definition = body  # the definition itself
        try:
            version, errors, warnings = await self.check(definition)
        except BadRequest as exc:
            return {"valid": False, "errors": [exc.text], "warnings": []}
        return {"valid": version is not None, "errors": errors, "warnings": warnings}

    # -- definitions ----------------------------------------------------------------------

    async def create(self, body: Any, *, by: str | None) -> dict[str, Any]:
        """POST /api/workflows {"definition", "trigger_type", "tags", "status"}."""
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(body) - {"definition", "trigger_type", "tags", "status"})
        if unknown:
            raise BadRequest(
                f"unknown field '{unknown[0]}' (allowed: definition, trigger_type, tags, status)"
            )
        if "definition" not in body:
            raise BadRequest("Missing required field: definition")
        definition = body["definition"]
        if isinstance(definition, dict) and "tags" in body and "tags" not in definition:
            definition = {**definition, "tags": body["tags"]}
        trigger_type = body.get("trigger_type", "manual")
        if trigger_type not in TRIGGER_TYPES:
            raise BadRequest(f"field 'trigger_type' must be one of {', '.join(TRIGGER_TYPES)}")
        status = body.get("status", "active")
        if status not in STATUSES:
            raise BadRequest(f"field 'status' must be one of {', '.join(STATUSES)}")
        version, warnings = await self._checked(definition)
        version = replace(version, change_summary="Initial version")
        created = await self.store.create_definition(
            version, status=status, trigger_type=trigger_type, created_by=by
        )
        if created is None:
            raise Conflict(f"a workflow definition named '{_cut(version.name)}' exists already")
        return {
            "id": created.id,
            "workflow": await self.describe(created, reveal=True),
            "warnings": warnings,
        }

    async def resolve(self, ref: str | int) -> Definition:
        found = await self.store.definition(parse_ref(ref) if isinstance(ref, str) else ref)
        if found is None:
            raise not_found(ref)
        return found

    def summary(self, d: Definition) -> dict[str, Any]:
        return {
            "id": d.id,
            "name": d.name,
            "version": d.version,
            "status": d.status,
            "trigger_type": d.trigger_type,
            "tags": orjson.Fragment(d.tags_json),
            "description": d.description,
            "concurrency": d.concurrency,
            "deployed": d.webhook_id is not None,
            "created_by": d.created_by,
            "created_at": iso(d.created_at),
            "updated_at": iso(d.updated_at),
        }

    async def describe(self, d: Definition, *, reveal: bool) -> dict[str, Any]:
        """A definition as GET shows it; its webhook's id and secret only with `reveal`
        (tokens with the workflow permission)."""
        latest = await self.store.version(d.id, d.version)
        assert latest is not None
        webhook: dict[str, Any] = {
            "mode": d.webhook_mode,
            "deployed": d.webhook_id is not None,
            "armed_until": iso(self._armed(d)),
        }
        if reveal and d.webhook_id is not None:
            webhook |= {
                "url": f"/hooks/{d.webhook_id}",
                "webhook_id": d.webhook_id,
                "webhook_secret": d.webhook_secret,
            }
        return {
            **self.summary(d),
            "definition": orjson.Fragment(latest.body_json),
            "flow": orjson.Fragment(latest.flow_json),
            "webhook": webhook,
        }

    @staticmethod
    def _armed(d: Definition) -> int | None:
        if d.armed_until is None or d.armed_until <= time.time() * 1000:
            return None
        return d.armed_until

    async def get(self, ref: str, *, reveal: bool) -> dict[str, Any]:
        return await self.describe(await self.resolve(ref), reveal=reveal)

    async def list(
        self,
        *,
        status: str | None,
        tag: str | None,
        trigger_type: str | None,
        limit: int,
        offset: int,
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise BadRequest(f"query parameter 'status' must be one of {', '.join(STATUSES)}")
        if trigger_type is not None and trigger_type not in TRIGGER_TYPES:
            raise BadRequest(
                f"query parameter 'trigger_type' must be one of {', '.join(TRIGGER_TYPES)}"
            )
        rows, total = await self.store.list_definitions(
            status=status, tag=tag, trigger_type=trigger_type, limit=limit, offset=offset
        )
        return {"workflows": [self.summary(d) for d in rows], "total": total}

    async def update(self, ref: str, body: Any, *, by: str | None) -> dict[str, Any]:
        """PUT {"definition", "change_summary"}: a new version, unless nothing changed."""
        if not isinstance(body, dict) or "definition" not in body:
            raise BadRequest("Missing required field: definition")
        unknown = sorted(set(body) - {"definition", "change_summary"})
        if unknown:
            raise BadRequest(f"unknown field '{unknown[0]}' (allowed: definition, change_summary)")
        summary = body.get("change_summary")
        if summary is not None and (not isinstance(summary, str) or len(summary) > 1000):
            raise BadRequest("field 'change_summary' must be text of at most 1000 characters")
        d = await self.resolve(ref)
        version, warnings = await self._checked(body["definition"])
        if not summary:  # what changed since the latest version, in words
            latest = await self._version(d, d.version)
            summary = describe_changes(orjson.loads(latest.body_json), body["definition"])
        return await self._add(d, replace(version, change_summary=summary), by, warnings)

    async def _add(
        self, d: Definition, version: NewVersion, by: str | None, warnings: list[str]
    ) -> dict[str, Any]:
        outcome, after = await self.store.add_version(d.id, version, created_by=by)
        if outcome == "not_found":
            raise not_found(d.id)
        if outcome == "name_taken":
            raise Conflict(f"a workflow definition named '{_cut(version.name)}' exists already")
        assert after is not None
        if outcome == "ok":
            self.engine.executor.wake()  # queued runs may have started (more concurrency)
        return {
            **await self.describe(after, reveal=True),
            "changed": outcome == "ok",
            "warnings": warnings,
        }

    async def set_status(self, ref: str, body: Any) -> dict[str, Any]:
        status = body.get("status") if isinstance(body, dict) else None
        if status not in STATUSES:
            raise BadRequest(f'body must be {{"status": "{" | ".join(STATUSES)}"}}')
        d = await self.resolve(ref)
        await self.store.set_definition_status(d.id, status)
        return await self.describe(await self.resolve(d.id), reveal=True)

    async def delete(self, ref: str, *, force: bool, by: str | None) -> None:
        d = await self.resolve(ref)
        outcome, cancelled = await self.store.delete_definition(d.id, force=force, by=by)
        if outcome == "not_found":
            raise not_found(ref)
        if outcome == "busy":
            raise Conflict(
                f"workflow definition '{_cut(d.name)}' has runs that have not ended; "
                "cancel them, or delete with ?force=true (which cancels them)"
            )
        self.engine.executor.cancel_steps(cancelled)

    # -- versions -------------------------------------------------------------------------

    async def versions(self, ref: str, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        d = await self.resolve(ref)
        rows = await self.store.versions(d.id, limit=limit, offset=offset)
        return {
            "versions": [
                {
                    "version": r["version"],
                    "change_summary": r["change_summary"],
                    "created_at": iso(r["created_at"]),
                    "created_by": r["created_by"],
                }
                for r in rows
            ],
            "total": d.version,  # versions are numbered 1 to the latest
        }

    async def _version(self, d: Definition, number: int) -> Any:
        row = await self.store.version(d.id, number)
        if row is None:
            raise NotFound(
                f"workflow definition '{_cut(d.name)}' has no version {number} "
                f"(latest: {d.version})"
            )
        return row

    async def version(self, ref: str, number: int) -> dict[str, Any]:
        d = await self.resolve(ref)
        row = await self._version(d, number)
        return {
            "id": d.id,
            "name": d.name,
            "version": row.version,
            "change_summary": row.change_summary,
            "created_at": iso(row.created_at),
            "created_by": row.created_by,
            "definition": orjson.Fragment(row.body_json),
            "flow": orjson.Fragment(row.flow_json),
        }

    async def diff(self, ref: str, v1: int, v2: int) -> dict[str, Any]:
        d = await self.resolve(ref)
        text_a = (await self._version(d, v1)).body_json
        text_b = (await self._version(d, v2)).body_json

        def work() -> tuple[list[dict[str, Any]], str]:
            # jsonpatch is pure Python: a large list changed (an enum reordered) takes
            # seconds, which must not stop the event loop (a read-only token asks for it).
            a, b = orjson.loads(text_a), orjson.loads(text_b)
            return jsonpatch.make_patch(a, b).patch, describe_changes(a, b)

        ops, summary = await off_loop_if_large(len(text_a) + len(text_b), work)
        return {"diff": ops, "summary": summary, "v1": v1, "v2": v2}

    async def rollback(self, ref: str, body: Any, *, by: str | None) -> dict[str, Any]:
        number = body.get("version") if isinstance(body, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise BadRequest('body must be {"version": <a version number>}')
        d = await self.resolve(ref)
        row = await self._version(d, number)
        version, warnings = await self._checked(orjson.loads(row.body_json))
        version = replace(version, change_summary=f"Rollback to version {number}")
        return await self._add(d, version, by, warnings)

    # -- runs -----------------------------------------------------------------------------

    async def prepare_run(
        self,
        d: Definition,
        input_data: Any,
        *,
        trigger: str,
        version: int | None,
        by: str | None,
        parent: tuple[int, int, int] | None = None,
    ) -> NewRun:
        """A run of a definition's version (default: the latest), its input checked
        against the version's input_schema. `parent`: (workflow id, call step id, depth)
        for a child of a call state."""
        row = await self._version(d, version or d.version)
        if input_data is None:
            input_data = {}
        if not isinstance(input_data, dict):
            raise BadRequest("the run's input must be a JSON object")
        body = orjson.loads(row.body_json)
        problems = input_problems(body.get("input_schema"), input_data)
        if problems:
            raise Unprocessable(
                f"the input does not match the input_schema of '{_cut(d.name)}' "
                f"v{row.version}: {'; '.join(problems[:5])}"
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""),
                error_code="VALIDATION_ERROR",
                errors=problems,
            )
        engine = self.engine
        result = await engine._flows.aparse(row.flow_json, engine.registry, engine.max_states)
        if result.flow is None:  # a tool it names is gone since it was saved
            raise Unprocessable(
                f"version {row.version} of '{_cut(d.name)}' no longer "
                f"compiles here: {'; '.join(result.errors)}"
            )
        input_json = orjson.dumps(input_data).decode()
        limit = engine.executor.config.max_workflow_bytes
        if len(input_json) + len(row.flow_json) > limit:
            raise PayloadTooLarge(
                f"the input and flow are {len(input_json) + len(row.flow_json)}"
                f" bytes; a workflow may store {limit}"
            )
        dag = body.get("steps")
        return NewRun(
            name=d.name,
            flow_json=row.flow_json,
            input_json=input_json,
            created_by=by,
            first=new_step(result.flow["start"], seq=1),
            trigger=trigger,
            definition_id=d.id,
            definition_version=row.version,
            dag_json=None if dag is None else orjson.dumps(dag).decode(),
            notify_url=body.get("notify_url"),
            parent_workflow_id=None if parent is None else parent[0],
            parent_step_id=None if parent is None else parent[1],
            call_depth=0 if parent is None else parent[2],
        )

    async def start_run(
        self,
        ref: str | int,
        input_data: Any,
        *,
        trigger: str = "manual",
        version: int | None = None,
        by: str | None,
    ) -> int:
        """Start (or queue) a run; its id."""
        d = await self.resolve(ref)
        if d.status in ("paused", "archived"):
            raise Conflict(
                f"workflow definition '{_cut(d.name)}' is {d.status}; it starts no "
                "runs (PATCH its status to active)"
            )
        run = await self.prepare_run(d, input_data, trigger=trigger, version=version, by=by)
        created = await self.engine.start_run(run, concurrency=d.concurrency)
        return created.id

    async def run_body(self, ref: str, body: Any, *, by: str | None) -> int:
        """POST /api/workflows/{id}/run {"input_data", "trigger", "version"}."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(body) - {"input_data", "input", "trigger", "version"})
        if unknown:
            raise BadRequest(
                f"unknown field '{unknown[0]}' (allowed: input_data, trigger, version)"
            )
        trigger = body.get("trigger", "manual")
        if trigger not in ("manual", "api"):
            raise BadRequest("field 'trigger' must be 'manual' or 'api'")
        version = body.get("version")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise BadRequest("field 'version' must be a version number")
        input_data = body.get("input_data", body.get("input"))
        return await self.start_run(ref, input_data, trigger=trigger, version=version, by=by)

    async def runs(
        self, ref: str, *, status: str | None, limit: int, offset: int
    ) -> dict[str, Any]:
        d = await self.resolve(ref)
        rows, total = await self.store.definition_runs(
            d.id, status=status, limit=limit, offset=offset
        )
        return {"runs": [run_summary(w, d.name) for w in rows], "total": total}

    async def run(self, run_id: int) -> dict[str, Any]:
        """GET /api/workflows/runs/{run_id}: the run with its step runs (the S1 shape)."""
        wf = await self.store.get_workflow(run_id)
        if wf is None:
            raise NotFound(f"run {run_id} not found")
        name = None
        if wf.definition_id is not None:
            d = await self.store.definition(wf.definition_id)
            name = None if d is None else d.name
        steps = await self.store.steps(run_id)
        step_runs = []
        for s in steps:
            status = {"done": "completed"}.get(s.status, s.status)
            if s.status == "running" and s.awaiting in ("ready", "decision", "signal", "timer"):
                status = "waiting"
            step_runs.append(
                {
                    "step_id": s.state,
                    "id": s.id,
                    "kind": s.kind,
                    "status": status,
                    "output": orjson.Fragment(s.result_json) if s.result_json else None,
                    "error": s.error,
                    "started_at": iso(s.started_at),
                    "completed_at": iso(s.completed_at),
                    "duration_seconds": _seconds(s.started_at, s.completed_at),
                    "child_id": s.child_id,
                }
            )
        return {
            "run": {
                **run_summary(wf, name),
                "input_data": orjson.Fragment(wf.input_json or "{}"),
                "output": orjson.Fragment(wf.output_json or "null"),
                "parent": _parent(wf),
                "step_runs": step_runs,
            }
        }

    async def delete_run(self, run_id: int) -> None:
        wf = await self.store.get_workflow(run_id)
        if wf is None:
            raise NotFound(f"run {run_id} not found")
        if wf.status == "running" or not await self.store.delete_run(run_id):
            raise Conflict(
                f"run {run_id} is {wf.public_status}; only a run that ended can be "
                "deleted (cancel it first)"
            )

    # -- inbound webhooks -------------------------------------------------------------------

    async def deploy(self, ref: str) -> dict[str, Any]:
        d = await self.resolve(ref)
        after = await self.store.deploy(d.id, secrets.token_urlsafe(18), secrets.token_hex(32))
        if after is None or after.webhook_id is None:
            raise not_found(ref)
        return {
            "ok": True,
            "webhook_id": after.webhook_id,
            "webhook_secret": after.webhook_secret,
            "url": f"/hooks/{after.webhook_id}",
            "mode": after.webhook_mode,
        }

    async def undeploy(self, ref: str) -> dict[str, Any]:
        d = await self.resolve(ref)
        await self.store.undeploy(d.id)
        return {"ok": True}

    async def arm(self, ref: str) -> dict[str, Any]:
        d = await self.resolve(ref)
        if d.webhook_id is None:
            raise Conflict(
                f"workflow definition '{_cut(d.name)}' is not deployed: deploy it "
                "first (POST .../deploy)"
            )
        if d.webhook_mode == "persistent":
            raise Conflict(
                "a persistent webhook accepts calls whenever it is deployed; it is not armed"
            )
        until = int(time.time() * 1000) + ARM_MS
        after = await self.store.arm(d.id, until)
        if after is None or after.armed_until != until:
            raise Conflict(f"workflow definition '{_cut(d.name)}' was undeployed meanwhile")
        return {"ok": True, "armed_until": iso(until)}

    async def hook(
        self,
        webhook_id: str,
        *,
        timestamp: str | None,
        signature: str | None,
        body: bytes,
        key: str | None,
    ) -> tuple[int, bool]:
        """POST /hooks/{webhook_id}: (run id, whether it replays an earlier call)."""
        d = await self.store.definition_by_webhook(webhook_id) if len(webhook_id) <= 64 else None
        if d is None or d.webhook_secret is None:
            raise NotFound("no deployed webhook here")
        if timestamp is None or signature is None:
            raise Unauthorized("X-Stepd-Timestamp and X-Stepd-Signature are required")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise Unauthorized("X-Stepd-Timestamp must be Unix seconds")
        if abs(time.time() - int(timestamp)) > HOOK_TOLERANCE_S:
            raise Unauthorized(f"X-Stepd-Timestamp is more than {HOOK_TOLERANCE_S} s from now")
        expected = sign(d.webhook_secret.encode(), int(timestamp), body)
        if not hmac.compare_digest(expected.encode(), signature.strip().encode("utf-8", "replace")):
            raise Unauthorized(
                "bad X-Stepd-Signature: v1=<hex HMAC-SHA256 of '<timestamp>.<body>'>"
            )
        if d.status in ("paused", "archived"):
            raise Conflict(f"workflow definition '{_cut(d.name)}' is {d.status}; it starts no runs")
        # The same signed call sent again (a retrying proxy, a replayed capture) is the same
        # delivery: without an Idempotency-Key, its signature is the key, and it answers
        # the first call's run instead of starting another.
        key = key if key is not None else f"signature {expected}"
        input_data = await parse_body(body) if body.strip() else {}
        run = await self.prepare_run(
            d, input_data, trigger="webhook", version=None, by=f"webhook:{d.name}"
        )
        outcome, run_id = await self.store.fire_hook(d, run, key=key)
        if outcome == "replay":
            assert run_id is not None
            earlier = await self.store.get_workflow(run_id)
            if earlier is not None and orjson.loads(earlier.input_json or "{}") != input_data:
                raise Conflict(
                    f"Idempotency-Key was used within 24 hours for a call with another "
                    f"body (run {run_id}); send a new key for new input"
                )
        if outcome in ("ok", "replay"):
            assert run_id is not None
            self.engine.executor.wake()
            return run_id, outcome == "replay"
        if outcome == "gone":
            raise Gone(
                "this webhook is not armed: its single call was used or its window "
                "closed; arm it again"
            )
        if outcome == "not_found":
            raise NotFound("no deployed webhook here")
        raise Conflict(f"workflow definition '{_cut(d.name)}' is {outcome}; it starts no runs")

    # -- child workflows (call states) ------------------------------------------------------

    async def child_run(
        self,
        ref: str,
        version: int | None,
        input_data: Any,
        *,
        parent: Workflow,
        step_id: int,
    ) -> tuple[NewRun, int]:
        """The child run a call step starts, and its definition's concurrency. Raises a
        StepdError (the step fails for good) when it cannot start."""
        depth = parent.call_depth + 1
        if depth > MAX_CALL_DEPTH:
            raise Conflict(f"a call may nest at most {MAX_CALL_DEPTH} workflows deep")
        d = await self.resolve(ref)
        if d.status in ("paused", "archived"):
            raise Conflict(f"workflow definition '{_cut(d.name)}' is {d.status}")
        run = await self.prepare_run(
            d,
            input_data,
            trigger="call",
            version=version,
            by=parent.created_by,
            parent=(parent.id, step_id, depth),
        )
        return replace(run, root_id=parent.root_id or parent.id), d.concurrency

    # -- templates ---------------------------------------------------------------------------

    def templates(self, *, category: str | None, limit: int, offset: int) -> dict[str, Any]:
        found = catalog.list_templates(category)
        return {"templates": found[offset : offset + limit], "total": len(found)}

    def template(self, template_id: str) -> dict[str, Any]:
        found = catalog.get_template(template_id)
        if found is None:
            raise NotFound(f"template '{_cut(template_id)}' not found")
        return found

    async def install(self, template_id: str, body: Any, *, by: str | None) -> int:
        """Save a shipped template as a definition (named `name`, or the template's name)."""
        if body is None:
            body = {}
        if not isinstance(body, dict) or set(body) - {"name"}:
            raise BadRequest('body must be {"name": "<definition name>"} or empty')
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("field 'name' must be a string")
        self.template(template_id)  # 404 for an unknown one
        definition = catalog.definition_for(template_id, name)
        created = await self.create({"definition": definition}, by=by)
        return int(created["id"])

    # -- export and import -------------------------------------------------------------------

    async def export_one(self, d: Definition) -> dict[str, Any]:
        rows = await self.store.versions(d.id)
        versions = []
        for r in reversed(rows):
            row = await self.store.version(d.id, r["version"])
            assert row is not None
            versions.append(
                {
                    "version": row.version,
                    "change_summary": row.change_summary,
                    "created_at": iso(row.created_at),
                    "created_by": row.created_by,
                    "definition": orjson.Fragment(row.body_json),
                }
            )
        return {
            "name": d.name,
            "status": d.status,
            "trigger_type": d.trigger_type,
            "tags": orjson.Fragment(d.tags_json),
            "description": d.description,
            "concurrency": d.concurrency,
            "deployed": d.webhook_id is not None,
            "versions": versions,
            "schedules": await self.engine.scheds.export_for(d),
            "triggers": {"webhook": {"mode": d.webhook_mode}},
        }

    async def export(self, ref: str | None) -> dict[str, Any]:
        if ref is not None:
            chosen = [await self.resolve(ref)]
        else:
            chosen, offset = [], 0
            while True:
                page, total = await self.store.list_definitions(
                    status=None, tag=None, trigger_type=None, limit=200, offset=offset
                )
                chosen += page
                offset += len(page)
                if not page or offset >= total:
                    break
        chosen.sort(key=lambda d: d.id)
        return {
            "stepd_export": 1,
            "exported_at": iso(int(time.time() * 1000)),
            "workflows": [await self.export_one(d) for d in chosen],
        }

    async def import_(self, doc: Any, *, mode: str, by: str | None) -> dict[str, Any]:
        """Validate every definition of an export first (any problem: 422, nothing
        written), then create (or, with mode=upsert, update) them."""
        if mode not in ("create", "upsert"):
            raise BadRequest("query parameter 'mode' must be create or upsert")
        if isinstance(doc, dict) and "workflows" not in doc and "versions" in doc:
            doc = {"workflows": [doc]}  # one definition's export, unwrapped
        if not isinstance(doc, dict) or not isinstance(doc.get("workflows"), list):
            raise BadRequest('body must be an export: {"stepd_export": 1, "workflows": [...]}')
        if len(doc["workflows"]) > 1000:
            raise PayloadTooLarge("an import holds at most 1000 definitions")
        errors: list[str] = []
        plans: list[tuple[str, dict[str, Any], list[tuple[NewVersion, dict[str, Any]]]]] = []
        seen: set[str] = set()
        for i, item in enumerate(doc["workflows"]):
            where = f"workflows[{i}]"
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("versions"), list)
                or not item["versions"]
            ):
                errors.append(f"{where}: needs 'versions', a non-empty list")
                continue
            name = item.get("name")
            where = f"{where} ({_cut(str(name), 60)})"
            if item.get("status", "active") not in STATUSES:
                errors.append(f"{where}: 'status' must be one of {', '.join(STATUSES)}")
            if item.get("trigger_type", "manual") not in TRIGGER_TYPES:
                errors.append(f"{where}: 'trigger_type' must be one of {', '.join(TRIGGER_TYPES)}")
            versions = []
            for j, v in enumerate(item["versions"]):
                if not isinstance(v, dict) or not isinstance(v.get("definition"), dict):
                    errors.append(f"{where}: versions[{j}]: needs 'definition', an object")
                    continue
                if v["definition"].get("name") != name:
                    errors.append(
                        f"{where}: versions[{j}]: the definition's name is not "
                        f"'{_cut(str(name), 60)}'"
                    )
                    continue
                try:
                    checked, problems, _ = await self.check(v["definition"])
                except BadRequest as exc:
                    checked, problems = None, [exc.text]
                errors += [f"{where}: versions[{j}]: {p}" for p in problems]
                summary = v.get("change_summary")
                if summary is not None and (not isinstance(summary, str) or len(summary) > 1000):
                    errors.append(f"{where}: versions[{j}]: 'change_summary' must be short text")
                    summary = None
                if checked is not None:
                    summary = summary or ("Initial version" if j == 0 else "Imported")
                    versions.append((replace(checked, change_summary=summary), v))
            errors += self.engine.scheds.check_export(item.get("schedules"), where)
            if isinstance(name, str):
                if name in seen:
                    errors.append(f"{where}: the name appears twice in the import")
                seen.add(name)
            plans.append((str(name), item, versions))
        if errors:
            raise Unprocessable(
                f"the import has {len(errors)} problems; nothing was imported: "
                f"{'; '.join(errors[:5])}",
                errors=errors,
            )
        created: list[str] = []
        updated: list[str] = []
        skipped: list[dict[str, str]] = []
        for name, item, versions in plans:
            existing = await self.store.definition(name)
            if existing is not None and mode == "create":
                skipped.append(
                    {
                        "name": name,
                        "reason": "a definition with this name exists "
                        "(mode=create keeps it; use mode=upsert to add a version)",
                    }
                )
                continue
            if existing is not None:
                latest, _ = versions[-1]
                summary = latest.change_summary or "Imported"
                outcome, _ = await self.store.add_version(
                    existing.id,
                    replace(latest, change_summary=f"Imported: {summary}"),
                    created_by=by,
                )
                made_schedules = await self.engine.scheds.import_for(
                    existing, item.get("schedules"), by=by
                )
                if outcome == "ok" or made_schedules:
                    updated.append(name)
                else:
                    skipped.append(
                        {
                            "name": name,
                            "reason": "unchanged: the latest version has the same content"
                            if outcome == "unchanged"
                            else outcome,
                        }
                    )
                continue
            first, _ = versions[0]
            made = await self.store.create_definition(
                replace(first, change_summary=first.change_summary or "Initial version"),
                status=item.get("status", "active"),
                trigger_type=item.get("trigger_type", "manual"),
                created_by=by,
            )
            if made is None:
                skipped.append({"name": name, "reason": "created meanwhile by another request"})
                continue
            for later, _ in versions[1:]:
                await self.store.add_version(made.id, later, created_by=by)
            latest = await self.store.definition(made.id)
            if latest is not None:
                await self.engine.scheds.import_for(latest, item.get("schedules"), by=by)
            created.append(name)
        return {"created": created, "updated": updated, "skipped": skipped}


def input_problems(schema: Any, value: Any) -> list[str]:
    """Every way `value` breaks a JSON Schema (empty when it fits, or there is none)."""
    if schema is None:
        return []
    out = []
    try:
        for where, message in inputschema.iter_errors(schema, value):
            out.append(f"{'input/' + where if where else 'input'}: {_cut(message, 300)}")
            if len(out) >= MAX_PROBLEMS:
                break
    except inputschema.UnusableSchema as exc:
        raise Unprocessable(f"the input_schema cannot be used: {exc}") from None
    return sorted(out)


def describe_changes(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A human summary of what changed between two definition bodies:
    "Added 1 step, modified 1 step; changed description"."""
    sa, sb = _states(a), _states(b)
    added = len(set(sb) - set(sa))
    removed = len(set(sa) - set(sb))
    modified = sum(1 for k in set(sa) & set(sb) if sa[k] != sb[k])
    parts = []
    for verb, n in (("added", added), ("modified", modified), ("removed", removed)):
        if n:
            parts.append(f"{verb} {n} step{'s' if n != 1 else ''}")
    others = sorted(
        k for k in set(a) | set(b) if k not in ("flow", "steps") and a.get(k) != b.get(k)
    )
    if ("flow" in a) != ("flow" in b):
        others.insert(0, "the flow format")
    text = ", ".join(parts)
    if others:
        text += ("; " if text else "") + "changed " + ", ".join(others)
    return (text[:1].upper() + text[1:]) if text else "No changes"


def _states(body: dict[str, Any]) -> dict[str, Any]:
    flow = body.get("flow")
    if isinstance(flow, dict):
        return flow
    steps = body.get("steps")
    if isinstance(steps, list):
        return {str(s.get("id")): s for s in steps if isinstance(s, dict)}
    return {}


def run_summary(wf: Workflow, name: str | None) -> dict[str, Any]:
    ended = wf.completed_at or wf.cancelled_at
    return {
        "id": wf.id,
        "workflow_id": wf.definition_id,
        "workflow_name": name,
        "version": wf.definition_version,
        "status": wf.public_status,
        "trigger": wf.run_trigger,
        "started_at": iso(wf.created_at),
        "completed_at": iso(ended),
        "duration_seconds": _seconds(wf.created_at, ended),
        "error": wf.error,
    }


def _parent(wf: Workflow) -> dict[str, int] | None:
    if wf.parent_workflow_id is None or wf.parent_step_id is None:
        return None
    return {"workflow_id": wf.parent_workflow_id, "step_id": wf.parent_step_id}


def _seconds(start: int | None, end: int | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) / 1000, 3)
