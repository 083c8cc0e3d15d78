-- Issue 16: the front doors pass Ollama's features through the fleet.
-- A job's kind (chat | features | embed) routes it to agents that can run it; `request` holds the
-- Ollama fields passed to the agent as they are (tools, format, think, keep_alive; input for embeddings).
ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat';
ALTER TABLE jobs ADD COLUMN request TEXT;
-- A chunk's parts besides its text (thinking, tool calls, an embedding vector), JSON; NULL for plain text.
ALTER TABLE chunks ADD COLUMN parts TEXT;
-- What an agent runs (JSON list of kinds; NULL: an older agent, plain chats only) and what its
-- Ollama reports of its models (JSON, protocol/models.py), with when.
ALTER TABLE agents ADD COLUMN kinds TEXT;
ALTER TABLE agents ADD COLUMN report TEXT;
ALTER TABLE agents ADD COLUMN reported_at DOUBLE PRECISION;
DROP INDEX jobs_queue;
CREATE INDEX jobs_queue ON jobs (model, kind, created_at) WHERE status = 'queued';
