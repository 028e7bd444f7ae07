"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Written by hand; tests/test_openapi.py keeps it true (every served route and method is
here and nothing else; real responses validate against these schemas) and
tests/test_fuzz.py fuzzes the app from it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from daemon import __version__, cron, flowschema, schedules
from daemon.storage.schedules import MAX_BUFFERED, OVERLAPS

Schema = dict[str, Any]

INT64: Schema = {"type": "integer", "format": "int64"}
ID: Schema = {**INT64, "minimum": 1}
MILLIS: Schema = {**INT64, "description": "epoch milliseconds"}
STRING: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
STRINGS: Schema = {"type": "array", "items": STRING}
SECONDS: Schema = {"type": "number", "maximum": 366 * 86400}  # a year at most


def nullable(schema: Schema) -> Schema:
    """`schema` or null."""
    return {**schema, "type": [schema["type"], "null"]}


def closed(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """An object with these properties only (all required unless `required` says which)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def array(schema: Schema) -> Schema:
    return {"type": "array", "items": schema}


# -- schemas -------------------------------------------------------------------------

WORKFLOW_STATUS = ["running", "paused", "queued", "completed", "failed", "cancelled"]
RUN_TRIGGERS = ["manual", "api", "execute", "webhook", "schedule", "call"]
VERSION_NUMBER: Schema = {"type": "integer", "minimum": 1, "maximum": (1 << 31) - 1}
SUMMARY: dict[str, Schema] = {
    "id": ID,
    "name": STRING,
    "status": {
        "enum": WORKFLOW_STATUS,
        "description": "queued: a run of a saved definition waiting for a slot under its "
        "definition's concurrency (no steps yet)",
    },
    "created_by": nullable(STRING),
    "error": nullable(STRING),
    "created_at": MILLIS,
    "updated_at": MILLIS,
    "completed_at": nullable(MILLIS),
    "cancelled_at": nullable(MILLIS),
    "paused_at": nullable(MILLIS),
    "definition_id": {**nullable(ID), "description": "the saved definition it is a run of"},
    "definition_version": {**nullable(VERSION_NUMBER), "description": "the version it runs"},
    "trigger": {
        "enum": [*RUN_TRIGGERS, None],
        "description": "how a run of a saved definition started; null for a one-off workflow",
    },
}
PARENT = {
    **nullable(OBJECT),
    "properties": {"workflow_id": ID, "step_id": ID},
    "required": ["workflow_id", "step_id"],
    "additionalProperties": False,
    "description": "the workflow and call step that started it (a child of a call state)",
}
STEP = closed(
    {
        "id": ID,
        "name": STRING,
        "state": STRING,
        "kind": {"enum": ["tool", "gate", "parallel", "map", "wait", "call"]},
        "tool": {
            **nullable(STRING),
            "description": "null for a gate, parallel, map, wait or call",
        },
        "parent_id": {**nullable(ID), "description": "the parallel or map step it runs in"},
        "child_id": {
            **nullable(ID),
            "description": "a call step: the child workflow its latest attempt started",
        },
        "scope": {
            **nullable(array({"type": ["string", "integer"]})),
            "description": "the path of its flow: (parallel or map state, branch name or item "
            "index) pairs; null at the top level",
        },
        "status": {"enum": ["pending", "running", "done", "failed", "cancelled"]},
        "awaiting": {
            "enum": ["ready", "decision", "branches", "timer", "signal", "child", None],
            "description": "'ready': a gate waits for .../ready; 'decision': a non-idempotent "
            "tool was interrupted by a stop or crash and waits for .../retry or .../fail; "
            "'branches': a parallel or map step waits for its branches; 'timer' and 'signal': "
            "a wait state; 'child': a call step waits for its child workflow",
        },
        "attempt": {"type": "integer", "minimum": 0},
        "result_json": {**nullable(STRING), "description": "the result, JSON-encoded"},
        "error": nullable(STRING),
        "decided_by": {**nullable(STRING), "description": "who approved, rejected or decided"},
        "decided_at": nullable(MILLIS),
        "reason": {**nullable(STRING), "description": "why a gate was rejected"},
        "run_at": MILLIS,
        "expires_at": nullable(MILLIS),
        "created_at": MILLIS,
        "started_at": nullable(MILLIS),
        "completed_at": nullable(MILLIS),
    }
)
SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": STRING,
            "error_code": {
                "enum": [
                    "WORKFLOW_NOT_FOUND",
                    "VALIDATION_ERROR",
                    "EXECUTION_FAILED",
                    "EXECUTION_TIMEOUT",
                ],
                "description": "/api/workflows (plural) only: WORKFLOW_NOT_FOUND (404, no such "
                "definition), VALIDATION_ERROR (422, the input does not match the definition's "
                "input_schema), EXECUTION_FAILED (500) and EXECUTION_TIMEOUT (504) from execute",
            },
            "errors": {**STRINGS, "description": "every problem, one by one (422)"},
            "run_id": {**ID, "description": "execute: the run that failed or goes on"},
        },
        "required": ["error"],
        "additionalProperties": False,
    },
    # The flow format and the create body: the schema /api/schema/flow serves.
    **flowschema.definitions("#/components/schemas/"),
    "Created": closed({"id": ID, "status": {"const": "started"}}),
    "WorkflowSummary": closed(SUMMARY),
    "Workflow": closed(
        {
            **SUMMARY,
            "input": OBJECT,
            "output": {"description": "the result of the state that ended it (completed)"},
            "flow": OBJECT,
            "dag": {
                **nullable(array(ref("DagStep"))),
                "description": "the submitted DAG steps, if any",
            },
            "schedule": {
                "anyOf": [
                    closed(
                        {
                            "schedule_id": ID,
                            "fire_time": {
                                "type": "string",
                                "format": "date-time",
                                "description": "ISO 8601 UTC",
                            },
                        }
                    ),
                    {"type": "null"},
                ],
                "description": "a run a schedule started: the schedule and the fire time",
            },
            "parent": PARENT,
            "steps": array(STEP),
        }
    ),
    "Validation": closed({"valid": BOOL, "errors": STRINGS, "warnings": STRINGS}),
    "Tool": closed(
        {
            "name": STRING,
            "description": STRING,
            "async": BOOL,
            "idempotent": BOOL,
            "accepts_any_args": BOOL,
            "parameters": array(
                closed(
                    {"name": STRING, "required": BOOL, "type": nullable(STRING), "default": {}},
                    required=["name", "required", "type"],
                )
            ),
        }
    ),
    "Health": closed({"status": {"enum": ["ok", "degraded"]}}),
    "Approval": closed(
        {
            "step_id": ID,
            "workflow_id": ID,
            "workflow_name": STRING,
            "state": STRING,
            "name": STRING,
            "awaiting": {"enum": ["ready", "decision"]},
            "reason": {**nullable(STRING), "description": "why an interrupted step waits"},
            "created_by": nullable(STRING),
            "input": {**nullable(OBJECT), "description": "null when over 16 KiB (see input_bytes)"},
            "input_bytes": {"type": "integer", "description": "the input's size as JSON"},
            "previous_result_json": {
                **nullable(STRING),
                "description": "null when there is none or it is over 16 KiB",
            },
            "previous_result_bytes": nullable({"type": "integer"}),
            "approvers": nullable(array(STRING)),
            "waiting_since": nullable(MILLIS),
            "expires_at": nullable(MILLIS),
            "parent": {
                "anyOf": [closed({"workflow_id": ID, "step_id": ID}), {"type": "null"}],
                "description": "in a child workflow of a call state: its parent workflow and "
                "the call step",
            },
        }
    ),
}

# -- operations ----------------------------------------------------------------------

ERRORS = {
    400: "Malformed JSON, a body that is not an object or lacks a required field, JSON "
    "nested too deep, an integer beyond 64 bits, a NUL character, a bad query or header",
    401: "Missing or invalid bearer token",
    403: "The token lacks the permission the route needs",
    404: "No such workflow, step, saved definition (error_code WORKFLOW_NOT_FOUND), version, "
    "run or schedule (or no such route)",
    409: "The workflow, step or definition is not in a state that allows this (a paused or "
    "archived definition starts no runs), the name is taken, or the definition has "
    "100 schedules already",
    410: "The webhook is not armed: its single call was used or its window closed",
    413: "The body is larger than max_body_bytes (or what it would store is larger than "
    "max_workflow_bytes)",
    415: "Content-Type is not application/json",
    422: "The workflow or definition is invalid; `error` lists every problem, '; '-separated, "
    "and `errors` (when present) one by one; a run's input that does not match the "
    "definition's input_schema has error_code VALIDATION_ERROR",
    503: "Storage unavailable (the database is locked or failing); try again later",
}
AUTH = (401, 403)
LIMIT = {"type": "integer", "minimum": 1, "maximum": 1000}
BODY = (400, 413, 415)


def ok(description: str, schema: Schema, **headers: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": json_of(schema)}
    if headers:
        out["headers"] = {name: {"schema": s} for name, s in headers.items()}
    return out


def json_of(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def op(
    op_id: str, summary: str, ok_: dict[str, Any], codes: tuple[int, ...], **extra: Any
) -> Schema:
    """An operation: its success responses (by status) and the errors it can answer."""
    errors = {str(c): {"$ref": f"#/components/responses/E{c}"} for c in sorted(codes)}
    return {"operationId": op_id, "summary": summary, "responses": {**ok_, **errors}, **extra}


def body(schema: Schema, description: str, *, required: bool = True) -> dict[str, Any]:
    content = json_of(schema)
    return {"requestBody": {"required": required, "description": description, "content": content}}


def path_id(name: str, what: str) -> dict[str, Any]:
    param = {"name": name, "in": "path", "required": True, "description": what, "schema": ID}
    return {"parameters": [param]}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


def flag(name: str, description: str) -> dict[str, Any]:
    """The answer of an action: 200 `{name: true}`."""
    return {"200": ok(description, closed({name: {"const": True}}))}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": "A repeat with the same body answers with the first id; with another body, 409",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}
STREAM = {
    "description": "text/event-stream: `id:` the event id, `event:` its type, `data:` "
    '{"id", "workflow_id", "step_id", "type", "at", "data"}',
    "content": {"text/event-stream": {"schema": STRING}},
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "description": "Resume after this event id (or pass ?after=)",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}
DECISION_KEY = {
    **IDEMPOTENCY_KEY,
    "description": "A repeat of the same decision answers as the first time; another, 409",
}
REPLAYED = {"type": "string", "enum": ["true"], "description": "sent when replayed"}
METRICS = {
    "description": "Prometheus text format (version 0.0.4, or 1.0.0 when the Accept header "
    "asks for it), or OpenMetrics when the Accept header asks for application/openmetrics-text",
    "content": {
        "text/plain": {"schema": STRING},
        "application/openmetrics-text": {"schema": STRING},
    },
}
DECIDE = "a step whose non-idempotent tool was interrupted (awaiting 'decision')"
WAIT = query(
    "wait",
    {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
    "Seconds to wait for the workflow to end (or wait for the world) before answering it",
)

PATHS: dict[str, Any] = {
    "/api/workflow": {
        "post": op(
            "createWorkflow",
            "Create and start a workflow",
            {
                "201": ok(
                    "Created (or replayed)", ref("Created"), **{"Idempotent-Replayed": REPLAYED}
                ),
                "200": ok(
                    "With ?wait: it ended (completed, failed or cancelled) within the wait",
                    ref("Workflow"),
                    **{"Idempotent-Replayed": REPLAYED},
                ),
                "202": ok(
                    "With ?wait: still running at the deadline, or every open step waits for "
                    "a person, a signal or a timer",
                    ref("Workflow"),
                    **{"Idempotent-Replayed": REPLAYED},
                ),
            },
            (*BODY, *AUTH, 409, 422, 503),
            parameters=[IDEMPOTENCY_KEY, WAIT],
            **body(ref("Submission"), "The workflow"),
        ),
        "get": op(
            "listWorkflows",
            "Workflows, newest first",
            {"200": ok("Summaries", array(ref("WorkflowSummary")))},
            (400, *AUTH, 503),
            parameters=[
                query("limit", {**LIMIT, "default": 50}, "How many"),
                query("status", {"enum": WORKFLOW_STATUS}, "Only workflows with this status"),
                query("before", {**ID, "maximum": 1 << 62}, "Only ids below this (paging cursor)"),
            ],
        ),
    },
    "/api/workflow/validate": {
        "post": op(
            "validateWorkflow",
            "Check a workflow without creating it",
            {"200": ok("Every problem found", ref("Validation"))},
            (*BODY, *AUTH),
            **body(ref("Submission"), "The workflow, as for create"),
        )
    },
    "/api/workflow/{id}": {
        **path_id("id", "The workflow's id"),
        "get": op(
            "getWorkflow",
            "A workflow with its steps",
            {"200": ok("The workflow", ref("Workflow"))},
            (*AUTH, 404, 503),
        ),
        "delete": op(
            "cancelWorkflow",
            "Cancel a running workflow",
            flag("cancelled", "Cancelled"),
            (*AUTH, 404, 409, 503),
        ),
    },
    "/api/workflow/{step_id}/ready": {
        **path_id("step_id", "The gate step's id"),
        "post": op(
            "readyStep",
            "Release a waiting gate (awaiting 'ready')",
            flag("queued", "Released; the workflow continues"),
            (*BODY, *AUTH, 404, 409, 503),
            parameters=[DECISION_KEY],
            **body({}, "Optional: any JSON value, the gate's result", required=False),
        ),
    },
    "/api/workflow/{step_id}/reject": {
        **path_id("step_id", "The gate step's id"),
        "post": op(
            "rejectStep",
            "Reject a waiting gate: it fails with the reason; the flow goes to on_error or fails",
            flag("rejected", "Rejected"),
            (*BODY, *AUTH, 404, 409, 503),
            parameters=[DECISION_KEY],
            **body(closed({"reason": {"type": "string", "minLength": 1}}), "Why"),
        ),
    },
    "/api/workflow/{id}/events": {
        **path_id("id", "The workflow's id"),
        "get": op(
            "streamWorkflowEvents",
            "The workflow's events as Server-Sent Events: replayed after Last-Event-ID, then "
            "live; the stream ends after completed, failed or cancelled",
            {"200": STREAM},
            (400, *AUTH, 404, 503),
            parameters=[LAST_EVENT_ID],
        ),
    },
    "/api/events": {
        "get": op(
            "streamEvents",
            "Every workflow's events as Server-Sent Events (replay, then live, heartbeats)",
            {"200": STREAM},
            (400, *AUTH, 503),
            parameters=[LAST_EVENT_ID],
        )
    },
    "/api/approvals": {
        "get": op(
            "listApprovals",
            "What waits for a person now (gates, interrupted steps), oldest first",
            {"200": ok("Waiting steps", array(ref("Approval")))},
            (400, *AUTH, 503),
            parameters=[
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 500},
                    "How many, 1 to 500 (default 100)",
                ),
                query("after", ID, "Only steps with a larger id (the last one seen)"),
            ],
        )
    },
    "/api/workflow/{step_id}/retry": {
        **path_id("step_id", "The step's id"),
        "post": op(
            "retryStep",
            f"Run again {DECIDE}",
            flag("queued", "Queued again"),
            (*AUTH, 404, 409, 503),
        ),
    },
    "/api/workflow/{step_id}/fail": {
        **path_id("step_id", "The step's id"),
        "post": op(
            "failStep",
            f"Fail {DECIDE}",
            flag("failed", "Failed; the flow goes on at on_error, or the workflow fails"),
            (*BODY, *AUTH, 404, 409, 503),
            **body(closed({"reason": STRING}, required=[]), "Optional: why", required=False),
        ),
    },
    "/api/workflow/{id}/pause": {
        **path_id("id", "The workflow's id"),
        "post": op(
            "pauseWorkflow",
            "Pause a running workflow: nothing new starts; running tools finish",
            {"200": ok("Paused", closed({"id": ID, "status": {"const": "paused"}}))},
            (*BODY, *AUTH, 404, 409, 503),
            **body(closed({"reason": STRING}, required=[]), "Optional: why", required=False),
        ),
    },
    "/api/workflow/{id}/resume": {
        **path_id("id", "The workflow's id"),
        "post": op(
            "resumeWorkflow",
            "Resume a paused workflow, or redrive a failed or cancelled one (at the state that "
            "failed or at from_step; only failed branches or items of a parallel or map)",
            {
                "200": ok(
                    "Running", closed({"id": ID, "status": {"const": "running"}, "redriven": BOOL})
                )
            },  # fmt: skip
            (*BODY, *AUTH, 404, 409, 422, 503),
            **body(
                closed({"reason": STRING, "from_step": STRING}, required=[]),
                "Optional: why, and a top-level state to carry on at",
                required=False,
            ),
        ),
    },
    "/api/workflow/{id}/intervene": {
        **path_id("id", "The workflow's id"),
        "post": op(
            "interveneWorkflow",
            "Merge-patch (RFC 7386) the input of a paused workflow or one waiting at a gate",
            {"200": ok("The new input", closed({"id": ID, "input": OBJECT}))},
            (*BODY, *AUTH, 404, 409, 503),
            **body(
                closed({"input": OBJECT, "reason": STRING}, required=["input"]),
                "The patch, and why",
            ),
        ),
    },
    "/api/workflow/{id}/signal": {
        **path_id("id", "The workflow's id"),
        "post": op(
            "signalWorkflow",
            "Send a signal: the oldest wait for it takes it, or it is kept for a later one",
            {"202": ok("Accepted", closed({"accepted": {"const": True}}))},
            (*BODY, *AUTH, 404, 409, 503),
            **body(
                closed(
                    {"name": {"type": "string", "minLength": 1, "maxLength": 200}, "data": {}},
                    required=["name"],
                ),
                "The signal",
            ),
        ),
    },
    "/api/tools": {
        "get": op(
            "listTools", "Registered tools", {"200": ok("Tools by name", array(ref("Tool")))}, AUTH
        )
    },
    "/api/schema/flow": {
        "get": op(
            "getFlowSchema",
            "The flow format as JSON Schema 2020-12 (the root is a flow; $defs/Submission is "
            "the body of POST /api/workflow)",
            {"200": ok("JSON Schema 2020-12", OBJECT)},
            AUTH,
        )
    },
    "/openapi.json": {
        "get": op("getOpenAPI", "This document", {"200": ok("OpenAPI 3.1", OBJECT)}, AUTH)
    },
    "/metrics": {
        "get": op(
            "getMetrics",
            "Prometheus metrics: steps started and finished by tool, step durations, queue "
            "depth, waiting gates, claim lag, commit latency and batch size, workflows. Needs "
            "a token (any valid one), unless the config says [metrics] auth = false",
            {"200": METRICS},
            (*AUTH, 503),
        )
    },
    "/healthz": {
        "get": op(
            "healthz",
            "Liveness (no auth)",
            {
                "200": ok("The executor is polling", ref("Health")),
                "503": ok("Degraded: the executor has not completed a pass lately", ref("Health")),
            },
            (),
            security=[],
        )
    },
}


# -- saved definitions (/api/workflows, plural) and inbound webhooks (/hooks) --------------
# Times here are ISO 8601 UTC strings, not epoch milliseconds.

ISO: Schema = {"type": "string", "format": "date-time", "description": "ISO 8601 UTC"}
DEFINITION_STATUS = ["draft", "active", "paused", "archived"]
TRIGGER_TYPES = ["manual", "webhook", "schedule", "api"]
RUN_STATUS = ["queued", "running", "paused", "completed", "failed", "cancelled"]
RESERVED_NAMES = ["templates", "export", "import", "validate", "runs", "schedules", "recurring"]
TAGS: Schema = {
    "type": "array",
    "maxItems": 50,
    "items": {"type": "string", "minLength": 1, "maxLength": 100},
}
WEBHOOK_MODE: Schema = {
    "enum": ["single", "persistent"],
    "description": "single (default): each call needs an arm; persistent: calls are accepted "
    "whenever the definition is deployed",
}
PAGE_LIMIT = {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}
OFFSET = {"type": "integer", "minimum": 0, "maximum": 1 << 31, "default": 0}
DEFINITION_SUMMARY: dict[str, Schema] = {
    "id": ID,
    "name": STRING,
    "version": {**VERSION_NUMBER, "description": "the latest version"},
    "status": {"enum": DEFINITION_STATUS},
    "trigger_type": {"enum": TRIGGER_TYPES},
    "tags": STRINGS,
    "description": nullable(STRING),
    "concurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
    "deployed": {**BOOL, "description": "whether it has a webhook"},
    "created_by": nullable(STRING),
    "created_at": ISO,
    "updated_at": ISO,
}
DEFINITION: dict[str, Schema] = {
    **DEFINITION_SUMMARY,
    "definition": {**OBJECT, "description": "the latest version's body (a DefinitionBody)"},
    "flow": {**OBJECT, "description": "the latest version compiled (states keyed by id)"},
    "webhook": ref("DefinitionWebhook"),
}
VERSION: dict[str, Schema] = {
    "version": VERSION_NUMBER,
    "change_summary": nullable(STRING),
    "created_at": ISO,
    "created_by": nullable(STRING),
}
RUN_SUMMARY: dict[str, Schema] = {
    "id": {**ID, "description": "the run's id: a workflow id (GET /api/workflow/{id})"},
    "workflow_id": {**nullable(ID), "description": "the definition's id"},
    "workflow_name": {**nullable(STRING), "description": "the definition's name"},
    "version": {**nullable(VERSION_NUMBER), "description": "the definition version it runs"},
    "status": {"enum": RUN_STATUS},
    "trigger": {"enum": [*RUN_TRIGGERS, None]},
    "started_at": ISO,
    "completed_at": nullable(ISO),
    "duration_seconds": {**nullable({"type": "number", "minimum": 0})},
    "error": {**nullable(STRING), "description": "why it failed"},
}
DEFINITION_SCHEMAS: dict[str, Schema] = {
    "DefinitionBody": {
        "description": "A definition: a name, a flow (or DAG steps) and how it runs",
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "pattern": r"^[^/\s](?:[^/]*[^/\s])?$",
                "not": {"anyOf": [{"pattern": "^[0-9]+$"}, {"enum": RESERVED_NAMES}]},
                "description": "unique; no '/', no spaces around it, not all digits (that is "
                "an id), not one of " + ", ".join(RESERVED_NAMES) + " (in any case)",
            },
            "flow": ref("Flow"),
            "steps": {"type": "array", "minItems": 1, "items": ref("DagStep")},
            "description": {**nullable({"type": "string", "maxLength": 10_000})},
            "input_schema": {
                "type": ["object", "boolean", "null"],
                "description": "a JSON Schema 2020-12 a run's input must match (422 with every "
                "problem, error_code VALIDATION_ERROR)",
            },
            "concurrency": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 10,
                "description": "runs at once; more wait as queued, oldest first",
            },
            "tags": TAGS,
            "webhook": nullable(closed({"mode": WEBHOOK_MODE}, required=[])),
            "notify_url": SCHEMAS["Submission"]["properties"]["notify_url"],
        },
        "required": ["name"],
        "additionalProperties": False,
        "oneOf": [{"required": ["flow"]}, {"required": ["steps"]}],
    },
    "DefinitionSummary": closed(DEFINITION_SUMMARY),
    "Definition": closed(DEFINITION),
    "DefinitionChange": closed(
        {
            **DEFINITION,
            "changed": {
                **BOOL,
                "description": "false: the content equals the latest version's; no version made",
            },
            "warnings": STRINGS,
        }
    ),
    "DefinitionCreated": closed({"id": ID, "workflow": ref("Definition"), "warnings": STRINGS}),
    "DefinitionWebhook": closed(
        {
            "mode": WEBHOOK_MODE,
            "deployed": BOOL,
            "armed_until": {**nullable(ISO), "description": "while armed (mode single)"},
            "url": {**STRING, "description": "/hooks/{webhook_id}"},
            "webhook_id": STRING,
            "webhook_secret": {**STRING, "description": "the HMAC-SHA256 key of its calls"},
        },
        required=["mode", "deployed", "armed_until"],
    )
    | {
        "description": "url, webhook_id and webhook_secret: only when deployed, and only for "
        "tokens with the workflow permission"
    },
    "Version": closed(VERSION),
    "VersionDetail": closed(
        {
            "id": ID,
            "name": STRING,
            **VERSION,
            "definition": {**OBJECT, "description": "the version's body (a DefinitionBody)"},
            "flow": {**OBJECT, "description": "the version compiled"},
        }
    ),
    "Diff": closed(
        {
            "diff": {
                **array(
                    {
                        "type": "object",
                        "properties": {
                            "op": {"enum": ["add", "remove", "replace", "move", "copy", "test"]},
                            "path": STRING,
                            "from": STRING,
                            "value": {},
                        },
                        "required": ["op", "path"],
                    }
                ),
                "description": "RFC 6902 operations from the v1 body to the v2 body",
            },
            "summary": {**STRING, "description": 'e.g. "Added 1 step, modified 1 step"'},
            "v1": VERSION_NUMBER,
            "v2": VERSION_NUMBER,
        }
    ),
    "RunSummary": closed(RUN_SUMMARY),
    "Run": closed(
        {
            **RUN_SUMMARY,
            "input_data": OBJECT,
            "output": {"description": "the result of the state that ended it (completed)"},
            "error": nullable(STRING),
            "parent": PARENT,
            "step_runs": array(ref("StepRun")),
        }
    ),
    "StepRun": closed(
        {
            "step_id": {**STRING, "description": "the state's name"},
            "id": {**ID, "description": "the step's id (POST /api/workflow/{id}/ready ...)"},
            "kind": STEP["properties"]["kind"],
            "status": {
                "enum": ["pending", "running", "waiting", "completed", "failed", "cancelled"],
                "description": "waiting: for a person, a signal or a timer",
            },
            "output": {"description": "its result (completed), else null"},
            "error": nullable(STRING),
            "started_at": nullable(ISO),
            "completed_at": nullable(ISO),
            "duration_seconds": nullable({"type": "number", "minimum": 0}),
            "child_id": {**nullable(ID), "description": "a call step: its child run"},
        }
    ),
    "Export": closed(
        {
            "stepd_export": {"const": 1},
            "exported_at": ISO,
            "workflows": array(ref("ExportedDefinition")),
        }
    ),
    "ExportedDefinition": closed(
        {
            "name": STRING,
            "status": {"enum": DEFINITION_STATUS},
            "trigger_type": {"enum": TRIGGER_TYPES},
            "tags": STRINGS,
            "description": nullable(STRING),
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
            "deployed": BOOL,
            "versions": {**array(ref("ExportedVersion")), "description": "oldest first"},
            "schedules": array(OBJECT),
            "triggers": closed({"webhook": closed({"mode": WEBHOOK_MODE})}),
        }
    )
    | {"description": "never a webhook id or secret"},
    "ExportedVersion": closed(
        {**VERSION, "definition": {**OBJECT, "description": "the body (a DefinitionBody)"}}
    ),
    "ImportDocument": {
        "description": "An export (GET /api/workflows/export), or one exported definition",
        "type": "object",
        "properties": {
            "stepd_export": {"const": 1},
            "exported_at": {},
            "workflows": {
                "type": "array",
                "maxItems": 1000,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": STRING,
                        "status": {"enum": DEFINITION_STATUS, "default": "active"},
                        "trigger_type": {"enum": TRIGGER_TYPES, "default": "manual"},
                        "versions": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "definition": ref("DefinitionBody"),
                                    "change_summary": nullable(
                                        {"type": "string", "maxLength": 1000}
                                    ),
                                },
                                "required": ["definition"],
                            },
                            "description": "oldest first; each definition's name is `name`",
                        },
                    },
                    "required": ["name", "versions"],
                },
            },
        },
        "required": ["workflows"],
    },
    "ImportResult": closed(
        {
            "created": STRINGS,
            "updated": STRINGS,
            "skipped": array(closed({"name": STRING, "reason": STRING})),
        }
    ),
}
SCHEMAS.update(DEFINITION_SCHEMAS)

REF_PARAM = {
    "name": "ref",
    "in": "path",
    "required": True,
    "description": "The definition's id (all digits) or its name",
    "schema": {"type": "string", "minLength": 1},
}
WRITE = (*BODY, *AUTH, 404, 409, 422, 503)  # a body and a definition


def on_definition() -> dict[str, Any]:
    return {"parameters": [REF_PARAM]}


def path_version() -> dict[str, Any]:
    return {
        "name": "version",
        "in": "path",
        "required": True,
        "description": "A version number",
        "schema": VERSION_NUMBER,
    }


def version_query(name: str) -> dict[str, Any]:
    return {**query(name, VERSION_NUMBER, f"Version {name[1]}"), "required": True}


def action(description: str, schema: Schema) -> dict[str, Any]:
    return {"200": ok(description, schema)}


def on_run() -> dict[str, Any]:
    return path_id("run_id", "The run's id (a workflow id)")


HOOK_SECURITY = [{"hookTimestamp": [], "hookSignature": []}]
HOOK_SCHEMES = {
    "hookTimestamp": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Stepd-Timestamp",
        "description": "/hooks only: the call's time in Unix seconds, within 300 s of the "
        "daemon's clock",
    },
    "hookSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Stepd-Signature",
        "description": "/hooks only: v1=<hex HMAC-SHA256 of '<X-Stepd-Timestamp>.<raw body>' "
        "keyed with the definition's webhook_secret>",
    },
}
RUN_INPUT = closed(
    {
        "input_data": {**nullable(OBJECT), "description": "the run's input (default {})"},
        "input": {**nullable(OBJECT), "description": "an alias of input_data"},
        "trigger": {"enum": ["manual", "api"], "default": "manual"},
        "version": {**VERSION_NUMBER, "description": "default: the latest"},
    },
    required=[],
)

DEFINITION_PATHS: dict[str, Any] = {
    "/api/workflows": {
        "get": op(
            "listDefinitions",
            "Saved definitions, newest first",
            {
                "200": ok(
                    "A page of summaries, and how many match",
                    closed(
                        {
                            "workflows": array(ref("DefinitionSummary")),
                            "total": {"type": "integer", "minimum": 0},
                        }
                    ),
                )
            },
            (400, *AUTH, 503),
            parameters=[
                query("status", {"enum": DEFINITION_STATUS}, "Only definitions with this status"),
                query("tag", {"type": "string", "maxLength": 200}, "Only those with this tag"),
                query(
                    "trigger_type",
                    {"enum": TRIGGER_TYPES},
                    "Only those with this trigger type",
                ),
                query("limit", PAGE_LIMIT, "How many, 1 to 200"),
                query("offset", OFFSET, "How many to skip"),
            ],
        ),
        "post": op(
            "createDefinition",
            "Save a definition as version 1",
            {"201": ok("Saved", ref("DefinitionCreated"))},
            (*BODY, *AUTH, 409, 422, 503),
            **body(
                closed(
                    {
                        "definition": ref("DefinitionBody"),
                        "trigger_type": {"enum": TRIGGER_TYPES, "default": "manual"},
                        "tags": {**TAGS, "description": "the definition's tags, unless it has"},
                        "status": {"enum": DEFINITION_STATUS, "default": "active"},
                    },
                    required=["definition"],
                ),
                "The definition; 409 when its name is taken",
            ),
        ),
    },
    "/api/workflows/validate": {
        "post": op(
            "validateDefinition",
            "Check a definition without saving it",
            {"200": ok("Every problem found", ref("Validation"))},
            (*BODY, *AUTH, 503),
            **body(
                {
                    "anyOf": [
                        closed({"definition": ref("DefinitionBody")}),
                        ref("DefinitionBody"),
                    ]
                },
                '{"definition": {...}}, or the definition itself',
            ),
        )
    },
    "/api/workflows/export": {
        "get": op(
            "exportDefinitions",
            "Every definition with all its versions and triggers (never a webhook secret)",
            {"200": ok("An export", ref("Export"))},
            (*AUTH, 503),
        )
    },
    "/api/workflows/import": {
        "post": op(
            "importDefinitions",
            "Import an export: everything is checked before anything is written (any problem: "
            "422 listing all, nothing imported)",
            {"200": ok("What was created, updated and skipped, and why", ref("ImportResult"))},
            (*BODY, *AUTH, 422, 503),
            parameters=[
                query(
                    "mode",
                    {"enum": ["create", "upsert"], "default": "create"},
                    "create: skip names that exist; upsert: add the export's latest version "
                    "to an existing definition when its content differs",
                )
            ],
            **body(ref("ImportDocument"), "An export document"),
        )
    },
    "/api/workflows/runs/{run_id}": {
        **on_run(),
        "get": op(
            "getRun",
            "A run with its step runs",
            {"200": ok("The run", closed({"run": ref("Run")}))},
            (*AUTH, 404, 503),
        ),
        "delete": op(
            "deleteRun",
            "Delete a run that ended (409 while it runs)",
            {"204": {"description": "Deleted"}},
            (*AUTH, 404, 409, 503),
        ),
    },
    "/api/workflows/runs/{run_id}/cancel": {
        **on_run(),
        "post": op(
            "cancelRun",
            "Cancel a run (a queued one too)",
            action(
                "Cancelled",
                closed({"run_id": ID, "status": {"const": "cancelled"}}),
            ),
            (*AUTH, 404, 409, 503),
        ),
    },
    "/api/workflows/runs/{run_id}/resume": {
        **on_run(),
        "post": op(
            "resumeRun",
            "Resume a paused run, or redrive a failed or cancelled one (its pinned version)",
            action(
                "Running",
                closed({"run_id": ID, "status": {"const": "running"}, "redriven": BOOL}),
            ),
            (*BODY, *AUTH, 404, 409, 422, 503),
            **body(
                closed({"from_step": STRING, "reason": STRING}, required=[]),
                "Optional: a top-level state to carry on at, and why",
                required=False,
            ),
        ),
    },
    "/api/workflows/{ref}": {
        **on_definition(),
        "get": op(
            "getDefinition",
            "A definition with its latest version",
            {"200": ok("The definition", ref("Definition"))},
            (*AUTH, 404, 503),
        ),
        "put": op(
            "updateDefinition",
            "Save a new version (none when the content equals the latest version's)",
            {"200": ok("The definition", ref("DefinitionChange"))},
            (*BODY, *AUTH, 404, 409, 422, 503),
            **body(
                closed(
                    {
                        "definition": ref("DefinitionBody"),
                        "change_summary": {**nullable({"type": "string", "maxLength": 1000})},
                    },
                    required=["definition"],
                ),
                "The new content; 409 when a renamed definition takes a name in use",
            ),
        ),
        "delete": op(
            "deleteDefinition",
            "Delete a definition and its versions; 409 while runs have not ended, unless "
            "?force=true (which cancels them)",
            {"204": {"description": "Deleted"}},
            (400, *AUTH, 404, 409, 503),
            parameters=[
                query(
                    "force",
                    {"enum": ["true", "false", "1", "0"], "default": "false"},
                    "Cancel the runs that have not ended",
                )
            ],
        ),
    },
    "/api/workflows/{ref}/status": {
        **on_definition(),
        "patch": op(
            "setDefinitionStatus",
            "Set the status: paused and archived definitions start no runs",
            {"200": ok("The definition", ref("Definition"))},
            (*BODY, *AUTH, 404, 503),
            **body(closed({"status": {"enum": DEFINITION_STATUS}}), "The status"),
        ),
    },
    "/api/workflows/{ref}/versions": {
        **on_definition(),
        "get": op(
            "listVersions",
            "Versions, newest first",
            {
                "200": ok(
                    "A page of versions, and how many there are",
                    closed(
                        {
                            "versions": array(ref("Version")),
                            "total": {"type": "integer", "minimum": 0},
                        }
                    ),
                )
            },
            (400, *AUTH, 404, 503),
            parameters=[
                query("limit", PAGE_LIMIT, "How many, 1 to 200"),
                query("offset", OFFSET, "How many to skip"),
            ],
        ),
    },
    "/api/workflows/{ref}/versions/{version}": {
        "parameters": [REF_PARAM, path_version()],
        "get": op(
            "getVersion",
            "One version's body and compiled flow",
            {"200": ok("The version", ref("VersionDetail"))},
            (400, *AUTH, 404, 503),
        ),
    },
    "/api/workflows/{ref}/diff": {
        **on_definition(),
        "get": op(
            "diffVersions",
            "What changed from v1 to v2",
            {"200": ok("RFC 6902 operations and a summary", ref("Diff"))},
            (400, *AUTH, 404, 503),
            parameters=[version_query("v1"), version_query("v2")],
        ),
    },
    "/api/workflows/{ref}/rollback": {
        **on_definition(),
        "post": op(
            "rollbackDefinition",
            "A new version with an earlier version's content ('Rollback to version n')",
            {"200": ok("The definition", ref("DefinitionChange"))},
            WRITE,
            **body(closed({"version": VERSION_NUMBER}), "The version to go back to"),
        ),
    },
    "/api/workflows/{ref}/run": {
        **on_definition(),
        "post": op(
            "runDefinition",
            "Start a run of a version (default: the latest); over the definition's "
            "concurrency it waits as queued",
            {"202": ok("Started or queued", closed({"run_id": ID}))},
            WRITE,
            **body(RUN_INPUT, "Optional: the input, trigger and version", required=False),
        ),
    },
    "/api/workflows/{ref}/runs": {
        **on_definition(),
        "get": op(
            "listRuns",
            "A definition's runs, newest first",
            {
                "200": ok(
                    "A page of runs, and how many match",
                    closed(
                        {
                            "runs": array(ref("RunSummary")),
                            "total": {"type": "integer", "minimum": 0},
                        }
                    ),
                )
            },
            (400, *AUTH, 404, 503),
            parameters=[
                query("status", {"enum": RUN_STATUS}, "Only runs with this status"),
                query("limit", PAGE_LIMIT, "How many, 1 to 200"),
                query("offset", OFFSET, "How many to skip"),
            ],
        ),
    },
    "/api/workflows/{ref}/deploy": {
        **on_definition(),
        "post": op(
            "deployDefinition",
            "Give the definition a webhook (a new id and secret each time)",
            action(
                "Deployed",
                closed(
                    {
                        "ok": {"const": True},
                        "webhook_id": STRING,
                        "webhook_secret": STRING,
                        "url": {**STRING, "description": "/hooks/{webhook_id}"},
                        "mode": WEBHOOK_MODE,
                    }
                ),
            ),
            (*AUTH, 404, 503),
        ),
    },
    "/api/workflows/{ref}/undeploy": {
        **on_definition(),
        "post": op(
            "undeployDefinition",
            "Remove the definition's webhook",
            action("Undeployed", closed({"ok": {"const": True}})),
            (*AUTH, 404, 503),
        ),
    },
    "/api/workflows/{ref}/arm": {
        **on_definition(),
        "post": op(
            "armDefinition",
            "Open the webhook for exactly one call in the next 10 minutes (409 when not "
            "deployed, or persistent)",
            action("Armed", closed({"ok": {"const": True}, "armed_until": ISO})),
            (*AUTH, 404, 409, 503),
        ),
    },
    "/api/workflows/{ref}/export": {
        **on_definition(),
        "get": op(
            "exportDefinition",
            "One definition with all its versions and triggers (never a webhook secret)",
            {"200": ok("An export", ref("Export"))},
            (*AUTH, 404, 503),
        ),
    },
    "/hooks/{webhook_id}": {
        "parameters": [
            {
                "name": "webhook_id",
                "in": "path",
                "required": True,
                "description": "The deployed definition's webhook_id",
                "schema": {"type": "string", "minLength": 1},
            }
        ],
        "post": op(
            "callHook",
            "An inbound webhook call, signed with the definition's webhook secret (no bearer "
            "token): starts a run whose input is the body",
            {
                "202": ok(
                    "Started (or replayed)",
                    closed({"run_id": ID}),
                    **{"Idempotent-Replayed": REPLAYED},
                )
            },
            (400, 401, 404, 409, 410, 413, 422, 503),
            security=HOOK_SECURITY,
            parameters=[
                {
                    **IDEMPOTENCY_KEY,
                    "description": "A repeat with the same key answers with the first run_id; "
                    "the same key with another body is 409",
                }
            ],
            **body(
                {**OBJECT, "description": "the run's input, checked against its input_schema"},
                "Optional: the run's input (raw bytes signed as sent); 401 bad or missing "
                "signature, or a timestamp more than 300 s away; 404 not deployed; 410 not "
                "armed or already used; 409 the definition is paused or archived, or the "
                "Idempotency-Key came with another body",
                required=False,
            ),
        ),
    },
}
# A webhook's 401 is about its signature: no WWW-Authenticate (there is no bearer to send).
DEFINITION_PATHS["/hooks/{webhook_id}"]["post"]["responses"]["401"] = {
    "$ref": "#/components/responses/E401Signature"
}
PATHS.update(DEFINITION_PATHS)


# -- the templates stepd ships (daemon/catalog.py) -----------------------------------------

TEMPLATE_ID = {
    "name": "template_id",
    "in": "path",
    "required": True,
    "description": "The template's id",
    "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
}
TEMPLATE_SUMMARY: dict[str, Schema] = {
    "id": STRING,
    "name": STRING,
    "description": STRING,
    "category": STRING,
    "is_builtin": {"const": True},
    "tags": STRINGS,
}
SCHEMAS.update(
    {
        "TemplateSummary": closed(TEMPLATE_SUMMARY),
        "Template": closed(
            {
                **TEMPLATE_SUMMARY,
                "definition": ref("DefinitionBody"),
                "example_input": OBJECT,
                "notes": STRINGS,
                "suggested_schedule": OBJECT,
            },
            required=list(TEMPLATE_SUMMARY) + ["definition"],
        ),
    }
)
PATHS.update(
    {
        "/api/workflows/templates": {
            "get": op(
                "listTemplates",
                "The workflow templates stepd ships",
                {
                    "200": ok(
                        "A page of templates by id, and how many match",
                        closed(
                            {
                                "templates": array(ref("TemplateSummary")),
                                "total": {"type": "integer", "minimum": 0},
                            }
                        ),
                    )
                },
                (400, *AUTH),
                parameters=[
                    query(
                        "category",
                        {"type": "string", "maxLength": 200},
                        "Only templates of this category",
                    ),
                    query("limit", PAGE_LIMIT, "How many, 1 to 200"),
                    query("offset", OFFSET, "How many to skip"),
                ],
            )
        },
        "/api/workflows/templates/{template_id}": {
            "parameters": [TEMPLATE_ID],
            "get": op(
                "getTemplate",
                "A template with its definition",
                {"200": ok("The template", ref("Template"))},
                (*AUTH, 404),
            ),
        },
        "/api/workflows/templates/{template_id}/install": {
            "parameters": [TEMPLATE_ID],
            "post": op(
                "installTemplate",
                "Save a template as a definition (version 1)",
                {"201": ok("Saved", closed({"workflow_id": ID}))},
                (*BODY, *AUTH, 404, 409, 422, 503),
                **body(
                    closed(
                        {"name": DEFINITION_SCHEMAS["DefinitionBody"]["properties"]["name"]},
                        required=[],
                    ),
                    "Optional: the definition's name (default: the template's); 409 when taken",
                    required=False,
                ),
            ),
        },
    }
)


# -- synchronous execution and run streams of saved definitions (daemon/api_execute.py) --

RUN_ID: Schema = {**ID, "description": "the run's id (a workflow: GET /api/workflow/{run_id})"}
AWAITING: Schema = array(
    closed(
        {
            "step_id": {**ID, "description": "the step's id (for .../ready or .../reject)"},
            "state": STRING,
            "awaiting": {"enum": ["ready", "decision", "signal", "timer"]},
            "workflow_id": {
                **ID,
                "description": "the run's, or a child's of a call state the run waits for",
            },
        }
    )
)
EXECUTE_BODY = body(
    closed(
        {
            "variables": {**OBJECT, "description": "the run's input"},
            "input": {**OBJECT, "description": "the same as variables"},
            "version": {"type": "integer", "minimum": 1, "description": "default: the latest"},
        },
        required=[],
    ),
    "The run's input",
    required=False,
)
EXECUTE_TIMEOUT = query(
    "timeout",
    {"type": "number", "exclusiveMinimum": 0, "maximum": 300, "default": 30},
    "Seconds to wait for the outcome",
)
RUN_STREAM = {
    "description": "text/event-stream: `id:` the log entry it comes from, `event:` "
    "step_started, step_waiting, step_completed, step_failed, run_completed or run_failed "
    "(execute/stream: or run_waiting, or error at its timeout), `data:` JSON",
    "content": {"text/event-stream": {"schema": STRING}},
}
EXECUTION_FAILED = closed(
    {
        "error": STRING,
        "error_code": {"const": "EXECUTION_FAILED"},
        "run_id": RUN_ID,
        "status": {"enum": ["failed", "cancelled"]},
    }
)
EXECUTION_TIMEOUT = closed(
    {"error": STRING, "error_code": {"const": "EXECUTION_TIMEOUT"}, "run_id": RUN_ID}
)
EXECUTE_PATHS: dict[str, Any] = {
    "/api/workflows/{ref}/execute": {
        **on_definition(),
        "post": op(
            "executeDefinition",
            "Run a definition and answer with its outcome",
            {
                "200": ok(
                    "It completed",
                    closed({"run_id": RUN_ID, "status": {"const": "completed"}, "output": {}}),
                ),
                "202": ok(
                    "Every open step waits for a person, a signal or a timer",
                    closed(
                        {"run_id": RUN_ID, "status": {"const": "waiting"}, "awaiting": AWAITING}
                    ),
                ),
                "500": ok("It failed or was cancelled", EXECUTION_FAILED),
                "504": ok("Not finished by the timeout (the run goes on)", EXECUTION_TIMEOUT),
            },
            (*BODY, *AUTH, 404, 409, 422, 503),
            parameters=[EXECUTE_TIMEOUT],
            **EXECUTE_BODY,
        ),
    },
    "/api/workflows/{ref}/execute/stream": {
        **on_definition(),
        "post": op(
            "executeDefinitionStream",
            "Run a definition and stream its events, ending with its outcome",
            {"200": RUN_STREAM},
            (*BODY, *AUTH, 404, 409, 422, 503),
            parameters=[EXECUTE_TIMEOUT],
            **EXECUTE_BODY,
        ),
    },
    "/api/workflows/runs/{run_id}/stream": {
        **path_id("run_id", "The run's id"),
        "get": op(
            "streamRunEvents",
            "A run's events as Server-Sent Events, from its start (or after Last-Event-ID) "
            "until it ends",
            {"200": RUN_STREAM},
            (400, *AUTH, 404, 503),
            parameters=[LAST_EVENT_ID],
        ),
    },
}
PATHS.update(EXECUTE_PATHS)


# -- schedules of saved definitions, and the `recurring` shape (daemon/api_schedules.py) --
# Fire times are ISO 8601 with the UTC offset of the schedule's time zone.

FIRE_TIME: Schema = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 with the UTC offset, in the schedule's time zone",
}
OVERLAP: Schema = {
    "enum": list(OVERLAPS),
    "description": "when a run of the schedule is still going (queued, running, paused or "
    "waiting): skip records the tick skipped; buffer_one holds one tick and skips more; "
    f"buffer_all holds them all (up to {MAX_BUFFERED}); cancel_other cancels it and fires; "
    "allow_all fires",
}
# The settings of a schedule: (schema, default) by name, in the order of the create body.
SCHEDULE_SETTINGS: dict[str, tuple[Schema, Any]] = {
    "cron_expression": (
        {
            "type": "string",
            "minLength": 1,
            "maxLength": cron.MAX_EXPRESSION,
            "description": "five fields (minute hour day-of-month month day-of-week), six "
            "with seconds first, or one of " + ", ".join(cron.MACROS),
        },
        None,
    ),
    "timezone": (
        {
            "type": "string",
            "minLength": 1,
            "description": "an IANA time zone name, such as America/New_York",
        },
        "UTC",
    ),  # fmt: skip
    "input_data": (
        {
            **OBJECT,
            "description": "each run's input, checked against the definition's input_schema",
        },
        {},
    ),  # fmt: skip
    "overlap": (OVERLAP, "skip"),
    "catchup_window": (
        {
            "type": "integer",
            "minimum": 0,
            "maximum": schedules.MAX_CATCHUP_S,
            "description": "seconds: a tick that fell due while no daemon ran fires late "
            "within it, and is recorded missed past it",
        },
        schedules.DEFAULT_CATCHUP_S,
    ),
    "paused": ({**BOOL, "description": "a paused schedule records no ticks"}, False),
}
SETTINGS = {name: schema for name, (schema, _) in SCHEDULE_SETTINGS.items()}
SETTINGS_IN = {  # in a request body: with their defaults
    name: schema if default is None else {**schema, "default": default}
    for name, (schema, default) in SCHEDULE_SETTINGS.items()
}
SCHEDULE: dict[str, Schema] = {
    "schedule_id": ID,
    "workflow_id": {**ID, "description": "the definition's id"},
    "workflow_name": {**STRING, "description": "the definition's name"},
    **SETTINGS,
    "description": {
        **STRING,
        "description": 'the cron expression in words, e.g. "At 09:00 on Monday through Friday"',
    },
    "next_run": {**nullable(FIRE_TIME), "description": "the next fire time; null when paused"},
    "next_runs": {
        **array(FIRE_TIME),
        "maxItems": 5,
        "description": "the next five fire times (also when paused: what it would do once resumed)",
    },
    "last_fired_at": nullable(FIRE_TIME),
    "buffered": {"type": "integer", "minimum": 0, "description": "ticks held by its overlap"},
    "created_by": nullable(STRING),
    "created_at": ISO,
    "updated_at": ISO,
}
TICK: dict[str, Schema] = {
    "id": {
        **INT64,
        "minimum": 0,
        "description": "0 in a backfill's answer for a fire time backfilled before (skipped, "
        "not stored again)",
    },
    "fire_time": FIRE_TIME,
    "kind": {
        "enum": ["cron", "trigger", "backfill"],
        "description": "cron: a fire time of the expression; trigger: a run now; backfill: a "
        "past fire time",
    },
    "outcome": {
        "enum": ["fired", "skipped", "missed", "buffered"],
        "description": "buffered becomes fired (with its run_id) when the held run starts",
    },
    "run_id": {**nullable(ID), "description": "the run it started"},
    "reason": {**nullable(STRING), "description": "why it was skipped, missed or buffered"},
    "recorded_at": ISO,
}
TOTAL: Schema = {"type": "integer", "minimum": 0}
SCHEMAS.update(
    {
        "ScheduleSettings": closed(SETTINGS) | {"description": "a schedule in an export"},
        "Schedule": closed(SCHEDULE),
        "ScheduleDetail": closed(
            {
                **SCHEDULE,
                "ticks": {
                    **array(ref("Tick")),
                    "maxItems": schedules.RECENT_TICKS,
                    "description": f"the {schedules.RECENT_TICKS} most recent ticks, newest first",
                },
            }
        ),
        "ScheduleCreated": closed({"schedule_id": ID, "schedule": ref("Schedule")}),
        "Schedules": closed({"schedules": array(ref("Schedule")), "total": TOTAL}),
        "Tick": closed(TICK),
    }
)
SCHEMAS["ExportedDefinition"]["properties"]["schedules"] = array(ref("ScheduleSettings"))
SID_PARAM = {
    "name": "sid",
    "in": "path",
    "required": True,
    "description": "The schedule's id",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}
SCHEDULE_PAGE = {"type": "integer", "minimum": 1, "maximum": 200, "default": 100}
SCHEDULE_PAGING = [
    query("limit", SCHEDULE_PAGE, "How many, 1 to 200 (default 100)"),
    query("offset", OFFSET, "How many to skip"),
]
CREATE_SCHEDULE = closed(SETTINGS_IN, required=["cron_expression"])
SCHEDULE_WRITE = (*BODY, *AUTH, 404, 409, 422, 503)


def on_schedule() -> dict[str, Any]:
    return {"parameters": [SID_PARAM]}


SCHEDULE_PATHS: dict[str, Any] = {
    "/api/workflows/{ref}/schedules": {
        **on_definition(),
        "get": op(
            "listSchedules",
            "A definition's schedules, oldest first",
            {"200": ok("A page of schedules, and how many there are", ref("Schedules"))},
            (400, *AUTH, 404, 503),
            parameters=SCHEDULE_PAGING,
        ),
        "post": op(
            "createSchedule",
            "Add a schedule: its definition's latest version runs with input_data at each "
            "fire time of the cron expression in the time zone",
            {"201": ok("Created", ref("ScheduleCreated"))},
            SCHEDULE_WRITE,
            **body(
                CREATE_SCHEDULE,
                "The schedule; 422 for an unknown field, a bad cron expression, an unknown "
                "time zone or input_data that does not match the input_schema; 409 when the "
                f"definition has {schedules.MAX_PER_DEFINITION} schedules",
            ),
        ),
    },
    "/api/workflows/schedules/{sid}": {
        **on_schedule(),
        "get": op(
            "getSchedule",
            "A schedule with its next five fire times and its recent ticks",
            {"200": ok("The schedule", ref("ScheduleDetail"))},
            (*AUTH, 404, 503),
        ),
        "patch": op(
            "updateSchedule",
            "Edit, pause or resume a schedule: a new cron expression or time zone, or a "
            "resume, counts the next fire time from now (a paused time never fires)",
            {"200": ok("The schedule", ref("Schedule"))},
            (*BODY, *AUTH, 404, 422, 503),
            **body(closed(SETTINGS, required=[]), "Any of the settings"),
        ),
        "delete": op(
            "deleteSchedule",
            "Delete a schedule and its ticks (its runs stay)",
            flag("deleted", "Deleted"),
            (*AUTH, 404, 503),
        ),
    },
    "/api/workflows/schedules/{sid}/ticks": {
        **on_schedule(),
        "get": op(
            "listScheduleTicks",
            "A schedule's ticks, newest first",
            {
                "200": ok(
                    "A page of ticks, and how many match",
                    closed({"ticks": array(ref("Tick")), "total": TOTAL}),
                )
            },
            (400, *AUTH, 404, 503),
            parameters=[
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    "How many, 1 to 500",
                ),
                query("offset", OFFSET, "How many to skip"),
                query("outcome", TICK["outcome"], "Only ticks with this outcome"),
            ],
        ),
    },
    "/api/workflows/schedules/{sid}/trigger": {
        **on_schedule(),
        "post": op(
            "triggerSchedule",
            "Run now under the schedule's overlap policy (a paused schedule too)",
            {
                "202": ok("Fired or buffered", ref("Triggered")),
                "200": ok("Skipped (the reason says why)", ref("Triggered")),
            },
            (*BODY, *AUTH, 404, 409, 503),
            **body(closed({}), "Optional: {}", required=False),
        ),
    },
    "/api/workflows/schedules/{sid}/backfill": {
        **on_schedule(),
        "post": op(
            "backfillSchedule",
            "One run per fire time t with start <= t <= end, under the overlap policy (a "
            "fire time backfilled before is skipped)",
            {
                "202": ok(
                    "What each fire time did",
                    closed(
                        {
                            "fire_times": {**TOTAL, "maximum": schedules.MAX_BACKFILL},
                            "fired": TOTAL,
                            "buffered": TOTAL,
                            "skipped": TOTAL,
                            "ticks": array(ref("Tick")),
                        }
                    ),
                )
            },
            SCHEDULE_WRITE,
            **body(
                closed(
                    {
                        "start": {
                            **FIRE_TIME,
                            "maxLength": 64,
                            "description": "ISO 8601 with a UTC offset (or Z)",
                        },
                        "end": {
                            **FIRE_TIME,
                            "maxLength": 64,
                            "description": "ISO 8601 with a UTC offset (or Z), after start "
                            "and not in the future",
                        },
                        "overlap": {**OVERLAP, "default": "buffer_all"},
                    },
                    required=["start", "end"],
                ),
                f"The window; 422 when it holds more than {schedules.MAX_BACKFILL} fire times",
            ),
        ),
    },
    "/api/workflows/recurring": {
        "get": op(
            "listRecurring",
            "Every schedule of every definition (local-engine-api.txt's recurring shape)",
            {"200": ok("A page of schedules, and how many there are", ref("Schedules"))},
            (400, *AUTH, 503),
            parameters=SCHEDULE_PAGING,
        ),
        "post": op(
            "createRecurring",
            "Add a schedule to the definition named by workflow (as POST "
            "/api/workflows/{ref}/schedules)",
            {"201": ok("Created", ref("ScheduleCreated"))},
            SCHEDULE_WRITE,
            **body(
                {
                    **closed(
                        {
                            "workflow": {
                                "type": ["string", "integer"],
                                "description": "the definition's id or name",
                            },
                            "workflow_id": {
                                "type": ["string", "integer"],
                                "description": "the same as workflow",
                            },
                            **SETTINGS_IN,
                        },
                        required=["cron_expression"],
                    ),
                    "anyOf": [{"required": ["workflow"]}, {"required": ["workflow_id"]}],
                },
                "The definition and the schedule",
            ),
        ),
    },
    "/api/workflows/recurring/{sid}": {
        **on_schedule(),
        "delete": op(
            "deleteRecurring",
            "Delete a schedule (as DELETE /api/workflows/schedules/{sid})",
            flag("deleted", "Deleted"),
            (*AUTH, 404, 503),
        ),
    },
}
SCHEMAS["Triggered"] = closed(
    {
        "outcome": {"enum": ["fired", "buffered", "skipped"]},
        "run_id": {**nullable(ID), "description": "the run it started (fired)"},
        "reason": nullable(STRING),
        "fire_time": FIRE_TIME,
        "tick_id": ID,
    }
)
PATHS.update(SCHEDULE_PATHS)


def document(tools: Iterable[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route (a fresh copy); with `tools`, flows name
    only those tools (see flowschema.name_tools)."""
    responses = {
        f"E{c}": {"description": text, "content": json_of(ref("Error"))}
        for c, text in ERRORS.items()
    }
    responses["E401Signature"] = {
        "description": "Missing or bad X-Stepd-Signature or X-Stepd-Timestamp",
        "content": json_of(ref("Error")),
    }
    responses["E401"]["headers"] = {
        "WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}
    }
    doc = copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "stepd",
                "version": __version__,
                "description": "A durable workflow executor. Ids are millisecond-epoch integers, "
                'times epoch milliseconds; every error body is {"error": "..."}.',
            },
            "paths": PATHS,
            "components": {
                "schemas": SCHEMAS,
                "responses": responses,
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    **HOOK_SCHEMES,
                },
            },
            "security": [{"bearer": []}],
        }
    )
    if tools is not None:
        flowschema.name_tools(doc["components"]["schemas"], tools)
    return doc
