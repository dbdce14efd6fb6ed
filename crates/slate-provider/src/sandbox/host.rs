//! Host-side side effects of the sandbox: overlay mounts, per-job disks, mountinfo, cgroup cleanup, process scans, safe removal.

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup hierarchies are mounted (v1 controllers, or the v2 root).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Mounts an overlay of `lower` (read-only) and `upper`/`work` (writable) at `merged`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> io::Result<()> {
    for p in [lower, upper, work] {
        check_overlay_path(p)?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(io::Error::from)
}

/// Makes `image` a sparse file of `bytes`, formats it ext4 and loop-mounts it at
/// `mount_point` (nosuid, nodev): the job's writable layers live there, so a job that
/// fills them gets ENOSPC and the host's free space shrinks by at most `bytes`.
///
/// The loop device is attached with autoclear (`mount -o loop`), so unmounting detaches
/// it; [`detach_loops_under`] catches one left attached by a crash in between.
pub fn mount_disk(image: &Path, bytes: u64, mount_point: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)?;
    f.set_len(bytes)?;
    drop(f);
    // No journal, lazy tables: formatting takes milliseconds and writes a few MiB at most;
    // the disk lives only as long as the job, so a journal buys nothing.
    run_tool(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
            .arg(image),
        "mkfs.ext4",
    )?;
    run_tool(
        std::process::Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
            .arg(image)
            .arg(mount_point),
        "mount -o loop",
    )
}

fn run_tool(cmd: &mut std::process::Command, what: &str) -> io::Result<()> {
    let out = cmd.stdin(std::process::Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Loop devices whose backing file is at or under `dir` (from sysfs), as `/dev/loopN`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|b| Path::new(b.trim_end_matches('\n')).starts_with(dir))
                .unwrap_or(false)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// Detaches the loop devices backed by files under `dir` (after its mounts are gone, an
/// attached one is a leftover: e.g. the server died between attaching and mounting).
pub fn detach_loops_under(dir: &Path) -> io::Result<()> {
    /// `LOOP_CLR_FD` from linux/loop.h.
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    for dev in loops_under(dir) {
        let f = match fs::File::open(&dev) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        use std::os::fd::AsRawFd;
        // SAFETY: an ioctl without argument on a descriptor we own.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // ENXIO: detached meanwhile.
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(io::Error::other(format!("detach {}: {e}", dev.display())));
            }
        }
        tracing::warn!(device = %dev.display(), dir = %dir.display(), "detached a leftover loop device");
    }
    // Autoclear runs down the device after the last close in a kernel work item, so it can
    // still be listed a moment after the unmount: wait, so that `destroy` returning means
    // no loop device is left (bounded; a stuck one stays for the next destroy or recovery).
    let deadline = Instant::now() + Duration::from_secs(2);
    while !loops_under(dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Overlay options are split on `,` and lower dirs on `:`; a path holding either (or the
/// escape `\`) would be misparsed, so it is refused rather than escaped.
fn check_overlay_path(p: &Path) -> io::Result<()> {
    let s = p.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path is not utf-8: {}", p.display()),
        )
    })?;
    if s.contains([',', ':', '\\']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("overlay path may not contain ',', ':' or '\\': {s}"),
        ));
    }
    Ok(())
}

/// Mount points at or under `dir` in this process's mount namespace, in mountinfo order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Unmounts everything at or under `dir`, deepest first; a busy mount is detached.
pub fn unmount_all_under(dir: &Path) -> io::Result<()> {
    // Bounded: each round removes one mount; stacked mounts on one path take several.
    for _ in 0..64 {
        let mounts = mounts_under(dir);
        // Deepest path first; among equal depth the last mounted (on top) first.
        let Some(target) = mounts
            .iter()
            .enumerate()
            .max_by_key(|(i, p)| (p.components().count(), *i))
            .map(|(_, p)| p.clone())
        else {
            return Ok(());
        };
        match umount2(&target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(Errno::EBUSY) => {
                tracing::warn!(mount = %target.display(), "mount busy, detaching");
                umount2(&target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
                    .map_err(io::Error::from)?;
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Err(io::Error::other(format!(
        "mounts still present under {} after 64 unmounts",
        dir.display()
    )))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
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

/// Existing cgroup directories of the worker `name` in every hierarchy.
pub fn cgroup_dirs(parent: &str, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let direct = Path::new(CGROUP_ROOT).join(parent).join(name);
    if direct.is_dir() {
        out.push(direct);
    }
    if let Ok(hierarchies) = fs::read_dir(CGROUP_ROOT) {
        for h in hierarchies.flatten() {
            let dir = h.path().join(parent).join(name);
            if dir.is_dir() {
                out.push(dir);
            }
        }
    }
    out
}

/// Remove the scope directory (`slate/<hash>`) from every hierarchy if it is empty; a
/// scope still holding a worker's cgroup stays (rmdir refuses).
pub fn remove_empty_scope(parent: &str) {
    if let Ok(hierarchies) = fs::read_dir(CGROUP_ROOT) {
        for h in hierarchies.flatten() {
            let _ = fs::remove_dir(h.path().join(parent));
        }
    }
    let _ = fs::remove_dir(Path::new(CGROUP_ROOT).join(parent));
}

/// Removes a cgroup directory and its children, killing any task still in them first
/// (a cgroup with tasks cannot be removed).
pub fn remove_cgroup(dir: &Path) -> io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            // Only child cgroups are directories; control files are not.
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in cgroup_procs(dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed tasks are still exiting.
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup not removable yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

fn cgroup_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Processes (other than this one) with a command-line argument equal to `arg`.
pub fn pids_with_arg(arg: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = arg.as_os_str().as_encoded_bytes();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == want))
                .unwrap_or(false)
        })
        .collect()
}

/// Removes the job directory `dir` without following symlinks and without crossing into
/// another filesystem: after [`unmount_all_under`] nothing under it may be a mount.
pub fn remove_job_dir(dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_dir() {
        // A symlink or file where the job dir should be: remove the entry, never its target.
        return fs::remove_file(dir);
    }
    let leftover = mounts_under(dir);
    if !leftover.is_empty() {
        return Err(io::Error::other(format!(
            "refusing to remove {}: still mounted: {}",
            dir.display(),
            leftover
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    remove_tree(dir, meta.dev())
}

/// Depth-first removal that stops at a device boundary (a mount mountinfo did not show,
/// e.g. in another namespace's view) instead of deleting a foreign filesystem's files.
fn remove_tree(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_dir() {
            if meta.dev() != dev {
                return Err(io::Error::other(format!(
                    "refusing to remove {}: another filesystem",
                    path.display()
                )));
            }
            remove_tree(&path, dev)?;
        } else {
            // Symlinks are unlinked themselves, never followed.
            fs::remove_file(&path)?;
        }
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_octal(r"/a\040b\011c"), "/a b\tc");
        assert_eq!(unescape_octal(r"/x\"), r"/x\");
    }

    #[test]
    fn overlay_paths_with_separators_are_refused() {
        assert!(check_overlay_path(Path::new("/a,b")).is_err());
        assert!(check_overlay_path(Path::new("/a:b")).is_err());
        assert!(check_overlay_path(Path::new("/a/b")).is_ok());
    }

    #[test]
    fn remove_job_dir_does_not_follow_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let jobs = tempfile::tempdir().unwrap();
        let job = jobs.path().join("slate-1");
        std::fs::create_dir_all(job.join("upper/deep")).unwrap();
        std::os::unix::fs::symlink(outside.path(), job.join("upper/deep/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), job.join("link2")).unwrap();
        remove_job_dir(&job).unwrap();
        assert!(!job.exists());
        assert!(outside.path().join("keep").exists());
        // Missing is fine.
        remove_job_dir(&job).unwrap();
    }
}
