//! Sending files back after the steps, for workers the server cannot read (machines
//! elsewhere): the artifacts the steps declared, and the new files of caches (listed
//! before the first step, so only files the job added are sent).
//!
//! Only regular files are sent; a symlink is never followed, neither as a file nor as a
//! directory on the way. The server decides what is kept: the agent runs beside the
//! job's untrusted code, so nothing it sends is trusted more than the job itself.

use crate::link::Link;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use slate_proto::{AgentMsg, CollectSpec, MAX_CHUNK};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// Most entries looked at per collect (a tree full of files costs time, not bytes).
const MAX_ENTRIES: usize = 200_000;
const MAX_DEPTH: usize = 64;

/// What was in each new-files collect's root before the first step.
pub struct Before(Vec<Option<BTreeSet<String>>>);

/// Lists the roots of the collects that send new files only; call before the first step.
pub fn before(specs: &[CollectSpec]) -> Before {
    Before(
        specs
            .iter()
            .map(|c| {
                c.globs.is_empty().then(|| {
                    let mut seen = BTreeSet::new();
                    walk(Path::new(&c.root), "", 0, &mut 0, &mut |rel, _| {
                        seen.insert(rel.to_string());
                    });
                    seen
                })
            })
            .collect(),
    )
}

fn matcher(globs: &[String]) -> Option<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        // `*` stays within a directory; `**` crosses them (as the server's artifacts).
        b.add(GlobBuilder::new(g).literal_separator(true).build().ok()?);
    }
    b.build().ok()
}

/// Calls `found(relative path, size)` for each regular file under `root`, in sorted
/// order, without following symlinks.
fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    seen: &mut usize,
    found: &mut dyn FnMut(&str, u64),
) {
    let Ok(listing) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = listing.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        *seen += 1;
        if *seen > MAX_ENTRIES {
            return;
        }
        let Some(text) = name.to_str() else { continue };
        let rel = if prefix.is_empty() {
            text.to_string()
        } else {
            format!("{prefix}/{text}")
        };
        let path = dir.join(&name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth + 1 < MAX_DEPTH {
                walk(&path, &rel, depth + 1, seen, found);
            }
        } else if meta.is_file() {
            found(&rel, meta.len());
        }
    }
}

/// Sends the files of every collect; returns (files, bytes) sent. Stops early if the
/// link is lost.
pub fn send(specs: &[CollectSpec], before: &Before, link: &Link) -> (usize, u64) {
    let (mut files, mut bytes) = (0, 0);
    for (index, spec) in specs.iter().enumerate() {
        let root = Path::new(&spec.root);
        let set = if spec.globs.is_empty() {
            None
        } else {
            match matcher(&spec.globs) {
                Some(s) => Some(s),
                None => {
                    eprintln!(
                        "slate-agent: bad glob in {:?}: nothing collected",
                        spec.globs
                    );
                    continue;
                }
            }
        };
        let old = before.0.get(index).and_then(Option::as_ref);
        let mut chosen = Vec::new();
        walk(root, "", 0, &mut 0, &mut |rel, size| {
            let wanted = match (&set, old) {
                (Some(set), _) => set.is_match(rel),
                (None, Some(old)) => !old.contains(rel),
                (None, None) => false,
            };
            if wanted {
                chosen.push((rel.to_string(), size));
            }
        });
        let mut budget = spec.max_bytes;
        for (rel, size) in chosen {
            if size > budget {
                continue; // The server notes what it did not get from what it did.
            }
            if link.lost().is_some() {
                return (files, bytes);
            }
            match send_file(link, index as u32, root, &rel, budget) {
                Ok(n) => {
                    files += 1;
                    bytes += n;
                    budget -= n;
                }
                Err(e) => eprintln!("slate-agent: not collecting {rel}: {e}"),
            }
        }
    }
    (files, bytes)
}

/// Sends one file (at most `budget` bytes of it), chunk by chunk, waiting while the link
/// is backpressured. The file is opened without following a symlink and checked to be a
/// regular file on the descriptor (it may have been swapped since the listing).
fn send_file(
    link: &Link,
    collect: u32,
    root: &Path,
    rel: &str,
    budget: u64,
) -> std::io::Result<u64> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(root.join(rel))?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut offset = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK / 2];
    loop {
        while link.backpressured() && link.lost().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let room = (budget - offset).min(buf.len() as u64) as usize;
        let n = read_full(&mut f, &mut buf[..room])?;
        let last = n < room || room == 0 || offset + n as u64 == budget;
        let data = buf[..n].to_vec();
        let path = rel.to_string();
        link.push_numbered(|seq| AgentMsg::File {
            seq,
            collect,
            path,
            offset,
            data,
            last,
        });
        offset += n as u64;
        if last {
            return Ok(offset);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_told_from_old_ones_and_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::write(root.join("a/old.tar.gz"), "old").unwrap();
        let spec = CollectSpec {
            root: root.display().to_string(),
            globs: vec![],
            max_bytes: 1 << 20,
        };
        let b = before(std::slice::from_ref(&spec));
        fs::write(root.join("a/new.tar.gz"), "new").unwrap();
        fs::write(root.join("a/old.tar.gz"), "changed").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("host")).unwrap();
        let old = b.0[0].as_ref().unwrap();
        let mut all = Vec::new();
        walk(root, "", 0, &mut 0, &mut |rel, _| all.push(rel.to_string()));
        assert_eq!(all, vec!["a/new.tar.gz", "a/old.tar.gz"]);
        let new: Vec<_> = all.iter().filter(|r| !old.contains(*r)).collect();
        assert_eq!(new, vec!["a/new.tar.gz"]);
        assert!(matcher(&["out/*.txt".into()])
            .unwrap()
            .is_match("out/a.txt"));
        assert!(!matcher(&["out/*.txt".into()])
            .unwrap()
            .is_match("out/x/a.txt"));
    }
}
