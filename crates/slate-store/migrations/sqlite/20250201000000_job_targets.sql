-- Jobs with a target (a MacPorts port, a target printed by a plan step, `plan` for a
-- planning job) and the target's variables as a JSON object. Both NULL for a plain
-- one-job-per-pool build (NULL vars read back as no variables).
ALTER TABLE jobs ADD COLUMN target TEXT;
ALTER TABLE jobs ADD COLUMN vars TEXT;
