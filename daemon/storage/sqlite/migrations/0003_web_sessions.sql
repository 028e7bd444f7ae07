-- Schema version 3: web sessions live here, so signing out ends every copy of the cookie.

-- One row per sign-in; the signed cookie carries the session's random id, this table only
-- its hash (the database and its backups hold no live session).
CREATE TABLE web_sessions (
    id_hash    TEXT    PRIMARY KEY,           -- hex SHA-256 of the session id
    token_name TEXT    NOT NULL,
    token_hash TEXT    NOT NULL,              -- the start of the token's configured sha256
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
