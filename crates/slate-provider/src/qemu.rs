//! QEMU provider: each worker is a VM booted from a qcow2 overlay of the pool's base disk.
//!
//! The pool image (`spec.image`) is a directory: `disk.qcow2` (the base, never written),
//! `vmlinuz`, `initrd.img`, and optionally `cmdline` (kernel arguments after
//! `console=ttyS0 panic=-1`; default `root=/dev/vda rw`). Layout of a worker `slate-<id>`:
//!
//! ```text
//! <root>/slate-<id>/disk.qcow2    overlay backed by <image>/disk.qcow2 (qemu-img create -b)
//!                  /token         the job token (0600), exposed as fw_cfg opt/slate/token
//!                  /mounts        the shared-cache mounts, exposed as fw_cfg opt/slate/mounts
//!                  /console.log   serial console + qemu's own stderr
//!                  /qmp.sock      QMP, used by destroy
//!                  /qemu.pid      qemu's pidfile
//! ```
//!
//! The guest sees: `/dev/vda` (the overlay), a virtio-serial port `org.slate.agent` that
//! qemu connects, as a client, to `spec.agent_socket`; the source tree as the read-only
//! 9p share `workspace`; no network. `spec.agent_binary` is not used: a VM image carries
//! its own agent. See `slate_testkit::vm_image` for a guest that does all this.
//!
//! Shared caches: `spec.mounts[i]` is the 9p share `slate-cache-<i>` of its host directory
//! (`readonly=on` in qemu when read-only, so a guest remounting it rw still cannot write),
//! and fw_cfg `opt/slate/mounts` lists one `slate-cache-<i> <target> ro|rw` line per mount
//! for the guest to mount in that order. A read-write share writes straight into the host
//! directory (an overlay's merged dir puts the writes in its upper layer).
//!
//! Architecture invariant: a process is only ever signalled after `/proc/<pid>/cmdline`
//! shows `-name slate-<id>` and a path inside this provider's root.

mod host;
mod warm;

pub use warm::{valid_warm_name, WarmTemplate};

use crate::sandbox::valid_name;
use crate::{Provider, ProviderError, Result, Worker, WorkerMount, WorkerSpec};
use async_trait::async_trait;
use slate_core::config::Network;
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
use tokio::sync::{oneshot, watch, OnceCell};

/// How long `destroy` lets qemu quit over QMP before it kills it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `destroy` waits for a killed qemu to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a kernel may take to print its first line under KVM before KVM is judged
/// unusable. A working KVM prints within a fraction of a second.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Unix socket paths longer than this do not fit `sockaddr_un`.
const MAX_SOCKET_PATH: usize = 107;
/// Kernel arguments when the image has no `cmdline` file.
const DEFAULT_CMDLINE: &str = "root=/dev/vda rw";
/// Name of the virtio-serial port the agent opens in the guest.
pub const AGENT_PORT: &str = "org.slate.agent";
/// fw_cfg entry holding the job token.
pub const TOKEN_FW_CFG: &str = "opt/slate/token";
/// 9p mount tag of the source tree.
pub const WORKSPACE_TAG: &str = "workspace";
/// fw_cfg entry listing the shared-cache mounts, one `<tag> <target> ro|rw` line each.
pub const MOUNTS_FW_CFG: &str = "opt/slate/mounts";
/// fw_cfg entry listing an egress VM's forwards, one `<guest ip:port> <endpoint>` line each.
pub const FORWARDS_FW_CFG: &str = "opt/slate/forwards";
/// The guest reaches `network_allow[i]` at this address plus `i` (qemu's user network is
/// 10.0.2.0/24; the guest is .15, the gateway .2, DNS .3).
const FIRST_FORWARD: [u8; 4] = [10, 0, 2, 100];
/// Forwards fit in 10.0.2.100–10.0.2.199.
const MAX_FORWARDS: usize = 100;
/// fw_cfg entry present when every share's content is in its `job/` subdirectory.
pub const LATE_FW_CFG: &str = "opt/slate/late";
/// 9p mount tag of `spec.mounts[i]` is this prefix followed by `i`.
pub const CACHE_TAG_PREFIX: &str = "slate-cache-";
/// Each mount is a PCI device; the `pc` machine has 32 slots in all.
const MAX_MOUNTS: usize = 16;

/// Which accelerator qemu uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM if a kernel really boots under it (probed once), else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Accel {
    fn as_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::Auto => "tcg",
        }
    }
}

/// Per-provider VM settings (the pool's limits override memory and cpus).
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Guest memory when the pool sets no memory limit.
    pub memory_mb: u64,
    /// Guest CPUs when the pool sets no CPU limit.
    pub cpus: u32,
    /// How long a VM may take to boot and connect its agent. The server enforces it; the
    /// provider only carries it for its callers.
    pub boot_timeout: Duration,
    pub qemu_binary: String,
    pub accel: Accel,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            memory_mb: 512,
            cpus: 1,
            boot_timeout: Duration::from_secs(120),
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Auto,
        }
    }
}

/// A qemu process started by this provider.
struct Running {
    /// Asks the waiter task to SIGKILL qemu itself.
    kill: oneshot::Sender<()>,
    exited: watch::Receiver<Option<i32>>,
    /// A warm VM's relay between its agent and the job's socket, stopped with the VM.
    proxy: Option<tokio::task::AbortHandle>,
}

/// What one qemu process is started with.
struct Boot<'a> {
    /// `-name`: the worker (`slate-<id>`) or warm VM (`warm-<hex>`) name.
    name: &'a str,
    dir: &'a Path,
    /// The image directory, resolved.
    image: &'a Path,
    memory_mb: u64,
    cpus: u32,
    /// The socket qemu connects the agent's port to.
    agent_socket: &'a Path,
    token: &'a str,
    /// Host directory shared as the `workspace` tag.
    workspace: Option<&'a Path>,
    shares: &'a [CacheShare],
    /// The shares are stubs whose content is bound into their `job/` subdirectory once a
    /// job takes the VM (warm VMs); fw_cfg `opt/slate/late` tells the guest.
    late: bool,
    network: Network,
    /// With [`Network::Egress`]: the only endpoints the guest can reach.
    allow: &'a [std::net::SocketAddr],
}

/// Runs each worker as a qemu VM on a qcow2 overlay of the pool's base disk.
pub struct QemuProvider {
    root: PathBuf,
    cfg: QemuConfig,
    accel: OnceCell<Accel>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    warm: Arc<warm::WarmState>,
}

impl QemuProvider {
    /// `root` is slate's directory for VM workers (`<data_dir>/vm-workers`); created on
    /// first provision.
    pub fn new(root: PathBuf, cfg: QemuConfig) -> Self {
        let _ = fs::create_dir_all(&root);
        Self {
            root,
            cfg,
            accel: OnceCell::new(),
            running: Arc::default(),
            warm: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &QemuConfig {
        &self.cfg
    }

    /// The accelerator VMs of this provider use, resolving [`Accel::Auto`] on first call
    /// by booting `image`'s kernel under KVM for up to a few seconds (a present and
    /// openable `/dev/kvm` is not proof: under nested PVM a kernel never boots). Call it
    /// at startup to keep the probe off the first job's path.
    pub async fn accel(&self, image: &Path) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let chosen = match self.cfg.accel {
                    Accel::Auto => probe(&self.cfg.qemu_binary, &image.join("vmlinuz")).await,
                    fixed => fixed,
                };
                tracing::info!(accel = chosen.as_arg(), "qemu accelerator chosen");
                chosen
            })
            .await
    }

    /// The root, resolved: qemu gets absolute paths, and /proc shows them.
    fn base(&self) -> PathBuf {
        self.root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone())
    }

    async fn provision_inner(
        &self,
        spec: &WorkerSpec,
        shares: &[CacheShare],
        name: &str,
        job: &Path,
    ) -> Result<Worker> {
        let image = canonical_dir(&spec.image, "image")?;
        let source = spec
            .source
            .as_ref()
            .map(|s| canonical_dir(s, "source"))
            .transpose()?;
        let (memory_mb, cpus) = self.size_of(&spec.limits);
        let running = self
            .boot(Boot {
                name,
                dir: job,
                image: &image,
                memory_mb,
                cpus,
                agent_socket: &absolute(&spec.agent_socket),
                token: spec.agent_token.expose(),
                workspace: source.as_deref(),
                shares,
                late: false,
                network: spec.network,
                allow: &spec.network_allow,
            })
            .await?;
        let exited = running.exited.clone();
        self.running
            .lock()
            .expect("running map poisoned")
            .insert(name.to_string(), running);
        Ok(Worker {
            name: name.to_string(),
            job_id: spec.job_id,
            exited,
            console_log: job.join("console.log"),
        })
    }

    /// Guest memory (MiB) and CPUs for a pool's limits.
    fn size_of(&self, limits: &slate_core::config::Limits) -> (u64, u32) {
        let memory_mb = limits
            .memory_bytes
            .map(|b| b.div_ceil(1 << 20))
            .unwrap_or(self.cfg.memory_mb);
        let cpus = limits
            .cpus
            .map(|c| c.ceil().max(1.0) as u32)
            .unwrap_or(self.cfg.cpus);
        (memory_mb, cpus)
    }

    /// Creates the overlay, token and mounts files in `b.dir` and starts qemu.
    async fn boot(&self, b: Boot<'_>) -> Result<Running> {
        let Boot {
            name,
            dir: job,
            image,
            memory_mb,
            cpus,
            agent_socket,
            token,
            workspace,
            shares,
            late,
            network,
            allow,
        } = b;
        let netdev = match network {
            Network::None => None,
            Network::Egress => Some(egress_netdev(allow)?),
        };
        let base_disk = image_file(image, "disk.qcow2")?;
        let kernel = image_file(image, "vmlinuz")?;
        let initrd = image_file(image, "initrd.img")?;
        let extra = match fs::read_to_string(image.join("cmdline")) {
            Ok(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
            Err(e) if e.kind() == io::ErrorKind::NotFound => DEFAULT_CMDLINE.to_string(),
            Err(e) => return Err(io_err("read image cmdline")(e)),
        };
        let qmp = job.join("qmp.sock");
        for sock in [agent_socket, &qmp] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(ProviderError::Spec(format!(
                    "socket path {} is too long for a unix socket",
                    sock.display()
                )));
            }
        }
        for p in [agent_socket, &base_disk, &kernel, &initrd, job] {
            // qemu's option syntax splits on commas.
            if p.to_string_lossy().contains(',') {
                return Err(ProviderError::Spec(format!(
                    "path {} contains a comma",
                    p.display()
                )));
            }
        }
        if let Some(s) = workspace {
            if s.to_string_lossy().contains(',') {
                return Err(ProviderError::Spec(format!(
                    "source {} contains a comma",
                    s.display()
                )));
            }
        }

        let disk = job.join("disk.qcow2");
        let started = Instant::now();
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base_disk)
            .arg(&disk)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_err("run qemu-img"))?;
        if !out.status.success() {
            return Err(ProviderError::Command {
                command: "qemu-img create".into(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        tracing::debug!(
            worker = name,
            duration_ms = started.elapsed().as_millis() as u64,
            "overlay created"
        );

        let token_file = job.join("token");
        write_private(&token_file, token.as_bytes()).map_err(io_err("write token"))?;
        let mounts_file = job.join("mounts");
        if !shares.is_empty() {
            write_private(&mounts_file, mounts_listing(shares).as_bytes())
                .map_err(io_err("write mounts"))?;
        }
        let late_file = job.join("late");
        if late {
            write_private(&late_file, b"job\n").map_err(io_err("write late"))?;
        }

        let console_log = job.join("console.log");
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&console_log)
            .map_err(io_err("open console.log"))?;

        let accel = self.accel(image).await;

        let mut cmd = Command::new(&self.cfg.qemu_binary);
        cmd.arg("-name").arg(name);
        cmd.args(["-accel", accel.as_arg(), "-M", "pc"]);
        if accel == Accel::Kvm {
            cmd.args(["-cpu", "host"]);
        }
        cmd.arg("-m")
            .arg(memory_mb.to_string())
            .arg("-smp")
            .arg(cpus.to_string())
            .args(["-nodefaults", "-no-reboot", "-display", "none"]);
        match &netdev {
            None => {
                cmd.args(["-nic", "none"]);
            }
            Some(n) => {
                cmd.arg("-netdev")
                    .arg(&n.arg)
                    .args(["-device", "virtio-net-pci,netdev=net0"]);
                let f = job.join("forwards");
                write_private(&f, n.listing.as_bytes()).map_err(io_err("write forwards"))?;
                cmd.arg("-fw_cfg")
                    .arg(format!("name={FORWARDS_FW_CFG},file={}", f.display()));
            }
        }
        cmd.arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 panic=-1 {extra}"))
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                console_log.display()
            ))
            .args(["-serial", "chardev:console"])
            // cache=unsafe: the overlay is thrown away with the worker, flushes buy nothing.
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=virtio,cache=unsafe",
                disk.display()
            ))
            .args(["-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={}", agent_socket.display()))
            .arg("-device")
            .arg(format!("virtserialport,chardev=agent,name={AGENT_PORT}"))
            .arg("-fw_cfg")
            .arg(format!("name={TOKEN_FW_CFG},file={}", token_file.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-pidfile")
            .arg(job.join("qemu.pid"));
        // A late share's content is a bind mount inside it: another device, whose inode
        // numbers must not collide with the stub's in the guest.
        let multidevs = if late { ",multidevs=remap" } else { "" };
        if let Some(source) = workspace {
            cmd.arg("-virtfs").arg(format!(
                "local,path={},mount_tag={WORKSPACE_TAG},security_model=none,readonly=on{multidevs}",
                source.display()
            ));
        }
        for share in shares {
            cmd.arg("-virtfs").arg(format!(
                "local,path={},mount_tag={},security_model=none{}{multidevs}",
                share.host.display(),
                share.tag,
                if share.read_only { ",readonly=on" } else { "" }
            ));
        }
        if !shares.is_empty() {
            cmd.arg("-fw_cfg").arg(format!(
                "name={MOUNTS_FW_CFG},file={}",
                mounts_file.display()
            ));
        }
        if late {
            cmd.arg("-fw_cfg")
                .arg(format!("name={LATE_FW_CFG},file={}", late_file.display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(console)
            .spawn()
            .map_err(|e| ProviderError::Io {
                what: format!("spawn {}", self.cfg.qemu_binary),
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
                    tracing::error!(worker = %worker_name, error = %e, "waiting for qemu failed");
                    -1
                }
            };
            tracing::info!(worker = %worker_name, exit_code = code, "vm exited");
            let _ = tx.send(Some(code));
        });
        Ok(Running {
            kill: kill_tx,
            exited,
            proxy: None,
        })
    }

    /// Stops the worker's qemu: QMP `quit`, then SIGKILL, and waits until it is gone.
    async fn stop(&self, name: &str, job: &Path) {
        let base = self.base();
        let own = self
            .running
            .lock()
            .expect("running map poisoned")
            .remove(name);
        if let Some(relay) = own.as_ref().and_then(|r| r.proxy.as_ref()) {
            relay.abort();
        }
        // A VM that was warm runs under its warm name (`-name warm-…`).
        let vm_name = vm_name_of(job).unwrap_or_else(|| name.to_string());
        let pids = || -> Vec<i32> {
            let mut pids: BTreeSet<i32> = host::scan(&base)
                .into_iter()
                .filter(|(_, n)| *n == vm_name)
                .map(|(p, _)| p)
                .collect();
            pids.extend(host::verified_pid(&job.join("qemu.pid"), &vm_name, &base));
            pids.into_iter().filter(|p| host::alive(*p)).collect()
        };
        let gone = |own: &Option<Running>| {
            own.as_ref().is_none_or(|r| r.exited.borrow().is_some()) && pids().is_empty()
        };
        if gone(&own) {
            return;
        }

        let qmp = job.join("qmp.sock");
        if qmp.exists() {
            match tokio::time::timeout(QUIT_TIMEOUT, host::qmp_quit(&qmp)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(worker = name, error = %e, "qmp quit failed"),
                Err(_) => tracing::debug!(worker = name, "qmp quit timed out"),
            }
        }
        if wait_until(QUIT_TIMEOUT, || gone(&own)).await {
            return;
        }

        tracing::warn!(worker = name, "qemu did not quit, killing it");
        for pid in pids() {
            // Re-verified right before the signal: the pid must still be this worker.
            if host::worker_of(&host::cmdline(pid).unwrap_or_default(), &base).as_deref()
                == Some(vm_name.as_str())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let own = own.map(|r| {
            let _ = r.kill.send(());
            Some(r.exited)
        });
        let own_gone = || {
            own.as_ref()
                .and_then(|o| o.as_ref())
                .is_none_or(|e| e.borrow().is_some())
        };
        if !wait_until(KILL_TIMEOUT, || own_gone() && pids().is_empty()).await {
            tracing::error!(worker = name, "qemu still running after SIGKILL");
        }
    }

    async fn destroy_inner(&self, name: &str) -> Result<()> {
        let job = self.base().join(name);
        self.stop(name, &job).await;
        // A VM that was warm has the job's tree and caches bound into its shares: they
        // are unmounted first, and the removal never crosses into a mount.
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::sandbox::host::unmount_all_under(&job)
                .map_err(io_err("unmount the worker's shares"))?;
            crate::sandbox::host::remove_job_dir(&job).map_err(io_err("remove worker directory"))
        })
        .await
        .map_err(|e| ProviderError::Other(format!("cleanup task: {e}")))?
    }
}

/// Resolves [`Accel::Auto`], remembering the answer per qemu binary for the process (a
/// probe costs seconds when KVM does not work).
async fn probe(qemu: &str, kernel: &Path) -> Accel {
    static CACHE: Mutex<Option<HashMap<String, Accel>>> = Mutex::new(None);
    if let Some(a) = CACHE
        .lock()
        .expect("accel cache poisoned")
        .get_or_insert_with(HashMap::new)
        .get(qemu)
    {
        return *a;
    }
    let started = Instant::now();
    let accel = if host::kvm_openable()
        && host::kernel_speaks(qemu, "kvm", kernel, KVM_PROBE_TIMEOUT).await
    {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(
        accel = accel.as_arg(),
        duration_ms = started.elapsed().as_millis() as u64,
        "kvm probe done"
    );
    CACHE
        .lock()
        .expect("accel cache poisoned")
        .get_or_insert_with(HashMap::new)
        .insert(qemu.to_string(), accel);
    accel
}

/// Polls `done` every 20 ms for up to `within`; whether it became true.
async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn provision(&self, spec: WorkerSpec) -> Result<Worker> {
        let started = Instant::now();
        let name = spec.job_id.resource_name();
        // Refused before anything exists, so a bad spec leaves nothing behind.
        if spec.network == Network::Egress {
            egress_netdev(&spec.network_allow)?;
        }
        let shares = cache_shares(&spec.mounts)?;
        if let Some(vm) = self.take_warm(&spec) {
            let warm_name = vm.name_of().to_string();
            match self.bind_warm(vm, &spec, &shares, &name).await {
                Ok(worker) => {
                    tracing::info!(
                        job.id = spec.job_id.0,
                        worker = %name,
                        warm = %warm_name,
                        duration_ms = started.elapsed().as_millis() as u64,
                        "warm vm bound"
                    );
                    return Ok(worker);
                }
                // bind_warm cleaned up what it made; the job still gets a fresh VM: a
                // cold one (unless the worker exists already, which the cold path refuses).
                Err(e) => {
                    tracing::warn!(job.id = spec.job_id.0, worker = %name, error = %e, "binding a warm vm failed, booting a cold one")
                }
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("create worker root"))?;
        let job = self.base().join(&name);
        // Checked before anything is made: rolling back must not destroy a worker that
        // existed before this call.
        match fs::DirBuilder::new().mode(0o700).create(&job) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ProviderError::Spec(format!("worker {name} already exists")));
            }
            Err(e) => return Err(io_err("create worker directory")(e)),
        }
        match self.provision_inner(&spec, &shares, &name, &job).await {
            Ok(worker) => {
                tracing::info!(
                    job.id = spec.job_id.0,
                    worker = %name,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "vm provisioned"
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
        if !is_vm_name(name) {
            return Err(ProviderError::Spec(format!("invalid worker name {name:?}")));
        }
        let started = Instant::now();
        self.destroy_inner(name).await?;
        tracing::info!(
            worker = name,
            duration_ms = started.elapsed().as_millis() as u64,
            "vm destroyed"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let base = self.base();
        let mut names = BTreeSet::new();
        // Directory name by process name, for VMs that were warm before their job.
        let mut by_vm_name = HashMap::new();
        match fs::read_dir(&base) {
            Ok(entries) => {
                for n in entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                {
                    if valid_name(&n) {
                        if let Some(vm) = vm_name_of(&base.join(&n)) {
                            by_vm_name.insert(vm, n.clone());
                        }
                        names.insert(n);
                    } else if valid_warm_name(&n) && !self.warm.owns(&n) {
                        names.insert(n);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list workers")(e)),
        }
        for (_, n) in host::scan(&base) {
            if let Some(dir) = by_vm_name.get(&n) {
                names.insert(dir.clone());
            } else if valid_name(&n) || !self.warm.owns(&n) {
                names.insert(n);
            }
        }
        Ok(names.into_iter().collect())
    }
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ProviderError {
    move |source| ProviderError::Io {
        what: what.to_string(),
        source,
    }
}

fn canonical_dir(path: &Path, what: &str) -> Result<PathBuf> {
    path.canonicalize()
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| ProviderError::Spec(format!("{what} {} is not a directory", path.display())))
}

/// A validated `spec.mounts[i]`: its resolved host directory and 9p tag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheShare {
    host: PathBuf,
    tag: String,
    target: String,
    read_only: bool,
}

/// Checks every mount and names its share; the first bad one is a [`ProviderError::Spec`].
fn cache_shares(mounts: &[WorkerMount]) -> Result<Vec<CacheShare>> {
    if mounts.len() > MAX_MOUNTS {
        return Err(ProviderError::Spec(format!(
            "{} mounts, a VM takes at most {MAX_MOUNTS}",
            mounts.len()
        )));
    }
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            check_target(&m.target)?;
            let host = canonical_dir(&m.host_path, "mount source")?;
            // qemu's option syntax splits on commas (checked after symlinks are resolved).
            if host.to_string_lossy().contains(',') {
                return Err(ProviderError::Spec(format!(
                    "mount source {} contains a comma",
                    host.display()
                )));
            }
            Ok(CacheShare {
                host,
                tag: format!("{CACHE_TAG_PREFIX}{i}"),
                target: m.target.clone(),
                read_only: m.read_only,
            })
        })
        .collect()
}

/// A mount target must be an absolute path other than `/`, without `..` (the guest
/// resolves it, not slate) and without whitespace or control characters (the guest reads
/// the mounts list as space-separated lines).
fn check_target(target: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(ProviderError::Spec(format!(
            "mount target {target:?} {why}"
        )))
    };
    if !target.starts_with('/') {
        return bad("is not an absolute path");
    }
    if target.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or a control character");
    }
    if target.split('/').any(|c| c == "..") {
        return bad("contains `..`");
    }
    if target.split('/').all(|c| c.is_empty() || c == ".") {
        return bad("is the root directory");
    }
    Ok(())
}

/// The fw_cfg `opt/slate/mounts` content: `<tag> <target> ro|rw` per line, in order.
fn mounts_listing(shares: &[CacheShare]) -> String {
    shares
        .iter()
        .map(|s| {
            format!(
                "{} {} {}\n",
                s.tag,
                s.target,
                if s.read_only { "ro" } else { "rw" }
            )
        })
        .collect()
}

fn image_file(image: &Path, file: &str) -> Result<PathBuf> {
    let p = image.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ProviderError::Spec(format!(
            "image {} has no {file}",
            image.display()
        )))
    }
}

/// qemu's user-mode network for an egress VM.
struct EgressNetdev {
    /// The `-netdev` value.
    arg: String,
    /// The fw_cfg forwards listing.
    listing: String,
}

/// `-netdev user,restrict=on` (the guest reaches nothing on its own) with one
/// `guestfwd` per allowed endpoint: a connection to the guest-side address runs `socat`
/// on the host to that endpoint.
fn egress_netdev(allow: &[std::net::SocketAddr]) -> Result<EgressNetdev> {
    if allow.len() > MAX_FORWARDS {
        return Err(ProviderError::Spec(format!(
            "{} allowed endpoints, a VM takes at most {MAX_FORWARDS}",
            allow.len()
        )));
    }
    if !allow.is_empty() && !on_path("socat") {
        return Err(ProviderError::Spec(
            "network = \"egress\" with network_allow needs socat on the host (apt-get install socat)"
                .into(),
        ));
    }
    let mut arg = "user,id=net0,restrict=on,ipv6=off".to_string();
    let mut listing = String::new();
    for (i, a) in allow.iter().enumerate() {
        let [x, y, z, w] = FIRST_FORWARD;
        let guest = format!("{x}.{y}.{z}.{}:{}", w as usize + i, a.port());
        let target = match a {
            std::net::SocketAddr::V4(v4) => format!("TCP4:{}:{}", v4.ip(), v4.port()),
            std::net::SocketAddr::V6(v6) => format!("TCP6:[{}]:{}", v6.ip(), v6.port()),
        };
        arg.push_str(&format!(",guestfwd=tcp:{guest}-cmd:socat STDIO {target}"));
        listing.push_str(&format!("{guest} {a}\n"));
    }
    Ok(EgressNetdev { arg, listing })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A worker name this provider makes: `slate-<id>`, or `warm-<hex>` for a VM booted
/// before its job.
fn is_vm_name(name: &str) -> bool {
    valid_name(name) || valid_warm_name(name)
}

/// The name qemu runs under for the worker in `dir` when it differs from the directory's
/// (a VM that was warm).
fn vm_name_of(dir: &Path) -> Option<String> {
    let n = fs::read_to_string(dir.join(warm::VM_NAME_FILE)).ok()?;
    let n = n.trim();
    valid_warm_name(n).then(|| n.to_string())
}

/// The last few KB of a console log, for error messages.
fn console_tail(path: &Path) -> String {
    const TAIL: usize = 2048;
    let bytes = fs::read(path).unwrap_or_default();
    let from = bytes.len().saturating_sub(TAIL);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// `path` made absolute without resolving symlinks (the socket may not exist yet).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_become_numbered_shares_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let m = |host: &Path, target: &str, read_only| WorkerMount {
            host_path: host.to_path_buf(),
            target: target.into(),
            read_only,
        };
        let shares =
            cache_shares(&[m(&a, "/srv/mirror", true), m(&b, "/var/cache/d", false)]).unwrap();
        assert_eq!(shares[0].host, a.canonicalize().unwrap());
        assert_eq!(shares[1].tag, "slate-cache-1");
        assert_eq!(
            mounts_listing(&shares),
            "slate-cache-0 /srv/mirror ro\nslate-cache-1 /var/cache/d rw\n"
        );
        assert!(cache_shares(&[]).unwrap().is_empty());

        for target in [
            "relative/dir",
            "",
            "/",
            "//.",
            "/a/../etc",
            "/..",
            "/a b",
            "/a\tb",
            "/a\nslate-cache-9 /etc rw",
        ] {
            let err = cache_shares(&[m(&a, target, false)]).unwrap_err();
            assert!(
                matches!(&err, ProviderError::Spec(s) if s.contains("mount target")),
                "{target:?}: {err}"
            );
        }
        let comma = dir.path().join("x,y");
        fs::create_dir_all(&comma).unwrap();
        let err = cache_shares(&[m(&comma, "/c", true)]).unwrap_err();
        assert!(err.to_string().contains("comma"), "{err}");
        // A symlink hiding a comma is resolved first.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&comma, &link).unwrap();
        assert!(cache_shares(&[m(&link, "/c", true)]).is_err());
        let err = cache_shares(&[m(&dir.path().join("missing"), "/c", true)]).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let many: Vec<_> = (0..=MAX_MOUNTS)
            .map(|i| m(&a, &format!("/c{i}"), true))
            .collect();
        assert!(cache_shares(&many).is_err());
    }

    #[tokio::test]
    async fn destroy_refuses_bad_names_and_succeeds_on_nothing() {
        let root = tempfile::tempdir().unwrap();
        let p = QemuProvider::new(root.path().to_path_buf(), QemuConfig::default());
        for bad in ["../etc", "slate-1/../../x", "slate-", "other-1", ""] {
            assert!(p.destroy(bad).await.is_err(), "{bad}");
        }
        p.destroy("slate-424242").await.unwrap();
        p.destroy("slate-424242").await.unwrap();
        assert!(p.list().await.unwrap().is_empty());
    }

    fn test_kernel() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        slate_testkit::vm_image::vm_image(dir.path()).unwrap();
        let kernel = dir.path().join("vmlinuz");
        (dir, kernel)
    }

    #[tokio::test]
    async fn the_probe_sees_a_kernel_boot_and_refuses_a_silent_one() {
        let (_dir, kernel) = test_kernel();
        let qemu = QemuConfig::default().qemu_binary;
        assert!(host::kernel_speaks(&qemu, "tcg", &kernel, Duration::from_secs(60)).await);
        // Under TCG no kernel prints within 100 ms: the probe must call that a failure.
        assert!(!host::kernel_speaks(&qemu, "tcg", &kernel, Duration::from_millis(100)).await);
        assert!(
            !host::kernel_speaks("/nonexistent/qemu", "tcg", &kernel, Duration::from_secs(5)).await
        );
    }

    #[tokio::test]
    async fn auto_accel_picks_one_that_really_boots() {
        let (dir, kernel) = test_kernel();
        let p = QemuProvider::new(dir.path().join("w"), QemuConfig::default());
        let chosen = p.accel(dir.path()).await;
        assert_ne!(chosen, Accel::Auto);
        if chosen == Accel::Kvm {
            let qemu = QemuConfig::default().qemu_binary;
            assert!(host::kernel_speaks(&qemu, "kvm", &kernel, Duration::from_secs(10)).await);
        } else if !host::kvm_openable() {
            assert_eq!(chosen, Accel::Tcg);
        }
        // Cached: asking again does not probe again.
        let again = std::time::Instant::now();
        assert_eq!(p.accel(dir.path()).await, chosen);
        assert!(again.elapsed() < Duration::from_millis(50));
    }
}
