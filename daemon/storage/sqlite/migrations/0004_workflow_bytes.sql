-- Schema version 4: how many bytes each workflow stores, for [limits] max_workflow_bytes.

ALTER TABLE workflows ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;

-- Running workflows are counted now (finished ones no longer grow).
UPDATE workflows
SET stored_bytes = length(CAST(flow_json AS BLOB)) + length(CAST(input_json AS BLOB))
    + coalesce((SELECT sum(length(CAST(result_json AS BLOB))) FROM steps s
                WHERE s.workflow_id = workflows.id), 0)
WHERE status = 'running';
