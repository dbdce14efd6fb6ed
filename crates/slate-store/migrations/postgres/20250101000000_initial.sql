-- Initial schema of the PostgreSQL store: the same tables, keys and indexes as the
-- SQLite migration of the same name (read its portability notes), in native types:
-- BIGSERIAL ids (never reused, so `slate-<job id>` stays unambiguous), TIMESTAMPTZ
-- (microseconds, UTC) and BYTEA payloads. States stay plain text checked against the
-- core's names, so both backends store the same words.

CREATE TABLE events (
    id           BIGSERIAL   PRIMARY KEY,
    source       TEXT        NOT NULL,
    delivery_id  TEXT        NOT NULL,
    kind         TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ,
    error        TEXT,
    UNIQUE (source, delivery_id)
);

-- The processing loop only ever looks at the (few) unprocessed events.
CREATE INDEX events_unprocessed ON events (id) WHERE processed_at IS NULL;

CREATE TABLE builds (
    id           BIGSERIAL   PRIMARY KEY,
    repo         TEXT        NOT NULL,
    -- serde JSON of slate_core::Trigger, as text so both backends hold the same bytes.
    trigger_json TEXT        NOT NULL,
    -- Copied out of the trigger so PR lookups can use an index.
    pr_number    BIGINT,
    head_sha     TEXT        NOT NULL,
    head_ref     TEXT        NOT NULL,
    base_sha     TEXT,
    base_ref     TEXT,
    author       TEXT        NOT NULL,
    pipeline     TEXT        NOT NULL,
    checkout_sha TEXT,
    event_id     BIGINT      REFERENCES events (id),
    created_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX builds_repo_pr ON builds (repo, pr_number);
CREATE INDEX builds_created ON builds (created_at, id);

CREATE TABLE jobs (
    id          BIGSERIAL   PRIMARY KEY,
    build_id    BIGINT      NOT NULL REFERENCES builds (id),
    pool        TEXT        NOT NULL,
    state       TEXT        NOT NULL CHECK (state IN ('queued', 'provisioning', 'running',
                    'succeeded', 'failed', 'error', 'cancelled', 'timed_out')),
    reason      TEXT,
    attempt     INTEGER     NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    -- FIFO order is by created_at, so a retried job keeps its place in the queue.
    created_at  TIMESTAMPTZ NOT NULL,
    -- When the job last entered `queued` (creation or requeue): queue-wait metrics.
    queued_at   TIMESTAMPTZ NOT NULL,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    -- Hash of the one-time agent token; cleared when consumed.
    token_hash  TEXT
);

CREATE INDEX jobs_pool_state_created ON jobs (pool, state, created_at);
CREATE INDEX jobs_state_created ON jobs (state, created_at);
CREATE INDEX jobs_build ON jobs (build_id);

CREATE TABLE steps (
    job_id      BIGINT      NOT NULL REFERENCES jobs (id),
    idx         INTEGER     NOT NULL,
    name        TEXT        NOT NULL,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    exit_code   INTEGER,
    outcome     TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE workers (
    name       TEXT        PRIMARY KEY,
    job_id     BIGINT      NOT NULL REFERENCES jobs (id),
    provider   TEXT        NOT NULL,
    pool       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
