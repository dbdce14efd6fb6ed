//! The scheduler: per pool, claim queued jobs FIFO up to `max_jobs` and start their runners.

use crate::app::App;
use crate::runner;
use std::sync::Arc;
use std::time::Duration;

pub async fn scheduler_loop(app: Arc<App>) {
    loop {
        let notified = app.wake_scheduler.notified();
        {
            // Jobs whose build is still being planned are not claimable yet.
            let _planning = app.planning.lock().await;
            for pool in &app.config.pools {
                loop {
                    match app.store.claim_next_job(&pool.name, pool.max_jobs).await {
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
