"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Written by hand; tests/test_openapi.py keeps it true (every served route and method is
here and nothing else; real responses validate against these schemas) and
tests/test_fuzz.py fuzzes the app from it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from daemon import __version__, flowschema

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
SUMMARY: dict[str, Schema] = {
    "id": ID,
    "name": STRING,
    "status": {"enum": WORKFLOW_STATUS},
    "created_by": nullable(STRING),
    "error": nullable(STRING),
    "created_at": MILLIS,
    "updated_at": MILLIS,
    "completed_at": nullable(MILLIS),
    "cancelled_at": nullable(MILLIS),
    "paused_at": nullable(MILLIS),
    "definition_id": {**nullable(ID), "description": "a run of a saved definition: its id"},
    "definition_version": {**nullable({"type": "integer"}), "description": "the version it runs"},
    "trigger": {
        "enum": ["manual", "api", "execute", "webhook", "schedule", "call", None],
        "description": "what started a run of a saved definition (null: a one-off workflow)",
    },
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
        "properties": {"error": STRING, "errors": STRINGS},
        "required": ["error"],
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
            "parent": {
                "anyOf": [closed({"workflow_id": ID, "step_id": ID}), {"type": "null"}],
                "description": "a child workflow of a call state: its parent workflow and "
                "the call step",
            },
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
    404: "No such workflow or step (or no such route)",
    409: "The workflow or step is not in a state that allows this",
    413: "The body is larger than max_body_bytes",
    415: "Content-Type is not application/json",
    422: "The workflow is invalid; `error` lists every problem, '; '-separated",
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

PATHS: dict[str, Any] = {
    "/api/workflow": {
        "post": op(
            "createWorkflow",
            "Create and start a workflow",
            {
                "201": ok(
                    "Created (or replayed)", ref("Created"), **{"Idempotent-Replayed": REPLAYED}
                )
            },
            (*BODY, *AUTH, 409, 422, 503),
            parameters=[IDEMPOTENCY_KEY],
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


def document(tools: Iterable[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route (a fresh copy); with `tools`, flows name
    only those tools (see flowschema.name_tools)."""
    responses = {
        f"E{c}": {"description": text, "content": json_of(ref("Error"))}
        for c, text in ERRORS.items()
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
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
            "security": [{"bearer": []}],
        }
    )
    if tools is not None:
        flowschema.name_tools(doc["components"]["schemas"], tools)
    return doc
