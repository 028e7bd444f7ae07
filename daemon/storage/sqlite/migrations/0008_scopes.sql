-- Schema version 8: parallel, map and wait states, signals, pause and redrive.

-- A step inside a parallel branch or a map item names the parallel or map step it runs for,
-- the branch (its name, or the item's index), and the scope path of its flow (JSON).
ALTER TABLE steps ADD COLUMN parent_id INTEGER;
ALTER TABLE steps ADD COLUMN branch TEXT;
ALTER TABLE steps ADD COLUMN scope TEXT;
-- A wait for a signal: the signal's name.
ALTER TABLE steps ADD COLUMN signal TEXT;
-- While its workflow is paused: the run_at (pending) or expires_at (waiting) it had.
ALTER TABLE steps ADD COLUMN held_at INTEGER;
-- A parallel, map or wait step whose outcome is in (branches joined, timer fired, signal
-- arrived, timed out): the executor moves its flow on.
ALTER TABLE steps ADD COLUMN woken INTEGER;

ALTER TABLE workflows ADD COLUMN output_json TEXT;      -- the result of the state that ended it
ALTER TABLE workflows ADD COLUMN paused_at INTEGER;     -- set while paused (status stays running)
ALTER TABLE workflows ADD COLUMN dag_json TEXT;         -- the submitted steps, for the DAG shape
ALTER TABLE workflows ADD COLUMN input_rev INTEGER NOT NULL DEFAULT 0;  -- +1 per intervene

CREATE INDEX steps_scope ON steps (parent_id, branch, id) WHERE parent_id IS NOT NULL;
-- Everything waiting with a deadline (gates, timers, signal timeouts, parallel and map
-- timeouts), by deadline: the poll reads only those due.
CREATE INDEX steps_expiry ON steps (expires_at) WHERE awaiting IS NOT NULL AND expires_at IS NOT NULL;
CREATE INDEX steps_signal ON steps (workflow_id, signal) WHERE awaiting = 'signal';

-- One row per branch of a parallel step or item of a map step.
CREATE TABLE branches (
    parent_id   INTEGER NOT NULL,                 -- the parallel or map step
    idx         INTEGER NOT NULL,                 -- its position (results are in this order)
    workflow_id INTEGER NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,                 -- branch name, or the item's index
    item_json   TEXT,                             -- a map item
    status      TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    result_json TEXT,
    error       TEXT,
    error_type  TEXT,
    PRIMARY KEY (parent_id, idx)
);
CREATE INDEX branches_open ON branches (parent_id, status, idx);
CREATE UNIQUE INDEX branches_key ON branches (parent_id, key);
CREATE INDEX branches_workflow ON branches (workflow_id);

-- Signals sent to workflows; kept until a wait consumes them, first in first out.
CREATE TABLE signals (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id INTEGER NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    data_json   TEXT,
    sent_by     TEXT,
    created_at  INTEGER NOT NULL,
    consumed_by INTEGER,                          -- the wait step that took it
    consumed_at INTEGER
);
CREATE INDEX signals_waiting ON signals (workflow_id, name, id) WHERE consumed_by IS NULL;
-- The signal a wait took (its next attempt, after a crash, takes it again).
CREATE INDEX signals_consumed ON signals (consumed_by) WHERE consumed_by IS NOT NULL;
