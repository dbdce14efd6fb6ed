//! Turns stored forge events into builds: fetch, plan, create jobs, supersede, cancel.

use crate::app::App;
use serde::{Deserialize, Serialize};
use slate_core::config::RepoConfig;
use slate_core::planner::{plan_pools, Plan};
use slate_core::{BuildId, Change, JobState, ReportState, Trigger};
use slate_forge::status::StatusUpdate;
use slate_forge::webhook::{parse_event, WebhookEvent};
use slate_store::{NewBuild, StoredEvent};
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
                for e in events {
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
    let (pools, checkout, failure) = match prepared {
        Ok(p) => {
            change.head_sha = p.head_sha.clone();
            match plan_pools(&pipeline, p.changed_files.as_deref()) {
                Plan::Jobs(pools) => (pools, Some(p.checkout_sha), None),
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
        Err(e) => (pipeline.pools.clone(), None, Some(e.to_string())),
    };
    let (build_id, job_ids) = app
        .store
        .create_build(NewBuild {
            change: change.clone(),
            pipeline: pipeline.name.clone(),
            event_id,
            pools,
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(sha) = &checkout {
        app.store
            .set_build_checkout(build_id, sha)
            .await
            .map_err(|e| e.to_string())?;
    }
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
        let desc = match &failure {
            Some(r) => r.clone(),
            None => "queued".to_string(),
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
