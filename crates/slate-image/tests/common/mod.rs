//! Shared test support: a busybox rootfs tarball and recipe files in a temp dir.
#![allow(dead_code)]

pub mod vm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temp dir holding `busybox.tar`, an `images/` dir and whatever recipes a test writes.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("bb-rootfs");
        slate_testkit::image::busybox_rootfs(&rootfs).unwrap();
        // An absolute symlink: `files` must resolve it inside the image, not on the host.
        std::os::unix::fs::symlink("/etc", rootfs.join("etc2")).unwrap();
        let status = Command::new("tar")
            .arg("-cf")
            .arg(dir.path().join("busybox.tar"))
            .arg("-C")
            .arg(&rootfs)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        fs::remove_dir_all(&rootfs).unwrap();
        fs::create_dir(dir.path().join("images")).unwrap();
        Fixture { dir }
    }

    pub fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Write `text` as `<name>.toml` next to the tarball and return its path.
    pub fn recipe(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.toml"));
        fs::write(&p, text).unwrap();
        p
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }
}

/// Mount points under `dir` in this process's namespace (what a leak would look like).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let needle = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&needle)))
        .map(str::to_string)
        .collect()
}

/// Entries of `dir` whose name starts with `prefix`.
pub fn entries_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes whose root directory is under `dir` (a chroot left running).
pub fn processes_rooted_under(dir: &Path) -> Vec<String> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(root) = fs::read_link(e.path().join("root")) {
            if root.starts_with(&dir) {
                out.push(format!("{name} {}", root.display()));
            }
        }
    }
    out
}
