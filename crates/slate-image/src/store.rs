//! Versions on disk: metadata, listing, resolution for pools, and garbage collection.

use crate::fsutil::{self, Lock};
use crate::{ImageError, Output};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A cached base unused for this long is removed by `gc`.
const CACHE_MAX_IDLE: Duration = Duration::from_secs(30 * 86400);

/// Time spent in one build stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    /// The stage's result came from the base cache.
    pub reused: bool,
}

/// `<version>/meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    pub version: String,
    /// The recipe file the version was built from.
    pub recipe: PathBuf,
    /// SHA-256 of the recipe's text.
    pub recipe_hash: String,
    /// SHA-256 over the recipe, the content of its files and the base's identity: two
    /// versions with the same input hash were built from the same inputs.
    pub input_hash: String,
    /// The base, as built from (e.g. `debootstrap bookworm (minbase) from …`).
    pub base: String,
    /// The base and packages stages were reused from the cache.
    pub base_reused: bool,
    pub created: DateTime<Utc>,
    pub size_bytes: u64,
    /// Size of `vm/disk.qcow2` (the `qcow2` output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_disk_bytes: Option<u64>,
    pub outputs: Vec<Output>,
    pub stages: Vec<StageTiming>,
    pub build_seconds: f64,
}

/// One version, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub version: String,
    /// `<images_dir>/<name>/<version>`.
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    /// `<dir>/vm`, the VM image directory, when the version has the `qcow2` output.
    pub vm: Option<PathBuf>,
    pub created: DateTime<Utc>,
    pub size_bytes: u64,
    pub outputs: Vec<Output>,
    pub input_hash: String,
    /// The newest version of its image: what pools resolve to, never collected.
    pub newest: bool,
    /// Jobs running on this version; filled in by whoever knows (the server), not here.
    pub in_use_by: Option<usize>,
}

/// What a pool runs on: a pinned version's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image name, or the path as given when a directory was named.
    pub name: String,
    /// Empty for a plain directory.
    pub version: String,
    pub rootfs: PathBuf,
    /// The VM image directory (what qemu/libvirt pools boot): the version's `vm/` with the
    /// `qcow2` output, or a named directory holding `disk.qcow2`.
    pub vm: Option<PathBuf>,
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GcReport {
    pub removed: Vec<ImageInfo>,
    /// Leftovers of killed or failed builds.
    pub removed_temp: Vec<PathBuf>,
    /// Cached bases unused for 30 days.
    pub removed_cache: Vec<PathBuf>,
}

pub(crate) fn read_meta(dir: &Path) -> Option<ImageMeta> {
    let text = fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn image_names(images_dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = match fs::read_dir(images_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ImageError::Io {
                what: format!("reading {}", images_dir.display()),
                error: e,
            })
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| crate::recipe::valid_name(n))
        .collect();
    names.sort();
    Ok(names)
}

/// The complete versions of `name`, oldest first. Temp and failed dirs never show.
pub fn versions(images_dir: &Path, name: &str) -> Result<Vec<ImageInfo>, ImageError> {
    let dir = images_dir.join(name);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ImageError::Io {
                what: format!("reading {}", dir.display()),
                error: e,
            })
        }
    };
    let mut out: Vec<ImageInfo> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let meta = read_meta(&e.path())?;
            Some(ImageInfo {
                name: name.to_string(),
                version: e.file_name().to_string_lossy().into_owned(),
                dir: e.path(),
                rootfs: e.path().join("rootfs"),
                vm: meta
                    .outputs
                    .contains(&Output::Qcow2)
                    .then(|| e.path().join(crate::vm::VM_DIR)),
                created: meta.created,
                size_bytes: meta.size_bytes,
                outputs: meta.outputs,
                input_hash: meta.input_hash,
                newest: false,
                in_use_by: None,
            })
        })
        .collect();
    // Version names start with a fixed-width UTC timestamp: lexical order is build order.
    out.sort_by(|a, b| a.version.cmp(&b.version));
    if let Some(last) = out.last_mut() {
        last.newest = true;
    }
    Ok(out)
}

/// Every version of every image, by name then oldest first.
pub fn list(images_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let mut out = Vec::new();
    for name in image_names(images_dir)? {
        out.extend(versions(images_dir, &name)?);
    }
    Ok(out)
}

/// What a pool's `image = "…"` means: a path (anything with a `/`) is used as is and must
/// be a directory; a name gives its newest version, which the job then pins.
pub fn resolve(images_dir: &Path, name_or_path: &str) -> Result<ResolvedImage, ImageError> {
    if name_or_path.contains('/') {
        let p = PathBuf::from(name_or_path);
        if !p.is_dir() {
            return Err(ImageError::Other(format!(
                "image path {} is not a directory",
                p.display()
            )));
        }
        return Ok(ResolvedImage {
            name: name_or_path.to_string(),
            version: String::new(),
            vm: p.join("disk.qcow2").is_file().then(|| p.clone()),
            rootfs: p,
        });
    }
    let newest = versions(images_dir, name_or_path)?
        .pop()
        .ok_or_else(|| ImageError::NotFound(name_or_path.to_string(), images_dir.to_path_buf()))?;
    Ok(ResolvedImage {
        name: newest.name,
        version: newest.version,
        rootfs: newest.rootfs,
        vm: newest.vm,
    })
}

/// Remove every version that is not the newest of its image and that no job uses
/// (`in_use`: pinned rootfs or version paths), plus leftovers of killed builds.
pub fn gc(images_dir: &Path, in_use: &[PathBuf]) -> Result<GcReport, ImageError> {
    let in_use: Vec<PathBuf> = in_use
        .iter()
        .map(|p| fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let mut report = GcReport::default();
    for name in image_names(images_dir)? {
        let name_dir = images_dir.join(&name);
        // A running build holds the lock: its temp dir is not a leftover.
        if let Some(_lock) = Lock::try_acquire(&name_dir.join(".lock"))? {
            report.removed_temp.extend(clean_leftovers(&name_dir)?);
        }
        for v in versions(images_dir, &name)? {
            if v.newest {
                continue;
            }
            let canon = fs::canonicalize(&v.dir).unwrap_or_else(|_| v.dir.clone());
            if in_use.iter().any(|p| p.starts_with(&canon)) {
                tracing::info!(image = %name, version = %v.version, "kept: in use");
                continue;
            }
            // Hide it first (one rename), so a half-deleted version is never listed.
            let doomed = name_dir.join(format!(".gc-{}", v.version));
            fsutil::rename_noreplace(&v.dir, &doomed)?;
            fsutil::remove_tree(&doomed)?;
            tracing::info!(image = %name, version = %v.version, "removed");
            report.removed.push(v);
        }
    }
    report.removed_cache = clean_cache(&images_dir.join(".cache"), true)?;
    Ok(report)
}

/// Remove `.tmp-*` and `.gc-*` dirs (builds or collections that died) and all but the
/// newest `.failed-*` logs. The caller holds the image's lock.
pub(crate) fn clean_leftovers(name_dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let Ok(entries) = fs::read_dir(name_dir) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".tmp-") || n.starts_with(".gc-") {
            fsutil::remove_tree(&e.path())?;
            tracing::info!(dir = %e.path().display(), "removed a leftover build dir");
            removed.push(e.path());
        } else if n.starts_with(".failed-") {
            failed.push(e.path());
        }
    }
    failed.sort();
    failed.pop();
    for f in failed {
        fsutil::remove_tree(&f)?;
        removed.push(f);
    }
    Ok(removed)
}

/// Remove cache temp dirs whose key lock is free and, with `idle`, bases unused for long.
pub(crate) fn clean_cache(cache: &Path, idle: bool) -> Result<Vec<PathBuf>, ImageError> {
    let Ok(entries) = fs::read_dir(cache) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let key = if let Some(k) = n.strip_prefix(".tmp-base-") {
            k
        } else if let Some(k) = n.strip_prefix("base-") {
            if n.ends_with(".lock") {
                continue;
            }
            k
        } else {
            continue;
        };
        let Some(_lock) = Lock::try_acquire(&cache.join(format!("base-{key}.lock")))? else {
            continue;
        };
        let stale = n.starts_with(".tmp-")
            || (idle
                && fs::metadata(e.path().join("last_used"))
                    .and_then(|m| m.modified())
                    .map(|t| {
                        SystemTime::now().duration_since(t).unwrap_or_default() > CACHE_MAX_IDLE
                    })
                    .unwrap_or(true));
        if stale {
            fsutil::remove_tree(&e.path())?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}
