//! Actions: cancel a job or a build, rebuild a build; from UI forms (session + CSRF) and
//! from the API (bearer token).

use super::auth::{self, Principal};
use super::Ui;
use crate::app::App;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use slate_core::{BuildId, JobId, JobState};
use slate_store::{NewBuild, NewJob, StoreError};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("build {0} has no prepared checkout (its source could not be fetched or merged): push again to build it")]
    NoCheckout(BuildId),
    #[error("none of the pools of build {0} is configured any more")]
    NoPools(BuildId),
}

impl ActionError {
    fn status(&self) -> StatusCode {
        match self {
            ActionError::Store(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            ActionError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        }
    }
}

impl IntoResponse for ActionError {
    fn into_response(self) -> Response {
        if let ActionError::Store(e) = &self {
            tracing::error!(error = %e, "store error in an action");
        }
        (
            self.status(),
            Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response()
    }
}

/// Cancel every active job of a build; returns how many were still active.
pub async fn cancel_build(app: &App, id: BuildId, who: &str) -> Result<usize, ActionError> {
    let reason = format!("cancelled by {who}");
    // A build that does not exist is a 404, not "nothing to cancel".
    app.store.get_build(id).await?;
    let mut n = 0;
    for j in app.store.jobs_of_build(id).await? {
        if !j.state.is_terminal() && app.cancel_job(j.id, &reason).await? {
            n += 1;
        }
    }
    tracing::info!(build.id = id.0, jobs = n, by = who, "build cancelled");
    Ok(n)
}

/// Build the same commit again on fresh workers: a new build with the old one's change,
/// pipeline and (still configured) pools, checking out the very commit the old one did.
///
/// This deliberately does not go through `events::start_build`: that fetches the forge
/// again and would build whatever the branch or PR points at now, and a PR's newer head
/// would supersede (cancel) nothing or the wrong thing. The checkout commit is kept in
/// the mirror under `refs/slate/checkout/<sha>`, so the runners export it as before.
/// Nothing is superseded by a rebuild.
pub async fn rebuild(app: &Arc<App>, id: BuildId, who: &str) -> Result<BuildId, ActionError> {
    let old = app.store.get_build(id).await?;
    let checkout = old
        .checkout_sha
        .clone()
        .ok_or(ActionError::NoCheckout(id))?;
    let mut jobs: Vec<NewJob> = app
        .store
        .jobs_of_build(id)
        .await?
        .into_iter()
        .filter(|j| app.config.pool(&j.pool).is_some())
        .map(|j| NewJob {
            pool: j.pool,
            target: j.target,
            vars: j.vars,
        })
        .collect();
    // A build with planning jobs plans again: its dynamic jobs come from the new run.
    let dynamic = app
        .config
        .pipeline(&old.pipeline)
        .is_some_and(|p| p.plan.is_some());
    if dynamic
        && jobs
            .iter()
            .any(|j| j.target.as_deref() == Some(slate_core::PLAN_TARGET))
    {
        jobs.retain(|j| j.target.as_deref() == Some(slate_core::PLAN_TARGET));
    }
    if jobs.is_empty() {
        return Err(ActionError::NoPools(id));
    }
    // Held like the event loop does, so the scheduler never claims a job of this build
    // before its checkout is recorded.
    let planning = app.planning.lock().await;
    let (new_id, job_ids) = app
        .store
        .create_build(NewBuild {
            change: old.change.clone(),
            pipeline: old.pipeline.clone(),
            event_id: None,
            checkout_sha: Some(checkout),
            jobs,
        })
        .await?;
    drop(planning);
    tracing::info!(
        build.id = new_id.0,
        rebuild_of = id.0,
        by = who,
        jobs = job_ids.len(),
        "rebuild created"
    );
    let build = app.store.get_build(new_id).await?;
    for j in &job_ids {
        let job = app.store.get_job(*j).await?;
        app.report(
            &build,
            &job,
            &format!("queued (rebuild of #{} by {who})", id.0),
        );
    }
    app.wake_scheduler.notify_one();
    Ok(new_id)
}

async fn cancel_one(app: &App, id: JobId, who: &str) -> Result<bool, ActionError> {
    app.store.get_job(id).await?;
    Ok(app.cancel_job(id, &format!("cancelled by {who}")).await?)
}

fn who(p: &Principal) -> String {
    format!("{} (token {})", p.name, p.token_id)
}

/// `POST /jobs/{id}/cancel` (form).
pub async fn cancel_job_form(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let back = format!("/jobs/{id}");
    let p = match auth::form_principal(&ui, &headers, &auth::form_fields(&body), &back) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    match cancel_one(&ui.app, JobId(id), &who(&p)).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /builds/{id}/cancel` (form).
pub async fn cancel_build_form(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let back = format!("/builds/{id}");
    let p = match auth::form_principal(&ui, &headers, &auth::form_fields(&body), &back) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    match cancel_build(&ui.app, BuildId(id), &who(&p)).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /builds/{id}/rebuild` (form): to the new build's page.
pub async fn rebuild_form(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let back = format!("/builds/{id}");
    let p = match auth::form_principal(&ui, &headers, &auth::form_fields(&body), &back) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    match rebuild(&ui.app, BuildId(id), &who(&p)).await {
        Ok(new) => Redirect::to(&format!("/builds/{}", new.0)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v1/builds/{id}/cancel` (bearer).
pub async fn cancel_build_api(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    let p = match auth::bearer(&ui.app, &headers).await {
        Ok(p) => p,
        Err(e) => return auth::unauthorized(e),
    };
    match cancel_build(&ui.app, BuildId(id), &who(&p)).await {
        Ok(n) => Json(serde_json::json!({"cancelled_jobs": n})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v1/builds/{id}/rebuild` (bearer).
pub async fn rebuild_api(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    let p = match auth::bearer(&ui.app, &headers).await {
        Ok(p) => p,
        Err(e) => return auth::unauthorized(e),
    };
    match rebuild(&ui.app, BuildId(id), &who(&p)).await {
        Ok(new) => (
            StatusCode::CREATED,
            Json(serde_json::json!({"build_id": new.0})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Whether a job can still be cancelled (shown as a button).
pub fn cancellable(state: JobState) -> bool {
    !state.is_terminal()
}
