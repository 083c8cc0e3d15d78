-- On SQLite this renames requests to jobs; PostgreSQL started with the new names (0001),
-- so there is nothing to do here but keep the numbers of both engines in step.
SELECT 1;
