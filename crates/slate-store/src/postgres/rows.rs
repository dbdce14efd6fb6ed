//! Row decoding for PostgreSQL: every column that does not decode becomes
//! `StoreError::Corrupt` naming its table and column, as in the SQLite backend.

use slate_core::{Build, BuildId, Change, Job, JobId, JobState, StepRecord, Trigger};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

use crate::{ApiToken, Result, StoreError, StoredEvent, WorkerRecord};

/// Columns selected for a job (the same list as SQLite's; the lease columns are the
/// store's business, not the domain's).
pub(super) const JOB_COLUMNS: &str =
    "id, build_id, pool, target, vars, state, reason, attempt, created_at, started_at, \
     finished_at";

pub(super) const BUILD_COLUMNS: &str = "id, repo, trigger_json, head_sha, head_ref, base_sha, \
     base_ref, author, pipeline, checkout_sha, created_at";

pub(super) const EVENT_COLUMNS: &str = "id, source, delivery_id, kind, payload, received_at";

pub(super) const STEP_COLUMNS: &str =
    "job_id, idx, name, started_at, finished_at, exit_code, outcome";

pub(super) const WORKER_COLUMNS: &str = "name, job_id, provider, pool, created_at";

pub(super) fn corrupt(table: &str, column: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{table}.{column}: {why}"))
}

fn get<'r, T>(row: &'r PgRow, table: &str, column: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(column).map_err(|e| corrupt(table, column, e))
}

/// INTEGER columns holding values the domain keeps unsigned (attempt, step index).
fn get_u32(row: &PgRow, table: &str, column: &str) -> Result<u32> {
    let v: i32 = get(row, table, column)?;
    u32::try_from(v).map_err(|_| corrupt(table, column, format!("{v} out of range")))
}

pub(super) fn job(row: &PgRow) -> Result<Job> {
    const T: &str = "jobs";
    let state: String = get(row, T, "state")?;
    Ok(Job {
        id: JobId(get(row, T, "id")?),
        build_id: BuildId(get(row, T, "build_id")?),
        pool: get(row, T, "pool")?,
        target: get(row, T, "target")?,
        vars: {
            let v: Option<String> = get(row, T, "vars")?;
            match v {
                None => Default::default(),
                Some(v) => serde_json::from_str(&v).map_err(|e| corrupt(T, "vars", e))?,
            }
        },
        state: JobState::parse(&state)
            .ok_or_else(|| corrupt(T, "state", format!("unknown state {state:?}")))?,
        reason: get(row, T, "reason")?,
        attempt: get_u32(row, T, "attempt")?,
        created_at: get(row, T, "created_at")?,
        started_at: get(row, T, "started_at")?,
        finished_at: get(row, T, "finished_at")?,
    })
}

pub(super) fn build(row: &PgRow) -> Result<Build> {
    const T: &str = "builds";
    let trigger: String = get(row, T, "trigger_json")?;
    let trigger: Trigger =
        serde_json::from_str(&trigger).map_err(|e| corrupt(T, "trigger_json", e))?;
    Ok(Build {
        id: BuildId(get(row, T, "id")?),
        change: Change {
            repo: get(row, T, "repo")?,
            trigger,
            head_sha: get(row, T, "head_sha")?,
            head_ref: get(row, T, "head_ref")?,
            base_sha: get(row, T, "base_sha")?,
            base_ref: get(row, T, "base_ref")?,
            author: get(row, T, "author")?,
        },
        pipeline: get(row, T, "pipeline")?,
        checkout_sha: get(row, T, "checkout_sha")?,
        created_at: get(row, T, "created_at")?,
    })
}

pub(super) fn event(row: &PgRow) -> Result<StoredEvent> {
    const T: &str = "events";
    Ok(StoredEvent {
        id: get(row, T, "id")?,
        source: get(row, T, "source")?,
        delivery_id: get(row, T, "delivery_id")?,
        kind: get(row, T, "kind")?,
        payload: get(row, T, "payload")?,
        received_at: get(row, T, "received_at")?,
    })
}

pub(super) fn step(row: &PgRow) -> Result<StepRecord> {
    const T: &str = "steps";
    Ok(StepRecord {
        job_id: JobId(get(row, T, "job_id")?),
        index: get_u32(row, T, "idx")?,
        name: get(row, T, "name")?,
        started_at: get(row, T, "started_at")?,
        finished_at: get(row, T, "finished_at")?,
        exit_code: get(row, T, "exit_code")?,
        outcome: get(row, T, "outcome")?,
    })
}

pub(super) fn worker(row: &PgRow) -> Result<WorkerRecord> {
    const T: &str = "workers";
    Ok(WorkerRecord {
        name: get(row, T, "name")?,
        job_id: JobId(get(row, T, "job_id")?),
        provider: get(row, T, "provider")?,
        pool: get(row, T, "pool")?,
        created_at: get(row, T, "created_at")?,
    })
}

pub(super) fn api_token(row: &PgRow) -> Result<ApiToken> {
    const T: &str = "api_tokens";
    Ok(ApiToken {
        id: get(row, T, "id")?,
        name: get(row, T, "name")?,
        created_at: get(row, T, "created_at")?,
    })
}
