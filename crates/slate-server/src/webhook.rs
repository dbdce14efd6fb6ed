//! `POST /hooks/github`: signature first, then parse, then durable store, then 2xx.

use crate::app::App;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use slate_forge::webhook::{parse_event, verify_signature, WebhookEvent};
use slate_store::InsertOutcome;
use std::sync::Arc;

/// GitHub caps payloads at 25 MiB; anything larger is not from GitHub.
pub const MAX_WEBHOOK_BODY: usize = 25 << 20;

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

pub async fn github_hook(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(secret) = &app.webhook_secret else {
        app.metrics.webhook("not_configured");
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": "the github source is not configured"}),
        );
    };
    let sig = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if let Err(e) = verify_signature(secret, &body, sig) {
        app.metrics.webhook("bad_signature");
        tracing::warn!(error = %e, "webhook refused");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let Some(event) = headers.get("x-github-event").and_then(|v| v.to_str().ok()) else {
        app.metrics.webhook("bad_request");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "missing X-GitHub-Event header"}),
        );
    };
    let Some(delivery) = headers
        .get("x-github-delivery")
        .and_then(|v| v.to_str().ok())
    else {
        app.metrics.webhook("bad_request");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "missing X-GitHub-Delivery header"}),
        );
    };
    if delivery.is_empty() || delivery.len() > 200 {
        app.metrics.webhook("bad_request");
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid X-GitHub-Delivery header"}),
        );
    }
    let parsed = match parse_event(event, &body) {
        Ok(p) => p,
        Err(e) => {
            app.metrics.webhook("malformed");
            return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}));
        }
    };
    match parsed {
        WebhookEvent::Ping { .. } => {
            app.metrics.webhook("ping");
            return reply(StatusCode::OK, json!({"result": "pong"}));
        }
        WebhookEvent::Ignored { reason, .. } => {
            app.metrics.webhook("ignored");
            return reply(
                StatusCode::ACCEPTED,
                json!({"result": "ignored", "reason": reason}),
            );
        }
        _ => {}
    }
    match app
        .store
        .insert_event("github", delivery, event, &body)
        .await
    {
        Ok(InsertOutcome::Inserted(id)) => {
            app.metrics.webhook("accepted");
            app.wake_events.notify_one();
            reply(
                StatusCode::ACCEPTED,
                json!({"result": "accepted", "event_id": id}),
            )
        }
        Ok(InsertOutcome::Duplicate(id)) => {
            app.metrics.webhook("duplicate");
            reply(
                StatusCode::OK,
                json!({"result": "duplicate", "event_id": id}),
            )
        }
        Err(e) => {
            app.metrics.webhook("store_error");
            tracing::error!(error = %e, "storing webhook");
            // Not stored, so not acknowledged: GitHub will show the failure and allow redelivery.
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "could not store the event"}),
            )
        }
    }
}
