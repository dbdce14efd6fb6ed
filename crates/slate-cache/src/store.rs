//! Content-addressed object store: `objects/sha256/ab/abcdef…`, one inode per content.
//!
//! Promoted files are hard links to these objects, so a file in many layers costs its size
//! once; an object whose link count fell to 1 is referenced by nothing and can go.

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every object (and so of every promoted file): no exec, no setuid, read-only to
/// jobs anyway since caches reach them read-only or through an overlay.
pub(crate) const OBJECT_MODE: u32 = 0o644;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp name unique across processes and restarts (a restarted server in a container
/// often gets the same pid, and must not collide with an old journal's names).
pub(crate) fn tmp_name(prefix: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{nanos:x}-{n}", std::process::id())
}

/// One object as stored.
#[derive(Debug)]
pub(crate) struct Object {
    pub path: PathBuf,
    pub size: u64,
    /// The content was already stored: nothing new was written.
    pub dedup: bool,
}

#[derive(Debug)]
pub(crate) struct Store {
    root: PathBuf,
    fsync: bool,
}

impl Store {
    pub fn new(objects: PathBuf, fsync: bool) -> io::Result<Self> {
        fs::create_dir_all(objects.join("sha256"))?;
        fs::create_dir_all(objects.join("tmp"))?;
        Ok(Self {
            root: objects,
            fsync,
        })
    }

    pub fn set_fsync(&mut self, fsync: bool) {
        self.fsync = fsync;
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn object_path(&self, hex: &str) -> PathBuf {
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    /// Copies `src` into the store while hashing it (one read of the source), then renames
    /// the complete copy to its content address; a crash leaves at most a file in `tmp/`.
    pub fn ingest(&self, mut src: File) -> io::Result<Object> {
        let tmp = self.tmp_dir().join(tmp_name("obj-"));
        let result = (|| {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 128 * 1024];
            let mut size = 0u64;
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                size += n as u64;
            }
            // Explicit: the umask must not decide what every layer sees.
            out.set_permissions(fs::Permissions::from_mode(OBJECT_MODE))?;
            if self.fsync {
                out.sync_all()?;
            }
            let hex = hex::encode(hasher.finalize());
            let dest = self.object_path(&hex);
            fs::create_dir_all(dest.parent().expect("object path has a parent"))?;
            match renameat2(None, &tmp, None, &dest, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => Ok(Object {
                    path: dest,
                    size,
                    dedup: false,
                }),
                Err(Errno::EEXIST) => {
                    let _ = fs::remove_file(&tmp);
                    Ok(Object {
                        path: dest,
                        size,
                        dedup: true,
                    })
                }
                Err(e) => Err(io::Error::from(e)),
            }
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes objects nothing links to any more, and leftovers of interrupted ingests.
    /// Callers hold the exclusive store lock, so no ingest is between rename and link.
    pub fn gc(&self) -> io::Result<(u64, u64)> {
        let (mut files, mut bytes) = (0u64, 0u64);
        for entry in fs::read_dir(self.tmp_dir())? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            fs::remove_file(&path)?;
            files += 1;
            bytes += meta.len();
        }
        for fan in fs::read_dir(self.root.join("sha256"))? {
            let fan = fan?.path();
            if !fs::symlink_metadata(&fan)?.is_dir() {
                continue;
            }
            for obj in fs::read_dir(&fan)? {
                let path = obj?.path();
                let meta = fs::symlink_metadata(&path)?;
                if meta.file_type().is_file() && meta.nlink() == 1 {
                    fs::remove_file(&path)?;
                    files += 1;
                    bytes += meta.len();
                }
            }
            // Empty fan-out dirs are removed; a racing ingest recreates its own.
            let _ = fs::remove_dir(&fan);
        }
        Ok((files, bytes))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}
