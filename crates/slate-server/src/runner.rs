//! Runs one job: export its source, provision a worker, talk to its agent, record steps
//! and logs, enforce the time limit, then destroy the worker whatever happened.

use crate::app::App;
use crate::logs::LogWriter;
use chrono::Utc;
use sha2::{Digest, Sha256};
use slate_core::config::{PipelineConfig, PoolConfig};
use slate_core::{Build, Job, JobId, JobState, StepRecord, Trigger};
use slate_proto::asynch::{read_frame, write_frame};
use slate_proto::{
    AgentMsg, JobSpec, ProtoError, ServerMsg, StepOutcome, StepSpec, PROTOCOL_VERSION,
};
use slate_provider::{WorkerSpec, WORKSPACE_DIR};
use slate_store::WorkerRecord;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// How a job ended, as the runner saw it.
#[derive(Debug, Clone)]
struct Outcome {
    state: JobState,
    reason: String,
    /// The worker failed, not the build: worth another attempt on a fresh worker.
    infra: bool,
}

impl Outcome {
    fn new(state: JobState, reason: impl Into<String>) -> Self {
        Self {
            state,
            reason: reason.into(),
            infra: false,
        }
    }
    fn error(reason: impl Into<String>) -> Self {
        Self::new(JobState::Error, reason)
    }
    fn infra(reason: impl Into<String>) -> Self {
        Self {
            infra: true,
            ..Self::error(reason)
        }
    }
}

/// Silence from an agent longer than this means it is gone (it heartbeats every 5 s).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// Entry point of a runner task; always leaves the job in a terminal (or requeued) state
/// and its worker destroyed.
pub async fn run_job(app: Arc<App>, job: Job, cancel: CancellationToken) {
    let id = job.id;
    let name = id.resource_name();
    let started = Instant::now();
    let log_limit = app
        .config
        .pool(&job.pool)
        .map(|p| p.log_limit)
        .unwrap_or(crate::logs::DEFAULT_LOG_CAP);
    let attempts = app.config.pool(&job.pool).map(|p| p.attempts).unwrap_or(1);
    let outcome = match app.logs.writer_with_cap(id, log_limit).await {
        Ok(mut log) => {
            let mut outcome = run(&app, &job, &cancel, &mut log).await;
            if outcome.infra && job.attempt < attempts && !cancel.is_cancelled() {
                let _ = log
                    .note(&format!(
                        "the worker failed ({}): retrying on a fresh worker (attempt {} of {attempts})",
                        outcome.reason,
                        job.attempt + 1
                    ))
                    .await;
                outcome = Outcome::new(
                    JobState::Queued,
                    format!("retrying after: {}", outcome.reason),
                );
            }
            let _ = log
                .note(&format!(
                    "job {}: {} ({}) after {:.1}s",
                    id,
                    outcome.state,
                    outcome.reason,
                    started.elapsed().as_secs_f64()
                ))
                .await;
            cleanup(&app, &name).await;
            if let Err(e) = log.finish().await {
                tracing::error!(job.id = id.0, error = %e, "finishing log");
            }
            outcome
        }
        Err(e) => {
            cleanup(&app, &name).await;
            Outcome::error(format!("could not open the job log: {e}"))
        }
    };
    app.logs.release(id);
    app.running.lock().unwrap().remove(&id);

    let finished_state = if app.shutdown.is_cancelled() && !outcome.state.is_terminal() {
        None
    } else {
        Some(outcome.state)
    };
    let store = &app.store;
    match finished_state {
        None => {
            let _ = store.requeue_job(id, "server shut down").await;
        }
        Some(JobState::Queued) => {
            let _ = store.requeue_job(id, &outcome.reason).await;
        }
        Some(state) => {
            if let Err(e) = store
                .transition_job(
                    id,
                    &[JobState::Provisioning, JobState::Running],
                    state,
                    Some(&outcome.reason),
                )
                .await
            {
                tracing::error!(job.id = id.0, error = %e, "recording the job's end");
            }
        }
    }
    app.metrics
        .job_seconds
        .get_or_create(&crate::metrics::PoolLabel {
            pool: job.pool.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    if let (Ok(job), Ok(build)) = (store.get_job(id).await, store.get_build(job.build_id).await) {
        let desc = job.reason.clone().unwrap_or_default();
        app.report(&build, &job, &desc);
        tracing::info!(
            job.id = id.0,
            state = %job.state,
            reason = %desc,
            duration_ms = started.elapsed().as_millis() as u64,
            "job finished"
        );
    }
    app.wake_scheduler.notify_one();
}

/// Remove everything the job had on this host. Safe to call more than once.
pub async fn cleanup(app: &App, name: &str) {
    for provider in unique_providers(app) {
        if let Err(e) = provider.destroy(name).await {
            tracing::error!(worker = name, error = %e, "destroying worker");
        }
    }
    let _ = app.store.remove_worker(name).await;
    let _ = tokio::fs::remove_dir_all(app.sources_dir.join(name)).await;
    let _ = tokio::fs::remove_dir_all(app.sockets_dir.join(name)).await;
}

fn unique_providers(app: &App) -> Vec<Arc<dyn slate_provider::Provider>> {
    let mut out: Vec<Arc<dyn slate_provider::Provider>> = Vec::new();
    for p in app.providers.values() {
        if !out.iter().any(|q| Arc::ptr_eq(q, p)) {
            out.push(p.clone());
        }
    }
    out
}

fn random_token() -> String {
    let mut buf = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    hex::encode(buf)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s >= 1 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The steps that run for this build's event, with their index in the pipeline.
fn job_spec(
    app: &App,
    build: &Build,
    job: &Job,
    pipeline: &PipelineConfig,
) -> (JobSpec, Vec<usize>) {
    let event = build.change.trigger.event_name();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    env.insert("HOME".into(), "/root".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("CI".into(), "true".into());
    env.insert("SLATE".into(), "true".into());
    env.insert("SLATE_JOB_ID".into(), job.id.to_string());
    env.insert("SLATE_BUILD_ID".into(), build.id.to_string());
    env.insert("SLATE_POOL".into(), job.pool.clone());
    env.insert("SLATE_REPO".into(), build.change.repo.clone());
    env.insert("SLATE_EVENT".into(), event.into());
    env.insert("SLATE_HEAD_SHA".into(), build.change.head_sha.clone());
    env.insert("SLATE_HEAD_REF".into(), build.change.head_ref.clone());
    if let Some(sha) = &build.checkout_sha {
        env.insert("SLATE_CHECKOUT_SHA".into(), sha.clone());
    }
    if let Some(b) = &build.change.base_ref {
        env.insert("SLATE_BASE_REF".into(), b.clone());
    }
    if let Trigger::PullRequest { number, .. } = &build.change.trigger {
        env.insert("SLATE_PR".into(), number.to_string());
    }
    env.extend(pipeline.env.clone());
    let mut steps = Vec::new();
    let mut map = Vec::new();
    for (i, s) in pipeline.steps.iter().enumerate() {
        if !s.runs_for(event) {
            continue;
        }
        map.push(i);
        steps.push(StepSpec {
            name: s.name.clone(),
            run: s.run.clone(),
            timeout_ms: s.timeout.map(|d| d.as_millis() as u64),
            allow_failure: s.allow_failure,
            env: s.env.clone(),
        });
    }
    let _ = app;
    (
        JobSpec {
            job_id: job.id.0,
            workdir: WORKSPACE_DIR.into(),
            env,
            steps,
        },
        map,
    )
}

async fn console_tail(path: &std::path::Path) -> String {
    let text = tokio::fs::read(path).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    tail.join("\n")
}

async fn run(
    app: &Arc<App>,
    job: &Job,
    cancel: &CancellationToken,
    log: &mut LogWriter,
) -> Outcome {
    let id = job.id;
    let name = id.resource_name();
    let build = match app.store.get_build(job.build_id).await {
        Ok(b) => b,
        Err(e) => return Outcome::error(format!("reading build: {e}")),
    };
    let Some(pool) = app.config.pool(&job.pool).cloned() else {
        return Outcome::error(format!("pool {} is no longer configured", job.pool));
    };
    let Some(pipeline) = app.config.pipeline(&build.pipeline).cloned() else {
        return Outcome::error(format!(
            "pipeline {} is no longer configured",
            build.pipeline
        ));
    };
    let Some(provider) = app.providers.get(&job.pool).cloned() else {
        return Outcome::error(format!("no provider for pool {}", job.pool));
    };
    let Some(checkout) = build.checkout_sha.clone() else {
        return Outcome::error(
            job.reason
                .clone()
                .unwrap_or_else(|| "source was not prepared".into()),
        );
    };
    let _ = log
        .note(&format!(
            "job {} of build {} on pool {} (attempt {}), {} {}",
            id,
            build.id,
            job.pool,
            job.attempt,
            build.change.repo,
            &checkout[..checkout.len().min(12)]
        ))
        .await;

    // Record the worker before anything of it exists, so a crash cannot hide it.
    if let Err(e) = app
        .store
        .record_worker(&WorkerRecord {
            name: name.clone(),
            job_id: id,
            provider: provider.kind().to_string(),
            pool: job.pool.clone(),
            created_at: Utc::now(),
        })
        .await
    {
        return Outcome::error(format!("recording worker: {e}"));
    }

    let src = app.sources_dir.join(&name);
    let _ = tokio::fs::remove_dir_all(&src).await;
    if let Err(e) = app.git.export(&build.change.repo, &checkout, &src).await {
        return Outcome::error(format!("checking out {checkout}: {e}"));
    }

    let sock_dir = app.sockets_dir.join(&name);
    let _ = tokio::fs::remove_dir_all(&sock_dir).await;
    if let Err(e) = tokio::fs::create_dir_all(&sock_dir).await {
        return Outcome::error(format!("creating agent socket dir: {e}"));
    }
    let sock_path = sock_dir.join("agent.sock");
    let listener = match UnixListener::bind(&sock_path) {
        Ok(l) => l,
        Err(e) => return Outcome::error(format!("binding agent socket: {e}")),
    };

    let token = random_token();
    if let Err(e) = app.store.set_job_token_hash(id, &token_hash(&token)).await {
        return Outcome::error(format!("storing agent token: {e}"));
    }

    let spec = WorkerSpec {
        job_id: id,
        pool: job.pool.clone(),
        image: pool.image.clone(),
        source: Some(src.clone()),
        agent_binary: app.agent_binary.clone(),
        agent_socket: sock_path.clone(),
        agent_token: slate_core::Secret::new(token),
        limits: pool.limits.clone(),
        network: pool.network,
        runtime: pool.runtime.clone(),
    };
    let t0 = Instant::now();
    let worker = tokio::select! {
        r = provider.provision(spec) => match r {
            Ok(w) => w,
            Err(e) => {
                let _ = log.note(&format!("provisioning failed: {e}")).await;
                return Outcome::infra(format!("provisioning failed: {e}"));
            }
        },
        _ = cancel.cancelled() => return cancelled_outcome(app),
    };
    let provision_time = t0.elapsed();
    app.metrics
        .provision_seconds
        .get_or_create(&crate::metrics::PoolLabel {
            pool: job.pool.clone(),
        })
        .observe(provision_time.as_secs_f64());
    let _ = log
        .note(&format!(
            "worker {name} provisioned in {} ms",
            provision_time.as_millis()
        ))
        .await;
    let deadline = tokio::time::Instant::now() + pool.limits.timeout;

    let boot_timeout = app.boot_timeout.unwrap_or(pool.boot_timeout);
    let mut exited = worker.exited.clone();
    let stream = tokio::select! {
        r = listener.accept() => match r {
            Ok((s, _)) => s,
            Err(e) => return Outcome::infra(format!("accepting the agent: {e}")),
        },
        code = async { exited.wait_for(|v| v.is_some()).await.ok().and_then(|v| *v) } => {
            let tail = console_tail(&worker.console_log).await;
            let _ = log.note(&format!("worker exited (code {code:?}) before its agent connected; console:\n{tail}")).await;
            return Outcome::infra(format!("worker exited before its agent connected (code {code:?})"));
        }
        _ = tokio::time::sleep(boot_timeout) => {
            let tail = console_tail(&worker.console_log).await;
            let _ = log.note(&format!("agent did not connect within {}; console:\n{tail}", human(boot_timeout))).await;
            return Outcome::infra(format!("agent did not connect within {}", human(boot_timeout)));
        }
        _ = cancel.cancelled() => return cancelled_outcome(app),
    };
    drop(listener);
    let (mut rd, mut wr) = stream.into_split();

    let hello: Result<AgentMsg, ProtoError> =
        match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd)).await {
            Ok(r) => r,
            Err(_) => return Outcome::infra("agent connected but sent no hello within 10s"),
        };
    match hello {
        Ok(AgentMsg::Hello {
            protocol, token, ..
        }) => {
            if protocol != PROTOCOL_VERSION {
                let reason =
                    format!("agent speaks protocol {protocol}, server speaks {PROTOCOL_VERSION}");
                let _ = write_frame(
                    &mut wr,
                    &ServerMsg::Reject {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Outcome::error(reason);
            }
            match app.store.consume_job_token(id, &token_hash(&token)).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = write_frame(
                        &mut wr,
                        &ServerMsg::Reject {
                            reason: "invalid token".into(),
                        },
                    )
                    .await;
                    return Outcome::error("agent presented an invalid token");
                }
                Err(e) => return Outcome::error(format!("checking agent token: {e}")),
            }
        }
        Ok(other) => return Outcome::error(format!("agent sent {other:?} before hello")),
        Err(e) => return Outcome::infra(format!("reading agent hello: {e}")),
    }

    match app
        .store
        .transition_job(
            id,
            &[JobState::Provisioning],
            JobState::Running,
            Some("running"),
        )
        .await
    {
        Ok(true) => {}
        Ok(false) => return cancelled_outcome(app),
        Err(e) => return Outcome::error(format!("recording running state: {e}")),
    }
    if let Ok(j) = app.store.get_job(id).await {
        app.report(&build, &j, &format!("running on {}", job.pool));
    }

    let (spec, step_map) = job_spec(app, &build, job, &pipeline);
    // Steps that do not run for this event are recorded as skipped, so users see why.
    for (i, s) in pipeline.steps.iter().enumerate() {
        if !step_map.contains(&i) {
            let _ = log
                .note(&format!(
                    "step {}: skipped (does not run for {})",
                    s.name,
                    build.change.trigger.event_name()
                ))
                .await;
            let _ = app
                .store
                .upsert_step(&StepRecord {
                    job_id: id,
                    index: i as u32,
                    name: s.name.clone(),
                    started_at: None,
                    finished_at: None,
                    exit_code: None,
                    outcome: Some("skipped".into()),
                })
                .await;
        }
    }
    if let Err(e) = write_frame(&mut wr, &ServerMsg::Welcome { job: spec }).await {
        return Outcome::infra(format!("sending the job to the agent: {e}"));
    }

    converse(
        app, job, &pipeline, &pool, &step_map, cancel, log, &mut rd, &mut wr, deadline,
    )
    .await
}

fn cancelled_outcome(app: &App) -> Outcome {
    if app.shutdown.is_cancelled() {
        Outcome::new(JobState::Queued, "server shut down")
    } else {
        Outcome::new(JobState::Cancelled, "cancelled")
    }
}

#[allow(clippy::too_many_arguments)]
async fn converse(
    app: &Arc<App>,
    job: &Job,
    pipeline: &PipelineConfig,
    pool: &PoolConfig,
    step_map: &[usize],
    cancel: &CancellationToken,
    log: &mut LogWriter,
    rd: &mut tokio::net::unix::OwnedReadHalf,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    deadline: tokio::time::Instant,
) -> Outcome {
    let id = job.id;
    let mut last_seq: u64 = 0;
    let mut failure: Option<Outcome> = None;
    let mut cancel_sent: Option<tokio::time::Instant> = None;
    let mut step_started: BTreeMap<u32, chrono::DateTime<Utc>> = BTreeMap::new();
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let cancel_grace = cancel_sent.map(|t| t + Duration::from_secs(5));
        tokio::select! {
            msg = read_frame::<_, AgentMsg>(rd) => {
              last_heard = tokio::time::Instant::now();
              match msg {
                Ok(AgentMsg::Output { seq, data, .. }) => {
                    if seq == last_seq + 1 {
                        if let Err(e) = log.append(&data).await {
                            return Outcome::error(format!("writing the log: {e}"));
                        }
                        last_seq = seq;
                        if write_frame(wr, &ServerMsg::Ack { seq }).await.is_err() && cancel_sent.is_none() {
                            return Outcome::infra("lost the agent while acknowledging output");
                        }
                    } else if seq > last_seq + 1 {
                        let _ = log.note(&format!("output gap: expected chunk {}, got {seq}", last_seq + 1)).await;
                        return Outcome::infra(format!("agent output gap at chunk {}", last_seq + 1));
                    }
                    // seq <= last_seq: a resend of what is already stored; ignore.
                }
                Ok(AgentMsg::StepStarted { step }) => {
                    let Some(&pi) = step_map.get(step as usize) else {
                        return Outcome::error(format!("agent started unknown step {step}"));
                    };
                    let s = &pipeline.steps[pi];
                    let _ = log.note(&format!("step {}: {}", s.name, s.run)).await;
                    let now = Utc::now();
                    step_started.insert(step, now);
                    let _ = app.store.upsert_step(&StepRecord {
                        job_id: id,
                        index: pi as u32,
                        name: s.name.clone(),
                        started_at: Some(now),
                        finished_at: None,
                        exit_code: None,
                        outcome: None,
                    }).await;
                }
                Ok(AgentMsg::StepFinished { step, outcome, exit_code, signal, duration_ms }) => {
                    let Some(&pi) = step_map.get(step as usize) else {
                        return Outcome::error(format!("agent finished unknown step {step}"));
                    };
                    let s = &pipeline.steps[pi];
                    let secs = duration_ms as f64 / 1000.0;
                    let (word, ok) = match outcome {
                        StepOutcome::Ok => ("ok".to_string(), true),
                        StepOutcome::Failed => match (exit_code, signal) {
                            (Some(c), _) => (format!("failed with exit code {c}"), false),
                            (None, Some(sig)) => (format!("killed by signal {sig}"), false),
                            _ => ("failed".to_string(), false),
                        },
                        StepOutcome::TimedOut => (format!("timed out after {}", s.timeout.map(human).unwrap_or_default()), false),
                        StepOutcome::SpawnError => ("could not be started".to_string(), false),
                    };
                    let _ = log.note(&format!("step {}: {word} in {secs:.2}s", s.name)).await;
                    let stored_outcome = match (outcome, s.allow_failure) {
                        (StepOutcome::Ok, _) => "ok",
                        (_, true) => "allowed_failure",
                        (StepOutcome::TimedOut, false) => "timed_out",
                        _ => "failed",
                    };
                    let _ = app.store.upsert_step(&StepRecord {
                        job_id: id,
                        index: pi as u32,
                        name: s.name.clone(),
                        started_at: step_started.get(&step).cloned(),
                        finished_at: Some(Utc::now()),
                        exit_code,
                        outcome: Some(stored_outcome.into()),
                    }).await;
                    if !ok && !s.allow_failure && failure.is_none() {
                        let state = if outcome == StepOutcome::TimedOut { JobState::TimedOut } else { JobState::Failed };
                        failure = Some(Outcome::new(state, format!("step {} {word}", s.name)));
                    }
                }
                Ok(AgentMsg::Done { success }) => {
                    if cancel_sent.is_some() {
                        return cancelled_outcome(app);
                    }
                    return match (success, failure) {
                        (_, Some(f)) => f,
                        (true, None) => Outcome::new(JobState::Succeeded, "all steps succeeded"),
                        (false, None) => Outcome::new(JobState::Failed, "the agent reported failure"),
                    };
                }
                Ok(AgentMsg::Heartbeat) => {}
                Ok(AgentMsg::Hello { .. }) => return Outcome::error("agent sent a second hello"),
                Err(e) => {
                    if cancel_sent.is_some() {
                        return cancelled_outcome(app);
                    }
                    let _ = log.note(&format!("lost the agent: {e}")).await;
                    return Outcome::infra(format!("lost the agent: {e}"));
                }
              }
            },
            _ = tokio::time::sleep_until(last_heard + HEARTBEAT_TIMEOUT) => {
                let _ = log.note(&format!("no word from the agent for {}s", HEARTBEAT_TIMEOUT.as_secs())).await;
                return Outcome::infra(format!("agent silent for {}s (heartbeat timeout)", HEARTBEAT_TIMEOUT.as_secs()));
            }
            _ = cancel.cancelled(), if cancel_sent.is_none() => {
                let _ = log.note("cancel requested: stopping the running step").await;
                let _ = write_frame(wr, &ServerMsg::Cancel { reason: "cancelled".into() }).await;
                cancel_sent = Some(tokio::time::Instant::now());
            }
            _ = tokio::time::sleep_until(cancel_grace.unwrap_or(deadline)), if cancel_grace.is_some() => {
                return cancelled_outcome(app);
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = log.note(&format!("job exceeded its time limit of {}", human(pool.limits.timeout))).await;
                return Outcome::new(JobState::TimedOut, format!("job exceeded its time limit of {}", human(pool.limits.timeout)));
            }
        }
    }
}

/// Used by tests and the API: the id of the job a resource name belongs to.
pub fn job_of(name: &str) -> Option<JobId> {
    JobId::from_resource_name(name)
}
