//! Scheduled image rebuilds: the recipes named in `[[image]]` are rebuilt in the
//! background every `rebuild_every`; pools naming the image pick up the new version for
//! new jobs, running jobs keep theirs, and a failed rebuild keeps the old version.

use crate::app::App;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The last rebuild of one image, for the API and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    pub recipe: PathBuf,
    pub last_attempt: Option<chrono::DateTime<chrono::Utc>>,
    /// `ok` or the error of the last attempt.
    pub last_result: Option<String>,
    pub newest_version: Option<String>,
    pub failures: u64,
}

/// Rebuild results by image name.
#[derive(Default)]
pub struct Rebuilds {
    pub by_image: Mutex<BTreeMap<String, RebuildStatus>>,
}

/// Check every few minutes which configured image is due, and rebuild it.
pub async fn rebuild_loop(app: Arc<App>) {
    if app.config.images.is_empty() {
        return;
    }
    loop {
        for recipe_path in app.config.images.clone() {
            rebuild_if_due(&app, recipe_path).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

async fn rebuild_if_due(app: &Arc<App>, recipe_path: PathBuf) {
    let images_dir = app.data_dir.join("images");
    let recipe = match slate_image::Recipe::load(&recipe_path) {
        Ok(r) => r,
        Err(e) => {
            record(
                app,
                recipe_path.display().to_string(),
                &recipe_path,
                Err(e.to_string()),
                None,
            );
            return;
        }
    };
    let newest = slate_image::versions(&images_dir, &recipe.name)
        .ok()
        .and_then(|v| v.into_iter().max_by_key(|i| i.created));
    let due = match (&newest, recipe.rebuild_every) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(n), Some(every)) => {
            chrono::Utc::now() - n.created
                >= chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX)
        }
    };
    if !due {
        let mut map = app.rebuilds.by_image.lock().unwrap();
        map.entry(recipe.name.clone())
            .or_insert_with(|| RebuildStatus {
                recipe: recipe_path.clone(),
                last_attempt: None,
                last_result: None,
                newest_version: newest.map(|n| n.version),
                failures: 0,
            });
        return;
    }
    tracing::info!(image = %recipe.name, "rebuilding image");
    let name = recipe.name.clone();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        slate_image::ImageBuilder::new(images_dir)
            .build(&recipe, &slate_image::Progress::hidden())
            .map(|v| v.version)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("rebuild task failed: {e}")));
    tracing::info!(image = %name, ok = result.is_ok(), duration_ms = started.elapsed().as_millis() as u64, "image rebuild finished");
    let version = result.as_ref().ok().cloned();
    record(app, name, &recipe_path, result.map(|_| ()), version);
}

fn record(
    app: &App,
    name: String,
    recipe: &std::path::Path,
    result: Result<(), String>,
    version: Option<String>,
) {
    let mut map = app.rebuilds.by_image.lock().unwrap();
    let st = map.entry(name.clone()).or_insert_with(|| RebuildStatus {
        recipe: recipe.to_path_buf(),
        last_attempt: None,
        last_result: None,
        newest_version: None,
        failures: 0,
    });
    st.last_attempt = Some(chrono::Utc::now());
    match result {
        Ok(()) => {
            st.last_result = Some("ok".into());
            if version.is_some() {
                st.newest_version = version;
            }
            app.metrics.image_rebuild(&name, "ok");
        }
        Err(e) => {
            tracing::error!(image = %name, error = %e, "image rebuild failed; pools keep the previous version");
            st.last_result = Some(e);
            st.failures += 1;
            app.metrics.image_rebuild(&name, "failed");
        }
    }
}
