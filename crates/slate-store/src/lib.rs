//! Persistence behind one trait: events, builds, jobs, steps, workers. SQLite is the
//! embedded default; the trait carries no SQLite-only semantics so PostgreSQL can follow.

mod sqlite;

pub use sqlite::SqliteStore;

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
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    /// One job per pool, in order.
    pub pools: Vec<String>,
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
}
