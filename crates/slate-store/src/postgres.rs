//! The PostgreSQL store: several server replicas share one queue (`FOR UPDATE SKIP
//! LOCKED`, per-pool advisory locks, leases) and wake each other with LISTEN/NOTIFY.

mod rows;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use slate_core::{Build, BuildId, Job, JobId, JobState, StepRecord};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::{
    ApiToken, BuildFilter, InsertOutcome, NewBuild, NewJob, Result, Store, StoreError, StoredEvent,
    WorkerRecord, LOCAL_OWNER,
};
use rows::{BUILD_COLUMNS, EVENT_COLUMNS, JOB_COLUMNS, STEP_COLUMNS, WORKER_COLUMNS};

/// Page size when a listing asks for `limit: 0` (as SQLite).
const DEFAULT_LIMIT: u32 = 50;

/// Connections per replica. The queue's critical sections are short transactions, so a
/// few connections serve many scheduler and runner tasks.
const MAX_CONNECTIONS: u32 = 10;

/// The channel every replica LISTENs on; the payload is the pool that may have work.
pub const JOBS_CHANNEL: &str = "slate_jobs";

/// First key of slate's two-key advisory locks (ASCII "slat"): the two-key space is
/// separate from the one-key space, and the constant keeps our locks apart from other
/// applications' in the same database.
const LOCK_NAMESPACE: i32 = 0x736c_6174;

/// How long the listener waits before retrying when it cannot reconnect.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// The PostgreSQL store. Cheap to clone; clones share the pool and the listener.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Fed by the background listener; [`Store::wait_for_work`] waits on it.
    wake: Arc<Notify>,
    listener: Arc<ListenerTask>,
}

/// The background LISTEN task, stopped when the last clone of the store goes.
#[derive(Debug)]
struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://user:password@host:port/db`), bring the schema up to
    /// date and start listening for job notifications.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url.parse()?).await
    }

    /// [`PgStore::connect`] with parsed options.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self> {
        let options = options.application_name("slate");
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options.clone())
            .await?;
        // sqlx holds an advisory lock while migrating: replicas starting together are safe.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;

        // A connection of its own, never recycled, so LISTEN stays registered.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await?;
        let mut listener = PgListener::connect_with(&listen_pool).await?;
        // Subscribed before connect returns: nothing enqueued after it is missed.
        listener.listen(JOBS_CHANNEL).await?;
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(listen(listener, wake.clone()));
        Ok(PgStore {
            pool,
            wake,
            listener: Arc::new(ListenerTask(task)),
        })
    }

    /// Tell every replica's scheduler there may be work (`NOTIFY slate_jobs`). The store
    /// does it itself on enqueue, requeue and when a job frees a slot.
    pub async fn notify_jobs(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(JOBS_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Close every connection (graceful shutdown) and stop listening.
    pub async fn close(&self) {
        self.listener.0.abort();
        self.pool.close().await;
    }

    /// The pool, for tests and tools that inspect the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Claim under the pool's advisory lock; `lease: None` takes no lease.
    ///
    /// One statement, `slate_claim_job` (see its migration): it takes the lock, which
    /// serializes the claimers of one pool across replicas until commit, so its count of
    /// active jobs cannot be stale (READ COMMITTED takes a fresh snapshot per statement
    /// inside the function too), then moves the oldest queued job. Running it as one
    /// autocommit statement keeps client round trips out of the time the lock is held.
    async fn claim(
        &self,
        pool: &str,
        max_active: u32,
        owner: &str,
        lease: Option<Duration>,
    ) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM slate_claim_job($1, $2, $3, $4, $5::interval)"
        ))
        .bind(LOCK_NAMESPACE)
        .bind(pool)
        .bind(i64::from(max_active))
        .bind(owner)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::job).transpose()
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
        let mut q = QueryBuilder::<Postgres>::new("UPDATE jobs SET state = ");
        q.push_bind(to.as_str())
            .push(", reason = ")
            .push_bind(reason.map(str::to_owned));
        match to {
            JobState::Running => {
                q.push(", started_at = now()");
            }
            // Back in the queue: the previous start is no longer this job's start.
            JobState::Queued => {
                q.push(", started_at = NULL");
            }
            _ => {}
        }
        if to.is_terminal() {
            // A finished job's agent token is of no further use.
            q.push(", finished_at = now(), token_hash = NULL");
        }
        // Out of provisioning/running nobody holds the job any more.
        let frees_slot = to.is_terminal() || to == JobState::Queued;
        if frees_slot {
            q.push(", owner = NULL, lease_until = NULL");
        }
        // One conditional UPDATE is the compare-and-set: under READ COMMITTED a
        // concurrent change makes PostgreSQL re-check the WHERE on the new row version.
        q.push(" WHERE id = ")
            .push_bind(id.0)
            .push(" AND state = ANY(")
            .push_bind(state_names(&from))
            .push(")");
        if let Some(owner) = owner {
            // Re-checked with the state on the row version a concurrent change leaves.
            q.push(" AND owner = ").push_bind(owner.to_owned());
        }
        q.push(" RETURNING pool");

        let mut tx = self.pool.begin().await?;
        let moved: Option<String> = q.build_query_scalar().fetch_optional(&mut *tx).await?;
        let Some(pool) = moved else {
            tx.rollback().await?;
            return self.not_moved(id).await;
        };
        if frees_slot {
            // A replica waiting at max_active (or a requeued job) has work now.
            notify_pool(&mut tx, &pool).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// [`Store::requeue_job`], and with `owner` only while that owner holds the job.
    async fn requeue(&self, id: JobId, owner: Option<&str>, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // created_at is kept, so the retry keeps its place in the FIFO. The old token is
        // cleared: the lost worker's agent must not speak for the next attempt.
        let moved: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'queued', reason = $1, attempt = attempt + 1, \
             started_at = NULL, queued_at = now(), token_hash = NULL, owner = NULL, \
             lease_until = NULL \
             WHERE id = $2 AND state IN ('provisioning', 'running') \
             AND ($3::text IS NULL OR owner = $3) RETURNING pool",
        )
        .bind(reason)
        .bind(id.0)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(pool) = moved else {
            tx.rollback().await?;
            return self.not_moved(id).await;
        };
        // Steps of the lost attempt would otherwise show beside the new attempt's.
        sqlx::query("DELETE FROM steps WHERE job_id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        notify_pool(&mut tx, &pool).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Builds newest first, optionally only those with a job in `state` (as SQLite).
    async fn list_builds_where(
        &self,
        filter: &BuildFilter,
        state: Option<JobState>,
    ) -> Result<Vec<Build>> {
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {BUILD_COLUMNS} FROM builds"));
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
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(rows::build).collect()
    }

    async fn job_exists(&self, id: JobId) -> Result<bool> {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// `Ok(false)` if the job exists (the caller's condition did not hold), else NotFound.
    async fn not_moved(&self, id: JobId) -> Result<bool> {
        if self.job_exists(id).await? {
            Ok(false)
        } else {
            Err(not_found_job(id))
        }
    }
}

/// Feed `wake` from the listener for as long as the store lives.
async fn listen(mut listener: PgListener, wake: Arc<Notify>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => wake_all(&wake),
            Ok(None) => {
                // The connection dropped and was re-established (re-LISTENing): whatever
                // was sent in between is lost, so assume there is work.
                tracing::warn!("job notifications: connection lost, reconnected");
                wake_all(&wake);
            }
            Err(e) => {
                tracing::warn!(error = %e, "job notifications: cannot listen, retrying");
                wake_all(&wake);
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        }
    }
}

/// Wake every current waiter, or, if none waits, the next one (a stored permit): a
/// notification arriving while the scheduler is busy claiming must not be lost.
fn wake_all(wake: &Notify) {
    wake.notify_one();
    wake.notify_waiters();
}

/// `NOTIFY slate_jobs, <pool>` inside the caller's transaction: delivered on commit only.
async fn notify_pool(conn: &mut PgConnection, pool: &str) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(JOBS_CHANNEL)
        .bind(pool)
        .execute(conn)
        .await?;
    Ok(())
}

/// Queue `jobs` of build `build_id`, in order, inside the caller's transaction, and wake
/// the schedulers of their pools (delivered at commit).
async fn insert_jobs(
    conn: &mut PgConnection,
    build_id: i64,
    jobs: &[NewJob],
) -> Result<Vec<JobId>> {
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (build_id, pool, target, vars, state, attempt, created_at, \
             queued_at) VALUES ($1, $2, $3, $4, 'queued', 1, now(), now()) RETURNING id",
        )
        .bind(build_id)
        .bind(&job.pool)
        .bind(&job.target)
        .bind(job.vars_json())
        .fetch_one(&mut *conn)
        .await?;
        ids.push(JobId(id));
    }
    let mut pools: Vec<&String> = jobs.iter().map(|j| &j.pool).collect();
    pools.sort();
    pools.dedup();
    for pool in pools {
        notify_pool(&mut *conn, pool).await?;
    }
    Ok(ids)
}

fn not_found_job(id: JobId) -> StoreError {
    StoreError::NotFound(format!("job {id}"))
}

/// A `u64` bound to a BIGINT column; PR numbers never come near the limit.
fn pr_number(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| rows::corrupt("builds", "pr_number", "pr number out of range"))
}

fn limit(n: u32) -> i64 {
    i64::from(if n == 0 { DEFAULT_LIMIT } else { n })
}

fn state_names(states: &[JobState]) -> Vec<String> {
    states.iter().map(|s| s.as_str().to_owned()).collect()
}

#[async_trait]
impl Store for PgStore {
    async fn insert_event(
        &self,
        source: &str,
        delivery_id: &str,
        kind: &str,
        payload: &[u8],
    ) -> Result<InsertOutcome> {
        // ON CONFLICT waits for a concurrent insert of the same delivery to commit, so
        // the SELECT below (a new snapshot) then sees it.
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (source, delivery_id, kind, payload, received_at) \
             VALUES ($1, $2, $3, $4, now()) \
             ON CONFLICT (source, delivery_id) DO NOTHING RETURNING id",
        )
        .bind(source)
        .bind(delivery_id)
        .bind(kind)
        .bind(payload)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = inserted {
            return Ok(InsertOutcome::Inserted(id));
        }
        // Rows are never deleted, so the conflicting row is still there.
        let id: i64 =
            sqlx::query_scalar("SELECT id FROM events WHERE source = $1 AND delivery_id = $2")
                .bind(source)
                .bind(delivery_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(InsertOutcome::Duplicate(id))
    }

    async fn unprocessed_events(&self, max: u32) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE processed_at IS NULL ORDER BY id LIMIT $1"
        ))
        .bind(limit(max))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::event).collect()
    }

    async fn mark_event_processed(&self, id: i64, error: Option<&str>) -> Result<()> {
        let done = sqlx::query("UPDATE events SET processed_at = now(), error = $1 WHERE id = $2")
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("event {id}")));
        }
        Ok(())
    }

    async fn count_events(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.unsigned_abs())
    }

    async fn create_build(&self, build: NewBuild) -> Result<(BuildId, Vec<JobId>)> {
        let change = &build.change;
        let trigger = serde_json::to_string(&change.trigger)
            .map_err(|e| rows::corrupt("builds", "trigger_json", e))?;
        let pr = change.trigger.pr_number().map(pr_number).transpose()?;

        // Timestamps come from the database's clock (now() is the transaction's start):
        // one clock for every replica keeps the FIFO fair across them.
        let mut tx = self.pool.begin().await?;
        let build_id: i64 = sqlx::query_scalar(
            "INSERT INTO builds (repo, trigger_json, pr_number, head_sha, head_ref, base_sha, \
             base_ref, author, pipeline, event_id, checkout_sha, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now()) RETURNING id",
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
        .fetch_one(&mut *tx)
        .await?;
        let jobs = insert_jobs(&mut tx, build_id, &build.jobs).await?;
        tx.commit().await?;
        Ok((BuildId(build_id), jobs))
    }

    async fn add_jobs(&self, build: BuildId, jobs: Vec<NewJob>) -> Result<Vec<JobId>> {
        let mut tx = self.pool.begin().await?;
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM builds WHERE id = $1")
            .bind(build.0)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("build {build}")));
        }
        let ids = insert_jobs(&mut tx, build.0, &jobs).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn set_build_checkout(&self, id: BuildId, sha: &str) -> Result<()> {
        let done = sqlx::query("UPDATE builds SET checkout_sha = $1 WHERE id = $2")
            .bind(sha)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("build {id}")));
        }
        Ok(())
    }

    async fn get_build(&self, id: BuildId) -> Result<Build> {
        let row = sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
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
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| not_found_job(id))?;
        rows::job(&row)
    }

    async fn jobs_of_build(&self, id: BuildId) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE build_id = $1 ORDER BY id"
        ))
        .bind(id.0)
        .fetch_all(&self.pool)
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
             WHERE b.repo = $1 AND b.pr_number = $2 AND b.id < $3 \
             AND j.state IN ('queued', 'provisioning', 'running') \
             ORDER BY j.created_at, j.id",
            prefixed("j", JOB_COLUMNS)
        ))
        .bind(repo)
        .bind(pr)
        .bind(before.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::job).collect()
    }

    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<Job>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = ANY($1) ORDER BY created_at, id"
        ))
        .bind(state_names(states))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::job).collect()
    }

    async fn claim_next_job(&self, pool: &str, max_active: u32) -> Result<Option<Job>> {
        self.claim(pool, max_active, LOCAL_OWNER, None).await
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
                .fetch_all(&self.pool)
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
        let index = i32::try_from(step.index)
            .map_err(|_| rows::corrupt("steps", "idx", format!("{} out of range", step.index)))?;
        // A full overwrite: the record sent is the step's whole current state.
        sqlx::query(
            "INSERT INTO steps (job_id, idx, name, started_at, finished_at, exit_code, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (job_id, idx) DO UPDATE SET name = EXCLUDED.name, \
             started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at, \
             exit_code = EXCLUDED.exit_code, outcome = EXCLUDED.outcome",
        )
        .bind(step.job_id.0)
        .bind(index)
        .bind(&step.name)
        .bind(step.started_at)
        .bind(step.finished_at)
        .bind(step.exit_code)
        .bind(&step.outcome)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn steps_of_job(&self, id: JobId) -> Result<Vec<StepRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE job_id = $1 ORDER BY idx"
        ))
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::step).collect()
    }

    async fn set_job_token_hash(&self, id: JobId, hash: &str) -> Result<()> {
        let done = sqlx::query("UPDATE jobs SET token_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(id.0)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found_job(id));
        }
        Ok(())
    }

    async fn consume_job_token(&self, id: JobId, hash: &str) -> Result<bool> {
        // Compare and clear in one statement: two agents racing with the right hash
        // cannot both see it.
        let done =
            sqlx::query("UPDATE jobs SET token_hash = NULL WHERE id = $1 AND token_hash = $2")
                .bind(id.0)
                .bind(hash)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_worker(&self, w: &WorkerRecord) -> Result<()> {
        // Upsert: a requeued job's next attempt reuses the name `slate-<job id>`.
        sqlx::query(
            "INSERT INTO workers (name, job_id, provider, pool, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET job_id = EXCLUDED.job_id, \
             provider = EXCLUDED.provider, pool = EXCLUDED.pool, \
             created_at = EXCLUDED.created_at",
        )
        .bind(&w.name)
        .bind(w.job_id.0)
        .bind(&w.provider)
        .bind(&w.pool)
        .bind(w.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_worker(&self, name: &str) -> Result<()> {
        // Idempotent, like a provider's destroy.
        sqlx::query("DELETE FROM workers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::worker).collect()
    }

    async fn create_api_token(&self, name: &str, hash: &str) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_tokens (name, hash, created_at) VALUES ($1, $2, now()) RETURNING id",
        )
        .bind(name)
        .bind(hash)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn find_api_token(&self, hash: &str) -> Result<Option<(i64, String)>> {
        let found: Option<(i64, String)> =
            sqlx::query_as("SELECT id, name FROM api_tokens WHERE hash = $1")
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found)
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM api_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::api_token).collect()
    }

    async fn claim_next_job_for(
        &self,
        pool: &str,
        max_active: u32,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Job>> {
        self.claim(pool, max_active, owner, Some(lease)).await
    }

    async fn renew_leases(&self, owner: &str, lease: Duration) -> Result<()> {
        // Only leased jobs: a lease-less claim must not start to expire.
        sqlx::query(
            "UPDATE jobs SET lease_until = now() + $2::interval \
             WHERE owner = $1 AND lease_until IS NOT NULL \
             AND state IN ('provisioning', 'running')",
        )
        .bind(owner)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn expired_leases(&self, owner: &str, lease: Duration) -> Result<Vec<Job>> {
        // Taking over in one statement is what makes each expired job go to one replica:
        // a row another replica is taking is skipped, and a row it took meanwhile fails
        // the re-checked `lease_until < now()`.
        let rows = sqlx::query(&format!(
            "UPDATE jobs SET owner = $1, lease_until = now() + $2::interval WHERE id IN \
             (SELECT id FROM jobs WHERE lease_until < now() \
              AND state IN ('provisioning', 'running') FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(owner)
        .bind(lease)
        .fetch_all(&self.pool)
        .await?;
        let mut jobs = rows.iter().map(rows::job).collect::<Result<Vec<_>>>()?;
        // RETURNING has no order; callers handle the oldest first, as everywhere else.
        jobs.sort_by_key(|j| (j.created_at, j.id));
        Ok(jobs)
    }

    async fn claim_event(&self, id: i64, owner: &str, lease: Duration) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE events SET claimed_by = $2, claimed_until = now() + $3::interval \
             WHERE id = $1 AND processed_at IS NULL \
             AND (claimed_until IS NULL OR claimed_until < now() OR claimed_by = $2)",
        )
        .bind(id)
        .bind(owner)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn wait_for_work(&self, timeout: Duration) {
        // Timing out is an answer too: the caller polls then, as with SQLite.
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
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
