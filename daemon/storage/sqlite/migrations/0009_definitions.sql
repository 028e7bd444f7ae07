-- Schema version 9: saved definitions, their versions, runs of them, inbound webhooks and
-- child workflows of call states.

CREATE TABLE definitions (
    id             INTEGER PRIMARY KEY,           -- millisecond-epoch shaped, like workflow ids
    name           TEXT    NOT NULL UNIQUE,
    status         TEXT    NOT NULL CHECK (status IN ('draft', 'active', 'paused', 'archived')),
    version        INTEGER NOT NULL,              -- the latest version: what runs by default
    trigger_type   TEXT    NOT NULL,
    tags_json      TEXT    NOT NULL,              -- a JSON list of strings
    description    TEXT,
    concurrency    INTEGER NOT NULL,              -- runs at once; more wait as queued
    webhook_id     TEXT    UNIQUE,                -- set while deployed
    webhook_secret TEXT,
    webhook_mode   TEXT    NOT NULL DEFAULT 'single' CHECK (webhook_mode IN ('single', 'persistent')),
    armed_until    INTEGER,                       -- a single-use webhook accepts one call until then
    created_by     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

-- Versions are immutable: a change is a new row.
CREATE TABLE definition_versions (
    definition_id   INTEGER NOT NULL REFERENCES definitions (id) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    body_json       TEXT    NOT NULL,             -- the definition as submitted
    flow_json       TEXT    NOT NULL,             -- compiled (from `steps` too)
    content_hash    TEXT    NOT NULL,             -- of the canonical body: an unchanged push makes none
    change_summary  TEXT,
    created_by      TEXT,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (definition_id, version)
);

-- A run is a workflow pinned to the version it started with (its flow is copied in).
ALTER TABLE workflows ADD COLUMN definition_id INTEGER;
ALTER TABLE workflows ADD COLUMN definition_version INTEGER;
ALTER TABLE workflows ADD COLUMN run_trigger TEXT;       -- manual, execute, webhook, schedule, call
-- While a run waits for a slot under its definition's concurrency: its first step (JSON);
-- it has no steps until it starts.
ALTER TABLE workflows ADD COLUMN queued_json TEXT;
-- A child of a call state: the call step, its workflow, and how deep it is (1 for a child).
ALTER TABLE workflows ADD COLUMN parent_step_id INTEGER;
ALTER TABLE workflows ADD COLUMN parent_workflow_id INTEGER;
ALTER TABLE workflows ADD COLUMN call_depth INTEGER NOT NULL DEFAULT 0;
-- ... and the workflow at the top of its tree of calls (what its descendants count against).
ALTER TABLE workflows ADD COLUMN root_id INTEGER;

CREATE INDEX workflows_definition ON workflows (definition_id, id) WHERE definition_id IS NOT NULL;
CREATE INDEX workflows_queued ON workflows (definition_id, id) WHERE queued_json IS NOT NULL;
CREATE INDEX workflows_parent ON workflows (parent_workflow_id) WHERE parent_workflow_id IS NOT NULL;
CREATE INDEX workflows_root ON workflows (root_id) WHERE root_id IS NOT NULL;

-- The child a call step started (its latest attempt's).
ALTER TABLE steps ADD COLUMN child_id INTEGER;

-- Calls of inbound webhooks with an Idempotency-Key: a repeat answers the same run.
CREATE TABLE hook_calls (
    webhook_id      TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    run_id          INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (webhook_id, idempotency_key)
);
