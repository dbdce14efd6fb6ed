//! Sandbox provider: overlayfs mounted by slate over the image and source, run by an OCI runtime (runc).
//!
//! Layout of a worker `slate-<id>` under the provider's root:
//!
//! ```text
//! <root>/.runc/                runtime state (`runc --root`), so `runc list` sees only slate
//! <root>/slate-<id>/config.json   the OCI bundle (holds the job token: mode 0600, dir 0700)
//!                  /runtime       the runtime binary, so a restarted server destroys with it
//!                  /console.log   runtime + agent stdout/stderr
//!                  /upper /work /rootfs            overlay over the image
//!                  /ws-upper /ws-work /workspace   overlay over the source (or a plain dir)
//!                  /disk.img, /disk                with `limits.disk`: a sparse ext4 file,
//!                                                  loop-mounted; upper, work, ws-upper,
//!                                                  ws-work (and a plain workspace) move in
//!                  /netns          with `network = "egress"`: the job's network
//!                                  namespace (an nsfs bind mount), see [`net`]
//! ```
//!
//! The disk quota is a filesystem of the job's own rather than a tmpfs with `size=`:
//! tmpfs pages are charged to the memory cgroup of whoever writes them and stay charged
//! (no swap) until the file is deleted, so a tmpfs quota would eat the job's memory limit
//! and a quota above the memory limit could never be reached.
//!
//! Architecture invariant: the image and source directories are only ever overlay lower
//! layers; nothing here writes to them.

mod bundle;
pub(crate) mod host;
pub mod net;

use crate::{Provider, ProviderError, Result, Worker, WorkerSpec, AGENT_PATH};
use async_trait::async_trait;
use slate_core::config::Network;
use slate_core::JobId;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

/// How long `destroy` waits for the runtime to exit after killing the container.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Runtime used for workers whose runtime is not recorded (half-made before the record).
const DEFAULT_RUNTIME: &str = "runc";

/// A foreground runtime process started by this provider.
struct Running {
    /// Asks the waiter task to SIGKILL the runtime process itself.
    kill: oneshot::Sender<()>,
    exited: watch::Receiver<Option<i32>>,
}

/// Runs each worker as an OCI container on an overlay of the pool image.
pub struct SandboxProvider {
    root: PathBuf,
    /// `slate/<hash of root>`: where this provider's cgroups live.
    cgroup_parent: String,
    /// Held while a worker directory is made and while the cgroup scope is removed once
    /// the last worker is gone, so a new worker never loses its scope under runc.
    scope_lock: Arc<Mutex<()>>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    /// Workers `list()` found only by their nftables chains: `destroy` then removes the
    /// chains even without a namespace or veth to show for them.
    net_leftovers: Arc<Mutex<BTreeSet<String>>>,
}

impl SandboxProvider {
    /// `root` is slate's directory for workers (e.g. `<data_dir>/workers`); created on
    /// first provision.
    pub fn new(root: PathBuf) -> Self {
        let _ = std::fs::create_dir_all(&root);
        Self {
            cgroup_parent: cgroup_scope(&root),
            scope_lock: Arc::default(),
            root,
            running: Arc::default(),
            net_leftovers: Arc::default(),
        }
    }

    /// The directory holding the workers.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root, resolved: mountinfo lists resolved paths, and runc needs absolute ones.
    fn base(&self) -> PathBuf {
        self.root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone())
    }

    fn runc_root(&self) -> PathBuf {
        self.base().join(".runc")
    }

    fn job_dir(&self, name: &str) -> PathBuf {
        self.base().join(name)
    }

    async fn provision_inner(&self, spec: &WorkerSpec, name: &str, job: &Path) -> Result<Worker> {
        let image = canonical_dir(&spec.image, "image")?;
        let source = spec
            .source
            .as_ref()
            .map(|s| canonical_dir(s, "source"))
            .transpose()?;
        let socket_dir = spec
            .agent_socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| ProviderError::Spec("agent socket has no directory".into()))?;
        let socket_dir = canonical_dir(socket_dir, "agent socket directory")?;
        let agent = spec
            .agent_binary
            .canonicalize()
            .ok()
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                ProviderError::Spec(format!(
                    "agent binary {} is not a file",
                    spec.agent_binary.display()
                ))
            })?;

        fs::write(job.join("runtime"), &spec.runtime).map_err(io_err("record runtime"))?;

        // With a disk quota, every writable layer lives on the job's own filesystem.
        let layers = match spec.limits.disk_bytes {
            Some(bytes) => {
                let disk = job.join("disk");
                mkdir(&disk)?;
                let t0 = Instant::now();
                let (img, at) = (job.join("disk.img"), disk.clone());
                tokio::task::spawn_blocking(move || host::mount_disk(&img, bytes, &at))
                    .await
                    .map_err(|e| ProviderError::Other(format!("disk task: {e}")))?
                    .map_err(io_err("make the job's disk"))?;
                tracing::debug!(
                    worker = name,
                    disk_bytes = bytes,
                    duration_ms = t0.elapsed().as_millis() as u64,
                    "job disk mounted"
                );
                disk
            }
            None => job.to_path_buf(),
        };

        let rootfs = job.join("rootfs");
        mkdir(&rootfs)?;
        for d in ["upper", "work"] {
            mkdir(&layers.join(d))?;
        }
        host::mount_overlay(&image, &layers.join("upper"), &layers.join("work"), &rootfs)
            .map_err(io_err("mount image overlay"))?;

        let mut workspace = job.join("workspace");
        if let Some(source) = &source {
            mkdir(&workspace)?;
            mkdir(&layers.join("ws-upper"))?;
            mkdir(&layers.join("ws-work"))?;
            host::mount_overlay(
                source,
                &layers.join("ws-upper"),
                &layers.join("ws-work"),
                &workspace,
            )
            .map_err(io_err("mount source overlay"))?;
        } else {
            // A plain directory: on the job's disk when there is one.
            workspace = layers.join("workspace");
            mkdir(&workspace)?;
        }

        create_mount_point_file(&rootfs, AGENT_PATH)?;

        let netns = match spec.network {
            Network::None => None,
            Network::Egress => {
                let (scope, id, dir) =
                    (self.cgroup_parent.clone(), spec.job_id.0, job.to_path_buf());
                let allow = spec.network_allow.clone();
                let t0 = Instant::now();
                let ns = tokio::task::spawn_blocking(move || {
                    net::setup(&net::JobNet {
                        id,
                        scope: &scope,
                        job: &dir,
                        allow: &allow,
                    })
                })
                .await
                .map_err(|e| ProviderError::Other(format!("network task: {e}")))??;
                tracing::debug!(
                    job.id = id,
                    duration_ms = t0.elapsed().as_millis() as u64,
                    "egress network ready"
                );
                Some(ns)
            }
        };

        let spec_json = bundle::build_spec(&bundle::BundleParams {
            name,
            cgroup_parent: &self.cgroup_parent,
            rootfs: &rootfs,
            agent_binary: &agent,
            socket_dir: &socket_dir,
            workspace: &workspace,
            mounts: &spec.mounts,
            token: &spec.agent_token,
            limits: &spec.limits,
            swap_limit: swap_accounting(),
            netns: netns.as_deref(),
        })
        .map_err(|e| ProviderError::Other(format!("build oci spec: {e}")))?;
        let json = serde_json::to_vec_pretty(&spec_json)
            .map_err(|e| ProviderError::Other(format!("serialize oci spec: {e}")))?;
        // The spec holds the job token.
        write_private(&job.join("config.json"), &json).map_err(io_err("write config.json"))?;

        let console_log = job.join("console.log");
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&console_log)
            .map_err(io_err("open console.log"))?;
        let console_err = console.try_clone().map_err(io_err("open console.log"))?;

        // Foreground `run`: runc stays the parent of the container and reaps it.
        let mut child = Command::new(&spec.runtime)
            .arg("--root")
            .arg(self.runc_root())
            .arg("run")
            .arg("--bundle")
            .arg(job)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(|e| ProviderError::Io {
                what: format!("spawn runtime {}", spec.runtime),
                source: e,
            })?;

        let (tx, exited) = watch::channel(None);
        let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
        let worker_name = name.to_string();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                Ok(()) = &mut kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let code = match status {
                Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
                Err(e) => {
                    tracing::error!(worker = %worker_name, error = %e, "waiting for runtime failed");
                    -1
                }
            };
            tracing::info!(worker = %worker_name, exit_code = code, "worker exited");
            let _ = tx.send(Some(code));
        });
        self.running.lock().expect("running map poisoned").insert(
            name.to_string(),
            Running {
                kill: kill_tx,
                exited: exited.clone(),
            },
        );

        Ok(Worker {
            name: name.to_string(),
            job_id: spec.job_id,
            exited,
            console_log,
        })
    }

    /// Kills the container and waits for the runtime process to exit.
    async fn stop(&self, name: &str, runtime: &str, job: &Path) {
        let own = self
            .running
            .lock()
            .expect("running map poisoned")
            .remove(name);
        let deadline = Instant::now() + STOP_TIMEOUT;
        match own {
            Some(Running { kill, mut exited }) => {
                loop {
                    if exited.borrow().is_some() {
                        break;
                    }
                    // Repeated: a container still being created ignores an early kill.
                    self.runtime_quiet(runtime, &["kill", name, "KILL"]).await;
                    let wait = tokio::time::timeout(
                        Duration::from_millis(250),
                        exited.wait_for(|c| c.is_some()),
                    );
                    if wait.await.is_ok() || Instant::now() >= deadline {
                        break;
                    }
                }
                if exited.borrow().is_none() {
                    tracing::warn!(worker = name, "runtime did not exit, killing it");
                    let _ = kill.send(());
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        exited.wait_for(|c| c.is_some()),
                    )
                    .await;
                }
            }
            None => {
                // Not ours (server restarted): the runtime started by the previous server
                // may still run; it names the bundle dir on its command line.
                let state = self.runc_root().join(name);
                loop {
                    if state.exists() {
                        self.runtime_quiet(runtime, &["kill", name, "KILL"]).await;
                    }
                    let pids = host::pids_with_arg(job);
                    if pids.is_empty() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        for pid in pids {
                            tracing::warn!(worker = name, pid, "killing stray runtime process");
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Runs `<runtime> --root <state> <args>`; failures are expected (the container may
    /// be gone) and only logged.
    async fn runtime_quiet(&self, runtime: &str, args: &[&str]) -> Option<std::process::Output> {
        match Command::new(runtime)
            .arg("--root")
            .arg(self.runc_root())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
        {
            Ok(out) => {
                if !out.status.success() {
                    tracing::debug!(
                        runtime,
                        command = args.join(" "),
                        stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                        "runtime command failed"
                    );
                }
                Some(out)
            }
            Err(e) => {
                tracing::debug!(runtime, command = args.join(" "), error = %e, "runtime command failed");
                None
            }
        }
    }

    async fn destroy_inner(&self, name: &str) -> Result<()> {
        let job = self.job_dir(name);
        let runtime = fs::read_to_string(job.join("runtime"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_RUNTIME.to_string());

        self.stop(name, &runtime, &job).await;

        let state = self.runc_root().join(name);
        if state.exists() {
            let out = self
                .runtime_quiet(&runtime, &["delete", "--force", name])
                .await;
            // The foreground runtime may have deleted it concurrently: only a state that
            // is still there is a failure.
            if state.exists() {
                let detail = out
                    .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                    .unwrap_or_else(|| "could not run the runtime".into());
                return Err(ProviderError::Command {
                    command: format!("{runtime} delete --force {name}"),
                    detail,
                });
            }
        }

        // The network before the mounts: its namespace is one of them, and chains and
        // veth are only found (by name and owner) while they exist.
        let id: i64 = name["slate-".len()..].parse().unwrap_or(-1);
        let leftover = self
            .net_leftovers
            .lock()
            .expect("net leftovers poisoned")
            .contains(name);
        if net::netns_path(&job).exists() || net::has_veth(&self.cgroup_parent, id) || leftover {
            let (scope, dir) = (self.cgroup_parent.clone(), job.clone());
            tokio::task::spawn_blocking(move || net::teardown(&scope, id, &dir))
                .await
                .map_err(|e| ProviderError::Other(format!("network task: {e}")))??;
            self.net_leftovers
                .lock()
                .expect("net leftovers poisoned")
                .remove(name);
        }

        // Blocking work (cgroup waits, removing a big upper layer) off the async threads.
        let name = name.to_string();
        let cgroup_parent = self.cgroup_parent.clone();
        let (root, scope_lock) = (self.root.clone(), self.scope_lock.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            for dir in host::cgroup_dirs(&cgroup_parent, &name) {
                host::remove_cgroup(&dir).map_err(io_err("remove cgroup"))?;
            }
            host::unmount_all_under(&job).map_err(io_err("unmount worker"))?;
            host::detach_loops_under(&job).map_err(io_err("detach the job's disk"))?;
            host::remove_job_dir(&job).map_err(io_err("remove worker directory"))?;
            // The last worker gone: its scope (runc makes it, never removes it) goes too.
            let _guard = scope_lock.lock().unwrap_or_else(|e| e.into_inner());
            let others = fs::read_dir(&root)
                .map(|d| {
                    d.flatten()
                        .any(|e| valid_name(&e.file_name().to_string_lossy()))
                })
                .unwrap_or(false);
            if !others {
                host::remove_empty_scope(&cgroup_parent);
            }
            Ok(())
        })
        .await
        .map_err(|e| ProviderError::Other(format!("cleanup task: {e}")))??;
        Ok(())
    }
}

#[async_trait]
impl Provider for SandboxProvider {
    fn kind(&self) -> &'static str {
        "sandbox"
    }

    async fn provision(&self, spec: WorkerSpec) -> Result<Worker> {
        let started = Instant::now();
        let name = spec.job_id.resource_name();
        for dir in [self.root.clone(), self.root.join(".runc")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create worker root"))?;
        }
        let job = self.job_dir(&name);
        // Checked before anything is made: rolling back must not destroy a worker that
        // existed before this call.
        let made = {
            let _guard = self.scope_lock.lock().unwrap_or_else(|e| e.into_inner());
            fs::DirBuilder::new().mode(0o700).create(&job)
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ProviderError::Spec(format!("worker {name} already exists")));
            }
            Err(e) => return Err(io_err("create worker directory")(e)),
        }
        match self.provision_inner(&spec, &name, &job).await {
            Ok(worker) => {
                tracing::info!(
                    job.id = spec.job_id.0,
                    worker = %name,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "sandbox provisioned"
                );
                Ok(worker)
            }
            Err(e) => {
                tracing::warn!(job.id = spec.job_id.0, worker = %name, error = %e, "provision failed, rolling back");
                if let Err(undo) = self.destroy_inner(&name).await {
                    tracing::error!(worker = %name, error = %undo, "rollback of failed provision failed");
                }
                Err(e)
            }
        }
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        if !valid_name(name) {
            return Err(ProviderError::Spec(format!("invalid worker name {name:?}")));
        }
        let started = Instant::now();
        self.destroy_inner(name).await?;
        tracing::info!(
            worker = name,
            duration_ms = started.elapsed().as_millis() as u64,
            "sandbox destroyed"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names = BTreeSet::new();
        let base = self.base();
        for dir in [base.clone(), base.join(".runc")] {
            match fs::read_dir(&dir) {
                Ok(entries) => names.extend(
                    entries
                        .flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .filter(|n| valid_name(n)),
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("list workers")(e)),
            }
        }
        for mount_point in host::mounts_under(&base) {
            if let Ok(rel) = mount_point.strip_prefix(&base) {
                if let Some(first) = rel.components().next() {
                    let first = first.as_os_str().to_string_lossy();
                    if valid_name(&first) {
                        names.insert(first.into_owned());
                    }
                }
            }
        }
        // Half-made or half-removed egress networks: a veth or chains of this scope.
        let scope = self.cgroup_parent.clone();
        let net_ids = tokio::task::spawn_blocking(move || net::leftovers(&scope))
            .await
            .map_err(|e| ProviderError::Other(format!("network task: {e}")))?;
        let mut leftovers = self.net_leftovers.lock().expect("net leftovers poisoned");
        for id in net_ids {
            let name = JobId(id).resource_name();
            if valid_name(&name) {
                leftovers.insert(name.clone());
                names.insert(name);
            }
        }
        Ok(names.into_iter().collect())
    }
}

/// `slate-<digits>`: the only names this provider makes, and the only ones it touches.
/// The cgroup directory (relative to a hierarchy's root) of the workers under `root`:
/// `slate/` plus a hash of the resolved root path. Job ids are per store, so two servers
/// on one host would otherwise both make `slate/slate-1`.
pub fn cgroup_scope(root: &Path) -> String {
    let resolved = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    // FNV-1a: stable across runs and builds, which std's hasher does not promise.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in resolved.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("slate/{h:016x}")
}

pub fn valid_name(name: &str) -> bool {
    name.strip_prefix("slate-").is_some_and(|id| {
        !id.is_empty() && id.len() <= 19 && id.bytes().all(|b| b.is_ascii_digit())
    })
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ProviderError {
    move |source| ProviderError::Io {
        what: what.to_string(),
        source,
    }
}

fn mkdir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| ProviderError::Io {
            what: format!("create {}", path.display()),
            source: e,
        })
}

fn canonical_dir(path: &Path, what: &str) -> Result<PathBuf> {
    path.canonicalize()
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| ProviderError::Spec(format!("{what} {} is not a directory", path.display())))
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Creates the empty file `inside` (absolute, in-container) under `rootfs` for a bind
/// mount. Refuses symlinks on the way, so an image cannot point it outside the rootfs.
fn create_mount_point_file(rootfs: &Path, inside: &str) -> Result<()> {
    let rel = Path::new(inside.trim_start_matches('/'));
    let mut cur = rootfs.to_path_buf();
    let components: Vec<_> = rel.components().collect();
    for (i, c) in components.iter().enumerate() {
        cur.push(c);
        let last = i + 1 == components.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ProviderError::Spec(format!(
                    "image has a symlink at {}",
                    cur.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if last {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o755)
                        .open(&cur)
                        .map_err(io_err("create agent mount point"))?;
                } else {
                    mkdir(&cur)?;
                }
            }
            Err(e) => return Err(io_err("create agent mount point")(e)),
        }
    }
    Ok(())
}

/// Whether a swap limit can be set: cgroup v2, or v1 with swap accounting (`memsw`).
fn swap_accounting() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(valid_name("slate-1"));
        assert!(valid_name("slate-123456"));
        for bad in [
            "slate-",
            "slate-1/..",
            "slate-../x",
            "other-1",
            "slate-1a",
            "",
            "slate--1",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn destroy_refuses_path_tricks() {
        let root = tempfile::tempdir().unwrap();
        let p = SandboxProvider::new(root.path().to_path_buf());
        assert!(p.destroy("../etc").await.is_err());
        assert!(p.destroy("slate-1/../../x").await.is_err());
    }
}
