//! Shared caches for jobs: read-only mirrors, per-job overlays, and the harvest of new files into per-PR layers or the mirror through a content-addressed store.
//!
//! Layout under the state dir (`<data_dir>/caches`):
//!
//! ```text
//! objects/sha256/ab/abcdef…          content-addressed store; promoted files are hard links to these
//! objects/tmp/                       objects being written
//! pr/<repo-escaped>/<n>/<cache>/     a PR's own layer, below the job's upper, above the mirror
//! jobs/<job>/<cache>/{upper,work,merged}
//! jobs/<job>/.promoting              journal of temp names, so a crash mid-harvest is undone
//! trash/                             PR layers being removed
//! .lock                              flock: harvests shared, gc and removals exclusive
//! ```
//!
//! Architecture invariants:
//! - A mirror is never written by a job: it reaches the job read-only, or as the lower
//!   layer of an overlay. Only [`CacheManager::harvest`] of a trusted build writes to it.
//! - Only regular files that did not exist in any lower layer are promoted; everything
//!   else in an upper layer (modifications, deletions, symlinks, devices…) is rejected
//!   and reported.
//! - Every promoted file appears in its destination by one `rename`: a crash leaves the
//!   old state or the complete new file, and a temp name that the next harvest or
//!   [`CacheManager::cleanup_job`] removes.
//! - All calls block (file I/O, mounts): async callers use `spawn_blocking`.

mod fsx;
mod harvest;
pub mod mounts;
mod store;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use serde::Deserialize;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use harvest::Failpoint;

/// Prefix of temp names in promotion destinations; job files with it are rejected, so
/// the only such names are ours.
pub const TMP_PREFIX: &str = ".slate-tmp-";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid cache spec: {0}")]
    Spec(String),
    #[error("invalid name {0:?}: use letters, digits, '.', '_' or '-', not starting with '.'")]
    Name(String),
    #[error("job {0} is already prepared")]
    AlreadyPrepared(String),
    #[error("an overlay of job {job} is still mounted at {}", mount.display())]
    StillMounted { job: String, mount: PathBuf },
    #[error("pr layer {} is in use by a mounted overlay", .0.display())]
    InUse(PathBuf),
    #[error("failpoint reached")]
    Failpoint,
}

pub type Result<T> = std::result::Result<T, CacheError>;

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}

/// How a cache reaches the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// The mirror itself, bind-mounted read-only by the provider.
    Ro,
    /// An overlay: (PR layer +) mirror below, a per-job writable layer on top.
    Overlay,
}

/// Which jobs' new files are promoted out of an overlay cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Promote {
    /// Nothing is ever promoted, not even into PR layers.
    Never,
    /// PR jobs into their PR layer; trusted builds into the mirror.
    Trusted,
}

/// One configured cache (a `[[cache]]` table of slate.toml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    pub name: String,
    /// Host mirror directory.
    pub source: PathBuf,
    /// Absolute path inside the worker.
    pub target: String,
    pub mode: CacheMode,
    pub promote: Promote,
}

/// The job the caches are prepared for or harvested from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCacheContext {
    /// `slate-<id>`.
    pub job_name: String,
    /// `owner/name`.
    pub repo: String,
    pub pr: Option<u64>,
    /// A push to a protected branch: may promote into the mirror.
    pub trusted: bool,
}

/// What the provider mounts at `target` inside the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedMount {
    pub cache: String,
    pub host_path: PathBuf,
    pub target: String,
    /// Bind read-only (`MS_BIND` then `MS_REMOUNT|MS_BIND|MS_RDONLY`, or `ro` in the OCI spec).
    pub read_only: bool,
}

/// A file the harvest promoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    pub cache: String,
    /// Relative to the cache root.
    pub path: PathBuf,
    pub bytes: u64,
}

/// An upper-layer entry the harvest did not promote, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub cache: String,
    /// Relative to the cache root.
    pub path: PathBuf,
    pub reason: RejectReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// A file of that name exists in a lower layer: a modification.
    ExistsInLower,
    /// The job put a directory where a lower layer has something else.
    ShadowsLower,
    Whiteout,
    OpaqueDir,
    RedirectDir,
    Metacopy,
    Symlink,
    Device,
    Fifo,
    Socket,
    Setuid,
    HardLink,
    UnsafeName,
    TooDeep,
    /// The destination path has a non-directory (e.g. a symlink) on the way.
    DestinationNotDir,
    /// Another harvest put a file there first; it is left alone.
    AlreadyPresent,
    Io(String),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::ExistsInLower => "modifies a file of a lower layer",
            Self::ShadowsLower => "replaces a lower-layer entry",
            Self::Whiteout => "deletion (whiteout)",
            Self::OpaqueDir => "opaque directory",
            Self::RedirectDir => "renamed directory",
            Self::Metacopy => "metadata-only copy-up",
            Self::Symlink => "symlink",
            Self::Device => "device node",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::Setuid => "setuid or setgid bit",
            Self::HardLink => "hard link",
            Self::UnsafeName => "unsafe file name",
            Self::TooDeep => "directory nesting too deep",
            Self::DestinationNotDir => "destination path has a non-directory",
            Self::AlreadyPresent => "already present in destination",
            Self::Io(e) => return write!(f, "i/o error: {e}"),
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HarvestReport {
    pub promoted: Vec<Promoted>,
    pub rejected: Vec<Rejected>,
}

/// Counters since the manager was made (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub promoted_files: u64,
    pub promoted_bytes: u64,
    pub rejected: u64,
    /// Promoted files whose content was already in the object store.
    pub dedup_hits: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub promoted_files: AtomicU64,
    pub promoted_bytes: AtomicU64,
    pub rejected: AtomicU64,
    pub dedup_hits: AtomicU64,
}

/// What [`CacheManager::gc_objects`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub files: u64,
    pub bytes: u64,
}

/// Owns the cache state dir: prepares caches for jobs and harvests them afterwards.
#[derive(Debug)]
pub struct CacheManager {
    state_dir: PathBuf,
    store: store::Store,
    counters: Counters,
}

impl CacheManager {
    /// Opens (creating) the state dir. Objects are fsynced before they become visible.
    pub fn new(state_dir: PathBuf) -> Result<Self> {
        for sub in ["jobs", "pr", "trash"] {
            let p = state_dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        // Resolved: mountinfo and overlay options show resolved paths.
        let state_dir = state_dir
            .canonicalize()
            .map_err(io_err("resolve", &state_dir))?;
        let objects = state_dir.join("objects");
        let store = store::Store::new(objects.clone(), true).map_err(io_err("create", &objects))?;
        Ok(Self {
            state_dir,
            store,
            counters: Counters::default(),
        })
    }

    /// Skips the per-object fsync (faster harvests; a power loss may then leave a
    /// truncated object behind a valid name). On by default.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.store.set_fsync(fsync);
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `jobs/<job>`.
    pub fn job_dir(&self, job_name: &str) -> Result<PathBuf> {
        check_name(job_name)?;
        Ok(self.state_dir.join("jobs").join(job_name))
    }

    /// `pr/<repo-escaped>/<number>/<cache>`.
    pub fn pr_layer(&self, repo: &str, pr: u64, cache: &str) -> Result<PathBuf> {
        check_name(cache)?;
        Ok(self.pr_dir(repo, pr).join(cache))
    }

    fn pr_dir(&self, repo: &str, pr: u64) -> PathBuf {
        self.state_dir
            .join("pr")
            .join(escape_repo(repo))
            .join(pr.to_string())
    }

    /// `objects/sha256/ab/abcdef…` for a hex digest.
    pub fn object_path(&self, sha256_hex: &str) -> PathBuf {
        self.store.object_path(sha256_hex)
    }

    /// Makes each cache ready for the job: what the provider must bind at each target.
    /// Overlays are mounted here; on error nothing of the job is left.
    pub fn prepare(
        &self,
        ctx: &JobCacheContext,
        specs: &[CacheSpec],
    ) -> Result<Vec<PreparedMount>> {
        check_specs(specs)?;
        let job_dir = self.job_dir(&ctx.job_name)?;
        match fs::symlink_metadata(&job_dir) {
            Ok(_) => return Err(CacheError::AlreadyPrepared(ctx.job_name.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", &job_dir)(e)),
        }
        fs::create_dir(&job_dir).map_err(io_err("create", &job_dir))?;
        let mut guard = JobGuard {
            mgr: self,
            job: &ctx.job_name,
            armed: true,
        };
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let mirror = spec
                .source
                .canonicalize()
                .map_err(io_err("resolve mirror", &spec.source))?;
            if !mirror.is_dir() {
                return Err(CacheError::Spec(format!(
                    "cache {}: mirror {} is not a directory",
                    spec.name,
                    mirror.display()
                )));
            }
            let host_path = match spec.mode {
                CacheMode::Ro => mirror,
                CacheMode::Overlay => self.mount_overlay(ctx, spec, &job_dir, mirror)?,
            };
            out.push(PreparedMount {
                cache: spec.name.clone(),
                host_path,
                target: spec.target.clone(),
                read_only: spec.mode == CacheMode::Ro,
            });
        }
        guard.armed = false;
        tracing::info!(job = %ctx.job_name, caches = out.len(), "caches prepared");
        Ok(out)
    }

    fn mount_overlay(
        &self,
        ctx: &JobCacheContext,
        spec: &CacheSpec,
        job_dir: &Path,
        mirror: PathBuf,
    ) -> Result<PathBuf> {
        let mut lowers = Vec::with_capacity(2);
        if let Some(pr) = ctx.pr {
            let layer = self.pr_layer(&ctx.repo, pr, &spec.name)?;
            // An empty lower adds nothing but a lookup on every miss.
            let non_empty = fs::read_dir(&layer)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if non_empty {
                lowers.push(layer);
                touch(&self.pr_dir(&ctx.repo, pr));
            }
        }
        lowers.push(mirror);
        let dir = job_dir.join(&spec.name);
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        mounts::mount_overlay(&lowers, &upper, &work, &merged)
            .map_err(io_err("mount overlay", &merged))?;
        tracing::debug!(job = %ctx.job_name, cache = %spec.name, layers = lowers.len(), "overlay mounted");
        Ok(merged)
    }

    /// After the job's worker is destroyed: unmounts, promotes the new files of overlay
    /// caches, and removes the job's cache dirs.
    pub fn harvest(&self, ctx: &JobCacheContext, specs: &[CacheSpec]) -> Result<HarvestReport> {
        self.harvest_with_failpoint(ctx, specs, Failpoint::None)
    }

    /// [`CacheManager::harvest`] that can stop as a crash would, for tests.
    #[doc(hidden)]
    pub fn harvest_with_failpoint(
        &self,
        ctx: &JobCacheContext,
        specs: &[CacheSpec],
        failpoint: Failpoint,
    ) -> Result<HarvestReport> {
        check_specs(specs)?;
        let job_dir = self.job_dir(&ctx.job_name)?;
        let _lock = self.lock(false)?;
        self.release_job(&ctx.job_name, &job_dir)?;
        if !job_dir.exists() {
            // Already harvested or cleaned: nothing to promote.
            return Ok(HarvestReport::default());
        }
        let mut h = harvest::Harvest::new(self, &job_dir, failpoint)?;
        for spec in specs.iter().filter(|s| s.mode == CacheMode::Overlay) {
            let Some(dest) = self.destination(ctx, spec)? else {
                continue;
            };
            let upper = job_dir.join(&spec.name).join("upper");
            if !upper.is_dir() {
                continue;
            }
            let mut lowers = Vec::with_capacity(2);
            if let Some(pr) = ctx.pr {
                lowers.push(self.pr_layer(&ctx.repo, pr, &spec.name)?);
            }
            lowers.push(spec.source.clone());
            h.cache(&spec.name, &upper, &lowers, &dest)?;
        }
        let report = h.finish()?;
        if let Some(pr) = ctx.pr {
            touch(&self.pr_dir(&ctx.repo, pr));
        }
        mounts::remove_tree(&job_dir).map_err(io_err("remove", &job_dir))?;
        let c = &self.counters;
        c.rejected
            .fetch_add(report.rejected.len() as u64, Ordering::Relaxed);
        tracing::info!(
            job = %ctx.job_name,
            promoted = report.promoted.len(),
            rejected = report.rejected.len(),
            "caches harvested"
        );
        Ok(report)
    }

    /// Where the new files of `spec` go for this job, if anywhere (created if missing).
    fn destination(&self, ctx: &JobCacheContext, spec: &CacheSpec) -> Result<Option<PathBuf>> {
        if spec.promote == Promote::Never {
            return Ok(None);
        }
        let dest = match (ctx.pr, ctx.trusted) {
            (Some(pr), _) => {
                let layer = self.pr_layer(&ctx.repo, pr, &spec.name)?;
                fs::create_dir_all(&layer).map_err(io_err("create", &layer))?;
                layer
            }
            (None, true) => spec.source.clone(),
            (None, false) => return Ok(None),
        };
        Ok(Some(dest))
    }

    /// Unmounts the job's overlays and undoes an interrupted promotion; refuses while an
    /// overlay of the job is still mounted elsewhere (its upper could still change).
    fn release_job(&self, job: &str, job_dir: &Path) -> Result<()> {
        mounts::unmount_all_under(job_dir).map_err(io_err("unmount", job_dir))?;
        if let Some(mount) = mounts::overlays_using(job_dir).into_iter().next() {
            return Err(CacheError::StillMounted {
                job: job.to_string(),
                mount,
            });
        }
        harvest::undo_journal(job_dir)
    }

    /// Unmounts and removes everything of the job, promoting nothing; succeeds if it is
    /// already gone. For crash recovery: call it for each of [`CacheManager::list_jobs`]
    /// that has no live worker, after the provider destroyed the worker.
    pub fn cleanup_job(&self, job_name: &str) -> Result<()> {
        let job_dir = self.job_dir(job_name)?;
        self.release_job(job_name, &job_dir)?;
        mounts::remove_tree(&job_dir).map_err(io_err("remove", &job_dir))?;
        tracing::debug!(job = %job_name, "job caches cleaned up");
        Ok(())
    }

    /// Jobs that have cache dirs (prepared and not yet harvested or cleaned up).
    pub fn list_jobs(&self) -> Result<Vec<String>> {
        let dir = self.state_dir.join("jobs");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let e = e.map_err(io_err("list", &dir))?;
            if let Some(name) = e.file_name().to_str() {
                if check_name(name).is_ok() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a PR's layers (the PR closed). Fails with [`CacheError::InUse`] while a
    /// job of the PR has them mounted: call it after that job's harvest.
    pub fn remove_pr(&self, repo: &str, pr: u64) -> Result<()> {
        let _lock = self.lock(true)?;
        self.remove_pr_dir(&self.pr_dir(repo, pr))?;
        let repo_dir = self.state_dir.join("pr").join(escape_repo(repo));
        // Only succeeds when empty, which is the point.
        let _ = fs::remove_dir(&repo_dir);
        Ok(())
    }

    fn remove_pr_dir(&self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        if let Some(_m) = mounts::overlays_using(dir).into_iter().next() {
            return Err(CacheError::InUse(dir.to_path_buf()));
        }
        // Renamed away first so no job ever mounts a half-removed layer.
        let trash = self.state_dir.join("trash").join(store::tmp_name("pr-"));
        fs::rename(dir, &trash).map_err(io_err("move to trash", dir))?;
        mounts::remove_tree(&trash).map_err(io_err("remove", &trash))?;
        tracing::info!(layer = %dir.display(), "pr layer removed");
        Ok(())
    }

    /// Removes PR layers not used (prepared or harvested) for `older_than`; layers in use
    /// are skipped. Returns the `(repo, pr)` removed.
    pub fn expire_pr_layers(&self, older_than: Duration) -> Result<Vec<(String, u64)>> {
        let _lock = self.lock(true)?;
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let root = self.state_dir.join("pr");
        let mut removed = Vec::new();
        for repo in fs::read_dir(&root).map_err(io_err("list", &root))? {
            let repo = repo.map_err(io_err("list", &root))?;
            let repo_path = repo.path();
            let Some(repo_name) = repo.file_name().to_str().and_then(unescape_repo) else {
                continue;
            };
            for pr in fs::read_dir(&repo_path).map_err(io_err("list", &repo_path))? {
                let pr = pr.map_err(io_err("list", &repo_path))?;
                let Some(number) = pr.file_name().to_str().and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                let path = pr.path();
                let mtime = fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .map_err(io_err("stat", &path))?;
                if mtime >= cutoff {
                    continue;
                }
                match self.remove_pr_dir(&path) {
                    Ok(()) => removed.push((repo_name.clone(), number)),
                    Err(CacheError::InUse(p)) => {
                        tracing::debug!(layer = %p.display(), "pr layer in use, not expired");
                    }
                    Err(e) => return Err(e),
                }
            }
            let _ = fs::remove_dir(&repo_path);
        }
        Ok(removed)
    }

    /// Removes objects no layer or mirror links to any more (link count 1), leftovers of
    /// interrupted ingests, and the trash.
    pub fn gc_objects(&self) -> Result<GcReport> {
        let _lock = self.lock(true)?;
        let (files, bytes) = self
            .store
            .gc()
            .map_err(io_err("collect objects in", self.store.root()))?;
        let trash = self.state_dir.join("trash");
        for e in fs::read_dir(&trash).map_err(io_err("list", &trash))? {
            let p = e.map_err(io_err("list", &trash))?.path();
            mounts::remove_tree(&p).map_err(io_err("remove", &p))?;
        }
        tracing::info!(files, bytes, "objects collected");
        Ok(GcReport { files, bytes })
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            promoted_files: c.promoted_files.load(Ordering::Relaxed),
            promoted_bytes: c.promoted_bytes.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            dedup_hits: c.dedup_hits.load(Ordering::Relaxed),
        }
    }

    /// A `flock` on `.lock`: shared for harvests (which link objects), exclusive for
    /// removals (so no object is collected between its ingest and its link).
    fn lock(&self, exclusive: bool) -> Result<File> {
        let path = self.state_dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return Ok(f);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("lock", &path)(e));
            }
        }
    }

    pub(crate) fn store(&self) -> &store::Store {
        &self.store
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Removes a half-prepared job on early return.
struct JobGuard<'a> {
    mgr: &'a CacheManager,
    job: &'a str,
    armed: bool,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.mgr.cleanup_job(self.job) {
                tracing::error!(job = %self.job, error = %e, "cleanup of half-prepared job failed");
            }
        }
    }
}

/// Marks a PR layer as used now (its age is what expiry looks at).
fn touch(path: &Path) {
    let now = TimeSpec::UTIME_NOW;
    if let Err(e) = utimensat(None, path, &now, &now, UtimensatFlags::NoFollowSymlink) {
        if e != nix::errno::Errno::ENOENT {
            tracing::warn!(path = %path.display(), error = %e, "could not touch pr layer");
        }
    }
}

/// Job and cache names become path components and overlay options.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CacheError::Name(name.to_string()))
    }
}

fn check_specs(specs: &[CacheSpec]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        check_name(&s.name)?;
        if !seen.insert(&s.name) {
            return Err(CacheError::Spec(format!("duplicate cache name {}", s.name)));
        }
        let t = Path::new(&s.target);
        if !t.is_absolute()
            || t.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(CacheError::Spec(format!(
                "cache {}: target {:?} must be absolute without '..'",
                s.name, s.target
            )));
        }
    }
    Ok(())
}

/// `owner/name` as one path component that overlay options accept: bytes other than
/// `[A-Za-z0-9_-]` (and `.` not in first place) become `%XX`.
pub fn escape_repo(repo: &str) -> String {
    let mut out = String::with_capacity(repo.len() + 4);
    for (i, b) in repo.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of [`escape_repo`].
pub fn unescape_repo(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_escaping_round_trips_and_is_one_component() {
        for repo in ["macports/macports-ports", "a.b/c", "../x", "we:ird,one\\"] {
            let e = escape_repo(repo);
            assert!(!e.contains(['/', ':', ',', '\\']), "{e}");
            assert!(!e.starts_with('.'));
            assert_eq!(unescape_repo(&e).as_deref(), Some(repo));
        }
        assert_eq!(escape_repo("macports/ports"), "macports%2Fports");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("slate-42").is_ok());
        assert!(check_name("distfiles").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a:b", "a,b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reject_reasons_read_as_lowercase() {
        assert_eq!(RejectReason::Whiteout.to_string(), "deletion (whiteout)");
        assert_eq!(RejectReason::Io("x".into()).to_string(), "i/o error: x");
    }
}
