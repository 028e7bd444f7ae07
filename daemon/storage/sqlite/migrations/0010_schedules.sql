-- Schema version 10: schedules of definitions and their ticks.

CREATE TABLE schedules (
    id             INTEGER PRIMARY KEY,          -- millisecond-epoch shaped, like workflow ids
    definition_id  INTEGER NOT NULL REFERENCES definitions (id) ON DELETE CASCADE,
    cron           TEXT    NOT NULL,             -- five fields or a macro such as @daily
    timezone       TEXT    NOT NULL,             -- an IANA name
    input_json     TEXT    NOT NULL,
    overlap        TEXT    NOT NULL CHECK (overlap IN ('skip', 'buffer_one', 'buffer_all',
                                                       'cancel_other', 'allow_all')),
    catchup_ms     INTEGER NOT NULL,             -- a tick later than this is missed, not fired
    paused         INTEGER NOT NULL DEFAULT 0,
    next_at        INTEGER,                      -- the next fire time (epoch ms); NULL while paused
    last_fired_at  INTEGER,
    created_by     TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
-- The scheduler reads the earliest next_at and sleeps until then: one index seek however many.
CREATE INDEX schedules_due ON schedules (next_at) WHERE next_at IS NOT NULL;
CREATE INDEX schedules_definition ON schedules (definition_id, id);

-- One row per fire time of a schedule and kind: a tick fires once, whatever restarts.
CREATE TABLE schedule_ticks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    schedule_id  INTEGER NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL CHECK (kind IN ('cron', 'trigger', 'backfill')),
    fire_at      INTEGER NOT NULL,
    outcome      TEXT    NOT NULL CHECK (outcome IN ('fired', 'skipped', 'missed', 'buffered')),
    run_id       INTEGER,
    reason       TEXT,
    recorded_at  INTEGER NOT NULL,
    notify       INTEGER NOT NULL DEFAULT 0,          -- 1: a skipped or missed tick not yet posted
    UNIQUE (schedule_id, kind, fire_at)
);
CREATE INDEX schedule_ticks_history ON schedule_ticks (schedule_id, id);
CREATE INDEX schedule_ticks_buffered ON schedule_ticks (schedule_id, id) WHERE outcome = 'buffered';
CREATE INDEX schedule_ticks_notify ON schedule_ticks (id) WHERE notify = 1;

-- A run a schedule started: which schedule, and the fire time it is for.
ALTER TABLE workflows ADD COLUMN schedule_id INTEGER;
ALTER TABLE workflows ADD COLUMN fire_at INTEGER;
CREATE INDEX workflows_schedule ON workflows (schedule_id, id) WHERE schedule_id IS NOT NULL;
