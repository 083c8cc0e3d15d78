-- When an agent said it was leaving (SIGTERM: it stops taking jobs). NULL while it serves;
-- its next poll clears it. An agent that left is not online, whatever its last_seen.
ALTER TABLE agents ADD COLUMN left_at DOUBLE PRECISION;
