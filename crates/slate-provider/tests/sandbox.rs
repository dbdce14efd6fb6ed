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
