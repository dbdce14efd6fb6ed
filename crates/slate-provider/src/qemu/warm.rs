//! Warm pool of the qemu provider: VMs booted ahead of their job from fresh clones, agent
//! connected and idle, each bound to exactly one job when that job is provisioned.
//!
//! A warm VM boots before its job exists, so everything job-specific is bound late:
//!
//! - **Shares**: the VM exports stub directories (`shares/workspace`, `shares/cache-<i>`)
//!   and fw_cfg `opt/slate/late` tells the guest that each share's content will be in its
//!   `job/` subdirectory. At bind time slate bind-mounts the job's source tree and cache
//!   directories onto those `job/` directories; the guest mounts its shares only once the
//!   job is known (`slate-agent --prepare`), so it never sees the empty stubs. (qemu holds
//!   the share's root open from its start, so the root itself cannot be swapped.)
//! - **Agent channel and token**: qemu connects the agent's port to a socket the provider
//!   listens on (`agent.sock` in the VM's directory); the agent's `Hello` carries a token
//!   of the VM's own. At bind time the provider checks that token, connects to the job's
//!   socket, sends the `Hello` again with the job's token, and relays bytes both ways. The
//!   guest never learns the job token, and the server sees an ordinary agent.
//! - **Name**: the VM's directory `warm-<hex>` is renamed to `slate-<job id>`; its file
//!   `vm-name` keeps the name qemu runs under (`-name warm-<hex>`), so `destroy` and
//!   `list` find the process after the rename and after a crash.
//!
//! Architecture invariant: a warm VM is taken out of the pool before it is bound, so it
//! never gets a second job; a VM that exits while idle is destroyed and replaced.

use super::{CacheShare, QemuProvider, Running, CACHE_TAG_PREFIX};
use crate::{ProviderError, Result, Worker, WorkerSpec};
use slate_core::Secret;
use slate_proto::{asynch, AgentMsg};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// File in a VM's directory naming the process (`-name`) it runs as.
pub const VM_NAME_FILE: &str = "vm-name";
/// Subdirectory of each stub share that the job's content is bound onto.
const BOUND_DIR: &str = "job";
/// How long the pool waits after a warm VM failed to boot before the next try, doubled
/// up to [`MAX_BACKOFF`] while boots keep failing.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the warm VMs of one pool are booted with.
#[derive(Clone)]
pub struct WarmTemplate {
    pub pool: String,
    /// VMs kept booted and idle.
    pub size: u32,
    /// The pool's image directory now (a named image resolves to its newest version).
    pub image: Arc<dyn Fn() -> Option<PathBuf> + Send + Sync>,
    pub limits: slate_core::config::Limits,
    /// `(target, read_only)` of the pool's shared caches, in order: a job's
    /// `spec.mounts` must match them to take a warm VM.
    pub mounts: Vec<(String, bool)>,
    pub network: slate_core::config::Network,
    pub network_allow: Vec<std::net::SocketAddr>,
}

impl std::fmt::Debug for WarmTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmTemplate")
            .field("pool", &self.pool)
            .field("size", &self.size)
            .field("mounts", &self.mounts)
            .finish_non_exhaustive()
    }
}

/// A booted VM whose agent has said `Hello` and waits for its job.
pub(super) struct WarmVm {
    name: String,
    image: PathBuf,
    memory_mb: u64,
    cpus: u32,
    mounts: Vec<(String, bool)>,
    network: slate_core::config::Network,
    network_allow: Vec<std::net::SocketAddr>,
    agent_version: String,
    conn: UnixStream,
    running: Running,
}

impl WarmVm {
    pub(super) fn name_of(&self) -> &str {
        &self.name
    }
}

/// The pools' warm VMs and the tasks that keep them filled.
#[derive(Default)]
pub(super) struct WarmState {
    ready: Mutex<HashMap<String, VecDeque<WarmVm>>>,
    /// Warm names this provider is using (booting, ready or being bound): `list` does
    /// not report them as leftovers.
    owned: Mutex<HashSet<String>>,
    changed: Notify,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl WarmState {
    pub(super) fn owns(&self, name: &str) -> bool {
        self.owned
            .lock()
            .expect("warm owned poisoned")
            .contains(name)
    }

    pub(super) fn ready_count(&self, pool: &str) -> usize {
        self.ready
            .lock()
            .expect("warm ready poisoned")
            .get(pool)
            .map_or(0, |q| q.len())
    }
}

/// `warm-` and 1 to 32 lowercase hex digits: the names warm VMs run under.
pub fn valid_warm_name(name: &str) -> bool {
    name.strip_prefix("warm-").is_some_and(|h| {
        !h.is_empty()
            && h.len() <= 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn new_warm_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "warm-{nanos:x}{:x}{:04x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

fn random_token() -> io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 24];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ProviderError {
    super::io_err(what)
}

impl QemuProvider {
    /// Keeps `t.size` VMs of pool `t.pool` booted and idle until [`QemuProvider::stop_warm`].
    /// Call it after startup recovery (which destroys the warm VMs of a previous process).
    pub fn keep_warm(self: &Arc<Self>, t: WarmTemplate) {
        if t.size == 0 {
            return;
        }
        let me = self.clone();
        let task = tokio::spawn(async move { me.fill_warm(t).await });
        self.warm
            .tasks
            .lock()
            .expect("warm tasks poisoned")
            .push(task);
    }

    /// Idle warm VMs of `pool` right now.
    pub fn warm_ready(&self, pool: &str) -> usize {
        self.warm.ready_count(pool)
    }

    /// Stops keeping VMs warm and destroys every idle or booting one.
    pub async fn stop_warm(&self) {
        self.warm.stopping.store(true, Ordering::SeqCst);
        let tasks: Vec<_> = std::mem::take(&mut *self.warm.tasks.lock().expect("poisoned"));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let idle: Vec<WarmVm> = self
            .warm
            .ready
            .lock()
            .expect("warm ready poisoned")
            .drain()
            .flat_map(|(_, q)| q)
            .collect();
        for vm in idle {
            self.running
                .lock()
                .expect("running map poisoned")
                .insert(vm.name.clone(), vm.running);
        }
        let names: Vec<String> = self
            .warm
            .owned
            .lock()
            .expect("warm owned poisoned")
            .iter()
            .cloned()
            .collect();
        for name in names {
            if let Err(e) = self.destroy_inner(&name).await {
                tracing::error!(worker = %name, error = %e, "destroying warm vm");
            }
            self.warm.owned.lock().expect("poisoned").remove(&name);
        }
    }

    async fn fill_warm(self: Arc<Self>, t: WarmTemplate) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.warm.stopping.load(Ordering::SeqCst) {
                return;
            }
            // A rebuilt image makes the idle VMs stale: jobs would never match them.
            let current = (t.image)().and_then(|i| i.canonicalize().ok());
            self.reap_dead_warm(&t.pool, current.as_deref()).await;
            if self.warm.ready_count(&t.pool) >= t.size as usize {
                // Woken when a job takes a VM; the timeout notices a VM that died idle.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.warm.changed.notified())
                    .await;
                continue;
            }
            let started = Instant::now();
            match self.boot_warm(&t).await {
                Ok(vm) => {
                    tracing::info!(
                        pool = %t.pool,
                        worker = %vm.name,
                        duration_ms = started.elapsed().as_millis() as u64,
                        "warm vm ready"
                    );
                    backoff = FIRST_BACKOFF;
                    self.warm
                        .ready
                        .lock()
                        .expect("warm ready poisoned")
                        .entry(t.pool.clone())
                        .or_default()
                        .push_back(vm);
                }
                Err(e) => {
                    tracing::warn!(pool = %t.pool, error = %e, retry_in_ms = backoff.as_millis() as u64, "warm vm failed to boot");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Destroys idle VMs of `pool` that exited on their own, or that run another image
    /// than `current` (when it is known).
    async fn reap_dead_warm(&self, pool: &str, current: Option<&Path>) {
        let dead: Vec<WarmVm> = {
            let mut ready = self.warm.ready.lock().expect("warm ready poisoned");
            let Some(q) = ready.get_mut(pool) else {
                return;
            };
            let (dead, live): (Vec<_>, Vec<_>) = q.drain(..).partition(|vm| {
                vm.running.exited.borrow().is_some()
                    || current.is_some_and(|c| c != vm.image.as_path())
            });
            q.extend(live);
            dead
        };
        for vm in dead {
            tracing::info!(pool, worker = %vm.name, "idle warm vm exited or its image changed, replacing it");
            self.discard_warm(vm).await;
        }
    }

    async fn boot_warm(&self, t: &WarmTemplate) -> Result<WarmVm> {
        let image = (t.image)()
            .ok_or_else(|| ProviderError::Spec(format!("pool {} has no image yet", t.pool)))?;
        let image = super::canonical_dir(&image, "image")?;
        let name = new_warm_name();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("create worker root"))?;
        let dir = self.base().join(&name);
        self.warm
            .owned
            .lock()
            .expect("warm owned poisoned")
            .insert(name.clone());
        let booted = self.boot_warm_in(t, &image, &name, &dir).await;
        if booted.is_err() {
            if let Err(e) = self.destroy_inner(&name).await {
                tracing::error!(worker = %name, error = %e, "cleaning up a failed warm vm");
            }
            self.warm.owned.lock().expect("poisoned").remove(&name);
        }
        booted
    }

    async fn boot_warm_in(
        &self,
        t: &WarmTemplate,
        image: &Path,
        name: &str,
        dir: &Path,
    ) -> Result<WarmVm> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create warm vm directory"))?;
        fs::write(dir.join(VM_NAME_FILE), name).map_err(io_err("write vm-name"))?;
        let stub = |share: &str| -> Result<PathBuf> {
            let d = dir.join("shares").join(share);
            fs::create_dir_all(d.join(BOUND_DIR)).map_err(io_err("create share stub"))?;
            Ok(d)
        };
        let workspace = stub("workspace")?;
        let mut shares = Vec::new();
        for (i, (target, read_only)) in t.mounts.iter().enumerate() {
            super::check_target(target)?;
            shares.push(CacheShare {
                host: stub(&format!("cache-{i}"))?,
                tag: format!("{CACHE_TAG_PREFIX}{i}"),
                target: target.clone(),
                read_only: *read_only,
            });
        }
        let sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).map_err(io_err("listen for the warm agent"))?;
        let token = Secret::new(random_token().map_err(io_err("make a token"))?);
        let (memory_mb, cpus) = self.size_of(&t.limits);
        let mut running = self
            .boot(super::Boot {
                name,
                dir,
                image,
                memory_mb,
                cpus,
                agent_socket: &sock,
                token: token.expose(),
                workspace: Some(&workspace),
                shares: &shares,
                late: true,
                network: t.network,
                allow: &t.network_allow,
            })
            .await?;

        let within = self.cfg.boot_timeout;
        let hello = async {
            let (mut conn, _) = listener.accept().await?;
            let msg: AgentMsg = asynch::read_frame(&mut conn)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            io::Result::Ok((conn, msg))
        };
        let exited = running.exited.clone();
        let outcome = tokio::select! {
            r = tokio::time::timeout(within, hello) => r,
            code = async {
                let mut e = exited;
                e.wait_for(|c| c.is_some()).await.ok().and_then(|c| *c)
            } => {
                return Err(ProviderError::Other(format!(
                    "warm vm {name} exited (code {code:?}) before its agent connected; console:\n{}",
                    super::console_tail(&dir.join("console.log"))
                )));
            }
        };
        let (conn, msg) = match outcome {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(ProviderError::Other(format!(
                    "warm vm {name}: reading the agent's hello: {e}"
                )))
            }
            Err(_) => {
                return Err(ProviderError::Other(format!(
                    "warm vm {name}: agent did not connect within {} s; console:\n{}",
                    within.as_secs(),
                    super::console_tail(&dir.join("console.log"))
                )))
            }
        };
        let AgentMsg::Hello {
            token: said,
            agent_version,
            ..
        } = msg
        else {
            return Err(ProviderError::Other(format!(
                "warm vm {name}: the agent's first message is not hello"
            )));
        };
        if said.as_bytes() != token.expose().as_bytes() {
            return Err(ProviderError::Other(format!(
                "warm vm {name}: the agent presented a wrong token"
            )));
        }
        running.proxy = None;
        Ok(WarmVm {
            name: name.to_string(),
            image: image.to_path_buf(),
            memory_mb,
            cpus,
            mounts: t.mounts.clone(),
            network: t.network,
            network_allow: t.network_allow.clone(),
            agent_version,
            conn,
            running,
        })
    }

    /// An idle warm VM of `spec.pool` booted exactly as `spec` asks, taken out of the pool.
    pub(super) fn take_warm(&self, spec: &WorkerSpec) -> Option<WarmVm> {
        // The workspace share is always bound; a job without a tree boots cold.
        spec.source.as_ref()?;
        let image = spec.image.canonicalize().ok()?;
        let (memory_mb, cpus) = self.size_of(&spec.limits);
        let mounts: Vec<(String, bool)> = spec
            .mounts
            .iter()
            .map(|m| (m.target.clone(), m.read_only))
            .collect();
        let mut ready = self.warm.ready.lock().expect("warm ready poisoned");
        let q = ready.get_mut(&spec.pool)?;
        let at = q.iter().position(|vm| {
            vm.running.exited.borrow().is_none()
                && vm.image == image
                && vm.memory_mb == memory_mb
                && vm.cpus == cpus
                && vm.mounts == mounts
                && vm.network == spec.network
                && vm.network_allow == spec.network_allow
        })?;
        let vm = q.remove(at);
        drop(ready);
        // The pool refills now, not at its next poll.
        self.warm.changed.notify_waiters();
        vm
    }

    /// Makes `vm` the worker `name` of `spec`'s job: renames its directory, binds the
    /// job's tree and caches into its shares, and relays its agent to the job's socket.
    pub(super) async fn bind_warm(
        &self,
        vm: WarmVm,
        spec: &WorkerSpec,
        shares: &[CacheShare],
        name: &str,
    ) -> Result<Worker> {
        let base = self.base();
        let (from, job) = (base.join(&vm.name), base.join(name));
        if fs::symlink_metadata(&job).is_ok() {
            self.discard_warm(vm).await;
            return Err(ProviderError::Spec(format!("worker {name} already exists")));
        }
        if let Err(e) = fs::rename(&from, &job) {
            self.discard_warm(vm).await;
            return Err(io_err("rename the warm vm")(e));
        }
        let WarmVm {
            name: warm_name,
            agent_version,
            conn,
            running,
            ..
        } = vm;
        // From here the VM is the job's: destroy(name) stops it (vm-name says how).
        self.running
            .lock()
            .expect("running map poisoned")
            .insert(name.to_string(), running);
        self.warm
            .owned
            .lock()
            .expect("warm owned poisoned")
            .remove(&warm_name);
        match self
            .relay_to_job(conn, agent_version, spec, shares, name, &job)
            .await
        {
            Ok(worker) => Ok(worker),
            Err(e) => {
                if let Err(undo) = self.destroy_inner(name).await {
                    tracing::error!(worker = %name, error = %undo, "destroying a half-bound warm vm");
                }
                Err(e)
            }
        }
    }

    async fn relay_to_job(
        &self,
        mut conn: UnixStream,
        agent_version: String,
        spec: &WorkerSpec,
        shares: &[CacheShare],
        name: &str,
        job: &Path,
    ) -> Result<Worker> {
        let source = spec
            .source
            .as_ref()
            .map(|s| super::canonical_dir(s, "source"))
            .transpose()?
            .ok_or_else(|| ProviderError::Spec("a warm vm needs a source tree".into()))?;
        let mut binds = vec![(source, job.join("shares/workspace").join(BOUND_DIR))];
        for (i, s) in shares.iter().enumerate() {
            binds.push((
                s.host.clone(),
                job.join("shares")
                    .join(format!("cache-{i}"))
                    .join(BOUND_DIR),
            ));
        }
        for (host, at) in &binds {
            bind_mount(host, at).map_err(|e| ProviderError::Io {
                what: format!("bind {} into the warm vm", host.display()),
                source: e,
            })?;
        }

        let mut server = UnixStream::connect(&spec.agent_socket)
            .await
            .map_err(io_err("connect to the job's agent socket"))?;
        let hello = AgentMsg::Hello {
            protocol: slate_proto::PROTOCOL_VERSION,
            token: spec.agent_token.expose().to_string(),
            agent_version,
            resume_after: 0,
        };
        asynch::write_frame(&mut server, &hello)
            .await
            .map_err(|e| ProviderError::Other(format!("sending the agent's hello: {e}")))?;
        let worker = name.to_string();
        let relay = tokio::spawn(async move {
            match tokio::io::copy_bidirectional(&mut conn, &mut server).await {
                Ok((up, down)) => {
                    tracing::debug!(worker = %worker, up, down, "warm vm relay ended")
                }
                Err(e) => tracing::debug!(worker = %worker, error = %e, "warm vm relay ended"),
            }
        });
        let exited = {
            let mut map = self.running.lock().expect("running map poisoned");
            let r = map.get_mut(name).ok_or_else(|| {
                ProviderError::Other(format!("worker {name} was destroyed while binding"))
            })?;
            r.proxy = Some(relay.abort_handle());
            r.exited.clone()
        };
        Ok(Worker {
            name: name.to_string(),
            job_id: spec.job_id,
            exited,
            console_log: job.join("console.log"),
        })
    }

    /// Destroys a warm VM that is out of the pool and not bound to a job.
    async fn discard_warm(&self, vm: WarmVm) {
        let name = vm.name.clone();
        self.running
            .lock()
            .expect("running map poisoned")
            .insert(name.clone(), vm.running);
        let _ = self.destroy_inner(&name).await;
        self.warm.owned.lock().expect("poisoned").remove(&name);
    }
}

/// Bind-mounts `host` onto `at` (a directory), not following a symlink at `at`.
fn bind_mount(host: &Path, at: &Path) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let meta = fs::symlink_metadata(at)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            at.display()
        )));
    }
    mount(
        Some(host),
        at,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_names_are_made_and_validated() {
        let a = new_warm_name();
        let b = new_warm_name();
        assert_ne!(a, b);
        assert!(valid_warm_name(&a), "{a}");
        for bad in ["warm-", "warm-XYZ", "warm-../x", "slate-1", "warm-1/2", ""] {
            assert!(!valid_warm_name(bad), "{bad}");
        }
    }
}
