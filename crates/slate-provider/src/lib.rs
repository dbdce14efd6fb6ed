//! Worker lifecycle: provision a fresh worker for one job, destroy it, list what exists.
//!
//! Architecture invariant: every resource a provider makes is named `slate-<job id>`
//! (see [`slate_core::JobId::resource_name`]), so `list()` after a crash finds it, and
//! `destroy()` of something already gone succeeds.

pub mod exec;
pub mod libvirt;
pub mod qemu;
pub mod sandbox;

pub use exec::{ExecCache, ExecConfig, ExecProvider};
pub use libvirt::{LibvirtConfig, LibvirtProvider};
pub use qemu::{QemuConfig, QemuProvider};
pub use sandbox::SandboxProvider;

use async_trait::async_trait;
use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("invalid worker spec: {0}")]
    Spec(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, ProviderError>;

/// Everything a provider needs to make a worker for one job.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub job_id: JobId,
    pub pool: String,
    /// Root filesystem directory of the pool's image (never written to).
    pub image: PathBuf,
    /// The job's source tree on the host (never written to); the worker sees a writable
    /// copy-on-write view of it at [`WORKSPACE_DIR`].
    pub source: Option<PathBuf>,
    /// Host path of the `slate-agent` binary, visible read-only at [`AGENT_PATH`].
    pub agent_binary: PathBuf,
    /// Host path of the Unix socket the server listens on for this job's agent; its
    /// directory is visible at [`AGENT_SOCKET_DIR`] inside the worker.
    pub agent_socket: PathBuf,
    /// One-time token the agent presents; given to the agent as `SLATE_AGENT_TOKEN`.
    pub agent_token: Secret,
    pub limits: Limits,
    pub network: Network,
    /// With [`Network::Egress`]: endpoints reachable even though they are on the host or
    /// in a private range.
    pub network_allow: Vec<std::net::SocketAddr>,
    /// OCI runtime binary (`runc` by default).
    pub runtime: String,
    /// Host directories bind-mounted into the worker (shared caches), in order.
    pub mounts: Vec<WorkerMount>,
}

/// A host directory that appears at `target` inside the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerMount {
    pub host_path: PathBuf,
    /// Absolute path inside the worker.
    pub target: String,
    /// Writes fail with EROFS.
    pub read_only: bool,
}

/// Where the agent binary appears inside a worker.
pub const AGENT_PATH: &str = "/.slate/slate-agent";
/// Where the directory holding the agent socket appears inside a worker.
pub const AGENT_SOCKET_DIR: &str = "/run/slate";
/// Where the job's source tree appears inside a worker (the steps' working directory).
pub const WORKSPACE_DIR: &str = "/workspace";

/// A provisioned worker. Its agent is starting and will dial the socket.
#[derive(Debug)]
pub struct Worker {
    /// `slate-<job id>`.
    pub name: String,
    pub job_id: JobId,
    /// Resolves with the worker's exit code (the agent's, or a signal as 128+n) when the
    /// worker stops on its own or is destroyed.
    pub exited: tokio::sync::watch::Receiver<Option<i32>>,
    /// File with the worker's own console output (the agent's stderr, runtime errors),
    /// shown to the user when the worker fails before the agent connects.
    pub console_log: PathBuf,
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `sandbox`, `qemu`…
    fn kind(&self) -> &'static str;
    /// Make a fresh worker from the spec and start its agent. On error, nothing is left.
    async fn provision(&self, spec: WorkerSpec) -> Result<Worker>;
    /// Remove everything of the worker `name`; succeeds if it is already gone.
    async fn destroy(&self, name: &str) -> Result<()>;
    /// Names of the workers (`slate-<id>`) that exist now, including half-made ones.
    async fn list(&self) -> Result<Vec<String>>;
}
