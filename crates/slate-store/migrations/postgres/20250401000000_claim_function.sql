-- A job claim in one round trip. The claim serializes the claimers of a pool on an
-- advisory lock held until commit; run as separate statements from the client (BEGIN,
-- lock, count, update, COMMIT), every network round trip after the lock was time the
-- other claimers of that pool waited. Inside one VOLATILE function under READ COMMITTED
-- each statement still takes a fresh snapshot, so the count after the lock sees every
-- claim committed before it, exactly as before. Called as a single autocommit
-- statement: the lock is released when it commits.
CREATE FUNCTION slate_claim_job(
    lock_namespace INTEGER,
    claim_pool TEXT,
    max_active BIGINT,
    claim_owner TEXT,
    claim_lease INTERVAL
) RETURNS SETOF jobs LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    active BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_namespace, hashtext(claim_pool));
    SELECT COUNT(*) INTO active FROM jobs
        WHERE pool = claim_pool AND state IN ('provisioning', 'running');
    IF active >= max_active THEN
        RETURN;
    END IF;
    -- SKIP LOCKED passes over a queued row another transaction is changing (a cancel)
    -- instead of waiting for it. The reason belonged to the previous state.
    RETURN QUERY
        UPDATE jobs SET state = 'provisioning', reason = NULL, owner = claim_owner,
            lease_until = now() + claim_lease
        WHERE id = (SELECT id FROM jobs WHERE pool = claim_pool AND state = 'queued'
                    ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING *;
END
$$;
