"""The flow format and the create body as JSON Schema 2020-12.

Served at GET /api/schema/flow (the root validates a flow; `$defs/Submission` is the
create body) and the same definitions are components of /openapi.json. The schema is
the structure: which keys, which types, exactly one action and one transition. What it
does not say, and daemon/flow.py checks on top: that a transition names a state that
exists, expressions (syntax, names, the sandbox's rules), tool names and their
arguments, that a branch's `else` is the last case, the forms of ISO 8601 a wait's
`until` may take, a map's `as` beyond ASCII names (the parser takes any Python
identifier), the limits (states, nesting depth, placeholders, body size), and JSON's
2.0 versus 2 (one number to JSON Schema; the parser wants an integer where it says so).
Neither checks that a call's definition exists: the call looks it up when it runs.
tests/test_flowschema.py runs the flow tables through both and keeps them agreeing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

Schema = dict[str, Any]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
MAX_SECONDS = 366 * 86400  # as daemon.flow: the longest timeout or backoff
NAMES = ["input", "steps", "result", "error", "workflow", "item", "index"]  # template roots


def definitions(prefix: str = "#/$defs/") -> dict[str, Schema]:
    """The schemas by name; references between them start with `prefix`."""

    def ref(name: str) -> Schema:
        return {"$ref": prefix + name}

    def nullable(schema: Schema) -> Schema:
        return {"anyOf": [schema, {"type": "null"}]}

    seconds: Schema = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
    text: Schema = {"type": "string", "minLength": 1}
    placeholder: Schema = {
        "type": "string",
        "pattern": r"^(<<[\s\S](?:(?!>>)[\s\S])*>>|\{\{[\s\S](?:(?!\}\})[\s\S])*\}\})$",
        "description": "exactly one placeholder: <<expr>> or {{expr}}",
    }
    # State-level keys every kind has, and the transitions (exactly one of them).
    common: dict[str, Schema] = {
        "name": {**text, "description": "default: the state id"},
        "timeout": {
            **nullable(seconds),
            "description": "seconds per attempt; for a gate or a wait, how long it may wait",
        },  # fmt: skip
        "retry": nullable(ref("Retry")),
        "on_error": {
            **nullable({"type": "string"}),
            "description": "the state to go to once "
            "the last attempt failed (the error is then `error`)",
        },  # fmt: skip
        "next": {"type": "string", "description": "the state after this one"},
        "branch": {
            "type": "array",
            "minItems": 1,
            "items": ref("Case"),
            "description": "first true `if` wins; an optional final `else`",
        },
        "done": {"const": True, "description": "the workflow completes after this state"},
    }

    def kind(action: str, own: dict[str, Schema], description: str) -> Schema:
        return {
            "description": description,
            "type": "object",
            "properties": {**common, **own},
            "required": [action],
            "additionalProperties": False,
        }

    tool = kind(
        "tool",
        {
            "tool": {"type": ["string", "null"], "description": "a tool name, or null: a gate"},
            "args": {
                **nullable({"type": "object"}),
                "description": "the tool's arguments; string values may hold <<expr>> placeholders",
            },  # fmt: skip
            "approvers": {
                **nullable({"type": "array", "minItems": 1, "items": text}),
                "description": "gate only: token names or permissions that may decide",
            },
            "allow_self_approval": {
                **nullable({"type": "boolean"}),
                "description": "gate only: may the workflow's creator decide (default: config)",
            },
        },
        "A tool call, or an approval gate (tool null)",
    )
    # A gate has no retry; only a gate has approvers and allow_self_approval.
    tool["if"] = {"properties": {"tool": {"type": "null"}}}
    tool["then"] = {"properties": {"retry": False}}
    tool["else"] = {"properties": {"approvers": False, "allow_self_approval": False}}
    parallel = kind(
        "parallel",
        {
            "parallel": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": ref("Flow"),
                "description": "branches by name, each a flow; the result is an object "
                "keyed by branch name",
            },
            "join": {
                "enum": ["fail_fast", "all_settled"],
                "description": "fail_fast (default): the first failed branch cancels the "
                "others; all_settled: every branch runs, each slot holds status and result "
                "or error",
            },
        },
        "Branches that run at once",
    )
    map_ = kind(
        "map",
        {
            "map": {
                "type": "object",
                "properties": {
                    "items": {"anyOf": [placeholder, {"type": "array"}],
                              "description": "the list: an expression or a literal list"},
                    "as": {
                        "type": "string",
                        "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                        "not": {"enum": [n for n in NAMES if n != "item"]},
                        "description": "the item's name in the flow's templates (default item)",
                    },
                    "max_concurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "tolerated_failures": {"type": "integer", "minimum": 0},
                    "flow": ref("Flow"),
                },
                "required": ["items", "flow"],
                "additionalProperties": False,
            },
        },
        "A flow run once per item of a list; the result is a list in item order",
    )  # fmt: skip
    wait_spec: Schema = {
        "description": "a durable timer (seconds, or until a time), or a wait for a "
        "signal (its data is the result; `timeout` only for a signal)",
        "type": "object",
        "properties": {
            "seconds": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
            "until": {
                "anyOf": [
                    {
                        "type": "string",
                        "minLength": 1,
                        "description": "ISO 8601 with a time zone, or a placeholder giving a time",
                    },
                    {
                        "type": "number",
                        "minimum": 0,
                        "exclusiveMaximum": 2**53,
                        "description": "epoch milliseconds",
                    },
                ]
            },
            "signal": {"type": "string", "minLength": 1, "maxLength": 200},
            "timeout": nullable(seconds),
        },
        "additionalProperties": False,
        "oneOf": [{"required": [k]} for k in ("seconds", "until", "signal")],
        "if": {"not": {"required": ["signal"]}},
        "then": {"properties": {"timeout": {"type": "null"}}},
    }
    wait = kind(
        "wait",
        {"wait": ref("Wait")},
        "A durable timer or a wait for a signal",
    )
    call = kind(
        "call",
        {
            "call": {
                "type": "object",
                "properties": {
                    "workflow": {
                        "anyOf": [
                            {"type": "string", "minLength": 1, "maxLength": 200},
                            {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                        ],
                        "description": "the saved definition to run: its name or id",
                    },
                    "version": {
                        **nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
                        "description": "the version to run (default: the definition's latest "
                        "when the call starts)",
                    },
                    "input": {
                        "anyOf": [{"type": "object"}, {"type": "null"}, placeholder],
                        "description": "the child's input: an object whose string values may "
                        "hold <<expr>> placeholders, or one placeholder giving an object",
                    },
                },
                "required": ["workflow"],
                "additionalProperties": False,
            },
        },
        "Runs a saved definition as a child workflow; its output is the result",
    )
    return {
        "Flow": {
            "description": "States keyed by state id; the flow begins at 'start'",
            "type": "object",
            "required": ["start"],
            "additionalProperties": ref("State"),
        },
        "State": {
            "description": "Exactly one action (tool, parallel, map, wait, call) and exactly "
            "one transition (next, branch, done)",
            "type": "object",
            "oneOf": [
                ref("ToolState"),
                ref("ParallelState"),
                ref("MapState"),
                ref("WaitState"),
                ref("CallState"),
            ],
            "allOf": [{"oneOf": [{"required": [k]} for k in ("next", "branch", "done")]}],
        },
        "ToolState": tool,
        "ParallelState": parallel,
        "MapState": map_,
        "WaitState": wait,
        "CallState": call,
        "Wait": wait_spec,
        "Case": {
            "oneOf": [
                _closed(
                    {
                        "if": {
                            **text,
                            "description": "an expression over result, input, steps, ...",
                        },
                        "then": {"type": "string"},
                    }
                ),
                _closed({"else": {"type": "string"}}),
            ]
        },  # fmt: skip
        "Retry": _closed(
            {
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                "backoff_s": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
                "backoff_factor": {"type": "number", "minimum": 0},
                "max_backoff_s": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
            },
            required=[],
        ),
        "DagStep": {
            "description": "One step of the DAG shape: a `tool` (or `type`, or `agent`), "
            "its `args` (or `config`), the steps it `depends_on`, `needs_human` for a gate "
            "before it. Types http_request and webhook are the http tool, wait a wait state "
            "(config: seconds, until, or signal and timeout); any other type names a tool",
            "type": "object",
            "properties": {
                "id": text,
                "tool": {"type": ["string", "null"]},
                "type": text,
                "agent": text,
                "args": nullable({"type": "object"}),
                "config": nullable({"type": "object"}),
                "depends_on": nullable({"type": "array", "items": {"type": "string"}}),
                "needs_human": {"type": "boolean"},
                "name": text,
                "timeout": nullable(seconds),
                "retry": nullable(ref("Retry")),
                "action": {"description": "accepted, not used"},
                "outputs": {"description": "accepted, not used"},
            },
            "required": ["id"],
            "additionalProperties": False,
            "oneOf": [{"required": [k]} for k in ("tool", "type", "agent")],
            "not": {"required": ["args", "config"]},
            "allOf": [
                {  # a wait step's config (or args) is the wait itself
                    "if": {"properties": {"type": {"const": "wait"}}, "required": ["type"]},
                    "then": {
                        "properties": {"config": ref("Wait"), "args": ref("Wait")},
                        "anyOf": [{"required": ["config"]}, {"required": ["args"]}],
                    },
                },
                {  # a step that is a gate has no retry
                    "if": {"properties": {"tool": {"type": "null"}}, "required": ["tool"]},
                    "then": {"properties": {"retry": False}},
                },
            ],
        },
        "Submission": {
            "description": "A workflow to create (or validate): a `flow`, or `steps` in the "
            "DAG shape",
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},
                "flow": ref("Flow"),
                "steps": {"type": "array", "minItems": 1, "items": ref("DagStep")},
                "input": {
                    **nullable({"type": "object"}),
                    "description": "the values of <<input.*>> placeholders",
                },
                "notify_url": {
                    "type": ["string", "null"],
                    "pattern": "^https?://",
                    "maxLength": 2000,
                    "description": "webhook for this workflow's gate_waiting and terminal "
                    "events; an IP address the egress policy refuses is 422",
                },
            },
            "required": ["name"],
            "additionalProperties": False,
            "oneOf": [{"required": ["flow"]}, {"required": ["steps"]}],
        },
    }


def _closed(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_DOCUMENT: Schema = {
    "$schema": DIALECT,
    "$id": "urn:stepd:schema:flow",
    "title": "stepd flow",
    "description": "The flow format: states keyed by id. $defs/Submission is the body of "
    "POST /api/workflow and /api/workflow/validate",
    "$ref": "#/$defs/Flow",
    "$defs": definitions(),
}


def document(tools: Iterable[str] | None = None) -> Schema:
    """The standalone schema (a fresh copy): the root is a flow; with `tools`, a tool
    state's `tool` is one of them (or null)."""
    doc = copy.deepcopy(_DOCUMENT)
    if tools is not None:
        name_tools(doc["$defs"], tools)
    return doc


def name_tools(defs: dict[str, Schema], tools: Iterable[str]) -> None:
    """Make the tool state's `tool` one of the registered names, or null (a gate), so that
    clients generated from the schema, editors and fuzzers build flows this daemon runs."""
    defs["ToolState"]["properties"]["tool"] = {
        "enum": [*sorted(tools), None],
        "description": "a registered tool name (GET /api/tools), or null: a gate",
    }


def submission() -> Schema:
    """The create body's schema as a standalone document."""
    return {**document(), "$id": "urn:stepd:schema:submission", "$ref": "#/$defs/Submission"}
