//! libvirt provider: each worker is a transient libvirt domain on a qcow2 volume backed
//! by the pool's base disk, on one of several libvirt hosts.
//!
//! Everything goes through the `virsh` CLI (Debian's `libvirt-clients`): no libvirt C
//! bindings, so slate builds without libvirt-dev and any libvirt URI virsh reaches works.
//! The image (`spec.image`) is laid out as for the qemu provider: `disk.qcow2` (the base,
//! never written), `vmlinuz`, `initrd.img`, optional `cmdline`. For a worker `slate-<id>`:
//!
//! ```text
//! libvirt host, pool P:  volume slate-<id>.qcow2   qcow2, backing store <image>/disk.qcow2
//!                        domain slate-<id>         transient (`virsh create`)
//! <root>/slate-<id>/uri           the libvirt URI the worker was made on (written first)
//!                  /token         the job token (0600), exposed as fw_cfg opt/slate/token
//!                  /console.log   serial console (libvirt keeps qemu's own log in
//!                                 /var/log/libvirt/qemu/slate-<id>.log)
//!                  /volume.xml, domain.xml   what was handed to virsh
//! ```
//!
//! The guest sees what the qemu provider's guest sees (see `slate_testkit::vm_image`):
//! `/dev/vda`, a virtio-serial port `org.slate.agent` whose host side connects to
//! `spec.agent_socket`, the source as the read-only 9p share `workspace`, the token in
//! fw_cfg, no network interface.
//!
//! **Hosts.** `uris` may name several libvirt hosts serving one pool; each provision picks
//! the reachable one with the fewest `slate-*` domains (first listed on a tie). The volume
//! is made through libvirt's storage API (`virsh vol-create`) on that host, so the disk
//! side works on remote hosts too, but everything given as a path is a path *on that
//! host*: the base disk, kernel and initrd must exist there at the same paths (e.g. the
//! image directory on shared storage, or synced), and the console log, token file, source
//! tree and agent socket are files of the local machine, so the channel and the 9p share
//! only work for local URIs. On a remote host the agent has to dial back over TCP
//! (`[server] agent_listen`) instead of the virtio-serial channel, and the source has to
//! reach the guest some other way; the test image's init does neither.
//!
//! **Security labels.** qemu.conf is left alone: each slate domain carries
//! `<seclabel type='static' model='dac' relabel='no'>` with label `+0:+0`, so its qemu runs
//! as root like the qemu provider's, and libvirt never chowns the base, the token or the
//! source. (libvirt's default, qemu as `libvirt-qemu` with dynamic ownership, would chown
//! the base image and need the token and sockets readable by that user.) On a host with
//! AppArmor or SELinux enforcing, libvirt's profile for the domain applies on top.
//!
//! **Ownership.** Several slate servers (replicas) may share a libvirt host, so a domain
//! is this provider's only if its metadata (namespace [`xml::METADATA_NS`]) carries this
//! provider's owner id, a hash of the host name and the worker root; `list` and `destroy`
//! ignore other domains. Volumes carry no such mark: the storage pool must be this slate
//! server's own (replicas use one pool each), since `list` reports every `slate-*.qcow2`
//! volume in it.
//!
//! `Worker::exited` follows `virsh event --domain … --event lifecycle`: `Stopped Shutdown`
//! (the guest powered off) is 0, `Stopped Destroyed` is 137, other stops 1; if the event
//! stream ends first (libvirtd restarted, domain already gone), `virsh domstate` is polled
//! until the domain is gone, and an unknown end is reported as -1.

mod virsh;
mod xml;

use crate::qemu::{AGENT_PORT, TOKEN_FW_CFG, WORKSPACE_TAG};
use crate::sandbox::valid_name;
use crate::{Provider, ProviderError, Result, Worker, WorkerSpec};
use async_trait::async_trait;
use slate_core::config::Network;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use virsh::VirshError;

pub use xml::METADATA_NS;

/// Kernel arguments when the image has no `cmdline` file.
const DEFAULT_CMDLINE: &str = "root=/dev/vda rw";
/// Unix socket paths longer than this do not fit `sockaddr_un`.
const MAX_SOCKET_PATH: usize = 107;
/// How often `Worker::exited` polls a domain whose event stream ended.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How libvirt runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VirtType {
    /// `<domain type='qemu'>`: TCG, works everywhere.
    #[default]
    Qemu,
    /// `<domain type='kvm'>` with the host CPU passed through.
    Kvm,
}

impl VirtType {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtType::Qemu => "qemu",
            VirtType::Kvm => "kvm",
        }
    }
}

impl FromStr for VirtType {
    type Err = ProviderError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qemu" | "tcg" => Ok(VirtType::Qemu),
            "kvm" => Ok(VirtType::Kvm),
            other => Err(ProviderError::Spec(format!(
                "unknown libvirt virt_type {other:?} (expected \"qemu\" or \"kvm\")"
            ))),
        }
    }
}

/// Settings of a libvirt provider (the pool's limits override memory and cpus).
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// libvirt hosts serving the pool, e.g. `["qemu:///system"]`.
    pub uris: Vec<String>,
    /// Storage pool (on every host) the workers' volumes are made in; slate's own.
    pub storage_pool: String,
    /// Guest memory when the pool sets no memory limit.
    pub memory_mb: u64,
    /// Guest CPUs when the pool sets no CPU limit.
    pub cpus: u32,
    pub virt_type: VirtType,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uris: vec!["qemu:///system".into()],
            storage_pool: "default".into(),
            memory_mb: 512,
            cpus: 1,
            virt_type: VirtType::Qemu,
        }
    }
}

/// Runs each worker as a transient libvirt domain on a qcow2 volume over the base disk.
pub struct LibvirtProvider {
    root: PathBuf,
    cfg: LibvirtConfig,
    /// Human-readable owner: `<host name>:<resolved root>`.
    owner: String,
    owner_id: String,
}

impl LibvirtProvider {
    /// `root` is slate's directory for these workers (e.g. `<data_dir>/libvirt-workers`);
    /// created if missing.
    pub fn new(root: PathBuf, cfg: LibvirtConfig) -> Self {
        let _ = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root);
        let resolved = root.canonicalize().unwrap_or_else(|_| root.clone());
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let owner = format!("{host}:{}", resolved.display());
        let owner_id = xml::owner_id(&owner);
        Self {
            root,
            cfg,
            owner,
            owner_id,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &LibvirtConfig {
        &self.cfg
    }

    /// The mark this provider's domains carry in their metadata.
    pub fn owner_id(&self) -> &str {
        &self.owner_id
    }

    /// The root, resolved: libvirt gets absolute paths.
    fn base(&self) -> PathBuf {
        self.root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone())
    }

    /// The reachable host with the fewest `slate-*` domains (of any owner: they all load
    /// the host), the first listed on a tie.
    async fn pick_host(&self) -> Result<String> {
        match self.cfg.uris.as_slice() {
            [] => return Err(ProviderError::Spec("no libvirt uri configured".into())),
            [only] => return Ok(only.clone()),
            _ => {}
        }
        let mut best: Option<(usize, &String)> = None;
        let mut errors = Vec::new();
        for uri in &self.cfg.uris {
            match virsh::run(uri, &["list", "--all", "--name"]).await {
                Ok(out) => {
                    let n = virsh::worker_domains(&out).len();
                    tracing::debug!(uri = %uri, domains = n, "libvirt host load");
                    if best.is_none_or(|(m, _)| n < m) {
                        best = Some((n, uri));
                    }
                }
                Err(e) => {
                    tracing::warn!(uri = %uri, error = %e, "libvirt host unreachable, skipped");
                    errors.push(e.to_string());
                }
            }
        }
        best.map(|(_, uri)| uri.clone()).ok_or_else(|| {
            ProviderError::Other(format!("no libvirt host reachable: {}", errors.join("; ")))
        })
    }

    /// Whether the domain `name` on `uri` is this provider's: `Ok(None)` if there is no
    /// such domain.
    async fn owns(&self, uri: &str, name: &str) -> std::result::Result<Option<bool>, VirshError> {
        match virsh::run(uri, &["metadata", name, xml::METADATA_NS]).await {
            Ok(meta) => Ok(Some(xml::owned_by(&meta, &self.owner_id))),
            Err(e) if e.not_found() => Ok(None),
            // A domain without slate's metadata element is someone else's.
            Err(VirshError::Failed { detail, .. }) if detail.contains("metadata not found") => {
                Ok(Some(false))
            }
            Err(e) => Err(e),
        }
    }

    async fn provision_inner(&self, spec: &WorkerSpec, name: &str, job: &Path) -> Result<Worker> {
        let image = canonical_dir(&spec.image, "image")?;
        let base_disk = image_file(&image, "disk.qcow2")?;
        let kernel = image_file(&image, "vmlinuz")?;
        let initrd = image_file(&image, "initrd.img")?;
        let extra = match fs::read_to_string(image.join("cmdline")) {
            Ok(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
            Err(e) if e.kind() == io::ErrorKind::NotFound => DEFAULT_CMDLINE.to_string(),
            Err(e) => return Err(io_err("read image cmdline")(e)),
        };
        let source = spec
            .source
            .as_ref()
            .map(|s| canonical_dir(s, "source"))
            .transpose()?;
        let agent_socket =
            std::path::absolute(&spec.agent_socket).unwrap_or_else(|_| spec.agent_socket.clone());
        if agent_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ProviderError::Spec(format!(
                "socket path {} is too long for a unix socket",
                agent_socket.display()
            )));
        }

        let uri = self.pick_host().await?;
        // Recorded before anything is made on the host, so destroy knows where to look.
        write_private(&job.join("uri"), uri.as_bytes()).map_err(io_err("write uri"))?;
        let token = job.join("token");
        write_private(&token, spec.agent_token.expose().as_bytes())
            .map_err(io_err("write token"))?;
        let console_log = job.join("console.log");
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&console_log)
            .map_err(io_err("create console.log"))?;

        let volume = virsh::volume_name(name);
        let volume_xml = job.join("volume.xml");
        fs::write(&volume_xml, xml::volume(&volume, &base_disk))
            .map_err(io_err("write volume.xml"))?;
        let started = Instant::now();
        virsh::run(
            &uri,
            &[
                "vol-create",
                &self.cfg.storage_pool,
                &volume_xml.to_string_lossy(),
            ],
        )
        .await?;
        tracing::debug!(
            job.id = spec.job_id.0,
            uri = %uri,
            pool = %self.cfg.storage_pool,
            duration_ms = started.elapsed().as_millis() as u64,
            "volume created"
        );

        let memory_mb = spec
            .limits
            .memory_bytes
            .map(|b| b.div_ceil(1 << 20))
            .unwrap_or(self.cfg.memory_mb);
        let cpus = spec
            .limits
            .cpus
            .map(|c| c.ceil().max(1.0) as u32)
            .unwrap_or(self.cfg.cpus);
        let cmdline = format!("console=ttyS0 panic=-1 {extra}");
        let domain = xml::Domain {
            name,
            virt_type: self.cfg.virt_type.as_str(),
            owner_id: &self.owner_id,
            owner: &self.owner,
            memory_mb,
            cpus,
            kernel: &kernel,
            initrd: &initrd,
            cmdline: &cmdline,
            pool: &self.cfg.storage_pool,
            volume: &volume,
            console_log: &console_log,
            agent_socket: &agent_socket,
            agent_port: AGENT_PORT,
            token_file: &token,
            token_fw_cfg: TOKEN_FW_CFG,
            source: source.as_deref(),
            workspace_tag: WORKSPACE_TAG,
        };
        let domain_xml = job.join("domain.xml");
        fs::write(&domain_xml, domain.to_xml()).map_err(io_err("write domain.xml"))?;
        let started = Instant::now();
        virsh::run(&uri, &["create", &domain_xml.to_string_lossy()]).await?;
        tracing::debug!(
            job.id = spec.job_id.0,
            uri = %uri,
            duration_ms = started.elapsed().as_millis() as u64,
            "domain started"
        );

        let (tx, exited) = watch::channel(None);
        tokio::spawn(watch_exit(uri, name.to_string(), tx));
        Ok(Worker {
            name: name.to_string(),
            job_id: spec.job_id,
            exited,
            console_log,
        })
    }

    async fn destroy_inner(&self, name: &str) -> Result<()> {
        let job = self.base().join(name);
        // With a recorded host only that host is asked, and its errors count; without
        // one (nothing was made, or the directory went missing) every host is tried and
        // an unreachable one is only logged.
        let (uris, strict) = match fs::read_to_string(job.join("uri")) {
            Ok(uri) if !uri.trim().is_empty() => (vec![uri.trim().to_string()], true),
            Ok(_) => (self.cfg.uris.clone(), false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (self.cfg.uris.clone(), false),
            Err(e) => return Err(io_err("read worker uri")(e)),
        };
        for uri in &uris {
            match self.destroy_on(uri, name).await {
                Ok(()) => {}
                Err(e) if strict => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(worker = name, uri = %uri, error = %e, "cannot check libvirt host")
                }
            }
        }
        match fs::remove_dir_all(&job) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove worker directory")(e)),
        }
    }

    /// Stops this provider's domain `name` on `uri` (a transient domain is then gone) and
    /// deletes its volume; what is already gone is fine.
    async fn destroy_on(&self, uri: &str, name: &str) -> std::result::Result<(), VirshError> {
        match self.owns(uri, name).await? {
            None => {}
            Some(false) => {
                tracing::warn!(worker = name, uri = %uri, "domain belongs to another slate server, left alone")
            }
            Some(true) => match virsh::run(uri, &["destroy", name]).await {
                Ok(_) => {}
                Err(e) if e.not_found() || e.not_running() => {}
                Err(e) => return Err(e),
            },
        }
        let volume = virsh::volume_name(name);
        match virsh::run(
            uri,
            &["vol-delete", "--pool", &self.cfg.storage_pool, &volume],
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Reports on `tx` when the domain `name` on `uri` is gone (see the module docs for the
/// codes). Stops early once nobody holds the receiver.
async fn watch_exit(uri: String, name: String, tx: watch::Sender<Option<i32>>) {
    let code = tokio::select! {
        code = wait_gone(&uri, &name) => code,
        _ = tx.closed() => return,
    };
    tracing::info!(worker = %name, uri = %uri, exit_code = code, "vm exited");
    let _ = tx.send(Some(code));
}

async fn wait_gone(uri: &str, name: &str) -> i32 {
    if let Some(code) = stop_event(uri, name).await {
        return code;
    }
    loop {
        match virsh::run(uri, &["domstate", name]).await {
            Err(e) if e.not_found() => return -1,
            Err(e) => tracing::debug!(worker = name, error = %e, "domstate failed"),
            Ok(_) => {}
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The exit code of the first `Stopped` lifecycle event of `name`, or `None` if the event
/// stream ends without one.
async fn stop_event(uri: &str, name: &str) -> Option<i32> {
    let mut child = virsh::command(uri)
        .args(["event", "--domain", name, "--event", "lifecycle", "--loop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::warn!(worker = name, error = %e, "cannot run virsh event"))
        .ok()?;
    let mut lines = BufReader::new(child.stdout.take()?).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(worker = name, event = %line, "lifecycle event");
        if let Some(code) = virsh::stopped_code(&line) {
            return Some(code);
        }
    }
    None
}

#[async_trait]
impl Provider for LibvirtProvider {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    async fn provision(&self, spec: WorkerSpec) -> Result<Worker> {
        let started = Instant::now();
        let name = spec.job_id.resource_name();
        match spec.network {
            Network::None => {}
            Network::Egress => {
                return Err(ProviderError::Spec(
                    "network = \"egress\" is not supported by the libvirt provider yet".into(),
                ))
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
        match self.provision_inner(&spec, &name, &job).await {
            Ok(worker) => {
                tracing::info!(
                    job.id = spec.job_id.0,
                    worker = %name,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "libvirt vm provisioned"
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
            "libvirt vm destroyed"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names: BTreeSet<String> = match fs::read_dir(self.base()) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| valid_name(n))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(io_err("list workers")(e)),
        };
        // An unreachable host is logged, not fatal: what the others hold is still listed.
        for uri in &self.cfg.uris {
            match virsh::run(uri, &["list", "--all", "--name"]).await {
                Ok(out) => {
                    for name in virsh::worker_domains(&out) {
                        match self.owns(uri, &name).await {
                            Ok(Some(true)) => {
                                names.insert(name);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(worker = %name, uri = %uri, error = %e, "cannot read domain metadata")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(uri = %uri, error = %e, "cannot list libvirt domains"),
            }
            match virsh::run(uri, &["vol-list", &self.cfg.storage_pool]).await {
                Ok(out) => names.extend(virsh::worker_volumes(&out)),
                Err(e) => {
                    tracing::warn!(uri = %uri, pool = %self.cfg.storage_pool, error = %e, "cannot list libvirt volumes")
                }
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
    fn virt_types_parse() {
        assert_eq!("qemu".parse::<VirtType>().unwrap(), VirtType::Qemu);
        assert_eq!("kvm".parse::<VirtType>().unwrap(), VirtType::Kvm);
        assert!("xen".parse::<VirtType>().is_err());
    }

    #[test]
    fn providers_with_other_roots_have_other_owner_ids() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = LibvirtProvider::new(a.path().join("w"), LibvirtConfig::default());
        let pa2 = LibvirtProvider::new(a.path().join("w"), LibvirtConfig::default());
        let pb = LibvirtProvider::new(b.path().join("w"), LibvirtConfig::default());
        assert_eq!(pa.owner_id(), pa2.owner_id());
        assert_ne!(pa.owner_id(), pb.owner_id());
        assert_eq!(pa.kind(), "libvirt");
    }
}
