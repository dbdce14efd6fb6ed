//! A stand-in for GitHub's commit status API, for the demo and offline use: it answers
//! like GitHub and appends each received status to a JSON-lines file.

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Recorder {
    file: Mutex<std::fs::File>,
    next_id: Mutex<u64>,
}

async fn create_status(
    State(rec): State<Arc<Recorder>>,
    UrlPath((owner, repo, sha)): UrlPath<(String, String, String)>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let id = {
        let mut n = rec.next_id.lock().unwrap();
        *n += 1;
        *n
    };
    let line = json!({
        "repo": format!("{owner}/{repo}"),
        "sha": sha,
        "state": body.get("state"),
        "context": body.get("context"),
        "description": body.get("description"),
        "target_url": body.get("target_url"),
    });
    if let Ok(mut f) = rec.file.lock() {
        let _ = writeln!(f, "{line}");
    }
    let now = chrono::Utc::now().to_rfc3339();
    (
        StatusCode::CREATED,
        Json(json!({
            "url": format!("https://api.github.com/repos/{owner}/{repo}/statuses/{sha}"),
            "avatar_url": null,
            "id": id,
            "node_id": format!("SC_{id}"),
            "state": body.get("state"),
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "context": body.get("context").cloned().unwrap_or(json!("default")),
            "created_at": now,
            "updated_at": now,
            "creator": null
        })),
    )
}

pub async fn run(listen: &str, record: &Path, addr_file: Option<&Path>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(record)
        .with_context(|| format!("opening {}", record.display()))?;
    let rec = Arc::new(Recorder {
        file: Mutex::new(file),
        next_id: Mutex::new(0),
    });
    let app = Router::new()
        .route("/repos/{owner}/{repo}/statuses/{sha}", post(create_status))
        .with_state(rec);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    if let Some(p) = addr_file {
        let tmp: PathBuf = p.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, p)?;
    }
    eprintln!("fake github listening on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
