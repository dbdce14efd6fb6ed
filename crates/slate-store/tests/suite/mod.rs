//! The storage story suite: what every `Store` backend must do, written against the trait
//! only. A backend's test file implements [`Backend`] and invokes `store_suite!`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use slate_core::{BuildId, Change, JobId, JobState, StepRecord, Trigger};
use slate_store::{BuildFilter, InsertOutcome, NewBuild, NewJob, Store, StoreError, WorkerRecord};

/// A database under test. Every `open` opens the same database, so a chapter can drop
/// the store and open it again.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn open(&self) -> Arc<dyn Store>;
}

/// One `#[tokio::test]` per chapter, each on a fresh database from `$backend` (an async
/// expression yielding a [`Backend`]).
macro_rules! store_suite {
    ($backend:expr) => {
        store_suite!(@store $backend;
            events_are_idempotent,
            events_are_processed_once_marked,
            create_build_queues_one_job_per_pool,
            jobs_keep_targets_and_vars_and_are_added_in_order,
            list_builds_filters_newest_first_and_pages,
            claims_are_fifo_and_bounded_per_pool,
            requeue_increments_attempt_and_keeps_fifo_place,
            transitions_are_compare_and_set,
            steps_upsert_and_list_in_order,
            tokens_are_consumed_once,
            workers_record_list_remove,
            active_jobs_of_pr_are_the_older_builds_only,
            job_counts_cover_every_state,
            insert_event_throughput,
            leased_claims_are_fifo_bounded_and_kept_while_renewed,
            owned_transitions_move_only_the_owners_attempt,
            wait_for_work_returns_by_its_timeout,
        );
        store_suite!(@shared $backend;
            concurrent_claims_take_each_job_once,
            concurrent_claims_respect_max_active,
        );
        store_suite!(@backend $backend; everything_survives_reopen);
    };
    (@store $backend:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let backend = $backend.await;
            let store = $crate::suite::Backend::open(&backend).await;
            $crate::suite::$name(&*store).await;
        }
    )*};
    (@shared $backend:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let backend = $backend.await;
            let store = $crate::suite::Backend::open(&backend).await;
            $crate::suite::$name(store).await;
        }
    )*};
    (@backend $backend:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let backend = $backend.await;
            $crate::suite::$name(&backend).await;
        }
    )*};
}

// ---- fixtures ----

fn pr_change(repo: &str, number: u64, head: &str) -> Change {
    Change {
        repo: repo.to_owned(),
        trigger: Trigger::PullRequest {
            number,
            title: format!("PR {number}"),
            from_fork: true,
        },
        head_sha: head.to_owned(),
        head_ref: format!("feature-{number}"),
        base_sha: Some("b".repeat(40)),
        base_ref: Some("master".to_owned()),
        author: "alice".to_owned(),
    }
}

fn push_change(repo: &str, branch: &str) -> Change {
    Change {
        repo: repo.to_owned(),
        trigger: Trigger::Push {
            branch: branch.to_owned(),
        },
        head_sha: "c".repeat(40),
        head_ref: branch.to_owned(),
        base_sha: None,
        base_ref: None,
        author: "bob".to_owned(),
    }
}

fn new_build(change: Change, pools: &[&str]) -> NewBuild {
    NewBuild {
        change,
        pipeline: "default".to_owned(),
        event_id: None,
        checkout_sha: None,
        jobs: pools.iter().map(|p| NewJob::pool(*p)).collect(),
    }
}

/// Backends keep microseconds (PostgreSQL's precision); so do the values we write.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

async fn state(store: &dyn Store, id: JobId) -> JobState {
    store.get_job(id).await.unwrap().state
}

/// A job moved to `running` the way the scheduler does it.
async fn run(store: &dyn Store, id: JobId) {
    assert!(store
        .transition_job(id, &[JobState::Provisioning], JobState::Running, None)
        .await
        .unwrap());
}

fn ids(jobs: &[slate_core::Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

// ---- events ----

pub async fn events_are_idempotent(store: &dyn Store) {
    let first = store
        .insert_event("github", "d-1", "pull_request", b"{\"a\":1}")
        .await
        .unwrap();
    let InsertOutcome::Inserted(id) = first else {
        panic!("first delivery not inserted: {first:?}");
    };
    // A redelivery (even with another body) changes nothing.
    let again = store
        .insert_event("github", "d-1", "pull_request", b"{\"a\":2}")
        .await
        .unwrap();
    assert_eq!(again, InsertOutcome::Duplicate(id));
    assert_eq!(store.count_events().await.unwrap(), 1);
    let stored = store.unprocessed_events(10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].payload, b"{\"a\":1}");
    assert_eq!(stored[0].kind, "pull_request");

    // Delivery ids are unique per source only.
    let other = store
        .insert_event("manual", "d-1", "submit", b"{}")
        .await
        .unwrap();
    assert!(
        matches!(other, InsertOutcome::Inserted(o) if o != id),
        "{other:?}"
    );
    assert_eq!(store.count_events().await.unwrap(), 2);
}

pub async fn events_are_processed_once_marked(store: &dyn Store) {
    let mut ids = Vec::new();
    for n in 0..4 {
        match store
            .insert_event(
                "github",
                &format!("d-{n}"),
                "push",
                format!("{n}").as_bytes(),
            )
            .await
            .unwrap()
        {
            InsertOutcome::Inserted(id) => ids.push(id),
            dup => panic!("unexpected {dup:?}"),
        }
    }
    let page = store.unprocessed_events(2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), ids[..2]);
    assert!(page[0].received_at <= page[1].received_at);

    store.mark_event_processed(ids[0], None).await.unwrap();
    store
        .mark_event_processed(ids[2], Some("unknown repository"))
        .await
        .unwrap();
    let left = store.unprocessed_events(10).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.id).collect::<Vec<_>>(),
        [ids[1], ids[3]]
    );
    // Processed events are kept (the count is of all events).
    assert_eq!(store.count_events().await.unwrap(), 4);
    assert!(matches!(
        store.mark_event_processed(ids[3] + 1000, None).await,
        Err(StoreError::NotFound(_))
    ));
}

// ---- builds ----

pub async fn create_build_queues_one_job_per_pool(store: &dyn Store) {
    let event = match store
        .insert_event("github", "d-1", "pull_request", b"{}")
        .await
        .unwrap()
    {
        InsertOutcome::Inserted(id) => id,
        dup => panic!("unexpected {dup:?}"),
    };
    let change = pr_change("macports/ports", 42, &"a".repeat(40));
    let before = now();
    let (build_id, jobs) = store
        .create_build(NewBuild {
            event_id: Some(event),
            checkout_sha: None,
            ..new_build(change.clone(), &["linux-x86_64", "linux-arm64"])
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2);
    // One build per event: handling an event twice (after a crash) makes no second build.
    let again = store
        .create_build(NewBuild {
            event_id: Some(event),
            checkout_sha: None,
            ..new_build(change.clone(), &["linux-x86_64"])
        })
        .await;
    assert!(again.is_err(), "a second build for one event was created");
    assert_eq!(
        store
            .list_builds(&BuildFilter::default())
            .await
            .unwrap()
            .len(),
        1
    );

    let build = store.get_build(build_id).await.unwrap();
    assert_eq!(build.id, build_id);
    assert_eq!(build.change, change);
    assert_eq!(build.pipeline, "default");
    assert_eq!(build.checkout_sha, None);
    assert!(build.created_at >= before && build.created_at <= now());

    let listed = store.jobs_of_build(build_id).await.unwrap();
    assert_eq!(ids(&listed), jobs);
    for (job, pool) in listed.iter().zip(["linux-x86_64", "linux-arm64"]) {
        assert_eq!(job.build_id, build_id);
        assert_eq!(job.pool, pool);
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.reason, None);
        assert_eq!((job.started_at, job.finished_at), (None, None));
        assert_eq!(store.get_job(job.id).await.unwrap(), *job);
    }

    store
        .set_build_checkout(build_id, &"m".repeat(40))
        .await
        .unwrap();
    let build = store.get_build(build_id).await.unwrap();
    assert_eq!(build.checkout_sha, Some("m".repeat(40)));

    // A checkout known at creation is stored with the jobs, in the same transaction:
    // a replica claiming one of them at once finds it.
    let (with_checkout, _) = store
        .create_build(NewBuild {
            checkout_sha: Some("k".repeat(40)),
            ..new_build(pr_change("o/r", 8, "h"), &["linux-x86_64"])
        })
        .await
        .unwrap();
    let build = store.get_build(with_checkout).await.unwrap();
    assert_eq!(build.checkout_sha, Some("k".repeat(40)));

    let missing = BuildId(build_id.0 + 1000);
    assert!(matches!(
        store.get_build(missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.set_build_checkout(missing, "x").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_job(JobId(jobs[1].0 + 1000)).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn jobs_keep_targets_and_vars_and_are_added_in_order(store: &dyn Store) {
    let vars = |port: &str| {
        let mut m = std::collections::BTreeMap::new();
        m.insert("port".to_owned(), port.to_owned());
        m
    };
    let (build, first) = store
        .create_build(NewBuild {
            jobs: vec![
                NewJob::target("mac", "libfoo", vars("libfoo")),
                NewJob::pool("linux"),
                NewJob::target("mac", "plan", Default::default()),
            ],
            ..new_build(pr_change("r/r", 1, "h"), &[])
        })
        .await
        .unwrap();
    let jobs = store.jobs_of_build(build).await.unwrap();
    assert_eq!(ids(&jobs), first);
    assert_eq!(jobs[0].target.as_deref(), Some("libfoo"));
    assert_eq!(jobs[0].vars, vars("libfoo"));
    assert_eq!(jobs[0].context(), "slate/mac/libfoo");
    assert_eq!((jobs[1].target.as_deref(), jobs[1].vars.len()), (None, 0));
    assert_eq!(jobs[1].context(), "slate/linux");
    assert_eq!(jobs[2].target.as_deref(), Some("plan"));

    // Dynamic jobs: queued after the build's own, in the order given.
    let added = store
        .add_jobs(
            build,
            vec![
                NewJob::target("mac", "py312-bar", vars("py312-bar")),
                NewJob::target("mac", "py313-bar", vars("py313-bar")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let jobs = store.jobs_of_build(build).await.unwrap();
    assert_eq!(jobs.len(), 5);
    assert_eq!(ids(&jobs[3..]), added);
    let got = store.get_job(added[1]).await.unwrap();
    assert_eq!(got.target.as_deref(), Some("py313-bar"));
    assert_eq!(got.vars, vars("py313-bar"));
    assert_eq!(got.state, JobState::Queued);
    assert_eq!(got.attempt, 1);
    // FIFO within the pool: the build's first mac job, its planning job, then the added ones.
    let mut order = Vec::new();
    while let Some(j) = store.claim_next_job("mac", 10).await.unwrap() {
        order.push(j.target.unwrap());
    }
    assert_eq!(order, ["libfoo", "plan", "py312-bar", "py313-bar"]);

    assert!(store.add_jobs(build, Vec::new()).await.unwrap().is_empty());
    assert!(matches!(
        store
            .add_jobs(BuildId(build.0 + 1000), vec![NewJob::pool("mac")])
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn list_builds_filters_newest_first_and_pages(store: &dyn Store) {
    let mut made = Vec::new();
    for change in [
        pr_change("a/a", 1, "h1"),
        pr_change("b/b", 1, "h2"),
        pr_change("a/a", 2, "h3"),
        push_change("a/a", "master"),
        pr_change("a/a", 1, "h5"),
    ] {
        made.push(
            store
                .create_build(new_build(change, &["p"]))
                .await
                .unwrap()
                .0,
        );
    }
    let list = |repo: Option<&str>, pr: Option<u64>, limit: u32, offset: u32| BuildFilter {
        repo: repo.map(str::to_owned),
        pr,
        limit,
        offset,
    };
    let listed = |f: BuildFilter| async move {
        store
            .list_builds(&f)
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>()
    };

    let newest_first: Vec<BuildId> = made.iter().rev().copied().collect();
    assert_eq!(listed(list(None, None, 0, 0)).await, newest_first);
    assert_eq!(
        listed(list(Some("a/a"), None, 0, 0)).await,
        [made[4], made[3], made[2], made[0]]
    );
    assert_eq!(
        listed(list(Some("a/a"), Some(1), 0, 0)).await,
        [made[4], made[0]]
    );
    assert_eq!(
        listed(list(None, Some(1), 0, 0)).await,
        [made[4], made[1], made[0]]
    );
    assert_eq!(listed(list(Some("c/c"), None, 0, 0)).await, []);
    assert_eq!(listed(list(None, Some(99), 0, 0)).await, []);

    assert_eq!(listed(list(None, None, 2, 0)).await, newest_first[..2]);
    assert_eq!(listed(list(None, None, 2, 2)).await, newest_first[2..4]);
    assert_eq!(listed(list(None, None, 2, 4)).await, newest_first[4..]);
    assert_eq!(listed(list(None, None, 2, 6)).await, []);

    // limit 0 is the default page (50), not "nothing" and not "everything".
    for n in 0..50 {
        store
            .create_build(new_build(push_change("d/d", &format!("b{n}")), &[]))
            .await
            .unwrap();
    }
    assert_eq!(listed(list(None, None, 0, 0)).await.len(), 50);
    assert_eq!(listed(list(None, None, 100, 0)).await.len(), 55);
}

// ---- the queue ----

pub async fn claims_are_fifo_and_bounded_per_pool(store: &dyn Store) {
    let mut fifo = Vec::new();
    for n in 0..3 {
        let (_, jobs) = store
            .create_build(new_build(pr_change("r/r", n, "h"), &["p", "q"]))
            .await
            .unwrap();
        fifo.push(jobs[0]);
    }
    // Pool p: claimed in creation order, then nothing is left.
    for expected in &fifo {
        let job = store.claim_next_job("p", 10).await.unwrap().unwrap();
        assert_eq!(job.id, *expected);
        assert_eq!(job.pool, "p");
        assert_eq!(job.state, JobState::Provisioning);
        assert_eq!(state(store, job.id).await, JobState::Provisioning);
    }
    assert!(store.claim_next_job("p", 10).await.unwrap().is_none());
    assert!(store.claim_next_job("nope", 10).await.unwrap().is_none());

    // Pool q: at most 2 active (provisioning or running); p's jobs do not count.
    let a = store.claim_next_job("q", 2).await.unwrap().unwrap();
    let b = store.claim_next_job("q", 2).await.unwrap().unwrap();
    assert!(store.claim_next_job("q", 2).await.unwrap().is_none());
    run(store, a.id).await;
    assert!(store.claim_next_job("q", 2).await.unwrap().is_none());
    assert!(store
        .transition_job(a.id, &[JobState::Running], JobState::Succeeded, None)
        .await
        .unwrap());
    let c = store.claim_next_job("q", 2).await.unwrap().unwrap();
    assert_ne!(c.id, b.id);
    assert!(store.claim_next_job("q", 0).await.unwrap().is_none());
}

pub async fn requeue_increments_attempt_and_keeps_fifo_place(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "p"]))
        .await
        .unwrap();
    let first = store.claim_next_job("p", 5).await.unwrap().unwrap();
    assert_eq!(first.id, jobs[0]);
    run(store, first.id).await;
    store.set_job_token_hash(first.id, "h").await.unwrap();
    store
        .upsert_step(&StepRecord {
            job_id: first.id,
            index: 0,
            name: "checkout".to_owned(),
            started_at: Some(now()),
            finished_at: None,
            exit_code: None,
            outcome: None,
        })
        .await
        .unwrap();

    assert!(store.requeue_job(first.id, "worker lost").await.unwrap());
    let job = store.get_job(first.id).await.unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.reason.as_deref(), Some("worker lost"));
    assert_eq!(job.started_at, None);
    assert_eq!(job.created_at, first.created_at);
    // The lost attempt's steps and agent token do not carry over.
    assert!(store.steps_of_job(first.id).await.unwrap().is_empty());
    assert!(!store.consume_job_token(first.id, "h").await.unwrap());

    // A queued job cannot be requeued.
    assert!(!store.requeue_job(first.id, "again").await.unwrap());
    assert_eq!(store.get_job(first.id).await.unwrap().attempt, 2);

    // The retry is still ahead of the younger job.
    let again = store.claim_next_job("p", 5).await.unwrap().unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.attempt, 2);
    assert!(store
        .requeue_job(again.id, "provision failed")
        .await
        .unwrap());
    assert_eq!(store.get_job(first.id).await.unwrap().attempt, 3);

    // Finished jobs stay finished.
    let second = store.claim_next_job("p", 5).await.unwrap().unwrap();
    assert_eq!(second.id, first.id);
    assert!(store
        .transition_job(second.id, &[JobState::Provisioning], JobState::Error, None)
        .await
        .unwrap());
    assert!(!store.requeue_job(second.id, "late").await.unwrap());
    assert!(matches!(
        store.requeue_job(JobId(jobs[1].0 + 1000), "x").await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn transitions_are_compare_and_set(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p"]))
        .await
        .unwrap();
    let id = jobs[0];

    // Wrong from-state: nothing moves.
    assert!(!store
        .transition_job(id, &[JobState::Running], JobState::Succeeded, Some("x"))
        .await
        .unwrap());
    let job = store.get_job(id).await.unwrap();
    assert_eq!((job.state, job.reason), (JobState::Queued, None));
    // An edge the state machine forbids does not move either.
    assert!(!store
        .transition_job(id, &[JobState::Queued], JobState::Succeeded, None)
        .await
        .unwrap());
    assert_eq!(state(store, id).await, JobState::Queued);

    assert!(store
        .transition_job(id, &[JobState::Queued], JobState::Provisioning, None)
        .await
        .unwrap());
    let job = store.get_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Provisioning);
    assert_eq!((job.started_at, job.finished_at), (None, None));

    let before = now();
    assert!(store
        .transition_job(
            id,
            &[JobState::Queued, JobState::Provisioning],
            JobState::Running,
            None
        )
        .await
        .unwrap());
    let running = store.get_job(id).await.unwrap();
    assert_eq!(running.state, JobState::Running);
    let started = running.started_at.expect("started_at set on running");
    assert!(started >= before && started <= now());
    assert_eq!(running.finished_at, None);

    assert!(store
        .transition_job(id, &[JobState::Running], JobState::Failed, Some("exit 1"))
        .await
        .unwrap());
    let done = store.get_job(id).await.unwrap();
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.reason.as_deref(), Some("exit 1"));
    assert_eq!(done.started_at, Some(started));
    assert!(done.finished_at.expect("finished_at set when terminal") >= started);

    // Terminal is final, even when the caller lists it as a source state.
    assert!(!store
        .transition_job(id, &[JobState::Failed], JobState::Running, None)
        .await
        .unwrap());
    assert_eq!(store.get_job(id).await.unwrap(), done);
    assert!(matches!(
        store
            .transition_job(
                JobId(id.0 + 1000),
                &[JobState::Queued],
                JobState::Cancelled,
                None
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn concurrent_claims_take_each_job_once(store: Arc<dyn Store>) {
    let mut created = HashSet::new();
    for n in 0..4 {
        let (_, jobs) = store
            .create_build(new_build(pr_change("r/r", n, "h"), &["c"; 5]))
            .await
            .unwrap();
        created.extend(jobs);
    }
    assert_eq!(created.len(), 20);

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store.claim_next_job("c", u32::MAX).await.unwrap() {
                got.push(job.id);
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let unique: HashSet<JobId> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 20, "a job was claimed twice: {claimed:?}");
    assert_eq!(unique, created);
}

pub async fn concurrent_claims_respect_max_active(store: Arc<dyn Store>) {
    store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["m"; 12]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.claim_next_job("m", 5).await.unwrap().is_some()
        }));
    }
    let mut won = 0;
    for task in tasks {
        won += usize::from(task.await.unwrap());
    }
    assert_eq!(won, 5);
    let active = store
        .jobs_in_states(&[JobState::Provisioning, JobState::Running])
        .await
        .unwrap();
    assert_eq!(active.len(), 5);
}

// ---- replicas: leases and wake-ups ----

/// What every backend does with leases: a leased claim is a claim (FIFO, bounded per
/// pool), and a live owner's jobs are never anyone's to take over. (Expiry itself needs
/// a second replica: PostgreSQL's own tests.)
pub async fn leased_claims_are_fifo_bounded_and_kept_while_renewed(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "p", "p"]))
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    for expected in &jobs[..2] {
        let job = store
            .claim_next_job_for("p", 2, "replica-a", lease)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.id, *expected);
        assert_eq!(job.state, JobState::Provisioning);
    }
    assert!(store
        .claim_next_job_for("p", 2, "replica-a", lease)
        .await
        .unwrap()
        .is_none());
    // Leased and lease-less claims share the pool's bound.
    assert!(store.claim_next_job("p", 2).await.unwrap().is_none());
    store.renew_leases("replica-a", lease).await.unwrap();
    assert!(store
        .expired_leases("replica-b", lease)
        .await
        .unwrap()
        .is_empty());
    run(store, jobs[0]).await;
    assert!(store.requeue_job(jobs[0], "lost").await.unwrap());
    let again = store
        .claim_next_job_for("p", 2, "replica-b", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.attempt), (jobs[0], 2));
}

/// A runner moves its job with the owner-checked variants: once another replica has
/// taken the job over (requeued it, claimed it again), the first owner can neither start,
/// finish nor requeue the new attempt, although it is in the states it expects.
pub async fn owned_transitions_move_only_the_owners_attempt(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "q"]))
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let job = store
        .claim_next_job_for("p", 2, "replica-a", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.id, jobs[0]);
    let (provisioning, active) = (
        &[JobState::Provisioning][..],
        &[JobState::Provisioning, JobState::Running][..],
    );
    // Not the owner: nothing moves.
    for to in [JobState::Running, JobState::Failed] {
        assert!(!store
            .transition_owned_job(job.id, "replica-b", active, to, None)
            .await
            .unwrap());
    }
    assert!(!store
        .requeue_owned_job(job.id, "replica-b", "x")
        .await
        .unwrap());
    assert_eq!(state(store, job.id).await, JobState::Provisioning);
    // The owner starts it.
    assert!(store
        .transition_owned_job(job.id, "replica-a", provisioning, JobState::Running, None)
        .await
        .unwrap());
    assert_eq!(state(store, job.id).await, JobState::Running);

    // Taken over (as after a lease expiry): requeued, claimed by B, running again.
    assert!(store
        .requeue_job(job.id, "its replica stopped")
        .await
        .unwrap());
    let again = store
        .claim_next_job_for("p", 2, "replica-b", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id, again.attempt), (job.id, 2));
    assert!(!store
        .transition_owned_job(job.id, "replica-a", provisioning, JobState::Running, None)
        .await
        .unwrap());
    assert!(store
        .transition_owned_job(job.id, "replica-b", provisioning, JobState::Running, None)
        .await
        .unwrap());
    // A's late finish and late requeue are refused; B's attempt is untouched.
    assert!(!store
        .transition_owned_job(
            job.id,
            "replica-a",
            active,
            JobState::Succeeded,
            Some("late")
        )
        .await
        .unwrap());
    assert!(!store
        .requeue_owned_job(job.id, "replica-a", "late")
        .await
        .unwrap());
    let j = store.get_job(job.id).await.unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Running, 2));
    assert!(store
        .transition_owned_job(job.id, "replica-b", active, JobState::Succeeded, Some("ok"))
        .await
        .unwrap());
    let j = store.get_job(job.id).await.unwrap();
    assert_eq!(
        (j.state, j.reason.as_deref()),
        (JobState::Succeeded, Some("ok"))
    );
    // Finished: nobody owns it any more, so no owner can move it (terminal anyway).
    assert!(!store
        .transition_owned_job(job.id, "replica-b", active, JobState::Failed, None)
        .await
        .unwrap());

    // A lease-less claim is owned by LOCAL_OWNER, and its owner can requeue it.
    let local = store.claim_next_job("q", 1).await.unwrap().unwrap();
    assert_eq!(local.id, jobs[1]);
    assert!(!store
        .requeue_owned_job(local.id, "replica-a", "x")
        .await
        .unwrap());
    assert!(store
        .requeue_owned_job(local.id, slate_store::LOCAL_OWNER, "worker lost")
        .await
        .unwrap());
    assert_eq!(state(store, local.id).await, JobState::Queued);

    // A job that does not exist is NotFound, as with the unchecked variants.
    let missing = JobId(jobs[1].0 + 1000);
    assert!(matches!(
        store
            .transition_owned_job(missing, "replica-a", active, JobState::Failed, None)
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.requeue_owned_job(missing, "replica-a", "x").await,
        Err(StoreError::NotFound(_))
    ));
}

/// The scheduler waits with this between claims: it must come back by the timeout
/// (sooner is allowed: wake-ups may be early or spurious).
pub async fn wait_for_work_returns_by_its_timeout(store: &dyn Store) {
    for _ in 0..3 {
        let started = Instant::now();
        store.wait_for_work(Duration::from_millis(50)).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}

// ---- steps, tokens, workers ----

pub async fn steps_upsert_and_list_in_order(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "p"]))
        .await
        .unwrap();
    let step = |index: u32, name: &str| StepRecord {
        job_id: jobs[0],
        index,
        name: name.to_owned(),
        started_at: Some(now()),
        finished_at: None,
        exit_code: None,
        outcome: None,
    };
    for (i, name) in [(2, "test"), (0, "checkout"), (1, "build")] {
        store.upsert_step(&step(i, name)).await.unwrap();
    }
    let mut finished = step(1, "build");
    finished.finished_at = Some(now());
    finished.exit_code = Some(-1);
    finished.outcome = Some("failed".to_owned());
    store.upsert_step(&finished).await.unwrap();

    let steps = store.steps_of_job(jobs[0]).await.unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.index, s.name.as_str()))
            .collect::<Vec<_>>(),
        [(0, "checkout"), (1, "build"), (2, "test")]
    );
    assert_eq!(steps[1], finished);
    assert!(store.steps_of_job(jobs[1]).await.unwrap().is_empty());
}

pub async fn tokens_are_consumed_once(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "p"]))
        .await
        .unwrap();
    store.set_job_token_hash(jobs[0], "right").await.unwrap();
    assert!(!store.consume_job_token(jobs[0], "wrong").await.unwrap());
    // Another job's token is not this job's.
    store.set_job_token_hash(jobs[1], "other").await.unwrap();
    assert!(!store.consume_job_token(jobs[0], "other").await.unwrap());
    assert!(store.consume_job_token(jobs[0], "right").await.unwrap());
    assert!(!store.consume_job_token(jobs[0], "right").await.unwrap());
    assert!(store.consume_job_token(jobs[1], "other").await.unwrap());
    assert!(!store
        .consume_job_token(JobId(jobs[1].0 + 1000), "x")
        .await
        .unwrap());
    assert!(matches!(
        store.set_job_token_hash(JobId(jobs[1].0 + 1000), "x").await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn workers_record_list_remove(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p", "p"]))
        .await
        .unwrap();
    let worker = |job: JobId, provider: &str| WorkerRecord {
        name: job.resource_name(),
        job_id: job,
        provider: provider.to_owned(),
        pool: "p".to_owned(),
        created_at: now(),
    };
    let a = worker(jobs[0], "sandbox");
    store.record_worker(&a).await.unwrap();
    let b = worker(jobs[1], "qemu");
    store.record_worker(&b).await.unwrap();
    assert_eq!(store.list_workers().await.unwrap(), [a.clone(), b.clone()]);

    // Recording the same name again (the job's next attempt) replaces the record.
    let a2 = worker(jobs[0], "libvirt");
    store.record_worker(&a2).await.unwrap();
    let listed = store.list_workers().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&a2) && listed.contains(&b));

    store.remove_worker(&b.name).await.unwrap();
    assert_eq!(
        store.list_workers().await.unwrap(),
        std::slice::from_ref(&a2)
    );
    // Removing what is gone succeeds.
    store.remove_worker(&b.name).await.unwrap();
    store.remove_worker(&a2.name).await.unwrap();
    assert!(store.list_workers().await.unwrap().is_empty());
}

pub async fn active_jobs_of_pr_are_the_older_builds_only(store: &dyn Store) {
    let (old, old_jobs) = store
        .create_build(new_build(pr_change("r/r", 7, "h1"), &["p", "q"]))
        .await
        .unwrap();
    // One of the old build's jobs is done already: not active.
    let done = store.claim_next_job("q", 5).await.unwrap().unwrap();
    assert_eq!(done.id, old_jobs[1]);
    store
        .transition_job(
            done.id,
            &[JobState::Provisioning],
            JobState::Cancelled,
            None,
        )
        .await
        .unwrap();
    // Same number, other PR or repo: never matched.
    store
        .create_build(new_build(pr_change("r/r", 8, "h2"), &["p"]))
        .await
        .unwrap();
    store
        .create_build(new_build(pr_change("other/r", 7, "h3"), &["p"]))
        .await
        .unwrap();
    let (new, new_jobs) = store
        .create_build(new_build(pr_change("r/r", 7, "h4"), &["p", "q"]))
        .await
        .unwrap();

    let active = store.active_jobs_of_pr("r/r", 7, new).await.unwrap();
    assert_eq!(ids(&active), [old_jobs[0]]);
    assert!(active.iter().all(|j| j.build_id == old));
    assert!(!active.iter().any(|j| new_jobs.contains(&j.id)));
    assert!(store
        .active_jobs_of_pr("r/r", 7, old)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .active_jobs_of_pr("r/r", 9, new)
        .await
        .unwrap()
        .is_empty());
}

pub async fn job_counts_cover_every_state(store: &dyn Store) {
    let (_, jobs) = store
        .create_build(new_build(pr_change("r/r", 1, "h"), &["p"; 4]))
        .await
        .unwrap();
    let a = store.claim_next_job("p", 5).await.unwrap().unwrap();
    run(store, a.id).await;
    store
        .transition_job(a.id, &[JobState::Running], JobState::Succeeded, None)
        .await
        .unwrap();
    let b = store.claim_next_job("p", 5).await.unwrap().unwrap();
    run(store, b.id).await;
    store.claim_next_job("p", 5).await.unwrap().unwrap();

    let counts = store.job_counts().await.unwrap();
    let of = |s: JobState| counts.iter().find(|(st, _)| *st == s).map(|(_, n)| *n);
    assert_eq!(of(JobState::Queued), Some(1));
    assert_eq!(of(JobState::Provisioning), Some(1));
    assert_eq!(of(JobState::Running), Some(1));
    assert_eq!(of(JobState::Succeeded), Some(1));
    assert_eq!(of(JobState::Failed), Some(0));
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<u64>(),
        jobs.len() as u64
    );

    let queued = store.jobs_in_states(&[JobState::Queued]).await.unwrap();
    assert_eq!(ids(&queued), [jobs[3]]);
    let active = store.jobs_in_states(JobState::active()).await.unwrap();
    assert_eq!(ids(&active), jobs[1..]);
    assert!(store.jobs_in_states(&[]).await.unwrap().is_empty());
}

/// The server acks a webhook only once it is stored, and must keep up with 1,000/s.
pub async fn insert_event_throughput(store: &dyn Store) {
    let payload: Vec<u8> = (0..8 * 1024).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    for n in 0..1000 {
        let out = store
            .insert_event("github", &format!("delivery-{n}"), "pull_request", &payload)
            .await
            .unwrap();
        assert!(matches!(out, InsertOutcome::Inserted(_)));
    }
    let took = started.elapsed();
    println!(
        "insert_event: 1000 x 8 KiB in {took:?} ({:.0}/s)",
        1000.0 / took.as_secs_f64()
    );
    assert_eq!(store.count_events().await.unwrap(), 1000);
    assert!(took.as_secs() < 10, "1000 inserts took {took:?}");
}

// ---- restart ----

pub async fn everything_survives_reopen(backend: &dyn Backend) {
    let store = backend.open().await;
    let event = match store
        .insert_event("github", "d-1", "pull_request", b"payload")
        .await
        .unwrap()
    {
        InsertOutcome::Inserted(id) => id,
        dup => panic!("unexpected {dup:?}"),
    };
    let (build_id, jobs) = store
        .create_build(NewBuild {
            event_id: Some(event),
            checkout_sha: None,
            ..new_build(pr_change("r/r", 3, "h"), &["p", "q"])
        })
        .await
        .unwrap();
    store.set_build_checkout(build_id, "merge").await.unwrap();
    let claimed = store.claim_next_job("p", 1).await.unwrap().unwrap();
    run(&*store, claimed.id).await;
    store.set_job_token_hash(jobs[1], "tok").await.unwrap();
    let step = StepRecord {
        job_id: claimed.id,
        index: 0,
        name: "build".to_owned(),
        started_at: Some(now()),
        finished_at: Some(now()),
        exit_code: Some(0),
        outcome: Some("ok".to_owned()),
    };
    store.upsert_step(&step).await.unwrap();
    let worker = WorkerRecord {
        name: claimed.id.resource_name(),
        job_id: claimed.id,
        provider: "sandbox".to_owned(),
        pool: "p".to_owned(),
        created_at: now(),
    };
    store.record_worker(&worker).await.unwrap();

    let build = store.get_build(build_id).await.unwrap();
    let job_rows = store.jobs_of_build(build_id).await.unwrap();
    let events = store.unprocessed_events(10).await.unwrap();
    drop(store);

    let store = backend.open().await;
    assert_eq!(store.get_build(build_id).await.unwrap(), build);
    assert_eq!(store.jobs_of_build(build_id).await.unwrap(), job_rows);
    assert_eq!(store.unprocessed_events(10).await.unwrap(), events);
    assert_eq!(store.steps_of_job(claimed.id).await.unwrap(), [step]);
    assert_eq!(store.list_workers().await.unwrap(), [worker]);
    assert!(store.consume_job_token(jobs[1], "tok").await.unwrap());
    // Ids keep growing after a restart; the redelivery is still a duplicate.
    assert_eq!(
        store
            .insert_event("github", "d-1", "pull_request", b"payload")
            .await
            .unwrap(),
        InsertOutcome::Duplicate(event)
    );
    let (next, _) = store
        .create_build(new_build(push_change("r/r", "master"), &[]))
        .await
        .unwrap();
    assert!(next > build_id);
}
