-- Initial schema of the embedded store.
--
-- Portability (the PostgreSQL backend mirrors this file): ids are INTEGER AUTOINCREMENT
-- here and BIGSERIAL there, so an id is never reused (resource names `slate-<job id>`
-- must stay unambiguous); timestamps are UTC, stored here as fixed-width RFC 3339 text
-- with microseconds (`2025-01-02T03:04:05.123456Z`, TIMESTAMPTZ there) so that text
-- order is time order; states are plain text checked against the core's names.

CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    source       TEXT    NOT NULL,
    delivery_id  TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    received_at  TEXT    NOT NULL,
    processed_at TEXT,
    error        TEXT,
    UNIQUE (source, delivery_id)
);

-- The processing loop only ever looks at the (few) unprocessed events.
CREATE INDEX events_unprocessed ON events (id) WHERE processed_at IS NULL;

CREATE TABLE builds (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    repo         TEXT    NOT NULL,
    -- serde JSON of slate_core::Trigger (`trigger` itself is an SQL keyword).
    trigger_json TEXT    NOT NULL,
    -- Copied out of the trigger so PR lookups can use an index.
    pr_number    INTEGER,
    head_sha     TEXT    NOT NULL,
    head_ref     TEXT    NOT NULL,
    base_sha     TEXT,
    base_ref     TEXT,
    author       TEXT    NOT NULL,
    pipeline     TEXT    NOT NULL,
    checkout_sha TEXT,
    event_id     INTEGER REFERENCES events (id),
    created_at   TEXT    NOT NULL
);

CREATE INDEX builds_repo_pr ON builds (repo, pr_number);
CREATE INDEX builds_created ON builds (created_at, id);

CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id    INTEGER NOT NULL REFERENCES builds (id),
    pool        TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('queued', 'provisioning', 'running',
                    'succeeded', 'failed', 'error', 'cancelled', 'timed_out')),
    reason      TEXT,
    attempt     INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    -- FIFO order is by created_at, so a retried job keeps its place in the queue.
    created_at  TEXT    NOT NULL,
    -- When the job last entered `queued` (creation or requeue): queue-wait metrics.
    queued_at   TEXT    NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    -- Hash of the one-time agent token; cleared when consumed.
    token_hash  TEXT
);

CREATE INDEX jobs_pool_state_created ON jobs (pool, state, created_at);
CREATE INDEX jobs_state_created ON jobs (state, created_at);
CREATE INDEX jobs_build ON jobs (build_id);

CREATE TABLE steps (
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    idx         INTEGER NOT NULL,
    name        TEXT    NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    exit_code   INTEGER,
    outcome     TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE workers (
    name       TEXT    PRIMARY KEY,
    job_id     INTEGER NOT NULL REFERENCES jobs (id),
    provider   TEXT    NOT NULL,
    pool       TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);
