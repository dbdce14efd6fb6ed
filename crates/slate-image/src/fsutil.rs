//! Filesystem helpers: mounts under a path, safe tree removal, copies, sizes, locks.

use crate::ImageError;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Mount points at or under `path` in this process's mount namespace, deepest first.
pub(crate) fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(&path))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detach every mount under `path` (a crashed build from elsewhere may have left some).
pub(crate) fn unmount_under(path: &Path) {
    for m in mounts_under(path) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), error = %e, "cannot unmount");
        } else {
            tracing::info!(mount = %m.display(), "unmounted a leftover mount");
        }
    }
}

/// Remove a tree, first unmounting anything under it: deleting through a leftover bind
/// mount of /dev or /sys would delete the host's files.
pub(crate) fn remove_tree(path: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    unmount_under(path);
    let left = mounts_under(path);
    if !left.is_empty() {
        return Err(ImageError::Mounted {
            path: path.to_path_buf(),
            mounts: left
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Io {
            what: format!("removing {}", path.display()),
            error: e,
        }),
    }
}

/// A real copy of a tree (`cp -a --reflink=auto`): a clone on btrfs/XFS, a full copy on
/// ext4. Never hardlinks: the copy is written by later stages and must not change the source.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(src)
        .arg(dst)
        .output()
        .map_err(ImageError::io("running cp"))?;
    if !out.status.success() {
        return Err(ImageError::Other(format!(
            "cp -a {} {} failed: {}",
            src.display(),
            dst.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Disk usage of a tree (allocated blocks, each inode counted once), like `du -s`.
pub(crate) fn tree_size(path: &Path) -> u64 {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>, total: &mut u64) {
        let Ok(meta) = fs::symlink_metadata(p) else {
            return;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            *total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(p) {
                for e in entries.flatten() {
                    walk(&e.path(), seen, total);
                }
            }
        }
    }
    let mut total = 0;
    walk(path, &mut HashSet::new(), &mut total);
    total
}

/// The host path of `inner` (absolute, inside the image) with symlinks in its parent
/// directories resolved inside `root`, so an absolute link in the image never leads out.
/// The last component is not followed: the caller replaces whatever is there.
pub(crate) fn path_in_root(root: &Path, inner: &Path) -> Result<PathBuf, ImageError> {
    let mut parts: Vec<PathBuf> = inner
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(PathBuf::from(s)),
            _ => None,
        })
        .collect();
    let Some(last) = parts.pop() else {
        return Err(ImageError::Other(format!(
            "{} names the image's root",
            inner.display()
        )));
    };
    let mut cur = PathBuf::new(); // relative to root
    let mut queue: std::collections::VecDeque<PathBuf> = parts.into();
    let mut hops = 0;
    while let Some(part) = queue.pop_front() {
        if part.as_os_str().as_bytes() == b".." {
            cur.pop();
            continue;
        }
        let candidate = cur.join(&part);
        let host = root.join(&candidate);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(ImageError::Other(format!(
                        "too many symlinks resolving {} in the image",
                        inner.display()
                    )));
                }
                let target = fs::read_link(&host)
                    .map_err(ImageError::io(format!("reading link {}", host.display())))?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut next: Vec<PathBuf> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(PathBuf::from(s)),
                        Component::ParentDir => Some(PathBuf::from("..")),
                        _ => None,
                    })
                    .collect();
                next.extend(queue.drain(..));
                queue = next.into();
            }
            _ => cur = candidate,
        }
    }
    Ok(root.join(cur).join(last))
}

/// An exclusive `flock` held until dropped; released by the kernel if the process dies,
/// which is what lets the next build tell a dead build's temp dir from a running one.
pub(crate) struct Lock {
    _file: File,
}

impl Lock {
    /// `Ok(None)` when someone else holds it.
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<Lock>, ImageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(ImageError::io(format!("opening lock {}", path.display())))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(Lock { _file: file }))
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(ImageError::Io {
                    what: format!("locking {}", path.display()),
                    error: e,
                })
            }
        }
    }

    /// Wait for the lock.
    pub(crate) fn acquire(path: &Path) -> Result<Lock, ImageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(ImageError::io(format!("opening lock {}", path.display())))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(ImageError::Io {
                what: format!("locking {}", path.display()),
                error: std::io::Error::last_os_error(),
            });
        }
        Ok(Lock { _file: file })
    }
}

/// Rename without replacing: a version directory, once there, is never overwritten.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ImageError> {
    nix::fcntl::renameat2(
        None,
        from,
        None,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| ImageError::Io {
        what: format!("renaming {} to {}", from.display(), to.display()),
        error: e.into(),
    })
}

/// fsync a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }

    #[test]
    fn absolute_links_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("hostetc")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("usr/bin/up")).unwrap();
        assert_eq!(
            path_in_root(root, Path::new("/bin/x")).unwrap(),
            root.join("usr/bin/x")
        );
        assert_eq!(
            path_in_root(root, Path::new("/hostetc/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        // `..` never climbs above the image's root.
        assert_eq!(
            path_in_root(root, Path::new("/bin/up/etc/shadow")).unwrap(),
            root.join("etc/shadow")
        );
    }
}
