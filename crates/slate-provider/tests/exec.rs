//! Tests of the exec provider with real hook scripts: local processes stand in for machines, and the real static agent dials back over TCP.

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_proto::{AgentMsg, JobSpec, ServerMsg, StepOutcome, StepSpec, PROTOCOL_VERSION};
use slate_provider::{ExecCache, ExecConfig, ExecProvider, Provider, WorkerSpec};
use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn unique_job_id() -> JobId {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    JobId(std::process::id() as i64 * 1000 + NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The standard "machine": a background process whose pid the hooks keep in the state dir.
const CREATE: &str = r#"
env | sort | grep -v '^SLATE_AGENT_TOKEN=' | grep -v '^SLATE_CACHES=' > "$STATE/$SLATE_WORKER.env"
printf '%s\n' "$SLATE_CACHES" > "$STATE/$SLATE_WORKER.caches"
printf '%s\n' "$SLATE_AGENT_TOKEN" > "$STATE/$SLATE_WORKER.token"
echo "cloning $SLATE_IMAGE into $SLATE_WORKER"
echo "some diagnostics on stderr" >&2
sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! > "$STATE/$SLATE_WORKER.pid"
"#;

/// Idempotent: a machine that is already gone is success.
const DESTROY: &str = r#"
echo "destroying $SLATE_WORKER"
touch "$STATE/destroyed-$SLATE_WORKER"
f="$STATE/$SLATE_WORKER.pid"
[ -e "$f" ] || { echo "already gone"; exit 0; }
kill -9 "$(cat "$f")" 2>/dev/null || true
rm -f "$f"
"#;

/// Lists live machines, plus names that are not slate's and must be ignored.
const LIST: &str = r#"
for f in "$STATE"/slate-*.pid; do
  [ -e "$f" ] || continue
  basename "$f" .pid
done
echo "not-a-worker"
echo "slate-12abc"
echo "vm-slate-3"
"#;

/// A temp dir with hooks, a state dir for them and a worker root; on drop, kills every
/// process whose pid a hook recorded (even when the test panicked).
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["state", "hooks", "workers", "image", "source", "sock"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes an executable `#!/bin/sh` hook and returns its argv.
    fn hook(&self, name: &str, body: &str) -> Vec<String> {
        let path = self.path("hooks").join(name);
        fs::write(&path, format!("#!/bin/sh\nset -u\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        vec![path.to_string_lossy().into_owned()]
    }

    fn config(&self, create: &str, destroy: &str) -> ExecConfig {
        ExecConfig {
            create: self.hook("create", create),
            destroy: self.hook("destroy", destroy),
            list: self.hook("list", LIST),
            hook_timeout: Duration::from_secs(20),
            destroy_retries: 3,
            retry_backoff: Duration::from_millis(20),
            server_agent_url: "tls:127.0.0.1:1".into(),
            server_agent_fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
            env: [(
                "STATE".to_string(),
                self.state().to_string_lossy().into_owned(),
            )]
            .into(),
            caches: vec![
                ExecCache {
                    name: "packages".into(),
                    mode: "ro".into(),
                    source: "mirror:/srv/mirror/packages".into(),
                    target: "/opt/local/var/macports/incoming/verified".into(),
                },
                ExecCache {
                    name: "distfiles".into(),
                    mode: "overlay".into(),
                    source: "mirror:/srv/mirror/distfiles".into(),
                    target: "/opt/local/var/macports/distfiles".into(),
                },
            ],
        }
    }

    fn provider(&self, cfg: ExecConfig) -> ExecProvider {
        ExecProvider::new(self.path("workers"), cfg)
    }

    fn spec(&self, agent_binary: PathBuf) -> WorkerSpec {
        let job_id = unique_job_id();
        WorkerSpec {
            job_id,
            pool: "macos-14".into(),
            image: self.path("image"),
            source: Some(self.path("source")),
            agent_binary,
            agent_socket: self.path("sock").join("agent.sock"),
            agent_token: Secret::new(format!("tok-{}-Zq81xv0Lp", job_id.0)),
            limits: Limits {
                memory_bytes: Some(8 << 30),
                pids: None,
                cpus: Some(4.0),
                timeout: Duration::from_secs(3600),
                disk_bytes: None,
            },
            network: Network::None,
            network_allow: Vec::new(),
            runtime: "runc".into(),
            mounts: Vec::new(),
        }
    }

    fn read_state(&self, file: &str) -> String {
        fs::read_to_string(self.state().join(file))
            .unwrap_or_else(|e| panic!("state file {file}: {e}"))
    }

    fn pid(&self, file: &str) -> i32 {
        self.read_state(file).trim().parse().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(self.state()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".pid") {
                    let pid = fs::read_to_string(e.path()).unwrap_or_default();
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}

/// `(state, process group)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let pgrp = f.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Running, not a zombie waiting for a reaper.
fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(s, _)| !matches!(s, 'Z' | 'X'))
}

/// Live processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(s, g)| g == pgid && !matches!(s, 'Z' | 'X')))
        .collect()
}

/// Live processes whose command line contains `needle`.
fn processes_with_arg(needle: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
                && alive(pid)
        })
        .collect()
}

async fn wait_dead(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test]
async fn create_gets_the_job_list_sees_it_destroy_removes_it() {
    let fx = Fixture::new();
    let p = fx.provider(fx.config(CREATE, DESTROY));
    assert_eq!(p.kind(), "exec");
    let spec = fx.spec(PathBuf::from("/usr/local/bin/slate-agent"));
    let token = spec.agent_token.expose().to_string();
    let id = spec.job_id;
    let name = id.resource_name();

    let worker = p.provision(spec).await.unwrap();
    assert_eq!(worker.name, name);
    assert_eq!(worker.job_id, id);
    assert_eq!(
        *worker.exited.borrow(),
        None,
        "an exec worker has no local process"
    );
    let console = fs::read_to_string(&worker.console_log).unwrap();
    assert!(
        console.contains(&format!("cloning {}", fx.path("image").display())),
        "{console}"
    );
    assert!(console.contains("some diagnostics on stderr"), "{console}");
    assert!(console.contains("create hook succeeded"), "{console}");

    let env: BTreeMap<String, String> = fx
        .read_state(&format!("{name}.env"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = fx.path("workers").join(&name);
    let want = [
        ("SLATE_JOB_ID", id.0.to_string()),
        ("SLATE_WORKER", name.clone()),
        ("SLATE_WORKER_DIR", dir.display().to_string()),
        ("SLATE_POOL", "macos-14".into()),
        ("SLATE_IMAGE", fx.path("image").display().to_string()),
        ("SLATE_AGENT_URL", "tls:127.0.0.1:1".into()),
        (
            "SLATE_AGENT_FINGERPRINT",
            format!("sha256:{}", "ab".repeat(32)),
        ),
        ("SLATE_AGENT_BINARY", "/usr/local/bin/slate-agent".into()),
        (
            "SLATE_AGENT_SOCKET",
            fx.path("sock").join("agent.sock").display().to_string(),
        ),
        ("SLATE_SOURCE", fx.path("source").display().to_string()),
        ("SLATE_TIMEOUT_SECS", "3600".into()),
        ("SLATE_CPUS", "4".into()),
        ("SLATE_MEMORY_BYTES", (8u64 << 30).to_string()),
        ("STATE", fx.state().display().to_string()),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k), Some(&v), "{k} in {env:?}");
    }
    assert_eq!(fx.read_state(&format!("{name}.token")).trim(), token);
    assert_eq!(
        fx.read_state(&format!("{name}.caches")),
        "packages\tro\tmirror:/srv/mirror/packages\t/opt/local/var/macports/incoming/verified\n\
         distfiles\toverlay\tmirror:/srv/mirror/distfiles\t/opt/local/var/macports/distfiles\n"
    );
    assert!(env.contains_key("PATH"));
    // The hook's environment is clean: the test process has cargo's variables, the hook not.
    if std::env::vars().any(|(k, _)| k.starts_with("CARGO")) {
        assert!(!env.keys().any(|k| k.starts_with("CARGO")), "{env:?}");
    }

    let machine = fx.pid(&format!("{name}.pid"));
    assert!(alive(machine));
    assert_eq!(p.list().await.unwrap(), vec![name.clone()]);

    p.destroy(&name).await.unwrap();
    assert!(
        wait_dead(machine, Duration::from_secs(5)).await,
        "machine {machine} survived destroy"
    );
    assert!(!dir.exists());
    assert_eq!(p.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(*worker.exited.borrow(), Some(137));

    // Idempotent: the hook says "already gone", nothing is left behind either.
    p.destroy(&name).await.unwrap();
    assert!(!dir.exists());
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn hanging_create_hook_is_killed_with_its_children_at_the_timeout() {
    let fx = Fixture::new();
    let mut cfg = fx.config(
        r#"
sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! > "$STATE/child.pid"
echo $$ > "$STATE/hook.pid"
echo "waiting for the hypervisor"
sleep 1000
"#,
        DESTROY,
    );
    cfg.hook_timeout = Duration::from_secs(1);
    let p = fx.provider(cfg);
    let spec = fx.spec("/bin/true".into());
    let name = spec.job_id.resource_name();

    let t0 = Instant::now();
    let err = p.provision(spec).await.unwrap_err().to_string();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(err.contains("create hook"), "{err}");
    assert!(err.contains("timed out after 1s"), "{err}");
    assert!(err.contains("waiting for the hypervisor"), "{err}");

    let hook = fx.pid("hook.pid");
    let child = fx.pid("child.pid");
    assert!(!alive(hook), "hook {hook} still runs");
    assert!(
        wait_dead(child, Duration::from_secs(2)).await,
        "child {child} still runs"
    );
    assert_eq!(
        group_members(hook),
        Vec::<i32>::new(),
        "processes left in the hook's group"
    );

    // Rolled back: the destroy hook ran for the half-made machine and nothing is listed.
    assert!(fx.state().join(format!("destroyed-{name}")).exists());
    assert!(!fx.path("workers").join(&name).exists());
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn failing_create_hook_reports_its_output_and_rolls_back() {
    let fx = Fixture::new();
    let p = fx.provider(fx.config(
        "echo 'govc: template macos-14 not found' >&2\nexit 3",
        DESTROY,
    ));
    let spec = fx.spec("/bin/true".into());
    let name = spec.job_id.resource_name();
    let err = p.provision(spec).await.unwrap_err().to_string();
    assert!(err.contains("exited with 3"), "{err}");
    assert!(err.contains("govc: template macos-14 not found"), "{err}");
    assert!(fx.state().join(format!("destroyed-{name}")).exists());
    assert!(p.list().await.unwrap().is_empty());
}

/// Fails the first two runs for a worker, then destroys it.
const FLAKY_DESTROY: &str = r#"
c="$STATE/$SLATE_WORKER.count"
n=$(cat "$c" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$c"
if [ $n -lt 3 ]; then echo "vcenter busy (try $n)" >&2; exit 1; fi
f="$STATE/$SLATE_WORKER.pid"
[ -e "$f" ] || exit 0
kill -9 "$(cat "$f")" 2>/dev/null || true
rm -f "$f"
"#;

#[tokio::test]
async fn failing_destroy_hook_is_retried_until_it_succeeds() {
    let fx = Fixture::new();
    let mut cfg = fx.config(CREATE, FLAKY_DESTROY);
    cfg.destroy_retries = 2;
    let p = fx.provider(cfg.clone());
    let spec = fx.spec("/bin/true".into());
    let name = spec.job_id.resource_name();
    p.provision(spec).await.unwrap();
    let machine = fx.pid(&format!("{name}.pid"));
    let t0 = Instant::now();
    p.destroy(&name).await.unwrap();
    assert_eq!(fx.read_state(&format!("{name}.count")).trim(), "3");
    // Backoff of 20 ms, then 40 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t0.elapsed()
    );
    assert!(wait_dead(machine, Duration::from_secs(5)).await);
    assert!(p.list().await.unwrap().is_empty());

    // With too few retries the error says why, and the worker stays listed (its directory
    // is kept) so that a later destroy — e.g. the server's reconciliation — finishes it.
    cfg.destroy_retries = 1;
    let p = fx.provider(cfg);
    let spec = fx.spec("/bin/true".into());
    let name = spec.job_id.resource_name();
    p.provision(spec).await.unwrap();
    let err = p.destroy(&name).await.unwrap_err().to_string();
    assert!(err.contains("destroy hook"), "{err}");
    assert!(err.contains("exited with 1"), "{err}");
    assert!(err.contains("vcenter busy (try 2)"), "{err}");
    assert!(err.contains("attempt 2 of 2"), "{err}");
    assert_eq!(p.list().await.unwrap(), vec![name.clone()]);
    let console = fs::read_to_string(fx.path("workers").join(&name).join("console.log")).unwrap();
    assert!(console.contains("vcenter busy (try 1)"), "{console}");
    p.destroy(&name).await.unwrap();
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn failing_list_hook_is_an_error_not_an_empty_list() {
    let fx = Fixture::new();
    let mut cfg = fx.config(CREATE, DESTROY);
    cfg.list = fx.hook(
        "bad-list",
        "echo slate-1; echo 'govc: connection refused' >&2; exit 2",
    );
    let err = fx.provider(cfg).list().await.unwrap_err().to_string();
    assert!(err.contains("list hook"), "{err}");
    assert!(err.contains("govc: connection refused"), "{err}");
}

/// A tracing subscriber that keeps everything it is given as text.
struct Capture(Arc<Mutex<String>>);

struct Visitor(Arc<Mutex<String>>);

impl tracing::field::Visit for Visitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let mut buf = self.0.lock().unwrap();
        buf.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::always()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut Visitor(self.0.clone()));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut Visitor(self.0.clone()));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut Visitor(self.0.clone()));
        self.0.lock().unwrap().push('\n');
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn token_never_reaches_logs_console_or_debug_output() {
    let logs = Arc::new(Mutex::new(String::new()));
    let _guard = tracing::subscriber::set_default(Capture(logs.clone()));

    let fx = Fixture::new();
    let cfg = fx.config(CREATE, FLAKY_DESTROY);
    let p = fx.provider(cfg.clone());
    let spec = fx.spec("/bin/true".into());
    let token = spec.agent_token.expose().to_string();
    let name = spec.job_id.resource_name();
    let spec_debug = format!("{spec:?}");
    let worker = p.provision(spec).await.unwrap();
    let worker_debug = format!("{worker:?}");
    let console = fs::read_to_string(&worker.console_log).unwrap();
    p.destroy(&name).await.unwrap();

    // A failing create goes through the error and rollback paths too.
    let failing = fx.provider(fx.config("echo 'no capacity' >&2; exit 1", DESTROY));
    let spec = fx.spec("/bin/true".into());
    let token2 = spec.agent_token.expose().to_string();
    let err = failing.provision(spec).await.unwrap_err();
    let err_text = format!("{err} {err:?}");

    // The hook did get it.
    assert_eq!(fx.read_state(&format!("{name}.token")).trim(), token);
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.contains("exec worker created"),
        "capture saw nothing: {logs}"
    );
    assert!(logs.contains("destroy hook failed, retrying"), "{logs}");
    for (what, text) in [
        ("spec Debug", &spec_debug),
        ("worker Debug", &worker_debug),
        ("config Debug", &format!("{cfg:?}")),
        ("console.log", &console),
        ("tracing", &logs),
        ("error", &err_text),
    ] {
        assert!(!text.contains(&token), "token in {what}: {text}");
        assert!(!text.contains(&token2), "token in {what}: {text}");
    }
}

/// The server side of one agent connection: checks the token, sends a one-step job,
/// acknowledges output and returns it with the step outcome and `Done`'s verdict.
fn serve_one_job(
    listener: TcpListener,
    token: String,
    job: JobSpec,
) -> Result<(String, Option<StepOutcome>, bool), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the agent never dialed in".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let e = |e: slate_proto::ProtoError| e.to_string();
    match slate_proto::read_frame(&mut stream).map_err(e)? {
        AgentMsg::Hello {
            protocol,
            token: got,
            ..
        } => {
            if protocol != PROTOCOL_VERSION || got != token {
                return Err("hello with the wrong protocol or token".into());
            }
        }
        other => return Err(format!("expected hello, got {other:?}")),
    }
    slate_proto::write_frame(&mut stream, &ServerMsg::Welcome { job }).map_err(e)?;
    let mut output = Vec::new();
    let mut outcome = None;
    loop {
        match slate_proto::read_frame(&mut stream).map_err(e)? {
            AgentMsg::Output { seq, data, .. } => {
                output.extend_from_slice(&data);
                slate_proto::write_frame(&mut stream, &ServerMsg::Ack { seq }).map_err(e)?;
            }
            AgentMsg::StepFinished { outcome: o, .. } => outcome = Some(o),
            AgentMsg::Done { success } => {
                return Ok((
                    String::from_utf8_lossy(&output).into_owned(),
                    outcome,
                    success,
                ))
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn real_agent_dials_back_over_tcp_and_runs_a_job() {
    let agent = tokio::task::spawn_blocking(slate_testkit::agent_bin::static_agent)
        .await
        .unwrap();
    let fx = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp:127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut cfg = fx.config(
        r#"
"$SLATE_AGENT_BINARY" --connect "$SLATE_AGENT_URL" --heartbeat-ms 200 \
  </dev/null >>"$SLATE_WORKER_DIR/agent.log" 2>&1 &
echo $! > "$STATE/$SLATE_WORKER.pid"
echo "agent started"
"#,
        DESTROY,
    );
    cfg.server_agent_url = url.clone();
    // This test's server is a plain socket: the agent is told tcp: and no pin.
    cfg.server_agent_fingerprint = None;
    let p = fx.provider(cfg);
    let spec = fx.spec(agent);
    let name = spec.job_id.resource_name();
    let job = JobSpec {
        collect: Vec::new(),
        job_id: spec.job_id.0,
        workdir: fx.path("source").to_string_lossy().into_owned(),
        env: [("GREETING".to_string(), "hello over tcp".to_string())].into(),
        steps: vec![StepSpec {
            name: "greet".into(),
            run: "echo \"$GREETING from $(pwd)\"; echo \"token:${SLATE_AGENT_TOKEN:-unset}\""
                .into(),
            timeout_ms: Some(10_000),
            allow_failure: false,
            env: BTreeMap::new(),
        }],
    };
    let token = spec.agent_token.expose().to_string();
    let server = std::thread::spawn(move || serve_one_job(listener, token, job));

    let worker = p.provision(spec).await.unwrap();
    let agent_pid = fx.pid(&format!("{name}.pid"));
    let result = tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    let agent_log =
        fs::read_to_string(fx.path("workers").join(&name).join("agent.log")).unwrap_or_default();
    let (output, outcome, success) =
        result.unwrap_or_else(|e| panic!("{e}; agent log: {agent_log}"));
    assert_eq!(
        output,
        format!(
            "hello over tcp from {}\ntoken:unset\n",
            fx.path("source").display()
        )
    );
    assert_eq!(outcome, Some(StepOutcome::Ok));
    assert!(success);
    // Its job done and acknowledged, the agent exits on its own.
    assert!(
        wait_dead(agent_pid, Duration::from_secs(10)).await,
        "agent still runs; log: {agent_log}"
    );

    p.destroy(&name).await.unwrap();
    assert_eq!(*worker.exited.borrow(), Some(137));
    assert!(!alive(agent_pid));
    assert_eq!(
        processes_with_arg(&url),
        Vec::<i32>::new(),
        "agent processes left"
    );
    assert!(p.list().await.unwrap().is_empty());
}
