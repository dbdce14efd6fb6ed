//! Jobs per minute of one versus two `slate serve` replicas on one PostgreSQL queue: the
//! servers run in this process (as in the status section), each with its own data
//! directory and a sandbox pool, and `true` jobs are submitted through the API.
//!
//! Besides the rate it records what bounds it: host CPU busy over the run, this
//! process's CPU (servers, plus reaped children: runc, git), and each replica's mean
//! provisioning and job time from its own metrics.

use super::scratch_db::ScratchDb;
use super::{progress, Remote, Server};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use slate_testkit::github::GithubRecorder;
use std::path::Path;
use std::time::{Duration, Instant};

/// Jobs run before the clock starts, per replica: each server's first job also clones
/// its git mirror.
const WARMUP_PER_REPLICA: usize = 2;

#[derive(Debug, Clone)]
pub struct ReplicasParams {
    pub jobs: usize,
    pub max_jobs: u32,
}

#[derive(Debug, Serialize)]
pub struct ReplicaRun {
    pub replicas: usize,
    pub jobs: usize,
    /// From the first submit to the last job final.
    pub seconds: f64,
    pub jobs_per_min: f64,
    /// Jobs each replica ran (by whose data directory holds the job's log).
    pub per_replica: Vec<usize>,
    /// Every job succeeded on its first attempt and has exactly one log, in one replica.
    pub all_once: bool,
    /// Jobs that did not succeed once, in one replica: id, state, attempt, reason, and
    /// the replicas holding a log of it.
    pub not_once: Vec<String>,
    /// Host CPU busy over the measured window, as a fraction of all CPUs.
    pub host_cpu_busy: f64,
    /// CPU seconds of this process (servers) and of its reaped children (runc, git…)
    /// per job.
    pub cpu_s_per_job_self: f64,
    pub cpu_s_per_job_children: f64,
    /// CPU seconds of the PostgreSQL server's processes per job.
    pub cpu_s_per_job_postgres: f64,
    /// Mean round trip of one submit (the server fetches, merges and plans before it
    /// answers; one client per replica, in parallel), and when the last submit
    /// returned, from the start.
    pub submit_ms_mean: f64,
    pub submits_done_s: f64,
    /// Mean time from a job's creation to its agent's first contact (queue wait, source
    /// export, provisioning, agent start), from the database.
    pub created_to_running_ms_mean: f64,
    /// Mean provisioning time and mean job time (provisioning to end), from the servers'
    /// metrics, over every job the replicas ran (warm-up included).
    pub provision_ms_mean: f64,
    pub job_ms_mean: f64,
    /// Mean time from the agent's first contact (running) to the job's end recorded
    /// (worker destroyed), from the database.
    pub running_ms_mean: f64,
    /// Load average (1 min) at the end.
    pub loadavg_1m: f64,
}

#[derive(Debug, Serialize)]
pub struct ReplicasReport {
    pub max_jobs_per_replica: u32,
    pub runs: Vec<ReplicaRun>,
    /// jobs/min of two replicas over one.
    pub speedup: f64,
}

/// (busy, total) jiffies of all CPUs from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// (self, children) CPU seconds of this process from /proc/self/stat.
fn process_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized name; utime is field 14 overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    // rest[0] is field 3 (state): utime 14 → 11, stime 12, cutime 13, cstime 14.
    (get(11) + get(12), get(13) + get(14))
}

/// CPU seconds used so far by every process named `postgres` (the server's backends
/// come and go; the ones alive at both ends dominate a short run).
fn postgres_cpu() -> f64 {
    let mut total = 0.0;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in rd.flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<f64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            total += (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0;
        }
    }
    total
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Sum and count of a histogram in a Prometheus text exposition.
fn histogram(text: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}")))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    (value("sum"), value("count"))
}

async fn submit(http: &reqwest::Client, url: &str, token: &str) -> Result<()> {
    let resp = http
        .post(format!("{url}/api/v1/submit"))
        .bearer_auth(token)
        .json(&serde_json::json!({"repo": super::REPO, "branch": "main"}))
        .send()
        .await?;
    ensure!(resp.status().is_success(), "submit: {}", resp.status());
    Ok(())
}

/// Wait until every job with id above `after` is final; returns (id, state, attempt).
type JobRow = (i64, String, i32, Option<String>);

async fn wait_final(
    pool: &sqlx::PgPool,
    after: i64,
    expect: usize,
    timeout: Duration,
) -> Result<Vec<JobRow>> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows: Vec<JobRow> =
            sqlx::query_as("SELECT id, state, attempt, reason FROM jobs WHERE id > $1 ORDER BY id")
                .bind(after)
                .fetch_all(pool)
                .await?;
        let done = rows
            .iter()
            .filter(|r| !matches!(r.1.as_str(), "queued" | "provisioning" | "running"))
            .count();
        if rows.len() >= expect && done == rows.len() {
            return Ok(rows);
        }
        ensure!(
            Instant::now() < deadline,
            "{done} of {expect} jobs final after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_with(
    n: usize,
    p: &ReplicasParams,
    dir: &Path,
    image: &Path,
    agent: &Path,
    db: &ScratchDb,
) -> Result<ReplicaRun> {
    std::fs::create_dir_all(dir)?;
    let remote = Remote::create(dir).await?;
    let github = GithubRecorder::start();
    let mut servers = Vec::new();
    for i in 0..n {
        let extra = format!("database = \"{}\"\nreplica_id = \"r{i}\"\n", db.url);
        let s = Server::start_with(
            &dir.join(format!("r{i}")),
            image,
            agent,
            &remote.bare,
            &github.url(),
            &extra,
            p.max_jobs,
        )
        .await
        .with_context(|| format!("starting replica {i}"))?;
        servers.push(s);
    }
    let result = measure(n, p, &servers, &db.url).await;
    for s in servers {
        s.stop().await?;
    }
    result
}

async fn measure(
    n: usize,
    p: &ReplicasParams,
    servers: &[Server],
    database: &str,
) -> Result<ReplicaRun> {
    let (_, token) = slate_server::ui::auth::create_token(servers[0].app.store.as_ref(), "bench")
        .await
        .context("creating an api token")?;
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(database)
        .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    let warm = WARMUP_PER_REPLICA * n;
    progress(&format!("replicas={n}: {warm} warm-up jobs"));
    for i in 0..warm {
        submit(&http, &servers[i % n].url, &token).await?;
    }
    let rows = wait_final(&pg, 0, warm, Duration::from_secs(120)).await?;
    ensure!(
        rows.iter().all(|r| r.1 == "succeeded"),
        "warm-up jobs did not all succeed: {rows:?}"
    );
    let after = rows.iter().map(|r| r.0).max().unwrap_or(0);

    progress(&format!(
        "replicas={n}: {} jobs, max_jobs {} per replica",
        p.jobs, p.max_jobs
    ));
    let (busy0, total0) = cpu_jiffies();
    let (self0, child0) = process_cpu();
    let pg0 = postgres_cpu();
    let t = Instant::now();
    // One client per replica, in parallel, each submitting its share in turn: as many
    // submitters as servers, so the submit path scales with the replicas as the jobs do.
    let mut submitters = Vec::new();
    for (k, server) in servers.iter().enumerate() {
        let (http, url, token) = (http.clone(), server.url.clone(), token.clone());
        let count = (k..p.jobs).step_by(n).count();
        submitters.push(tokio::spawn(async move {
            let mut ms = 0.0;
            for _ in 0..count {
                let s = Instant::now();
                submit(&http, &url, &token).await?;
                ms += s.elapsed().as_secs_f64() * 1e3;
            }
            anyhow::Ok(ms)
        }));
    }
    let mut submit_ms = 0.0;
    for task in submitters {
        submit_ms += task.await??;
    }
    let submits_done_s = t.elapsed().as_secs_f64();
    let rows = wait_final(&pg, after, p.jobs, Duration::from_secs(600)).await?;
    let seconds = t.elapsed().as_secs_f64();
    let (busy1, total1) = cpu_jiffies();
    let (self1, child1) = process_cpu();
    let pg1 = postgres_cpu();
    let (running_s, to_running_s): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT avg(extract(epoch FROM finished_at - started_at))::float8, \
         avg(extract(epoch FROM started_at - created_at))::float8 FROM jobs WHERE id > $1",
    )
    .bind(after)
    .fetch_one(&pg)
    .await?;
    pg.close().await;

    // Who ran each job: the replica whose data directory holds its log.
    let mut per_replica = vec![0usize; n];
    let mut not_once = Vec::new();
    for (id, state, attempt, reason) in &rows {
        let holders: Vec<usize> = (0..n)
            .filter(|&i| servers[i].data.join(format!("logs/{id}.log")).is_file())
            .collect();
        if state != "succeeded" || *attempt != 1 || holders.len() != 1 {
            not_once.push(format!(
                "job {id}: {state}, attempt {attempt}, {reason:?}, logs in replicas {holders:?}"
            ));
        }
        if let [i] = holders[..] {
            per_replica[i] += 1;
        }
    }
    let (mut prov, mut jobs) = ((0.0, 0.0), (0.0, 0.0));
    for s in servers {
        let text = http
            .get(format!("{}/metrics", s.url))
            .send()
            .await?
            .text()
            .await?;
        let (ps, pc) = histogram(&text, "slate_provision_duration_seconds");
        let (js, jc) = histogram(&text, "slate_job_duration_seconds");
        prov = (prov.0 + ps, prov.1 + pc);
        jobs = (jobs.0 + js, jobs.1 + jc);
    }
    let m = p.jobs as f64;
    Ok(ReplicaRun {
        replicas: n,
        jobs: p.jobs,
        seconds,
        jobs_per_min: m / seconds * 60.0,
        per_replica,
        all_once: rows.len() == p.jobs && not_once.is_empty(),
        not_once,
        host_cpu_busy: (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
        cpu_s_per_job_self: (self1 - self0) / m,
        cpu_s_per_job_children: (child1 - child0) / m,
        cpu_s_per_job_postgres: (pg1 - pg0) / m,
        submit_ms_mean: submit_ms / m,
        submits_done_s,
        created_to_running_ms_mean: to_running_s.unwrap_or(f64::NAN) * 1e3,
        provision_ms_mean: prov.0 / prov.1.max(1.0) * 1e3,
        job_ms_mean: jobs.0 / jobs.1.max(1.0) * 1e3,
        running_ms_mean: running_s.unwrap_or(f64::NAN) * 1e3,
        loadavg_1m: loadavg(),
    })
}

pub async fn bench_replicas(
    admin: &str,
    p: &ReplicasParams,
    dir: &Path,
    image: &Path,
    agent: &Path,
) -> Result<ReplicasReport> {
    ensure!(
        p.jobs > 0 && p.max_jobs > 0,
        "--replica-jobs and --replica-max-jobs must be positive"
    );
    let mut runs = Vec::new();
    for n in [1, 2] {
        let db = ScratchDb::create(admin, "replicas").await?;
        let r = run_with(n, p, &dir.join(format!("replicas-{n}")), image, agent, &db).await;
        let dropped = db.drop_now().await;
        let r = r?;
        dropped?;
        tracing::info!(
            replicas = n,
            jobs_per_min = r.jobs_per_min,
            all_once = r.all_once,
            "replicas run"
        );
        runs.push(r);
    }
    let speedup = runs[1].jobs_per_min / runs[0].jobs_per_min;
    Ok(ReplicasReport {
        max_jobs_per_replica: p.max_jobs,
        runs,
        speedup,
    })
}
