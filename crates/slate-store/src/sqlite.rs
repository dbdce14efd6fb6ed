//! The embedded SQLite store: one file in WAL mode, one writer connection, a few readers.

mod rows;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use slate_core::{Build, BuildId, Job, JobId, JobState, StepRecord};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};

use crate::{
    ApiToken, BuildFilter, InsertOutcome, NewBuild, NewJob, Result, Store, StoreError, StoredEvent,
    WorkerRecord, LOCAL_OWNER,
};
use rows::{ts, BUILD_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, STEP_COLUMNS, WORKER_COLUMNS};

/// Page size when a listing asks for `limit: 0`.
const DEFAULT_LIMIT: u32 = 50;

/// How long a connection waits for another's write lock (another process on the same
/// file, a checkpoint) before failing with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Readers: WAL lets them run beside the writer without blocking it.
const READ_CONNECTIONS: u32 = 4;

/// Starts a write transaction holding the write lock from the start, so a read-then-write
/// cannot deadlock on the lock upgrade (a deferred transaction would get SQLITE_BUSY
/// immediately, without waiting, if another writer committed in between).
const BEGIN_IMMEDIATE: &str = "BEGIN IMMEDIATE";

/// The embedded SQLite store.
///
/// SQLite admits one writer at a time, so writes go through a pool of exactly one
/// connection: concurrent writers queue in the pool (fair, in-process) instead of
/// sleeping in SQLite's busy handler. Reads use a separate pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// The checkpoint task stops when the last clone of the store is dropped.
    _alive: std::sync::Arc<()>,
}

impl SqliteStore {
    /// Open (creating if missing) the database at `path` and bring its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL fsyncs only at checkpoints, not at each commit: a commit
            // is in the WAL file (the OS page cache) when it returns, so it survives the
            // process dying (panic, OOM kill, kill -9), which is what "durable before
            // acknowledged" promises. A power loss or kernel crash may lose the last
            // commits (never corrupt the file). FULL would fsync every commit, costing a
            // disk flush per webhook.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);

        // The writer never checkpoints on its own: a checkpoint on the commit path holds
        // the only write connection while it copies and fsyncs, which showed up as
        // 50–150 ms stalls in webhook acks. A background task checkpoints instead.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options)
            .await?;
        let alive = std::sync::Arc::new(());
        tokio::spawn(checkpoint_loop(
            read.clone(),
            std::sync::Arc::downgrade(&alive),
        ));
        Ok(SqliteStore {
            write,
            read,
            _alive: alive,
        })
    }

    /// Close every connection, waiting for them to finish (graceful shutdown).
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    async fn job_exists(&self, id: JobId) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.write)
            .await?;
        Ok(found.is_some())
    }

    /// `Ok(false)` if the job exists (the caller's condition did not hold), else NotFound.
    /// Builds newest first, optionally only those with a job in `state`. The order is
    /// served by `builds_created` (or `builds_repo_created` with a repository), read
    /// backwards, so a page costs its offset plus its size, never a sort of every build.
    async fn list_builds_where(
        &self,
        filter: &BuildFilter,
        state: Option<JobState>,
    ) -> Result<Vec<Build>> {
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {BUILD_COLUMNS} FROM builds"));
        let mut sep = " WHERE ";
        if let Some(state) = state {
            q.push(sep)
                .push("id IN (SELECT build_id FROM jobs WHERE state = ")
                .push_bind(state.as_str())
                .push(")");
            sep = " AND ";
        }
        if let Some(repo) = &filter.repo {
            q.push(sep).push("repo = ").push_bind(repo.clone());
            sep = " AND ";
        }
        if let Some(pr) = filter.pr {
            // A number no build can have matches nothing.
            let Ok(pr) = i64::try_from(pr) else {
                return Ok(Vec::new());
            };
            q.push(sep).push("pr_number = ").push_bind(pr);
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit(filter.limit))
            .push(" OFFSET ")
            .push_bind(i64::from(filter.offset));
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(rows::build).collect()
    }

    /// Claim the oldest queued job of `pool` for `owner`, within `max_active`.
    async fn claim(&self, pool: &str, max_active: u32, owner: &str) -> Result<Option<Job>> {
        let mut tx = self.write.begin_with(BEGIN_IMMEDIATE).await?;
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE pool = ? AND state IN ('provisioning', 'running')",
        )
        .bind(pool)
        .fetch_one(&mut *tx)
        .await?;
        if active >= i64::from(max_active) {
            tx.rollback().await?;
            return Ok(None);
        }
        // The reason belonged to the previous state (e.g. why it was requeued).
        let row = sqlx::query(&format!(
            "UPDATE jobs SET state = 'provisioning', reason = NULL, owner = ? WHERE id = \
             (SELECT id FROM jobs WHERE pool = ? AND state = 'queued' \
              ORDER BY created_at, id LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(owner)
        .bind(pool)
        .fetch_optional(&mut *tx)
        .await?;
        let job = row.as_ref().map(rows::job).transpose()?;
        tx.commit().await?;
        Ok(job)
    }

    /// [`Store::transition_job`], and with `owner` only while that owner holds the job.
    async fn transition(
        &self,
        id: JobId,
        owner: Option<&str>,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<bool> {
        // The store is the one place every transition passes through, so it also holds
        // the core's state machine: a terminal job never changes, whatever `from` says.
        let from: Vec<JobState> = from.iter().copied().filter(|s| s.can_become(to)).collect();
        if from.is_empty() {
            tracing::warn!(job = %id, %to, "transition refused: no allowed source state");
            return self.not_moved(id).await;
        }
        let now = ts(rows::now());
        // One conditional UPDATE is the compare-and-set: SQLite runs it under the write
        // lock, so no explicit transaction is needed.
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE jobs SET state = ");
        q.push_bind(to.as_str())
            .push(", reason = ")
            .push_bind(reason.map(str::to_owned));
        match to {
            JobState::Running => {
                q.push(", started_at = ").push_bind(now.clone());
            }
            // Back in the queue: the previous start is no longer this job's start.
            JobState::Queued => {
                q.push(", started_at = NULL");
            }
            _ => {}
        }
        if to.is_terminal() {
            // A finished job's agent token is of no further use.
            q.push(", finished_at = ")
                .push_bind(now)
                .push(", token_hash = NULL");
        }
        // Out of provisioning/running nobody holds the job any more.
        if to.is_terminal() || to == JobState::Queued {
            q.push(", owner = NULL");
        }
        q.push(" WHERE id = ")
            .push_bind(id.0)
            .push(" AND state IN (");
        let mut list = q.separated(", ");
        for s in &from {
            list.push_bind(s.as_str());
        }
        q.push(")");
        if let Some(owner) = owner {
            q.push(" AND owner = ").push_bind(owner.to_owned());
        }
        let done = q.build().execute(&self.write).await?;
        if done.rows_affected() == 1 {
            Ok(true)
        } else {
            self.not_moved(id).await
        }
    }

    /// [`Store::requeue_job`], and with `owner` only while that owner holds the job.
    async fn requeue(&self, id: JobId, owner: Option<&str>, reason: &str) -> Result<bool> {
        let mut tx = self.write.begin_with(BEGIN_IMMEDIATE).await?;
        // created_at is kept, so the retry keeps its place in the FIFO. The old token is
        // cleared: the lost worker's agent must not speak for the next attempt.
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', reason = ?, attempt = attempt + 1, \
             started_at = NULL, queued_at = ?, token_hash = NULL, owner = NULL \
             WHERE id = ? AND state IN ('provisioning', 'running') \
             AND (? IS NULL OR owner = ?)",
        )
        .bind(reason)
        .bind(ts(rows::now()))
        .bind(id.0)
        .bind(owner)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return self.not_moved(id).await;
        }
        // Steps of the lost attempt would otherwise show beside the new attempt's.
        sqlx::query("DELETE FROM steps WHERE job_id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn not_moved(&self, id: JobId) -> Result<bool> {
        if self.job_exists(id).await? {
            Ok(false)
        } else {
            Err(not_found_job(id))
        }
    }
}

/// Queue `jobs` of build `build_id`, in order, inside the caller's transaction.
async fn insert_jobs(
    tx: &mut sqlx::SqliteConnection,
    build_id: i64,
    jobs: &[NewJob],
    now: &str,
) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (build_id, pool, target, vars, state, attempt, created_at, \
             queued_at) VALUES (?, ?, ?, ?, 'queued', 1, ?, ?) RETURNING id",
        )
        .bind(build_id)
        .bind(&job.pool)
        .bind(&job.target)
        .bind(job.vars_json())
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        ids.push(JobId(id));
    }
    Ok(ids)
}

fn not_found_job(id: JobId) -> StoreError {
    StoreError::NotFound(format!("job {id}"))
}

/// A `u64` bound to an INTEGER column; PR numbers never come near the limit.
fn pr_number(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| rows::corrupt("builds", "pr_number", "pr number out of range"))
}

fn limit(n: u32) -> i64 {
    i64::from(if n == 0 { DEFAULT_LIMIT } else { n })
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_event(
        &self,
        source: &str,
        delivery_id: &str,
        kind: &str,
        payload: &[u8],
    ) -> Result<InsertOutcome> {
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (source, delivery_id, kind, payload, received_at) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (source, delivery_id) DO NOTHING RETURNING id",
        )
        .bind(source)
        .bind(delivery_id)
        .bind(kind)
        .bind(payload)
        .bind(ts(rows::now()))
        .fetch_optional(&self.write)
        .await?;
        if let Some(id) = inserted {
            return Ok(InsertOutcome::Inserted(id));
        }
        // Rows are never deleted, so the conflicting row is still there.
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM events WHERE source = ? AND delivery_id = ?")
                .bind(source)
                .bind(delivery_id)
                .fetch_one(&self.write)
                .await?;
        Ok(InsertOutcome::Duplicate(id))
    }

    async fn unprocessed_events(&self, max: u32) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE processed_at IS NULL ORDER BY id LIMIT ?"
        ))
        .bind(limit(max))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::event).collect()
    }

    async fn mark_event_processed(&self, id: i64, error: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE events SET processed_at = ?, error = ? WHERE id = ?")
            .bind(ts(rows::now()))
            .bind(error)
            .bind(id)
            .execute(&self.write)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("event {id}")));
        }
        Ok(())
    }

    async fn count_events(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(&self.read)
            .await?;
        Ok(n.unsigned_abs())
    }

    async fn create_build(&self, build: NewBuild) -> Result<(BuildId, Vec<JobId>)> {
        let change = &build.change;
        let trigger = serde_json::to_string(&change.trigger)
            .map_err(|e| rows::corrupt("builds", "trigger_json", e))?;
        let pr = change.trigger.pr_number().map(pr_number).transpose()?;
        let now = ts(rows::now());

        let mut tx = self.write.begin_with(BEGIN_IMMEDIATE).await?;
        let build_id: i64 = sqlx::query_scalar(
            "INSERT INTO builds (repo, trigger_json, pr_number, head_sha, head_ref, base_sha, \
             base_ref, author, pipeline, event_id, checkout_sha, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&change.repo)
        .bind(&trigger)
        .bind(pr)
        .bind(&change.head_sha)
        .bind(&change.head_ref)
        .bind(&change.base_sha)
        .bind(&change.base_ref)
        .bind(&change.author)
        .bind(&build.pipeline)
        .bind(build.event_id)
        .bind(&build.checkout_sha)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        let jobs = insert_jobs(&mut tx, build_id, &build.jobs, &now).await?;
        tx.commit().await?;
        Ok((BuildId(build_id), jobs))
    }

    async fn add_jobs(&self, build: BuildId, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let now = ts(rows::now());
        let mut tx = self.write.begin_with(BEGIN_IMMEDIATE).await?;
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM builds WHERE id = ?")
            .bind(build.0)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("build {build}")));
        }
        let ids = insert_jobs(&mut tx, build.0, &jobs, &now).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn set_build_checkout(&self, id: BuildId, sha: &str) -> Result<()> {
        let done = sqlx::query("UPDATE builds SET checkout_sha = ? WHERE id = ?")
            .bind(sha)
            .bind(id.0)
            .execute(&self.write)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("build {id}")));
        }
        Ok(())
    }

    async fn get_build(&self, id: BuildId) -> Result<Build> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?"))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build {id}")))?;
        rows::build(&row)
    }

    async fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        self.list_builds_where(filter, None).await
    }

    async fn list_builds_with_job_state(
        &self,
        filter: &BuildFilter,
        state: JobState,
    ) -> Result<Vec<Build>> {
        self.list_builds_where(filter, Some(state)).await
    }

    async fn get_job(&self, id: JobId) -> Result<Job> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?
            .ok_or_else(|| not_found_job(id))?;
        rows::job(&row)
    }

    async fn jobs_of_build(&self, id: BuildId) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE build_id = ? ORDER BY id"
        ))
        .bind(id.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::job).collect()
    }

    async fn active_jobs_of_pr(&self, repo: &str, pr: u64, before: BuildId) -> Result<Vec<Job>> {
        let Ok(pr) = i64::try_from(pr) else {
            return Ok(Vec::new());
        };
        // `builds.id < before`: "earlier builds" — a late, older event must never
        // supersede a newer build's jobs.
        let rows = sqlx::query(&format!(
            "SELECT {} FROM jobs j JOIN builds b ON b.id = j.build_id \
             WHERE b.repo = ? AND b.pr_number = ? AND b.id < ? \
             AND j.state IN ('queued', 'provisioning', 'running') \
             ORDER BY j.created_at, j.id",
            prefixed("j", JOB_COLUMNS)
        ))
        .bind(repo)
        .bind(pr)
        .bind(before.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::job).collect()
    }

    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<Job>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let mut q =
            QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ("));
        let mut list = q.separated(", ");
        for s in states {
            list.push_bind(s.as_str());
        }
        q.push(") ORDER BY created_at, id");
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(rows::job).collect()
    }

    async fn claim_next_job(&self, pool: &str, max_active: u32) -> Result<Option<Job>> {
        self.claim(pool, max_active, LOCAL_OWNER).await
    }

    async fn claim_next_job_for(
        &self,
        pool: &str,
        max_active: u32,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Job>> {
        // One server per file: nobody else could take the job over, so no lease is kept.
        let _ = lease;
        self.claim(pool, max_active, owner).await
    }

    async fn transition_job(
        &self,
        id: JobId,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<bool> {
        self.transition(id, None, from, to, reason).await
    }

    async fn transition_owned_job(
        &self,
        id: JobId,
        owner: &str,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<bool> {
        self.transition(id, Some(owner), from, to, reason).await
    }

    async fn requeue_job(&self, id: JobId, reason: &str) -> Result<bool> {
        self.requeue(id, None, reason).await
    }

    async fn requeue_owned_job(&self, id: JobId, owner: &str, reason: &str) -> Result<bool> {
        self.requeue(id, Some(owner), reason).await
    }

    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>> {
        let counted: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.read)
                .await?;
        let mut counts: Vec<(JobState, u64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
        for (state, n) in counted {
            let state = JobState::parse(&state)
                .ok_or_else(|| rows::corrupt("jobs", "state", format!("unknown {state:?}")))?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n.unsigned_abs();
            }
        }
        Ok(counts)
    }

    async fn upsert_step(&self, step: &StepRecord) -> Result<()> {
        // A full overwrite: the record sent is the step's whole current state.
        sqlx::query(
            "INSERT INTO steps (job_id, idx, name, started_at, finished_at, exit_code, outcome) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (job_id, idx) DO UPDATE SET name = excluded.name, \
             started_at = excluded.started_at, finished_at = excluded.finished_at, \
             exit_code = excluded.exit_code, outcome = excluded.outcome",
        )
        .bind(step.job_id.0)
        .bind(i64::from(step.index))
        .bind(&step.name)
        .bind(step.started_at.map(ts))
        .bind(step.finished_at.map(ts))
        .bind(step.exit_code)
        .bind(&step.outcome)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn steps_of_job(&self, id: JobId) -> Result<Vec<StepRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE job_id = ? ORDER BY idx"
        ))
        .bind(id.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::step).collect()
    }

    async fn set_job_token_hash(&self, id: JobId, hash: &str) -> Result<()> {
        let done = sqlx::query("UPDATE jobs SET token_hash = ? WHERE id = ?")
            .bind(hash)
            .bind(id.0)
            .execute(&self.write)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found_job(id));
        }
        Ok(())
    }

    async fn consume_job_token(&self, id: JobId, hash: &str) -> Result<bool> {
        // Compare and clear in one statement: two agents racing with the right hash
        // cannot both see it.
        let done = sqlx::query("UPDATE jobs SET token_hash = NULL WHERE id = ? AND token_hash = ?")
            .bind(id.0)
            .bind(hash)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_worker(&self, w: &WorkerRecord) -> Result<()> {
        // Upsert: a requeued job's next attempt reuses the name `slate-<job id>`.
        sqlx::query(
            "INSERT INTO workers (name, job_id, provider, pool, created_at) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET job_id = excluded.job_id, \
             provider = excluded.provider, pool = excluded.pool, created_at = excluded.created_at",
        )
        .bind(&w.name)
        .bind(w.job_id.0)
        .bind(&w.provider)
        .bind(&w.pool)
        .bind(ts(w.created_at))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn remove_worker(&self, name: &str) -> Result<()> {
        // Idempotent, like a provider's destroy.
        sqlx::query("DELETE FROM workers WHERE name = ?")
            .bind(name)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY created_at, name"
        ))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(rows::worker).collect()
    }

    async fn create_api_token(&self, name: &str, hash: &str) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_tokens (name, hash, created_at) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(hash)
        .bind(ts(rows::now()))
        .fetch_one(&self.write)
        .await?;
        Ok(id)
    }

    async fn find_api_token(&self, hash: &str) -> Result<Option<(i64, String)>> {
        let found: Option<(i64, String)> =
            sqlx::query_as("SELECT id, name FROM api_tokens WHERE hash = ?")
                .bind(hash)
                .fetch_optional(&self.read)
                .await?;
        Ok(found)
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>> {
        let found: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT id, name, created_at FROM api_tokens ORDER BY id")
                .fetch_all(&self.read)
                .await?;
        found
            .into_iter()
            .map(|(id, name, created)| {
                let created_at = chrono::DateTime::parse_from_rfc3339(&created)
                    .map_err(|e| rows::corrupt("api_tokens", "created_at", e))?
                    .with_timezone(&chrono::Utc);
                Ok(ApiToken {
                    id,
                    name,
                    created_at,
                })
            })
            .collect()
    }
}

/// `a, b` → `j.a, j.b`, for a join.
fn prefixed(table: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Move the WAL into the database file about once a second, off the commit path. PASSIVE
/// never blocks the writer; it ends when the store is closed.
async fn checkpoint_loop(pool: SqlitePool, alive: std::sync::Weak<()>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if pool.is_closed() || alive.upgrade().is_none() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "wal checkpoint");
        }
    }
}
