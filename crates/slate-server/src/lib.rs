//! The slate server: webhooks, API, scheduler and runners over the store, forge and providers.
//!
//! [`start`] takes a bound listener and a shutdown future, so tests bind port 0.

pub mod agents;
pub mod api;
pub mod app;
pub mod artifacts;
mod dynamic;
pub mod events;
pub mod git;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod recovery;
pub mod remote_files;
pub mod runner;
pub mod scheduler;
pub mod tls;
pub mod ui;
pub mod webhook;

pub use app::{App, AppOptions, StartError};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::sync::Arc;

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    let ui = ui::UiConfig::of(&app);
    router_with_ui(app, ui)
}

/// [`router`] with explicit web UI settings.
pub fn router_with_ui(app: Arc<App>, ui: ui::UiConfig) -> Router {
    let core = Router::new()
        .route(
            "/hooks/github",
            post(webhook::github_hook).layer(DefaultBodyLimit::max(webhook::MAX_WEBHOOK_BODY)),
        )
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/builds", get(api::list_builds))
        .route("/api/v1/builds/{id}", get(api::get_build))
        .route("/api/v1/jobs/{id}", get(api::get_job))
        .route("/api/v1/jobs/{id}/log", get(api::job_log))
        .route("/api/v1/jobs/{id}/artifacts", get(artifacts::list))
        .route(
            "/api/v1/jobs/{id}/artifacts/{*path}",
            get(artifacts::download),
        )
        .route("/api/v1/jobs/{id}/cancel", post(api::cancel_job))
        .route("/api/v1/images", get(api::images))
        .route("/api/v1/submit", post(api::submit))
        .with_state(app.clone());
    // The web UI (`/`, `/jobs/{id}` which statuses link to, …) wraps the rest.
    ui::router_with(app, core, ui)
}

/// Recover from any earlier crash, start the background tasks and serve HTTP until
/// `shutdown` resolves; then stop the tasks, requeue running jobs and destroy their workers.
pub async fn start(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let report = recovery::recover(&app)
        .await
        .map_err(|e| std::io::Error::other(format!("recovery: {e}")))?;
    if !report.workers_destroyed.is_empty() || !report.jobs_requeued.is_empty() {
        tracing::info!(
            workers = report.workers_destroyed.len(),
            jobs = report.jobs_requeued.len(),
            "recovered from an earlier run"
        );
    }
    // After recovery, which destroyed the warm VMs a previous process left.
    app.start_warm_pools();
    let agents_tcp = match &app.config.server.agent_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            let fingerprint = app
                .agent_tls
                .as_ref()
                .map(|t| t.fingerprint.clone())
                .unwrap_or_default();
            tracing::info!(addr = %l.local_addr()?, %fingerprint, "agents may dial in over tls");
            for pool in &app.config.pools {
                if pool.exec.as_ref().is_some_and(|e| e.insecure_plaintext) {
                    tracing::warn!(pool = %pool.name, "insecure_plaintext: this pool's agents speak plaintext tcp; their token, secrets and logs cross the network in clear");
                }
            }
            Some(tokio::spawn(runner::accept_tcp(app.clone(), l)))
        }
        None => None,
    };
    let events = tokio::spawn(events::event_loop(app.clone()));
    let sched = tokio::spawn(scheduler::scheduler_loop(app.clone()));
    let leases = tokio::spawn(scheduler::lease_loop(app.clone()));
    let housekeeping = tokio::spawn(housekeeping_loop(app.clone()));
    let rebuilds = tokio::spawn(images::rebuild_loop(app.clone()));
    let drain_app = app.clone();
    let served = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Stop claiming, let running jobs finish within the grace period (the API
            // keeps serving their logs meanwhile), then stop the rest.
            let app = drain_app;
            app.draining.cancel();
            let grace = app.config.server.shutdown_grace;
            let running = app.running.lock().unwrap().len();
            tracing::info!(running, grace_ms = grace.as_millis() as u64, "draining");
            let deadline = tokio::time::Instant::now() + grace;
            while !app.running.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            app.shutdown.cancel();
        })
        .await;
    app.shutdown.cancel();
    let _ = events.await;
    let _ = sched.await;
    let _ = leases.await;
    let _ = housekeeping.await;
    rebuilds.abort();
    if let Some(t) = agents_tcp {
        let _ = t.await;
    }
    // Runners see the shutdown token, destroy their workers and requeue their jobs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !app.running.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.qemu.stop_warm().await;
    if let Some(r) = &app.reporter {
        r.flush(std::time::Duration::from_secs(5)).await;
    }
    served
}

/// Cache housekeeping: PR layers of PRs that went quiet expire after a week (closed PRs
/// lose theirs at once), and stored objects nothing links to any more are removed.
async fn housekeeping_loop(app: Arc<App>) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
    const PR_LAYER_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = app.shutdown.cancelled() => return,
        }
        let caches = app.caches.clone();
        let _ = tokio::task::spawn_blocking(move || {
            match caches.expire_pr_layers(PR_LAYER_AGE) {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(layers = gone.len(), "expired pr cache layers")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "expiring pr cache layers"),
            }
            match caches.gc_objects() {
                Ok(r) if r.files > 0 => {
                    tracing::info!(files = r.files, bytes = r.bytes, "cache objects removed")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cache object gc"),
            }
        })
        .await;
    }
}
