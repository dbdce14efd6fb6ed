//! End-to-end tests of the cache manager with real overlayfs and bind mounts (run as root).
//!
//! "The job" is simulated by writing into the merged dir; entries a job could not make
//! through the overlay (hard links to host files, devices) are planted in the upper dir.

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use slate_cache::{
    mounts, CacheError, CacheManager, CacheMode, CacheSpec, Failpoint, JobCacheContext, Promote,
    RejectReason,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

const REPO: &str = "macports/macports-ports";

/// A state dir and a mirror in one temp dir; every mount under it is undone on drop,
/// before the temp dir is removed, even when the test panics.
struct Env {
    dir: TempDir,
    mgr: CacheManager,
    mirror: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Err(e) = mounts::unmount_all_under(self.dir.path()) {
            eprintln!("test cleanup: {e}");
        }
    }
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    fs::create_dir_all(mirror.join("sub")).unwrap();
    fs::write(mirror.join("existing.tar.gz"), b"mirror original").unwrap();
    fs::write(mirror.join("delete-me"), b"doomed").unwrap();
    fs::write(mirror.join("sub/old.txt"), b"old").unwrap();
    let mgr = CacheManager::new(dir.path().join("state")).unwrap();
    let mirror = mirror.canonicalize().unwrap();
    Env { dir, mgr, mirror }
}

impl Env {
    fn spec(&self, mode: CacheMode, promote: Promote) -> CacheSpec {
        CacheSpec {
            name: "distfiles".into(),
            source: self.mirror.clone(),
            target: "/opt/local/var/macports/distfiles".into(),
            mode,
            promote,
        }
    }

    fn upper(&self, job: &str) -> PathBuf {
        self.mgr.job_dir(job).unwrap().join("distfiles/upper")
    }

    fn pr_layer(&self, pr: u64) -> PathBuf {
        self.mgr.pr_layer(REPO, pr, "distfiles").unwrap()
    }

    /// No mount under the state dir, no job dir.
    fn assert_clean(&self, job: &str) {
        assert_eq!(
            mounts::mounts_under(self.mgr.state_dir()),
            Vec::<PathBuf>::new()
        );
        assert!(!self.mgr.job_dir(job).unwrap().exists(), "{job} dir left");
    }
}

fn pr_ctx(job: &str, pr: u64) -> JobCacheContext {
    JobCacheContext {
        job_name: job.into(),
        repo: REPO.into(),
        pr: Some(pr),
        trusted: false,
    }
}

fn push_ctx(job: &str, trusted: bool) -> JobCacheContext {
    JobCacheContext {
        job_name: job.into(),
        repo: REPO.into(),
        pr: None,
        trusted,
    }
}

/// Every entry under `dir`: relative path -> (inode, content or link target).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if m.is_dir() {
                out.insert(rel, (m.ino(), Vec::new()));
                walk(root, &p, out);
            } else if m.is_file() {
                out.insert(rel, (m.ino(), fs::read(&p).unwrap()));
            } else {
                out.insert(rel, (m.ino(), b"<special>".to_vec()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Regular files under `dir`, relative.
fn files(dir: &Path) -> HashSet<PathBuf> {
    snapshot(dir)
        .into_iter()
        .filter(|(k, _)| fs::symlink_metadata(dir.join(k)).unwrap().is_file())
        .map(|(k, _)| k)
        .collect()
}

fn set(paths: &[&str]) -> HashSet<PathBuf> {
    paths.iter().map(PathBuf::from).collect()
}

#[test]
fn ro_cache_is_the_mirror_bound_read_only() {
    let env = env();
    let spec = env.spec(CacheMode::Ro, Promote::Trusted);
    let ctx = pr_ctx("slate-1", 1);
    let prepared = env.mgr.prepare(&ctx, std::slice::from_ref(&spec)).unwrap();
    assert_eq!(prepared.len(), 1);
    assert_eq!(prepared[0].host_path, env.mirror);
    assert!(prepared[0].read_only);
    assert_eq!(prepared[0].target, spec.target);

    // What the provider does with it: a read-only bind.
    let mnt = env.dir.path().join("worker-view");
    fs::create_dir(&mnt).unwrap();
    mount(
        Some(&prepared[0].host_path),
        &mnt,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    mount(
        None::<&str>,
        &mnt,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    assert_eq!(
        fs::read(mnt.join("existing.tar.gz")).unwrap(),
        b"mirror original"
    );
    let err = fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::write(mnt.join("existing.tar.gz"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::remove_file(mnt.join("delete-me")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    mounts::unmount_all_under(&mnt).unwrap();

    // Nothing copied: no file anywhere in the state dir.
    let copied: Vec<_> = files(env.mgr.state_dir())
        .into_iter()
        .filter(|p| p != Path::new(".lock"))
        .collect();
    assert!(copied.is_empty(), "{copied:?}");
    let report = env.mgr.harvest(&ctx, &[spec]).unwrap();
    assert!(report.promoted.is_empty() && report.rejected.is_empty());
    env.assert_clean("slate-1");
}

#[test]
fn overlay_promotes_only_new_files_to_the_right_place() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    let mirror_before = snapshot(&env.mirror);

    // PR 7, first job: sees the mirror, adds, modifies, deletes.
    let ctx = pr_ctx("slate-1", 7);
    let m = env.mgr.prepare(&ctx, specs).unwrap();
    assert!(!m[0].read_only);
    let merged = &m[0].host_path;
    assert_eq!(
        fs::read(merged.join("existing.tar.gz")).unwrap(),
        b"mirror original"
    );
    fs::write(merged.join("new.tar.gz"), b"fresh download").unwrap();
    fs::write(merged.join("sub/new2.txt"), b"also new").unwrap();
    fs::create_dir_all(merged.join("newdir/deeper")).unwrap();
    fs::write(merged.join("newdir/deeper/n3"), b"nested").unwrap();
    fs::write(merged.join("existing.tar.gz"), b"poisoned").unwrap();
    fs::remove_file(merged.join("delete-me")).unwrap();
    fs::remove_file(merged.join("sub/old.txt")).unwrap();
    assert_eq!(
        snapshot(&env.mirror),
        mirror_before,
        "mirror changed during the job"
    );

    let report = env.mgr.harvest(&ctx, specs).unwrap();
    let promoted: HashSet<_> = report.promoted.iter().map(|p| p.path.clone()).collect();
    assert_eq!(
        promoted,
        set(&["new.tar.gz", "sub/new2.txt", "newdir/deeper/n3"])
    );
    assert_eq!(
        report.promoted.iter().map(|p| p.bytes).sum::<u64>(),
        14 + 8 + 6
    );
    let rejected: HashMap<_, _> = report
        .rejected
        .iter()
        .map(|r| (r.path.clone(), r.reason.clone()))
        .collect();
    assert_eq!(
        rejected[Path::new("existing.tar.gz")],
        RejectReason::ExistsInLower
    );
    assert_eq!(rejected[Path::new("delete-me")], RejectReason::Whiteout);
    assert_eq!(rejected[Path::new("sub/old.txt")], RejectReason::Whiteout);
    assert_eq!(
        snapshot(&env.mirror),
        mirror_before,
        "mirror changed by the harvest"
    );
    assert_eq!(
        files(&env.pr_layer(7)),
        set(&["new.tar.gz", "sub/new2.txt", "newdir/deeper/n3"])
    );
    env.assert_clean("slate-1");

    // PR 7, next job: sees its own layer over the mirror; cannot modify its layer either.
    let ctx = pr_ctx("slate-2", 7);
    let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
    assert_eq!(
        fs::read(merged.join("new.tar.gz")).unwrap(),
        b"fresh download"
    );
    assert_eq!(fs::read(merged.join("delete-me")).unwrap(), b"doomed");
    fs::write(merged.join("new.tar.gz"), b"rewritten").unwrap();
    fs::write(merged.join("second.tar.gz"), b"second").unwrap();
    let report = env.mgr.harvest(&ctx, specs).unwrap();
    assert_eq!(report.promoted.len(), 1);
    assert_eq!(report.promoted[0].path, Path::new("second.tar.gz"));
    assert_eq!(report.rejected[0].reason, RejectReason::ExistsInLower);
    assert_eq!(
        fs::read(env.pr_layer(7).join("new.tar.gz")).unwrap(),
        b"fresh download"
    );
    env.assert_clean("slate-2");

    // Another PR and a trusted build do not see PR 7's files.
    let ctx = pr_ctx("slate-3", 8);
    let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
    assert!(!merged.join("new.tar.gz").exists());
    assert!(merged.join("existing.tar.gz").exists());
    env.mgr.harvest(&ctx, specs).unwrap();

    let ctx = push_ctx("slate-4", true);
    let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
    assert!(!merged.join("new.tar.gz").exists());
    fs::write(merged.join("trusted.tar.gz"), b"from main").unwrap();
    fs::write(
        merged.join("existing.tar.gz"),
        b"even trusted builds do not modify",
    )
    .unwrap();
    let report = env.mgr.harvest(&ctx, specs).unwrap();
    assert_eq!(report.promoted.len(), 1);
    assert_eq!(
        fs::read(env.mirror.join("trusted.tar.gz")).unwrap(),
        b"from main"
    );
    assert_eq!(
        fs::read(env.mirror.join("existing.tar.gz")).unwrap(),
        b"mirror original"
    );
    // Hard-linked to its object (same filesystem here).
    assert_eq!(
        fs::metadata(env.mirror.join("trusted.tar.gz"))
            .unwrap()
            .nlink(),
        2
    );
    env.assert_clean("slate-4");

    // promote = never: a trusted build's new file goes nowhere; nor does an untrusted push's.
    let never = env.spec(CacheMode::Overlay, Promote::Never);
    for (job, ctx) in [
        ("slate-5", push_ctx("slate-5", true)),
        ("slate-6", pr_ctx("slate-6", 9)),
    ] {
        let merged = env.mgr.prepare(&ctx, std::slice::from_ref(&never)).unwrap()[0]
            .host_path
            .clone();
        fs::write(merged.join("never.tar.gz"), b"x").unwrap();
        let report = env.mgr.harvest(&ctx, std::slice::from_ref(&never)).unwrap();
        assert!(report.promoted.is_empty());
        env.assert_clean(job);
    }
    let ctx = push_ctx("slate-7", false);
    let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
    fs::write(merged.join("never.tar.gz"), b"x").unwrap();
    assert!(env.mgr.harvest(&ctx, specs).unwrap().promoted.is_empty());
    assert!(!env.mirror.join("never.tar.gz").exists());
    assert!(!env.pr_layer(9).join("never.tar.gz").exists());

    let stats = env.mgr.stats();
    assert_eq!(stats.promoted_files, 5);
    assert!(stats.rejected >= 5);
}

#[test]
fn hostile_upper_entries_are_rejected_and_host_files_untouched() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    let outside = env.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    let host_file = env.dir.path().join("host-file");
    fs::write(&host_file, b"host file").unwrap();
    let passwd_before = (
        fs::read("/etc/passwd").unwrap(),
        fs::metadata("/etc/passwd").unwrap().nlink(),
    );
    // A symlink somehow planted in the PR's own layer (a lower, and the destination).
    fs::create_dir_all(env.pr_layer(3)).unwrap();
    std::os::unix::fs::symlink(&outside, env.pr_layer(3).join("plant")).unwrap();

    let ctx = pr_ctx("slate-1", 3);
    let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
    assert!(merged.join("plant").is_symlink());
    std::os::unix::fs::symlink("/etc/passwd", merged.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../", merged.join("up")).unwrap();
    fs::write(merged.join("suid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(merged.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(merged.join("sgid"), b"x").unwrap();
    fs::set_permissions(merged.join("sgid"), fs::Permissions::from_mode(0o2755)).unwrap();
    nix::unistd::mkfifo(&merged.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    fs::write(merged.join("bad\nname"), b"x").unwrap();
    fs::write(merged.join(OsStr::from_bytes(b"odd\xffbytes")), b"x").unwrap();
    fs::write(merged.join(".slate-tmp-1-1"), b"x").unwrap();
    fs::write(merged.join("good.tar.gz"), b"good").unwrap();
    // Entries a job cannot make through the overlay, planted in the upper layer.
    let upper = env.upper("slate-1");
    fs::hard_link(&host_file, upper.join("hardlink")).unwrap();
    std::os::unix::fs::symlink(&outside, upper.join("sdir")).unwrap();
    mknod(
        &upper.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    fs::create_dir_all(upper.join("plant")).unwrap();
    fs::write(upper.join("plant/x"), b"through the planted symlink").unwrap();

    let report = env.mgr.harvest(&ctx, specs).unwrap();
    let promoted: Vec<_> = report.promoted.iter().map(|p| p.path.clone()).collect();
    assert_eq!(promoted, vec![PathBuf::from("good.tar.gz")]);
    let rejected: HashMap<_, _> = report
        .rejected
        .iter()
        .map(|r| (r.path.as_os_str().as_bytes().to_vec(), r.reason.clone()))
        .collect();
    let expect: &[(&[u8], RejectReason)] = &[
        (b"passwd", RejectReason::Symlink),
        (b"up", RejectReason::Symlink),
        (b"sdir", RejectReason::Symlink),
        (b"suid", RejectReason::Setuid),
        (b"sgid", RejectReason::Setuid),
        (b"fifo", RejectReason::Fifo),
        (b"bad\nname", RejectReason::UnsafeName),
        (b"odd\xffbytes", RejectReason::UnsafeName),
        (b".slate-tmp-1-1", RejectReason::UnsafeName),
        (b"hardlink", RejectReason::HardLink),
        (b"null", RejectReason::Device),
        (b"plant", RejectReason::ShadowsLower),
    ];
    for (path, reason) in expect {
        assert_eq!(
            rejected.get(*path),
            Some(reason),
            "{}",
            String::from_utf8_lossy(path)
        );
    }
    for r in &report.rejected {
        assert!(!r.reason.to_string().is_empty());
    }

    assert_eq!(files(&env.pr_layer(3)), set(&["good.tar.gz"]));
    assert!(env.pr_layer(3).join("plant").is_symlink());
    assert_eq!(files(&outside), set(&["secret"]));
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
    assert_eq!(fs::read(&host_file).unwrap(), b"host file");
    assert_eq!(
        fs::metadata(&host_file).unwrap().nlink(),
        1,
        "job's hard link not removed"
    );
    let passwd_after = (
        fs::read("/etc/passwd").unwrap(),
        fs::metadata("/etc/passwd").unwrap().nlink(),
    );
    assert_eq!(passwd_before, passwd_after);
    assert_eq!(env.mgr.stats().rejected, report.rejected.len() as u64);
    env.assert_clean("slate-1");
}

#[test]
fn same_file_in_three_prs_is_stored_once() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    // 1 MiB of incompressible-looking bytes.
    let mut content = Vec::with_capacity(1 << 20);
    let mut x: u32 = 0x1234_5678;
    while content.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        content.extend_from_slice(&x.to_le_bytes());
    }
    for (i, pr) in [11u64, 12, 13].into_iter().enumerate() {
        let ctx = pr_ctx(&format!("slate-{}", 20 + i), pr);
        let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
        fs::write(merged.join("big.tar"), &content).unwrap();
        let report = env.mgr.harvest(&ctx, specs).unwrap();
        assert_eq!(report.promoted.len(), 1);
        assert_eq!(report.promoted[0].bytes, 1 << 20);
    }
    let objects = files(&env.mgr.state_dir().join("objects"));
    assert_eq!(objects.len(), 1, "{objects:?}");
    let object = env
        .mgr
        .state_dir()
        .join("objects")
        .join(objects.iter().next().unwrap());
    let meta = fs::metadata(&object).unwrap();
    assert_eq!(meta.nlink(), 4);
    assert_eq!(meta.mode() & 0o7777, 0o644);
    for pr in [11, 12, 13] {
        let f = fs::metadata(env.pr_layer(pr).join("big.tar")).unwrap();
        assert_eq!(f.ino(), meta.ino());
        assert_eq!(fs::read(env.pr_layer(pr).join("big.tar")).unwrap(), content);
    }
    // du: blocks of unique inodes under the state dir.
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    for rel in files(env.mgr.state_dir()) {
        let m = fs::symlink_metadata(env.mgr.state_dir().join(rel)).unwrap();
        if seen.insert((m.dev(), m.ino())) {
            bytes += m.blocks() * 512;
        }
    }
    println!("3 PR layers holding the same 1 MiB file: {bytes} bytes on disk");
    assert!(
        (1 << 20..=(1 << 20) + 64 * 1024).contains(&bytes),
        "{bytes}"
    );
    let stats = env.mgr.stats();
    assert_eq!((stats.promoted_files, stats.dedup_hits), (3, 2));

    // Closing PRs drops links; gc frees the object only when nothing uses it.
    env.mgr.remove_pr(REPO, 11).unwrap();
    assert_eq!(fs::metadata(&object).unwrap().nlink(), 3);
    assert_eq!(env.mgr.gc_objects().unwrap().files, 0);
    env.mgr.remove_pr(REPO, 12).unwrap();
    env.mgr.remove_pr(REPO, 13).unwrap();
    env.mgr.remove_pr(REPO, 13).unwrap();
    let gc = env.mgr.gc_objects().unwrap();
    assert_eq!((gc.files, gc.bytes), (1, 1 << 20));
    assert!(!object.exists());
}

#[test]
fn crash_mid_promotion_leaves_old_or_complete_files() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    let temps = |dir: &Path| -> Vec<PathBuf> {
        files(dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .as_bytes()
                    .starts_with(b".slate-tmp-")
            })
            .collect()
    };
    for (job, then_cleanup) in [("slate-1", false), ("slate-2", true)] {
        let pr = if then_cleanup { 2 } else { 1 };
        let ctx = pr_ctx(job, pr);
        let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
        for name in ["a.tar", "b.tar", "c.tar"] {
            fs::write(merged.join(name), name.repeat(10_000)).unwrap();
        }
        let err = env
            .mgr
            .harvest_with_failpoint(&ctx, specs, Failpoint::AfterTempFile(2))
            .unwrap_err();
        assert!(matches!(err, CacheError::Failpoint), "{err}");
        // The "crash": a complete, b only as a temp, c not started.
        let layer = env.pr_layer(pr);
        assert_eq!(
            fs::read(layer.join("a.tar")).unwrap(),
            "a.tar".repeat(10_000).as_bytes()
        );
        assert!(!layer.join("b.tar").exists());
        assert!(!layer.join("c.tar").exists());
        assert_eq!(temps(&layer).len(), 1);
        assert_eq!(env.mgr.list_jobs().unwrap(), vec![job.to_string()]);
        assert!(mounts::mounts_under(env.mgr.state_dir()).is_empty());

        if then_cleanup {
            env.mgr.cleanup_job(job).unwrap();
            assert_eq!(files(&layer), set(&["a.tar"]));
        } else {
            // A retried harvest finishes the job.
            let report = env.mgr.harvest(&ctx, specs).unwrap();
            let promoted: HashSet<_> = report.promoted.iter().map(|p| p.path.clone()).collect();
            assert_eq!(promoted, set(&["b.tar", "c.tar"]));
            assert_eq!(files(&layer), set(&["a.tar", "b.tar", "c.tar"]));
            for name in ["a.tar", "b.tar", "c.tar"] {
                assert_eq!(
                    fs::read(layer.join(name)).unwrap(),
                    name.repeat(10_000).as_bytes()
                );
            }
        }
        assert!(temps(&layer).is_empty());
        env.assert_clean(job);
    }
}

#[test]
fn nothing_leaks_after_cleanup_failure_or_reuse() {
    let env = env();
    let a = env.spec(CacheMode::Overlay, Promote::Trusted);
    let mut b = env.spec(CacheMode::Overlay, Promote::Never);
    b.name = "packages".into();
    b.target = "/packages".into();
    let specs = [a.clone(), b.clone()];
    let ctx = pr_ctx("slate-1", 1);
    let m = env.mgr.prepare(&ctx, &specs).unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(mounts::mounts_under(env.mgr.state_dir()).len(), 2);
    assert_eq!(env.mgr.list_jobs().unwrap(), vec!["slate-1".to_string()]);
    assert!(matches!(
        env.mgr.prepare(&ctx, &specs),
        Err(CacheError::AlreadyPrepared(_))
    ));
    fs::write(m[0].host_path.join("x"), b"x").unwrap();

    // An overlay kept alive by a leftover bind (a worker not destroyed) stops the harvest.
    let bind = env.dir.path().join("leftover-bind");
    fs::create_dir(&bind).unwrap();
    mount(
        Some(&m[0].host_path),
        &bind,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let err = env.mgr.harvest(&ctx, &specs).unwrap_err();
    assert!(matches!(err, CacheError::StillMounted { .. }), "{err}");
    mounts::unmount_all_under(&bind).unwrap();

    env.mgr.cleanup_job("slate-1").unwrap();
    env.assert_clean("slate-1");
    env.mgr.cleanup_job("slate-1").unwrap();
    assert!(env.mgr.list_jobs().unwrap().is_empty());
    assert!(env.mgr.harvest(&ctx, &specs).unwrap().promoted.is_empty());
    assert!(!env.pr_layer(1).join("x").exists());

    // A prepare that fails half-way leaves nothing.
    let mut broken = b;
    broken.source = env.dir.path().join("no-such-mirror");
    let err = env
        .mgr
        .prepare(&pr_ctx("slate-2", 1), &[a, broken])
        .unwrap_err();
    assert!(matches!(err, CacheError::Io { .. }), "{err}");
    env.assert_clean("slate-2");
    assert!(env.mgr.list_jobs().unwrap().is_empty());
}

#[test]
fn pr_layers_expire_unless_in_use() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    for (job, pr) in [("slate-1", 1u64), ("slate-2", 2), ("slate-3", 3)] {
        let ctx = pr_ctx(job, pr);
        let merged = env.mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
        fs::write(merged.join(format!("f{pr}")), format!("content of pr {pr}")).unwrap();
        env.mgr.harvest(&ctx, specs).unwrap();
    }
    // PR 2 has a job running now.
    let running = pr_ctx("slate-4", 2);
    env.mgr.prepare(&running, specs).unwrap();
    let old = TimeSpec::from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            - Duration::from_secs(7200),
    );
    for pr in [1, 2] {
        let dir = env.pr_layer(pr).parent().unwrap().to_path_buf();
        utimensat(None, &dir, &old, &old, UtimensatFlags::NoFollowSymlink).unwrap();
    }
    let expired = env.mgr.expire_pr_layers(Duration::from_secs(3600)).unwrap();
    assert_eq!(expired, vec![(REPO.to_string(), 1)]);
    assert!(!env.pr_layer(1).exists());
    assert!(env.pr_layer(2).join("f2").exists());
    assert!(env.pr_layer(3).join("f3").exists());
    assert!(matches!(
        env.mgr.remove_pr(REPO, 2),
        Err(CacheError::InUse(_))
    ));
    env.mgr.harvest(&running, specs).unwrap();
    env.mgr.remove_pr(REPO, 2).unwrap();
    assert!(!env.pr_layer(2).exists());
    assert_eq!(env.mgr.gc_objects().unwrap().files, 2);
    env.assert_clean("slate-4");
}

#[test]
fn harvest_throughput_of_small_files() {
    let env = env();
    let spec = env.spec(CacheMode::Overlay, Promote::Trusted);
    let specs = std::slice::from_ref(&spec);
    const N: usize = 1000;
    let mut rates = Vec::new();
    for (job, pr, fsync) in [("slate-1", 1u64, true), ("slate-2", 2, false)] {
        let mgr = CacheManager::new(env.mgr.state_dir().to_path_buf())
            .unwrap()
            .with_fsync(fsync);
        let ctx = pr_ctx(job, pr);
        let merged = mgr.prepare(&ctx, specs).unwrap()[0].host_path.clone();
        for i in 0..N {
            let dir = merged.join(format!("d{}", i % 10));
            fs::create_dir_all(&dir).unwrap();
            fs::write(
                dir.join(format!("file-{i}.tar.gz")),
                format!("{i}").repeat(200),
            )
            .unwrap();
        }
        let start = Instant::now();
        let report = mgr.harvest(&ctx, specs).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(report.promoted.len(), N);
        assert!(report.rejected.is_empty());
        let rate = N as f64 / secs;
        println!(
            "harvest of {N} new small files (fsync={fsync}): {:.0} ms, {rate:.0} files/s",
            secs * 1000.0
        );
        rates.push(rate);
        env.assert_clean(job);
    }
    assert!(rates.iter().all(|r| *r > 50.0), "{rates:?}");
}
