-- Leases, for several server replicas sharing the queue: the replica that claimed a job
-- (`owner`) keeps renewing `lease_until`; a provisioning or running job whose lease ran
-- out belongs to a dead replica and is taken over by another. A job claimed without a
-- lease (a single server) has both NULL and never expires. Both are cleared when the job
-- leaves provisioning/running, so an owner is always the current attempt's.

ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until TIMESTAMPTZ;

-- The expiry scan looks only at leased jobs.
CREATE INDEX jobs_lease_until ON jobs (lease_until) WHERE lease_until IS NOT NULL;
-- Renewal looks up an owner's jobs.
CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
