-- Schema version 6: each step names the token that created its workflow, so that every
-- token gets its share of the run slots ([executor] max_running_per_token).

-- The workflow's created_by, copied when the step is inserted.
ALTER TABLE steps ADD COLUMN created_by TEXT;

-- Steps that may still run (finished ones never run again).
UPDATE steps
SET created_by = (SELECT w.created_by FROM workflows w WHERE w.id = steps.workflow_id)
WHERE status IN ('pending', 'running');

-- Each token's due steps, oldest first, found with one seek per token: a token with a
-- large backlog neither slows the claim nor hides the steps of others behind its own.
CREATE INDEX steps_runnable_by ON steps (created_by, run_at, id) WHERE status = 'pending';

-- Running tool steps by token: how many run for each, counted without reading a row.
CREATE INDEX steps_running_by ON steps (created_by) WHERE status = 'running' AND awaiting IS NULL;
