//! Startup reconciliation after a crash: destroy workers with no live job, requeue
//! interrupted jobs, remove stray per-job directories.

use crate::app::App;
use slate_core::JobState;
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub workers_destroyed: Vec<String>,
    pub jobs_requeued: Vec<i64>,
}

/// Run before the scheduler starts: nothing runs in this process yet, so every worker
/// that exists is a leftover and every provisioning/running job was interrupted.
pub async fn recover(app: &Arc<App>) -> Result<RecoveryReport, slate_store::StoreError> {
    let mut report = RecoveryReport::default();
    // With replicas, the store's worker records are everyone's: only what this host's
    // providers list is ours to destroy (and other replicas' jobs keep their leases).
    let mut names: BTreeSet<String> = if app.replicated {
        BTreeSet::new()
    } else {
        app.store
            .list_workers()
            .await?
            .into_iter()
            .map(|w| w.name)
            .collect()
    };
    let mut providers: Vec<Arc<dyn slate_provider::Provider>> = Vec::new();
    for p in app.providers.values() {
        if !providers.iter().any(|q| Arc::ptr_eq(q, p)) {
            providers.push(p.clone());
        }
    }
    for p in &providers {
        match p.list().await {
            Ok(found) => {
                for n in found {
                    if slate_core::JobId::from_resource_name(&n).is_some() {
                        names.insert(n);
                        continue;
                    }
                    // Not a job's (a warm VM of a previous process): only its provider
                    // knows it.
                    match p.destroy(&n).await {
                        Ok(()) => {
                            app.metrics.leaked_workers_cleaned.inc();
                            tracing::info!(worker = %n, "destroyed leftover warm vm");
                            report.workers_destroyed.push(n);
                        }
                        Err(e) => tracing::error!(worker = %n, error = %e, "destroying leftover"),
                    }
                }
            }
            Err(e) => tracing::error!(provider = p.kind(), error = %e, "listing workers"),
        }
    }
    for dir in [&app.sources_dir, &app.sockets_dir] {
        if let Ok(mut rd) = tokio::fs::read_dir(dir).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if let Some(n) = e.file_name().to_str() {
                    if slate_core::JobId::from_resource_name(n).is_some() {
                        names.insert(n.to_string());
                    }
                }
            }
        }
    }
    for name in names {
        crate::runner::cleanup(app, &name, None).await;
        app.metrics.leaked_workers_cleaned.inc();
        tracing::info!(worker = %name, "destroyed leftover worker");
        report.workers_destroyed.push(name);
    }
    // Cache overlays of jobs that no longer run (workers are gone by now).
    let caches = app.caches.clone();
    let leftovers = tokio::task::spawn_blocking(move || -> Vec<String> {
        let names = caches.list_jobs().unwrap_or_default();
        for n in &names {
            if let Err(e) = caches.cleanup_job(n) {
                tracing::error!(worker = %n, error = %e, "cleaning cache overlays");
            }
        }
        names
    })
    .await
    .unwrap_or_default();
    for n in leftovers {
        tracing::info!(worker = %n, "removed leftover cache overlays");
    }
    if app.replicated {
        // This replica's interrupted jobs come back through lease expiry.
        return Ok(report);
    }
    for job in app
        .store
        .jobs_in_states(&[JobState::Provisioning, JobState::Running])
        .await?
    {
        if app
            .store
            .requeue_job(job.id, "interrupted by a server restart")
            .await?
        {
            tracing::info!(job.id = job.id.0, "requeued interrupted job");
            report.jobs_requeued.push(job.id.0);
        }
    }
    Ok(report)
}
