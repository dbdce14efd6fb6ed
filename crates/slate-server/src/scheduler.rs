//! The scheduler: per pool, claim queued jobs FIFO up to `max_jobs` and start their runners.

use crate::app::App;
use crate::runner;
use std::sync::Arc;
use std::time::Duration;

/// Keep this replica's leases alive, and take over the jobs of replicas whose leases ran
/// out: they are requeued for a fresh worker (their machines are the dead replica's to
/// clean when it comes back).
pub async fn lease_loop(app: Arc<App>) {
    let lease = app.config.server.lease;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(lease / 4) => {}
            _ = app.shutdown.cancelled() => return,
        }
        if let Err(e) = app.store.renew_leases(&app.replica_id, lease).await {
            tracing::error!(error = %e, "renewing job leases");
        }
        match app.store.expired_leases(&app.replica_id, lease).await {
            Ok(jobs) => {
                for job in jobs {
                    tracing::warn!(job.id = job.id.0, "taking over a job whose replica stopped");
                    match app
                        .store
                        .requeue_job(job.id, "its server replica stopped")
                        .await
                    {
                        Ok(_) => app.wake_scheduler.notify_one(),
                        Err(e) => tracing::error!(job.id = job.id.0, error = %e, "requeueing"),
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reading expired leases"),
        }
    }
}

pub async fn scheduler_loop(app: Arc<App>) {
    loop {
        let notified = app.wake_scheduler.notified();
        {
            // Jobs whose build is still being planned are not claimable yet.
            let _planning = app.planning.lock().await;
            let pools = if app.draining.is_cancelled() {
                &[][..]
            } else {
                &app.config.pools[..]
            };
            for pool in pools {
                loop {
                    let claimed = app
                        .store
                        .claim_next_job_for(
                            &pool.name,
                            pool.max_jobs,
                            &app.replica_id,
                            app.config.server.lease,
                        )
                        .await;
                    match claimed {
                        Ok(Some(job)) => {
                            tracing::debug!(job.id = job.id.0, pool = %pool.name, "job claimed");
                            let token = app.shutdown.child_token();
                            app.running.lock().unwrap().insert(job.id, token.clone());
                            tokio::spawn(runner::run_job(app.clone(), job, token));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(pool = %pool.name, error = %e, "claiming a job");
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = notified => {}
            // Another replica's enqueue wakes us through the store (PostgreSQL NOTIFY).
            _ = app.store.wait_for_work(Duration::from_secs(2)) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}
