//! Exec provider: workers made by operator hook scripts (Tart, vSphere…) whose agent dials back to the server over TLS.
//!
//! For machines slate cannot create itself. Three operator commands do the work:
//!
//! - `create` gets the job in its environment (see [`ExecProvider`] for the variables),
//!   makes the machine (a linked clone, an APFS clone…), starts it with the agent told to
//!   dial `SLATE_AGENT_URL` with `SLATE_AGENT_TOKEN`, pinning `SLATE_AGENT_FINGERPRINT`,
//!   and exits 0 once the machine runs.
//! - `destroy` gets `SLATE_WORKER` and removes that machine. It must treat "already gone"
//!   as success: it is retried until it exits 0, and runs again after crashes.
//! - `list` prints the names of the machines that exist, one a line; names that are not
//!   `slate-<digits>` are ignored.
//!
//! Every hook runs in its own process group, with a clean environment, its working
//! directory in `<root>/slate-<id>/`, and is killed with its whole group at the
//! configured timeout. Hook output is appended to `<root>/slate-<id>/console.log`.
//!
//! Architecture invariant: `<root>/slate-<id>/` exists from before the create hook runs
//! until a destroy hook succeeded, so `list()` finds every machine a hook may have made,
//! even when the list hook cannot see it.

use crate::sandbox::valid_name;
use crate::{Provider, ProviderError, Result, Worker, WorkerSpec};
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::watch;

/// Longest wait between two destroy attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Variables of slate's own environment that hooks see; everything else (the server's
/// credentials among it) is withheld. Hooks get more through [`ExecConfig::env`].
const PASS_ENV: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// Exit code `Worker::exited` reports once an exec worker is destroyed (as if killed by
/// SIGKILL, like a destroyed sandbox).
pub const DESTROYED_EXIT: i32 = 128 + 9;

/// Settings of one exec pool.
#[derive(Clone)]
pub struct ExecConfig {
    /// argv of the create hook (no shell involved).
    pub create: Vec<String>,
    /// argv of the destroy hook.
    pub destroy: Vec<String>,
    /// argv of the list hook; empty means only worker directories are listed.
    pub list: Vec<String>,
    /// Limit of each hook run; the hook's process group is killed when it is exceeded.
    pub hook_timeout: Duration,
    /// How many times a failed destroy hook is run again (so `1 + destroy_retries` runs).
    pub destroy_retries: u32,
    /// Wait before the first retry; doubled after each (at most a minute).
    pub retry_backoff: Duration,
    /// What the agent dials, passed as `SLATE_AGENT_URL` (`tls:HOST:PORT`, or `tcp:` for a
    /// pool that allows plaintext): the server's agent listener as the machine sees it.
    pub server_agent_url: String,
    /// The fingerprint (`sha256:HEX`) of the listener's certificate, which the agent pins;
    /// passed as `SLATE_AGENT_FINGERPRINT`.
    pub server_agent_fingerprint: Option<String>,
    /// Extra environment for every hook (e.g. `GOVC_URL`). Values may be credentials:
    /// `Debug` shows only the keys.
    pub env: BTreeMap<String, String>,
    /// The pool's caches. slate cannot mount into a machine it does not run, so the create
    /// hook gets them as `SLATE_CACHES` and mounts them in the guest (e.g. over NFS).
    pub caches: Vec<ExecCache>,
}

/// One cache of an exec pool, as the create hook sees it: a line
/// `NAME<TAB>MODE<TAB>SOURCE<TAB>TARGET` of `SLATE_CACHES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCache {
    pub name: String,
    /// `ro` or `overlay`.
    pub mode: String,
    /// Where the mirror is (for exec pools usually an NFS export, `host:/path`).
    pub source: String,
    /// Mount point in the guest.
    pub target: String,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            create: Vec::new(),
            destroy: Vec::new(),
            list: Vec::new(),
            hook_timeout: Duration::from_secs(300),
            destroy_retries: 5,
            retry_backoff: Duration::from_secs(2),
            server_agent_url: String::new(),
            server_agent_fingerprint: None,
            env: BTreeMap::new(),
            caches: Vec::new(),
        }
    }
}

impl fmt::Debug for ExecConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecConfig")
            .field("create", &self.create)
            .field("destroy", &self.destroy)
            .field("list", &self.list)
            .field("hook_timeout", &self.hook_timeout)
            .field("destroy_retries", &self.destroy_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("server_agent_url", &self.server_agent_url)
            .field("server_agent_fingerprint", &self.server_agent_fingerprint)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("caches", &self.caches)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
enum Hook {
    Create,
    Destroy,
    List,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Create => "create",
            Hook::Destroy => "destroy",
            Hook::List => "list",
        })
    }
}

/// Provisions workers through operator hooks.
///
/// The create hook's environment: `SLATE_JOB_ID`, `SLATE_WORKER` (`slate-<id>`),
/// `SLATE_WORKER_DIR` (a private directory, removed after destroy), `SLATE_POOL`,
/// `SLATE_IMAGE` (the pool's `image`, e.g. a VM template name), `SLATE_AGENT_URL`,
/// `SLATE_AGENT_FINGERPRINT` (the server certificate's `sha256:HEX`, which the agent pins:
/// `slate-agent` reads it from this variable), `SLATE_AGENT_TOKEN` (one-time; never logged by slate), `SLATE_AGENT_BINARY` (host path
/// of the agent), `SLATE_AGENT_SOCKET` (the job's Unix socket, for hooks that run the
/// agent on this host), `SLATE_SOURCE` (host path of the job's tree, when there is one),
/// `SLATE_TIMEOUT_SECS`, `SLATE_CPUS` / `SLATE_MEMORY_BYTES` when the pool limits them, and
/// `SLATE_CACHES` (see [`ExecCache`]) when it has caches.
/// Destroy gets `SLATE_JOB_ID`, `SLATE_WORKER`, `SLATE_WORKER_DIR`; list gets none.
pub struct ExecProvider {
    root: PathBuf,
    cfg: ExecConfig,
    /// Senders of `Worker::exited` for workers made by this provider: an exec worker has
    /// no local process, so the channel only changes when the worker is destroyed.
    exited: Arc<Mutex<HashMap<String, watch::Sender<Option<i32>>>>>,
}

impl ExecProvider {
    /// `root` holds one directory per worker (e.g. `<data_dir>/workers/<pool>`).
    pub fn new(root: PathBuf, cfg: ExecConfig) -> Self {
        let _ = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root);
        Self {
            root,
            cfg,
            exited: Arc::default(),
        }
    }

    /// The directory holding the workers.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &ExecConfig {
        &self.cfg
    }

    fn worker_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The environment every hook starts from: a few variables of slate's own, then the
    /// operator's.
    fn base_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = PASS_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        env.extend(self.cfg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    fn create_env(&self, spec: &WorkerSpec, name: &str, dir: &Path) -> Vec<(String, String)> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut env = self.base_env();
        env.extend([
            ("SLATE_JOB_ID".into(), spec.job_id.0.to_string()),
            ("SLATE_WORKER".into(), name.to_string()),
            ("SLATE_WORKER_DIR".into(), path(dir)),
            ("SLATE_POOL".into(), spec.pool.clone()),
            ("SLATE_IMAGE".into(), path(&spec.image)),
            ("SLATE_AGENT_URL".into(), self.cfg.server_agent_url.clone()),
            (
                "SLATE_AGENT_TOKEN".into(),
                spec.agent_token.expose().to_string(),
            ),
            ("SLATE_AGENT_BINARY".into(), path(&spec.agent_binary)),
            ("SLATE_AGENT_SOCKET".into(), path(&spec.agent_socket)),
            (
                "SLATE_TIMEOUT_SECS".into(),
                spec.limits.timeout.as_secs().to_string(),
            ),
        ]);
        if let Some(fp) = &self.cfg.server_agent_fingerprint {
            env.push(("SLATE_AGENT_FINGERPRINT".into(), fp.clone()));
        }
        if !self.cfg.caches.is_empty() {
            let lines: Vec<String> = self
                .cfg
                .caches
                .iter()
                .map(|c| format!("{}\t{}\t{}\t{}", c.name, c.mode, c.source, c.target))
                .collect();
            env.push(("SLATE_CACHES".into(), lines.join("\n")));
        }
        if let Some(source) = &spec.source {
            env.push(("SLATE_SOURCE".into(), path(source)));
        }
        if let Some(cpus) = spec.limits.cpus {
            env.push(("SLATE_CPUS".into(), cpus.to_string()));
        }
        if let Some(mem) = spec.limits.memory_bytes {
            env.push(("SLATE_MEMORY_BYTES".into(), mem.to_string()));
        }
        env
    }

    fn destroy_env(&self, name: &str, dir: &Path) -> Vec<(String, String)> {
        let mut env = self.base_env();
        let id = name.trim_start_matches("slate-").to_string();
        env.extend([
            ("SLATE_JOB_ID".into(), id),
            ("SLATE_WORKER".into(), name.to_string()),
            (
                "SLATE_WORKER_DIR".into(),
                dir.to_string_lossy().into_owned(),
            ),
        ]);
        env
    }

    /// Runs a hook with its output appended to `log`; `Ok` only if it exits 0 in time.
    async fn run_logged(
        &self,
        hook: Hook,
        argv: &[String],
        env: &[(String, String)],
        cwd: &Path,
        log: &Path,
    ) -> Result<()> {
        let command = describe(hook, argv);
        let program = argv
            .first()
            .ok_or_else(|| ProviderError::Spec(format!("exec provider has no {hook} hook")))?;
        let mut file = open_log(log)?;
        let start_offset = file.seek(SeekFrom::End(0)).unwrap_or(0);
        let _ = writeln!(file, "slate: running {command}");
        let out = file.try_clone().map_err(io_err("open console.log"))?;
        let err = file.try_clone().map_err(io_err("open console.log"))?;

        let started = Instant::now();
        // A file, not a pipe: a machine process the hook leaves running may keep the
        // descriptor forever, and must not make us wait.
        let child = hook_command(program, &argv[1..], env, cwd)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| ProviderError::Io {
                what: format!("start {command}"),
                source: e,
            })?;
        let result = self.wait_hook(child, hook).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let verdict = match &result {
            Ok(status) if status.success() => None,
            Ok(status) => Some(exit_text(*status)),
            Err(e) => Some(e.clone()),
        };
        match &verdict {
            None => {
                let _ = writeln!(file, "slate: {hook} hook succeeded after {elapsed_ms} ms");
                Ok(())
            }
            Some(what) => {
                let _ = writeln!(file, "slate: {hook} hook {what} after {elapsed_ms} ms");
                let tail = log_tail(log, start_offset);
                let detail = if tail.is_empty() {
                    what.clone()
                } else {
                    format!("{what}; output ends: {tail}")
                };
                Err(ProviderError::Command { command, detail })
            }
        }
    }

    /// Waits for a hook; at the timeout, kills its whole process group.
    async fn wait_hook(
        &self,
        mut child: tokio::process::Child,
        hook: Hook,
    ) -> std::result::Result<ExitStatus, String> {
        let mut group = GroupKiller::new(&child);
        match tokio::time::timeout(self.cfg.hook_timeout, child.wait()).await {
            Ok(Ok(status)) => {
                // What the hook left running (the machine) is meant to outlive it.
                group.disarm();
                Ok(status)
            }
            Ok(Err(e)) => Err(format!("could not be waited for: {e}")),
            Err(_) => {
                tracing::warn!(hook = %hook, timeout_ms = self.cfg.hook_timeout.as_millis() as u64, "hook timed out, killing its process group");
                group.kill();
                let _ = child.wait().await;
                Err(format!(
                    "timed out after {} (killed with its process group)",
                    human(self.cfg.hook_timeout)
                ))
            }
        }
    }

    async fn run_list_hook(&self) -> Result<Vec<String>> {
        let argv = &self.cfg.list;
        let Some(program) = argv.first() else {
            return Ok(Vec::new());
        };
        let command = describe(Hook::List, argv);
        let child = hook_command(program, &argv[1..], &self.base_env(), &self.root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ProviderError::Io {
                what: format!("start {command}"),
                source: e,
            })?;
        let mut group = GroupKiller::new(&child);
        let out = match tokio::time::timeout(self.cfg.hook_timeout, child.wait_with_output()).await
        {
            Ok(Ok(out)) => {
                group.disarm();
                out
            }
            Ok(Err(e)) => {
                return Err(ProviderError::Command {
                    command,
                    detail: format!("could not be read: {e}"),
                })
            }
            Err(_) => {
                group.kill();
                return Err(ProviderError::Command {
                    command,
                    detail: format!(
                        "timed out after {} (killed with its process group; a list hook must not leave processes holding its output)",
                        human(self.cfg.hook_timeout)
                    ),
                });
            }
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(ProviderError::Command {
                command,
                detail: format!("{}: {}", exit_text(out.status), last_lines(&stderr)),
            });
        }
        if !stderr.trim().is_empty() {
            tracing::debug!(stderr = %last_lines(&stderr), "list hook wrote to stderr");
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(stdout
            .lines()
            .map(str::trim)
            .filter(|n| valid_name(n))
            .map(str::to_string)
            .collect())
    }

    /// Runs the destroy hook until it succeeds (or the retries are used up), then removes
    /// the worker directory.
    async fn destroy_inner(&self, name: &str) -> Result<()> {
        let dir = self.worker_dir(name);
        // Recreated when gone, so the hook has its directory and a console.log, and so a
        // machine whose destroy keeps failing stays visible to `list()`.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create worker directory"))?;
        let log = dir.join("console.log");
        let env = self.destroy_env(name, &dir);
        let attempts = self.cfg.destroy_retries.saturating_add(1);
        let mut delay = self.cfg.retry_backoff;
        let mut attempt = 1;
        loop {
            match self
                .run_logged(Hook::Destroy, &self.cfg.destroy, &env, &dir, &log)
                .await
            {
                Ok(()) => break,
                Err(ProviderError::Command { command, detail }) if attempt < attempts => {
                    tracing::warn!(worker = name, attempt, attempts, command = %command, error = %detail, retry_in_ms = delay.as_millis() as u64, "destroy hook failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(ProviderError::Command { command, detail }) => {
                    return Err(ProviderError::Command {
                        command,
                        detail: format!("{detail} (attempt {attempt} of {attempts})"),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove worker directory")(e)),
        }
        if let Some(tx) = self
            .exited
            .lock()
            .expect("exited map poisoned")
            .remove(name)
        {
            let _ = tx.send(Some(DESTROYED_EXIT));
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for ExecProvider {
    fn kind(&self) -> &'static str {
        "exec"
    }

    async fn provision(&self, spec: WorkerSpec) -> Result<Worker> {
        let started = Instant::now();
        let name = spec.job_id.resource_name();
        if self.cfg.create.is_empty() || self.cfg.destroy.is_empty() {
            return Err(ProviderError::Spec(
                "exec provider needs a create and a destroy hook".into(),
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("create worker root"))?;
        let dir = self.worker_dir(&name);
        // Checked before anything runs: rolling back must not destroy a worker that
        // existed before this call.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ProviderError::Spec(format!("worker {name} already exists")));
            }
            Err(e) => return Err(io_err("create worker directory")(e)),
        }
        let console_log = dir.join("console.log");
        let env = self.create_env(&spec, &name, &dir);
        match self
            .run_logged(Hook::Create, &self.cfg.create, &env, &dir, &console_log)
            .await
        {
            Ok(()) => {
                let (tx, exited) = watch::channel(None);
                self.exited
                    .lock()
                    .expect("exited map poisoned")
                    .insert(name.clone(), tx);
                tracing::info!(
                    job.id = spec.job_id.0,
                    worker = %name,
                    pool = %spec.pool,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "exec worker created"
                );
                Ok(Worker {
                    name,
                    job_id: spec.job_id,
                    exited,
                    console_log,
                })
            }
            Err(e) => {
                tracing::warn!(job.id = spec.job_id.0, worker = %name, error = %e, "create hook failed, rolling back");
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
            "exec worker destroyed"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names: BTreeSet<String> = self.run_list_hook().await?.into_iter().collect();
        match fs::read_dir(&self.root) {
            Ok(entries) => names.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| valid_name(n)),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list workers")(e)),
        }
        Ok(names.into_iter().collect())
    }
}

/// A hook process: own process group (so a timeout kills everything it started), clean
/// environment, no stdin. Never format it with `{:?}`: its Debug shows the environment,
/// token included.
fn hook_command(program: &str, args: &[String], env: &[(String, String)], cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

/// Kills a hook's process group when told to or when dropped armed (the provision
/// future was cancelled mid-hook). Armed only while the group leader is unreaped, so the
/// group id cannot have been reused.
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn new(child: &tokio::process::Child) -> Self {
        Self(child.id().and_then(|id| i32::try_from(id).ok()))
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            if let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL) {
                tracing::debug!(pgid, error = %e, "killing hook process group failed");
            }
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(hook: Hook, argv: &[String]) -> String {
    match argv.first() {
        Some(p) => format!("{hook} hook {p}"),
        None => format!("{hook} hook"),
    }
}

fn exit_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended abnormally".to_string(),
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn open_log(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ProviderError::Io {
            what: format!("open {}", path.display()),
            source: e,
        })
}

/// The last lines a hook wrote (after `offset`), for an error message.
fn log_tail(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.take(64 << 10).read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let own = text.lines().filter(|l| !l.starts_with("slate: "));
    last_lines(&own.collect::<Vec<_>>().join("\n"))
}

/// At most the last three non-empty lines, joined with ` | `, at most 400 characters.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.chars().count() > 400 {
        let skip = tail.chars().count() - 400;
        format!("…{}", tail.chars().skip(skip).collect::<String>())
    } else {
        tail
    }
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> ProviderError {
    move |source| ProviderError::Io {
        what: what.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_env_values() {
        let cfg = ExecConfig {
            env: [("GOVC_PASSWORD".to_string(), "hunter2".to_string())].into(),
            ..ExecConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(s.contains("GOVC_PASSWORD"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
    }

    #[test]
    fn tails_are_short() {
        assert_eq!(last_lines("a\n\nb\nc\nd\n"), "b | c | d");
        assert_eq!(last_lines(""), "");
        let long = "x".repeat(1000);
        assert_eq!(last_lines(&long).chars().count(), 401);
    }

    #[tokio::test]
    async fn destroy_refuses_path_tricks() {
        let root = tempfile::tempdir().unwrap();
        let p = ExecProvider::new(
            root.path().to_path_buf(),
            ExecConfig {
                destroy: vec!["true".into()],
                ..ExecConfig::default()
            },
        );
        assert!(p.destroy("../etc").await.is_err());
        assert!(p.destroy("slate-1/../../x").await.is_err());
        assert!(p.destroy("slate-1").await.is_ok());
        assert!(!root.path().join("slate-1").exists());
    }
}
