-- API tokens: bearer tokens for the API and logins for the web UI (mirrors the SQLite
-- migration of the same name). Only the sha256 of a token's secret is stored, so a
-- leaked database grants nothing.
CREATE TABLE api_tokens (
    id         BIGSERIAL   PRIMARY KEY,
    name       TEXT        NOT NULL,
    hash       TEXT        NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL
);

-- The web UI's builds page filters by repository, newest first.
CREATE INDEX builds_repo_created ON builds (repo, created_at, id);
-- The state filter looks jobs up by state, then their builds by id.
CREATE INDEX jobs_state_build ON jobs (state, build_id);
