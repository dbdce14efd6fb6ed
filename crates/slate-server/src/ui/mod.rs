//! The web UI: server-rendered pages (maud templates compiled into the binary, assets
//! embedded), usable without JavaScript; a small script adds live logs over SSE.
//!
//! Routes: `/` builds, `/builds/{id}`, `/jobs/{id}` (+ `/events`, `/log.txt`), `/pools`,
//! `/images`, `/login`, `/logout`, form actions under `/jobs/{id}/cancel`,
//! `/builds/{id}/{cancel,rebuild}`, and bearer-token API actions under
//! `/api/v1/builds/{id}/{cancel,rebuild}`.

pub mod actions;
pub mod ansi;
pub mod auth;
mod charts;
pub mod logview;
mod pages;

use crate::app::App;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use slate_store::StoreError;
use std::sync::Arc;

/// The `[ui]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UiConfig {
    /// Every page (and the read API) needs a login; by default reading is public.
    pub require_login: bool,
}

impl UiConfig {
    /// The UI settings of a server, from its `[ui]` table.
    pub fn of(app: &App) -> UiConfig {
        UiConfig {
            require_login: app.config.ui.require_login,
        }
    }
}

/// State of the UI's handlers.
#[derive(Clone)]
pub struct Ui {
    pub app: Arc<App>,
    pub config: UiConfig,
    pub sessions: Arc<auth::Sessions>,
}

/// The UI's routes merged with `core` (the server's other routes), all behind the UI's
/// gate (security headers; login when required).
pub fn router_with(app: Arc<App>, core: Router, config: UiConfig) -> Router {
    let ui = Ui {
        app,
        config,
        sessions: Arc::default(),
    };
    Router::new()
        .route("/", get(pages::builds))
        .route("/builds/{id}", get(pages::build))
        .route("/jobs/{id}", get(pages::job))
        .route("/jobs/{id}/events", get(logview::events))
        .route("/jobs/{id}/log.txt", get(logview::raw))
        .route("/pools", get(pages::pools))
        .route("/images", get(pages::images))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/jobs/{id}/cancel", post(actions::cancel_job_form))
        .route("/builds/{id}/cancel", post(actions::cancel_build_form))
        .route("/builds/{id}/rebuild", post(actions::rebuild_form))
        .route(
            "/api/v1/builds/{id}/cancel",
            post(actions::cancel_build_api),
        )
        .route("/api/v1/builds/{id}/rebuild", post(actions::rebuild_api))
        .route("/assets/{name}", get(asset))
        .with_state(ui.clone())
        .merge(core)
        .layer(axum::middleware::from_fn_with_state(ui, auth::gate))
}

/// Embedded static files.
async fn asset(Path(name): Path<String>) -> Response {
    let (body, ty) = match name.as_str() {
        "style.css" => (include_str!("assets/style.css"), "text/css; charset=utf-8"),
        "live.js" => (
            include_str!("assets/live.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("reading the log: {0}")]
    Io(#[from] std::io::Error),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            PageError::Store(StoreError::NotFound(what)) => {
                (StatusCode::NOT_FOUND, format!("not found: {what}"))
            }
            other => {
                tracing::error!(error = %other, "ui page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_string(),
                )
            }
        };
        (status, pages::error_page(status, &msg)).into_response()
    }
}

/// `1.2s`, `3m 4s`, `1h 2m`.
pub fn human_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m {}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h {}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}
