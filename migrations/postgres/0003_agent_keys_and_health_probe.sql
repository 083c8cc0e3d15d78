-- Agents' secrets are no longer stored: `verifier` holds the HMAC key they sign with, plain
-- ("plain:...") or wrapped with ORCH_SECRET_KEY ("wrapped:..."); see server/keywrap.py.
-- Rows from before keep their secret until the server's next start converts them and empties it.
ALTER TABLE agents ADD COLUMN verifier TEXT;

-- One row that /healthz and the sweeper rewrite to learn whether the database takes writes.
CREATE TABLE health_probe (id INTEGER PRIMARY KEY, probed_at DOUBLE PRECISION NOT NULL);
INSERT INTO health_probe (id, probed_at) VALUES (1, 0);
