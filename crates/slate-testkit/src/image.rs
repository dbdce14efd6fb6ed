//! A tiny busybox root filesystem for sandbox tests, and a manifest to prove an image unchanged.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `busybox-static` package installs the static busybox.
pub const BUSYBOX: &str = "/bin/busybox";

/// Assembles a minimal root filesystem in `dir` (created if missing): the static busybox
/// at `bin/busybox`, a symlink per applet in `bin`, `/etc/passwd`, `/etc/group` and the
/// usual empty mount point directories.
///
/// Panics if the static busybox is not installed, since no sandbox test can run without it.
pub fn busybox_rootfs(dir: &Path) -> io::Result<()> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        panic!("{BUSYBOX} is missing: run `apt-get install busybox-static` to run sandbox tests");
    }
    for sub in ["bin", "etc", "tmp", "root", "dev", "proc", "sys", "run"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::copy(busybox, dir.join("bin/busybox"))?;
    fs::set_permissions(dir.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;

    let out = Command::new(busybox).arg("--list").output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{BUSYBOX} --list failed: {}",
            out.status
        )));
    }
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        // Applet names are plain words; anything else would escape bin/.
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// One entry of a [`manifest`]: size, mode (type and permission bits), mtime in nanoseconds.
pub type ManifestEntry = (u64, u32, i64);

/// Every path under `dir` (relative, `""` for `dir` itself) with its size, mode and mtime,
/// walked without following symlinks. Two equal manifests mean nothing was added, removed
/// or modified (a write updates mtime; a new file in a directory updates the directory's).
pub fn manifest(dir: &Path) -> BTreeMap<PathBuf, ManifestEntry> {
    let mut out = BTreeMap::new();
    walk(dir, Path::new(""), &mut out);
    out
}

fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, ManifestEntry>) {
    let path = base.join(rel);
    let meta = fs::symlink_metadata(&path)
        .unwrap_or_else(|e| panic!("manifest: stat {}: {e}", path.display()));
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    out.insert(rel.to_path_buf(), (meta.size(), meta.mode(), mtime_ns));
    if meta.file_type().is_dir() {
        let entries = fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("manifest: read {}: {e}", path.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("manifest: read {}: {e}", path.display()));
            walk(base, &rel.join(entry.file_name()), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_has_shell_and_manifest_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        busybox_rootfs(dir.path()).unwrap();
        let sh = fs::symlink_metadata(dir.path().join("bin/sh")).unwrap();
        assert!(sh.file_type().is_symlink());
        assert!(dir.path().join("etc/passwd").is_file());

        let before = manifest(dir.path());
        assert!(before.contains_key(Path::new("bin/busybox")));
        assert_eq!(before, manifest(dir.path()));
        fs::write(dir.path().join("etc/extra"), "x").unwrap();
        assert_ne!(before, manifest(dir.path()));
    }
}
