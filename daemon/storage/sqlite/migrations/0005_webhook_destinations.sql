-- Schema version 5: webhook deliveries are picked per destination, so one slow receiver
-- cannot hold up the others.

-- "operator" for the [webhooks] url, else the receiver's "scheme://host:port".
ALTER TABLE outbox ADD COLUMN dest TEXT NOT NULL DEFAULT '';

-- Deliveries written before this version: their URL's scheme and authority (without the
-- default port; a receiver named both ways counts as two destinations until they are sent).
UPDATE outbox
SET dest = lower(substr(url, 1, instr(url, '://') + 2) || substr(
    substr(url, instr(url, '://') + 3), 1, instr(substr(url, instr(url, '://') + 3) || '/', '/') - 1))
WHERE status = 'pending';

-- Each destination's oldest due deliveries, found with one seek per destination.
CREATE INDEX outbox_dest ON outbox (dest, next_at, id) WHERE status = 'pending';
