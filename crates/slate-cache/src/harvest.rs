//! The harvest: walk a job's upper layer without following anything, and promote the
//! regular files it added into their destination through the object store.

use crate::fsx::{self, DestError};
use crate::store::{self, OBJECT_MODE};
use crate::{
    io_err, CacheError, CacheManager, HarvestReport, Promoted, RejectReason, Rejected, Result,
    TMP_PREFIX,
};
use nix::errno::Errno;
use nix::fcntl::{renameat2, AtFlags, RenameFlags};
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Deeper upper trees are refused rather than walked (each level holds descriptors).
const MAX_DEPTH: usize = 64;
const JOURNAL: &str = ".promoting";

const XATTR_OPAQUE: &std::ffi::CStr = c"trusted.overlay.opaque";
const XATTR_REDIRECT: &std::ffi::CStr = c"trusted.overlay.redirect";
const XATTR_METACOPY: &std::ffi::CStr = c"trusted.overlay.metacopy";

/// Where a test makes the harvest stop as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    None,
    /// Stop right after the `n`-th (from 1) temp file is complete in its destination
    /// directory, before its rename.
    AfterTempFile(usize),
}

/// One harvest of one job, across its caches.
pub(crate) struct Harvest<'a> {
    mgr: &'a CacheManager,
    journal_path: PathBuf,
    journal: Option<File>,
    failpoint: Failpoint,
    temps: usize,
    report: HarvestReport,
}

/// Per-cache walk state.
struct Walk<'h, 'a> {
    h: &'h mut Harvest<'a>,
    cache: &'h str,
    dest_root: OwnedFd,
    dest_root_path: &'h Path,
    /// The last destination dir opened: files of one dir are promoted in a row.
    dest_cached: Option<(PathBuf, OwnedFd)>,
}

impl<'a> Harvest<'a> {
    pub fn new(mgr: &'a CacheManager, job_dir: &Path, failpoint: Failpoint) -> Result<Self> {
        Ok(Self {
            mgr,
            journal_path: job_dir.join(JOURNAL),
            journal: None,
            failpoint,
            temps: 0,
            report: HarvestReport::default(),
        })
    }

    /// Promotes the new files of one cache's `upper` (lowers top first) into `dest`.
    pub fn cache(
        &mut self,
        cache: &str,
        upper: &Path,
        lowers: &[PathBuf],
        dest: &Path,
    ) -> Result<()> {
        let upper_fd = fsx::open_root(upper).map_err(|e| io_err("open", upper)(e.into()))?;
        let dest_root = fsx::open_root(dest).map_err(|e| io_err("open", dest)(e.into()))?;
        let lower_fds: Vec<Option<OwnedFd>> = lowers
            .iter()
            .map(|l| match fsx::open_root(l) {
                Ok(fd) => Ok(Some(fd)),
                Err(Errno::ENOENT) => Ok(None),
                Err(e) => Err(io_err("open", l)(e.into())),
            })
            .collect::<Result<_>>()?;
        let mut walk = Walk {
            h: self,
            cache,
            dest_root,
            dest_root_path: dest,
            dest_cached: None,
        };
        walk.dir(upper_fd.as_fd(), &lower_fds, Path::new(""), 0)
    }

    pub fn finish(mut self) -> Result<HarvestReport> {
        self.journal = None;
        match fs::remove_file(&self.journal_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &self.journal_path)(e)),
        }
        Ok(self.report)
    }

    /// Records a temp path before it is created, so a crash leaves it findable.
    fn journal(&mut self, tmp: &Path) -> Result<()> {
        if self.journal.is_none() {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.journal_path)
                .map_err(io_err("open", &self.journal_path))?;
            self.journal = Some(f);
        }
        let f = self.journal.as_mut().expect("journal opened above");
        // NUL-separated: paths are bytes, and only a NUL cannot be in one.
        let mut rec = tmp.as_os_str().as_bytes().to_vec();
        rec.push(0);
        f.write_all(&rec)
            .map_err(io_err("write", &self.journal_path))
    }
}

/// Removes the temp files an interrupted harvest left, as listed in its journal.
pub(crate) fn undo_journal(job_dir: &Path) -> Result<()> {
    let path = job_dir.join(JOURNAL);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    for rec in data.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let tmp = Path::new(OsStr::from_bytes(rec));
        // Only our temp names: a corrupt journal must not delete anything else.
        let ours = tmp
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(TMP_PREFIX.as_bytes()));
        if !ours {
            continue;
        }
        match fs::remove_file(tmp) {
            Ok(()) => {
                tracing::info!(path = %tmp.display(), "removed temp of an interrupted promotion")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", tmp)(e)),
        }
    }
    fs::remove_file(&path).map_err(io_err("remove", &path))
}

/// Names that are promoted: printable UTF-8 without control bytes, not ours.
fn name_is_safe(name: &OsStr) -> bool {
    let Some(s) = name.to_str() else {
        return false;
    };
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with(TMP_PREFIX)
        && !s.chars().any(|c| c.is_control() || c == '\u{fffd}')
}

impl Walk<'_, '_> {
    fn reject(&mut self, path: PathBuf, reason: RejectReason) {
        tracing::debug!(cache = %self.cache, path = %path.display(), %reason, "not promoted");
        self.h.report.rejected.push(Rejected {
            cache: self.cache.to_string(),
            path,
            reason,
        });
    }

    fn dir(
        &mut self,
        upper: BorrowedFd<'_>,
        lowers: &[Option<OwnedFd>],
        rel: &Path,
        depth: usize,
    ) -> Result<()> {
        let mut names = match fsx::list_dir(upper) {
            Ok(n) => n,
            Err(e) => {
                self.reject(rel.to_path_buf(), RejectReason::Io(e.to_string()));
                return Ok(());
            }
        };
        names.sort();
        for name in names {
            let path = rel.join(&name);
            if !name_is_safe(&name) {
                self.reject(path, RejectReason::UnsafeName);
                continue;
            }
            let st = match fsx::stat_at(upper, &name) {
                Ok(st) => st,
                Err(e) => {
                    self.reject(path, RejectReason::Io(e.to_string()));
                    continue;
                }
            };
            let reason = match fsx::file_type(&st) {
                libc::S_IFDIR => {
                    self.subdir(upper, lowers, &name, path, depth)?;
                    continue;
                }
                libc::S_IFREG => {
                    self.file(upper, lowers, &name, path, &st)?;
                    continue;
                }
                libc::S_IFLNK => RejectReason::Symlink,
                libc::S_IFCHR if st.st_rdev == 0 => RejectReason::Whiteout,
                libc::S_IFIFO => RejectReason::Fifo,
                libc::S_IFSOCK => RejectReason::Socket,
                _ => RejectReason::Device,
            };
            self.reject(path, reason);
        }
        Ok(())
    }

    fn subdir(
        &mut self,
        upper: BorrowedFd<'_>,
        lowers: &[Option<OwnedFd>],
        name: &OsStr,
        path: PathBuf,
        depth: usize,
    ) -> Result<()> {
        if depth >= MAX_DEPTH {
            self.reject(path, RejectReason::TooDeep);
            return Ok(());
        }
        let fd = match fsx::open_dir_at(upper, name) {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                self.reject(path, RejectReason::Symlink);
                return Ok(());
            }
            Err(e) => {
                self.reject(path, RejectReason::Io(e.to_string()));
                return Ok(());
            }
        };
        // Opaque: the job deleted a lower dir and made a new one; promoting its content
        // would mix a deletion into the layer below. Redirect: a renamed lower dir.
        if fsx::has_xattr(fd.as_fd(), XATTR_OPAQUE) {
            self.reject(path, RejectReason::OpaqueDir);
            return Ok(());
        }
        if fsx::has_xattr(fd.as_fd(), XATTR_REDIRECT) {
            self.reject(path, RejectReason::RedirectDir);
            return Ok(());
        }
        let mut child_lowers = Vec::with_capacity(lowers.len());
        for lower in lowers {
            let Some(lower) = lower else {
                child_lowers.push(None);
                continue;
            };
            match fsx::stat_at(lower.as_fd(), name) {
                Ok(st) if fsx::file_type(&st) == libc::S_IFDIR => {
                    match fsx::open_dir_at(lower.as_fd(), name) {
                        Ok(l) => child_lowers.push(Some(l)),
                        Err(e) => {
                            self.reject(path, RejectReason::Io(e.to_string()));
                            return Ok(());
                        }
                    }
                }
                Ok(_) => {
                    self.reject(path, RejectReason::ShadowsLower);
                    return Ok(());
                }
                Err(Errno::ENOENT) => child_lowers.push(None),
                Err(e) => {
                    self.reject(path, RejectReason::Io(e.to_string()));
                    return Ok(());
                }
            }
        }
        self.dir(fd.as_fd(), &child_lowers, &path, depth + 1)
    }

    fn file(
        &mut self,
        upper: BorrowedFd<'_>,
        lowers: &[Option<OwnedFd>],
        name: &OsStr,
        path: PathBuf,
        st: &nix::sys::stat::FileStat,
    ) -> Result<()> {
        if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            self.reject(path, RejectReason::Setuid);
            return Ok(());
        }
        // A second name for one inode: to a host file, or to anything the job could not
        // write; an honest download never makes one.
        if st.st_nlink > 1 {
            self.reject(path, RejectReason::HardLink);
            return Ok(());
        }
        for lower in lowers.iter().flatten() {
            match fsx::stat_at(lower.as_fd(), name) {
                Ok(_) => {
                    self.reject(path, RejectReason::ExistsInLower);
                    return Ok(());
                }
                Err(Errno::ENOENT) => {}
                Err(e) => {
                    self.reject(path, RejectReason::Io(e.to_string()));
                    return Ok(());
                }
            }
        }
        let fd = match fsx::open_file_at(upper, name) {
            Ok(fd) => fd,
            Err(e) => {
                self.reject(path, RejectReason::Io(e.to_string()));
                return Ok(());
            }
        };
        // The entry checked above must be the one opened.
        match nix::sys::stat::fstat(fd.as_raw_fd()) {
            Ok(now)
                if now.st_ino == st.st_ino
                    && now.st_dev == st.st_dev
                    && fsx::file_type(&now) == libc::S_IFREG
                    && now.st_nlink == 1 => {}
            Ok(_) => {
                self.reject(path, RejectReason::Io("file changed during harvest".into()));
                return Ok(());
            }
            Err(e) => {
                self.reject(path, RejectReason::Io(e.to_string()));
                return Ok(());
            }
        }
        if fsx::has_xattr(fd.as_fd(), XATTR_METACOPY) {
            self.reject(path, RejectReason::Metacopy);
            return Ok(());
        }
        let rel_dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let dest = match self.dest_dir(&rel_dir) {
            Ok(d) => d,
            Err(DestError::NotDir) => {
                self.reject(path, RejectReason::DestinationNotDir);
                return Ok(());
            }
            Err(DestError::Io(e)) => {
                self.reject(path, RejectReason::Io(e.to_string()));
                return Ok(());
            }
        };
        let obj = match self.h.mgr.store().ingest(File::from(fd)) {
            Ok(o) => o,
            Err(e) => {
                self.reject(path, RejectReason::Io(e.to_string()));
                return Ok(());
            }
        };
        let counters = self.h.mgr.counters();
        if obj.dedup {
            counters.dedup_hits.fetch_add(1, Ordering::Relaxed);
        }
        let dest_dir_path = self.dest_root_path.join(&rel_dir);
        match self.place(dest.as_fd(), &dest_dir_path, name, &obj.path)? {
            None => {
                counters.promoted_files.fetch_add(1, Ordering::Relaxed);
                counters
                    .promoted_bytes
                    .fetch_add(obj.size, Ordering::Relaxed);
                self.h.report.promoted.push(Promoted {
                    cache: self.cache.to_string(),
                    path,
                    bytes: obj.size,
                });
            }
            Some(reason) => self.reject(path, reason),
        }
        Ok(())
    }

    fn dest_dir(&mut self, rel_dir: &Path) -> std::result::Result<OwnedFd, DestError> {
        if let Some((p, fd)) = &self.dest_cached {
            if p == rel_dir {
                return fd
                    .try_clone()
                    .map_err(|e| DestError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0))));
            }
        }
        let fd = fsx::open_dest_dir(self.dest_root.as_fd(), rel_dir)?;
        let copy = fd
            .try_clone()
            .map_err(|e| DestError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        self.dest_cached = Some((rel_dir.to_path_buf(), fd));
        Ok(copy)
    }

    /// Makes `name` in `dir` the object: hard link (or, across filesystems, a copy) to a
    /// journaled temp name, then a rename that never replaces. `Some(reason)` if not placed.
    fn place(
        &mut self,
        dir: BorrowedFd<'_>,
        dir_path: &Path,
        name: &OsStr,
        object: &Path,
    ) -> Result<Option<RejectReason>> {
        let tmp = OsString::from(store::tmp_name(TMP_PREFIX));
        self.h.journal(&dir_path.join(&tmp))?;
        match linkat(
            None,
            object,
            Some(dir.as_raw_fd()),
            Path::new(&tmp),
            AtFlags::empty(),
        ) {
            Ok(()) => {}
            // The mirror is on another filesystem: it gets a copy, not a link.
            Err(Errno::EXDEV) => {
                if let Err(e) = copy_to(dir, &tmp, object) {
                    let _ = unlinkat(
                        Some(dir.as_raw_fd()),
                        tmp.as_os_str(),
                        UnlinkatFlags::NoRemoveDir,
                    );
                    return Ok(Some(RejectReason::Io(e.to_string())));
                }
            }
            Err(e) => return Ok(Some(RejectReason::Io(e.to_string()))),
        }
        self.h.temps += 1;
        if self.h.failpoint == Failpoint::AfterTempFile(self.h.temps) {
            return Err(CacheError::Failpoint);
        }
        let result = renameat2(
            Some(dir.as_raw_fd()),
            tmp.as_os_str(),
            Some(dir.as_raw_fd()),
            name,
            RenameFlags::RENAME_NOREPLACE,
        );
        if result.is_err() {
            let _ = unlinkat(
                Some(dir.as_raw_fd()),
                tmp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
        Ok(match result {
            Ok(()) => None,
            Err(Errno::EEXIST) => Some(RejectReason::AlreadyPresent),
            Err(e) => Some(RejectReason::Io(e.to_string())),
        })
    }
}

fn copy_to(dir: BorrowedFd<'_>, tmp: &OsStr, object: &Path) -> io::Result<()> {
    let mut src = File::open(object)?;
    let mut out = File::from(fsx::create_file_at(dir, tmp, OBJECT_MODE).map_err(io::Error::from)?);
    io::copy(&mut src, &mut out)?;
    out.set_permissions(fs::Permissions::from_mode(OBJECT_MODE))?;
    out.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_names_are_unsafe() {
        for bad in ["a\nb", "a\tb", "\u{7f}", ".slate-tmp-1", "..", ""] {
            assert!(!name_is_safe(OsStr::new(bad)), "{bad:?}");
        }
        assert!(!name_is_safe(OsStr::from_bytes(b"\xff")));
        assert!(name_is_safe(OsStr::new("curl-8.5.0.tar.xz")));
        assert!(name_is_safe(OsStr::new("名前 with space")));
    }
}
