-- Schema version 2: who decided a gate and why; decision replays; webhook outbox; link nonces.

ALTER TABLE steps ADD COLUMN decided_at INTEGER;
ALTER TABLE steps ADD COLUMN reason TEXT;               -- a rejection's reason, or a comment
ALTER TABLE workflows ADD COLUMN notify_url TEXT;       -- per-workflow webhook

-- Waiting steps (gates and decisions) are few; the approvals inbox reads them.
CREATE INDEX steps_waiting ON steps (id) WHERE awaiting IS NOT NULL;

-- A decision sent again with the same Idempotency-Key answers as the first time.
CREATE TABLE decision_keys (
    created_by   TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    request_hash TEXT    NOT NULL,
    status       INTEGER NOT NULL,
    body_json    TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (created_by, key)
);

-- Webhook deliveries, written durably and retried with backoff until sent or given up.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     INTEGER NOT NULL,
    workflow_id  INTEGER NOT NULL,
    url          TEXT    NOT NULL,
    body_json    TEXT    NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      INTEGER NOT NULL,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    UNIQUE (event_id, url)
);
CREATE INDEX outbox_due ON outbox (next_at) WHERE status = 'pending';

-- Where the notifier has read the event log up to (one row).
CREATE TABLE cursors (
    name     TEXT    PRIMARY KEY,
    event_id INTEGER NOT NULL
);

-- One-click decision links: single use.
CREATE TABLE used_links (
    nonce   TEXT    PRIMARY KEY,
    step_id INTEGER NOT NULL,
    used_at INTEGER NOT NULL
);
