//! Descriptor-relative file operations that never follow a symlink below a root.
//!
//! Every walk of a job's upper layer, a lower layer or a promotion destination goes one
//! component at a time through these, so a symlink planted anywhere is seen, not followed.

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, mkdirat, FileStat, Mode};
use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

pub(crate) const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens a root directory by path (the root itself may be reached through symlinks: it
/// is configured by the operator or built by us).
pub(crate) fn open_root(path: &Path) -> nix::Result<OwnedFd> {
    openat(
        None,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// Opens the directory `name` in `dir`; fails with `ELOOP`/`ENOTDIR` on a symlink.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(Some(dir.as_raw_fd()), name, DIR_FLAGS, Mode::empty()).map(owned)
}

/// Opens the file `name` in `dir` for reading without following a symlink and without
/// blocking on a fifo.
pub(crate) fn open_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
}

/// Creates (exclusively) the file `name` in `dir` for writing.
pub(crate) fn create_file_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> nix::Result<OwnedFd> {
    openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map(owned)
}

/// `lstat` of `name` in `dir`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<FileStat> {
    fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// Names in `dir`, without `.` and `..`.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    let mut d = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

/// Whether the open file or directory carries the extended attribute `name`.
pub(crate) fn has_xattr(fd: BorrowedFd<'_>, name: &CStr) -> bool {
    // SAFETY: a size query (null buffer, size 0) writes nothing.
    let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) };
    n >= 0
}

/// Why a destination directory could not be opened.
#[derive(Debug)]
pub(crate) enum DestError {
    /// A component exists but is not a plain directory (a symlink, a file).
    NotDir,
    Io(Errno),
}

/// Opens (creating as needed, mode 0755) `rel` under `root`, one component at a time,
/// refusing any component that is a symlink or not a directory.
pub(crate) fn open_dest_dir(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, DestError> {
    let mut cur = nix::unistd::dup(root.as_raw_fd())
        .map(owned)
        .map_err(DestError::Io)?;
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(DestError::NotDir);
        };
        let next = match open_dir_at(std::os::fd::AsFd::as_fd(&cur), name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(DestError::Io(e)),
                }
                open_dir_at(std::os::fd::AsFd::as_fd(&cur), name).map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => DestError::NotDir,
                    e => DestError::Io(e),
                })?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(DestError::NotDir),
            Err(e) => return Err(DestError::Io(e)),
        };
        cur = next;
    }
    Ok(cur)
}

pub(crate) fn file_type(st: &FileStat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn dest_dir_refuses_symlinked_components() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        let fd = open_root(root.path()).unwrap();
        assert!(matches!(
            open_dest_dir(fd.as_fd(), Path::new("evil/sub")),
            Err(DestError::NotDir)
        ));
        assert!(matches!(
            open_dest_dir(fd.as_fd(), Path::new("../x")),
            Err(DestError::NotDir)
        ));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        open_dest_dir(fd.as_fd(), Path::new("a/b/c")).unwrap();
        assert!(root.path().join("a/b/c").is_dir());
    }
}
