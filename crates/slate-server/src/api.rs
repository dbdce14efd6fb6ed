//! JSON API (`/api/v1/…`), log streaming, health and metrics endpoints.

use crate::app::App;
use crate::events::SubmitRequest;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use slate_core::{Build, BuildId, Job, JobId, JobState, StepRecord, Trigger};
use slate_store::{BuildFilter, InsertOutcome, StoreError};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: i64,
    pub build_id: i64,
    pub pool: String,
    /// What the job builds (a port, a plan target, `plan`), if it has a target.
    pub target: Option<String>,
    pub vars: std::collections::BTreeMap<String, String>,
    /// The commit status context (`slate/<pool>` or `slate/<pool>/<target>`).
    pub context: String,
    pub state: JobState,
    pub reason: Option<String>,
    pub attempt: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub duration_ms: Option<i64>,
    pub steps: Vec<StepRecord>,
    pub log_url: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BuildView {
    pub id: i64,
    pub repo: String,
    pub trigger: Trigger,
    pub head_sha: String,
    pub head_ref: String,
    pub base_ref: Option<String>,
    pub author: String,
    pub pipeline: String,
    pub checkout_sha: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub jobs: Vec<JobView>,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ApiError(StatusCode::NOT_FOUND, format!("not found: {what}"))
            }
            other => {
                tracing::error!(error = %other, "store error in api");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "store error".into())
            }
        }
    }
}

async fn job_view(app: &App, job: Job, with_steps: bool) -> Result<JobView, ApiError> {
    let steps = if with_steps {
        app.store.steps_of_job(job.id).await?
    } else {
        Vec::new()
    };
    let duration_ms = match (job.started_at, job.finished_at) {
        (Some(s), Some(f)) => Some((f - s).num_milliseconds()),
        _ => None,
    };
    Ok(JobView {
        id: job.id.0,
        build_id: job.build_id.0,
        log_url: format!("{}/api/v1/jobs/{}/log", app.public_url, job.id.0),
        context: job.context(),
        target: job.target,
        vars: job.vars,
        pool: job.pool,
        state: job.state,
        reason: job.reason,
        attempt: job.attempt,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        duration_ms,
        steps,
    })
}

async fn build_view(app: &App, b: Build, with_steps: bool) -> Result<BuildView, ApiError> {
    let mut jobs = Vec::new();
    for j in app.store.jobs_of_build(b.id).await? {
        jobs.push(job_view(app, j, with_steps).await?);
    }
    Ok(BuildView {
        id: b.id.0,
        repo: b.change.repo,
        trigger: b.change.trigger,
        head_sha: b.change.head_sha,
        head_ref: b.change.head_ref,
        base_ref: b.change.base_ref,
        author: b.change.author,
        pipeline: b.pipeline,
        checkout_sha: b.checkout_sha,
        created_at: b.created_at,
        jobs,
    })
}

#[derive(Debug, Deserialize)]
pub struct BuildsQuery {
    pub repo: Option<String>,
    pub pr: Option<u64>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

pub async fn list_builds(
    State(app): State<Arc<App>>,
    Query(q): Query<BuildsQuery>,
) -> Result<Json<Vec<BuildView>>, ApiError> {
    let builds = app
        .store
        .list_builds(&BuildFilter {
            repo: q.repo,
            pr: q.pr,
            limit: q.limit.unwrap_or(50).min(500),
            offset: q.offset.unwrap_or(0),
        })
        .await?;
    let mut out = Vec::new();
    for b in builds {
        out.push(build_view(&app, b, false).await?);
    }
    Ok(Json(out))
}

pub async fn get_build(
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
) -> Result<Json<BuildView>, ApiError> {
    let b = app.store.get_build(BuildId(id)).await?;
    Ok(Json(build_view(&app, b, true).await?))
}

pub async fn get_job(
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
) -> Result<Json<JobView>, ApiError> {
    let j = app.store.get_job(JobId(id)).await?;
    Ok(Json(job_view(&app, j, true).await?))
}

/// Mutating endpoints need an API token (`Authorization: Bearer`).
async fn authorize(app: &App, headers: &HeaderMap) -> Result<crate::ui::auth::Principal, Response> {
    crate::ui::auth::bearer(app, headers)
        .await
        .map_err(crate::ui::auth::unauthorized)
}

pub async fn cancel_job(
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let who = authorize(&app, &headers).await?;
    app.store
        .get_job(JobId(id))
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let moved = app
        .cancel_job(
            JobId(id),
            &format!("cancelled through the api by {}", who.name),
        )
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    Ok(Json(json!({"cancelled": moved})).into_response())
}

pub async fn submit(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Authentication first: an anonymous caller learns nothing about the body's format.
    if let Err(resp) = authorize(&app, &headers).await {
        return Ok(resp);
    }
    let req: SubmitRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid submit request: {e}"),
        )
    })?;
    let Some(repo) = app.config.repo(&req.repo).cloned() else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("repository {} is not configured", req.repo),
        ));
    };
    if req.branch.is_empty() || req.branch.starts_with('-') || req.branch.contains("..") {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid branch {:?}", req.branch),
        ));
    }
    let payload = serde_json::to_vec(&req).expect("serializable");
    // A random delivery id: every submit is a new event.
    let delivery = format!(
        "submit-{}",
        hex::encode(crate::agents::token_hash(&crate::agents::new_token(
            slate_core::JobId(0)
        )))
    );
    // The event is durable first; it is then handled right here so the caller learns the
    // build id. The event loop skips it because it is marked processed under the same lock.
    let _events = app.event_lock.lock().await;
    let id = match app
        .store
        .insert_event("manual", &delivery, "submit", &payload)
        .await?
    {
        InsertOutcome::Inserted(id) | InsertOutcome::Duplicate(id) => id,
    };
    // Another replica's event loop may have seen it first; then it builds it.
    if !app
        .store
        .claim_event(id, &app.replica_id, std::time::Duration::from_secs(120))
        .await?
    {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"event_id": id, "build_id": null})),
        )
            .into_response());
    }
    let result = crate::events::start_build(
        &app,
        &repo,
        crate::events::manual_change(&repo, &req.branch),
        Some(id),
    )
    .await;
    app.store
        .mark_event_processed(id, result.as_ref().err().map(String::as_str))
        .await?;
    match result {
        Ok(Some(build)) => Ok((
            StatusCode::CREATED,
            Json(json!({"event_id": id, "build_id": build.0})),
        )
            .into_response()),
        Ok(None) => Ok((
            StatusCode::OK,
            Json(json!({"event_id": id, "build_id": null})),
        )
            .into_response()),
        Err(e) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, e)),
    }
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    pub follow: Option<String>,
    pub offset: Option<u64>,
}

/// The job's log from `offset`; with `follow`, stays open until the job ends.
pub async fn job_log(
    State(app): State<Arc<App>>,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let id = JobId(id);
    app.store.get_job(id).await?;
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes" | ""));
    let offset = q.offset.unwrap_or(0);
    struct St {
        app: Arc<App>,
        id: JobId,
        offset: u64,
        follow: bool,
        done: bool,
    }
    let st = St {
        app,
        id,
        offset,
        follow,
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let chunk = match st.app.logs.read_at(st.id, st.offset, 64 << 10).await {
                Ok(c) => c,
                Err(e) => return Some((Err(e), st)),
            };
            if !chunk.is_empty() {
                st.offset += chunk.len() as u64;
                return Some((Ok(axum::body::Bytes::from(chunk)), st));
            }
            if !st.follow {
                return None;
            }
            // Nothing new: finished for good, or wait for more.
            let rx = st.app.logs.subscribe(st.id);
            let finished_writer = rx.as_ref().map(|r| r.borrow().finished).unwrap_or(true);
            let terminal = match st.app.store.get_job(st.id).await {
                Ok(j) => j.state.is_terminal(),
                Err(_) => true,
            };
            if terminal && finished_writer {
                // One last read catches bytes written between the read and the check.
                st.done = true;
                let tail = st
                    .app
                    .logs
                    .read_at(st.id, st.offset, 64 << 10)
                    .await
                    .unwrap_or_default();
                if tail.is_empty() {
                    return None;
                }
                st.offset += tail.len() as u64;
                return Some((Ok(axum::body::Bytes::from(tail)), st));
            }
            match rx {
                Some(mut rx) => {
                    let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Ok(counts) = app.store.job_counts().await {
        for s in JobState::ALL {
            let n = counts
                .iter()
                .find(|(st, _)| *st == s)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            app.metrics
                .jobs
                .get_or_create(&crate::metrics::StateLabel {
                    state: s.as_str().into(),
                })
                .set(n as i64);
        }
    }
    if let Ok(queued) = app.store.jobs_in_states(&[JobState::Queued]).await {
        for p in &app.config.pools {
            let n = queued.iter().filter(|j| j.pool == p.name).count();
            app.metrics
                .queue_depth
                .get_or_create(&crate::metrics::PoolLabel {
                    pool: p.name.clone(),
                })
                .set(n as i64);
        }
    }
    for p in &app.config.pools {
        if p.warm > 0 {
            app.metrics
                .warm_vms
                .get_or_create(&crate::metrics::PoolLabel {
                    pool: p.name.clone(),
                })
                .set(app.qemu.warm_ready(&p.name) as i64);
        }
    }
    if let Some(r) = &app.reporter {
        let s = r.stats();
        for (k, v) in [
            ("delivered", s.delivered),
            ("retried", s.retried),
            ("failed", s.failed),
        ] {
            app.metrics
                .status_reports
                .get_or_create(&crate::metrics::ResultLabel { result: k.into() })
                .set(v as i64);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// Images: every built version with the jobs running on it, and the last scheduled
/// rebuild of each configured recipe (a failed rebuild shows here and in metrics).
pub async fn images(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let images_dir = app.data_dir.join("images");
    let in_use: Vec<std::path::PathBuf> = app
        .images_in_use
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let mut versions = slate_image::list(&images_dir).unwrap_or_default();
    for v in &mut versions {
        v.in_use_by = Some(in_use.iter().filter(|p| **p == v.rootfs).count());
    }
    let rebuilds = app.rebuilds.by_image.lock().unwrap().clone();
    Ok(Json(json!({ "versions": versions, "rebuilds": rebuilds })))
}
