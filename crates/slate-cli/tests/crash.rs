//! The crash test of issue #8: a few dozen pull-request builds are driven through signed
//! webhooks while the real server is `kill -9`ed at pseudo-random (seeded) moments and
//! restarted each time. Deliveries keep coming throughout; one whose POST failed because
//! the server was down is sent again (same delivery id, as GitHub's redelivery does), one
//! that got a 2xx never is. At the end every acknowledged delivery has its build, every
//! job is in a final state, and nothing of slate's is left on the host.

mod common;

use common::*;
use serde_json::Value;
use slate_testkit::github::sign;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Change it to explore other schedules; the figures printed name it.
const SEED: u64 = 0x5eed_0008;
const BUILDS: u64 = 30;
const KILLS: usize = 12;

/// splitmix64: a small seeded generator, so the schedule is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

const FINAL: [&str; 5] = ["succeeded", "failed", "error", "cancelled", "timed_out"];

/// One delivery to send: the PR it opens and its signed body.
struct Delivery {
    id: String,
    pr: u64,
    head: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct SendStats {
    /// (PR number, head sha) of every delivery that got a 2xx.
    acked: Vec<(u64, String)>,
    /// POSTs that failed (server down, connection reset, 5xx) and were sent again.
    retried: usize,
    /// Acknowledgements that said "duplicate": the first try had been stored.
    duplicates: usize,
}

/// Sends every delivery in order, each until it gets a 2xx, to whatever address the
/// server has now (`url` changes at each restart).
fn send_all(
    deliveries: Vec<Delivery>,
    url: Arc<Mutex<String>>,
    mut rng: Rng,
    stats: Arc<Mutex<SendStats>>,
    sent: Arc<AtomicUsize>,
) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for d in deliveries {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let base = url.lock().unwrap().clone();
            let resp = http
                .post(format!("{base}/hooks/github"))
                .header("content-type", "application/json")
                .header("x-github-event", "pull_request")
                .header("x-github-delivery", &d.id)
                .header("x-hub-signature-256", sign(SECRET, &d.body))
                .body(d.body.clone())
                .send();
            match resp {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().unwrap_or(Value::Null);
                    let mut st = stats.lock().unwrap();
                    if v["result"] == "duplicate" {
                        st.duplicates += 1;
                    }
                    st.acked.push((d.pr, d.head.clone()));
                    break;
                }
                Ok(r) if r.status().is_server_error() => {}
                Ok(r) => panic!(
                    "delivery {} refused with {}: {}",
                    d.id,
                    r.status(),
                    r.text().unwrap_or_default()
                ),
                Err(_) => {}
            }
            stats.lock().unwrap().retried += 1;
            assert!(
                Instant::now() < deadline,
                "delivery {} never acknowledged",
                d.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sent.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(rng.millis(150, 700));
    }
}

fn all_builds(s: &Slate) -> Vec<Value> {
    s.get("/api/v1/builds?limit=500")
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_delivery_and_leaks_nothing() {
    let started = Instant::now();
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "sleep 0.3; echo ok" },"#.into(),
        max_jobs: 3,
        ..Default::default()
    });
    let deliveries: Vec<Delivery> = (1..=BUILDS)
        .map(|pr| {
            let branch = format!("crash{pr}");
            let (base, head) = s.make_pr(pr, &branch, &format!("f{pr}.txt"), &format!("{pr}\n"));
            Delivery {
                id: format!("crash-{SEED:x}-{pr}"),
                pr,
                body: s.pr_event("opened", pr, &branch, &head, &base),
                head,
            }
        })
        .collect();

    let url = Arc::new(Mutex::new(s.url.clone()));
    let stats = Arc::new(Mutex::new(SendStats::default()));
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (url, stats, sent) = (url.clone(), stats.clone(), sent.clone());
        std::thread::spawn(move || send_all(deliveries, url, Rng(SEED ^ 0xdead), stats, sent))
    };

    // Kill at pseudo-random moments: right after a restart (mid-recovery, scheduler just
    // started), mid-provisioning, mid-step, between deliveries, mid-POST.
    let mut rng = Rng(SEED);
    let mut kills = 0;
    let mut kill_moments = Vec::new();
    // At least KILLS kills, and on until the last delivery is acknowledged (at most 25).
    while kills < KILLS || (!sender.is_finished() && kills < 25) {
        let wait = rng.millis(0, 1500);
        std::thread::sleep(wait);
        let running = count_running(&s);
        s.kill9();
        kills += 1;
        kill_moments.push((wait.as_millis(), sent.load(Ordering::SeqCst), running));
        // Sometimes stay down a while so that deliveries fail and are retried.
        std::thread::sleep(rng.millis(0, 400));
        s.spawn();
        *url.lock().unwrap() = s.url.clone();
    }
    sender.join().expect("the sender failed");
    let stats = std::mem::take(&mut *stats.lock().unwrap());
    eprintln!(
        "kills (ms after restart, deliveries acknowledged so far, jobs running): {kill_moments:?}"
    );

    // Every acknowledged delivery has its build, and every job ends.
    let acked: BTreeSet<(u64, String)> = stats.acked.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let builds = loop {
        let builds = all_builds(&s);
        let have: BTreeSet<(u64, String)> = builds.iter().filter_map(pr_head).collect();
        let pending_jobs = builds
            .iter()
            .flat_map(|b| b["jobs"].as_array().unwrap().iter())
            .filter(|j| !FINAL.contains(&j["state"].as_str().unwrap_or("")))
            .count();
        if acked.is_subset(&have) && pending_jobs == 0 {
            break builds;
        }
        if Instant::now() > deadline {
            break builds;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let have: BTreeMap<(u64, String), usize> =
        builds
            .iter()
            .filter_map(pr_head)
            .fold(BTreeMap::new(), |mut m, k| {
                *m.entry(k).or_default() += 1;
                m
            });
    let lost: Vec<_> = acked.iter().filter(|k| !have.contains_key(k)).collect();
    let doubled: Vec<_> = have.iter().filter(|(_, n)| **n > 1).collect();
    let jobs: Vec<&Value> = builds
        .iter()
        .flat_map(|b| b["jobs"].as_array().unwrap().iter())
        .collect();
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for j in &jobs {
        *states
            .entry(j["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let not_final: Vec<_> = jobs
        .iter()
        .filter(|j| !FINAL.contains(&j["state"].as_str().unwrap_or("")))
        .map(|j| (j["id"].clone(), j["state"].clone()))
        .collect();
    let max_attempt = jobs
        .iter()
        .filter_map(|j| j["attempt"].as_u64())
        .max()
        .unwrap_or(0);
    let requeued = jobs
        .iter()
        .filter(|j| j["attempt"].as_u64().unwrap_or(0) > 1)
        .count();
    let restarts = s
        .server_log()
        .lines()
        .filter(|l| l.contains("destroyed leftover worker"))
        .count();

    // Leaks are counted once everything ended (cleanup follows a terminal state).
    let leak_deadline = Instant::now() + Duration::from_secs(20);
    let mut leaks = s.leaks();
    while !leaks.is_empty() && Instant::now() < leak_deadline {
        std::thread::sleep(Duration::from_millis(100));
        leaks = s.leaks();
    }

    eprintln!(
        "crash test (seed {SEED:#x}): kills {kills}, deliveries sent {BUILDS}, acknowledged {}, \
         POSTs retried {}, acknowledged as duplicate {}, builds {}, jobs {}, job states {states:?}, \
         jobs re-run after a crash {requeued} (max attempt {max_attempt}), leftover workers \
         destroyed at restarts {restarts}, lost {}, duplicate builds {}, not final {}, leaked {}, in {:.1}s",
        acked.len(),
        stats.retried,
        stats.duplicates,
        builds.len(),
        jobs.len(),
        lost.len(),
        doubled.len(),
        not_final.len(),
        leaks.len(),
        started.elapsed().as_secs_f64(),
    );
    assert!(kills >= 10);
    assert_eq!(
        acked.len() as u64,
        BUILDS,
        "every delivery is acknowledged in the end"
    );
    assert!(
        lost.is_empty(),
        "acknowledged deliveries without a build: {lost:?}\n{}",
        s.server_log()
    );
    // A crash between a build's creation and its event being marked processed makes the
    // event run again after the restart; the store holds one build per event, so that
    // second run makes no second build.
    assert!(
        doubled.is_empty(),
        "deliveries with more than one build: {doubled:?}"
    );
    assert!(
        not_final.is_empty(),
        "jobs not in a final state: {not_final:?}\n{}",
        s.server_log()
    );
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
    // The jobs ran their step: a crash is not a build failure, and nothing was cancelled.
    for b in &builds {
        for j in b["jobs"].as_array().unwrap() {
            let ok = matches!(j["state"].as_str(), Some("succeeded" | "error"));
            assert!(ok, "{j:#}");
        }
    }
    s.shutdown_clean();
}

/// The (PR number, head sha) a build was made for.
fn pr_head(b: &Value) -> Option<(u64, String)> {
    (b["trigger"]["kind"] == "pull_request").then(|| {
        (
            b["trigger"]["number"].as_u64().unwrap(),
            b["head_sha"].as_str().unwrap().to_string(),
        )
    })
}

fn count_running(s: &Slate) -> usize {
    all_builds(s)
        .iter()
        .flat_map(|b| b["jobs"].as_array().unwrap().iter())
        .filter(|j| matches!(j["state"].as_str(), Some("provisioning" | "running")))
        .count()
}
