-- One word for the row: what a user's chat puts on the queue is a "job" in storage,
-- as it is in the agent protocol. The user API keeps its names (X-Request-Id).
ALTER TABLE requests RENAME TO jobs;
ALTER TABLE chunks RENAME COLUMN request_id TO job_id;

DROP INDEX requests_queue;
DROP INDEX requests_leased;
DROP INDEX requests_queued_at;
DROP INDEX requests_finished;
DROP INDEX requests_client_left;
CREATE INDEX jobs_queue ON jobs (model, created_at) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires) WHERE status IN ('delivered', 'running');
CREATE INDEX jobs_queued_at ON jobs (created_at) WHERE status = 'queued';
CREATE INDEX jobs_finished ON jobs (finished_at);
CREATE INDEX jobs_client_left ON jobs (client_left_at) WHERE client_left_at IS NOT NULL;
