//! Row decoding and timestamp encoding: every column that does not parse becomes
//! `StoreError::Corrupt` naming its table and column.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use slate_core::{Build, BuildId, Change, Job, JobId, JobState, StepRecord, Trigger};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite};

use crate::{Result, StoreError, StoredEvent, WorkerRecord};

/// Columns selected for a job, in the order [`job`] reads them by name.
pub(super) const JOB_COLUMNS: &str =
    "id, build_id, pool, target, vars, state, reason, attempt, created_at, started_at, \
     finished_at";

pub(super) const BUILD_COLUMNS: &str = "id, repo, trigger_json, head_sha, head_ref, base_sha, \
     base_ref, author, pipeline, checkout_sha, created_at";

pub(super) const EVENT_COLUMNS: &str = "id, source, delivery_id, kind, payload, received_at";

pub(super) const STEP_COLUMNS: &str =
    "job_id, idx, name, started_at, finished_at, exit_code, outcome";

pub(super) const WORKER_COLUMNS: &str = "name, job_id, provider, pool, created_at";

/// The current time at the precision the store keeps (microseconds, as PostgreSQL does),
/// so a value read back equals the value written.
pub(super) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Fixed-width UTC text: lexical order is time order, which ORDER BY relies on. (sqlx's
/// own encoding drops trailing zero digits, so `…05Z` would sort after `…05.1Z`.)
pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(super) fn corrupt(table: &str, column: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{table}.{column}: {why}"))
}

fn get<'r, T>(row: &'r SqliteRow, table: &str, column: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column).map_err(|e| corrupt(table, column, e))
}

fn get_u32(row: &SqliteRow, table: &str, column: &str) -> Result<u32> {
    let v: i64 = get(row, table, column)?;
    u32::try_from(v).map_err(|_| corrupt(table, column, format!("{v} out of range")))
}

fn get_ts(row: &SqliteRow, table: &str, column: &str) -> Result<DateTime<Utc>> {
    let s: String = get(row, table, column)?;
    parse_ts(&s, table, column)
}

fn get_opt_ts(row: &SqliteRow, table: &str, column: &str) -> Result<Option<DateTime<Utc>>> {
    let s: Option<String> = get(row, table, column)?;
    s.map(|s| parse_ts(&s, table, column)).transpose()
}

fn parse_ts(s: &str, table: &str, column: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(table, column, format!("{s:?}: {e}")))
}

pub(super) fn job(row: &SqliteRow) -> Result<Job> {
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
        created_at: get_ts(row, T, "created_at")?,
        started_at: get_opt_ts(row, T, "started_at")?,
        finished_at: get_opt_ts(row, T, "finished_at")?,
    })
}

pub(super) fn build(row: &SqliteRow) -> Result<Build> {
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
        created_at: get_ts(row, T, "created_at")?,
    })
}

pub(super) fn event(row: &SqliteRow) -> Result<StoredEvent> {
    const T: &str = "events";
    Ok(StoredEvent {
        id: get(row, T, "id")?,
        source: get(row, T, "source")?,
        delivery_id: get(row, T, "delivery_id")?,
        kind: get(row, T, "kind")?,
        payload: get(row, T, "payload")?,
        received_at: get_ts(row, T, "received_at")?,
    })
}

pub(super) fn step(row: &SqliteRow) -> Result<StepRecord> {
    const T: &str = "steps";
    let exit_code: Option<i64> = get(row, T, "exit_code")?;
    Ok(StepRecord {
        job_id: JobId(get(row, T, "job_id")?),
        index: get_u32(row, T, "idx")?,
        name: get(row, T, "name")?,
        started_at: get_opt_ts(row, T, "started_at")?,
        finished_at: get_opt_ts(row, T, "finished_at")?,
        exit_code: exit_code
            .map(|c| i32::try_from(c).map_err(|_| corrupt(T, "exit_code", "out of range")))
            .transpose()?,
        outcome: get(row, T, "outcome")?,
    })
}

pub(super) fn worker(row: &SqliteRow) -> Result<WorkerRecord> {
    const T: &str = "workers";
    Ok(WorkerRecord {
        name: get(row, T, "name")?,
        job_id: JobId(get(row, T, "job_id")?),
        provider: get(row, T, "provider")?,
        pool: get(row, T, "pool")?,
        created_at: get_ts(row, T, "created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_are_fixed_width_and_round_trip() {
        let whole = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        let frac = whole + chrono::Duration::microseconds(100_000);
        assert_eq!(ts(whole), "2025-01-02T03:04:05.000000Z");
        assert_eq!(ts(frac), "2025-01-02T03:04:05.100000Z");
        assert!(ts(whole) < ts(frac));
        assert_eq!(parse_ts(&ts(frac), "t", "c").unwrap(), frac);
    }

    #[test]
    fn bad_timestamp_names_table_and_column() {
        let err = parse_ts("yesterday", "jobs", "started_at").unwrap_err();
        assert!(err.to_string().contains("jobs.started_at"), "{err}");
    }
}
