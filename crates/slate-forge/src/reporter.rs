//! Background delivery of commit statuses: in order per status, retried with backoff,
//! never blocking the code that reports.

use crate::status::{StatusSink, StatusUpdate};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// Retry policy of a [`Reporter`].
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Wait before the first retry; doubles after each failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts per update, the first one included.
    pub max_attempts: u32,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_attempts: 8,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReporterStats {
    /// Updates the sink accepted.
    pub delivered: u64,
    /// Attempts that failed with a retryable error and were tried again.
    pub retried: u64,
    /// Updates dropped for good: permanent error or attempts exhausted.
    pub failed: u64,
    /// Updates skipped because a newer one for the same status arrived during a retry wait.
    pub superseded: u64,
    /// Updates reported but not finished yet.
    pub pending: u64,
}

type Key = (String, String, String);

#[derive(Default)]
struct KeyQueue {
    queue: VecDeque<StatusUpdate>,
    /// Wakes the key's worker out of a retry wait when a newer update arrives.
    wake: Arc<Notify>,
}

struct Shared {
    sink: Arc<dyn StatusSink>,
    config: ReporterConfig,
    /// Keys with a live worker, and what that worker still has to send.
    keys: Mutex<HashMap<Key, KeyQueue>>,
    delivered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    superseded: AtomicU64,
    pending: AtomicU64,
    idle: Notify,
}

impl Shared {
    fn finish(&self, n: u64) {
        if n > 0 && self.pending.fetch_sub(n, Ordering::SeqCst) == n {
            self.idle.notify_waiters();
        }
    }
}

/// Posts statuses from a background task. Clones share the same queue.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<StatusUpdate>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Reporter {
    /// Starts the delivery task with the default retry policy. Needs a tokio runtime.
    pub fn spawn(sink: Arc<dyn StatusSink>) -> Reporter {
        Self::spawn_with(sink, ReporterConfig::default())
    }

    pub fn spawn_with(sink: Arc<dyn StatusSink>, config: ReporterConfig) -> Reporter {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            sink,
            config,
            keys: Mutex::new(HashMap::new()),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            idle: Notify::new(),
        });
        tokio::spawn(dispatch(rx, shared.clone()));
        Reporter { tx, shared }
    }

    /// Queues `update`; returns at once and never fails (failures are logged).
    pub fn report(&self, update: StatusUpdate) {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::error::SendError(u)) = self.tx.send(update) {
            tracing::warn!(repo = %u.repo, sha = %u.sha, context = %u.context, "status reporter stopped; update dropped");
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
            self.shared.finish(1);
        }
    }

    /// Waits until every reported update is finished (delivered, dropped or superseded).
    /// Returns false if `timeout` passed first.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            // Register before checking so a notification in between is not lost.
            idle.as_mut().enable();
            if self.shared.pending.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.shared.pending.load(Ordering::SeqCst) == 0;
            }
        }
    }

    pub fn stats(&self) -> ReporterStats {
        let s = &self.shared;
        ReporterStats {
            delivered: s.delivered.load(Ordering::Relaxed),
            retried: s.retried.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            superseded: s.superseded.load(Ordering::Relaxed),
            pending: s.pending.load(Ordering::SeqCst),
        }
    }
}

/// Routes each update to its key's worker, starting one if the key has none.
async fn dispatch(mut rx: mpsc::UnboundedReceiver<StatusUpdate>, shared: Arc<Shared>) {
    while let Some(update) = rx.recv().await {
        let key = update.key();
        let mut keys = shared.keys.lock().unwrap();
        match keys.get_mut(&key) {
            Some(q) => {
                q.queue.push_back(update);
                q.wake.notify_one();
            }
            None => {
                let mut q = KeyQueue::default();
                q.queue.push_back(update);
                keys.insert(key.clone(), q);
                tokio::spawn(work(key, shared.clone()));
            }
        }
    }
}

/// Sends one key's updates in order; exits (removing the key) when its queue is empty.
async fn work(key: Key, shared: Arc<Shared>) {
    let cfg = &shared.config;
    loop {
        let (update, wake) = {
            let mut keys = shared.keys.lock().unwrap();
            let q = keys.get_mut(&key).expect("a worker owns its key");
            match q.queue.pop_front() {
                Some(u) => (u, q.wake.clone()),
                None => {
                    keys.remove(&key);
                    return;
                }
            }
        };

        let mut attempt = 1u32;
        let mut backoff = cfg.initial_backoff;
        loop {
            let err = match shared.sink.post_status(&update).await {
                Ok(()) => {
                    tracing::debug!(repo = %update.repo, sha = %update.sha, context = %update.context, state = update.state.as_str(), attempt, "status delivered");
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => e,
            };
            if !err.is_retryable() {
                tracing::warn!(repo = %update.repo, sha = %update.sha, context = %update.context, error = %err, "status rejected; dropped");
                shared.failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            if attempt >= cfg.max_attempts {
                tracing::warn!(repo = %update.repo, sha = %update.sha, context = %update.context, attempts = attempt, error = %err, "status not delivered after retries; dropped");
                shared.failed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let wait = err
                .retry_after()
                .map_or(backoff, |ra| ra.max(backoff))
                .min(cfg.max_backoff);
            tracing::info!(repo = %update.repo, sha = %update.sha, context = %update.context, attempt, retry_in_ms = wait.as_millis() as u64, error = %err, "status delivery failed; will retry");
            shared.retried.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            backoff = (backoff * 2).min(cfg.max_backoff);

            if wait_or_superseded(&key, &shared, &wake, Instant::now() + wait).await {
                tracing::debug!(repo = %update.repo, sha = %update.sha, context = %update.context, "status superseded during retry wait");
                break;
            }
        }
        shared.finish(1);
    }
}

/// Sleeps until `deadline` unless newer updates for `key` arrive. Then everything
/// queued except the newest is dropped (the current update too) and true is returned.
async fn wait_or_superseded(key: &Key, shared: &Shared, wake: &Notify, deadline: Instant) -> bool {
    loop {
        {
            let mut keys = shared.keys.lock().unwrap();
            let q = keys.get_mut(key).expect("a worker owns its key");
            if !q.queue.is_empty() {
                let stale = q.queue.len() - 1;
                q.queue.drain(..stale);
                // The one being retried plus the queued ones skipped over.
                let n = stale as u64 + 1;
                shared.superseded.fetch_add(n, Ordering::Relaxed);
                // The current update is finished by the caller; the drained ones here.
                shared.finish(stale as u64);
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ForgeError;
    use async_trait::async_trait;
    use slate_core::ReportState;

    /// Fails the first `fail` calls with `error`, records every call.
    struct FlakySink {
        calls: Mutex<Vec<(String, ReportState)>>,
        fail: Mutex<u32>,
        status: u16,
    }

    impl FlakySink {
        fn new(fail: u32, status: u16) -> Arc<FlakySink> {
            Arc::new(FlakySink {
                calls: Mutex::new(Vec::new()),
                fail: Mutex::new(fail),
                status,
            })
        }
        fn calls(&self) -> Vec<(String, ReportState)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl StatusSink for FlakySink {
        async fn post_status(&self, s: &StatusUpdate) -> Result<(), ForgeError> {
            self.calls
                .lock()
                .unwrap()
                .push((s.context.clone(), s.state));
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(ForgeError::Api {
                    status: self.status,
                    message: "nope".into(),
                    retry_after: None,
                });
            }
            Ok(())
        }
    }

    fn update(context: &str, state: ReportState) -> StatusUpdate {
        StatusUpdate {
            repo: "o/r".into(),
            sha: "abc".into(),
            state,
            context: context.into(),
            description: String::new(),
            target_url: None,
        }
    }

    fn fast() -> ReporterConfig {
        ReporterConfig {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_attempts: 4,
        }
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let sink = FlakySink::new(100, 503);
        let r = Reporter::spawn_with(sink.clone(), fast());
        r.report(update("ci", ReportState::Pending));
        assert!(r.flush(Duration::from_secs(5)).await);
        assert_eq!(sink.calls().len(), 4);
        let s = r.stats();
        assert_eq!((s.delivered, s.retried, s.failed, s.pending), (0, 3, 1, 0));
    }

    #[tokio::test]
    async fn newer_update_supersedes_one_waiting_for_retry() {
        let sink = FlakySink::new(1, 502);
        let r = Reporter::spawn_with(
            sink.clone(),
            ReporterConfig {
                initial_backoff: Duration::from_secs(60),
                max_backoff: Duration::from_secs(60),
                ..fast()
            },
        );
        r.report(update("ci", ReportState::Pending));
        // Let the first attempt fail and enter its (long) retry wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.report(update("ci", ReportState::Success));
        assert!(
            r.flush(Duration::from_secs(5)).await,
            "not stuck in the 60 s wait"
        );
        assert_eq!(
            sink.calls(),
            vec![
                ("ci".to_string(), ReportState::Pending),
                ("ci".to_string(), ReportState::Success)
            ]
        );
        let s = r.stats();
        assert_eq!((s.delivered, s.superseded, s.failed), (1, 1, 0));
    }

    #[tokio::test]
    async fn flush_times_out_while_work_remains() {
        let sink = FlakySink::new(100, 503);
        let r = Reporter::spawn_with(
            sink,
            ReporterConfig {
                initial_backoff: Duration::from_secs(60),
                max_backoff: Duration::from_secs(60),
                ..fast()
            },
        );
        r.report(update("ci", ReportState::Pending));
        assert!(!r.flush(Duration::from_millis(100)).await);
        assert_eq!(r.stats().pending, 1);
    }
}
