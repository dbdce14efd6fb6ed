//! Artifacts: files a job's steps declared (`artifacts = ["glob", …]`), copied out of the
//! worker's workspace after the steps (also when the job failed) and before the worker
//! is destroyed, into `<data_dir>/artifacts/<job id>/`, and served by the API.
//!
//! The workspace is written by the job's (untrusted) code, and its processes may still
//! run while it is read, so the walk goes one component at a time through directory
//! descriptors with `O_NOFOLLOW`: a symlink anywhere is skipped, never followed, and only
//! regular files are copied (checked on the open descriptor). The total is capped.

use crate::app::App;
use crate::logs::LogWriter;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode};
use serde::Serialize;
use slate_core::{Job, JobId};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most directory entries one collection looks at (a workspace full of files costs time,
/// not disk).
const MAX_ENTRIES: usize = 200_000;
/// Deepest directory level walked.
const MAX_DEPTH: usize = 64;

/// What a collection kept and what it passed over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub files: usize,
    pub bytes: u64,
    /// Matching entries that were not copied, with why (`logs/x: symlink`).
    pub skipped: Vec<String>,
}

/// Where a job's artifacts are kept.
pub fn job_dir(data_dir: &Path, job: JobId) -> PathBuf {
    data_dir.join("artifacts").join(job.0.to_string())
}

fn matcher(globs: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        // `*` stays within a directory; `**` crosses them.
        b.add(GlobBuilder::new(g).literal_separator(true).build()?);
    }
    b.build()
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_at(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// Copies the regular files under `root` matching `globs` (relative paths) into `dest`,
/// at most `cap` bytes in all; files that would pass the cap are skipped. `dest` is
/// replaced.
pub fn collect(root: &Path, globs: &[String], dest: &Path, cap: u64) -> std::io::Result<Collected> {
    let set = matcher(globs).map_err(std::io::Error::other)?;
    let _ = std::fs::remove_dir_all(dest);
    let root_fd = openat(
        None,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
    .map_err(std::io::Error::from)?;
    let mut out = Collected::default();
    let mut seen = 0usize;
    walk(&root_fd, "", 0, &set, dest, cap, &mut out, &mut seen)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn walk(
    dir: &OwnedFd,
    prefix: &str,
    depth: usize,
    set: &GlobSet,
    dest: &Path,
    cap: u64,
    out: &mut Collected,
    seen: &mut usize,
) -> std::io::Result<()> {
    // The listing is of the directory the descriptor holds, whatever its path is now.
    let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let mut names: Vec<std::ffi::OsString> = listing.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        *seen += 1;
        if *seen > MAX_ENTRIES {
            out.skipped
                .push(format!("more than {MAX_ENTRIES} entries: stopped looking"));
            return Ok(());
        }
        let Some(text) = name.to_str() else {
            continue;
        };
        let rel = if prefix.is_empty() {
            text.to_string()
        } else {
            format!("{prefix}/{text}")
        };
        let st = match nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            name.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(_) => continue,
        };
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR {
            if depth + 1 >= MAX_DEPTH {
                continue;
            }
            // O_NOFOLLOW: a directory swapped for a symlink since the stat is refused.
            if let Ok(sub) = open_at(dir, &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                walk(&sub, &rel, depth + 1, set, dest, cap, out, seen)?;
            }
            continue;
        }
        if !set.is_match(&rel) {
            continue;
        }
        if kind != libc::S_IFREG {
            let what = if kind == libc::S_IFLNK {
                "symlink"
            } else {
                "not a regular file"
            };
            out.skipped.push(format!("{rel}: {what}"));
            continue;
        }
        let fd = match open_at(dir, &name, OFlag::O_RDONLY | OFlag::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                out.skipped.push(format!("{rel}: {e}"));
                continue;
            }
        };
        // Checked again on what was opened: it may have been replaced since the stat.
        let st = match fstat(fd.as_raw_fd()) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => st,
            _ => {
                out.skipped.push(format!("{rel}: not a regular file"));
                continue;
            }
        };
        let size = st.st_size.max(0) as u64;
        if out.bytes + size > cap {
            out.skipped
                .push(format!("{rel}: over the artifacts limit of {cap} bytes"));
            continue;
        }
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = File::from(fd);
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)?;
        // The file may grow while it is read: copy no more than the room left.
        let copied = std::io::copy(&mut (&mut file).take(cap - out.bytes), &mut w)?;
        w.flush()?;
        out.files += 1;
        out.bytes += copied;
    }
    Ok(())
}

/// After a job's steps, before its worker is destroyed: keep what its steps declared.
pub(crate) async fn collect_for_job(app: &Arc<App>, job: &Job, log: &mut LogWriter) {
    let Ok(build) = app.store.get_build(job.build_id).await else {
        return;
    };
    let Some(pipeline) = app.config.pipeline(&build.pipeline) else {
        return;
    };
    if pipeline.plan.is_some() && job.target.as_deref() == Some(slate_core::PLAN_TARGET) {
        return;
    }
    let event = build.change.trigger.event_name();
    let globs: Vec<String> = pipeline
        .steps
        .iter()
        .filter(|s| s.runs_for(event))
        .flat_map(|s| s.artifacts.iter().cloned())
        .collect();
    if globs.is_empty() {
        return;
    }
    let Some(pool) = app.config.pool(&job.pool) else {
        return;
    };
    let kind = app.providers.get(&job.pool).map(|p| p.kind()).unwrap_or("");
    let default_workdir = pool
        .workdir
        .as_deref()
        .is_none_or(|w| w == slate_provider::WORKSPACE_DIR);
    if kind != "sandbox" {
        // The agent sent them back (runner::remote_collects), and the log says so.
        return;
    }
    if !default_workdir {
        let _ = log
            .note("artifacts: not collected from a sandbox whose workdir is not the default")
            .await;
        return;
    }
    let workspace = app
        .data_dir
        .join("workers")
        .join(job.id.resource_name())
        .join("workspace");
    if !workspace.is_dir() {
        return;
    }
    let dest = job_dir(&app.data_dir, job.id);
    let cap = pool.artifacts_limit;
    let result = tokio::task::spawn_blocking(move || collect(&workspace, &globs, &dest, cap)).await;
    let note = match result {
        Ok(Ok(c)) => {
            for s in &c.skipped {
                tracing::info!(job.id = job.id.0, artifact = %s, "artifact not kept");
            }
            let mut note = format!("artifacts: {} file(s), {} bytes kept", c.files, c.bytes);
            if !c.skipped.is_empty() {
                let shown: Vec<&str> = c.skipped.iter().take(10).map(String::as_str).collect();
                note.push_str(&format!("; skipped: {}", shown.join(", ")));
                if c.skipped.len() > 10 {
                    note.push_str(&format!(" and {} more", c.skipped.len() - 10));
                }
            }
            note
        }
        Ok(Err(e)) => format!("artifacts: not collected ({e})"),
        Err(e) => format!("artifacts: collection failed ({e})"),
    };
    let _ = log.note(&note).await;
}

/// One kept file, as the API lists it.
#[derive(Debug, Serialize)]
pub struct ArtifactView {
    pub path: String,
    pub size: u64,
    pub url: String,
}

fn list_files(root: &Path, prefix: &str, out: &mut Vec<(String, u64)>) {
    let Ok(rd) = std::fs::read_dir(root.join(prefix)) else {
        return;
    };
    for e in rd.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        match e.metadata() {
            Ok(m) if m.is_dir() => list_files(root, &rel, out),
            Ok(m) if m.is_file() => out.push((rel, m.len())),
            _ => {}
        }
    }
}

/// `GET /api/v1/jobs/{id}/artifacts`: the job's kept files.
pub async fn list(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<i64>,
) -> Result<Json<Vec<ArtifactView>>, crate::api::ApiError> {
    app.store.get_job(JobId(id)).await?;
    let root = job_dir(&app.data_dir, JobId(id));
    let mut files = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        list_files(&root, "", &mut out);
        out
    })
    .await
    .unwrap_or_default();
    files.sort();
    Ok(Json(
        files
            .into_iter()
            .map(|(path, size)| ArtifactView {
                url: format!("{}/api/v1/jobs/{id}/artifacts/{path}", app.public_url),
                path,
                size,
            })
            .collect(),
    ))
}

/// `GET /api/v1/jobs/{id}/artifacts/{*path}`: one kept file.
pub async fn download(
    State(app): State<Arc<App>>,
    UrlPath((id, path)): UrlPath<(i64, String)>,
) -> Response {
    let refused = path.is_empty()
        || path.starts_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'));
    if refused {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": format!("invalid artifact path {path:?}")})),
        )
            .into_response();
    }
    if let Err(e) = app.store.get_job(JobId(id)).await {
        return crate::api::ApiError::from(e).into_response();
    }
    let file = job_dir(&app.data_dir, JobId(id)).join(&path);
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("not found: artifact {path}")})),
        )
            .into_response()
    };
    match tokio::fs::symlink_metadata(&file).await {
        Ok(m) if m.is_file() => {}
        _ => return not_found(),
    }
    match tokio::fs::read(&file).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from(bytes),
        )
            .into_response(),
        Err(_) => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_matching_regular_files_only_and_caps_the_total() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let w = ws.path();
        std::fs::create_dir_all(w.join("logs/port")).unwrap();
        std::fs::write(w.join("logs/main.log"), "main").unwrap();
        std::fs::write(w.join("logs/port/config.log"), "config").unwrap();
        std::fs::write(w.join("other.txt"), "no").unwrap();
        std::fs::write(w.join("big.log"), vec![b'x'; 100]).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), w.join("logs/leak.log")).unwrap();
        std::os::unix::fs::symlink(outside.path(), w.join("logs/dir")).unwrap();
        let dest = tempfile::tempdir().unwrap();
        let d = dest.path().join("1");
        let got = collect(w, &["logs/**".to_string(), "*.log".to_string()], &d, 50).unwrap();
        assert_eq!(got.files, 2, "{got:?}");
        assert_eq!(got.bytes, 10);
        assert_eq!(
            std::fs::read_to_string(d.join("logs/main.log")).unwrap(),
            "main"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("logs/port/config.log")).unwrap(),
            "config"
        );
        assert!(!d.join("other.txt").exists());
        assert!(!d.join("logs/leak.log").exists());
        assert!(!d.join("logs/dir").exists());
        assert!(
            got.skipped.iter().any(|s| s == "logs/leak.log: symlink"),
            "{got:?}"
        );
        assert!(
            got.skipped.iter().any(|s| s.starts_with("big.log: over")),
            "{got:?}"
        );
        let mut listed = Vec::new();
        list_files(&d, "", &mut listed);
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("logs/main.log".to_string(), 4),
                ("logs/port/config.log".to_string(), 6)
            ]
        );
    }
}
