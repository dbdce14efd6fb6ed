//! Building a recipe into a new version: stages in a temp dir, then one atomic rename.
//!
//! Stages, in order: `base` (debootstrap, tarball or the parent image), `packages`,
//! `files`, `run`, `tools`, `package_manager`. Files come before every command stage so
//! scripts they copy can be run; tools and the package manager come last as in the
//! original proposal's steps 2 and 5, on top of the prepared OS.
//!
//! Commands run chrooted in the image with the host's network, each inside its own mount
//! and PID namespace (`unshare --mount --pid --fork --kill-child`): /proc, /dev and /sys
//! are mounted there and vanish with the namespace, so a build killed at any point leaves
//! no mount and no process behind. The builder also asks for SIGKILL on its own death
//! (`PR_SET_PDEATHSIG`), which `--kill-child` passes on to the whole namespace.
//!
//! With the `qcow2` output a last stage, `qcow2`, makes `<version>/vm` from the finished
//! rootfs (see `vm.rs`), inside the temp dir: it becomes visible with the rest or not at all.

use crate::fsutil::{self, Lock};
use crate::progress::StageBar;
use crate::store::{self, ImageMeta, StageTiming};
use crate::vm::{self, VmInputs};
use crate::{Base, ImageError, Output, Progress, Recipe};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bumped whenever what goes into a cached base changes.
const BASE_CACHE_VERSION: &str = "1";

/// How much of a failing command's output the error carries.
const TAIL_LINES: usize = 20;
const TAIL_BYTES: u64 = 8192;

/// Environment of every command run in an image.
const CHROOT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LC_ALL", "C"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];

/// Runs in a fresh mount + PID namespace on the host: mount the API filesystems into the
/// image, then chroot. `$1` is the root, the rest the command.
const CHROOT_SCRIPT: &str = r#"set -e
r=$1; shift
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
mount --rbind /sys "$r/sys"
exec chroot "$r" "$@""#;

/// A complete, visible version.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageVersion {
    pub name: String,
    pub version: String,
    /// `<images_dir>/<name>/<version>`.
    pub dir: PathBuf,
    /// `<dir>/rootfs`; absent when the recipe's outputs leave out `rootfs`.
    pub rootfs: PathBuf,
    /// `<dir>/vm` (`disk.qcow2`, `vmlinuz`, `initrd.img`, `cmdline`) with the `qcow2` output.
    pub vm: Option<PathBuf>,
    pub meta: ImageMeta,
}

/// Builds recipes into versions under one images directory.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    images_dir: PathBuf,
    refresh: bool,
}

/// `<cache>/base-<key>/base.json`.
#[derive(Serialize, Deserialize)]
struct CachedBase {
    created: DateTime<Utc>,
    base: String,
    packages: Vec<String>,
}

impl ImageBuilder {
    pub fn new(images_dir: impl Into<PathBuf>) -> ImageBuilder {
        ImageBuilder {
            images_dir: images_dir.into(),
            refresh: false,
        }
    }

    /// Ignore the cached base (rerun debootstrap and packages), e.g. to pick up updates.
    pub fn refresh(mut self, yes: bool) -> ImageBuilder {
        self.refresh = yes;
        self
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// Build `recipe` into a new version. On any failure nothing becomes visible, the temp
    /// dir is removed and the stage logs are kept in `<name>/.failed-<stamp>/logs`.
    pub fn build(&self, recipe: &Recipe, progress: &Progress) -> Result<ImageVersion, ImageError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(ImageError::Other(
                "image builds need root (chroot, mount namespaces)".into(),
            ));
        }
        // Checked before any stage runs: a missing agent should not cost a debootstrap.
        let vm_inputs = if recipe.outputs.contains(&Output::Qcow2) {
            Some(VmInputs::resolve(recipe)?)
        } else {
            None
        };
        let keep_rootfs = recipe.outputs.contains(&Output::Rootfs);
        let started = Instant::now();
        let name_dir = self.images_dir.join(&recipe.name);
        fs::create_dir_all(&name_dir)
            .map_err(ImageError::io(format!("creating {}", name_dir.display())))?;
        let _lock = Lock::try_acquire(&name_dir.join(".lock"))?
            .ok_or_else(|| ImageError::Busy(recipe.name.clone()))?;
        // Holding the lock, every temp dir here belongs to a build that died.
        store::clean_leftovers(&name_dir)?;
        store::clean_cache(&self.images_dir.join(".cache"), false)?;

        let (stamp, tmp) = make_temp_dir(&name_dir)?;
        let mut guard = TempGuard {
            tmp: tmp.clone(),
            failed: name_dir.join(format!(".failed-{stamp}")),
            armed: true,
        };
        let logs = tmp.join("logs");
        fs::create_dir(&logs).map_err(ImageError::io(format!("creating {}", logs.display())))?;
        let rootfs = tmp.join("rootfs");
        tracing::info!(image = %recipe.name, tmp = %tmp.display(), base = %recipe.base, "image build started");

        let mut b = Build {
            recipe,
            progress,
            logs: &logs,
            timings: Vec::new(),
        };
        let stages = |b: &mut Build<'_>| -> Result<Staged, ImageError> {
            let (base_identity, base_reused) = self.base_and_packages(b, &rootfs)?;
            {
                let _net = ResolvGuard::install(&rootfs)?;
                b.files(&rootfs)?;
                b.commands("run", &rootfs, &recipe.run)?;
                b.commands("tools", &rootfs, &recipe.tools)?;
                b.commands("package_manager", &rootfs, &recipe.package_manager)?;
            }
            let size_bytes = fsutil::tree_size(&rootfs);
            let vm_disk_bytes = match &vm_inputs {
                Some(inputs) => {
                    let bar = b.progress.stage("qcow2", 0);
                    let t = Instant::now();
                    let log = b.logs.join("qcow2.log");
                    let bytes = vm::make(inputs, &tmp, &rootfs, keep_rootfs, &log, &bar)
                        .inspect_err(|e| bar.fail(&e.to_string()))?;
                    b.done("qcow2", &bar, t, false);
                    Some(bytes)
                }
                None => None,
            };
            Ok(Staged {
                base_identity,
                base_reused,
                size_bytes,
                vm_disk_bytes,
            })
        };
        let staged = stages(&mut b).map_err(|e| match e {
            // The temp dir goes away; point at where the guard keeps the logs.
            ImageError::CommandFailed {
                stage,
                command,
                status,
                log,
                tail,
            } => ImageError::CommandFailed {
                log: match log.strip_prefix(&logs) {
                    Ok(rel) => guard.failed.join("logs").join(rel),
                    Err(_) => log,
                },
                stage,
                command,
                status,
                tail,
            },
            other => other,
        })?;
        let Staged {
            base_identity,
            base_reused,
            size_bytes,
            vm_disk_bytes,
        } = staged;

        let vm_identity = vm_inputs.as_ref().map(VmInputs::identity).transpose()?;
        let input_hash = input_hash(recipe, &base_identity, vm_identity.as_deref())?;
        let version = format!("{stamp}-{}", &input_hash[..8]);
        let meta = ImageMeta {
            name: recipe.name.clone(),
            version: version.clone(),
            recipe: recipe.path.clone(),
            recipe_hash: recipe.text_hash.clone(),
            input_hash,
            base: base_identity,
            base_reused,
            created: Utc::now(),
            size_bytes,
            vm_disk_bytes,
            outputs: recipe.outputs.clone(),
            stages: b.timings,
            build_seconds: started.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_string_pretty(&meta).expect("meta serializes");
        write_synced(&tmp.join("meta.json"), json.as_bytes())?;
        let dir = name_dir.join(&version);
        fsutil::rename_noreplace(&tmp, &dir)?;
        guard.armed = false;
        fsutil::sync_dir(&name_dir);
        tracing::info!(
            image = %recipe.name,
            version = %version,
            seconds = meta.build_seconds,
            size_bytes = meta.size_bytes,
            base_reused,
            "image version ready"
        );
        Ok(ImageVersion {
            name: recipe.name.clone(),
            version,
            rootfs: dir.join("rootfs"),
            vm: vm_inputs.as_ref().map(|_| dir.join(vm::VM_DIR)),
            dir,
            meta,
        })
    }

    /// The base and packages stages; returns the base's identity for the input hash.
    fn base_and_packages(
        &self,
        b: &mut Build<'_>,
        rootfs: &Path,
    ) -> Result<(String, bool), ImageError> {
        let recipe = b.recipe;
        match &recipe.base {
            Base::Debootstrap { .. } => self.cached_base(b, rootfs),
            Base::Tarball(tar) => {
                let bar = b.progress.stage("base", 0);
                let t = Instant::now();
                fs::create_dir(rootfs)
                    .map_err(ImageError::io(format!("creating {}", rootfs.display())))?;
                bar.message(&format!("unpacking {}", tar.display()));
                let log = b.logs.join("base.log");
                let mut cmd = Command::new("tar");
                cmd.arg("-xpf")
                    .arg(tar)
                    .arg("-C")
                    .arg(rootfs)
                    .arg("--numeric-owner");
                run_logged("base", "tar -xpf", cmd, &log, &bar)?;
                let hash = file_sha256(tar)?;
                b.done("base", &bar, t, false);
                b.packages(rootfs)?;
                Ok((format!("tarball {} sha256:{hash}", tar.display()), false))
            }
            Base::Image(parent) => {
                let bar = b.progress.stage("base", 0);
                let t = Instant::now();
                let p = store::resolve(&self.images_dir, parent)?;
                bar.message(&format!("copying {} {}", p.name, p.version));
                // A real copy (a reflink clone where the filesystem has them): later
                // stages write into it, and the parent version must never change.
                fsutil::copy_tree(&p.rootfs, rootfs)?;
                let parent_hash = store::read_meta(p.rootfs.parent().unwrap_or(&p.rootfs))
                    .map(|m| m.input_hash)
                    .unwrap_or_default();
                b.done("base", &bar, t, false);
                b.packages(rootfs)?;
                Ok((
                    format!("image {} {} input:{parent_hash}", p.name, p.version),
                    false,
                ))
            }
        }
    }

    /// debootstrap + packages, cached under `.cache/base-<key>` by (suite, variant,
    /// mirror, packages) and copied into the build: reused unless `refresh` or older than
    /// the recipe's `rebuild_every`.
    fn cached_base(&self, b: &mut Build<'_>, rootfs: &Path) -> Result<(String, bool), ImageError> {
        let recipe = b.recipe;
        let Base::Debootstrap {
            suite,
            variant,
            mirror,
        } = &recipe.base
        else {
            unreachable!("cached_base is only for debootstrap bases");
        };
        let mut packages = recipe.packages.clone();
        packages.sort();
        packages.dedup();
        let key = {
            let mut h = Sha256::new();
            for part in [BASE_CACHE_VERSION, suite, variant, mirror] {
                h.update(part.as_bytes());
                h.update([0]);
            }
            for p in &packages {
                h.update(p.as_bytes());
                h.update([0]);
            }
            hex::encode(h.finalize())[..16].to_string()
        };
        let cache = self.images_dir.join(".cache");
        fs::create_dir_all(&cache)
            .map_err(ImageError::io(format!("creating {}", cache.display())))?;
        // Held while populating and while copying out, so the entry never changes under a copy.
        let _lock = Lock::acquire(&cache.join(format!("base-{key}.lock")))?;
        let entry = cache.join(format!("base-{key}"));
        let cached: Option<CachedBase> = fs::read_to_string(entry.join("base.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|_| entry.join("rootfs").is_dir());
        let fresh = cached.filter(|c| {
            !self.refresh
                && recipe.rebuild_every.is_none_or(|every| {
                    (Utc::now() - c.created)
                        .to_std()
                        .map(|age| age < every)
                        .unwrap_or(true)
                })
        });
        let reused = fresh.is_some();
        let created = match fresh {
            Some(c) => {
                let bar = b.progress.stage("base", 0);
                let t = Instant::now();
                bar.message(&format!("copying cached base {key}"));
                fsutil::copy_tree(&entry.join("rootfs"), rootfs)?;
                b.done("base", &bar, t, true);
                let bar = b.progress.stage("packages", 0);
                b.done("packages", &bar, Instant::now(), true);
                c.created
            }
            None => {
                let ctmp = cache.join(format!(".tmp-base-{key}"));
                fsutil::remove_tree(&ctmp)?;
                fs::create_dir(&ctmp)
                    .map_err(ImageError::io(format!("creating {}", ctmp.display())))?;
                let croot = ctmp.join("rootfs");

                let bar = b.progress.stage("base", 0);
                let t = Instant::now();
                bar.message(&format!("debootstrap {suite} ({variant})"));
                let mut cmd = namespaced();
                cmd.arg("debootstrap")
                    .arg(format!("--variant={variant}"))
                    .arg(suite)
                    .arg(&croot)
                    .arg(mirror);
                run_logged(
                    "base",
                    &format!("debootstrap --variant={variant} {suite} {mirror}"),
                    cmd,
                    &b.logs.join("base.log"),
                    &bar,
                )?;
                b.done("base", &bar, t, false);
                b.packages(&croot)?;

                let created = Utc::now();
                let meta = CachedBase {
                    created,
                    base: recipe.base.to_string(),
                    packages: packages.clone(),
                };
                write_synced(
                    &ctmp.join("base.json"),
                    serde_json::to_string_pretty(&meta)
                        .expect("serializes")
                        .as_bytes(),
                )?;
                fsutil::remove_tree(&entry)?;
                fs::rename(&ctmp, &entry)
                    .map_err(ImageError::io(format!("renaming {}", ctmp.display())))?;
                let bar = b.progress.stage("copy", 0);
                let t = Instant::now();
                bar.message("copying the new base out of the cache");
                fsutil::copy_tree(&entry.join("rootfs"), rootfs)?;
                b.done("copy", &bar, t, false);
                created
            }
        };
        let _ = File::create(entry.join("last_used"));
        Ok((
            format!(
                "{} packages:[{}] cached:{}",
                recipe.base,
                packages.join(","),
                created.to_rfc3339()
            ),
            reused,
        ))
    }
}

/// What the stages hand to the version's metadata.
struct Staged {
    base_identity: String,
    base_reused: bool,
    /// The rootfs, measured before the `qcow2` stage (which may consume it).
    size_bytes: u64,
    vm_disk_bytes: Option<u64>,
}

/// One build's stages and their timings.
struct Build<'a> {
    recipe: &'a Recipe,
    progress: &'a Progress,
    logs: &'a Path,
    timings: Vec<StageTiming>,
}

impl Build<'_> {
    fn done(&mut self, stage: &str, bar: &StageBar, t: Instant, reused: bool) {
        let seconds = t.elapsed().as_secs_f64();
        bar.finish(if reused { "reused" } else { "done" });
        tracing::info!(image = %self.recipe.name, stage, seconds, reused, "stage finished");
        self.timings.push(StageTiming {
            stage: stage.to_string(),
            seconds,
            reused,
        });
    }

    /// `apt-get install` in the image (with the host's resolver and no service starts).
    fn packages(&mut self, root: &Path) -> Result<(), ImageError> {
        if self.recipe.packages.is_empty() {
            return Ok(());
        }
        let bar = self.progress.stage("packages", 3);
        let t = Instant::now();
        if !root.join("usr/bin/apt-get").exists() {
            bar.fail("no apt-get");
            return Err(ImageError::Other(format!(
                "stage `packages`: the base has no /usr/bin/apt-get to install {}",
                self.recipe.packages.join(" ")
            )));
        }
        let _net = ResolvGuard::install(root)?;
        let _policy = PolicyGuard::install(root)?;
        let log = self.logs.join("packages.log");
        let install = format!(
            "apt-get install -y --no-install-recommends {}",
            self.recipe.packages.join(" ")
        );
        for cmd in ["apt-get update", install.as_str(), "apt-get clean"] {
            bar.message(cmd);
            run_in_chroot("packages", root, cmd, &log, &bar)?;
            bar.inc();
        }
        self.done("packages", &bar, t, false);
        Ok(())
    }

    fn files(&mut self, root: &Path) -> Result<(), ImageError> {
        if self.recipe.files.is_empty() {
            return Ok(());
        }
        let bar = self.progress.stage("files", self.recipe.files.len() as u64);
        let t = Instant::now();
        let log_path = self.logs.join("files.log");
        let mut log = File::create(&log_path)
            .map_err(ImageError::io(format!("creating {}", log_path.display())))?;
        for f in &self.recipe.files {
            bar.message(&f.dest.display().to_string());
            let dest = fsutil::path_in_root(root, &f.dest)?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(ImageError::io(format!("creating {}", parent.display())))?;
            }
            // Replace, never write through: the old entry may be a symlink.
            match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {
                    return Err(ImageError::Other(format!(
                        "stage `files`: {} is a directory in the image",
                        f.dest.display()
                    )))
                }
                Ok(_) => fs::remove_file(&dest)
                    .map_err(ImageError::io(format!("replacing {}", dest.display())))?,
                Err(_) => {}
            }
            fs::copy(&f.src, &dest).map_err(ImageError::io(format!(
                "copying {} to {}",
                f.src.display(),
                f.dest.display()
            )))?;
            if let Some(mode) = f.mode {
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
                    .map_err(ImageError::io(format!("chmod {}", dest.display())))?;
            }
            std::os::unix::fs::lchown(&dest, Some(0), Some(0))
                .map_err(ImageError::io(format!("chown {}", dest.display())))?;
            let _ = writeln!(log, "{} -> {}", f.src.display(), f.dest.display());
            bar.inc();
        }
        self.done("files", &bar, t, false);
        Ok(())
    }

    fn commands(&mut self, stage: &str, root: &Path, cmds: &[String]) -> Result<(), ImageError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let bar = self.progress.stage(stage, cmds.len() as u64);
        let t = Instant::now();
        let log = self.logs.join(format!("{stage}.log"));
        for cmd in cmds {
            bar.message(cmd);
            run_in_chroot(stage, root, cmd, &log, &bar)?;
            bar.inc();
        }
        self.done(stage, &bar, t, false);
        Ok(())
    }
}

/// `unshare` into a private mount and PID namespace that dies with us.
fn namespaced() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child=SIGKILL",
        "--",
    ]);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Run `command` with `/bin/sh -c` chrooted in `root`, output appended to `log`.
fn run_in_chroot(
    stage: &str,
    root: &Path,
    command: &str,
    log: &Path,
    bar: &StageBar,
) -> Result<(), ImageError> {
    for d in ["proc", "dev", "sys"] {
        let p = root.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).map_err(ImageError::io(format!("creating {}", p.display())))?;
        }
    }
    let mut cmd = namespaced();
    cmd.arg("/bin/sh")
        .arg("-c")
        .arg(CHROOT_SCRIPT)
        .arg("slate-chroot")
        .arg(root)
        .arg("/bin/sh")
        .arg("-c")
        .arg(command)
        .env_clear()
        .envs(CHROOT_ENV.iter().copied());
    run_logged(stage, command, cmd, log, bar)
}

/// Run `cmd` with stdout and stderr appended to `log`; on failure the error names the
/// command and carries the tail of its output.
pub(crate) fn run_logged(
    stage: &str,
    shown: &str,
    mut cmd: Command,
    log: &Path,
    bar: &StageBar,
) -> Result<(), ImageError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ImageError::io(format!("opening {}", log.display())))?;
    let _ = writeln!(file, "$ {shown}");
    let start = file
        .seek(SeekFrom::End(0))
        .map_err(ImageError::io(format!("seeking {}", log.display())))?;
    let out = file
        .try_clone()
        .map_err(ImageError::io("duplicating the log fd"))?;
    let err = file
        .try_clone()
        .map_err(ImageError::io("duplicating the log fd"))?;
    let t = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(ImageError::io(format!("starting `{shown}`")))?;
    let _ = writeln!(file, "# exit: {status}, {:.1}s", t.elapsed().as_secs_f64());
    tracing::debug!(stage, command = shown, %status, "command finished");
    if status.success() {
        return Ok(());
    }
    bar.fail(&format!("failed: {shown}"));
    Err(ImageError::CommandFailed {
        stage: stage.to_string(),
        command: shown.to_string(),
        status: status.to_string(),
        log: log.to_path_buf(),
        tail: tail(log, start),
    })
}

/// The last lines written to `log` after offset `from`.
fn tail(log: &Path, from: u64) -> String {
    let Ok(mut f) = File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(TAIL_BYTES));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("# exit: "))
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// `<name>/.tmp-<stamp>`, with a sortable UTC stamp unique in `name_dir`.
fn make_temp_dir(name_dir: &Path) -> Result<(String, PathBuf), ImageError> {
    loop {
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
        let tmp = name_dir.join(format!(".tmp-{stamp}"));
        match fs::create_dir(&tmp) {
            Ok(()) => return Ok((stamp, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(ImageError::Io {
                    what: format!("creating {}", tmp.display()),
                    error: e,
                })
            }
        }
    }
}

/// On failure: keep the logs as `.failed-<stamp>`, remove the rest of the temp dir.
struct TempGuard {
    tmp: PathBuf,
    failed: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = fs::create_dir(&self.failed);
        let _ = fs::rename(self.tmp.join("logs"), self.failed.join("logs"));
        if let Err(e) = fsutil::remove_tree(&self.tmp) {
            tracing::warn!(dir = %self.tmp.display(), error = %e, "cannot remove a failed build's temp dir");
        }
    }
}

/// The host's resolv.conf in the image while commands run; the image's own entry
/// (file, symlink or nothing) is put back afterwards.
struct ResolvGuard {
    path: PathBuf,
    original: Option<Original>,
}

enum Original {
    File(Vec<u8>),
    Link(PathBuf),
}

impl ResolvGuard {
    fn install(root: &Path) -> Result<ResolvGuard, ImageError> {
        let etc = root.join("etc");
        fs::create_dir_all(&etc).map_err(ImageError::io(format!("creating {}", etc.display())))?;
        let path = etc.join("resolv.conf");
        let original = match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => fs::read_link(&path).ok().map(Original::Link),
            Ok(_) => fs::read(&path).ok().map(Original::File),
            Err(_) => None,
        };
        let host = fs::read("/etc/resolv.conf").unwrap_or_default();
        // Remove first: writing through an absolute symlink would reach the host's file.
        let _ = fs::remove_file(&path);
        fs::write(&path, host).map_err(ImageError::io(format!("writing {}", path.display())))?;
        Ok(ResolvGuard { path, original })
    }
}

impl Drop for ResolvGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        match &self.original {
            Some(Original::File(bytes)) => {
                let _ = fs::write(&self.path, bytes);
            }
            Some(Original::Link(target)) => {
                let _ = std::os::unix::fs::symlink(target, &self.path);
            }
            None => {}
        }
    }
}

/// `/usr/sbin/policy-rc.d` answering 101 so package installs start no services.
struct PolicyGuard {
    path: Option<PathBuf>,
}

impl PolicyGuard {
    fn install(root: &Path) -> Result<PolicyGuard, ImageError> {
        let path = root.join("usr/sbin/policy-rc.d");
        if fs::symlink_metadata(&path).is_ok() {
            return Ok(PolicyGuard { path: None });
        }
        fs::write(&path, "#!/bin/sh\nexit 101\n")
            .map_err(ImageError::io(format!("writing {}", path.display())))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io(format!("chmod {}", path.display())))?;
        Ok(PolicyGuard { path: Some(path) })
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = fs::remove_file(p);
        }
    }
}

/// What decides "unchanged": the recipe's text, every copied file's content and mode, and
/// the base's identity (debootstrap parameters + cached base creation time, tarball
/// SHA-256, or parent version).
fn input_hash(
    recipe: &Recipe,
    base_identity: &str,
    vm_identity: Option<&str>,
) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(b"slate-image input v1\n");
    h.update(format!("recipe {}\n", recipe.text_hash));
    for f in &recipe.files {
        let mode = fs::metadata(&f.src)
            .map(|m| m.permissions().mode() & 0o7777)
            .map_err(ImageError::io(format!("reading {}", f.src.display())))?;
        h.update(format!(
            "file {} {} {:o}\n",
            f.dest.display(),
            file_sha256(&f.src)?,
            f.mode.unwrap_or(mode)
        ));
    }
    h.update(format!("base {base_identity}\n"));
    if let Some(vm) = vm_identity {
        h.update(format!("vm {vm}\n"));
    }
    Ok(hex::encode(h.finalize()))
}

pub(crate) fn file_sha256(path: &Path) -> Result<String, ImageError> {
    let mut f = File::open(path).map_err(ImageError::io(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(ImageError::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f =
        File::create(path).map_err(ImageError::io(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(ImageError::io(format!("writing {}", path.display())))
}
