-- schema --
-- Create the demo tables, the FTS5 index over knowledge and the triggers that keep it in sync.
CREATE TABLE IF NOT EXISTS demo_counter (
    idempotency_key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS demo_admins (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS knowledge (
    id INTEGER PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    title TEXT NOT NULL,
    content TEXT NOT NULL DEFAULT '',
    scope TEXT NOT NULL DEFAULT 'general',
    created_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
);
CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_fts USING fts5(
    title, content, content='knowledge', content_rowid='id', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS knowledge_ai AFTER INSERT ON knowledge BEGIN
    INSERT INTO knowledge_fts (rowid, title, content) VALUES (new.id, new.title, new.content);
END;
CREATE TRIGGER IF NOT EXISTS knowledge_ad AFTER DELETE ON knowledge BEGIN
    INSERT INTO knowledge_fts (knowledge_fts, rowid, title, content)
    VALUES ('delete', old.id, old.title, old.content);
END;
CREATE TRIGGER IF NOT EXISTS knowledge_au AFTER UPDATE ON knowledge BEGIN
    INSERT INTO knowledge_fts (knowledge_fts, rowid, title, content)
    VALUES ('delete', old.id, old.title, old.content);
    INSERT INTO knowledge_fts (rowid, title, content) VALUES (new.id, new.title, new.content);
END;

-- seed --
-- Seed the admins and the knowledge base; each seed row has a fixed key, so it is inserted once.
INSERT INTO demo_admins (name) VALUES ('admin'), ('james') ON CONFLICT (name) DO NOTHING;
INSERT INTO knowledge (idempotency_key, title, scope, content) VALUES
    ('seed:access-control', 'Access Control', 'security',
     'Every token has a role, and each role grants a set of permissions. Admins can manage '
     || 'tokens and roles; operators can start and cancel workflows; viewers can only read. '
     || 'Grant the narrowest role that does the job and review permissions every quarter.'),
    ('seed:approval-gates', 'Approval Gates', 'workflows',
     'A step without a tool is an approval gate: the workflow pauses there until someone '
     || 'marks the step ready. Put a gate before any step that writes data or sends messages.'),
    ('seed:audit-log', 'Audit Log', 'security',
     'Every API call that changes state is recorded with the caller, the time and the target. '
     || 'The audit log is append-only and can be exported for compliance reviews.'),
    ('seed:rate-limits', 'Rate Limits', 'operations',
     'Each token may start a limited number of workflows per minute. Requests over the limit '
     || 'are answered with status 429 and a Retry-After header; clients should back off.'),
    ('seed:token-rotation', 'Token Rotation', 'security',
     'Rotate API tokens at least every ninety days. Create the new token, deploy it, then '
     || 'revoke the old one; a revoked token stops working immediately.'),
    ('seed:data-retention', 'Data Retention', 'compliance',
     'Completed workflows and their step results are kept for thirty days, then purged. '
     || 'Knowledge articles are kept until deleted. Export anything you need to keep longer.'),
    ('seed:incident-response', 'Incident Response', 'operations',
     'When an agent misbehaves, cancel its running workflows, revoke its token and open an '
     || 'incident. Use the audit log to find what it changed, then write a short postmortem.'),
    ('seed:onboarding', 'Onboarding', 'general',
     'New team members get a viewer token on day one. Walk through the quick start, run the '
     || 'greeting workflow, then request an operator role from an admin.')
ON CONFLICT (idempotency_key) DO NOTHING;

-- bump_counter --
-- Give this step the next counter value, unless an earlier attempt of it already took one.
INSERT INTO demo_counter (idempotency_key, value)
SELECT :key, COALESCE(MAX(value), 0) + 1 FROM demo_counter WHERE true
ON CONFLICT (idempotency_key) DO NOTHING;

-- counter_for_key --
-- The counter value a step took.
SELECT value FROM demo_counter WHERE idempotency_key = :key;

-- is_admin --
-- One row when the user is a demo admin.
SELECT 1 FROM demo_admins WHERE name = :name;

-- search --
-- Full-text search, best first: bm25 (lower is better) with titles weighted 5x over content.
SELECT k.id, k.title, k.scope,
       snippet(knowledge_fts, 1, '', '', '...', 16) AS snippet,
       bm25(knowledge_fts, 5.0, 1.0) AS rank
FROM knowledge_fts JOIN knowledge AS k ON k.id = knowledge_fts.rowid
WHERE knowledge_fts MATCH :match
ORDER BY rank
LIMIT :limit;

-- add_article --
-- Insert an article for this step unless an earlier attempt of it already did.
INSERT INTO knowledge (idempotency_key, title, content, scope)
VALUES (:key, :title, :content, :scope)
ON CONFLICT (idempotency_key) DO NOTHING;

-- article_for_key --
-- The article a step added.
SELECT id, title, scope FROM knowledge WHERE idempotency_key = :key;
