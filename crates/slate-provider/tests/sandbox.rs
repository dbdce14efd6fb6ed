//! End-to-end tests of the sandbox provider: real overlayfs, real runc, a shell script as agent.

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::{Provider, SandboxProvider, Worker, WorkerSpec};
use slate_testkit::image::{busybox_rootfs, manifest};
use slate_testkit::leaks::slate_leaks_of;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Job ids unique across this process and others running at the same time (cgroup
/// paths `/slate/slate-<id>` are host-wide).
fn unique_job_id() -> JobId {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    JobId(std::process::id() as i64 * 1000 + NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A temp dir with a busybox image and a worker root; on drop, destroys whatever the
/// test left behind (even when it panicked) before the temp dir goes.
struct Fixture {
    dir: TempDir,
    provider: SandboxProvider,
    names: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        busybox_rootfs(&dir.path().join("image")).unwrap();
        let provider = SandboxProvider::new(dir.path().join("workers"));
        Self {
            dir,
            provider,
            names: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("workers")
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    /// A spec whose agent is `script` and whose socket dir is a fresh `sock-<id>` dir.
    fn spec(&mut self, script: &str) -> WorkerSpec {
        let job_id = unique_job_id();
        self.names.push(job_id.resource_name());
        let agent = self.dir.path().join(format!("agent-{}.sh", job_id.0));
        fs::write(&agent, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
        let sock = self.sock_dir(job_id);
        fs::create_dir_all(&sock).unwrap();
        WorkerSpec {
            job_id,
            pool: "test".into(),
            image: self.image(),
            source: None,
            agent_binary: agent,
            agent_socket: sock.join("agent.sock"),
            agent_token: Secret::new(format!("token-{}", job_id.0)),
            limits: Limits {
                memory_bytes: None,
                pids: None,
                cpus: None,
                timeout: Duration::from_secs(60),
                disk_bytes: None,
            },
            network: Network::None,
            network_allow: Vec::new(),
            runtime: "runc".into(),
            mounts: Vec::new(),
        }
    }

    fn sock_dir(&self, job_id: JobId) -> PathBuf {
        self.dir.path().join(format!("sock-{}", job_id.0))
    }

    fn leaks(&self) -> Vec<String> {
        slate_leaks_of(&self.root(), &self.names)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.root();
        let names = self.names.clone();
        // A fresh runtime on its own thread: Drop may run inside the test's runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let p = SandboxProvider::new(root);
                let mut all = p.list().await.unwrap_or_default();
                all.extend(names);
                for name in all {
                    let _ = p.destroy(&name).await;
                }
            });
        })
        .join()
        .ok();
    }
}

async fn exit_code(worker: &mut Worker) -> i32 {
    let code = tokio::time::timeout(
        Duration::from_secs(20),
        worker.exited.wait_for(|c| c.is_some()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "worker did not exit; console: {}",
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        )
    })
    .unwrap();
    code.unwrap()
}

async fn wait_for_file(path: &Path, worker: &Worker) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared; exited {:?}; console: {}",
            path.display(),
            *worker.exited.borrow(),
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn agent_runs_as_pid_1_with_token_hostname_and_exit_code() {
    let mut fx = Fixture::new();
    let spec = fx.spec(
        r#"echo $$ > /run/slate/pid
hostname > /run/slate/hostname
echo "$SLATE_AGENT_TOKEN" > /run/slate/token
echo "$0 $*" > /run/slate/args
env | sort | cut -d= -f1 | tr '\n' ' ' > /run/slate/env; echo >> /run/slate/env
exit 7"#,
    );
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let token = spec.agent_token.expose().to_string();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(worker.name, name);
    assert_eq!(exit_code(&mut worker).await, 7);

    assert_eq!(fs::read_to_string(sock.join("pid")).unwrap().trim(), "1");
    assert_eq!(
        fs::read_to_string(sock.join("hostname")).unwrap().trim(),
        name
    );
    assert_eq!(
        fs::read_to_string(sock.join("token")).unwrap().trim(),
        token
    );
    assert_eq!(
        fs::read_to_string(sock.join("args")).unwrap().trim(),
        "/.slate/slate-agent --connect unix:/run/slate/agent.sock"
    );
    // Only the token and PATH come from slate; runc adds HOME, the shell PWD and SHLVL.
    let env = fs::read_to_string(sock.join("env")).unwrap();
    assert_eq!(env.trim(), "HOME PATH PWD SHLVL SLATE_AGENT_TOKEN");

    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn writes_never_reach_the_image_or_source_nor_the_next_job() {
    let mut fx = Fixture::new();
    let source = fx.dir.path().join("source");
    fs::create_dir_all(source.join("src")).unwrap();
    fs::write(source.join("README"), "hello\n").unwrap();
    fs::write(source.join("src/main.c"), "int main;\n").unwrap();
    let image_before = manifest(&fx.image());
    let source_before = manifest(&source);

    let mut spec = fx.spec(
        r#"echo evil > /etc/evil
rm /bin/ls
echo more >> /workspace/README
rm /workspace/src/main.c
echo out > /workspace/out
cat /workspace/README > /run/slate/readme
exit 0"#,
    );
    spec.source = Some(source.clone());
    let sock = fx.sock_dir(spec.job_id);
    let first = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(
        exit_code(&mut worker).await,
        0,
        "{}",
        fs::read_to_string(&worker.console_log).unwrap()
    );
    // The job saw the source and could write to it.
    assert_eq!(
        fs::read_to_string(sock.join("readme")).unwrap(),
        "hello\nmore\n"
    );

    assert_eq!(manifest(&fx.image()), image_before, "image changed");
    assert_eq!(manifest(&source), source_before, "source changed");
    assert_eq!(
        fs::read_to_string(source.join("README")).unwrap(),
        "hello\n"
    );

    let mut spec = fx.spec(
        r#"for f in /etc/evil /workspace/out; do [ -e $f ] && echo "seen $f"; done > /run/slate/seen
[ -e /bin/ls ] || echo "ls missing" >> /run/slate/seen
echo done >> /run/slate/seen"#,
    );
    spec.source = Some(source.clone());
    let sock = fx.sock_dir(spec.job_id);
    let second = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 0);
    assert_eq!(fs::read_to_string(sock.join("seen")).unwrap(), "done\n");

    fx.provider.destroy(&first).await.unwrap();
    fx.provider.destroy(&second).await.unwrap();
    assert_eq!(manifest(&fx.image()), image_before, "image changed");
    assert_eq!(manifest(&source), source_before, "source changed");
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn network_is_loopback_only() {
    let mut fx = Fixture::new();
    let spec = fx.spec("cat /proc/net/dev > /run/slate/netdev");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 0);
    let netdev = fs::read_to_string(sock.join("netdev")).unwrap();
    let interfaces: Vec<&str> = netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(interfaces, ["lo"], "{netdev}");
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn limits_are_applied_and_destroy_kills_a_running_worker() {
    let mut fx = Fixture::new();
    let mut spec = fx.spec("touch /run/slate/x; echo ready > /run/slate/ready\nexec sleep 1000");
    spec.limits.memory_bytes = Some(256 << 20);
    spec.limits.pids = Some(64);
    spec.limits.cpus = Some(0.5);
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    wait_for_file(&sock.join("ready"), &worker).await;

    let scope = slate_provider::sandbox::cgroup_scope(&fx.root());
    let read = |controller: &str, file: &str| {
        fs::read_to_string(format!("/sys/fs/cgroup/{controller}/{scope}/{name}/{file}"))
            .unwrap_or_else(|e| panic!("{controller}/{file}: {e}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes"),
        (256u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", "memory.memsw.limit_in_bytes"),
        (256u64 << 20).to_string()
    );
    assert_eq!(read("pids", "pids.max"), "64");
    assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
    assert!(worker.exited.borrow().is_none(), "worker stopped early");

    let started = Instant::now();
    fx.provider.destroy(&name).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "destroy took {:?}",
        started.elapsed()
    );
    // Killed by SIGKILL: the runtime reports 128+9.
    assert_eq!(exit_code(&mut worker).await, 137);
    assert_eq!(fx.leaks(), Vec::<String>::new());
    assert!(!fx.provider.list().await.unwrap().contains(&name));
}

#[tokio::test]
async fn a_disk_quota_gives_enospc_and_destroy_detaches_the_loop_device() {
    let mut fx = Fixture::new();
    let source = fx.dir.path().join("source");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("README"), "hello\n").unwrap();
    // Both writable layers share the one quota: 20 MiB in the rootfs, then the workspace
    // runs out.
    let mut spec = fx.spec(
        r#"dd if=/dev/zero of=/root-file bs=1M count=20 2>/dev/null; echo $? > /run/slate/rootfs
dd if=/dev/zero of=/workspace/big bs=1M count=100 2>/run/slate/dd-err; echo $? > /run/slate/ws
cat /workspace/README > /run/slate/readme
exit 0"#,
    );
    spec.source = Some(source.clone());
    spec.limits.disk_bytes = Some(32 << 20);
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let started = Instant::now();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    let provision = started.elapsed();
    let job = fx.root().canonicalize().unwrap().join(&name);
    assert!(
        slate_testkit::leaks::loop_devices()
            .iter()
            .any(|(_, f)| f.starts_with(&job)),
        "no loop device while the worker runs"
    );
    assert_eq!(exit_code(&mut worker).await, 0);
    assert_eq!(fs::read_to_string(sock.join("rootfs")).unwrap().trim(), "0");
    assert_ne!(fs::read_to_string(sock.join("ws")).unwrap().trim(), "0");
    let err = fs::read_to_string(sock.join("dd-err")).unwrap();
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(fs::read_to_string(sock.join("readme")).unwrap(), "hello\n");
    // The image file never grows beyond the quota.
    let used =
        std::os::unix::fs::MetadataExt::blocks(&fs::metadata(job.join("disk.img")).unwrap()) * 512;
    assert!(used <= 32 << 20, "disk image uses {used} bytes");
    assert_eq!(
        fs::read_dir(&source).unwrap().count(),
        1,
        "the source was written"
    );

    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
    eprintln!("provisioned with a 32 MiB disk in {provision:?}");
}

/// Provisioning time (provision call until the agent runs) without a disk quota and with
/// a 2 GiB one, alternating; prints the medians. Formatting is lazy, so the quota costs a
/// few milliseconds, not a write of the whole disk.
#[tokio::test]
async fn a_disk_quota_costs_little_provisioning_time() {
    let mut fx = Fixture::new();
    let (mut plain, mut quota) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let mut spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
        if i % 2 == 1 {
            spec.limits.disk_bytes = Some(2 << 30);
        }
        let with_quota = spec.limits.disk_bytes.is_some();
        let sock = fx.sock_dir(spec.job_id);
        let name = spec.job_id.resource_name();
        let started = Instant::now();
        let worker = fx.provider.provision(spec).await.unwrap();
        wait_for_file(&sock.join("ready"), &worker).await;
        let took = started.elapsed();
        if with_quota {
            quota.push(took)
        } else {
            plain.push(took)
        }
        fx.provider.destroy(&name).await.unwrap();
    }
    plain.sort();
    quota.sort();
    let (p, q) = (plain[plain.len() / 2], quota[quota.len() / 2]);
    eprintln!("provision to agent running, median of 5: no quota {p:?}, 2 GiB quota {q:?}");
    assert!(
        q < p + Duration::from_secs(1),
        "a 2 GiB quota took {q:?} against {p:?}"
    );
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn background_process_does_not_survive_the_worker() {
    let mut fx = Fixture::new();
    let spec = fx.spec("sleep 1000 &\necho $! > /run/slate/bg\nexit 0");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 0);
    assert!(!fs::read_to_string(sock.join("bg"))
        .unwrap()
        .trim()
        .is_empty());
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn destroy_is_idempotent_and_refuses_bad_names() {
    let mut fx = Fixture::new();
    fx.provider.destroy("slate-999999999").await.unwrap();
    let spec = fx.spec("exit 0");
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 0);
    fx.provider.destroy(&name).await.unwrap();
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
    for bad in ["../slate-1", "slate-1/..", "slate-", "workers", ".runc"] {
        assert!(fx.provider.destroy(bad).await.is_err(), "{bad} accepted");
    }
    // The refused names did not touch the root.
    assert!(fx.root().join(".runc").is_dir());
}

#[tokio::test]
async fn list_shows_a_worker_until_it_is_destroyed() {
    let mut fx = Fixture::new();
    assert_eq!(fx.provider.list().await.unwrap(), Vec::<String>::new());
    let spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(fx.provider.list().await.unwrap(), vec![name.clone()]);
    wait_for_file(&sock.join("ready"), &worker).await;
    assert_eq!(fx.provider.list().await.unwrap(), vec![name.clone()]);
    // The leak check sees a live worker: its emptiness after destroy means something.
    let live = fx.leaks().join("\n");
    for kind in [
        "mount at",
        "cgroup /sys/fs/cgroup/memory/slate/",
        "runc container",
        "process",
        "entry",
    ] {
        assert!(live.contains(kind), "leak check missed {kind}: {live}");
    }
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.provider.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn failing_runtime_is_reported_and_leaves_nothing() {
    let mut fx = Fixture::new();
    let mut spec = fx.spec("exit 0");
    spec.runtime = "/bin/false".into();
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 1);
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());

    let mut spec = fx.spec("exit 0");
    spec.runtime = fx.dir.path().join("no-such-runtime").display().to_string();
    let err = fx.provider.provision(spec).await.unwrap_err();
    assert!(err.to_string().contains("no-such-runtime"), "{err}");
    assert_eq!(fx.provider.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn runtime_error_reaches_console_log_and_exit() {
    let mut fx = Fixture::new();
    let mut spec = fx.spec("exit 0");
    // An agent path that is not executable: runc itself fails to start the container.
    fs::set_permissions(&spec.agent_binary, fs::Permissions::from_mode(0o644)).unwrap();
    spec.limits.pids = Some(32);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    let code = exit_code(&mut worker).await;
    assert_ne!(code, 0);
    let console = fs::read_to_string(&worker.console_log).unwrap();
    assert!(console.contains("permission denied"), "{console}");
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn failed_provision_rolls_back() {
    let mut fx = Fixture::new();
    let mut spec = fx.spec("exit 0");
    spec.image = fx.dir.path().join("missing-image");
    assert!(fx.provider.provision(spec).await.is_err());
    let mut spec = fx.spec("exit 0");
    spec.agent_binary = fx.dir.path().join("missing-agent");
    assert!(fx.provider.provision(spec).await.is_err());
    assert_eq!(fx.provider.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn provisioning_an_existing_worker_fails_without_harming_it() {
    let mut fx = Fixture::new();
    let spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let worker = fx.provider.provision(spec.clone()).await.unwrap();
    assert!(fx.provider.provision(spec).await.is_err());
    wait_for_file(&sock.join("ready"), &worker).await;
    assert!(worker.exited.borrow().is_none());
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn restarted_provider_lists_and_destroys_workers_of_the_previous_one() {
    let mut fx = Fixture::new();
    let spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    wait_for_file(&sock.join("ready"), &worker).await;

    let restarted = SandboxProvider::new(fx.root());
    assert_eq!(restarted.list().await.unwrap(), vec![name.clone()]);
    restarted.destroy(&name).await.unwrap();
    assert_eq!(restarted.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
    // The first provider's runtime process saw its container die.
    assert_eq!(exit_code(&mut worker).await, 137);
}

#[tokio::test]
async fn root_behind_a_symlink_is_cleaned_like_any_other() {
    let mut fx = Fixture::new();
    let link = fx.dir.path().join("workers-link");
    fs::create_dir_all(fx.root()).unwrap();
    std::os::unix::fs::symlink(fx.root(), &link).unwrap();
    let provider = SandboxProvider::new(link.clone());
    let spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let worker = provider.provision(spec).await.unwrap();
    wait_for_file(&sock.join("ready"), &worker).await;
    assert_eq!(provider.list().await.unwrap(), vec![name.clone()]);
    provider.destroy(&name).await.unwrap();
    assert_eq!(provider.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

// ---- network = "egress" ----

/// Runs `ip <args>` on the host; panics with its stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP server that answers every connection with `token` and counts them; stops on drop.
struct Listener {
    addr: std::net::SocketAddr,
    token: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn bind(addr: &str, token: &str) -> Self {
        Self::serve(std::net::TcpListener::bind(addr).unwrap(), token)
    }

    /// Bound inside the network namespace at `netns` (a socket stays in the namespace
    /// it was made in, whatever thread serves it).
    fn bind_in(netns: &Path, addr: &str, token: &str) -> Self {
        let (netns, addr) = (netns.to_path_buf(), addr.to_string());
        let l = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f = fs::File::open(&netns).unwrap();
            // SAFETY: setns on a descriptor we own; only this short-lived thread moves.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            std::net::TcpListener::bind(&addr).unwrap()
        })
        .join()
        .unwrap();
        Self::serve(l, token)
    }

    fn serve(l: std::net::TcpListener, token: &str) -> Self {
        use std::io::Write;
        use std::sync::atomic::AtomicBool;
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (a, s, t) = (accepted.clone(), stop.clone(), format!("{token}\n"));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(t.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            token: token.to_string(),
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// "The internet" for test `k`: netns `slate-test-inet-<pid>-<k>` behind a veth from the
/// host, 198.51.100.4k+1/30 on the host end and .4k+2 inside (TEST-NET-2: public as far
/// as slate's filter is concerned), plus 10.214.k.2 inside, routed from the host: a
/// private address reached by forwarding rather than on the host itself. Removed on drop.
struct Internet {
    netns: String,
    veth: String,
    public: String,
    private: String,
}

impl Internet {
    fn new(k: u8) -> Self {
        let pid = std::process::id();
        let inet = Self {
            netns: format!("slate-test-inet-{pid}-{k}"),
            veth: format!("sti{pid}{k}"),
            public: format!("198.51.100.{}", 4 * k + 2),
            private: format!("10.214.{k}.2"),
        };
        let host = format!("198.51.100.{}/30", 4 * k + 1);
        let public = format!("{}/30", inet.public);
        let private = format!("{}/32", inet.private);
        ip(&["netns", "add", &inet.netns]);
        ip(&[
            "link",
            "add",
            &inet.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &inet.netns,
        ]);
        ip(&["addr", "add", &host, "dev", &inet.veth]);
        ip(&["link", "set", &inet.veth, "up"]);
        ip(&["route", "add", &private, "dev", &inet.veth]);
        let n = inet.netns.as_str();
        ip(&["-n", n, "addr", "add", &public, "dev", "eth0"]);
        ip(&["-n", n, "addr", "add", &private, "dev", "eth0"]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        // Replies to the host's end (the masquerade source) and to nothing else.
        let via = format!("198.51.100.{}", 4 * k + 1);
        ip(&["-n", n, "route", "add", "default", "via", &via]);
        inet
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// An interface on the host holding `10.213.<k>.1/32`: a private address of the host's
/// own. A veth pair with both ends on the host (the CI kernel may lack the dummy
/// module). Removed on drop.
struct Dummy {
    name: String,
    addr: String,
}

impl Dummy {
    fn new(k: u8) -> Self {
        let d = Self {
            name: format!("std{}{k}", std::process::id()),
            addr: format!("10.213.{k}.1"),
        };
        let peer = format!("stp{}{k}", std::process::id());
        ip(&[
            "link", "add", &d.name, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "up"]);
        ip(&["addr", "add", &format!("{}/32", d.addr), "dev", &d.name]);
        ip(&["link", "set", &d.name, "up"]);
        d
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// The host's primary address: the source of its default route.
fn primary_address() -> String {
    let out = ip(&["-j", "route", "get", "203.0.113.1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["prefsrc"]
        .as_str()
        .unwrap_or_else(|| panic!("no primary address in {out}"))
        .to_string()
}

/// The egress job address of worker `name` (the host end of its veth is .1, the job .2).
fn job_address(name: &str) -> String {
    let veth = format!("slv{}", name.trim_start_matches("slate-"));
    let out = ip(&["-j", "-4", "addr", "show", "dev", &veth]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let host: std::net::Ipv4Addr = v[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    std::net::Ipv4Addr::from(u32::from(host) + 1).to_string()
}

/// A job script that connects to each `(label, ip, port)` at once (2 s connect timeout)
/// and writes what it received and nc's exit code to `/run/slate/p-<label>`.
fn probe_script(probes: &[(&str, String, u16)]) -> String {
    let mut s = String::from(
        "probe() { timeout 5 nc -w 2 $2 $3 </dev/null > /run/slate/p-$1 2>&1; echo \"rc=$?\" >> /run/slate/p-$1; }\n",
    );
    for (label, ip, port) in probes {
        s.push_str(&format!("probe {label} {ip} {port} &\n"));
    }
    s.push_str("wait\necho done > /run/slate/done\n");
    s
}

/// What the probe `label` received (and nc's exit code).
fn probe_result(sock: &Path, label: &str) -> String {
    fs::read_to_string(sock.join(format!("p-{label}"))).unwrap_or_default()
}

#[tokio::test]
async fn egress_reaches_the_internet_and_allowed_endpoints_only() {
    let mut fx = Fixture::new();
    let inet = Internet::new(1);
    let dummy = Dummy::new(1);
    let primary = primary_address();
    let public = Listener::bind_in(&inet.path(), &format!("{}:8080", inet.public), "public-ok");
    let private_inet = Listener::bind_in(
        &inet.path(),
        &format!("{}:8081", inet.private),
        "private-inet",
    );
    let allowed_inet = Listener::bind_in(
        &inet.path(),
        &format!("{}:8082", inet.private),
        "allowed-inet",
    );
    // Every address of the host, loopback included.
    let host_any = Listener::bind("0.0.0.0:0", "host-any");
    let allowed_host = Listener::bind(&format!("{}:0", dummy.addr), "allowed-host");
    let host_v6 = Listener::bind("[::]:0", "host-v6");

    // Job B: a listener of its own, which job A must not reach.
    let mut b = fx.spec(
        "printf '#!/bin/sh\\necho job-b\\n' > /tmp/srv; chmod +x /tmp/srv\n\
         nc -ll -p 9000 -e /tmp/srv &\nsleep 0.3\n\
         nc -w 2 127.0.0.1 9000 </dev/null > /run/slate/self\necho ready > /run/slate/ready\nexec sleep 1000",
    );
    b.network = Network::Egress;
    let (b_sock, b_name) = (fx.sock_dir(b.job_id), b.job_id.resource_name());
    let b_worker = fx.provider.provision(b).await.unwrap();
    wait_for_file(&b_sock.join("ready"), &b_worker).await;
    assert_eq!(
        fs::read_to_string(b_sock.join("self")).unwrap(),
        "job-b\n",
        "job B's own listener"
    );
    let b_addr = job_address(&b_name);

    let port = host_any.addr.port();
    let probes = [
        ("public", inet.public.clone(), 8080),
        ("allowed-inet", inet.private.clone(), 8082),
        ("allowed-host", dummy.addr.clone(), allowed_host.addr.port()),
        ("private-inet", inet.private.clone(), 8081),
        ("loopback", "127.0.0.1".to_string(), port),
        ("primary", primary.clone(), port),
        ("dummy", dummy.addr.clone(), port),
        (
            "gateway",
            {
                let mut g: Vec<&str> = b_addr.split('.').collect();
                let last = (g[3].parse::<u8>().unwrap() - 1).to_string();
                g[3] = &last;
                // Job A's own gateway is another /30, but the host answers on every address.
                g.join(".")
            },
            port,
        ),
        ("job-b", b_addr.clone(), 9000),
        // IPv6 to the host end of the job's own veth (link-local, the only IPv6 a job has).
        ("host-v6", "$LL".to_string(), host_v6.addr.port()),
    ];
    // The host end's link-local address is known only once the veth exists: the test
    // hands it over through the socket dir, the job waits for it and for its own DAD.
    let mut a = fx.spec(&format!(
        "while [ ! -s /run/slate/ll ]; do sleep 0.05; done; LL=$(cat /run/slate/ll)\n\
         for i in $(seq 50); do ip -6 addr show dev eth0 | grep -q tentative || break; sleep 0.1; done\n{}",
        probe_script(&probes)
    ));
    a.network = Network::Egress;
    a.network_allow = vec![
        format!("{}:8082", inet.private).parse().unwrap(),
        allowed_host.addr,
    ];
    let a_sock = fx.sock_dir(a.job_id);
    let a_name = a.job_id.resource_name();
    let mut a_worker = fx.provider.provision(a).await.unwrap();
    let a_veth = format!("slv{}", a_name.trim_start_matches("slate-"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ll = loop {
        let out = ip(&["-j", "-6", "addr", "show", "dev", &a_veth]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ready = v[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["scope"] == "link" && a.get("tentative").is_none());
        if let Some(a) = ready {
            break a["local"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no link-local address on {a_veth}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fs::write(a_sock.join("ll"), format!("{ll}%eth0\n")).unwrap();
    assert_eq!(exit_code(&mut a_worker).await, 0);
    let seen = |l: &str| probe_result(&a_sock, l);
    eprintln!(
        "{}",
        probes
            .iter()
            .map(|(l, ip, p)| format!("{l} {ip}:{p}: {:?}", seen(l)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        seen("public").starts_with("public-ok\n"),
        "{}",
        seen("public")
    );
    assert!(
        seen("allowed-inet").starts_with("allowed-inet\n"),
        "{}",
        seen("allowed-inet")
    );
    assert!(
        seen("allowed-host").starts_with("allowed-host\n"),
        "{}",
        seen("allowed-host")
    );
    for label in [
        "host-v6",
        "private-inet",
        "loopback",
        "primary",
        "dummy",
        "gateway",
        "job-b",
    ] {
        let got = seen(label);
        assert!(
            !got.contains("-ok")
                && !got.contains("host-any")
                && !got.contains("job-b\n")
                && !got.contains("private-inet\n"),
            "{label} reached: {got}"
        );
        assert!(!got.contains("rc=0"), "{label}: nc succeeded: {got}");
    }
    assert_eq!(host_any.accepted(), 0, "a job reached a host service");
    assert_eq!(host_v6.accepted(), 0, "a job reached the host over IPv6");
    assert_eq!(
        private_inet.accepted(),
        0,
        "a job reached a private address"
    );
    assert_eq!(public.accepted(), 1);
    assert_eq!(allowed_inet.accepted(), 1);
    assert_eq!(allowed_host.accepted(), 1);
    assert_eq!(public.token, "public-ok");

    fx.provider.destroy(&a_name).await.unwrap();
    fx.provider.destroy(&b_name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn network_none_reaches_nothing_on_the_host_even_allowed_endpoints() {
    let mut fx = Fixture::new();
    let dummy = Dummy::new(2);
    let primary = primary_address();
    let host_any = Listener::bind("0.0.0.0:0", "host-any");
    let allowed_host = Listener::bind(&format!("{}:0", dummy.addr), "allowed-host");
    let port = host_any.addr.port();
    let probes = [
        ("loopback", "127.0.0.1".to_string(), port),
        ("primary", primary, port),
        ("dummy", dummy.addr.clone(), port),
        ("allowed-host", dummy.addr.clone(), allowed_host.addr.port()),
    ];
    let mut spec = fx.spec(&probe_script(&probes));
    // `network_allow` means nothing without egress (the config refuses it there).
    spec.network_allow = vec![allowed_host.addr];
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(exit_code(&mut worker).await, 0);
    for (label, ip, p) in &probes {
        let got = probe_result(&sock, label);
        eprintln!("{label} {ip}:{p}: {got:?}");
        assert!(
            got.contains("rc=") && !got.contains("rc=0"),
            "{label}: {got}"
        );
        assert!(
            !got.contains("host-any") && !got.contains("allowed-host"),
            "{label} reached: {got}"
        );
    }
    assert_eq!(host_any.accepted() + allowed_host.accepted(), 0);
    fx.provider.destroy(&name).await.unwrap();
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn egress_leftovers_are_listed_and_destroyed_after_a_crash() {
    let mut fx = Fixture::new();
    // A running egress worker whose provider dies without destroying it.
    let mut spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
    spec.network = Network::Egress;
    let sock = fx.sock_dir(spec.job_id);
    let name = spec.job_id.resource_name();
    let crashed = SandboxProvider::new(fx.root());
    let mut worker = crashed.provision(spec).await.unwrap();
    wait_for_file(&sock.join("ready"), &worker).await;
    drop(crashed);
    // The leak check sees every part of it: its emptiness below means something.
    let live = fx.leaks().join("\n");
    for kind in [
        "/netns",
        "veth slv",
        "nft chain inet slate in_",
        "nft chain inet slate fwd_",
        "nft element slv",
    ] {
        assert!(live.contains(kind), "leak check missed {kind}: {live}");
    }

    // Half-made: the network of a job whose provision died right after making it.
    let scope = slate_provider::sandbox::cgroup_scope(&fx.root());
    let half = unique_job_id();
    fx.names.push(half.resource_name());
    let half_dir = fx.root().canonicalize().unwrap().join(half.resource_name());
    fs::create_dir(&half_dir).unwrap();
    slate_provider::sandbox::net::setup(&slate_provider::sandbox::net::JobNet {
        id: half.0,
        scope: &scope,
        job: &half_dir,
        allow: &[],
    })
    .unwrap();

    // Only chains left: the namespace (and with it the veth) gone, the job dir too.
    let chains_only = unique_job_id();
    fx.names.push(chains_only.resource_name());
    let elsewhere = fx.dir.path().join(chains_only.resource_name());
    fs::create_dir(&elsewhere).unwrap();
    slate_provider::sandbox::net::setup(&slate_provider::sandbox::net::JobNet {
        id: chains_only.0,
        scope: &scope,
        job: &elsewhere,
        allow: &[],
    })
    .unwrap();
    nix::mount::umount2(&elsewhere.join("netns"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let veth = format!("/sys/class/net/slv{}", chains_only.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&veth).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !Path::new(&veth).exists(),
        "the veth outlived its namespace"
    );

    let restarted = SandboxProvider::new(fx.root());
    let mut listed = restarted.list().await.unwrap();
    listed.sort();
    let mut want = vec![
        name.clone(),
        half.resource_name(),
        chains_only.resource_name(),
    ];
    want.sort();
    assert_eq!(listed, want);
    for n in &want {
        restarted.destroy(n).await.unwrap();
        // Idempotent.
        restarted.destroy(n).await.unwrap();
    }
    assert_eq!(restarted.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(fx.leaks(), Vec::<String>::new());
    assert_eq!(exit_code(&mut worker).await, 137);
}

/// Setup + teardown of a worker with `network = "egress"` against `none`, alternating in
/// one run: provision until the agent runs, then destroy. Prints the medians.
#[tokio::test]
async fn egress_costs_little_setup_and_teardown_time() {
    let mut fx = Fixture::new();
    const CYCLES: usize = 8;
    let (mut none, mut egress) = (Vec::new(), Vec::new());
    for i in 0..2 * CYCLES {
        let mut spec = fx.spec("echo ready > /run/slate/ready\nexec sleep 1000");
        if i % 2 == 1 {
            spec.network = Network::Egress;
        }
        let is_egress = spec.network == Network::Egress;
        let sock = fx.sock_dir(spec.job_id);
        let name = spec.job_id.resource_name();
        let started = Instant::now();
        let worker = fx.provider.provision(spec).await.unwrap();
        wait_for_file(&sock.join("ready"), &worker).await;
        let up = started.elapsed();
        let t = Instant::now();
        fx.provider.destroy(&name).await.unwrap();
        let down = t.elapsed();
        if is_egress {
            egress.push((up + down, up, down))
        } else {
            none.push((up + down, up, down))
        }
    }
    let median = |v: &mut Vec<(Duration, Duration, Duration)>| {
        let m = |mut x: Vec<Duration>| {
            x.sort();
            x[x.len() / 2]
        };
        (
            m(v.iter().map(|t| t.0).collect()),
            m(v.iter().map(|t| t.1).collect()),
            m(v.iter().map(|t| t.2).collect()),
        )
    };
    // The network alone: namespace, veth, address, filter, and their removal.
    let scope = slate_provider::sandbox::cgroup_scope(&fx.root());
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..CYCLES {
        use slate_provider::sandbox::net;
        let id = unique_job_id();
        fx.names.push(id.resource_name());
        let dir = fx.dir.path().join(id.resource_name());
        fs::create_dir(&dir).unwrap();
        let t = Instant::now();
        let ns = net::setup(&net::JobNet {
            id: id.0,
            scope: &scope,
            job: &dir,
            allow: &[],
        })
        .unwrap();
        up.push(t.elapsed());
        let t = Instant::now();
        net::teardown(&scope, id.0, &dir).unwrap();
        nix::mount::umount2(&ns, nix::mount::MntFlags::empty()).unwrap();
        down.push(t.elapsed());
    }
    up.sort();
    down.sort();
    eprintln!(
        "network alone, median of {CYCLES}: setup {:?}, teardown {:?}",
        up[CYCLES / 2],
        down[CYCLES / 2]
    );
    let (n, e) = (median(&mut none), median(&mut egress));
    eprintln!(
        "median of {CYCLES}: none {:?} (provision {:?} + destroy {:?}), egress {:?} (provision {:?} + destroy {:?}), egress overhead {:?}",
        n.0, n.1, n.2, e.0, e.1, e.2, e.0.saturating_sub(n.0)
    );
    assert!(
        e.0 < n.0 + Duration::from_secs(1),
        "egress took {:?} against {:?}",
        e.0,
        n.0
    );
    assert_eq!(fx.leaks(), Vec::<String>::new());
}

#[tokio::test]
async fn an_egress_provision_that_fails_rolls_back_and_spares_a_foreign_veth() {
    let mut fx = Fixture::new();
    let mut spec = fx.spec("exit 0");
    spec.network = Network::Egress;
    let name = spec.job_id.resource_name();
    // Someone else's interface where this job's veth would go.
    let veth = format!("slv{}", spec.job_id.0);
    ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("slf{}", spec.job_id.0),
    ]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.0])
                .output();
        }
    }
    let foreign = Del(veth.clone());
    let err = fx.provider.provision(spec).await.unwrap_err().to_string();
    assert!(err.contains("is not this server's"), "{err}");
    assert!(
        Path::new("/sys/class/net").join(&veth).exists(),
        "the foreign veth was removed"
    );
    assert_eq!(fx.provider.list().await.unwrap(), Vec::<String>::new());
    drop(foreign);
    assert_eq!(fx.leaks(), Vec::<String>::new(), "{name}");
}

/// Jobs provisioned at once whose ids share a slot (`id mod 16384`) get distinct /30s, and
/// each reaches the internet through its own.
#[tokio::test]
async fn concurrent_egress_jobs_with_colliding_slots_get_distinct_addresses() {
    let mut fx = Fixture::new();
    let inet = Internet::new(3);
    let public = Listener::bind_in(&inet.path(), &format!("{}:8080", inet.public), "public-ok");
    let first = unique_job_id().0;
    let mut specs = Vec::new();
    for k in 0..3 {
        let mut spec = fx.spec(&probe_script(&[("public", inet.public.clone(), 8080)]));
        spec.job_id = JobId(first + 16384 * k);
        fx.names.push(spec.job_id.resource_name());
        spec.network = Network::Egress;
        specs.push(spec);
    }
    let socks: Vec<PathBuf> = specs
        .iter()
        .map(|s| s.agent_socket.parent().unwrap().to_path_buf())
        .collect();
    let names: Vec<String> = specs.iter().map(|s| s.job_id.resource_name()).collect();
    let p = &fx.provider;
    let workers = futures::future::join_all(specs.into_iter().map(|s| p.provision(s))).await;
    let mut addrs = Vec::new();
    for (w, (sock, name)) in workers.into_iter().zip(socks.iter().zip(&names)) {
        let mut w = w.unwrap();
        addrs.push(job_address(name));
        assert_eq!(exit_code(&mut w).await, 0);
        let got = probe_result(sock, "public");
        assert!(got.starts_with("public-ok\n"), "{name}: {got}");
    }
    let distinct: std::collections::BTreeSet<&String> = addrs.iter().collect();
    assert_eq!(distinct.len(), 3, "{addrs:?}");
    assert_eq!(public.accepted(), 3);
    for name in &names {
        fx.provider.destroy(name).await.unwrap();
    }
    assert_eq!(fx.leaks(), Vec::<String>::new());
}
