//! Turns stored forge events into builds: fetch, plan, create jobs, supersede, cancel.

use crate::app::App;
use serde::{Deserialize, Serialize};
use slate_core::config::{PipelineConfig, PlannerKind, RepoConfig};
use slate_core::macports;
use slate_core::planner::{plan_pools, Plan};
use slate_core::{BuildId, Change, JobState, ReportState, Trigger};
use slate_forge::status::StatusUpdate;
use slate_forge::webhook::{parse_event, WebhookEvent};
use slate_store::{NewBuild, NewJob, StoredEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Payload of a `slate submit` event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub repo: String,
    pub branch: String,
}

/// Process events until shutdown: whatever is stored and not processed, oldest first.
pub async fn event_loop(app: Arc<App>) {
    loop {
        let notified = app.wake_events.notified();
        let batch_lock = app.event_lock.lock().await;
        match app.store.unprocessed_events(64).await {
            Ok(events) if !events.is_empty() => {
                let mut handled = 0;
                for e in events {
                    // Among replicas, one handles each event; a dead one's claim expires.
                    match app
                        .store
                        .claim_event(e.id, &app.replica_id, Duration::from_secs(120))
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(err) => {
                            tracing::error!(event.id = e.id, error = %err, "claiming event");
                            continue;
                        }
                    }
                    handled += 1;
                    let result = handle_event(&app, &e).await;
                    let err = result.as_ref().err().map(String::as_str);
                    if let Some(err) = err {
                        tracing::warn!(event.id = e.id, event.kind = %e.kind, error = err, "event not handled");
                    }
                    if let Err(e2) = app.store.mark_event_processed(e.id, err).await {
                        tracing::error!(event.id = e.id, error = %e2, "could not mark event processed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                drop(batch_lock);
                if handled > 0 {
                    continue;
                }
                // Everything left is claimed by other replicas: wait like an idle loop.
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = app.shutdown.cancelled() => return,
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "reading events");
            }
        }
        drop(batch_lock);
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

async fn handle_event(app: &Arc<App>, e: &StoredEvent) -> Result<(), String> {
    match e.source.as_str() {
        "github" => {
            let ev = parse_event(&e.kind, &e.payload).map_err(|err| err.to_string())?;
            match ev {
                WebhookEvent::PullRequest(pr) => {
                    let Some(repo) = app.config.repo(&pr.repo).cloned() else {
                        return Err(format!("repository {} is not configured", pr.repo));
                    };
                    if pr.action.cancels() {
                        cancel_pr(app, &repo.name, pr.number, "pull request closed").await?;
                        // The PR's own cache layers go with it (or expire later if a job
                        // still has them mounted).
                        let caches = app.caches.clone();
                        let (name, number) = (repo.name.clone(), pr.number);
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Err(e) = caches.remove_pr(&name, number) {
                                tracing::info!(repo = %name, pr = number, error = %e, "pr cache layer kept for now");
                            }
                        })
                        .await;
                        return Ok(());
                    }
                    if pr.action.builds(pr.draft) {
                        start_build(app, &repo, pr.change(), Some(e.id)).await?;
                    }
                    Ok(())
                }
                WebhookEvent::Push(push) => {
                    let Some(repo) = app.config.repo(&push.repo).cloned() else {
                        return Err(format!("repository {} is not configured", push.repo));
                    };
                    if push.deleted || !repo.branches.contains(&push.branch) {
                        return Ok(());
                    }
                    start_build(app, &repo, push.change(), Some(e.id)).await?;
                    Ok(())
                }
                WebhookEvent::Ping { .. } | WebhookEvent::Ignored { .. } => Ok(()),
            }
        }
        "manual" => {
            let req: SubmitRequest = serde_json::from_slice(&e.payload)
                .map_err(|err| format!("malformed submit: {err}"))?;
            let Some(repo) = app.config.repo(&req.repo).cloned() else {
                return Err(format!("repository {} is not configured", req.repo));
            };
            start_build(app, &repo, manual_change(&repo, &req.branch), Some(e.id)).await?;
            Ok(())
        }
        other => Err(format!("unknown event source {other:?}")),
    }
}

/// The change a `slate submit` of a branch stands for; the head is resolved by fetching.
pub fn manual_change(repo: &RepoConfig, branch: &str) -> Change {
    Change {
        repo: repo.name.clone(),
        trigger: Trigger::Manual {
            branch: branch.to_string(),
        },
        head_sha: String::new(),
        head_ref: branch.to_string(),
        base_sha: None,
        base_ref: None,
        author: "slate submit".into(),
    }
}

/// Cancel every active job of a pull request.
async fn cancel_pr(app: &Arc<App>, repo: &str, pr: u64, reason: &str) -> Result<(), String> {
    let jobs = app
        .store
        .active_jobs_of_pr(repo, pr, BuildId(i64::MAX))
        .await
        .map_err(|e| e.to_string())?;
    for j in jobs {
        app.cancel_job(j.id, reason)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Fetch, plan and enqueue a build for `change`. Returns the build, if one was made.
pub async fn start_build(
    app: &Arc<App>,
    repo: &RepoConfig,
    mut change: Change,
    event_id: Option<i64>,
) -> Result<Option<BuildId>, String> {
    let Some(pipeline) = app.config.pipeline(&repo.pipeline).cloned() else {
        return Err(format!("pipeline {} is not configured", repo.pipeline));
    };
    let started = std::time::Instant::now();
    let prepared = app.git.prepare(repo, &change).await;
    let _planning = app.planning.lock().await;
    let plain = |pools: &[String]| pools.iter().map(NewJob::pool).collect::<Vec<_>>();
    let (jobs, checkout, failure, note) = match prepared {
        Ok(p) => {
            change.head_sha = p.head_sha.clone();
            if matches!(change.trigger, Trigger::PullRequest { .. }) {
                // The base tip the merge was made on: another replica (or a rebuild)
                // reproduces the same merge commit from it.
                change.base_sha = p.base_sha.clone();
            }
            match plan_pools(&pipeline, p.changed_files.as_deref()) {
                Plan::Jobs(pools) if pipeline.planner == PlannerKind::Macports => {
                    match plan_ports(app, repo, &p).await {
                        Ok(plan) if plan.ports.is_empty() => {
                            tracing::info!(repo = %change.repo, sha = %change.head_sha, note = %plan.note, "no port to build");
                            report_all(app, &change, &pipeline, ReportState::Success, &plan.note);
                            return Ok(None);
                        }
                        Ok(plan) => (
                            target_jobs(&pipeline, &pools, &plan.ports),
                            Some(p.checkout_sha),
                            None,
                            Some(plan.note),
                        ),
                        Err(e) => (plain(&pools), None, Some(e), None),
                    }
                }
                Plan::Jobs(pools) if pipeline.plan.is_some() => (
                    target_jobs(&pipeline, &pools, &[]),
                    Some(p.checkout_sha),
                    None,
                    None,
                ),
                Plan::Jobs(pools) => (plain(&pools), Some(p.checkout_sha), None, None),
                Plan::Skip { reason } => {
                    tracing::info!(repo = %change.repo, sha = %change.head_sha, reason, "no build needed");
                    if let Some(r) = &app.reporter {
                        for pool in &pipeline.pools {
                            r.report(StatusUpdate {
                                repo: change.repo.clone(),
                                sha: change.head_sha.clone(),
                                state: ReportState::Success,
                                context: format!("slate/{pool}"),
                                description: format!("skipped: {reason}"),
                                target_url: None,
                            });
                        }
                    }
                    return Ok(None);
                }
            }
        }
        Err(e) => (plain(&pipeline.pools), None, Some(e.to_string()), None),
    };
    let created = app
        .store
        .create_build(NewBuild {
            change: change.clone(),
            pipeline: pipeline.name.clone(),
            event_id,
            // With the jobs, not after: another replica may claim one at once.
            checkout_sha: checkout.clone(),
            jobs,
        })
        .await;
    let (build_id, job_ids) = match created {
        Ok(c) => c,
        // The event's build exists: a crash came between creating it and marking the
        // event processed. Handling it again must not make a second build.
        Err(slate_store::StoreError::Database(e))
            if event_id.is_some() && e.to_string().to_lowercase().contains("unique") =>
        {
            tracing::info!(event.id = event_id, "event already has its build");
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    };
    if let Some(reason) = &failure {
        for id in &job_ids {
            app.store
                .transition_job(*id, &[JobState::Queued], JobState::Error, Some(reason))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    drop(_planning);
    tracing::info!(
        build.id = build_id.0,
        repo = %change.repo,
        sha = %change.head_sha,
        jobs = job_ids.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "build created"
    );
    let build = app
        .store
        .get_build(build_id)
        .await
        .map_err(|e| e.to_string())?;
    for id in &job_ids {
        let job = app.store.get_job(*id).await.map_err(|e| e.to_string())?;
        let desc = match (&failure, &note) {
            (Some(r), _) => r.clone(),
            (None, Some(n)) => format!("queued; {n}"),
            (None, None) => "queued".to_string(),
        };
        app.report(&build, &job, &desc);
    }
    // A new head supersedes the older heads' jobs.
    if let Trigger::PullRequest { number, .. } = &change.trigger {
        let short: String = change.head_sha.chars().take(7).collect();
        let old = app
            .store
            .active_jobs_of_pr(&change.repo, *number, build_id)
            .await
            .map_err(|e| e.to_string())?;
        for j in old {
            app.cancel_job(j.id, &format!("superseded by {short}"))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    app.wake_scheduler.notify_one();
    Ok(Some(build_id))
}

/// The `macports` planner over the change: `git diff --name-status -M base...head`, and
/// the checkout's Portfiles only when a PortGroup changed. No base: nothing to compare,
/// no port.
async fn plan_ports(
    app: &App,
    repo: &RepoConfig,
    p: &crate::git::Prepared,
) -> Result<macports::MacportsPlan, String> {
    let Some(base) = &p.base_sha else {
        let mut plan = macports::plan::<_, String, String>(&[], Vec::new(), 0);
        plan.note = "no port changed (no base commit to compare with)".into();
        return Ok(plan);
    };
    let text = app
        .git
        .name_status(&repo.name, base, &p.head_sha)
        .await
        .map_err(|e| format!("listing changed files: {e}"))?;
    let changes =
        macports::parse_name_status(&text).map_err(|e| format!("reading git diff: {e}"))?;
    let portfiles = if macports::changed_portgroups(&changes).is_empty() {
        Vec::new()
    } else {
        app.git
            .portfiles(&repo.name, &p.checkout_sha)
            .await
            .map_err(|e| format!("reading Portfiles: {e}"))?
    };
    let limit = app
        .config
        .pipeline(&repo.pipeline)
        .map(|pl| pl.portgroup_limit)
        .unwrap_or(50);
    let plan = macports::plan(&changes, portfiles, limit);
    tracing::info!(
        repo = %repo.name,
        ports = plan.ports.len(),
        refused = plan.refused.len(),
        note = %plan.note,
        "macports plan"
    );
    Ok(plan)
}

/// Jobs for static targets: with a plan step, one planning job per pool (the targets go
/// to it as the `targets` variable); otherwise one job per target and pool, target-major.
fn target_jobs(pipeline: &PipelineConfig, pools: &[String], targets: &[String]) -> Vec<NewJob> {
    if pipeline.plan.is_some() {
        let mut vars = BTreeMap::new();
        if !targets.is_empty() {
            vars.insert("targets".to_string(), targets.join(" "));
        }
        return pools
            .iter()
            .map(|pool| NewJob::target(pool, slate_core::PLAN_TARGET, vars.clone()))
            .collect();
    }
    let mut jobs = Vec::with_capacity(targets.len() * pools.len());
    for t in targets {
        for pool in pools {
            let vars = BTreeMap::from([("port".to_string(), t.clone())]);
            jobs.push(NewJob::target(pool, t, vars));
        }
    }
    jobs
}

/// One status per pool of the pipeline (a build that makes no job).
fn report_all(
    app: &App,
    change: &Change,
    pipeline: &PipelineConfig,
    state: ReportState,
    description: &str,
) {
    if let Some(r) = &app.reporter {
        for pool in &pipeline.pools {
            r.report(StatusUpdate {
                repo: change.repo.clone(),
                sha: change.head_sha.clone(),
                state,
                context: format!("slate/{pool}"),
                description: description.to_string(),
                target_url: None,
            });
        }
    }
}
