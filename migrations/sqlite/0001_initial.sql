-- Agents: GPU hosts that poll for jobs. The secret signs their requests.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    removed_at REAL,
    last_seen REAL,
    models TEXT NOT NULL DEFAULT '[]',   -- JSON list, the last one the agent declared
    slots INTEGER NOT NULL DEFAULT 0,
    jobs_done INTEGER NOT NULL DEFAULT 0,
    tokens_streamed INTEGER NOT NULL DEFAULT 0
);

-- Inference requests: one chat, from queued to a final state.
-- status: queued -> delivered (handed out, awaiting the agent's first POST)
--         -> running -> done | failed | cancelled
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,               -- JSON list of {role, content}
    options TEXT NOT NULL DEFAULT '{}',   -- JSON object passed to Ollama
    front_door TEXT NOT NULL DEFAULT 'native',
    status TEXT NOT NULL DEFAULT 'queued',
    agent_id TEXT REFERENCES agents(id),
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_expires REAL,
    next_seq INTEGER NOT NULL DEFAULT 0,  -- chunks stored so far
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    client_left_at REAL,                  -- last stream client went away (cancel grace)
    released TEXT,                        -- comma-separated agents whose lease ran out (they get 410)
    stats TEXT,                           -- JSON: Ollama's final-line fields
    error_code TEXT,
    error_message TEXT,
    created_at REAL NOT NULL,
    assigned_at REAL,
    first_token_at REAL,
    finished_at REAL
);
CREATE INDEX requests_queue ON requests (model, created_at) WHERE status = 'queued';
CREATE INDEX requests_leased ON requests (lease_expires) WHERE status IN ('delivered', 'running');
CREATE INDEX requests_queued_at ON requests (created_at) WHERE status = 'queued';
CREATE INDEX requests_finished ON requests (finished_at);
CREATE INDEX requests_client_left ON requests (client_left_at) WHERE client_left_at IS NOT NULL;

-- The answer, one row per chunk as the agent posted it; seq is 0-based.
CREATE TABLE chunks (
    request_id TEXT NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    text TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (request_id, seq)
) WITHOUT ROWID;
