//! The storage story suite run against `PgStore`, plus what only PostgreSQL is for:
//! replicas sharing one queue (claims, max_active, leases) and waking each other.
//!
//! Every test gets a database of its own, created through the admin URL
//! (`SLATE_TEST_PG_URL`, default `postgres://slate:slate@127.0.0.1:5432/postgres`) and
//! dropped afterwards, even when the test fails. `scripts/postgres.sh` sets that up.

#[macro_use]
mod suite;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use slate_core::{Change, JobId, JobState, Trigger};
use slate_store::{open_store, NewBuild, NewJob, PgStore, Store, StoreError};
use sqlx::{Connection, PgConnection};

const DEFAULT_ADMIN_URL: &str = "postgres://slate:slate@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("SLATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// `url` with its database replaced by `db` (query parameters kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{db}{query}", &base[..end])
}

/// A database of this test's own, dropped with the value (also while unwinding).
struct Pg {
    admin: String,
    name: String,
    url: String,
}

impl Pg {
    async fn new() -> Pg {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL through the admin url ({}): {e}\n\
                 run `scripts/postgres.sh` as root to install and start it, or set \
                 SLATE_TEST_PG_URL to a role with CREATEDB",
                if std::env::var_os("SLATE_TEST_PG_URL").is_some() {
                    "SLATE_TEST_PG_URL"
                } else {
                    DEFAULT_ADMIN_URL
                }
            )
        });
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        // Unique across test processes (pid) and within one (sequence).
        let name = format!(
            "slate_test_{}_{}_{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating {name} (does the role have CREATEDB?): {e}"));
        let url = with_database(&admin, &name);
        Pg { admin, name, url }
    }

    async fn store(&self) -> PgStore {
        PgStore::connect(&self.url).await.unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread with
        // a runtime of its own does the async work. FORCE ends the stores' connections.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .map(drop)
            })
        })
        .join();
        // Never panic here: it may be during a failing test's unwinding.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("could not drop test database {}", self.name),
        }
    }
}

#[async_trait]
impl suite::Backend for Pg {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(self.store().await)
    }
}

store_suite!(Pg::new());

/// How many migrations the backend ships (each applied exactly once).
fn migration_files() -> i64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
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

fn change(n: u64) -> Change {
    Change {
        repo: "r/r".to_owned(),
        trigger: Trigger::PullRequest {
            number: n,
            title: "t".to_owned(),
            from_fork: false,
        },
        head_sha: "h".to_owned(),
        head_ref: "f".to_owned(),
        base_sha: None,
        base_ref: None,
        author: "a".to_owned(),
    }
}

fn build_of(n: u64, pools: &[&str]) -> NewBuild {
    NewBuild {
        change: change(n),
        pipeline: "default".to_owned(),
        event_id: None,
        checkout_sha: None,
        jobs: pools.iter().map(|p| NewJob::pool(*p)).collect(),
    }
}

#[test]
fn with_database_replaces_only_the_database() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/postgres", "x"),
        "postgres://u:p@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[tokio::test]
async fn pg_connect_migrates_once_and_schema_guards_rows() {
    let db = Pg::new().await;
    let store = db.store().await;
    let again = db.store().await;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(again.pool())
        .await
        .unwrap();
    assert_eq!(applied, migration_files());

    let (build, jobs) = store.create_build(build_of(1, &["p"])).await.unwrap();
    // The schema refuses a state the core does not know, as SQLite's does.
    let bad_state = sqlx::query("UPDATE jobs SET state = 'lost' WHERE id = $1")
        .bind(jobs[0].0)
        .execute(store.pool())
        .await;
    assert!(bad_state.is_err());
    // A row damaged behind our back is corrupt, naming table and column.
    sqlx::query("UPDATE builds SET trigger_json = '{\"kind\":\"nope\"}' WHERE id = $1")
        .bind(build.0)
        .execute(store.pool())
        .await
        .unwrap();
    match again.get_build(build).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("builds.trigger_json"), "{m}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
    store.close().await;
    again.close().await;
}

#[tokio::test]
async fn open_store_selects_the_backend_from_the_url() {
    let db = Pg::new().await;
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("default.db");

    let pg = open_store(&db.url, &default).await.unwrap();
    pg.insert_event("github", "d", "ping", b"{}").await.unwrap();
    let direct = db.store().await;
    assert_eq!(direct.count_events().await.unwrap(), 1);

    let named = dir.path().join("named.db");
    let sqlite = open_store(&format!("sqlite://{}", named.display()), &default)
        .await
        .unwrap();
    sqlite
        .insert_event("github", "d", "ping", b"{}")
        .await
        .unwrap();
    assert!(named.exists());
    assert!(!default.exists());
    open_store("", &default).await.unwrap();
    assert!(default.exists());

    match open_store("mysql://h/db", &default).await {
        Err(StoreError::UnsupportedUrl(u)) => assert_eq!(u, "mysql://h/db"),
        Err(other) => panic!("expected unsupported url, got {other:?}"),
        Ok(_) => panic!("mysql url opened a store"),
    }
}

/// Two replicas, 8 claiming tasks each, one queue of 200 jobs limited to 5 at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_two_replicas_claim_each_job_once_within_max_active() {
    const JOBS: usize = 200;
    const MAX_ACTIVE: u32 = 5;
    let db = Pg::new().await;
    let replicas = [db.store().await, db.store().await];
    let mut created = Vec::new();
    for n in 0..10 {
        let (_, jobs) = replicas[n % 2]
            .create_build(build_of(n as u64, &["c"; JOBS / 10]))
            .await
            .unwrap();
        created.extend(jobs);
    }

    // `active` counts jobs between their claim's commit and their release: never more
    // than the database's own count, so it exceeding MAX_ACTIVE is the store's fault.
    let active = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let claimed = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for t in 0..8 {
            let store = replica.clone();
            let (active, peak, done, claimed) =
                (active.clone(), peak.clone(), done.clone(), claimed.clone());
            tasks.push(tokio::spawn(async move {
                let owner = format!("replica-{r}");
                let mut mine = 0usize;
                while done.load(Ordering::SeqCst) < JOBS {
                    let lease = Duration::from_secs(60);
                    let Some(job) = store
                        .claim_next_job_for("c", MAX_ACTIVE, &owner, lease)
                        .await
                        .unwrap()
                    else {
                        // Woken by a replica freeing a slot, or polls again.
                        store.wait_for_work(Duration::from_millis(20)).await;
                        continue;
                    };
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    claimed.lock().unwrap().push((job.id, r, t));
                    assert_eq!(job.state, JobState::Provisioning);
                    assert!(store
                        .transition_job(job.id, &[JobState::Provisioning], JobState::Running, None)
                        .await
                        .unwrap());
                    // Hold the slot a little, so claims overlap.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    assert!(store
                        .transition_job(job.id, &[JobState::Running], JobState::Succeeded, None)
                        .await
                        .unwrap());
                    done.fetch_add(1, Ordering::SeqCst);
                    mine += 1;
                }
                mine
            }));
        }
    }
    let mut per_task = Vec::new();
    for task in tasks {
        per_task.push(task.await.unwrap());
    }
    let took = started.elapsed();

    let claimed = claimed.lock().unwrap().clone();
    let ids: Vec<JobId> = claimed.iter().map(|(id, _, _)| *id).collect();
    let unique: HashSet<JobId> = ids.iter().copied().collect();
    assert_eq!(ids.len(), JOBS, "a job was claimed twice");
    assert_eq!(unique, created.iter().copied().collect::<HashSet<_>>());
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= MAX_ACTIVE as usize, "max_active exceeded: {peak}");
    // Usually MAX_ACTIVE; on a loaded machine claims may overlap less, but they must.
    assert!(peak >= 2, "claims never overlapped");
    let by_replica = |r| claimed.iter().filter(|(_, cr, _)| *cr == r).count();
    assert!(
        by_replica(0) > 0 && by_replica(1) > 0,
        "one replica got nothing"
    );
    let succeeded = replicas[0]
        .jobs_in_states(&[JobState::Succeeded])
        .await
        .unwrap();
    assert_eq!(succeeded.len(), JOBS);
    println!(
        "two replicas x 8 tasks: {JOBS} jobs claimed, run, finished in {took:?} \
         ({:.0} jobs/s); peak active {peak}/{MAX_ACTIVE}; replica 0 took {}, replica 1 {}; \
         per task {per_task:?}",
        JOBS as f64 / took.as_secs_f64(),
        by_replica(0),
        by_replica(1),
    );
}

/// How long `store.wait_for_work` takes to return after `trigger` starts (the waiter is
/// registered first).
async fn wake_latency<F>(waiter: &PgStore, trigger: F) -> Duration
where
    F: std::future::Future<Output = ()>,
{
    let w = waiter.clone();
    let handle = tokio::spawn(async move {
        w.wait_for_work(Duration::from_secs(5)).await;
        Instant::now()
    });
    // Let the waiter park on the Notify.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!handle.is_finished(), "woke with nothing sent");
    let sent = Instant::now();
    trigger.await;
    handle.await.unwrap() - sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_notify_wakes_the_other_replica_within_100ms() {
    let db = Pg::new().await;
    let a = db.store().await;
    let b = db.store().await;

    // Nothing pending: waiting lasts the whole timeout.
    let t = Instant::now();
    b.wait_for_work(Duration::from_millis(200)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t.elapsed()
    );

    let mut latencies = Vec::new();
    for n in 0..5 {
        latencies.push(
            wake_latency(&b, async {
                a.create_build(build_of(n, &["p"])).await.unwrap();
            })
            .await,
        );
    }
    // A slot freed on A (a job finishing) wakes B too: B may be waiting at max_active.
    let job = a.claim_next_job("p", 10).await.unwrap().unwrap();
    latencies.push(
        wake_latency(&b, async {
            a.transition_job(job.id, &[JobState::Provisioning], JobState::Error, None)
                .await
                .unwrap();
        })
        .await,
    );
    // So does a requeue.
    let job = a.claim_next_job("p", 10).await.unwrap().unwrap();
    latencies.push(
        wake_latency(&b, async {
            assert!(a.requeue_job(job.id, "worker lost").await.unwrap());
        })
        .await,
    );
    // And an explicit notify.
    latencies.push(wake_latency(&b, async { a.notify_jobs().await.unwrap() }).await);
    let worst = latencies.iter().max().copied().unwrap();
    println!("wake latency across replicas: {latencies:?}, worst {worst:?}");
    assert!(worst < Duration::from_millis(100), "{latencies:?}");

    // A notification that arrives while nobody waits is kept for the next wait, so a
    // scheduler busy claiming does not sleep through it.
    a.create_build(build_of(9, &["p"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    b.wait_for_work(Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_expired_leases_hand_a_dead_owners_jobs_to_one_replica() {
    let db = Pg::new().await;
    let dead = db.store().await;
    let b = db.store().await;
    let c = db.store().await;
    let (_, jobs) = b
        .create_build(build_of(1, &["p", "p", "p", "p", "p", "q"]))
        .await
        .unwrap();
    // Margins for a loaded CI machine: renewals every quarter lease.
    let short = Duration::from_secs(1);
    let long = Duration::from_secs(60);

    // The replica that will die takes three jobs (one of them already running).
    let mut dead_jobs = Vec::new();
    for _ in 0..3 {
        let job = dead
            .claim_next_job_for("p", 10, "dead", short)
            .await
            .unwrap()
            .unwrap();
        dead_jobs.push(job.id);
    }
    assert!(dead
        .transition_job(
            dead_jobs[0],
            &[JobState::Provisioning],
            JobState::Running,
            None
        )
        .await
        .unwrap());
    // B keeps its job by renewing; a lease-less claim (a single server) never expires.
    let kept = b
        .claim_next_job_for("p", 10, "b", short)
        .await
        .unwrap()
        .unwrap();
    let local = b.claim_next_job("q", 10).await.unwrap().unwrap();
    assert_eq!(local.id, jobs[5]);
    assert!(b.expired_leases("b", long).await.unwrap().is_empty());

    dead.close().await;
    drop(dead);
    // Longer than the lease: only renewal keeps B's job.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        b.renew_leases("b", short).await.unwrap();
    }

    // B and C look at the same time: each dead job goes to exactly one of them.
    let (from_b, from_c) = tokio::join!(b.expired_leases("b", long), c.expired_leases("c", long));
    let (from_b, from_c) = (from_b.unwrap(), from_c.unwrap());
    let mut taken: Vec<JobId> = from_b.iter().chain(&from_c).map(|j| j.id).collect();
    taken.sort();
    assert_eq!(taken, dead_jobs, "b took {from_b:?}, c took {from_c:?}");
    assert!(!taken.contains(&kept.id) && !taken.contains(&local.id));
    // Taken over means leased again: nobody else finds them now.
    assert!(c.expired_leases("c", long).await.unwrap().is_empty());

    // The taker requeues them; they run again under a new owner.
    for job in from_b.iter().chain(&from_c) {
        assert!(b.requeue_job(job.id, "replica lost").await.unwrap());
    }
    let again = c
        .claim_next_job_for("p", 10, "c", long)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.id, dead_jobs[0]);
    assert_eq!(again.attempt, 2);

    // A finished job's lease is gone with it: B stopping renewal later changes nothing.
    assert!(b
        .transition_job(
            kept.id,
            &[JobState::Provisioning],
            JobState::Cancelled,
            None
        )
        .await
        .unwrap());
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    assert!(c.expired_leases("c", long).await.unwrap().is_empty());
}

#[tokio::test]
async fn pg_an_event_is_claimed_by_one_replica_until_its_claim_expires() {
    let db = Pg::new().await;
    let a = db.store().await;
    let b = db.store().await;
    let id = match a
        .insert_event("github", "d-1", "push", b"{}")
        .await
        .unwrap()
    {
        slate_store::InsertOutcome::Inserted(id) => id,
        other => panic!("{other:?}"),
    };
    let short = Duration::from_millis(300);
    assert!(a.claim_event(id, "a", short).await.unwrap());
    assert!(
        !b.claim_event(id, "b", short).await.unwrap(),
        "claimed twice"
    );
    // `a` died without marking it processed: after the lease, `b` takes it over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(b.claim_event(id, "b", short).await.unwrap());
    b.mark_event_processed(id, None).await.unwrap();
    assert!(
        !a.claim_event(id, "a", short).await.unwrap(),
        "a processed event was claimed"
    );
}
