//! The storage story suite run against `SqliteStore`, plus what only SQLite has: the
//! file, its journal mode, several handles on one file, rows damaged behind our back.

#[macro_use]
mod suite;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use slate_core::{JobId, JobState};
use slate_store::{NewBuild, NewJob, SqliteStore, Store, StoreError};
use tempfile::TempDir;

/// A database file in a temporary directory, removed with it.
struct Sqlite {
    dir: TempDir,
}

impl Sqlite {
    async fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("slate.db")
    }
}

#[async_trait]
impl suite::Backend for Sqlite {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&self.path()).await.unwrap())
    }
}

store_suite!(Sqlite::new());

/// How many migrations the backend ships (each applied exactly once).
fn migration_files(backend: &str) -> i64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let sql = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    i64::try_from(sql).unwrap()
}

/// A raw connection to the file, to look at or damage what the store wrote.
async fn raw(path: &std::path::Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

async fn one_job(store: &SqliteStore, pools: &[&str]) -> Vec<JobId> {
    let change = slate_core::Change {
        repo: "r/r".to_owned(),
        trigger: slate_core::Trigger::Manual {
            branch: "main".to_owned(),
        },
        head_sha: "h".to_owned(),
        head_ref: "main".to_owned(),
        base_sha: None,
        base_ref: None,
        author: "a".to_owned(),
    };
    let build = NewBuild {
        change,
        pipeline: "default".to_owned(),
        event_id: None,
        checkout_sha: None,
        jobs: pools.iter().map(|p| NewJob::pool(*p)).collect(),
    };
    store.create_build(build).await.unwrap().1
}

#[tokio::test]
async fn sqlite_open_creates_the_file_in_wal_mode() {
    let db = Sqlite::new().await;
    assert!(!db.path().exists());
    let store = SqliteStore::open(&db.path()).await.unwrap();
    assert!(db.path().exists());
    store
        .insert_event("github", "d", "ping", b"{}")
        .await
        .unwrap();

    let mut conn = raw(&db.path()).await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // Migrations are recorded once, and opening again applies nothing new.
    store.close().await;
    let again = SqliteStore::open(&db.path()).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, migration_files("sqlite"));
    assert_eq!(again.count_events().await.unwrap(), 1);
}

/// Two handles on one file behave like two server processes: their writers contend in
/// SQLite's lock (BEGIN IMMEDIATE + busy timeout), not in one in-process pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_two_handles_on_one_file_claim_each_job_once() {
    let db = Sqlite::new().await;
    let a = SqliteStore::open(&db.path()).await.unwrap();
    let b = SqliteStore::open(&db.path()).await.unwrap();
    let created = one_job(&a, &["c"; 30]).await;

    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = if n % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store.claim_next_job("c", u32::MAX).await.unwrap() {
                got.push(job.id);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    claimed.sort();
    assert_eq!(claimed, created);
}

#[tokio::test]
async fn sqlite_damaged_rows_are_corrupt_naming_table_and_column() {
    let db = Sqlite::new().await;
    let store = SqliteStore::open(&db.path()).await.unwrap();
    let jobs = one_job(&store, &["p"]).await;
    let build = store.get_job(jobs[0]).await.unwrap().build_id;

    let mut conn = raw(&db.path()).await;
    sqlx::query("UPDATE jobs SET started_at = 'yesterday' WHERE id = ?")
        .bind(jobs[0].0)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE builds SET trigger_json = '{\"kind\":\"nope\"}' WHERE id = ?")
        .bind(build.0)
        .execute(&mut conn)
        .await
        .unwrap();

    match store.get_job(jobs[0]).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("jobs.started_at"), "{m}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
    match store.get_build(build).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("builds.trigger_json"), "{m}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
    // The schema itself refuses a state the core does not know.
    let bad_state = sqlx::query("UPDATE jobs SET state = 'lost' WHERE id = ?")
        .bind(jobs[0].0)
        .execute(&mut conn)
        .await;
    assert!(bad_state.is_err());
    // Listings fail the same way rather than skip the bad row.
    match store.jobs_in_states(&[JobState::Queued]).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("jobs.started_at"), "{m}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
}
