//! The operator's `slate.toml`: typed configuration, parsed and validated with file:line:column errors.
//!
//! Parsing is pure: secrets are referenced by file or environment variable name here and
//! read by the server at startup, so nothing in this module touches the disk.

use crate::duration::{parse_duration, parse_size};
use crate::located::{key_at, line_col};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

/// One configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `pool[0].limits.memory`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: key `{}`: {}",
            self.file, self.line, self.column, self.key, self.message
        )
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub ui: UiSettings,
    /// Image recipes the server keeps built (`[[image]] recipe = "…"`): rebuilt in the
    /// background every `rebuild_every` of the recipe.
    pub images: Vec<PathBuf>,
    pub github: Option<GithubConfig>,
    pub repos: Vec<RepoConfig>,
    pub pools: Vec<PoolConfig>,
    pub pipelines: Vec<PipelineConfig>,
    /// Named secrets (`[[secret]]`), handed to the steps that name them.
    pub secrets: Vec<NamedSecret>,
}

/// `[[secret]]`: a value the server reads at startup and hands, as an environment
/// variable, only to the steps that name it (never in pull request builds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSecret {
    /// `[A-Z_][A-Z0-9_]*`: also the variable's name in the step.
    pub name: String,
    pub source: SecretSource,
}

/// `[ui]`: the web pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UiSettings {
    /// Every page (and the read API) needs a login; reading is public by default.
    pub require_login: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; `None` means SQLite in `data_dir`.
    pub database: Option<String>,
    /// The `slate-agent` binary put into workers; `None` means next to the `slate` binary.
    pub agent_binary: Option<PathBuf>,
    /// Base URL used for links in statuses (defaults to `http://<listen>`).
    pub public_url: Option<String>,
    /// TCP address where agents on machines slate does not run itself (exec pools,
    /// remote hosts) dial in; `None` disables it. Connections are TLS (1.3), except for
    /// pools that set `insecure_plaintext`.
    pub agent_listen: Option<String>,
    /// Certificate (PEM) the agent listener presents; with `agent_tls_key`. `None` means
    /// one generated into `<data_dir>/tls/` on first start and kept.
    pub agent_tls_cert: Option<PathBuf>,
    pub agent_tls_key: Option<PathBuf>,
    /// This server's name among replicas sharing a PostgreSQL store (defaults to the host
    /// name and data dir); a replica restarted under the same name finds its leftovers.
    pub replica_id: Option<String>,
    /// How long a replica's claim on a job lasts without renewal: a replica that dies
    /// loses its jobs to the others after this.
    pub lease: Duration,
    /// On SIGTERM, how long running jobs may go on before they are stopped and requeued.
    pub shutdown_grace: Duration,
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GithubConfig {
    pub api_url: String,
    pub webhook_secret: Option<SecretSource>,
    pub token: Option<SecretSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkout {
    /// Build the merge of the PR head into its base (default).
    Merge,
    /// Build the PR head as is.
    Head,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RepoConfig {
    pub name: String,
    pub url: String,
    pub pipeline: String,
    pub checkout: Checkout,
    /// Branches whose pushes are built.
    pub branches: Vec<String>,
    /// Branches whose builds are trusted: they may promote new cache files into the
    /// shared mirrors. Defaults to `branches`.
    pub trusted_branches: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Sandbox,
    Qemu,
    Exec,
    Libvirt,
}

/// `[pool.libvirt]`: where a libvirt pool's VMs run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtSettings {
    /// Hosts serving the pool (`qemu:///system`, `qemu+ssh://host/system`…).
    pub uris: Vec<String>,
    /// This server's own storage pool on every host.
    pub storage_pool: String,
    /// `qemu` (TCG) or `kvm`.
    pub virt_type: String,
}

impl ProviderKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::Sandbox => "sandbox",
            ProviderKind::Qemu => "qemu",
            ProviderKind::Exec => "exec",
            ProviderKind::Libvirt => "libvirt",
        }
    }
}

/// How a shared cache appears in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// The mirror, read-only: the job reads everything and changes nothing.
    Ro,
    /// The mirror below (and the PR's own layer), a per-job writable layer on top.
    Overlay,
}

/// Where files a job added to an overlay cache go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promote {
    Never,
    /// Into the shared mirror for trusted builds (pushes to `trusted_branches`); a PR's
    /// files always go only to that PR's own layer.
    Trusted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub name: String,
    /// Host directory of the mirror.
    pub source: PathBuf,
    /// Path inside the worker.
    pub target: String,
    pub mode: CacheMode,
    pub promote: Promote,
}

/// Hooks of an `exec` pool: operator commands that create, destroy and list machines.
#[derive(Clone, PartialEq)]
pub struct ExecHooks {
    pub create: Vec<String>,
    pub destroy: Vec<String>,
    pub list: Vec<String>,
    pub timeout: Duration,
    pub destroy_retries: u32,
    pub retry_backoff: Duration,
    /// What the machine's agent dials (`tls:HOST:PORT`); defaults to `[server]
    /// agent_listen`.
    pub agent_url: Option<String>,
    /// The pool's agents may speak plaintext TCP (`tcp:` URLs): the token, secrets and
    /// logs travel in clear. Off unless the operator says so; the server warns at start.
    pub insecure_plaintext: bool,
    /// Extra environment of every hook; values may be credentials.
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for ExecHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHooks")
            .field("create", &self.create)
            .field("destroy", &self.destroy)
            .field("list", &self.list)
            .field("timeout", &self.timeout)
            .field("agent_url", &self.agent_url)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Which planner turns a change into jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannerKind {
    /// One job per pool.
    Pools,
    /// One job per changed MacPorts port and pool.
    Macports,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Loopback only.
    None,
    /// Outbound connections only. Sandbox: its own network namespace behind NAT; the
    /// host's addresses and private, loopback, link-local and other non-public ranges
    /// are dropped, except the pool's `network_allow` endpoints. qemu: user-mode
    /// networking with `restrict=on`, so only the `network_allow` endpoints (forwarded
    /// into the guest) are reachable.
    Egress,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// CPU quota in cores (e.g. 1.5).
    pub cpus: Option<f64>,
    /// Wall-time limit of the whole job.
    pub timeout: Duration,
    /// Size of the job's writable layers (rootfs and workspace changes together); a job
    /// that fills it gets ENOSPC. `None` means the host's free space.
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub provider: ProviderKind,
    pub image: PathBuf,
    pub max_jobs: u32,
    pub limits: Limits,
    pub network: Network,
    /// `ip:port` endpoints a job with `network = "egress"` may reach even though they are
    /// on the host or in a private range (a package proxy, say).
    pub network_allow: Vec<SocketAddr>,
    /// OCI runtime binary (`runc`, `crun`, `runsc`…).
    pub runtime: String,
    /// How many times a job may run when its worker fails (provisioning error, agent
    /// lost, heartbeat timeout); a build failure is never retried.
    pub attempts: u32,
    /// How long a new worker's agent has to connect.
    pub boot_timeout: Duration,
    /// Cap on one job's log; output beyond it is dropped with a marker.
    pub log_limit: u64,
    /// Shared caches mounted into every job of the pool.
    pub caches: Vec<CacheConfig>,
    /// VMs kept booted and idle, each for one future job (qemu pools).
    pub warm: u32,
    /// Hooks of an exec pool.
    pub exec: Option<ExecHooks>,
    /// Directory the steps run in inside the worker (`/workspace` unless set).
    pub workdir: Option<String>,
    /// Cap on the total size of one job's artifacts (`limits.artifacts`).
    pub artifacts_limit: u64,
    /// Hosts of a libvirt pool.
    pub libvirt: Option<LibvirtSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    pub name: String,
    pub run: String,
    pub timeout: Option<Duration>,
    /// Events the step runs for; empty means every event except that `deploy`-like
    /// filters are explicit: `on = ["push"]` never runs for a pull request.
    pub on: Vec<String>,
    pub allow_failure: bool,
    pub env: BTreeMap<String, String>,
    /// Globs, relative to the workspace, of files kept after the job (even when it fails).
    pub artifacts: Vec<String>,
    /// Names of `[[secret]]`s the step gets as environment variables (not in PR builds).
    pub secrets: Vec<String>,
}

/// `[pipeline.plan]`: the dynamic-jobs step. It runs once per pool on a planning job and
/// prints one JSON line per target (`{"name": "...", "vars": {...}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanStepConfig {
    pub name: String,
    pub run: String,
    pub timeout: Option<Duration>,
}

impl PlanStepConfig {
    /// The plan step as an ordinary step (what a planning job runs).
    pub fn as_step(&self) -> StepConfig {
        StepConfig {
            name: self.name.clone(),
            run: self.run.clone(),
            timeout: self.timeout,
            on: Vec::new(),
            allow_failure: false,
            env: BTreeMap::new(),
            artifacts: Vec::new(),
            secrets: Vec::new(),
        }
    }
}

impl StepConfig {
    /// Whether the step runs for a build triggered by `event` (`pull_request`, `push`, `manual`).
    /// A manual submit of a branch counts as a push of that branch.
    pub fn runs_for(&self, event: &str) -> bool {
        if self.on.is_empty() {
            return true;
        }
        self.on
            .iter()
            .any(|e| e == event || (event == "manual" && e == "push"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub name: String,
    pub pools: Vec<String>,
    /// Glob patterns; when non-empty, a change needs a build only if a changed file matches.
    pub paths: Vec<String>,
    pub steps: Vec<StepConfig>,
    pub env: BTreeMap<String, String>,
    pub planner: PlannerKind,
    /// Most ports a PortGroup change may select (macports planner).
    pub portgroup_limit: usize,
    /// The dynamic-jobs step, if any.
    pub plan: Option<PlanStepConfig>,
}

impl Config {
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
    pub fn repo(&self, name: &str) -> Option<&RepoConfig> {
        self.repos
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name))
    }
    pub fn pipeline(&self, name: &str) -> Option<&PipelineConfig> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    /// Parse and validate `text`, which was read from `file` (used in error messages).
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let (line, column) = line_col(text, span.start);
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.to_string(),
                    line,
                    column,
                    key: key_at(text, &span),
                    message: e.message().trim().to_string(),
                }]));
            }
        };
        let mut v = Validator {
            text,
            file,
            errors: Vec::new(),
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(v.errors))
        }
    }
}

// ---- raw shapes, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<RawServer>,
    ui: Option<RawUi>,
    #[serde(default)]
    image: Vec<RawImage>,
    github: Option<RawGithub>,
    #[serde(default)]
    repo: Vec<RawRepo>,
    #[serde(default)]
    pool: Vec<RawPool>,
    #[serde(default)]
    pipeline: Vec<RawPipeline>,
    #[serde(default)]
    secret: Vec<RawSecret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: Spanned<String>,
    file: Option<PathBuf>,
    env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    recipe: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUi {
    #[serde(default)]
    require_login: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    data_dir: Option<PathBuf>,
    database: Option<Spanned<String>>,
    agent_binary: Option<PathBuf>,
    public_url: Option<String>,
    agent_listen: Option<Spanned<String>>,
    agent_tls_cert: Option<Spanned<PathBuf>>,
    agent_tls_key: Option<Spanned<PathBuf>>,
    replica_id: Option<String>,
    lease: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
    api_url: Option<Spanned<String>>,
    webhook_secret_file: Option<PathBuf>,
    webhook_secret_env: Option<String>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepo {
    name: Spanned<String>,
    url: String,
    pipeline: Spanned<String>,
    checkout: Option<Spanned<String>>,
    #[serde(default)]
    branches: Vec<String>,
    trusted_branches: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    provider: Option<Spanned<String>>,
    image: PathBuf,
    max_jobs: Option<Spanned<i64>>,
    limits: Option<RawLimits>,
    network: Option<Spanned<String>>,
    network_allow: Option<Spanned<Vec<Spanned<String>>>>,
    runtime: Option<String>,
    attempts: Option<Spanned<i64>>,
    boot_timeout: Option<Spanned<String>>,
    warm: Option<Spanned<i64>>,
    #[serde(default)]
    cache: Vec<RawCache>,
    exec: Option<Spanned<RawExec>>,
    workdir: Option<Spanned<String>>,
    libvirt: Option<Spanned<RawLibvirt>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    uris: Option<Vec<String>>,
    storage_pool: Option<String>,
    virt_type: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    create: Vec<String>,
    destroy: Vec<String>,
    #[serde(default)]
    list: Vec<String>,
    hook_timeout: Option<Spanned<String>>,
    destroy_retries: Option<u32>,
    retry_backoff: Option<Spanned<String>>,
    agent_url: Option<Spanned<String>>,
    #[serde(default)]
    insecure_plaintext: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    name: Spanned<String>,
    source: PathBuf,
    target: Spanned<String>,
    mode: Option<Spanned<String>>,
    promote: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    pids: Option<Spanned<i64>>,
    cpus: Option<Spanned<f64>>,
    timeout: Option<Spanned<String>>,
    artifacts: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Spanned<String>,
    pools: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    steps: Vec<RawStep>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    planner: Option<Spanned<String>>,
    portgroup_limit: Option<Spanned<i64>>,
    plan: Option<Spanned<RawPlan>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: String,
    run: String,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    on: Vec<Spanned<String>>,
    #[serde(default)]
    allow_failure: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    artifacts: Vec<Spanned<String>>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
}

const EVENTS: [&str; 3] = ["pull_request", "push", "manual"];

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = match raw.server {
            Some(s) => {
                let listen = match s.listen {
                    Some(l) => {
                        if l.get_ref().parse::<std::net::SocketAddr>().is_err() {
                            self.err(
                                l.span(),
                                "server.listen",
                                format!(
                                    "expected an address like \"127.0.0.1:8080\", found {:?}",
                                    l.get_ref()
                                ),
                            );
                        }
                        l.into_inner()
                    }
                    None => "127.0.0.1:8080".to_string(),
                };
                if let Some(db) = &s.database {
                    let d = db.get_ref();
                    if !(d.starts_with("sqlite:")
                        || d.starts_with("postgres://")
                        || d.starts_with("postgresql://"))
                    {
                        self.err(
                            db.span(),
                            "server.database",
                            format!("expected a \"sqlite:…\" or \"postgres://…\" URL, found {d:?}"),
                        );
                    }
                }
                if let Some(a) = &s.agent_listen {
                    if a.get_ref().parse::<std::net::SocketAddr>().is_err() {
                        self.err(
                            a.span(),
                            "server.agent_listen",
                            format!(
                                "expected an address like \"0.0.0.0:8081\", found {:?}",
                                a.get_ref()
                            ),
                        );
                    }
                }
                match (&s.agent_tls_cert, &s.agent_tls_key) {
                    (Some(c), None) => self.err(
                        c.span(),
                        "server.agent_tls_cert",
                        "expected agent_tls_key too (a certificate needs its key)",
                    ),
                    (None, Some(k)) => self.err(
                        k.span(),
                        "server.agent_tls_key",
                        "expected agent_tls_cert too (a key needs its certificate)",
                    ),
                    _ => {}
                }
                let lease = match &s.lease {
                    None => Duration::from_secs(30),
                    Some(t) => match parse_duration(t.get_ref()) {
                        Ok(d) if d >= Duration::from_secs(1) => d,
                        Ok(_) => {
                            self.err(t.span(), "server.lease", "expected at least 1s");
                            Duration::from_secs(30)
                        }
                        Err(e) => {
                            self.err(t.span(), "server.lease", e);
                            Duration::from_secs(30)
                        }
                    },
                };
                let shutdown_grace = match &s.shutdown_grace {
                    None => Duration::from_secs(60),
                    Some(t) => match parse_duration(t.get_ref()) {
                        Ok(d) => d,
                        Err(e) => {
                            self.err(t.span(), "server.shutdown_grace", e);
                            Duration::from_secs(60)
                        }
                    },
                };
                ServerConfig {
                    listen,
                    shutdown_grace,
                    replica_id: s.replica_id,
                    lease,
                    agent_listen: s.agent_listen.map(Spanned::into_inner),
                    agent_tls_cert: s.agent_tls_cert.map(Spanned::into_inner),
                    agent_tls_key: s.agent_tls_key.map(Spanned::into_inner),
                    data_dir: s
                        .data_dir
                        .unwrap_or_else(|| PathBuf::from("/var/lib/slate")),
                    database: s.database.map(Spanned::into_inner),
                    agent_binary: s.agent_binary,
                    public_url: s.public_url.map(|u| u.trim_end_matches('/').to_string()),
                }
            }
            None => ServerConfig {
                listen: "127.0.0.1:8080".into(),
                data_dir: PathBuf::from("/var/lib/slate"),
                database: None,
                agent_binary: None,
                public_url: None,
                agent_listen: None,
                agent_tls_cert: None,
                agent_tls_key: None,
                replica_id: None,
                lease: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(60),
            },
        };

        let github = raw.github.map(|g| {
            let api_url = match g.api_url {
                Some(u) => {
                    let s = u.get_ref();
                    if !(s.starts_with("http://") || s.starts_with("https://")) {
                        self.err(
                            u.span(),
                            "github.api_url",
                            format!("expected an http(s) URL, found {s:?}"),
                        );
                    }
                    u.into_inner().trim_end_matches('/').to_string()
                }
                None => "https://api.github.com".into(),
            };
            GithubConfig {
                api_url,
                webhook_secret: g
                    .webhook_secret_file
                    .map(SecretSource::File)
                    .or(g.webhook_secret_env.map(SecretSource::Env)),
                token: g
                    .token_file
                    .map(SecretSource::File)
                    .or(g.token_env.map(SecretSource::Env)),
            }
        });

        let mut pools = Vec::new();
        let mut pool_names = HashSet::new();
        for (i, p) in raw.pool.into_iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            if !valid_name(p.name.get_ref()) {
                self.err(
                    p.name.span(),
                    key("name"),
                    format!(
                        "expected a name of letters, digits, '-', '_' or '.', found {:?}",
                        p.name.get_ref()
                    ),
                );
            }
            if !pool_names.insert(p.name.get_ref().clone()) {
                self.err(
                    p.name.span(),
                    key("name"),
                    format!("pool {:?} is defined twice", p.name.get_ref()),
                );
            }
            let provider = match p.provider.as_ref().map(|s| s.get_ref().as_str()) {
                None | Some("sandbox") => ProviderKind::Sandbox,
                Some("qemu") => ProviderKind::Qemu,
                Some("exec") => ProviderKind::Exec,
                Some("libvirt") => ProviderKind::Libvirt,
                Some(other) => {
                    self.err(
                        p.provider.as_ref().unwrap().span(),
                        key("provider"),
                        format!("expected \"sandbox\", \"qemu\", \"libvirt\" or \"exec\", found {other:?}"),
                    );
                    ProviderKind::Sandbox
                }
            };
            let network = match &p.network {
                None => Network::None,
                Some(s) if s.get_ref() == "none" => Network::None,
                Some(s) if s.get_ref() == "egress" => Network::Egress,
                Some(s) => {
                    self.err(
                        s.span(),
                        key("network"),
                        format!("expected \"none\" or \"egress\", found {:?}", s.get_ref()),
                    );
                    Network::None
                }
            };
            if network == Network::Egress
                && !matches!(provider, ProviderKind::Sandbox | ProviderKind::Qemu)
            {
                if let Some(s) = &p.network {
                    self.err(
                        s.span(),
                        key("network"),
                        "network = \"egress\" is for provider = \"sandbox\" or \"qemu\" (exec and libvirt machines get their network from the operator)",
                    );
                }
            }
            let mut network_allow = Vec::new();
            if let Some(list) = &p.network_allow {
                if network != Network::Egress {
                    self.err(
                        list.span(),
                        key("network_allow"),
                        "network_allow needs network = \"egress\"",
                    );
                }
                for entry in list.get_ref() {
                    match entry.get_ref().parse::<SocketAddr>() {
                        Ok(a) if a.port() != 0 => network_allow.push(a),
                        _ => self.err(
                            entry.span(),
                            key("network_allow"),
                            format!(
                                "expected an ip:port endpoint (e.g. \"10.0.0.5:3128\"), found {:?}",
                                entry.get_ref()
                            ),
                        ),
                    }
                }
            }
            let max_jobs = match &p.max_jobs {
                None => 1,
                Some(m) if *m.get_ref() >= 1 && *m.get_ref() <= 10_000 => *m.get_ref() as u32,
                Some(m) => {
                    self.err(
                        m.span(),
                        key("max_jobs"),
                        format!("expected a number from 1 to 10000, found {}", m.get_ref()),
                    );
                    1
                }
            };
            let attempts = match &p.attempts {
                None => 2,
                Some(a) if (1..=10).contains(a.get_ref()) => *a.get_ref() as u32,
                Some(a) => {
                    self.err(
                        a.span(),
                        key("attempts"),
                        format!("expected a number from 1 to 10, found {}", a.get_ref()),
                    );
                    2
                }
            };
            // A sandbox's agent starts at once; a VM boots first (~8 s under TCG, much
            // more on a loaded host); an exec machine may be a macOS VM cloned and booted.
            let default_boot = match provider {
                ProviderKind::Sandbox => Duration::from_secs(30),
                ProviderKind::Qemu | ProviderKind::Libvirt => Duration::from_secs(120),
                ProviderKind::Exec => Duration::from_secs(600),
            };
            let boot_timeout = match &p.boot_timeout {
                None => default_boot,
                Some(t) => match parse_duration(t.get_ref()) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        self.err(
                            t.span(),
                            key("boot_timeout"),
                            "expected a duration above zero",
                        );
                        Duration::from_secs(30)
                    }
                    Err(e) => {
                        self.err(t.span(), key("boot_timeout"), e);
                        Duration::from_secs(30)
                    }
                },
            };
            let warm = match &p.warm {
                None => 0,
                Some(w) if (0..=64).contains(w.get_ref()) => *w.get_ref() as u32,
                Some(w) => {
                    self.err(
                        w.span(),
                        key("warm"),
                        format!("expected a number from 0 to 64, found {}", w.get_ref()),
                    );
                    0
                }
            };
            if warm > 0 && provider != ProviderKind::Qemu {
                if let Some(w) = &p.warm {
                    self.err(
                        w.span(),
                        key("warm"),
                        "warm pools are for provider = \"qemu\"",
                    );
                }
            }
            let exec = match (&p.exec, provider) {
                (Some(e), ProviderKind::Exec) => {
                    let span = e.span();
                    let e = e.get_ref();
                    let mut dur = |v: &Option<Spanned<String>>, k: &str, default: u64| match v {
                        None => Duration::from_secs(default),
                        Some(t) => match parse_duration(t.get_ref()) {
                            Ok(d) if !d.is_zero() => d,
                            Ok(_) => {
                                self.err(t.span(), key(k), "expected a duration above zero");
                                Duration::from_secs(default)
                            }
                            Err(msg) => {
                                self.err(t.span(), key(k), msg);
                                Duration::from_secs(default)
                            }
                        },
                    };
                    let timeout = dur(&e.hook_timeout, "exec.hook_timeout", 600);
                    let retry_backoff = dur(&e.retry_backoff, "exec.retry_backoff", 2);
                    if e.create.is_empty() || e.destroy.is_empty() {
                        self.err(
                            span,
                            key("exec"),
                            "expected `create` and `destroy` commands (argv arrays)",
                        );
                    }
                    if let Some(u) = &e.agent_url {
                        let url = u.get_ref();
                        let valid = ["tls:", "tcp:"].iter().any(|scheme| {
                            url.strip_prefix(scheme)
                                .and_then(|hp| hp.rsplit_once(':'))
                                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                        });
                        if !valid {
                            self.err(
                                u.span(),
                                key("exec.agent_url"),
                                format!("expected \"tls:HOST:PORT\", found {url:?}"),
                            );
                        } else if url.starts_with("tcp:") && !e.insecure_plaintext {
                            self.err(
                                u.span(),
                                key("exec.agent_url"),
                                "a tcp: agent url is plaintext (token, secrets and logs in clear): use tls:, or set insecure_plaintext = true in [pool.exec] to accept that",
                            );
                        } else if url.starts_with("tls:") && e.insecure_plaintext {
                            self.err(
                                u.span(),
                                key("exec.insecure_plaintext"),
                                "insecure_plaintext = true needs a tcp: agent url",
                            );
                        }
                    }
                    Some(ExecHooks {
                        create: e.create.clone(),
                        destroy: e.destroy.clone(),
                        list: e.list.clone(),
                        timeout,
                        destroy_retries: e.destroy_retries.unwrap_or(5),
                        retry_backoff,
                        agent_url: e.agent_url.as_ref().map(|u| u.get_ref().clone()),
                        insecure_plaintext: e.insecure_plaintext,
                        env: e.env.clone(),
                    })
                }
                (None, ProviderKind::Exec) => {
                    self.err(
                        p.name.span(),
                        key("exec"),
                        "an exec pool needs a [pool.exec] table with `create` and `destroy` hooks",
                    );
                    None
                }
                (Some(e), _) => {
                    self.err(e.span(), key("exec"), "hooks are for provider = \"exec\"");
                    None
                }
                (None, _) => None,
            };
            let libvirt = match (&p.libvirt, provider) {
                (l, ProviderKind::Libvirt) => {
                    let (uris, storage_pool, virt_type) = match l {
                        Some(l) => {
                            let l = l.get_ref();
                            let vt = match &l.virt_type {
                                None => "qemu".to_string(),
                                Some(v) if v.get_ref() == "qemu" || v.get_ref() == "kvm" => {
                                    v.get_ref().clone()
                                }
                                Some(v) => {
                                    self.err(
                                        v.span(),
                                        key("libvirt.virt_type"),
                                        format!(
                                            "expected \"qemu\" or \"kvm\", found {:?}",
                                            v.get_ref()
                                        ),
                                    );
                                    "qemu".into()
                                }
                            };
                            (l.uris.clone(), l.storage_pool.clone(), vt)
                        }
                        None => (None, None, "qemu".into()),
                    };
                    Some(LibvirtSettings {
                        uris: uris.unwrap_or_else(|| vec!["qemu:///system".into()]),
                        storage_pool: storage_pool.unwrap_or_else(|| "default".into()),
                        virt_type,
                    })
                }
                (Some(l), _) => {
                    self.err(
                        l.span(),
                        key("libvirt"),
                        "[pool.libvirt] is for provider = \"libvirt\"",
                    );
                    None
                }
                (None, _) => None,
            };
            let workdir = match &p.workdir {
                Some(w) if !w.get_ref().starts_with('/') => {
                    self.err(
                        w.span(),
                        key("workdir"),
                        format!("expected an absolute path, found {:?}", w.get_ref()),
                    );
                    None
                }
                Some(w) => Some(w.get_ref().clone()),
                None => None,
            };
            let mut caches = Vec::new();
            let mut cache_names = HashSet::new();
            for (j, c) in p.cache.iter().enumerate() {
                let ckey = |k: &str| format!("pool[{i}].cache[{j}].{k}");
                if !valid_name(c.name.get_ref()) || !cache_names.insert(c.name.get_ref().clone()) {
                    self.err(c.name.span(), ckey("name"), format!("expected a unique name of letters, digits, '-', '_' or '.', found {:?}", c.name.get_ref()));
                }
                if !c.target.get_ref().starts_with('/')
                    || c.target.get_ref().split('/').any(|x| x == "..")
                {
                    self.err(
                        c.target.span(),
                        ckey("target"),
                        format!(
                            "expected an absolute path inside the worker, found {:?}",
                            c.target.get_ref()
                        ),
                    );
                }
                let mode = match c.mode.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("ro") => CacheMode::Ro,
                    Some("overlay") => CacheMode::Overlay,
                    Some(other) => {
                        self.err(
                            c.mode.as_ref().unwrap().span(),
                            ckey("mode"),
                            format!("expected \"ro\" or \"overlay\", found {other:?}"),
                        );
                        CacheMode::Ro
                    }
                };
                let promote = match c.promote.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("never") => Promote::Never,
                    Some("trusted") => Promote::Trusted,
                    Some(other) => {
                        self.err(
                            c.promote.as_ref().unwrap().span(),
                            ckey("promote"),
                            format!("expected \"never\" or \"trusted\", found {other:?}"),
                        );
                        Promote::Never
                    }
                };
                if mode == CacheMode::Ro && promote != Promote::Never {
                    self.err(
                        c.promote.as_ref().unwrap().span(),
                        ckey("promote"),
                        "a read-only cache never promotes: use mode = \"overlay\"",
                    );
                }
                caches.push(CacheConfig {
                    name: c.name.get_ref().clone(),
                    source: c.source.clone(),
                    target: c.target.get_ref().clone(),
                    mode,
                    promote,
                });
            }
            let mut log_limit: u64 = 64 << 20;
            let mut artifacts_limit: u64 = 100 << 20;
            let mut limits = Limits {
                memory_bytes: None,
                pids: None,
                cpus: None,
                timeout: Duration::from_secs(2 * 3600),
                disk_bytes: None,
            };
            if let Some(l) = p.limits {
                if let Some(m) = l.log {
                    match parse_size(m.get_ref()) {
                        Ok(b) if b >= 1024 => log_limit = b,
                        Ok(_) => self.err(m.span(), key("limits.log"), "expected at least 1KiB"),
                        Err(e) => self.err(m.span(), key("limits.log"), e),
                    }
                }
                if let Some(m) = l.artifacts {
                    match parse_size(m.get_ref()) {
                        Ok(b) => artifacts_limit = b,
                        Err(e) => self.err(m.span(), key("limits.artifacts"), e),
                    }
                }
                if let Some(m) = l.memory {
                    match parse_size(m.get_ref()) {
                        Ok(b) if b >= 4 << 20 => limits.memory_bytes = Some(b),
                        Ok(_) => self.err(m.span(), key("limits.memory"), "expected at least 4MiB"),
                        Err(e) => self.err(m.span(), key("limits.memory"), e),
                    }
                }
                if let Some(d) = l.disk {
                    match parse_size(d.get_ref()) {
                        Ok(b) if b >= 16 << 20 => limits.disk_bytes = Some(b),
                        Ok(_) => self.err(d.span(), key("limits.disk"), "expected at least 16MiB"),
                        Err(e) => self.err(d.span(), key("limits.disk"), e),
                    }
                }
                if let Some(n) = l.pids {
                    if *n.get_ref() < 1 {
                        self.err(
                            n.span(),
                            key("limits.pids"),
                            format!("expected a positive number, found {}", n.get_ref()),
                        );
                    } else {
                        limits.pids = Some(*n.get_ref() as u64);
                    }
                }
                if let Some(c) = l.cpus {
                    if c.get_ref().is_nan() || *c.get_ref() <= 0.0 {
                        self.err(
                            c.span(),
                            key("limits.cpus"),
                            format!("expected a positive number of cores, found {}", c.get_ref()),
                        );
                    } else {
                        limits.cpus = Some(*c.get_ref());
                    }
                }
                if let Some(t) = l.timeout {
                    match parse_duration(t.get_ref()) {
                        Ok(d) if !d.is_zero() => limits.timeout = d,
                        Ok(_) => self.err(
                            t.span(),
                            key("limits.timeout"),
                            "expected a duration above zero",
                        ),
                        Err(e) => self.err(t.span(), key("limits.timeout"), e),
                    }
                }
            }
            pools.push(PoolConfig {
                name: p.name.into_inner(),
                provider,
                image: p.image,
                max_jobs,
                limits,
                network,
                network_allow,
                runtime: p.runtime.unwrap_or_else(|| "runc".into()),
                attempts,
                boot_timeout,
                log_limit,
                caches,
                warm,
                exec,
                workdir,
                artifacts_limit,
                libvirt,
            });
        }

        let secrets = self.secrets(raw.secret);
        let mut pipelines = Vec::new();
        let mut pipeline_names = HashSet::new();
        for (i, p) in raw.pipeline.into_iter().enumerate() {
            let key = |k: &str| format!("pipeline[{i}].{k}");
            if !pipeline_names.insert(p.name.get_ref().clone()) {
                self.err(
                    p.name.span(),
                    key("name"),
                    format!("pipeline {:?} is defined twice", p.name.get_ref()),
                );
            }
            if p.pools.is_empty() {
                self.err(p.name.span(), key("pools"), "expected at least one pool");
            }
            for pool in &p.pools {
                if !pool_names.contains(pool.get_ref()) {
                    self.err(
                        pool.span(),
                        key("pools"),
                        format!("no [[pool]] is named {:?}", pool.get_ref()),
                    );
                }
            }
            for pat in &p.paths {
                if let Err(e) = globset::Glob::new(pat.get_ref()) {
                    self.err(
                        pat.span(),
                        key("paths"),
                        format!("invalid glob {:?}: {e}", pat.get_ref()),
                    );
                }
            }
            let mut steps = Vec::new();
            for (j, s) in p.steps.into_iter().enumerate() {
                let skey = |k: &str| format!("pipeline[{i}].steps[{j}].{k}");
                let timeout = match s.timeout {
                    None => None,
                    Some(t) => match parse_duration(t.get_ref()) {
                        Ok(d) if !d.is_zero() => Some(d),
                        Ok(_) => {
                            self.err(t.span(), skey("timeout"), "expected a duration above zero");
                            None
                        }
                        Err(e) => {
                            self.err(t.span(), skey("timeout"), e);
                            None
                        }
                    },
                };
                for ev in &s.on {
                    if !EVENTS.contains(&ev.get_ref().as_str()) {
                        self.err(ev.span(), skey("on"), format!("expected one of \"pull_request\", \"push\", \"manual\", found {:?}", ev.get_ref()));
                    }
                }
                for a in &s.artifacts {
                    if let Err(msg) = check_artifact_glob(a.get_ref()) {
                        self.err(a.span(), skey("artifacts"), msg);
                    }
                }
                for n in &s.secrets {
                    if !secrets.iter().any(|x| &x.name == n.get_ref()) {
                        self.err(
                            n.span(),
                            skey("secrets"),
                            format!("no [[secret]] is named {:?}", n.get_ref()),
                        );
                    }
                }
                steps.push(StepConfig {
                    name: s.name,
                    run: s.run,
                    timeout,
                    on: s.on.into_iter().map(Spanned::into_inner).collect(),
                    allow_failure: s.allow_failure,
                    env: s.env,
                    artifacts: s.artifacts.into_iter().map(Spanned::into_inner).collect(),
                    secrets: s.secrets.into_iter().map(Spanned::into_inner).collect(),
                });
            }
            if steps.is_empty() {
                self.err(p.name.span(), key("steps"), "expected at least one step");
            }
            let planner = match p.planner.as_ref().map(|x| x.get_ref().as_str()) {
                None | Some("pools") => PlannerKind::Pools,
                Some("macports") => PlannerKind::Macports,
                Some(other) => {
                    self.err(
                        p.planner.as_ref().unwrap().span(),
                        key("planner"),
                        format!("expected \"pools\" or \"macports\", found {other:?}"),
                    );
                    PlannerKind::Pools
                }
            };
            let portgroup_limit = match &p.portgroup_limit {
                None => 50,
                Some(l) if *l.get_ref() >= 0 => *l.get_ref() as usize,
                Some(l) => {
                    self.err(
                        l.span(),
                        key("portgroup_limit"),
                        format!("expected a number of ports, found {}", l.get_ref()),
                    );
                    50
                }
            };
            let plan = p.plan.map(|raw| {
                let span = raw.span();
                let raw = raw.into_inner();
                if raw.name.trim().is_empty() {
                    self.err(span.clone(), key("plan.name"), "expected a step name");
                }
                if raw.run.trim().is_empty() {
                    self.err(span, key("plan.run"), "expected a command");
                }
                let timeout = raw.timeout.and_then(|t| match parse_duration(t.get_ref()) {
                    Ok(d) if !d.is_zero() => Some(d),
                    Ok(_) => {
                        self.err(
                            t.span(),
                            key("plan.timeout"),
                            "expected a duration above zero",
                        );
                        None
                    }
                    Err(e) => {
                        self.err(t.span(), key("plan.timeout"), e);
                        None
                    }
                });
                PlanStepConfig {
                    name: raw.name,
                    run: raw.run,
                    timeout,
                }
            });
            pipelines.push(PipelineConfig {
                planner,
                portgroup_limit,
                plan,
                name: p.name.into_inner(),
                pools: p.pools.into_iter().map(Spanned::into_inner).collect(),
                paths: p.paths.into_iter().map(Spanned::into_inner).collect(),
                steps,
                env: p.env,
            });
        }

        let mut repos = Vec::new();
        for (i, r) in raw.repo.into_iter().enumerate() {
            let key = |k: &str| format!("repo[{i}].{k}");
            let n = r.name.get_ref();
            let parts: Vec<&str> = n.split('/').collect();
            if parts.len() != 2 || !parts.iter().all(|p| valid_name(p)) {
                self.err(
                    r.name.span(),
                    key("name"),
                    format!("expected \"owner/name\", found {n:?}"),
                );
            }
            if !pipeline_names.contains(r.pipeline.get_ref()) {
                self.err(
                    r.pipeline.span(),
                    key("pipeline"),
                    format!("no [[pipeline]] is named {:?}", r.pipeline.get_ref()),
                );
            }
            let checkout = match &r.checkout {
                None => Checkout::Merge,
                Some(c) if c.get_ref() == "merge" => Checkout::Merge,
                Some(c) if c.get_ref() == "head" => Checkout::Head,
                Some(c) => {
                    self.err(
                        c.span(),
                        key("checkout"),
                        format!("expected \"merge\" or \"head\", found {:?}", c.get_ref()),
                    );
                    Checkout::Merge
                }
            };
            repos.push(RepoConfig {
                name: r.name.into_inner(),
                url: r.url,
                pipeline: r.pipeline.into_inner(),
                checkout,
                trusted_branches: r.trusted_branches.unwrap_or_else(|| r.branches.clone()),
                branches: r.branches,
            });
        }

        Config {
            server,
            images: raw.image.into_iter().map(|i| i.recipe).collect(),
            ui: UiSettings {
                require_login: raw.ui.map(|u| u.require_login).unwrap_or(false),
            },
            github,
            repos,
            pools,
            pipelines,
            secrets,
        }
    }

    /// `[[secret]]` tables: unique names fit for an environment variable, one source each.
    fn secrets(&mut self, raw: Vec<RawSecret>) -> Vec<NamedSecret> {
        let mut out: Vec<NamedSecret> = Vec::new();
        for (i, s) in raw.into_iter().enumerate() {
            let key = |k: &str| format!("secret[{i}].{k}");
            let name = s.name.get_ref();
            if !valid_secret_name(name) {
                self.err(
                    s.name.span(),
                    key("name"),
                    format!(
                        "expected a name like \"DEPLOY_KEY\" ([A-Z_][A-Z0-9_]*), found {name:?}"
                    ),
                );
            } else if out.iter().any(|x| &x.name == name) {
                self.err(
                    s.name.span(),
                    key("name"),
                    format!("secret {name:?} is defined twice"),
                );
            }
            let source = match (s.file, s.env) {
                (Some(f), None) => SecretSource::File(f),
                (None, Some(e)) => SecretSource::Env(e.into_inner()),
                (Some(_), Some(e)) => {
                    self.err(e.span(), key("env"), "expected `file` or `env`, not both");
                    continue;
                }
                (None, None) => {
                    self.err(
                        s.name.span(),
                        key("file"),
                        "expected `file = \"/path\"` or `env = \"VAR\"`",
                    );
                    continue;
                }
            };
            out.push(NamedSecret {
                name: s.name.into_inner(),
                source,
            });
        }
        out
    }
}

/// A secret's name: an environment variable name, `[A-Z_][A-Z0-9_]*`.
fn valid_secret_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 100
}

/// An artifact glob: relative to the workspace, never climbing out of it, valid syntax.
fn check_artifact_glob(g: &str) -> Result<(), String> {
    if g.is_empty() || g.starts_with('/') || g.split('/').any(|c| c == "..") {
        return Err(format!(
            "expected a glob relative to the workspace (no leading '/', no '..'), found {g:?}"
        ));
    }
    globset::Glob::new(g)
        .map(|_| ())
        .map_err(|e| format!("invalid glob {g:?}: {e}"))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"
data_dir = "/var/lib/slate"

[github]
api_url = "https://api.github.com"
webhook_secret_file = "/etc/slate/webhook-secret"
token_file = "/etc/slate/github-token"

[[repo]]
name = "owner/name"
url = "https://github.com/owner/name.git"
pipeline = "default"

[[pool]]
name = "bookworm"
provider = "sandbox"
image = "/srv/slate/images/bookworm"
max_jobs = 2
limits = { memory = "4GiB", pids = 4096, timeout = "2h" }

[[pipeline]]
name = "default"
pools = ["bookworm"]
steps = [
  { name = "build", run = "make -j2 && make check", timeout = "1h" },
  { name = "deploy", run = "./deploy.sh", on = ["push"] },
]
"#;

    #[test]
    fn example_from_the_issue_parses() {
        let c = Config::parse(EXAMPLE, "slate.toml").unwrap();
        assert_eq!(c.pools[0].max_jobs, 2);
        assert_eq!(c.pools[0].limits.memory_bytes, Some(4 << 30));
        assert_eq!(c.pools[0].limits.pids, Some(4096));
        assert_eq!(c.pools[0].limits.timeout, Duration::from_secs(7200));
        assert_eq!(
            c.pipelines[0].steps[0].timeout,
            Some(Duration::from_secs(3600))
        );
        assert!(!c.pipelines[0].steps[1].runs_for("pull_request"));
        assert!(c.pipelines[0].steps[1].runs_for("push"));
        assert!(c.pipelines[0].steps[1].runs_for("manual"));
        assert!(c.pipelines[0].steps[0].runs_for("pull_request"));
        assert_eq!(c.repos[0].checkout, Checkout::Merge);
        assert_eq!(
            c.github.unwrap().webhook_secret,
            Some(SecretSource::File("/etc/slate/webhook-secret".into()))
        );
    }

    #[test]
    fn typo_in_key_names_line_and_key() {
        let text = EXAMPLE.replace("max_jobs = 2", "max_jbos = 2");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        let e = &e.0[0];
        assert_eq!(e.line, 20, "{e}");
        assert!(e.message.contains("unknown field `max_jbos`"), "{e}");
        assert!(e.key.contains("max_jbos"), "{e}");
        assert!(e.to_string().starts_with("slate.toml:20:"), "{e}");
    }

    #[test]
    fn bad_value_names_line_key_and_expectation() {
        let text = EXAMPLE.replace("memory = \"4GiB\"", "memory = \"4 gigs\"");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        let e = &e.0[0];
        assert_eq!(
            (e.line, e.key.as_str()),
            (21, "pool[0].limits.memory"),
            "{e}"
        );
        assert!(e.message.contains("expected"), "{e}");
    }

    #[test]
    fn disk_quota_parses_and_bad_values_are_located() {
        let text = EXAMPLE.replace("pids = 4096,", "pids = 4096, disk = \"2GiB\",");
        let c = Config::parse(&text, "slate.toml").unwrap();
        assert_eq!(c.pools[0].limits.disk_bytes, Some(2 << 30));
        assert_eq!(
            Config::parse(EXAMPLE, "slate.toml").unwrap().pools[0]
                .limits
                .disk_bytes,
            None
        );
        for bad in ["2 gigs", "1MiB"] {
            let text = EXAMPLE.replace("pids = 4096,", &format!("pids = 4096, disk = \"{bad}\","));
            let e = Config::parse(&text, "slate.toml").unwrap_err();
            let e = &e.0[0];
            assert_eq!((e.line, e.key.as_str()), (21, "pool[0].limits.disk"), "{e}");
            assert!(e.message.contains("expected"), "{e}");
        }
    }

    #[test]
    fn wrong_type_is_located() {
        let text = EXAMPLE.replace("max_jobs = 2", "max_jobs = \"two\"");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        let e = &e.0[0];
        assert_eq!(e.line, 20, "{e}");
        assert!(e.key.ends_with("max_jobs"), "{e}");
    }

    #[test]
    fn unknown_pool_reference() {
        let text = EXAMPLE.replace("pools = [\"bookworm\"]", "pools = [\"bullseye\"]");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        assert_eq!(e.0[0].key, "pipeline[0].pools");
        assert_eq!(e.0[0].line, 25);
        assert!(e.0[0].message.contains("bullseye"));
    }

    #[test]
    fn unknown_event_in_on() {
        let text = EXAMPLE.replace("on = [\"push\"]", "on = [\"pr\"]");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        assert_eq!(e.0[0].key, "pipeline[0].steps[1].on");
    }

    #[test]
    fn named_secrets_parse_and_bad_ones_are_located() {
        let with = |secrets: &str, step: &str| {
            format!(
                "{}\n{secrets}",
                EXAMPLE.replace("on = [\"push\"] }", &format!("on = [\"push\"]{step} }}"))
            )
        };
        let text = with(
            "[[secret]]\nname = \"DEPLOY_KEY\"\nfile = \"/etc/slate/deploy-key\"\n\n[[secret]]\nname = \"_TOKEN2\"\nenv = \"TOKEN\"\n",
            ", secrets = [\"DEPLOY_KEY\"]",
        );
        let c = Config::parse(&text, "slate.toml").unwrap();
        assert_eq!(
            c.secrets,
            vec![
                NamedSecret {
                    name: "DEPLOY_KEY".into(),
                    source: SecretSource::File("/etc/slate/deploy-key".into()),
                },
                NamedSecret {
                    name: "_TOKEN2".into(),
                    source: SecretSource::Env("TOKEN".into()),
                },
            ]
        );
        assert_eq!(c.pipelines[0].steps[1].secrets, vec!["DEPLOY_KEY"]);
        assert!(c.pipelines[0].steps[0].secrets.is_empty());

        // A step naming a secret nobody defined: the step's line and key.
        let text = with("", ", secrets = [\"DEPLOY_KY\"]");
        let e = Config::parse(&text, "slate.toml").unwrap_err();
        let e = &e.0[0];
        assert_eq!(
            (e.line, e.key.as_str()),
            (28, "pipeline[0].steps[1].secrets"),
            "{e}"
        );
        assert!(e.message.contains("DEPLOY_KY"), "{e}");

        for (secret, key) in [
            ("name = \"deploy-key\"\nfile = \"/k\"", "secret[0].name"),
            ("name = \"9KEY\"\nfile = \"/k\"", "secret[0].name"),
            ("name = \"KEY\"", "secret[0].file"),
            (
                "name = \"KEY\"\nfile = \"/k\"\nenv = \"K\"",
                "secret[0].env",
            ),
        ] {
            let text = with(&format!("[[secret]]\n{secret}\n"), "");
            let e = Config::parse(&text, "slate.toml").unwrap_err();
            assert_eq!(e.0[0].key, key, "{secret}: {}", e.0[0]);
            assert!(e.0[0].line > 30, "{}", e.0[0]);
        }
        let dup =
            "[[secret]]\nname = \"K_1\"\nenv = \"A\"\n[[secret]]\nname = \"K_1\"\nenv = \"B\"\n";
        let e = Config::parse(&with(dup, ""), "slate.toml").unwrap_err();
        assert_eq!(e.0[0].key, "secret[1].name");
        assert!(e.0[0].message.contains("twice"), "{}", e.0[0]);
    }

    #[test]
    fn syntax_error_is_located() {
        let e = Config::parse("[server]\nlisten = \n", "x.toml").unwrap_err();
        assert_eq!(e.0[0].line, 2);
    }

    #[test]
    fn caches_providers_and_planner_parse() {
        let text = r#"
[[repo]]
name = "macports/macports-ports"
url = "https://github.com/macports/macports-ports.git"
pipeline = "ports"
branches = ["master"]

[[pool]]
name = "vm"
provider = "qemu"
image = "/srv/images/vm"
warm = 1

[[pool.cache]]
name = "packages"
source = "/srv/mirror/packages"
target = "/opt/local/var/macports/incoming/verified"
mode = "ro"

[[pool.cache]]
name = "distfiles"
source = "/srv/mirror/distfiles"
target = "/opt/local/var/macports/distfiles"
mode = "overlay"
promote = "trusted"

[[pool]]
name = "mac"
provider = "exec"
image = "macos-14"
workdir = "/Users/admin/workspace"

[pool.exec]
create = ["/etc/slate/hooks/create"]
destroy = ["/etc/slate/hooks/destroy"]
list = ["/etc/slate/hooks/list"]
env = { TOKEN = "s3cret" }

[[pipeline]]
name = "ports"
pools = ["vm", "mac"]
planner = "macports"
portgroup_limit = 20
steps = [{ name = "install", run = "mpbb install-port {port}" }]
"#;
        let c = Config::parse(text, "x.toml").unwrap();
        assert_eq!(c.repos[0].trusted_branches, vec!["master".to_string()]);
        let vm = c.pool("vm").unwrap();
        assert_eq!((vm.provider, vm.warm), (ProviderKind::Qemu, 1));
        assert_eq!(vm.caches[0].mode, CacheMode::Ro);
        assert_eq!(vm.caches[1].promote, Promote::Trusted);
        let mac = c.pool("mac").unwrap();
        assert_eq!(mac.exec.as_ref().unwrap().timeout, Duration::from_secs(600));
        assert_eq!(
            mac.exec.as_ref().unwrap().create,
            vec!["/etc/slate/hooks/create".to_string()]
        );
        assert_eq!(c.pipelines[0].planner, PlannerKind::Macports);
        assert_eq!(c.pipelines[0].portgroup_limit, 20);

        let bad = text.replace("mode = \"overlay\"", "mode = \"union\"");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert_eq!(e.0[0].key, "pool[0].cache[1].mode", "{e}");
        assert!(!format!("{:?}", mac.exec).contains("s3cret"));
        let bad = text.replace("[pool.exec]", "[pool.other]");
        assert!(Config::parse(&bad, "x.toml").is_err());
        let bad = text.replace("create = [\"/etc/slate/hooks/create\"]\n", "");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert!(e.0[0].message.contains("create"), "{e}");
        let bad = text.replace("warm = 1", "warm = 1\nprovider_typo = 2");
        assert!(Config::parse(&bad, "x.toml").is_err());
    }

    #[test]
    fn plaintext_agent_urls_need_an_explicit_opt_in_and_tls_files_come_in_pairs() {
        let exec = |extra: &str| {
            format!(
                "[server]\nagent_listen = \"0.0.0.0:8081\"\n[[pool]]\nname = \"mac\"\nprovider = \"exec\"\nimage = \"m\"\n[pool.exec]\ncreate = [\"c\"]\ndestroy = [\"d\"]\n{extra}\n[[pipeline]]\nname = \"d\"\npools = [\"mac\"]\nsteps = [{{ name = \"s\", run = \"true\" }}]\n"
            )
        };
        let c = Config::parse(&exec("agent_url = \"tls:10.0.0.1:8081\""), "x.toml").unwrap();
        let hooks = c.pools[0].exec.as_ref().unwrap();
        assert!(!hooks.insecure_plaintext);
        let e = Config::parse(&exec("agent_url = \"tcp:10.0.0.1:8081\""), "x.toml").unwrap_err();
        let e = &e.0[0];
        assert_eq!(
            (e.line, e.key.as_str()),
            (10, "pool[0].exec.agent_url"),
            "{e}"
        );
        assert!(e.message.contains("insecure_plaintext"), "{e}");
        let c = Config::parse(
            &exec("agent_url = \"tcp:10.0.0.1:8081\"\ninsecure_plaintext = true"),
            "x.toml",
        )
        .unwrap();
        assert!(c.pools[0].exec.as_ref().unwrap().insecure_plaintext);
        let e = Config::parse(&exec("agent_url = \"10.0.0.1:8081\""), "x.toml").unwrap_err();
        assert!(e.0[0].message.contains("tls:HOST:PORT"), "{e}");
        let with_cert = exec("").replace(
            "agent_listen = \"0.0.0.0:8081\"",
            "agent_listen = \"0.0.0.0:8081\"\nagent_tls_cert = \"/etc/slate/agent.crt\"",
        );
        let e = Config::parse(&with_cert, "x.toml").unwrap_err();
        assert_eq!(e.0[0].key, "server.agent_tls_cert", "{}", e);
    }

    #[test]
    fn network_modes_parse_and_are_located() {
        let pool = |extra: &str, provider: &str| {
            format!(
                "[[pool]]\nname = \"p\"\nprovider = \"{provider}\"\nimage = \"/img\"\n{extra}\n[[pipeline]]\nname = \"d\"\npools = [\"p\"]\nsteps = [{{ name = \"s\", run = \"true\" }}]\n"
            )
        };
        let c = Config::parse(&pool("", "sandbox"), "x.toml").unwrap();
        assert_eq!(c.pools[0].network, Network::None);
        let text = pool(
            "network = \"egress\"\nnetwork_allow = [\"10.0.0.5:3128\", \"[fd00::1]:80\"]",
            "sandbox",
        );
        let c = Config::parse(&text, "x.toml").unwrap();
        assert_eq!(c.pools[0].network, Network::Egress);
        assert_eq!(
            c.pools[0].network_allow,
            vec![
                "10.0.0.5:3128".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:80".parse().unwrap()
            ]
        );
        for (extra, provider, key, line, needle) in [
            (
                "network = \"bridge\"",
                "sandbox",
                "pool[0].network",
                5,
                "egress",
            ),
            (
                "network = \"egress\"",
                "exec",
                "pool[0].network",
                5,
                "sandbox",
            ),
            (
                "network_allow = [\"10.0.0.5:3128\"]",
                "sandbox",
                "pool[0].network_allow",
                5,
                "needs",
            ),
            (
                "network = \"egress\"\nnetwork_allow = [\"proxy:3128\"]",
                "qemu",
                "pool[0].network_allow",
                6,
                "ip:port",
            ),
            (
                "network = \"egress\"\nnetwork_allow = [\"10.0.0.5\"]",
                "qemu",
                "pool[0].network_allow",
                6,
                "ip:port",
            ),
        ] {
            let e = Config::parse(&pool(extra, provider), "x.toml").unwrap_err();
            assert_eq!(e.0[0].key, key, "{extra}: {e}");
            assert_eq!(e.0[0].line, line, "{extra}: {e}");
            assert!(e.0[0].message.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn plan_step_and_artifacts_parse_and_are_validated() {
        let text = r#"
[[pool]]
name = "p"
image = "/img"
limits = { artifacts = "10MiB" }

[[pipeline]]
name = "x"
pools = ["p"]

[pipeline.plan]
name = "list"
run = "echo '{\"name\": \"a\"}'"
timeout = "5m"

[[pipeline.steps]]
name = "build"
run = "make {port}"
artifacts = ["logs/**", "**/config.log"]
"#;
        let c = Config::parse(text, "x.toml").unwrap();
        assert_eq!(c.pools[0].artifacts_limit, 10 << 20);
        let plan = c.pipelines[0].plan.as_ref().unwrap();
        assert_eq!(plan.name, "list");
        assert_eq!(plan.timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.pipelines[0].steps[0].artifacts.len(), 2);
        assert_eq!(
            Config::parse("", "x.toml").map(|_| ()),
            Ok(()),
            "no pools, no pipelines"
        );

        let bad = text.replace("\"logs/**\"", "\"../etc/*\"");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert_eq!(e.0[0].key, "pipeline[0].steps[0].artifacts", "{e}");
        assert_eq!(e.0[0].line, 19, "{e}");
        let bad = text.replace("timeout = \"5m\"", "timeout = \"soon\"");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert_eq!(
            (e.0[0].key.as_str(), e.0[0].line),
            ("pipeline[0].plan.timeout", 14),
            "{e}"
        );
        let bad = text.replace("timeout = \"5m\"", "timeout = \"5m\"\nretries = 2");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert!(e.0[0].message.contains("retries"), "{e}");
        let bad = text.replace("\"10MiB\"", "\"lots\"");
        let e = Config::parse(&bad, "x.toml").unwrap_err();
        assert_eq!(e.0[0].key, "pool[0].limits.artifacts", "{e}");
    }

    #[test]
    fn empty_config_has_defaults() {
        let c = Config::parse("", "x.toml").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert!(c.github.is_none());
    }
}
