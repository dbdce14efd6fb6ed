//! Files sent back by the agent, for workers whose disk the server cannot read (exec
//! machines, VMs): the job's artifacts, and for exec pools the new files of its overlay
//! caches, written into the job's host-side cache overlay so that the ordinary harvest
//! (after the worker is gone) applies the same rules as for local workers: regular new
//! files only, never replacing one, content-addressed with its checksum, into the PR's
//! layer or — trusted builds only — the shared mirror.
//!
//! The agent runs beside the job's untrusted code, so what it sends is checked like
//! input from the job: relative paths without `.`/`..`, written through directory
//! descriptors that never follow a symlink, with `O_EXCL` (a path that exists already,
//! in the mirror, the PR's layer or sent twice, is refused), and capped.

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use slate_proto::CollectSpec;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Most bytes of new cache files taken from one job.
pub const MAX_CACHE_BYTES: u64 = 4 << 30;

/// Where the files of one collect go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// `<data_dir>/artifacts/<job>/`.
    Artifacts(PathBuf),
    /// The job's mounted overlay of the cache on this host (its `merged` dir).
    Cache { name: String, merged: PathBuf },
}

/// What was received, for the job's log.
#[derive(Debug, Default)]
pub struct Tally {
    pub files: usize,
    pub bytes: u64,
    pub refused: Vec<String>,
}

/// The receiving end of a job's collects.
pub struct Receiver {
    sinks: Vec<(Sink, u64)>,
    open: HashMap<(u32, String), (File, u64)>,
    /// Files refused: further chunks of them are dropped.
    refused: std::collections::HashSet<(u32, String)>,
    tallies: Vec<Tally>,
}

impl Receiver {
    /// `collects[i]` goes to `sinks[i]`. An artifacts directory is emptied first (a new
    /// attempt replaces what an earlier one kept).
    pub fn new(collects: &[CollectSpec], sinks: Vec<Sink>) -> Receiver {
        for s in &sinks {
            if let Sink::Artifacts(dir) = s {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        let caps = collects.iter().map(|c| c.max_bytes);
        Receiver {
            tallies: sinks.iter().map(|_| Tally::default()).collect(),
            sinks: sinks.into_iter().zip(caps).collect(),
            open: HashMap::new(),
            refused: Default::default(),
        }
    }

    pub fn sinks(&self) -> impl Iterator<Item = (&Sink, &Tally)> {
        self.sinks.iter().map(|(s, _)| s).zip(&self.tallies)
    }

    /// Takes one chunk. Refusals are counted, never fatal: the job's result does not
    /// depend on what it sent back.
    pub fn chunk(&mut self, collect: u32, path: &str, offset: u64, data: &[u8], last: bool) {
        let key = (collect, path.to_string());
        if self.refused.contains(&key) {
            return;
        }
        let Some((sink, cap)) = self.sinks.get(collect as usize).cloned() else {
            return;
        };
        let i = collect as usize;
        let refuse = |me: &mut Receiver, why: String| {
            me.open.remove(&key);
            me.refused.insert(key.clone());
            me.tallies[i].refused.push(format!("{path}: {why}"));
        };
        if self.tallies[i].bytes + data.len() as u64 > cap {
            return refuse(self, format!("over the limit of {cap} bytes"));
        }
        if offset == 0 && !self.open.contains_key(&key) {
            let root = match &sink {
                Sink::Artifacts(dir) => {
                    if let Err(e) = std::fs::create_dir_all(dir) {
                        return refuse(self, e.to_string());
                    }
                    dir.clone()
                }
                Sink::Cache { merged, .. } => merged.clone(),
            };
            match create_beneath(&root, path) {
                Ok(f) => {
                    self.open.insert(key.clone(), (f, 0));
                }
                Err(why) => return refuse(self, why),
            }
        }
        let Some((file, written)) = self.open.get_mut(&key) else {
            return refuse(self, "a piece without its start".into());
        };
        if offset != *written {
            let why = format!("piece at {offset}, expected {written}");
            return refuse(self, why);
        }
        if let Err(e) = file.write_all(data) {
            return refuse(self, e.to_string());
        }
        *written += data.len() as u64;
        self.tallies[i].bytes += data.len() as u64;
        if last {
            if let Some((f, _)) = self.open.remove(&key) {
                let _ = f.sync_all();
            }
            self.tallies[i].files += 1;
        }
    }
}

/// Checks a path sent by the agent: relative, `/`-separated, no empty, `.` or `..`
/// component, no NUL.
pub fn check_path(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') {
        return Err("not a relative path".into());
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err("not a plain relative path".into());
    }
    Ok(parts)
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Creates `path` under `root` as a new regular file (0644), making the directories on the
/// way; never follows a symlink and never opens an existing file.
fn create_beneath(root: &Path, path: &str) -> Result<File, String> {
    let parts = check_path(path)?;
    let nofollow_dir = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = openat(None, root, nofollow_dir, Mode::empty())
        .map(owned)
        .map_err(|e| format!("opening {}: {e}", root.display()))?;
    let (name, dirs) = parts.split_last().expect("at least one part");
    for d in dirs {
        match mkdirat(Some(dir.as_raw_fd()), *d, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("making {d}: {e}")),
        }
        dir = openat(Some(dir.as_raw_fd()), *d, nofollow_dir, Mode::empty())
            .map(owned)
            .map_err(|e| match e {
                nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => {
                    format!("{d} is not a directory")
                }
                e => format!("opening {d}: {e}"),
            })?;
    }
    let fd = openat(
        Some(dir.as_raw_fd()),
        *name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map(owned)
    .map_err(|e| match e {
        nix::errno::Errno::EEXIST => "exists already: not replaced".to_string(),
        e => e.to_string(),
    })?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u64) -> CollectSpec {
        CollectSpec {
            root: "/w".into(),
            globs: vec![],
            max_bytes: max,
        }
    }

    #[test]
    fn paths_that_climb_or_are_absolute_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_path("a/b.tar.gz").unwrap(), vec!["a", "b.tar.gz"]);
    }

    #[test]
    fn files_are_written_new_never_through_symlinks_never_over_existing_ones_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("merged");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("old.tar.gz"), "mirror").unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let mut r = Receiver::new(
            &[spec(10)],
            vec![Sink::Cache {
                name: "distfiles".into(),
                merged: root.clone(),
            }],
        );
        r.chunk(0, "sub/new.tar.gz", 0, b"ne", false);
        r.chunk(0, "sub/new.tar.gz", 2, b"w", true);
        r.chunk(0, "old.tar.gz", 0, b"evil", true);
        r.chunk(0, "link/escape", 0, b"x", true);
        r.chunk(0, "../escape", 0, b"x", true);
        r.chunk(0, "big", 0, b"0123456789", true);
        r.chunk(0, "late", 5, b"x", true);
        assert_eq!(
            std::fs::read_to_string(root.join("sub/new.tar.gz")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("old.tar.gz")).unwrap(),
            "mirror"
        );
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert!(!root.join("big").exists());
        let (_, t) = r.sinks().next().unwrap();
        assert_eq!((t.files, t.bytes), (1, 3));
        assert_eq!(t.refused.len(), 5, "{:?}", t.refused);
    }
}
