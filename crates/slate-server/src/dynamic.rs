//! Dynamic jobs: a planning job's plan step prints targets (JSON lines); each becomes a
//! job of the planning job's pool in the same build, queued in the printed order.

use crate::app::App;
use crate::logs::LogWriter;
use slate_core::planner::parse_plan_output;
use slate_core::{Build, Job, JobState};
use slate_store::NewJob;
use std::sync::Arc;

/// Most stdout a plan step may print.
pub const MAX_PLAN_OUTPUT: usize = 4 << 20;

/// After a planning job's plan step succeeded: parse what it printed and queue one job per
/// target. A malformed line fails the planning job, naming the line.
pub(crate) async fn add_planned_jobs(
    app: &Arc<App>,
    build: &Build,
    job: &Job,
    stdout: &[u8],
    log: &mut LogWriter,
) -> crate::runner::Outcome {
    use crate::runner::Outcome;
    let text = String::from_utf8_lossy(stdout);
    let targets = match parse_plan_output(&text) {
        Ok(t) => t,
        Err(e) => {
            let _ = log.note(&e.to_string()).await;
            return Outcome::new(JobState::Failed, e.to_string());
        }
    };
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let _ = log
        .note(&format!(
            "plan: {} target(s) for pool {}: {}",
            targets.len(),
            job.pool,
            names.join(" ")
        ))
        .await;
    if targets.is_empty() {
        return Outcome::new(JobState::Succeeded, "plan: no targets");
    }
    let new: Vec<NewJob> = targets
        .into_iter()
        .map(|t| NewJob::target(&job.pool, t.name, t.vars))
        .collect();
    let ids = match app.store.add_jobs(build.id, new).await {
        Ok(ids) => ids,
        Err(e) => return Outcome::error(format!("queueing planned jobs: {e}")),
    };
    tracing::info!(
        build.id = build.id.0,
        job.id = job.id.0,
        pool = %job.pool,
        jobs = ids.len(),
        "planned jobs queued"
    );
    // Cancelled (superseded, closed) while planning: its jobs go with it.
    let cancelled = match app.store.get_job(job.id).await {
        Ok(j) if j.state != JobState::Running => j.reason.or(Some("cancelled".into())),
        _ => None,
    };
    for id in &ids {
        if let Some(reason) = &cancelled {
            let _ = app.cancel_job(*id, reason).await;
        } else if let Ok(j) = app.store.get_job(*id).await {
            app.report(build, &j, "queued");
        }
    }
    app.wake_scheduler.notify_one();
    Outcome::new(
        JobState::Succeeded,
        format!("planned {} job(s): {}", ids.len(), names.join(" ")),
    )
}
