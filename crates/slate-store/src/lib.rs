//! Persistence behind one trait: events, builds, jobs, steps, workers. SQLite is the
//! embedded default; PostgreSQL serves several server replicas sharing one queue.

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use slate_core::{Build, BuildId, Change, Job, JobId, JobState, StepRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("unsupported database url {0:?}: expected sqlite:<path> or postgres://…")]
    UnsupportedUrl(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The owner recorded by [`Store::claim_next_job`], which takes no lease: such a job is
/// held by the one server using the database and never expires.
pub const LOCAL_OWNER: &str = "local";

/// A forge event as received, stored before it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: i64,
    /// `github`, `manual`…
    pub source: String,
    /// Forge delivery id (`X-GitHub-Delivery`); unique per source.
    pub delivery_id: String,
    /// Event name (`pull_request`, `push`, `ping`, `submit`…).
    pub kind: String,
    pub payload: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted(i64),
    /// The same (source, delivery id) was stored before: nothing new was written.
    Duplicate(i64),
}

/// A build to create with its jobs, in one transaction.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub change: Change,
    pub pipeline: String,
    /// The event that caused it, if any.
    pub event_id: Option<i64>,
    /// The commit its jobs check out, when known at creation. Stored in the same
    /// transaction as the jobs: with several replicas, another one may claim a job the
    /// moment it is committed, and must find the build's checkout already there.
    pub checkout_sha: Option<String>,
    /// Its jobs, queued in this order.
    pub jobs: Vec<NewJob>,
}

/// A job to create: a pool, and optionally a target with its variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub pool: String,
    pub target: Option<String>,
    pub vars: BTreeMap<String, String>,
}

impl NewJob {
    /// A plain job of `pool`: no target, no variables.
    pub fn pool(pool: impl Into<String>) -> Self {
        NewJob {
            pool: pool.into(),
            target: None,
            vars: BTreeMap::new(),
        }
    }

    /// A job of `pool` building `target` with `vars`.
    pub fn target(
        pool: impl Into<String>,
        target: impl Into<String>,
        vars: BTreeMap<String, String>,
    ) -> Self {
        NewJob {
            pool: pool.into(),
            target: Some(target.into()),
            vars,
        }
    }

    /// The variables as stored (a JSON object).
    fn vars_json(&self) -> String {
        serde_json::to_string(&self.vars).expect("a string map serializes")
    }
}

/// A worker resource recorded before the provider creates it (so a crash cannot hide it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    /// `slate-<job id>`.
    pub name: String,
    pub job_id: JobId,
    pub provider: String,
    pub pool: String,
    pub created_at: DateTime<Utc>,
}

/// An API token as listed (its secret is never stored, only its sha256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Filters for listing builds, newest first.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub repo: Option<String>,
    pub pr: Option<u64>,
    pub limit: u32,
    pub offset: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- events ----

    /// Store an event; idempotent on (source, delivery_id).
    async fn insert_event(
        &self,
        source: &str,
        delivery_id: &str,
        kind: &str,
        payload: &[u8],
    ) -> Result<InsertOutcome>;
    /// Events not yet processed, oldest first.
    async fn unprocessed_events(&self, limit: u32) -> Result<Vec<StoredEvent>>;
    /// Mark an event handled; `error` records why it could not be.
    async fn mark_event_processed(&self, id: i64, error: Option<&str>) -> Result<()>;
    async fn count_events(&self) -> Result<u64>;

    // ---- builds and jobs ----

    /// Create a build and its queued jobs atomically.
    async fn create_build(&self, build: NewBuild) -> Result<(BuildId, Vec<JobId>)>;
    /// Queue more jobs in an existing build (dynamic jobs, made after planning), in order,
    /// atomically. `NotFound` if the build does not exist.
    async fn add_jobs(&self, build: BuildId, jobs: Vec<NewJob>) -> Result<Vec<JobId>>;
    async fn set_build_checkout(&self, id: BuildId, sha: &str) -> Result<()>;
    async fn get_build(&self, id: BuildId) -> Result<Build>;
    async fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>>;
    async fn get_job(&self, id: JobId) -> Result<Job>;
    async fn jobs_of_build(&self, id: BuildId) -> Result<Vec<Job>>;
    /// Active jobs of the PR's builds older than `before` (build id smaller), so a late,
    /// older event never cancels a newer build. `BuildId(i64::MAX)` means all of them.
    async fn active_jobs_of_pr(&self, repo: &str, pr: u64, before: BuildId) -> Result<Vec<Job>>;
    /// All jobs in any of `states`, oldest first.
    async fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<Job>>;

    /// Atomically take the oldest queued job of `pool` (FIFO by enqueue time) and move it
    /// to `provisioning`, if fewer than `max_active` jobs of that pool are provisioning or
    /// running. Two callers never get the same job.
    async fn claim_next_job(&self, pool: &str, max_active: u32) -> Result<Option<Job>>;

    /// Compare-and-set: move the job to `to` only if it is in one of `from`. Sets
    /// `started_at` on `running`, `finished_at` on a terminal state. Returns whether it moved.
    async fn transition_job(
        &self,
        id: JobId,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<bool>;
    /// Put a job back in the queue for another attempt (infrastructure failure).
    async fn requeue_job(&self, id: JobId, reason: &str) -> Result<bool>;

    /// [`Store::transition_job`] by the runner of a claimed job: the job moves only while
    /// `owner` (the claim's owner, [`LOCAL_OWNER`] for a lease-less claim) still holds
    /// it. A replica whose lease ran out, and whose job another replica took over,
    /// requeued and perhaps claimed again, must not start or finish that job: the new
    /// attempt is in the same states, so the compare-and-set on the state alone would let
    /// it. Returns whether it moved; `NotFound` if the job does not exist.
    async fn transition_owned_job(
        &self,
        id: JobId,
        owner: &str,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<bool>;
    /// [`Store::requeue_job`] under the same condition as [`Store::transition_owned_job`].
    async fn requeue_owned_job(&self, id: JobId, owner: &str, reason: &str) -> Result<bool>;

    /// Count of jobs per state (for metrics).
    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>>;

    // ---- steps ----

    async fn upsert_step(&self, step: &StepRecord) -> Result<()>;
    async fn steps_of_job(&self, id: JobId) -> Result<Vec<StepRecord>>;

    // ---- job tokens ----

    /// Store the hash of the job's one-time agent token.
    async fn set_job_token_hash(&self, id: JobId, hash: &str) -> Result<()>;
    /// Consume the token: returns true once, when `hash` matches, then clears it.
    async fn consume_job_token(&self, id: JobId, hash: &str) -> Result<bool>;

    // ---- workers ----

    async fn record_worker(&self, w: &WorkerRecord) -> Result<()>;
    async fn remove_worker(&self, name: &str) -> Result<()>;
    async fn list_workers(&self) -> Result<Vec<WorkerRecord>>;

    // ---- API tokens (bearer tokens for the API and logins for the web UI) ----

    /// Store a new token by the hex sha256 of its secret; returns its id.
    async fn create_api_token(&self, name: &str, hash: &str) -> Result<i64>;
    /// The token whose secret hashes to `hash`: `(id, name)`.
    async fn find_api_token(&self, hash: &str) -> Result<Option<(i64, String)>>;
    /// Every token, oldest first.
    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>>;

    /// [`Store::list_builds`] restricted to builds with at least one job in `state`.
    ///
    /// The default is correct for any store but reads every job in that state; stores
    /// override it with one indexed query.
    async fn list_builds_with_job_state(
        &self,
        filter: &BuildFilter,
        state: JobState,
    ) -> Result<Vec<Build>> {
        let mut ids: Vec<BuildId> = self
            .jobs_in_states(&[state])
            .await?
            .into_iter()
            .map(|j| j.build_id)
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.dedup();
        let limit = if filter.limit == 0 { 50 } else { filter.limit } as usize;
        let mut skip = filter.offset as usize;
        let mut out = Vec::new();
        for id in ids {
            let b = self.get_build(id).await?;
            if filter.repo.as_ref().is_some_and(|r| *r != b.change.repo)
                || filter
                    .pr
                    .is_some_and(|p| b.change.trigger.pr_number() != Some(p))
            {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(b);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    // ---- replicas: leases and wake-ups ----
    //
    // The defaults are right for a store that one server uses alone (SQLite): there is
    // no other owner whose lease could run out, and a crash of the only owner is handled
    // by the restart's reconciliation. PostgreSQL overrides all four.

    /// [`Store::claim_next_job`], recording that `owner` (a replica's id) holds the job
    /// until `lease` from now. The owner keeps it with [`Store::renew_leases`]; if it
    /// stops (dies), another replica takes the job over with [`Store::expired_leases`].
    async fn claim_next_job_for(
        &self,
        pool: &str,
        max_active: u32,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Job>> {
        let _ = (owner, lease);
        self.claim_next_job(pool, max_active).await
    }

    /// Extend to `lease` from now the lease of every provisioning or running job that
    /// `owner` holds. Called periodically, well within the lease.
    async fn renew_leases(&self, owner: &str, lease: Duration) -> Result<()> {
        let _ = (owner, lease);
        Ok(())
    }

    /// Take over the provisioning or running jobs whose lease ran out (their owner
    /// died): each is returned to exactly one caller, now leased to `owner`, so that
    /// caller alone requeues or fails it. Jobs claimed without a lease never expire.
    async fn expired_leases(&self, owner: &str, lease: Duration) -> Result<Vec<Job>> {
        let _ = (owner, lease);
        Ok(Vec::new())
    }

    /// Claim an unprocessed event for `owner` for `lease`, so that of several replicas
    /// only one handles it; an expired claim (its replica died) can be taken again. The
    /// default (one server per store) always succeeds.
    async fn claim_event(&self, id: i64, owner: &str, lease: Duration) -> Result<bool> {
        let _ = (id, owner, lease);
        Ok(true)
    }

    /// Wait until there may be work for the scheduler (a job enqueued or a slot freed,
    /// by any replica) or `timeout` passes. Wake-ups may be spurious; callers claim
    /// and wait again. The default has no one else to hear from and just sleeps.
    async fn wait_for_work(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
}

/// Open the store a database URL names: `postgres://…` (or `postgresql://…`) for
/// PostgreSQL, `sqlite:<path>` / `sqlite://<path>` for SQLite; an empty URL or an empty
/// SQLite path means the embedded default at `sqlite_default_path`.
pub async fn open_store(url: &str, sqlite_default_path: &Path) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::connect(url).await?));
    }
    let path = if url.is_empty() {
        ""
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest.strip_prefix("//").unwrap_or(rest)
    } else {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    };
    let path = if path.is_empty() {
        sqlite_default_path
    } else {
        Path::new(path)
    };
    Ok(Arc::new(SqliteStore::open(path).await?))
}
