-- Several replicas read the same events table: an event is handled by the replica that
-- claims it; a claim that is not followed by `processed_at` within its lease (the replica
-- died mid-handling) can be claimed again, so no acknowledged webhook is lost.
ALTER TABLE events ADD COLUMN claimed_by TEXT;
ALTER TABLE events ADD COLUMN claimed_until TIMESTAMPTZ;
