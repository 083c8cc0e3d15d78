-- Agents' secrets are no longer stored: `verifier` holds the HMAC key they sign with, plain
-- ("plain:...") or wrapped with ORCH_SECRET_KEY ("wrapped:..."); see server/keywrap.py.
-- Rows from before keep their secret until the server's next start converts them and empties it.
ALTER TABLE agents ADD COLUMN verifier TEXT;
