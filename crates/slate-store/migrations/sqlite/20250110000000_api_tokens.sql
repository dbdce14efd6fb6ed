-- API tokens: bearer tokens for the API and logins for the web UI. Only the sha256 of a
-- token's secret is stored, so a leaked database grants nothing.
CREATE TABLE api_tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    created_at TEXT    NOT NULL
);

-- The web UI's builds page filters by repository, newest first: without this index a
-- repository's builds are read through builds_repo_pr and sorted for every page.
CREATE INDEX builds_repo_created ON builds (repo, created_at, id);
-- The state filter looks jobs up by state, then their builds by id.
CREATE INDEX jobs_state_build ON jobs (state, build_id);
