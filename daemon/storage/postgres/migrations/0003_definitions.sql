-- Schema version 3 on PostgreSQL: saved definitions, their versions, runs of them, inbound webhooks and
-- child workflows of call states.

CREATE TABLE definitions (
    id             bigint PRIMARY KEY,           -- millisecond-epoch shaped, like workflow ids
    name           text    NOT NULL UNIQUE,
    status         text    NOT NULL CHECK (status IN ('draft', 'active', 'paused', 'archived')),
    version        bigint NOT NULL,              -- the latest version: what runs by default
    trigger_type   text    NOT NULL,
    tags_json      text    NOT NULL,              -- a JSON list of strings
    description    text,
    concurrency    bigint NOT NULL,              -- runs at once; more wait as queued
    webhook_id     text    UNIQUE,                -- set while deployed
    webhook_secret text,
    webhook_mode   text    NOT NULL DEFAULT 'single' CHECK (webhook_mode IN ('single', 'persistent')),
    armed_until    bigint,                       -- a single-use webhook accepts one call until then
    created_by     text,
    created_at     bigint NOT NULL,
    updated_at     bigint NOT NULL
);

-- Versions are immutable: a change is a new row.
CREATE TABLE definition_versions (
    definition_id   bigint NOT NULL REFERENCES definitions (id) ON DELETE CASCADE,
    version         bigint NOT NULL,
    body_json       text    NOT NULL,             -- the definition as submitted
    flow_json       text    NOT NULL,             -- compiled (from `steps` too)
    content_hash    text    NOT NULL,             -- of the canonical body: an unchanged push makes none
    change_summary  text,
    created_by      text,
    created_at      bigint NOT NULL,
    PRIMARY KEY (definition_id, version)
);

-- A run is a workflow pinned to the version it started with (its flow is copied in).
ALTER TABLE workflows ADD COLUMN definition_id bigint;
ALTER TABLE workflows ADD COLUMN definition_version bigint;
ALTER TABLE workflows ADD COLUMN run_trigger text;       -- manual, execute, webhook, schedule, call
-- While a run waits for a slot under its definition's concurrency: its first step (JSON);
-- it has no steps until it starts.
ALTER TABLE workflows ADD COLUMN queued_json text;
-- A child of a call state: the call step, its workflow, and how deep it is (1 for a child).
ALTER TABLE workflows ADD COLUMN parent_step_id bigint;
ALTER TABLE workflows ADD COLUMN parent_workflow_id bigint;
ALTER TABLE workflows ADD COLUMN call_depth bigint NOT NULL DEFAULT 0;
-- ... and the workflow at the top of its tree of calls (what its descendants count against).
ALTER TABLE workflows ADD COLUMN root_id bigint;

CREATE INDEX workflows_definition ON workflows (definition_id, id) WHERE definition_id IS NOT NULL;
CREATE INDEX workflows_queued ON workflows (definition_id, id) WHERE queued_json IS NOT NULL;
CREATE INDEX workflows_parent ON workflows (parent_workflow_id) WHERE parent_workflow_id IS NOT NULL;
CREATE INDEX workflows_root ON workflows (root_id) WHERE root_id IS NOT NULL;

-- The child a call step started (its latest attempt's).
ALTER TABLE steps ADD COLUMN child_id bigint;

-- Calls of inbound webhooks with an Idempotency-Key: a repeat answers the same run.
CREATE TABLE hook_calls (
    webhook_id      text    NOT NULL,
    idempotency_key text    NOT NULL,
    run_id          bigint NOT NULL,
    created_at      bigint NOT NULL,
    PRIMARY KEY (webhook_id, idempotency_key)
);
