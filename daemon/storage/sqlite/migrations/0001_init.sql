-- Schema version 1: workflows, their steps (one row per state visit) and an append-only event log.

CREATE TABLE workflows (
    id              INTEGER PRIMARY KEY,          -- millisecond-epoch shaped, unique, increasing
    name            TEXT    NOT NULL,
    flow_json       TEXT    NOT NULL,
    input_json      TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    error           TEXT,
    created_by      TEXT,
    idempotency_key TEXT,
    request_hash    TEXT,                         -- to tell a replay from a reused key
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    completed_at    INTEGER,
    cancelled_at    INTEGER
);
CREATE UNIQUE INDEX workflows_idempotency ON workflows (created_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX workflows_status ON workflows (status, id);

CREATE TABLE steps (
    id           INTEGER PRIMARY KEY,
    workflow_id  INTEGER NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    state        TEXT    NOT NULL,                -- state id in the flow
    name         TEXT    NOT NULL,
    tool         TEXT,                            -- NULL: an approval gate
    status       TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    awaiting     TEXT,                            -- 'ready': a gate waits; 'decision': an
                                                  -- interrupted non-idempotent tool waits
    seq          INTEGER NOT NULL,                -- 1 for the first state visit, +1 per transition
    attempt      INTEGER NOT NULL DEFAULT 0,
    result_json  TEXT,
    error        TEXT,
    error_type   TEXT,
    decided_by   TEXT,                            -- who released a gate
    run_at       INTEGER NOT NULL,                -- not before this time (retry backoff)
    expires_at   INTEGER,                         -- a waiting gate fails after this time
    lease_until  INTEGER,                         -- a running tool's owner renews this
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    completed_at INTEGER
);
-- The poll reads only pending rows: its cost does not grow with finished steps.
CREATE INDEX steps_runnable ON steps (run_at, id) WHERE status = 'pending';
-- Running tool steps by lease: recovery finds the expired ones.
CREATE INDEX steps_leases ON steps (lease_until) WHERE status = 'running' AND awaiting IS NULL;
CREATE INDEX steps_workflow ON steps (workflow_id, id);
-- Waiting gates with a timeout, by deadline.
CREATE INDEX steps_gate_expiry ON steps (expires_at) WHERE awaiting = 'ready' AND expires_at IS NOT NULL;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id INTEGER NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    step_id     INTEGER,
    type        TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    data_json   TEXT
);
CREATE INDEX events_workflow ON events (workflow_id, id);
