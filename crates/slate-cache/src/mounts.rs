//! Mount-table side effects: overlay mounts, mountinfo scanning, unmounting, safe removal.

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields the cache needs.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Super-block options (for overlay: `lowerdir=`, `upperdir=`, …), unsplit.
    pub super_options: String,
}

impl MountEntry {
    /// Directories named by overlay layer options (`lowerdir`, `lowerdir+`, `upperdir`,
    /// `workdir`, `datadir+`); empty for other filesystems.
    pub fn overlay_dirs(&self) -> Vec<PathBuf> {
        if self.fs_type != "overlay" {
            return Vec::new();
        }
        let mut out = Vec::new();
        for opt in self.super_options.split(',') {
            let Some((key, value)) = opt.split_once('=') else {
                continue;
            };
            match key {
                "lowerdir" => out.extend(value.split(':').map(PathBuf::from)),
                "lowerdir+" | "datadir+" | "upperdir" | "workdir" => out.push(PathBuf::from(value)),
                _ => {}
            }
        }
        out
    }
}

/// All mounts of this process's mount namespace, in mountinfo order.
pub fn mount_table() -> Vec<MountEntry> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fs_type = post.next()?;
            let _source = post.next()?;
            let super_options = post.next().unwrap_or("");
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fs_type: unescape_octal(fs_type),
                super_options: unescape_octal(super_options),
            })
        })
        .collect()
}

/// Mount points at or under `dir`, in mountinfo order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_table()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Overlay mounts (anywhere) that use a layer directory at or under `dir`: a bind of a
/// job's merged dir that outlived the job, or a job whose lower is a PR layer.
pub fn overlays_using(dir: &Path) -> Vec<PathBuf> {
    mount_table()
        .into_iter()
        .filter(|m| m.overlay_dirs().iter().any(|d| d.starts_with(dir)))
        .map(|m| m.mount_point)
        .collect()
}

/// Mounts an overlay at `merged`: `lowers` top first, then `upper`/`work`.
///
/// `redirect_dir`, `metacopy` and `index` are forced off so the upper layer holds only
/// plain files, dirs, whiteouts and opaque markers: the harvest understands nothing else.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> io::Result<()> {
    let mut all: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    all.extend([upper, work]);
    for p in &all {
        check_overlay_path(p)?;
    }
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
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

/// Overlay options are split on `,` and lower dirs on `:`; a path holding either (or the
/// escape `\`) would be misparsed, so it is refused rather than escaped.
pub fn check_overlay_path(p: &Path) -> io::Result<()> {
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

/// Unmounts everything at or under `dir`, deepest first; a busy mount is detached.
pub fn unmount_all_under(dir: &Path) -> io::Result<()> {
    // Bounded: each round removes one mount; stacked mounts on one path take several.
    for _ in 0..256 {
        let mounts = mounts_under(dir);
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
        "mounts still present under {} after 256 unmounts",
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

/// Removes `dir` and everything under it without following symlinks and without crossing
/// into another filesystem; refuses while anything under it is mounted.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_dir() {
        // A symlink or file where a dir should be: remove the entry, never its target.
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
    remove_tree_on(dir, meta.dev())
}

fn remove_tree_on(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_dir() {
            if meta.dev() != dev {
                return Err(io::Error::other(format!(
                    "refusing to remove {}: another filesystem",
                    path.display()
                )));
            }
            remove_tree_on(&path, dev)?;
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
    fn overlay_dirs_are_parsed() {
        let m = MountEntry {
            mount_point: "/m".into(),
            fs_type: "overlay".into(),
            super_options: "rw,lowerdir=/a:/b,upperdir=/u,workdir=/w,uuid=on".into(),
        };
        let dirs = m.overlay_dirs();
        assert_eq!(dirs, ["/a", "/b", "/u", "/w"].map(PathBuf::from).to_vec());
    }

    #[test]
    fn overlay_paths_with_separators_are_refused() {
        assert!(check_overlay_path(Path::new("/a,b")).is_err());
        assert!(check_overlay_path(Path::new("/a:b")).is_err());
        assert!(check_overlay_path(Path::new("/a/b")).is_ok());
    }
}
