-- max_id --
-- The largest id in use, so new ids keep increasing across restarts.
SELECT max(coalesce((SELECT max(id) FROM workflows), 0), coalesce((SELECT max(id) FROM steps), 0));

-- find_idempotent --
-- A workflow created earlier by the same token with the same Idempotency-Key.
SELECT id, request_hash FROM workflows
WHERE created_by IS :created_by AND idempotency_key = :key;

-- insert_workflow --
-- A new running workflow.
INSERT INTO workflows (id, name, flow_json, input_json, status, created_by,
                       idempotency_key, request_hash, notify_url, created_at, updated_at,
                       stored_bytes, dag_json, definition_id, definition_version,
                       run_trigger, queued_json, parent_step_id, parent_workflow_id, call_depth,
                       root_id, schedule_id, fire_at)
VALUES (:id, :name, :flow_json, :input_json, 'running', :created_by,
        :key, :request_hash, :notify_url, :now, :now, :stored_bytes, :dag_json,
        :definition_id, :definition_version, :run_trigger, :queued_json, :parent_step_id,
        :parent_workflow_id, :call_depth, :root_id, :schedule_id, :fire_at);

-- insert_step --
-- A state visit: pending for a tool (held while its workflow is paused), running and awaiting 'ready' for a gate; it counts against its workflow's token.
INSERT INTO steps (id, workflow_id, state, name, tool, status, awaiting, seq, attempt,
                   run_at, held_at, expires_at, created_at, started_at, created_by,
                   parent_id, branch, scope)
VALUES (:id, :workflow_id, :state, :name, :tool,
        CASE WHEN :tool IS NULL THEN 'running' ELSE 'pending' END,
        CASE WHEN :tool IS NULL THEN 'ready' END,
        :seq,
        CASE WHEN :tool IS NULL THEN 1 ELSE 0 END,
        CASE WHEN :tool IS NOT NULL AND (SELECT paused_at FROM workflows WHERE id = :workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :now END,
        CASE WHEN :tool IS NOT NULL AND (SELECT paused_at FROM workflows WHERE id = :workflow_id) IS NOT NULL THEN :now END,
        CASE WHEN :tool IS NULL THEN :now + :timeout_ms END,
        :now,
        CASE WHEN :tool IS NULL THEN :now END,
        (SELECT created_by FROM workflows WHERE id = :workflow_id),
        :parent_id, :branch, :scope);
-- insert_started_step --
-- A tool step handed straight to this process: running under a lease, attempt 1.
INSERT INTO steps (id, workflow_id, state, name, tool, status, seq, attempt, run_at,
                   created_at, started_at, lease_until, created_by, owner,
                   parent_id, branch, scope)
VALUES (:id, :workflow_id, :state, :name, :tool, 'running', :seq, 1, :now, :now, :started_at,
        :started_at + :lease_ms, (SELECT created_by FROM workflows WHERE id = :workflow_id),
        :node, :parent_id, :branch, :scope)
RETURNING *;

-- insert_event --
-- Append to the event log.
INSERT INTO events (workflow_id, step_id, type, at, data_json)
VALUES (:workflow_id, :step_id, :type, :now, :data_json);

-- get_workflow --
-- One workflow with its definition and input.
SELECT * FROM workflows WHERE id = :id;

-- list_workflows --
-- Newest first, before a cursor id.
SELECT id, name, status, created_by, error, created_at, updated_at, completed_at, cancelled_at,
       paused_at, queued_json IS NOT NULL AS queued, definition_id, definition_version, run_trigger
FROM workflows WHERE id < :before ORDER BY id DESC LIMIT :limit;

-- list_workflows_by_status --
-- Newest first with one status, before a cursor id.
SELECT id, name, status, created_by, error, created_at, updated_at, completed_at, cancelled_at,
       paused_at, queued_json IS NOT NULL AS queued, definition_id, definition_version, run_trigger
FROM workflows WHERE status = :status AND paused_at IS NULL AND queued_json IS NULL
  AND id < :before
ORDER BY id DESC LIMIT :limit;

-- workflow_steps --
-- Every state visit of a workflow, in order.
SELECT * FROM steps WHERE workflow_id = :workflow_id ORDER BY id;

-- get_step --
-- One step.
SELECT * FROM steps WHERE id = :id;

-- running_by_token --
-- Tool steps running for each token (the partial index steps_running_by: about concurrency entries).
SELECT created_by, count(*) AS n FROM steps
WHERE status = 'running' AND awaiting IS NULL GROUP BY created_by;

-- oldest_due_token --
-- The token of the oldest due pending step, if any (the claim's order, as a read).
SELECT created_by FROM steps WHERE status = 'pending' AND run_at <= :now
ORDER BY run_at, id LIMIT 1;

-- running_of_token --
-- How many tool steps run for one token (the partial index steps_running_by).
SELECT count(*) FROM steps WHERE status = 'running' AND awaiting IS NULL AND created_by IS :created_by;

-- workflow_token --
-- The token that created a workflow.
SELECT created_by FROM workflows WHERE id = :workflow_id;

-- pending_tokens --
-- Every token with pending steps (NULL for steps of no token): one index seek each.
WITH RECURSIVE tokens (t) AS (
    SELECT min(created_by) FROM steps WHERE status = 'pending'
    UNION ALL
    SELECT (SELECT min(s.created_by) FROM steps s
            WHERE s.status = 'pending' AND s.created_by > tokens.t)
    FROM tokens WHERE tokens.t IS NOT NULL
)
SELECT t FROM tokens WHERE t IS NOT NULL
UNION ALL
SELECT NULL WHERE EXISTS (SELECT 1 FROM steps WHERE status = 'pending' AND created_by IS NULL);

-- due_of_token --
-- One token's oldest due pending steps (the partial index steps_runnable_by).
SELECT run_at, id FROM steps
WHERE status = 'pending' AND created_by IS :created_by AND run_at <= :now
ORDER BY run_at, id LIMIT :limit;

-- next_run_of_token --
-- When one token's earliest pending step is due.
SELECT min(run_at) FROM steps WHERE status = 'pending' AND created_by IS :created_by;

-- next_gate_expiry --
-- When the earliest waiting gate expires.
SELECT min(expires_at) FROM steps WHERE awaiting IS NOT NULL AND expires_at IS NOT NULL;

-- next_due --
-- When the earliest pending step becomes due (whatever its token) or the earliest gate expires.
SELECT min(coalesce((SELECT min(run_at) FROM steps WHERE status = 'pending'), 1 << 62),
           coalesce((SELECT min(expires_at) FROM steps
                     WHERE awaiting IS NOT NULL AND expires_at IS NOT NULL), 1 << 62));

-- claim_steps --
-- Take chosen pending steps (a JSON array of ids): tools become running (a new attempt), gates start waiting.
UPDATE steps
SET status = 'running', attempt = attempt + 1,
    started_at = CASE WHEN woken = 1 THEN started_at ELSE :now END,
    awaiting = CASE WHEN tool IS NULL THEN 'ready' END,
    lease_until = CASE WHEN tool IS NOT NULL THEN :now + :lease_ms END, owner = :node
WHERE id IN (SELECT value FROM json_each(:ids)) AND status = 'pending'
RETURNING *;

-- finish_step --
-- Record an attempt's outcome, only if that attempt still owns the step.
UPDATE steps
SET status = :status, result_json = :result_json, error = :error, error_type = :error_type,
    awaiting = NULL, completed_at = :now
WHERE id = :id AND status = 'running' AND attempt = :attempt;

-- retry_step --
-- Put a failed attempt back in the queue until run_at. Held while its workflow is paused.
UPDATE steps
SET status = 'pending', error = :error, error_type = :error_type, run_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :run_at END,
    held_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN :run_at END, woken = NULL
WHERE id = :id AND status = 'running' AND attempt = :attempt;

-- end_workflow --
-- Complete or fail a running workflow (its output: the result of the state that ended it).
UPDATE workflows SET status = :status, error = :error, completed_at = :now, updated_at = :now,
                     output_json = :output_json, paused_at = NULL
WHERE id = :id AND status = 'running';
-- grow_workflow --
-- Count bytes a workflow stores (a result), and mark it changed; returns its new total.
UPDATE workflows SET stored_bytes = stored_bytes + :bytes, updated_at = :now WHERE id = :id
RETURNING stored_bytes;

-- touch_workflow --
-- Mark a workflow as changed.
UPDATE workflows SET updated_at = :now WHERE id = :id;

-- cancel_workflow --
-- Cancel a running workflow.
UPDATE workflows SET status = 'cancelled', cancelled_at = :now, updated_at = :now, paused_at = NULL,
                     queued_json = NULL
WHERE id = :id AND status = 'running';

-- cancel_steps --
-- Cancel a workflow's queued, running and waiting steps.
UPDATE steps SET status = 'cancelled', awaiting = NULL, completed_at = :now
WHERE workflow_id = :workflow_id AND status IN ('pending', 'running')
RETURNING id;

-- decide --
-- Settle a step that waits for a person (a gate, or an interrupted tool), if it still waits.
UPDATE steps
SET status = :status, awaiting = NULL, result_json = :result_json, error = :error,
    error_type = :error_type, decided_by = :decided_by, decided_at = :now, reason = :reason,
    completed_at = :now
WHERE id = :id AND status = 'running' AND awaiting = :awaiting AND attempt = :attempt;

-- find_decision_key --
-- The answer given earlier to a decision with this Idempotency-Key.
SELECT request_hash, status, body_json FROM decision_keys
WHERE created_by IS :created_by AND key = :key;

-- save_decision_key --
-- Remember a decision's answer under its Idempotency-Key.
INSERT INTO decision_keys (created_by, key, request_hash, status, body_json, created_at)
VALUES (:created_by, :key, :request_hash, :status, :body_json, :now);

-- approvals --
-- Steps waiting for a person after a step id, oldest first: the workflow's input and the previous step's result when at most :max_json bytes, the gate's approvers read from the flow.
SELECT a.*, length(CAST(p.result_json AS BLOB)) AS previous_result_bytes,
       CASE WHEN length(CAST(p.result_json AS BLOB)) <= :max_json THEN p.result_json
       END AS previous_result_json
FROM (SELECT s.id AS step_id, s.workflow_id, s.state, s.name, s.awaiting, s.error, s.attempt, s.scope,
             s.started_at, s.expires_at, w.name AS workflow_name, w.created_by, w.created_at,
             length(CAST(w.input_json AS BLOB)) AS input_bytes,
             CASE WHEN length(CAST(w.input_json AS BLOB)) <= :max_json THEN w.input_json
             END AS input_json,
             (SELECT json_extract(f.value, '$.approvers') FROM json_each(w.flow_json) f
              WHERE f.key = s.state) AS approvers_json,
             (SELECT max(p.id) FROM steps p
              WHERE p.workflow_id = s.workflow_id AND p.id < s.id) AS previous_id
      FROM steps s JOIN workflows w ON w.id = s.workflow_id
      WHERE s.awaiting IN ('ready', 'decision') AND s.status = 'running' AND s.id > :after
      ORDER BY s.id LIMIT :limit) a
LEFT JOIN steps p ON p.id = a.previous_id
ORDER BY a.step_id;

-- waiting_count --
-- How many steps wait for a person (the partial index steps_waiting).
SELECT count(*) AS n FROM steps
WHERE awaiting IN ('ready', 'decision') AND status = 'running';

-- waiting_among --
-- Which of some workflows (a JSON array of ids) have a step waiting for a person.
SELECT DISTINCT workflow_id FROM steps
WHERE awaiting IN ('ready', 'decision') AND status = 'running'
  AND workflow_id IN (SELECT value FROM json_each(:ids));

-- retry_decided --
-- Queue an interrupted tool step again, as decided by a person (a planned stop's attempt given back). Held while its workflow is paused.
UPDATE steps
SET status = 'pending', awaiting = NULL, run_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :now END,
    held_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN :now END, decided_by = :decided_by,
    decided_at = :now, attempt = attempt - (error_type IS 'Stopped')
WHERE id = :id AND status = 'running' AND awaiting = 'decision' AND attempt = :attempt;

-- interrupted_steps --
-- Running tool steps whose lease ended before :now (all of them at start-up).
SELECT * FROM steps
WHERE status = 'running' AND awaiting IS NULL AND lease_until < :now
ORDER BY lease_until LIMIT :limit;

-- recoverable_steps --
-- At start-up, tool steps an earlier process left running: with one daemon per file, every one.
SELECT * FROM steps
WHERE status = 'running' AND awaiting IS NULL
ORDER BY lease_until LIMIT :limit;

-- renew_lease --
-- Extend the lease of a step this process is running.
UPDATE steps SET lease_until = :lease_until
WHERE id = :id AND status = 'running' AND attempt = :attempt;

-- requeue_step --
-- Put one running attempt back in the queue. Held while its workflow is paused.
UPDATE steps SET status = 'pending', run_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :now END,
    held_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN :now END, lease_until = NULL
WHERE id = :id AND status = 'running' AND awaiting IS NULL AND attempt = :attempt;

-- unstart_step --
-- Put a running step back in the queue, giving back its attempt (not started, or stopped). Held while its workflow is paused.
UPDATE steps SET status = 'pending', attempt = attempt - 1, run_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :run_at END,
    held_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = steps.workflow_id) IS NOT NULL THEN :run_at END, started_at = NULL,
                 lease_until = NULL
WHERE id = :id AND status = 'running' AND awaiting IS NULL AND attempt = :attempt;

-- await_decision --
-- An interrupted non-idempotent tool step waits for a person to retry or fail it.
UPDATE steps SET awaiting = 'decision', error = :error, error_type = :error_type,
                 lease_until = NULL
WHERE id = :id AND status = 'running' AND awaiting IS NULL AND attempt = :attempt;

-- purge_candidates --
-- Up to :limit finished workflows last changed before :cutoff, oldest first, with their step counts.
SELECT w.id, (SELECT count(*) FROM steps s WHERE s.workflow_id = w.id) AS steps
FROM workflows w
WHERE w.status IN ('completed', 'failed', 'cancelled') AND w.id < :cutoff
  AND w.updated_at < :cutoff
ORDER BY w.id LIMIT :limit;

-- purge_workflow --
-- Delete one workflow (its steps and events cascade).
DELETE FROM workflows WHERE id = :id;

-- has_due --
-- Whether any pending step is due (the claim's own condition, as a read).
SELECT 1 FROM steps WHERE status = 'pending' AND run_at <= :now LIMIT 1;

-- expired_gates --
-- Waiting gates whose timeout has passed.
SELECT * FROM steps
WHERE awaiting IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= :now
ORDER BY expires_at LIMIT :limit;

-- scope_steps --
-- The latest visit of each state (of a JSON array of states, or all when NULL) before a step: what expressions see as `steps`.
SELECT * FROM steps
WHERE id IN (SELECT max(id) FROM steps
             WHERE workflow_id = :workflow_id AND id < :before AND parent_id IS NULL
               AND (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
             GROUP BY state)
ORDER BY id;

-- previous_step --
-- The top-level step before a step of the same workflow: whose result expressions see as `result`.
SELECT * FROM steps WHERE workflow_id = :workflow_id AND id < :before AND parent_id IS NULL
ORDER BY id DESC LIMIT 1;
-- workflow_events --
-- A workflow's event log, oldest first.
SELECT id, workflow_id, step_id, type, at, data_json FROM events
WHERE workflow_id = :workflow_id ORDER BY id;

-- events_after --
-- Events after an id, oldest first (SSE replay and tailing).
SELECT id, workflow_id, step_id, type, at, data_json FROM events
WHERE id > :after ORDER BY id LIMIT :limit;

-- max_event_id --
-- The newest event's id.
SELECT max(id) FROM events;

-- events_of_types_after --
-- Events of some types (a JSON array) in (after, up_to], oldest first; maybe only of workflows with a notify_url.
SELECT id, workflow_id, step_id, type, at, data_json FROM events e
WHERE id > :after AND id <= :up_to AND type IN (SELECT value FROM json_each(:types))
  AND (NOT :with_url_only OR EXISTS (SELECT 1 FROM workflows w
                                     WHERE w.id = e.workflow_id AND w.notify_url IS NOT NULL))
ORDER BY id LIMIT :limit;

-- workflow_events_after --
-- One workflow's events after an id, oldest first.
SELECT id, workflow_id, step_id, type, at, data_json FROM events
WHERE workflow_id = :workflow_id AND id > :after ORDER BY id LIMIT :limit;

-- get_cursor --
-- How far a reader of the event log has got.
SELECT event_id FROM cursors WHERE name = :name;

-- set_cursor --
-- Move a reader of the event log forward.
INSERT INTO cursors (name, event_id) VALUES (:name, :event_id)
ON CONFLICT (name) DO UPDATE SET event_id = excluded.event_id;

-- enqueue_delivery --
-- A webhook delivery to make (once per event and URL).
INSERT OR IGNORE INTO outbox (event_id, workflow_id, url, dest, body_json, next_at, created_at)
VALUES (:event_id, :workflow_id, :url, :dest, :body_json, :now, :now);

-- due_deliveries --
-- Each destination's oldest due deliveries, so no backlog hides another; the operator's first.
WITH RECURSIVE dests (dest) AS (  -- every destination with pending rows, one index seek each
    SELECT min(dest) FROM outbox WHERE status = 'pending'
    UNION ALL
    SELECT (SELECT min(o.dest) FROM outbox o WHERE o.status = 'pending' AND o.dest > d.dest)
    FROM dests d WHERE d.dest IS NOT NULL
),
picked AS (  -- at most :per_dest of each (:per_operator of the operator's), none of :busy
    SELECT o.* FROM dests d JOIN outbox o ON o.id IN (
        SELECT id FROM outbox
        WHERE status = 'pending' AND dest = d.dest AND next_at <= :now
        ORDER BY next_at, id LIMIT :per_dest)
    WHERE d.dest <> 'operator' AND d.dest NOT IN (SELECT value FROM json_each(:busy))
    UNION ALL
    SELECT * FROM (
        SELECT * FROM outbox WHERE status = 'pending' AND dest = 'operator' AND next_at <= :now
        ORDER BY next_at, id LIMIT :per_operator)
)
SELECT * FROM picked ORDER BY dest = 'operator' DESC, next_at, id LIMIT :limit;

-- delivery_sent --
-- A delivery was accepted by its receiver: its body is not kept.
UPDATE outbox SET status = 'sent', attempts = attempts + 1, last_error = NULL, body_json = ''
WHERE id = :id AND status = 'pending';

-- delivery_failed --
-- A delivery failed: try again at :next_at, or give up (dead).
UPDATE outbox
SET status = CASE WHEN :dead THEN 'dead' ELSE 'pending' END,
    attempts = attempts + 1, last_error = :error, next_at = :next_at
WHERE id = :id AND status = 'pending';

-- use_link --
-- Spend a one-click link's nonce; nothing is inserted if it was spent before.
INSERT OR IGNORE INTO used_links (nonce, step_id, used_at) VALUES (:nonce, :step_id, :now);

-- link_used --
-- Whether a one-click link's nonce was spent.
SELECT 1 FROM used_links WHERE nonce = :nonce;

-- gauge_pending --
-- Pending steps, and how many of them are due (reads the partial index steps_runnable).
SELECT count(*) AS total, coalesce(sum(run_at <= :now), 0) AS due
FROM steps WHERE status = 'pending';

-- gauge_running --
-- Tool steps holding a lease (the partial index steps_leases).
SELECT count(*) AS n FROM steps WHERE status = 'running' AND awaiting IS NULL;

-- gauge_waiting --
-- Waiting gates and decisions, by what they await (the partial index steps_waiting).
SELECT awaiting, count(*) AS n FROM steps
WHERE awaiting IS NOT NULL AND status = 'running' GROUP BY awaiting;

-- gauge_workflows --
-- Workflows by status (the covering index workflows_status, finished ones included).
SELECT status, count(*) AS n FROM workflows GROUP BY status;

-- insert_web_session --
-- A new sign-in session.
INSERT INTO web_sessions (id_hash, token_name, token_hash, created_at, expires_at)
VALUES (:id_hash, :token_name, :token_hash, :now, :expires_at);

-- get_web_session --
-- A session that has not ended or expired.
SELECT token_name, token_hash, expires_at FROM web_sessions
WHERE id_hash = :id_hash AND expires_at > :now;

-- delete_web_session --
-- Sign out: the session ends, whoever holds a copy of its cookie.
DELETE FROM web_sessions WHERE id_hash = :id_hash;

-- purge_web_sessions --
-- Forget sessions that expired.
DELETE FROM web_sessions WHERE expires_at <= :now;

-- workflow_exists --
-- Whether a workflow exists.
SELECT 1 FROM workflows WHERE id = :id;

-- list_workflows_paused --
-- Paused workflows, newest first, before a cursor id.
SELECT id, name, status, created_by, error, created_at, updated_at, completed_at, cancelled_at,
       paused_at, queued_json IS NOT NULL AS queued, definition_id, definition_version, run_trigger
FROM workflows WHERE status = 'running' AND paused_at IS NOT NULL AND queued_json IS NULL
  AND id < :before
ORDER BY id DESC LIMIT :limit;

-- workflow_paused --
-- Whether a workflow is paused (its steps are then held, never handed off).
SELECT paused_at FROM workflows WHERE id = :workflow_id;

-- scope_steps_in --
-- Like scope_steps, for a step inside a branch or map item: that branch's own visits.
SELECT * FROM steps
WHERE id IN (SELECT max(id) FROM steps
             WHERE parent_id = :parent_id AND branch = :branch AND id < :before
               AND (:states IS NULL OR state IN (SELECT value FROM json_each(:states)))
             GROUP BY state)
ORDER BY id;

-- previous_step_in --
-- The step before a step in the same branch or map item.
SELECT * FROM steps WHERE parent_id = :parent_id AND branch = :branch AND id < :before
ORDER BY id DESC LIMIT 1;

-- start_waiting --
-- A wait (or a parallel or map step whose branches now run) gives up its run slot and lease.
UPDATE steps SET awaiting = :awaiting, signal = :signal, expires_at = :expires_at,
                 lease_until = NULL
WHERE id = :id AND status = 'running' AND awaiting IS NULL AND attempt = :attempt;

-- wake_step --
-- A waiting parallel, map or wait step has its outcome: queued for the executor to move its flow on (held while its workflow is paused), its attempt not counted again.
UPDATE steps
SET status = 'pending', attempt = attempt - 1, awaiting = NULL, woken = 1, lease_until = NULL,
    result_json = :result_json, error = :error, error_type = :error_type,
    run_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = :workflow_id) IS NOT NULL THEN 4611686018427387904 ELSE :now END,
    held_at = CASE WHEN (SELECT paused_at FROM workflows WHERE id = :workflow_id) IS NOT NULL THEN :now END
WHERE id = :id AND status = 'running' AND awaiting = :awaiting
  AND (:attempt IS NULL OR attempt = :attempt);

-- insert_signal --
-- A signal sent to a workflow.
INSERT INTO signals (workflow_id, name, data_json, sent_by, created_at)
VALUES (:workflow_id, :name, :data_json, :sent_by, :now)
RETURNING id;

-- oldest_signal --
-- The oldest signal of a name not yet consumed.
SELECT id, data_json FROM signals
WHERE workflow_id = :workflow_id AND name = :name AND consumed_by IS NULL
ORDER BY id LIMIT 1;

-- signal_of_step --
-- The signal a wait step took in an earlier attempt (one that died before its outcome was written).
SELECT id, data_json FROM signals
WHERE workflow_id = :workflow_id AND consumed_by = :step_id
ORDER BY id LIMIT 1;

-- consume_signal --
-- A wait takes a signal.
UPDATE signals SET consumed_by = :step_id, consumed_at = :now WHERE id = :id;

-- signal_waiter --
-- The oldest step of a workflow waiting for a signal of a name.
SELECT * FROM steps
WHERE workflow_id = :workflow_id AND awaiting = 'signal' AND signal = :name AND status = 'running'
ORDER BY id LIMIT 1;

-- insert_branch --
-- A branch of a parallel step or an item of a map step, waiting to start.
INSERT INTO branches (parent_id, idx, workflow_id, key, item_json, status)
VALUES (:parent_id, :idx, :workflow_id, :key, :item_json, 'pending');

-- delete_branches --
-- Forget a parallel or map step's branches (it runs them again: a new attempt).
DELETE FROM branches WHERE parent_id = :parent_id;

-- next_branches --
-- The first branches of a parallel or map step waiting to start.
SELECT idx, key FROM branches WHERE parent_id = :parent_id AND status = 'pending'
ORDER BY idx LIMIT :limit;

-- start_branch --
-- A branch starts.
UPDATE branches SET status = 'running' WHERE parent_id = :parent_id AND idx = :idx;

-- settle_branch --
-- A running branch ended.
UPDATE branches SET status = :status, result_json = :result_json, error = :error,
                    error_type = :error_type
WHERE parent_id = :parent_id AND key = :key AND status = 'running';

-- branch_counts --
-- Whether a parallel or map step has branches waiting to start and running, and how many failed (index seeks: a 10,000-item map's last item costs no more than its first).
SELECT EXISTS (SELECT 1 FROM branches WHERE parent_id = :parent_id AND status = 'pending') AS pending,
       EXISTS (SELECT 1 FROM branches WHERE parent_id = :parent_id AND status = 'running') AS running,
       (SELECT count(*) FROM branches WHERE parent_id = :parent_id AND status = 'failed') AS failed;

-- branch_results --
-- A parallel or map step's branches in order, with their outcomes.
SELECT key, status, result_json, error, error_type FROM branches
WHERE parent_id = :parent_id ORDER BY idx;

-- get_branch --
-- One branch (a map item's value and index).
SELECT * FROM branches WHERE parent_id = :parent_id AND key = :key;

-- failed_branches --
-- Branches that failed or were cancelled (a redrive runs them again).
SELECT idx, key FROM branches
WHERE parent_id = :parent_id AND status IN ('failed', 'cancelled') ORDER BY idx;

-- reopen_branch --
-- A failed or cancelled branch waits to start again.
UPDATE branches SET status = 'pending', result_json = NULL, error = NULL, error_type = NULL
WHERE parent_id = :parent_id AND idx = :idx;

-- cancel_descendants --
-- Cancel the open steps inside a parallel or map step, at any depth; waiting gates say why.
WITH RECURSIVE sub (id) AS (
    SELECT id FROM steps WHERE parent_id = :parent_id
    UNION ALL
    SELECT s.id FROM steps s JOIN sub ON s.parent_id = sub.id
)
UPDATE steps
SET status = 'cancelled', awaiting = NULL, completed_at = :now,
    reason = CASE WHEN awaiting = 'ready' THEN :reason ELSE reason END
WHERE id IN (SELECT id FROM sub) AND status IN ('pending', 'running')
RETURNING id;

-- cancel_open_branches --
-- The branches of a parallel or map step (and of those inside it) that had not ended.
WITH RECURSIVE sub (id) AS (
    SELECT :parent_id
    UNION ALL
    SELECT s.id FROM steps s JOIN sub ON s.parent_id = sub.id
)
UPDATE branches SET status = 'cancelled'
WHERE parent_id IN (SELECT id FROM sub) AND status IN ('pending', 'running');

-- cancel_workflow_branches --
-- A cancelled workflow's branches that had not ended.
UPDATE branches SET status = 'cancelled'
WHERE workflow_id = :workflow_id AND status IN ('pending', 'running');

-- pause_workflow --
-- Pause a running workflow.
UPDATE workflows SET paused_at = :now, updated_at = :now
WHERE id = :id AND status = 'running' AND paused_at IS NULL;

-- hold_steps --
-- A paused workflow's queued steps wait (their due time kept in held_at).
UPDATE steps SET held_at = run_at, run_at = 4611686018427387904
WHERE workflow_id = :workflow_id AND status = 'pending' AND held_at IS NULL;

-- unpause_workflow --
-- Resume a paused workflow.
UPDATE workflows SET paused_at = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND paused_at IS NOT NULL;

-- release_steps --
-- A resumed workflow's held steps are due again when they were due.
UPDATE steps SET run_at = held_at, held_at = NULL
WHERE workflow_id = :workflow_id AND status = 'pending' AND held_at IS NOT NULL;

-- reopen_workflow --
-- Redrive a failed or cancelled workflow.
UPDATE workflows
SET status = 'running', error = NULL, completed_at = NULL, cancelled_at = NULL,
    output_json = NULL, paused_at = NULL, updated_at = :now
WHERE id = :id AND status IN ('failed', 'cancelled');

-- last_top_step --
-- A workflow's latest top-level step.
SELECT * FROM steps WHERE workflow_id = :workflow_id AND parent_id IS NULL
ORDER BY id DESC LIMIT 1;

-- last_branch_step --
-- A branch's latest step.
SELECT * FROM steps WHERE parent_id = :parent_id AND branch = :branch ORDER BY id DESC LIMIT 1;

-- max_seq --
-- The longest path walked so far (the step limit counts it).
SELECT max(seq) FROM steps WHERE workflow_id = :workflow_id;

-- reopen_parent --
-- A parallel or map step runs its failed branches again (redrive).
UPDATE steps
SET status = 'running', awaiting = 'branches', woken = NULL, result_json = NULL, error = NULL,
    error_type = NULL, completed_at = NULL, lease_until = NULL, held_at = NULL,
    expires_at = :expires_at
WHERE id = :id AND status IN ('failed', 'cancelled', 'done');

-- set_input --
-- Replace a workflow's input (intervene), if it is still the one that was read.
UPDATE workflows
SET input_json = :input_json, input_rev = input_rev + 1, updated_at = :now,
    stored_bytes = stored_bytes + :delta
WHERE id = :id AND input_rev = :rev;

-- input_rev --
-- How many times a workflow's input was changed.
SELECT input_rev FROM workflows WHERE id = :id;

-- ancestors --
-- A parallel or map step and those it runs inside, outermost first.
WITH RECURSIVE up (id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM steps WHERE id = :parent_id
    UNION ALL
    SELECT s.id, s.parent_id, up.depth + 1 FROM steps s JOIN up ON s.id = up.parent_id
)
SELECT id FROM up ORDER BY depth DESC;

-- step_seq --
-- How far along its path a step is (a map item's first step follows its map step).
SELECT seq FROM steps WHERE id = :id;

-- list_workflows_queued --
-- Runs waiting for a slot under their definition's concurrency, newest first.
SELECT id, name, status, created_by, error, created_at, updated_at, completed_at, cancelled_at,
       paused_at, queued_json IS NOT NULL AS queued, definition_id, definition_version, run_trigger
FROM workflows WHERE status = 'running' AND queued_json IS NOT NULL AND id < :before
ORDER BY id DESC LIMIT :limit;

-- insert_definition --
-- A new saved definition (its first version is inserted beside it).
INSERT INTO definitions (id, name, status, version, trigger_type, tags_json, description,
                         concurrency, webhook_mode, created_by, created_at, updated_at)
VALUES (:id, :name, :status, 1, :trigger_type, :tags_json, :description, :concurrency,
        :webhook_mode, :created_by, :now, :now);

-- insert_definition_version --
-- An immutable version of a definition.
INSERT INTO definition_versions (definition_id, version, body_json, flow_json, content_hash,
                                 change_summary, created_by, created_at)
VALUES (:definition_id, :version, :body_json, :flow_json, :content_hash, :change_summary,
        :created_by, :now);

-- definition_by_id --
-- One definition.
SELECT * FROM definitions WHERE id = :id;

-- definition_by_name --
-- One definition by its unique name.
SELECT * FROM definitions WHERE name = :name;

-- definition_by_webhook --
-- The definition a deployed webhook starts.
SELECT * FROM definitions WHERE webhook_id = :webhook_id;

-- definition_name_taken --
-- Whether another definition has the name.
SELECT id FROM definitions WHERE name = :name AND id <> :id;

-- update_definition --
-- The latest version's settings, copied onto the definition.
UPDATE definitions SET version = :version, name = :name, tags_json = :tags_json,
                       description = :description, concurrency = :concurrency,
                       webhook_mode = :webhook_mode, updated_at = :now,
                       armed_until = CASE WHEN :webhook_mode = 'persistent' THEN NULL ELSE armed_until END
WHERE id = :id AND version = :version - 1;

-- set_definition_status --
-- draft, active, paused or archived.
UPDATE definitions SET status = :status, updated_at = :now WHERE id = :id;

-- delete_definition --
-- Remove a definition and (cascading) its versions.
DELETE FROM definitions WHERE id = :id;

-- definition_versions --
-- Every version of a definition, newest first.
SELECT version, change_summary, created_by, created_at, content_hash
FROM definition_versions WHERE definition_id = :definition_id ORDER BY version DESC
LIMIT :limit OFFSET :offset;

-- definition_version --
-- One version with its body and compiled flow.
SELECT * FROM definition_versions WHERE definition_id = :definition_id AND version = :version;

-- active_runs --
-- Runs of a definition that hold a slot (running, paused or waiting; not queued).
SELECT count(*) FROM workflows
WHERE definition_id = :definition_id AND status = 'running' AND queued_json IS NULL;

-- open_runs --
-- Runs of a definition not yet ended (queued ones too), for a forced delete.
SELECT id FROM workflows WHERE definition_id = :definition_id AND status = 'running';

-- oldest_queued --
-- Queued runs of a definition, oldest first.
SELECT id, queued_json FROM workflows
WHERE definition_id = :definition_id AND status = 'running' AND queued_json IS NOT NULL
ORDER BY id LIMIT :limit;

-- dequeue_run --
-- A queued run takes a slot: its first step is inserted beside this.
UPDATE workflows SET queued_json = NULL, updated_at = :now
WHERE id = :id AND status = 'running' AND queued_json IS NOT NULL;

-- ended_links --
-- What a workflow that just ended is linked to: its definition, the call step of its parent, running children.
SELECT definition_id, parent_step_id, parent_workflow_id, status, output_json, error, schedule_id,
       EXISTS (SELECT 1 FROM workflows c WHERE c.parent_workflow_id = w.id AND c.status = 'running')
           AS has_children
FROM workflows w WHERE id = :id;

-- children --
-- Child workflows (of call states) still running.
SELECT id FROM workflows WHERE parent_workflow_id = :id AND status = 'running';

-- definition_runs --
-- Runs of a definition, newest first.
SELECT id, name, status, created_by, error, created_at, updated_at, completed_at, cancelled_at,
       paused_at, queued_json IS NOT NULL AS queued, definition_id, definition_version, run_trigger
FROM workflows WHERE definition_id = :definition_id
  AND (:status IS NULL OR (CASE WHEN queued_json IS NOT NULL THEN 'queued'
                               WHEN paused_at IS NOT NULL AND status = 'running' THEN 'paused'
                               ELSE status END) = :status)
ORDER BY id DESC LIMIT :limit OFFSET :offset;

-- count_definition_runs --
-- How many runs definition_runs would list without a limit.
SELECT count(*) FROM workflows WHERE definition_id = :definition_id
  AND (:status IS NULL OR (CASE WHEN queued_json IS NOT NULL THEN 'queued'
                               WHEN paused_at IS NOT NULL AND status = 'running' THEN 'paused'
                               ELSE status END) = :status);

-- delete_run --
-- Remove a finished run with its steps and events.
DELETE FROM workflows WHERE id = :id AND status <> 'running';

-- deploy_definition --
-- Give a definition its webhook (kept when it has one).
UPDATE definitions SET webhook_id = coalesce(webhook_id, :webhook_id),
                       webhook_secret = coalesce(webhook_secret, :webhook_secret), updated_at = :now
WHERE id = :id;

-- undeploy_definition --
-- Remove a definition's webhook: its URL stops working.
UPDATE definitions SET webhook_id = NULL, webhook_secret = NULL, armed_until = NULL,
                       updated_at = :now
WHERE id = :id;

-- arm_definition --
-- Open a single-use webhook's window.
UPDATE definitions SET armed_until = :until, updated_at = :now
WHERE id = :id AND webhook_id IS NOT NULL AND webhook_mode = 'single';

-- fire_armed --
-- Take an armed webhook's one call: exactly one caller changes the row.
UPDATE definitions SET armed_until = NULL, updated_at = :now
WHERE id = :id AND webhook_id = :webhook_id AND armed_until IS NOT NULL AND armed_until > :now;

-- find_hook_call --
-- An earlier webhook call with the same Idempotency-Key.
SELECT run_id FROM hook_calls WHERE webhook_id = :webhook_id AND idempotency_key = :key;

-- insert_hook_call --
-- Remember a webhook call's Idempotency-Key and its run.
INSERT INTO hook_calls (webhook_id, idempotency_key, run_id, created_at)
VALUES (:webhook_id, :key, :run_id, :now);

-- set_child --
-- The child workflow a call step started.
UPDATE steps SET child_id = :child_id WHERE id = :id;

-- list_definitions --
-- Definitions with a status, tag and trigger type (each optional), newest first.
SELECT * FROM definitions
WHERE (:status IS NULL OR status = :status)
  AND (:trigger_type IS NULL OR trigger_type = :trigger_type)
  AND (:tag IS NULL OR EXISTS (SELECT 1 FROM json_each(tags_json) WHERE value = :tag))
ORDER BY id DESC LIMIT :limit OFFSET :offset;

-- count_definitions --
-- How many definitions list_definitions would give without a limit.
SELECT count(*) FROM definitions
WHERE (:status IS NULL OR status = :status)
  AND (:trigger_type IS NULL OR trigger_type = :trigger_type)
  AND (:tag IS NULL OR EXISTS (SELECT 1 FROM json_each(tags_json) WHERE value = :tag));

-- purge_hook_calls --
-- Forget a webhook's Idempotency-Keys older than the replay window.
DELETE FROM hook_calls WHERE webhook_id = :webhook_id AND created_at < :cutoff;

-- descendants --
-- How many child workflows (of call states, at any depth) a root workflow has started.
SELECT count(*) FROM workflows WHERE root_id = :root_id;

-- insert_schedule --
-- A new schedule of a definition.
INSERT INTO schedules (id, definition_id, cron, timezone, input_json, overlap, catchup_ms, paused,
                       next_at, created_by, created_at, updated_at)
VALUES (:id, :definition_id, :cron, :timezone, :input_json, :overlap, :catchup_ms, :paused,
        :next_at, :created_by, :now, :now);

-- schedule_by_id --
-- One schedule with its definition's name and how many ticks it has buffered.
SELECT s.*, d.name AS definition_name,
       (SELECT count(*) FROM schedule_ticks t
        WHERE t.schedule_id = s.id AND t.outcome = 'buffered') AS buffered
FROM schedules s JOIN definitions d ON d.id = s.definition_id WHERE s.id = :id;

-- schedules_of_definition --
-- A definition's schedules, oldest first.
SELECT s.*, d.name AS definition_name,
       (SELECT count(*) FROM schedule_ticks t
        WHERE t.schedule_id = s.id AND t.outcome = 'buffered') AS buffered
FROM schedules s JOIN definitions d ON d.id = s.definition_id
WHERE s.definition_id = :definition_id ORDER BY s.id LIMIT :limit OFFSET :offset;

-- count_schedules_of_definition --
-- How many schedules a definition has.
SELECT count(*) FROM schedules WHERE definition_id = :definition_id;

-- all_schedules --
-- Every schedule, oldest first.
SELECT s.*, d.name AS definition_name,
       (SELECT count(*) FROM schedule_ticks t
        WHERE t.schedule_id = s.id AND t.outcome = 'buffered') AS buffered
FROM schedules s JOIN definitions d ON d.id = s.definition_id
ORDER BY s.id LIMIT :limit OFFSET :offset;

-- count_schedules --
-- How many schedules there are.
SELECT count(*) FROM schedules;

-- update_schedule --
-- A schedule's new settings and next fire time.
UPDATE schedules SET cron = :cron, timezone = :timezone, input_json = :input_json,
                     overlap = :overlap, catchup_ms = :catchup_ms, paused = :paused,
                     next_at = :next_at, updated_at = :now
WHERE id = :id;

-- delete_schedule --
-- Remove a schedule and (cascading) its ticks; its runs stay.
DELETE FROM schedules WHERE id = :id;

-- next_schedule_at --
-- When the earliest schedule is due: one index seek.
SELECT min(next_at) FROM schedules WHERE next_at IS NOT NULL;

-- due_schedules --
-- Schedules due now, the most overdue first.
SELECT * FROM schedules WHERE next_at IS NOT NULL AND next_at <= :now
ORDER BY next_at LIMIT :limit;

-- schedule_row --
-- A schedule and its definition's state, inside a write (after the schedule's lock).
SELECT s.*, d.status AS definition_status, d.version AS definition_version,
       d.concurrency AS concurrency
FROM schedules s JOIN definitions d ON d.id = s.definition_id WHERE s.id = :id;

-- insert_tick --
-- Record a tick: nothing when this schedule, kind and fire time has one already.
INSERT INTO schedule_ticks (schedule_id, kind, fire_at, outcome, run_id, reason, recorded_at,
                            notify)
VALUES (:schedule_id, :kind, :fire_at, :outcome, :run_id, :reason, :now,
        CASE WHEN :outcome IN ('skipped', 'missed') THEN 1 ELSE 0 END)
ON CONFLICT (schedule_id, kind, fire_at) DO NOTHING
RETURNING id;

-- schedule_running --
-- Runs of a schedule not ended yet (queued, paused and waiting ones too), the oldest 1,000.
SELECT id FROM workflows WHERE schedule_id = :schedule_id AND status = 'running' ORDER BY id
LIMIT 1000;

-- count_buffered --
-- Ticks of a schedule waiting for its running run to end.
SELECT count(*) FROM schedule_ticks WHERE schedule_id = :schedule_id AND outcome = 'buffered';

-- oldest_buffered --
-- A schedule's oldest buffered tick.
SELECT id, kind, fire_at FROM schedule_ticks
WHERE schedule_id = :schedule_id AND outcome = 'buffered' ORDER BY id LIMIT 1;

-- buffered_ticks --
-- Every buffered tick of a schedule (cancel_other drops them).
SELECT id FROM schedule_ticks WHERE schedule_id = :schedule_id AND outcome = 'buffered';

-- settle_tick --
-- A buffered tick's outcome: fired (with its run) or skipped.
UPDATE schedule_ticks SET outcome = :outcome, run_id = :run_id, reason = :reason,
                          recorded_at = :now,
                          notify = CASE WHEN :outcome = 'skipped' THEN 1 ELSE notify END
WHERE id = :id AND outcome = 'buffered';

-- advance_schedule --
-- A schedule's next fire time after its due ticks were handled.
UPDATE schedules SET next_at = :next_at,
                     last_fired_at = coalesce(:last_fired_at, last_fired_at)
WHERE id = :id;

-- mark_fired --
-- The latest fire time a schedule started a run for (a backfill's are older).
UPDATE schedules SET last_fired_at = max(coalesce(last_fired_at, 0), :fire_at) WHERE id = :id;

-- schedule_ticks --
-- A schedule's ticks, newest first.
SELECT id, schedule_id, kind, fire_at, outcome, run_id, reason, recorded_at
FROM schedule_ticks WHERE schedule_id = :schedule_id
  AND (:outcome IS NULL OR outcome = :outcome)
ORDER BY id DESC LIMIT :limit OFFSET :offset;

-- count_schedule_ticks --
-- How many ticks schedule_ticks would list without a limit.
SELECT count(*) FROM schedule_ticks WHERE schedule_id = :schedule_id
  AND (:outcome IS NULL OR outcome = :outcome);

-- ticks_to_notify --
-- Skipped and missed ticks not posted yet, with their schedules, for webhooks.
SELECT t.id, t.schedule_id, t.kind, t.fire_at, t.outcome, t.run_id, t.reason, t.recorded_at,
       s.definition_id, s.cron, s.timezone, d.name AS definition_name
FROM schedule_ticks t JOIN schedules s ON s.id = t.schedule_id
JOIN definitions d ON d.id = s.definition_id
WHERE t.notify = 1 ORDER BY t.id LIMIT :limit;

-- tick_exists --
-- Whether a schedule has a tick of this kind at this fire time.
SELECT id FROM schedule_ticks WHERE schedule_id = :schedule_id AND kind = :kind AND fire_at = :fire_at;

-- set_tick_run --
-- The run a fired tick started.
UPDATE schedule_ticks SET run_id = :run_id WHERE id = :id;

-- schedules_to_unbuffer --
-- Schedules with buffered ticks and no run going: the oldest tick's run may start.
SELECT DISTINCT t.schedule_id FROM schedule_ticks t
WHERE t.outcome = 'buffered'
  AND NOT EXISTS (SELECT 1 FROM workflows w
                  WHERE w.schedule_id = t.schedule_id AND w.status = 'running')
LIMIT :limit;

-- fire_time_taken --
-- A tick of the given kind that started (or will start) a run for this fire time.
SELECT id FROM schedule_ticks
WHERE schedule_id = :schedule_id AND kind = :kind AND fire_at = :fire_at
  AND outcome IN ('fired', 'buffered');

-- purge_ticks --
-- Ticks recorded before a cutoff, a batch at a time (buffered ones stay).
DELETE FROM schedule_ticks WHERE id IN (
    SELECT id FROM schedule_ticks WHERE recorded_at < :cutoff AND outcome <> 'buffered'
    ORDER BY id LIMIT :limit);

-- tick_notified --
-- A skipped or missed tick's webhook delivery was queued.
UPDATE schedule_ticks SET notify = 0 WHERE id = :id;
