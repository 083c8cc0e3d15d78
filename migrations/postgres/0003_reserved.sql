-- Placeholder for migration 0003, reserved for issue 14 (the runner wants numbers without gaps).
-- Delete this file when issue 14's 0003 is merged: its own 0003 takes the number.
SELECT 1;
