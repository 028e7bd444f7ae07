-- Which daemon runs a step (its [server] node_id): start-up recovery takes only its own.
ALTER TABLE steps ADD COLUMN owner TEXT;
