//! The server's shared state: configuration, store, providers, reporter, logs, mirrors.

use crate::git::GitMirrors;
use crate::logs::LogStore;
use crate::metrics::Metrics;
use slate_core::config::{Config, ProviderKind, SecretSource};
use slate_core::{Build, Job, JobId, JobState, ReportState, Secret};
use slate_forge::reporter::Reporter;
use slate_forge::status::{GithubStatuses, StatusUpdate};
use slate_provider::sandbox::SandboxProvider;
use slate_provider::Provider;
use slate_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading secret {what} from {source_desc}: {detail}")]
    Secret {
        what: &'static str,
        source_desc: String,
        detail: String,
    },
    #[error("the [github] webhook source needs webhook_secret_file or webhook_secret_env: refusing to accept unsigned webhooks")]
    NoWebhookSecret,
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] slate_store::StoreError),
    #[error("unsupported database {0:?}: only sqlite is available in this build")]
    Database(String),
    #[error("agent binary {0} does not exist: build it or set [server] agent_binary")]
    NoAgent(PathBuf),
    #[error("pool {pool}: image {image} is missing")]
    Image { pool: String, image: PathBuf },
    #[error("pool {pool}: cache {cache}: source {source_dir} is not a directory")]
    Cache {
        pool: String,
        cache: String,
        source_dir: PathBuf,
    },
    #[error("pool {pool}: an exec pool's agents dial back over tls: set [server] agent_listen or [pool.exec] agent_url")]
    NoAgentListener { pool: String },
    #[error("pool {pool}: {detail} (build it with `slate image build`)")]
    NamedImage { pool: String, detail: String },
    #[error("github client: {0}")]
    Forge(String),
    #[error("secret {name}: {detail}")]
    NamedSecret { name: String, detail: String },
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Shared state of a running server.
pub struct App {
    pub config: Arc<Config>,
    pub webhook_secret: Option<Secret>,
    /// `[[secret]]` values by name, read at startup; handed only to the steps that
    /// name them, never in pull request builds, and masked in job logs.
    pub secrets: std::collections::BTreeMap<String, Secret>,
    pub store: Arc<dyn Store>,
    /// Provider per pool name.
    pub providers: HashMap<String, Arc<dyn Provider>>,
    /// The qemu provider every qemu pool shares (it keeps their warm VMs).
    pub qemu: Arc<slate_provider::QemuProvider>,
    pub reporter: Option<Reporter>,
    pub logs: LogStore,
    pub git: GitMirrors,
    pub metrics: Metrics,
    pub data_dir: PathBuf,
    pub sources_dir: PathBuf,
    pub sockets_dir: PathBuf,
    pub agent_binary: PathBuf,
    pub public_url: String,
    /// Overrides every pool's `boot_timeout` (tests).
    pub boot_timeout: Option<Duration>,
    pub wake_scheduler: Notify,
    pub wake_events: Notify,
    /// Held while a build and its jobs are being made ready, so the scheduler never
    /// claims a job whose source is not prepared yet.
    pub planning: tokio::sync::Mutex<()>,
    /// Held while events are handled, so an event is handled by one task only.
    pub event_lock: tokio::sync::Mutex<()>,
    /// Cancellation handles of jobs running in this process.
    pub running: Mutex<HashMap<JobId, CancellationToken>>,
    pub shutdown: CancellationToken,
    /// Set on SIGTERM: no new jobs are claimed; running ones may finish (grace period).
    pub draining: CancellationToken,
    /// Jobs waiting for their agents, by token.
    pub agents: crate::agents::AgentRegistry,
    /// TLS of the agent listener (`[server] agent_listen`), with the fingerprint agents pin.
    pub agent_tls: Option<crate::tls::AgentTls>,
    /// Shared caches: mirrors, PR layers, per-job overlays.
    pub caches: Arc<slate_cache::CacheManager>,
    /// The image version each running job was started on (pinned: a rebuild never
    /// changes a running job; `gc` must keep these).
    pub images_in_use: Mutex<HashMap<JobId, PathBuf>>,
    /// Scheduled image rebuilds and their last results.
    pub rebuilds: crate::images::Rebuilds,
    /// This server's name in job leases and event claims.
    pub replica_id: String,
    /// Several replicas share the store (PostgreSQL): jobs are leased, events claimed,
    /// and startup recovery touches only this replica's own machines.
    pub replicated: bool,
}

/// Read a secret from its configured source.
pub fn read_secret(what: &'static str, src: &SecretSource) -> Result<Secret, StartError> {
    match src {
        SecretSource::File(p) => std::fs::read_to_string(p)
            .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
            .map_err(|e| StartError::Secret {
                what,
                source_desc: p.display().to_string(),
                detail: e.to_string(),
            }),
        SecretSource::Env(var) => {
            std::env::var(var)
                .map(Secret::new)
                .map_err(|e| StartError::Secret {
                    what,
                    source_desc: format!("environment variable {var}"),
                    detail: e.to_string(),
                })
        }
    }
}

/// Options the binary or a test sets beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// Overrides `[server] agent_binary` and the default next to the executable.
    pub agent_binary: Option<PathBuf>,
    /// Overrides every pool's `boot_timeout`.
    pub boot_timeout: Option<Duration>,
    /// Address the HTTP listener actually bound (for links when listening on port 0).
    pub bound_addr: Option<std::net::SocketAddr>,
}

impl App {
    pub async fn build(config: Config, opts: AppOptions) -> Result<Arc<App>, StartError> {
        let data_dir = config.server.data_dir.clone();
        let mk = |p: PathBuf| -> Result<PathBuf, StartError> {
            std::fs::create_dir_all(&p).map_err(|source| StartError::DataDir {
                path: p.clone(),
                source,
            })?;
            Ok(p)
        };
        mk(data_dir.clone())?;
        let sources_dir = mk(data_dir.join("sources"))?;
        let sockets_dir = mk(data_dir.join("sockets"))?;
        let workers_dir = mk(data_dir.join("workers"))?;
        let logs = LogStore::new(data_dir.join("logs")).map_err(|source| StartError::DataDir {
            path: data_dir.join("logs"),
            source,
        })?;
        let git = GitMirrors::new(data_dir.join("git")).map_err(|source| StartError::DataDir {
            path: data_dir.join("git"),
            source,
        })?;

        // SQLite in the data dir unless `[server] database` names PostgreSQL.
        let store: Arc<dyn Store> = slate_store::open_store(
            config.server.database.as_deref().unwrap_or(""),
            &data_dir.join("slate.db"),
        )
        .await?;

        let (webhook_secret, reporter) = match &config.github {
            Some(gh) => {
                let secret = match &gh.webhook_secret {
                    Some(src) => read_secret("webhook secret", src)?,
                    None => return Err(StartError::NoWebhookSecret),
                };
                if secret.is_empty() {
                    return Err(StartError::NoWebhookSecret);
                }
                let token = gh
                    .token
                    .as_ref()
                    .map(|src| read_secret("github token", src))
                    .transpose()?;
                let sink = GithubStatuses::new(&gh.api_url, token)
                    .map_err(|e| StartError::Forge(e.to_string()))?;
                (Some(secret), Some(Reporter::spawn(Arc::new(sink))))
            }
            None => (None, None),
        };

        let mut secrets = std::collections::BTreeMap::new();
        for s in &config.secrets {
            let value = read_secret("named secret", &s.source).map_err(|e| match e {
                StartError::Secret {
                    source_desc,
                    detail,
                    ..
                } => StartError::NamedSecret {
                    name: s.name.clone(),
                    detail: format!("{source_desc}: {detail}"),
                },
                other => other,
            })?;
            if value.is_empty() {
                return Err(StartError::NamedSecret {
                    name: s.name.clone(),
                    detail: "the value is empty".into(),
                });
            }
            if value.expose().len() < crate::logs::MIN_MASKED_LEN {
                tracing::warn!(
                    secret = %s.name,
                    "secret is shorter than {} bytes: it is not masked in logs",
                    crate::logs::MIN_MASKED_LEN
                );
            }
            secrets.insert(s.name.clone(), value);
        }

        let agent_binary = opts
            .agent_binary
            .clone()
            .or(config.server.agent_binary.clone())
            .unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("slate-agent")))
                    .unwrap_or_else(|| PathBuf::from("slate-agent"))
            });
        if !agent_binary.is_file() {
            return Err(StartError::NoAgent(agent_binary));
        }

        let agent_tls = match &config.server.agent_listen {
            Some(_) => Some(crate::tls::AgentTls::load_or_generate(
                &data_dir,
                config.server.agent_tls_cert.as_deref(),
                config.server.agent_tls_key.as_deref(),
            )?),
            None => None,
        };

        let caches = Arc::new(
            slate_cache::CacheManager::new(data_dir.join("caches")).map_err(|e| {
                StartError::DataDir {
                    path: data_dir.join("caches"),
                    source: std::io::Error::other(e.to_string()),
                }
            })?,
        );
        for pool in &config.pools {
            for c in &pool.caches {
                if !c.source.is_dir() {
                    return Err(StartError::Cache {
                        pool: pool.name.clone(),
                        cache: c.name.clone(),
                        source_dir: c.source.clone(),
                    });
                }
            }
        }
        let sandbox: Arc<dyn Provider> = Arc::new(SandboxProvider::new(workers_dir));
        let qemu = Arc::new(slate_provider::QemuProvider::new(
            mk(data_dir.join("vm-workers"))?,
            slate_provider::QemuConfig::default(),
        ));
        let mut providers = HashMap::new();
        for pool in &config.pools {
            // An exec pool's image is the hooks' business (a VM name, an inventory path);
            // a sandbox pool may name a built image (`slate image build`) instead of a path.
            let named =
                pool.provider != ProviderKind::Exec && !pool.image.to_string_lossy().contains('/');
            if named {
                if let Err(e) =
                    slate_image::resolve(&data_dir.join("images"), &pool.image.to_string_lossy())
                {
                    return Err(StartError::NamedImage {
                        pool: pool.name.clone(),
                        detail: e.to_string(),
                    });
                }
            } else if pool.provider != ProviderKind::Exec && !pool.image.is_dir() {
                return Err(StartError::Image {
                    pool: pool.name.clone(),
                    image: pool.image.clone(),
                });
            }
            match pool.provider {
                ProviderKind::Sandbox => providers.insert(pool.name.clone(), sandbox.clone()),
                ProviderKind::Libvirt => {
                    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
                        if !named && !pool.image.join(f).is_file() {
                            return Err(StartError::Image {
                                pool: pool.name.clone(),
                                image: pool.image.join(f),
                            });
                        }
                    }
                    let l = pool
                        .libvirt
                        .clone()
                        .expect("validated: libvirt pools have settings");
                    let cfg = slate_provider::LibvirtConfig {
                        uris: l.uris,
                        storage_pool: l.storage_pool,
                        virt_type: if l.virt_type == "kvm" {
                            slate_provider::libvirt::VirtType::Kvm
                        } else {
                            slate_provider::libvirt::VirtType::Qemu
                        },
                        ..Default::default()
                    };
                    let root = mk(data_dir.join("libvirt-workers").join(&pool.name))?;
                    providers.insert(
                        pool.name.clone(),
                        Arc::new(slate_provider::LibvirtProvider::new(root, cfg))
                            as Arc<dyn Provider>,
                    )
                }
                ProviderKind::Qemu => {
                    for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
                        if !named && !pool.image.join(f).is_file() {
                            return Err(StartError::Image {
                                pool: pool.name.clone(),
                                image: pool.image.join(f),
                            });
                        }
                    }
                    // Probe KVM once now (a few seconds at most), not on the first job.
                    let (q, image) = (qemu.clone(), pool.image.clone());
                    tokio::spawn(async move {
                        let accel = q.accel(&image).await;
                        tracing::info!(?accel, "vm acceleration");
                    });
                    providers.insert(pool.name.clone(), qemu.clone() as Arc<dyn Provider>)
                }
                ProviderKind::Exec => {
                    let hooks = pool.exec.clone().expect("validated: exec pools have hooks");
                    let scheme = if hooks.insecure_plaintext {
                        "tcp"
                    } else {
                        "tls"
                    };
                    let agent_url = match (&hooks.agent_url, &config.server.agent_listen) {
                        (Some(u), _) => u.clone(),
                        (None, Some(l)) => format!("{scheme}:{l}"),
                        (None, None) => {
                            return Err(StartError::NoAgentListener {
                                pool: pool.name.clone(),
                            })
                        }
                    };
                    let cfg = slate_provider::ExecConfig {
                        create: hooks.create,
                        destroy: hooks.destroy,
                        list: hooks.list,
                        hook_timeout: hooks.timeout,
                        destroy_retries: hooks.destroy_retries,
                        retry_backoff: hooks.retry_backoff,
                        server_agent_url: agent_url,
                        server_agent_fingerprint: agent_tls.as_ref().map(|t| t.fingerprint.clone()),
                        env: hooks.env,
                        caches: pool
                            .caches
                            .iter()
                            .map(|c| slate_provider::ExecCache {
                                name: c.name.clone(),
                                mode: match c.mode {
                                    slate_core::config::CacheMode::Ro => "ro".into(),
                                    slate_core::config::CacheMode::Overlay => "overlay".into(),
                                },
                                source: c.source.display().to_string(),
                                target: c.target.clone(),
                            })
                            .collect(),
                    };
                    let root = mk(data_dir.join("exec-workers").join(&pool.name))?;
                    providers.insert(
                        pool.name.clone(),
                        Arc::new(slate_provider::ExecProvider::new(root, cfg)) as Arc<dyn Provider>,
                    )
                }
            };
        }

        let replicated = config
            .server
            .database
            .as_deref()
            .is_some_and(|d| d.starts_with("postgres"));
        let replica_id = config.server.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", data_dir.display())
        });
        let public_url = config.server.public_url.clone().unwrap_or_else(|| {
            format!(
                "http://{}",
                opts.bound_addr
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| config.server.listen.clone())
            )
        });

        Ok(Arc::new(App {
            config: Arc::new(config),
            webhook_secret,
            secrets,
            store,
            providers,
            qemu,
            reporter,
            logs,
            git,
            metrics: Metrics::new(),
            data_dir,
            sources_dir,
            sockets_dir,
            agent_binary,
            public_url,
            boot_timeout: opts.boot_timeout,
            wake_scheduler: Notify::new(),
            wake_events: Notify::new(),
            planning: tokio::sync::Mutex::new(()),
            event_lock: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            agents: crate::agents::AgentRegistry::default(),
            agent_tls,
            caches,
            images_in_use: Mutex::new(HashMap::new()),
            rebuilds: crate::images::Rebuilds::default(),
            replica_id,
            replicated,
        }))
    }

    /// Starts keeping the `warm` VMs of every qemu pool that asks for them.
    pub fn start_warm_pools(self: &Arc<Self>) {
        for pool in &self.config.pools {
            if pool.provider != ProviderKind::Qemu || pool.warm == 0 {
                continue;
            }
            let (data_dir, p) = (self.data_dir.clone(), pool.clone());
            self.qemu.keep_warm(slate_provider::qemu::WarmTemplate {
                pool: pool.name.clone(),
                size: pool.warm,
                image: Arc::new(move || match crate::runner::pool_image(&data_dir, &p) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::warn!(pool = %p.name, error = %e, "no image for warm vms");
                        None
                    }
                }),
                limits: pool.limits.clone(),
                mounts: pool
                    .caches
                    .iter()
                    .map(|c| {
                        (
                            c.target.clone(),
                            c.mode == slate_core::config::CacheMode::Ro,
                        )
                    })
                    .collect(),
                network: pool.network,
                network_allow: pool.network_allow.clone(),
            });
            tracing::info!(pool = %pool.name, warm = pool.warm, "keeping vms warm");
        }
    }

    /// Link to a job for statuses.
    pub fn job_url(&self, job: JobId) -> String {
        format!("{}/jobs/{}", self.public_url, job.0)
    }

    /// Post the job's current state to the forge (never blocks).
    pub fn report(&self, build: &Build, job: &Job, description: &str) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        if build.change.head_sha.is_empty() {
            return;
        }
        reporter.report(StatusUpdate {
            repo: build.change.repo.clone(),
            sha: build.change.head_sha.clone(),
            state: ReportState::for_job(job.state),
            context: job.context(),
            description: description.to_string(),
            target_url: Some(self.job_url(job.id)),
        });
    }

    /// Cancel a job wherever it is; returns whether it was still active.
    pub async fn cancel_job(
        &self,
        id: JobId,
        reason: &str,
    ) -> Result<bool, slate_store::StoreError> {
        let moved = self
            .store
            .transition_job(id, JobState::active(), JobState::Cancelled, Some(reason))
            .await?;
        if moved {
            tracing::info!(job.id = id.0, reason, "job cancelled");
            let token = self.running.lock().unwrap().get(&id).cloned();
            match token {
                // The runner reports the final state once its worker is gone.
                Some(t) => t.cancel(),
                None => {
                    let job = self.store.get_job(id).await?;
                    let build = self.store.get_build(job.build_id).await?;
                    self.report(&build, &job, reason);
                }
            }
            self.wake_scheduler.notify_one();
        }
        Ok(moved)
    }
}
