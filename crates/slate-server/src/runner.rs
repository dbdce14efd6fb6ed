//! Runs one job: export its source, provision a worker, talk to its agent, record steps
//! and logs, enforce the time limit, then destroy the worker whatever happened.

use crate::agents::AgentLink;
use crate::app::App;
use crate::logs::LogWriter;
use chrono::Utc;
use slate_core::config::{PipelineConfig, PoolConfig};
use slate_core::{Build, Job, JobId, JobState, StepRecord, Trigger};
use slate_proto::asynch::{read_frame, write_frame};
use slate_proto::{AgentMsg, JobSpec, ServerMsg, StepOutcome, StepSpec};
use slate_provider::{WorkerSpec, WORKSPACE_DIR};
use slate_store::WorkerRecord;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// How a job ended, as the runner saw it.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    state: JobState,
    reason: String,
    /// The worker failed, not the build: worth another attempt on a fresh worker.
    infra: bool,
}

impl Outcome {
    pub(crate) fn new(state: JobState, reason: impl Into<String>) -> Self {
        Self {
            state,
            reason: reason.into(),
            infra: false,
        }
    }
    pub(crate) fn error(reason: impl Into<String>) -> Self {
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
        Ok(log) => {
            // Every configured secret is masked in every job's log, whoever got it.
            let mut log = log.with_masks(
                app.secrets
                    .values()
                    .map(|v| v.expose().as_bytes().to_vec())
                    .collect(),
            );
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
            crate::artifacts::collect_for_job(&app, &job, &mut log).await;
            cleanup(&app, &name, Some(&job.pool)).await;
            harvest_caches(&app, &job, Some(&mut log)).await;
            if let Err(e) = log.finish().await {
                tracing::error!(job.id = id.0, error = %e, "finishing log");
            }
            outcome
        }
        Err(e) => {
            cleanup(&app, &name, Some(&job.pool)).await;
            harvest_caches(&app, &job, None).await;
            Outcome::error(format!("could not open the job log: {e}"))
        }
    };
    app.logs.release(id);
    app.running.lock().unwrap().remove(&id);
    app.images_in_use.lock().unwrap().remove(&id);

    let finished_state = if app.shutdown.is_cancelled() && !outcome.state.is_terminal() {
        None
    } else {
        Some(outcome.state)
    };
    let store = &app.store;
    // Owner-checked: if this replica's lease ran out and another replica took the job
    // over, the job (perhaps a new attempt running elsewhere) is no longer ours to move.
    let owner = app.replica_id.as_str();
    let recorded = match finished_state {
        None => store.requeue_owned_job(id, owner, "server shut down").await,
        Some(JobState::Queued) => store.requeue_owned_job(id, owner, &outcome.reason).await,
        Some(state) => {
            store
                .transition_owned_job(
                    id,
                    owner,
                    &[JobState::Provisioning, JobState::Running],
                    state,
                    Some(&outcome.reason),
                )
                .await
        }
    };
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(job.id = id.0, outcome = ?outcome.state, "job's end not recorded: cancelled or taken over");
        }
        Err(e) => tracing::error!(job.id = id.0, error = %e, "recording the job's end"),
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
/// With `pool`, only that pool's provider is asked (an exec pool's destroy hook is not
/// free to run for every job); without it (recovery), every provider is.
pub async fn cleanup(app: &App, name: &str, pool: Option<&str>) {
    let providers = match pool.and_then(|p| app.providers.get(p)) {
        Some(p) => vec![p.clone()],
        None => unique_providers(app),
    };
    for provider in providers {
        if let Err(e) = provider.destroy(name).await {
            tracing::error!(worker = name, error = %e, "destroying worker");
        }
    }
    let _ = app.store.remove_worker(name).await;
    let _ = tokio::fs::remove_dir_all(app.sources_dir.join(name)).await;
    let _ = tokio::fs::remove_dir_all(app.sockets_dir.join(name)).await;
}

pub(crate) fn unique_providers(app: &App) -> Vec<Arc<dyn slate_provider::Provider>> {
    let mut out: Vec<Arc<dyn slate_provider::Provider>> = Vec::new();
    for p in app.providers.values() {
        if !out.iter().any(|q| Arc::ptr_eq(q, p)) {
            out.push(p.clone());
        }
    }
    out
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

/// Whether `job` is one of its build's planning jobs (the pipeline has a plan step).
fn is_planning(job: &Job, pipeline: &PipelineConfig) -> bool {
    pipeline.plan.is_some() && job.target.as_deref() == Some(slate_core::PLAN_TARGET)
}

/// The pipeline as this job runs it: for a planning job, the plan step is its only step.
fn job_pipeline(mut pipeline: PipelineConfig, job: &Job) -> PipelineConfig {
    if is_planning(job, &pipeline) {
        if let Some(plan) = &pipeline.plan {
            pipeline.steps = vec![plan.as_step()];
        }
    }
    pipeline
}

/// Whether the build's steps run without their secrets: any pull request (fork or not)
/// runs code nobody trusted yet; pushes and `slate submit` builds get them.
fn withholds_secrets(build: &Build) -> bool {
    matches!(build.change.trigger, Trigger::PullRequest { .. })
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
    if let Some(t) = &job.target {
        env.insert("SLATE_TARGET".into(), t.clone());
    }
    if is_planning(job, pipeline) {
        let targets = job.vars.get("targets").cloned().unwrap_or_default();
        env.insert("SLATE_PORTS".into(), targets.clone());
        env.insert("SLATE_TARGETS".into(), targets);
    }
    for (k, v) in &job.vars {
        env.insert(format!("SLATE_VAR_{}", k.to_ascii_uppercase()), v.clone());
    }
    env.extend(pipeline.env.clone());
    let mut steps = Vec::new();
    let mut map = Vec::new();
    for (i, s) in pipeline.steps.iter().enumerate() {
        if !s.runs_for(event) {
            continue;
        }
        map.push(i);
        let mut step_env = s.env.clone();
        // A step gets the secrets it names, but a pull request's code never does.
        if !withholds_secrets(build) {
            for name in &s.secrets {
                if let Some(v) = app.secrets.get(name) {
                    step_env.insert(name.clone(), v.expose().to_string());
                }
            }
        }
        steps.push(StepSpec {
            name: s.name.clone(),
            run: slate_core::planner::substitute(&s.run, &job.vars),
            timeout_ms: s.timeout.map(|d| d.as_millis() as u64),
            allow_failure: s.allow_failure,
            env: step_env,
        });
    }
    (
        JobSpec {
            job_id: job.id.0,
            workdir: app
                .config
                .pool(&job.pool)
                .and_then(|p| p.workdir.clone())
                .unwrap_or_else(|| WORKSPACE_DIR.into()),
            env,
            steps,
            collect: Vec::new(),
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

    if let Some(repo) = app.config.repo(&build.change.repo) {
        if let Err(e) = app.git.ensure_checkout(repo, &build).await {
            return Outcome::error(format!("fetching {checkout}: {e}"));
        }
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

    let token = crate::agents::new_token(id);
    if let Err(e) = app
        .store
        .set_job_token_hash(id, &hex::encode(crate::agents::token_hash(&token)))
        .await
    {
        return Outcome::error(format!("storing agent token: {e}"));
    }
    // From here until the runner ends, connections presenting the token reach this job.
    let plaintext_ok = pool.exec.as_ref().is_some_and(|e| e.insecure_plaintext);
    let mut links = app.agents.register_with(id, &token, plaintext_ok);
    let _link_guard = LinkGuard {
        app: app.clone(),
        job: id,
        acceptor: tokio::spawn(accept_unix(
            app.clone(),
            listener,
            app.boot_timeout.unwrap_or(pool.boot_timeout),
        )),
    };

    // Shared caches: read-only mirrors and per-job overlays, mounted before the worker.
    let specs = cache_specs(&pool);
    let mut mounts = Vec::new();
    let mut cache_mounts: Vec<(String, std::path::PathBuf, String, bool)> = Vec::new();
    if !specs.is_empty() {
        let caches = app.caches.clone();
        let ctx = cache_context(app, job, &build);
        match tokio::task::spawn_blocking(move || caches.prepare(&ctx, &specs)).await {
            Ok(Ok(prepared)) => {
                for m in prepared {
                    cache_mounts.push((
                        m.cache.clone(),
                        m.host_path.clone(),
                        m.target.clone(),
                        m.read_only,
                    ));
                    mounts.push(slate_provider::WorkerMount {
                        host_path: m.host_path,
                        target: m.target,
                        read_only: m.read_only,
                    });
                }
            }
            Ok(Err(e)) => return Outcome::error(format!("preparing caches: {e}")),
            Err(e) => return Outcome::error(format!("preparing caches: {e}")),
        }
    }
    // A named image resolves to its newest version now, and the job keeps that version.
    let image = match resolve_image(app, &pool) {
        Ok(i) => i,
        Err(e) => return Outcome::error(e),
    };
    if image != pool.image {
        let _ = log.note(&format!("image {}", image.display())).await;
        app.images_in_use.lock().unwrap().insert(id, image.clone());
    }
    let spec = WorkerSpec {
        job_id: id,
        pool: job.pool.clone(),
        image,
        source: Some(src.clone()),
        agent_binary: app.agent_binary.clone(),
        agent_socket: sock_path.clone(),
        agent_token: slate_core::Secret::new(token.clone()),
        limits: pool.limits.clone(),
        network: pool.network,
        network_allow: pool.network_allow.clone(),
        runtime: pool.runtime.clone(),
        mounts,
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
    let link = tokio::select! {
        l = links.recv() => match l {
            Some(l) => l,
            None => {
                let why = app.agents.revoked(id).unwrap_or_else(|| "agent registry closed".into());
                let _ = log.note(&why).await;
                return Outcome::infra(why);
            }
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
    // The stored hash is consumed by the first connection: the record that the job's one
    // agent has spoken. Reconnects of that agent are checked by the registry.
    match app
        .store
        .consume_job_token(id, &hex::encode(crate::agents::token_hash(&token)))
        .await
    {
        Ok(true) => {}
        Ok(false) => return Outcome::error("the job's agent token was already used"),
        Err(e) => return Outcome::error(format!("checking agent token: {e}")),
    }
    let _ = log
        .note(&format!("agent connected over {}", link.transport))
        .await;

    match app
        .store
        .transition_owned_job(
            id,
            &app.replica_id,
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

    // A planning job runs the plan step alone, and keeps its stdout.
    let planning = is_planning(job, &pipeline);
    let pipeline = job_pipeline(pipeline, job);
    let plan_output = std::sync::Mutex::new(Vec::new());
    let (mut spec, step_map) = job_spec(app, &build, job, &pipeline);
    // What the agent sends back because this host cannot read the worker's disk.
    let (collects, sinks) = remote_collects(
        app,
        job,
        &build,
        &pipeline,
        &pool,
        provider.kind(),
        &spec.workdir,
        &cache_mounts,
    );
    spec.collect = collects;
    let files = std::sync::Mutex::new(crate::remote_files::Receiver::new(&spec.collect, sinks));
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
    if withholds_secrets(&build) {
        for &i in &step_map {
            let s = &pipeline.steps[i];
            if !s.secrets.is_empty() {
                let _ = log
                    .note(&format!(
                        "step {}: secrets withheld from pull request builds ({})",
                        s.name,
                        s.secrets.join(", ")
                    ))
                    .await;
            }
        }
    }
    let mut link = link;
    if let Err(e) = write_frame(&mut link.wr, &ServerMsg::Welcome { job: spec.clone() }).await {
        return Outcome::infra(format!("sending the job to the agent: {e}"));
    }

    let ctx = Conversation {
        app,
        job,
        pipeline: &pipeline,
        pool: &pool,
        step_map: &step_map,
        spec: &spec,
        cancel,
        deadline,
        plan_output: planning.then_some(&plan_output),
        files: &files,
    };
    let outcome = converse(&ctx, log, link, &mut links, exited).await;
    let received = std::mem::replace(
        &mut *files.lock().unwrap(),
        crate::remote_files::Receiver::new(&[], Vec::new()),
    );
    note_remote_files(log, &received).await;
    if planning && outcome.state == JobState::Succeeded {
        let out = plan_output.into_inner().unwrap_or_default();
        return crate::dynamic::add_planned_jobs(app, &build, job, &out, log).await;
    }
    outcome
}

fn cancelled_outcome(app: &App) -> Outcome {
    if app.shutdown.is_cancelled() {
        Outcome::new(JobState::Queued, "server shut down")
    } else {
        Outcome::new(JobState::Cancelled, "cancelled")
    }
}

/// What a conversation with the agent needs besides the connection.
struct Conversation<'a> {
    app: &'a Arc<App>,
    job: &'a Job,
    pipeline: &'a PipelineConfig,
    pool: &'a PoolConfig,
    step_map: &'a [usize],
    /// A planning job's plan step stdout goes here (capped).
    plan_output: Option<&'a std::sync::Mutex<Vec<u8>>>,
    spec: &'a JobSpec,
    /// Where the files the agent sends back go.
    files: &'a std::sync::Mutex<crate::remote_files::Receiver>,
    cancel: &'a CancellationToken,
    deadline: tokio::time::Instant,
}

/// How long a lost agent has to reconnect (TCP transports) before the job is given up.
const RECONNECT_GRACE: Duration = Duration::from_secs(20);

async fn converse(
    ctx: &Conversation<'_>,
    log: &mut LogWriter,
    mut link: AgentLink,
    links: &mut tokio::sync::mpsc::Receiver<AgentLink>,
    mut exited: tokio::sync::watch::Receiver<Option<i32>>,
) -> Outcome {
    let Conversation {
        app,
        job,
        pipeline,
        pool,
        step_map,
        cancel,
        deadline,
        ..
    } = *ctx;
    let id = job.id;
    let mut last_seq: u64 = 0;
    let mut failure: Option<Outcome> = None;
    let mut cancel_sent: Option<tokio::time::Instant> = None;
    let mut step_started: BTreeMap<u32, chrono::DateTime<Utc>> = BTreeMap::new();
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let cancel_grace = cancel_sent.map(|t| t + Duration::from_secs(5));
        tokio::select! {
            newer = links.recv() => {
                // The agent reconnected before the server noticed the old link was gone.
                if let Some(l) = newer {
                    match resume(ctx, log, l).await {
                        Ok(l) => link = l,
                        Err(o) => return o,
                    }
                }
            }
            msg = read_frame::<_, AgentMsg>(&mut link.rd) => {
              last_heard = tokio::time::Instant::now();
              match msg {
                Ok(AgentMsg::Output { seq, data, stream, .. }) => {
                    if seq == last_seq + 1 {
                        if let (Some(buf), slate_proto::Stream::Stdout) = (ctx.plan_output, stream) {
                            let mut buf = buf.lock().unwrap();
                            if buf.len() + data.len() > crate::dynamic::MAX_PLAN_OUTPUT {
                                return Outcome::new(JobState::Failed, format!("plan output exceeds {} bytes", crate::dynamic::MAX_PLAN_OUTPUT));
                            }
                            buf.extend_from_slice(&data);
                        }
                        if let Err(e) = log.append(&data).await {
                            return Outcome::error(format!("writing the log: {e}"));
                        }
                        last_seq = seq;
                        // A failed ack shows up as a read error next, which handles reconnects.
                        let _ = write_frame(&mut link.wr, &ServerMsg::Ack { seq }).await;
                    } else if seq > last_seq + 1 {
                        let _ = log.note(&format!("output gap: expected chunk {}, got {seq}", last_seq + 1)).await;
                        return Outcome::infra(format!("agent output gap at chunk {}", last_seq + 1));
                    }
                    // seq <= last_seq: a resend of what is already stored; ignore.
                }
                Ok(AgentMsg::File { seq, collect, path, offset, data, last }) => {
                    if seq == last_seq + 1 {
                        ctx.files.lock().unwrap().chunk(collect, &path, offset, &data, last);
                        last_seq = seq;
                        let _ = write_frame(&mut link.wr, &ServerMsg::Ack { seq }).await;
                    } else if seq > last_seq + 1 {
                        let _ = log.note(&format!("output gap: expected chunk {}, got {seq}", last_seq + 1)).await;
                        return Outcome::infra(format!("agent output gap at chunk {}", last_seq + 1));
                    }
                }
                Ok(AgentMsg::StepStarted { step }) => {
                    let Some(&pi) = step_map.get(step as usize) else {
                        return Outcome::error(format!("agent started unknown step {step}"));
                    };
                    let s = &pipeline.steps[pi];
                    let run = ctx.spec.steps.get(step as usize).map_or(s.run.as_str(), |x| x.run.as_str());
                    let _ = log.note(&format!("step {}: {}", s.name, run)).await;
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
                    let _ = log.note(&format!("lost the agent: {e}; waiting up to {}s for it to reconnect", RECONNECT_GRACE.as_secs())).await;
                    let again = tokio::select! {
                        l = links.recv() => l,
                        _ = exited.wait_for(|v| v.is_some()) => None,
                        _ = tokio::time::sleep(RECONNECT_GRACE) => None,
                        _ = cancel.cancelled() => return cancelled_outcome(app),
                    };
                    match again {
                        Some(l) => match resume(ctx, log, l).await {
                            Ok(l) => {
                                link = l;
                                last_heard = tokio::time::Instant::now();
                            }
                            Err(o) => return o,
                        },
                        None => return Outcome::infra(format!("lost the agent: {e}")),
                    }
                }
              }
            },
            _ = tokio::time::sleep_until(last_heard + HEARTBEAT_TIMEOUT) => {
                let _ = log.note(&format!("no word from the agent for {}s", HEARTBEAT_TIMEOUT.as_secs())).await;
                return Outcome::infra(format!("agent silent for {}s (heartbeat timeout)", HEARTBEAT_TIMEOUT.as_secs()));
            }
            _ = cancel.cancelled(), if cancel_sent.is_none() => {
                let _ = log.note("cancel requested: stopping the running step").await;
                let _ = write_frame(&mut link.wr, &ServerMsg::Cancel { reason: "cancelled".into() }).await;
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

/// Take over a reconnected agent's link: the job again (the agent ignores it), then it
/// resends everything after its last acknowledged chunk; duplicates are dropped by seq.
async fn resume(
    ctx: &Conversation<'_>,
    log: &mut LogWriter,
    mut l: AgentLink,
) -> Result<AgentLink, Outcome> {
    let _ = log
        .note(&format!(
            "agent reconnected over {} (resuming after chunk {})",
            l.transport, l.resume_after
        ))
        .await;
    write_frame(
        &mut l.wr,
        &ServerMsg::Welcome {
            job: ctx.spec.clone(),
        },
    )
    .await
    .map_err(|e| Outcome::infra(format!("agent reconnected but the link failed: {e}")))?;
    Ok(l)
}

/// Deregisters the job's token and stops accepting on its socket when the runner ends.
struct LinkGuard {
    app: Arc<App>,
    job: JobId,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.app.agents.deregister(self.job);
        self.acceptor.abort();
    }
}

/// Accept connections on a job's Unix socket and route them by their hello.
async fn accept_unix(app: Arc<App>, listener: UnixListener, hello_within: Duration) {
    while let Ok((stream, _)) = listener.accept().await {
        let app = app.clone();
        tokio::spawn(async move {
            let (rd, wr) = stream.into_split();
            if let Err(e) = app.agents.accept(rd, wr, "unix socket", hello_within).await {
                tracing::warn!(error = %e, "agent refused");
            }
        });
    }
}

/// Accept agents dialing in over TCP (machines slate does not run itself): TLS, or
/// plaintext for pools that allow it; anything else is dropped with a log line and
/// nothing recorded.
pub async fn accept_tcp(app: Arc<App>, listener: tokio::net::TcpListener) {
    /// How long a client has to start and finish its TLS handshake, then its hello.
    const HELLO_WITHIN: Duration = Duration::from_secs(10);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let app = app.clone();
                    tokio::spawn(async move {
                        let Some(tls) = app.agent_tls.clone() else { return };
                        let (rd, wr, channel, transport) = match tls.accept(stream, HELLO_WITHIN).await {
                            Ok(crate::tls::Accepted::Tls(s)) => {
                                let (r, w) = crate::tls::split(*s);
                                (r, w, crate::agents::Channel::Private, "tls")
                            }
                            Ok(crate::tls::Accepted::Plaintext(s)) => {
                                let (r, w) = crate::tls::split(s);
                                (r, w, crate::agents::Channel::Plaintext, "plaintext tcp")
                            }
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "agent connection dropped");
                                return;
                            }
                        };
                        match app.agents.accept_on(rd, wr, transport, channel, HELLO_WITHIN).await {
                            Ok(job) => tracing::info!(job.id = job.0, %peer, transport, "agent connected"),
                            Err(e) => tracing::warn!(%peer, transport, error = %e, "agent refused"),
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "accepting an agent");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// The files a job's agent sends back: its artifacts when the worker's disk is not on
/// this host (every provider but the sandbox), and for exec pools the new files of each
/// overlay cache whose files this build may promote (into its PR's layer, or the mirror
/// for trusted builds), received into the job's host-side overlay of that cache.
#[allow(clippy::too_many_arguments)]
fn remote_collects(
    app: &App,
    job: &Job,
    build: &Build,
    pipeline: &PipelineConfig,
    pool: &PoolConfig,
    provider_kind: &str,
    workdir: &str,
    cache_mounts: &[(String, std::path::PathBuf, String, bool)],
) -> (
    Vec<slate_proto::CollectSpec>,
    Vec<crate::remote_files::Sink>,
) {
    use crate::remote_files::Sink;
    let (mut collects, mut sinks) = (Vec::new(), Vec::new());
    if provider_kind == "sandbox" || is_planning(job, pipeline) {
        return (collects, sinks);
    }
    let event = build.change.trigger.event_name();
    let globs: Vec<String> = pipeline
        .steps
        .iter()
        .filter(|s| s.runs_for(event))
        .flat_map(|s| s.artifacts.iter().cloned())
        .collect();
    if !globs.is_empty() {
        collects.push(slate_proto::CollectSpec {
            root: workdir.to_string(),
            globs,
            max_bytes: pool.artifacts_limit,
        });
        sinks.push(Sink::Artifacts(crate::artifacts::job_dir(
            &app.data_dir,
            job.id,
        )));
    }
    if provider_kind == "exec" {
        let ctx = cache_context(app, job, build);
        for c in &pool.caches {
            use slate_core::config::{CacheMode, Promote};
            let promotes = c.promote == Promote::Trusted && (ctx.pr.is_some() || ctx.trusted);
            if c.mode != CacheMode::Overlay || !promotes {
                continue;
            }
            let Some((_, merged, _, _)) = cache_mounts.iter().find(|m| m.0 == c.name) else {
                continue;
            };
            collects.push(slate_proto::CollectSpec {
                root: c.target.clone(),
                globs: Vec::new(),
                max_bytes: crate::remote_files::MAX_CACHE_BYTES,
            });
            sinks.push(Sink::Cache {
                name: c.name.clone(),
                merged: merged.clone(),
            });
        }
    }
    (collects, sinks)
}

/// Says in the job's log what came back from the worker.
async fn note_remote_files(log: &mut LogWriter, files: &crate::remote_files::Receiver) {
    use crate::remote_files::Sink;
    for (sink, t) in files.sinks() {
        let what = match sink {
            Sink::Artifacts(_) => "artifacts".to_string(),
            Sink::Cache { name, .. } => format!("cache {name}"),
        };
        let mut note = format!(
            "{what}: {} files ({} bytes) received from the worker",
            t.files, t.bytes
        );
        if !t.refused.is_empty() {
            note.push_str(&format!(
                ", {} refused: {}",
                t.refused.len(),
                t.refused.join("; ")
            ));
        }
        let _ = log.note(&note).await;
    }
}

/// The pool's caches as the cache manager wants them.
fn cache_specs(pool: &PoolConfig) -> Vec<slate_cache::CacheSpec> {
    use slate_core::config::{CacheMode, Promote};
    pool.caches
        .iter()
        .map(|c| slate_cache::CacheSpec {
            name: c.name.clone(),
            source: c.source.clone(),
            target: c.target.clone(),
            mode: match c.mode {
                CacheMode::Ro => slate_cache::CacheMode::Ro,
                CacheMode::Overlay => slate_cache::CacheMode::Overlay,
            },
            promote: match c.promote {
                Promote::Never => slate_cache::Promote::Never,
                Promote::Trusted => slate_cache::Promote::Trusted,
            },
        })
        .collect()
}

/// Whose layer a job's new cache files go to: its PR's, or (trusted builds of
/// `trusted_branches`) the shared mirror's.
fn cache_context(app: &App, job: &Job, build: &Build) -> slate_cache::JobCacheContext {
    let trusted = match &build.change.trigger {
        Trigger::Push { branch } | Trigger::Manual { branch } => app
            .config
            .repo(&build.change.repo)
            .is_some_and(|r| r.trusted_branches.contains(branch)),
        Trigger::PullRequest { .. } => false,
    };
    slate_cache::JobCacheContext {
        job_name: job.id.resource_name(),
        repo: build.change.repo.clone(),
        pr: build.change.trigger.pr_number(),
        trusted,
    }
}

/// After the worker is gone: promote what the job added to its overlay caches.
async fn harvest_caches(app: &Arc<App>, job: &Job, log: Option<&mut LogWriter>) {
    let Some(pool) = app.config.pool(&job.pool) else {
        return;
    };
    let specs = cache_specs(pool);
    if specs.is_empty() {
        return;
    }
    let Ok(build) = app.store.get_build(job.build_id).await else {
        return;
    };
    let ctx = cache_context(app, job, &build);
    let caches = app.caches.clone();
    let name = ctx.job_name.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = caches.harvest(&ctx, &specs);
        if r.is_err() {
            let _ = caches.cleanup_job(&ctx.job_name);
        }
        r
    })
    .await;
    let note = match result {
        Ok(Ok(report)) => {
            let bytes: u64 = report.promoted.iter().map(|p| p.bytes).sum();
            for r in &report.rejected {
                tracing::info!(job.id = job.id.0, cache = %r.cache, path = %r.path.display(), reason = %r.reason, "cache file not promoted");
            }
            format!(
                "caches: {} new files ({bytes} bytes) kept, {} changes not kept",
                report.promoted.len(),
                report.rejected.len()
            )
        }
        Ok(Err(e)) => {
            tracing::error!(job.id = job.id.0, error = %e, "harvesting caches");
            format!("caches: nothing kept ({e})")
        }
        Err(e) => format!("caches: harvest task failed ({e})"),
    };
    tracing::debug!(worker = %name, "{note}");
    if let Some(log) = log {
        let _ = log.note(&note).await;
    }
}

/// What a pool's job starts on: the pool's directory, or the newest version of the
/// named image built by `slate image build` — its root filesystem for sandboxes, its VM
/// output (disk.qcow2, vmlinuz, initrd.img) for qemu and libvirt pools.
fn resolve_image(app: &App, pool: &PoolConfig) -> Result<std::path::PathBuf, String> {
    pool_image(&app.data_dir, pool)
}

/// The image a job of `pool` starts on now: the pool's path, or the newest version of the
/// named image it names.
pub(crate) fn pool_image(
    data_dir: &std::path::Path,
    pool: &PoolConfig,
) -> Result<std::path::PathBuf, String> {
    use slate_core::config::ProviderKind;
    let name = pool.image.to_string_lossy();
    if pool.provider == ProviderKind::Exec || name.contains('/') {
        return Ok(pool.image.clone());
    }
    let r = slate_image::resolve(&data_dir.join("images"), &name)
        .map_err(|e| format!("image {name}: {e}"))?;
    match pool.provider {
        ProviderKind::Sandbox => Ok(r.rootfs),
        _ => {
            r.vm.ok_or_else(|| format!("image {name} has no qcow2 output for a VM pool"))
        }
    }
}
