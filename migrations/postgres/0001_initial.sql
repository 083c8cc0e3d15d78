-- The same schema as migrations/sqlite, numbered the same, in PostgreSQL's types:
-- times are DOUBLE PRECISION unix seconds, JSON stays TEXT (the code reads it the same way on both engines).

-- Agents: GPU hosts that poll for jobs. The secret signs their requests.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    removed_at DOUBLE PRECISION,
    last_seen DOUBLE PRECISION,
    models TEXT NOT NULL DEFAULT '[]',   -- JSON list, the last one the agent declared
    slots INTEGER NOT NULL DEFAULT 0,
    jobs_done INTEGER NOT NULL DEFAULT 0,
    tokens_streamed BIGINT NOT NULL DEFAULT 0
);

-- Jobs: one chat, from queued to a final state.
-- status: queued -> delivered (handed out, awaiting the agent's first POST)
--         -> running -> done | failed | cancelled
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    -- SQLite's implicit rowid, made explicit: first in, first out among jobs created in the same microsecond.
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,               -- JSON list of {role, content}
    options TEXT NOT NULL DEFAULT '{}',   -- JSON object passed to Ollama
    front_door TEXT NOT NULL DEFAULT 'native',
    status TEXT NOT NULL DEFAULT 'queued',
    agent_id TEXT REFERENCES agents(id),
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_expires DOUBLE PRECISION,
    next_seq INTEGER NOT NULL DEFAULT 0,  -- chunks stored so far
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    client_left_at DOUBLE PRECISION,      -- last stream client went away (cancel grace)
    released TEXT,                        -- comma-separated agents whose lease ran out (they get 410)
    stats TEXT,                           -- JSON: Ollama's final-line fields
    error_code TEXT,
    error_message TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    assigned_at DOUBLE PRECISION,
    first_token_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION
);
CREATE INDEX jobs_queue ON jobs (model, created_at) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires) WHERE status IN ('delivered', 'running');
CREATE INDEX jobs_queued_at ON jobs (created_at) WHERE status = 'queued';
CREATE INDEX jobs_finished ON jobs (finished_at);
CREATE INDEX jobs_client_left ON jobs (client_left_at) WHERE client_left_at IS NOT NULL;

-- The answer, one row per chunk as the agent posted it; seq is 0-based.
CREATE TABLE chunks (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, seq)
);
