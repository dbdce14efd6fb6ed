//! Claim throughput of the PostgreSQL queue: two replicas (two `PgStore`s, two
//! connection pools, several claimers each, as two `slate serve` would run) drain jobs
//! pre-inserted across a few pools, on a scratch database per round.
//!
//! A claim is what a scheduler does: `claim_next_job_for`, the job moving from queued to
//! provisioning under a lease for that replica. Claimed jobs stay claimed (nothing runs
//! them), and `max_active` is set above the job count so the limit never binds but its
//! check still runs on every claim, as in the server.

use super::scratch_db::ScratchDb;
use super::{progress, Summary};
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use slate_core::{Change, JobId, Trigger};
use slate_store::{NewBuild, NewJob, PgStore, Store};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TARGET_CLAIMS_PER_S: f64 = 500.0;

/// Jobs per pre-inserted build: builds share one `created_at` per transaction, as a
/// planned build's jobs do.
const JOBS_PER_BUILD: usize = 10;

/// Long enough that no lease runs out during a round.
const LEASE: Duration = Duration::from_secs(600);

const REPLICAS: [&str; 2] = ["bench-a", "bench-b"];

#[derive(Debug, Clone)]
pub struct ClaimsParams {
    pub jobs: usize,
    pub pools: usize,
    pub claimers: usize,
    pub rounds: usize,
}

#[derive(Debug, Serialize)]
pub struct ClaimsRound {
    pub seconds: f64,
    pub claims_per_s: f64,
    /// Claims each replica made, in `REPLICAS` order.
    pub per_replica: [usize; 2],
}

#[derive(Debug, Serialize)]
pub struct ClaimsReport {
    pub jobs: usize,
    pub pools: usize,
    pub replicas: usize,
    pub claimers_per_replica: usize,
    pub rounds: Vec<ClaimsRound>,
    /// Median over the rounds.
    pub claims_per_s: f64,
    /// The split of the median round.
    pub per_replica: [usize; 2],
    /// Latency of one successful `claim_next_job_for`, every round.
    pub claim_ms: Summary,
    /// Job ids handed out more than once, summed over rounds.
    pub double_claims: usize,
    /// Jobs not claimed at the end of a round, summed over rounds.
    pub unclaimed: usize,
    /// The database agrees: every job provisioning, attempt 1, leased to the replica that
    /// reported claiming it.
    pub db_verified: bool,
    pub target_claims_per_s: f64,
    pub met: bool,
}

fn change(n: usize) -> Change {
    Change {
        repo: "bench/claims".to_owned(),
        trigger: Trigger::Push {
            branch: "main".to_owned(),
        },
        head_sha: format!("{n:040x}"),
        head_ref: "main".to_owned(),
        base_sha: None,
        base_ref: None,
        author: "bench".to_owned(),
    }
}

pub fn pool_name(i: usize) -> String {
    format!("pool-{i}")
}

/// Pre-insert `jobs` queued jobs across `pools` pools, round robin.
async fn fill(store: &PgStore, jobs: usize, pools: usize) -> Result<()> {
    let mut k = 0;
    let mut n = 0;
    while k < jobs {
        let count = JOBS_PER_BUILD.min(jobs - k);
        let list = (k..k + count).map(|j| NewJob::pool(pool_name(j % pools)));
        store
            .create_build(NewBuild {
                change: change(n),
                pipeline: "bench".to_owned(),
                event_id: None,
                checkout_sha: None,
                jobs: list.collect(),
            })
            .await?;
        k += count;
        n += 1;
    }
    Ok(())
}

/// One claimer: round robin over the pools from its own start, one claim at a time,
/// until a whole turn finds every pool empty. Returns (job ids, claim latencies in ms).
async fn claimer(
    store: PgStore,
    owner: &'static str,
    pools: Vec<String>,
    start: usize,
    go: Arc<tokio::sync::Barrier>,
) -> Result<(Vec<JobId>, Vec<f64>)> {
    go.wait().await;
    let (mut ids, mut lat) = (Vec::new(), Vec::new());
    let mut cursor = start;
    let mut empty_in_a_row = 0;
    while empty_in_a_row < pools.len() {
        let pool = &pools[cursor % pools.len()];
        cursor += 1;
        let t = Instant::now();
        match store
            .claim_next_job_for(pool, u32::MAX, owner, LEASE)
            .await
            .with_context(|| format!("claiming from {pool}"))?
        {
            Some(job) => {
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                ids.push(job.id);
                empty_in_a_row = 0;
            }
            None => empty_in_a_row += 1,
        }
    }
    Ok((ids, lat))
}

struct RoundResult {
    round: ClaimsRound,
    latencies: Vec<f64>,
    double_claims: usize,
    unclaimed: usize,
    db_ok: bool,
}

async fn round(admin: &str, p: &ClaimsParams) -> Result<RoundResult> {
    let db = ScratchDb::create(admin, "claims").await?;
    let result = round_in(&db, p).await;
    let dropped = db.drop_now().await;
    let r = result?;
    dropped?;
    Ok(r)
}

async fn round_in(db: &ScratchDb, p: &ClaimsParams) -> Result<RoundResult> {
    // One after the other: the first migrates the fresh schema.
    let a = PgStore::connect(&db.url).await.context("replica a")?;
    let b = PgStore::connect(&db.url).await.context("replica b")?;
    fill(&a, p.jobs, p.pools).await?;
    let pools: Vec<String> = (0..p.pools).map(pool_name).collect();

    let go = Arc::new(tokio::sync::Barrier::new(2 * p.claimers + 1));
    let mut tasks = Vec::new();
    for (r, store) in [&a, &b].into_iter().enumerate() {
        for c in 0..p.claimers {
            tasks.push((
                r,
                tokio::spawn(claimer(
                    store.clone(),
                    REPLICAS[r],
                    pools.clone(),
                    r * p.claimers + c,
                    go.clone(),
                )),
            ));
        }
    }
    go.wait().await;
    let t = Instant::now();
    let mut per_replica = [0usize; 2];
    let mut all: Vec<JobId> = Vec::with_capacity(p.jobs);
    let mut owner_of: BTreeMap<i64, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(p.jobs);
    for (r, task) in tasks {
        let (ids, lat) = task.await??;
        per_replica[r] += ids.len();
        for id in &ids {
            owner_of.insert(id.0, r);
        }
        all.extend(ids);
        latencies.extend(lat);
    }
    let seconds = t.elapsed().as_secs_f64();

    let distinct: HashSet<JobId> = all.iter().copied().collect();
    let double_claims = all.len() - distinct.len();
    // The database's own account, independent of what the claimers returned.
    let rows: Vec<(i64, String, i32, Option<String>, bool)> = sqlx::query_as(
        "SELECT id, state, attempt, owner, lease_until > now() FROM jobs ORDER BY id",
    )
    .fetch_all(a.pool())
    .await?;
    let unclaimed = rows.iter().filter(|r| r.1 == "queued").count();
    let db_ok = rows.len() == p.jobs
        && rows.iter().all(|(id, state, attempt, owner, leased)| {
            state == "provisioning"
                && *attempt == 1
                && *leased
                && owner_of
                    .get(id)
                    .is_some_and(|r| owner.as_deref() == Some(REPLICAS[*r]))
        });
    a.close().await;
    b.close().await;
    Ok(RoundResult {
        round: ClaimsRound {
            seconds,
            claims_per_s: distinct.len() as f64 / seconds,
            per_replica,
        },
        latencies,
        double_claims,
        unclaimed,
        db_ok,
    })
}

pub async fn bench_claims(admin: &str, p: &ClaimsParams) -> Result<ClaimsReport> {
    ensure!(
        p.jobs > 0 && p.pools > 0 && p.claimers > 0 && p.rounds > 0,
        "--claim-jobs, --claim-pools, --claimers and --claim-rounds must be positive"
    );
    let mut rounds = Vec::new();
    let mut latencies = Vec::new();
    let (mut double_claims, mut unclaimed, mut db_verified) = (0, 0, true);
    for i in 1..=p.rounds {
        progress(&format!(
            "claims round {i}/{}: {} jobs in {} pools, 2 replicas x {} claimers",
            p.rounds, p.jobs, p.pools, p.claimers
        ));
        let r = round(admin, p).await?;
        tracing::info!(
            round = i,
            claims_per_s = r.round.claims_per_s,
            replica_a = r.round.per_replica[0],
            replica_b = r.round.per_replica[1],
            double_claims = r.double_claims,
            "claims round"
        );
        double_claims += r.double_claims;
        unclaimed += r.unclaimed;
        db_verified &= r.db_ok;
        latencies.extend(r.latencies);
        rounds.push(r.round);
    }
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&x, &y| rounds[x].claims_per_s.total_cmp(&rounds[y].claims_per_s));
    let median = &rounds[order[(order.len() - 1) / 2]];
    let (claims_per_s, per_replica) = (median.claims_per_s, median.per_replica);
    Ok(ClaimsReport {
        jobs: p.jobs,
        pools: p.pools,
        replicas: REPLICAS.len(),
        claimers_per_replica: p.claimers,
        claims_per_s,
        per_replica,
        rounds,
        claim_ms: Summary::of(&latencies),
        double_claims,
        unclaimed,
        db_verified,
        target_claims_per_s: TARGET_CLAIMS_PER_S,
        met: claims_per_s >= TARGET_CLAIMS_PER_S
            && double_claims == 0
            && unclaimed == 0
            && db_verified,
    })
}
