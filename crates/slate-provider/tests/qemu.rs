//! End-to-end tests of the qemu provider: real qemu (TCG here), real qcow2 overlays, the
//! static agent in the guest speaking to a fake server over virtio-serial.

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::qemu::{Accel, WarmTemplate};
use slate_provider::{
    Provider, ProviderError, QemuConfig, QemuProvider, Worker, WorkerMount, WorkerSpec,
};
use slate_testkit::vm_image::{broken_vm_image, sha256_file, vm_image, MARKER};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::UnixListener;

/// Generous for TCG on 2 shared cores (a boot to the agent takes ~6 s alone).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn unique_job_id() -> JobId {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    JobId(std::process::id() as i64 * 1000 + NEXT.fetch_add(1, Ordering::Relaxed))
}

fn config(boot_timeout: Duration) -> QemuConfig {
    QemuConfig {
        memory_mb: 256,
        cpus: 1,
        boot_timeout,
        qemu_binary: "qemu-system-x86_64".into(),
        accel: Accel::Auto,
    }
}

/// A temp dir with an image, a worker root and sockets; on drop (even after a panic)
/// destroys every worker a fresh provider finds, so no qemu outlives the test.
struct Fixture {
    dir: TempDir,
    provider: Arc<QemuProvider>,
}

impl Fixture {
    fn new(broken: bool, boot_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if broken {
            broken_vm_image(&dir.path().join("image")).unwrap();
        } else {
            vm_image(&dir.path().join("image")).unwrap();
        }
        let provider = Arc::new(QemuProvider::new(
            dir.path().join("vm-workers"),
            config(boot_timeout),
        ));
        Self { dir, provider }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("vm-workers")
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    fn spec(&self, image: &Path, source: Option<PathBuf>) -> WorkerSpec {
        let job_id = unique_job_id();
        WorkerSpec {
            job_id,
            pool: "vm".into(),
            image: image.to_path_buf(),
            source,
            agent_binary: PathBuf::from("/nonexistent/not-used-by-vms"),
            agent_socket: self.dir.path().join(format!("a-{}.sock", job_id.0)),
            agent_token: Secret::new(format!("tok-{}-{}", job_id.0, std::process::id())),
            limits: Limits {
                memory_bytes: Some(256 << 20),
                pids: None,
                cpus: None,
                timeout: Duration::from_secs(600),
                disk_bytes: None,
            },
            network: Network::None,
            network_allow: Vec::new(),
            runtime: String::new(),
            mounts: Vec::new(),
        }
    }

    /// Nothing of `name` is left: no job dir, no qemu process naming it.
    fn assert_gone(&self, name: &str) {
        let dir = self.root().join(name);
        assert!(!dir.exists(), "{} still exists", dir.display());
        let procs = qemu_processes(name);
        assert!(procs.is_empty(), "qemu still running for {name}: {procs:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.root();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let p = QemuProvider::new(root, QemuConfig::default());
                for name in p.list().await.unwrap_or_default() {
                    let _ = p.destroy(&name).await;
                }
            });
        })
        .join()
        .ok();
    }
}

/// Live processes whose command line has `-name <name>`.
fn qemu_processes(name: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if !zombie && args.windows(2).any(|w| w[0] == "-name" && w[1] == name) {
            out.push((pid, args.join(" ")));
        }
    }
    out
}

// --- a fake server speaking the agent protocol with slate_proto's types ---

use slate_testkit::fake_agent::{serve_one_job, Seen};

/// Provisions `spec` and runs `script` as its one step; panics with the console on failure.
async fn run_job(p: &QemuProvider, spec: WorkerSpec, script: &str) -> (Worker, Seen) {
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let script = script.to_string();
    let server = tokio::spawn(async move { serve_one_job(listener, &script, BOOT_TIMEOUT).await });
    let worker = p.provision(spec).await.unwrap();
    let seen = server.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "{e}; console:\n{}",
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        )
    });
    (worker, seen)
}

async fn exit_code(worker: &mut Worker) -> i32 {
    let code = tokio::time::timeout(
        Duration::from_secs(30),
        worker.exited.wait_for(|c| c.is_some()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "vm did not power off; console:\n{}",
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        )
    })
    .unwrap();
    code.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_boots_and_runs_over_virtio_serial_then_destroy_leaves_nothing() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let source = fx.dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("hello-from-host.txt"), "hi\n").unwrap();
    let spec = fx.spec(&fx.image(), Some(source.clone()));
    let name = spec.job_id.resource_name();
    let token = spec.agent_token.expose().to_string();
    let socket = spec.agent_socket.clone();

    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let server = tokio::spawn(async move {
        serve_one_job(
            listener,
            "uname -r; cat /etc/slate-vm-image; ls /workspace; echo w > /workspace/new && echo wrote; \
             ls /sys/firmware/qemu_fw_cfg 2>/dev/null | wc -l",
            BOOT_TIMEOUT,
        )
        .await
    });
    let started = Instant::now();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert_eq!(worker.name, name);
    assert_eq!(fx.provider.list().await.unwrap(), vec![name.clone()]);
    // The token is handed over by fw_cfg file, never on qemu's command line. (Right after
    // spawn the child may not have exec'd qemu yet: give it a moment.)
    let mut procs = qemu_processes(&name);
    let until = Instant::now() + Duration::from_secs(10);
    while procs.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        procs = qemu_processes(&name);
    }
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert!(!procs[0].1.contains(&token), "token on the process list");

    let seen = server.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "{e}; console:\n{}",
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        )
    });
    println!("provision to done: {} ms", started.elapsed().as_millis());
    assert_eq!(seen.token, token);
    assert!(seen.success, "{}", seen.output);
    let lines: Vec<&str> = seen.output.lines().collect();
    assert!(lines[0].contains("amd64"), "uname -r: {}", seen.output);
    assert!(seen.output.contains(MARKER), "{}", seen.output);
    assert!(
        seen.output.contains("hello-from-host.txt"),
        "{}",
        seen.output
    );
    assert!(
        seen.output.contains("wrote"),
        "workspace not writable: {}",
        seen.output
    );
    assert_eq!(
        lines.last().map(|l| l.trim()),
        Some("0"),
        "fw_cfg still readable: {}",
        seen.output
    );
    assert!(
        !source.join("new").exists(),
        "the guest wrote to the host source tree"
    );

    // The guest powers off when the agent is done.
    assert_eq!(exit_code(&mut worker).await, 0);
    let console = fs::read_to_string(&worker.console_log).unwrap();
    assert!(console.contains("slate-vm: starting agent"), "{console}");

    fx.provider.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
    fx.provider.destroy(&name).await.unwrap();
    assert!(fx.provider.list().await.unwrap().is_empty());
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_disk_unchanged_and_a_second_job_does_not_see_the_first() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let base = fx.image().join("disk.qcow2");
    let before = sha256_file(&base).unwrap();

    let spec = fx.spec(&fx.image(), None);
    let first = spec.job_id.resource_name();
    let (mut w, seen) = run_job(
        &fx.provider,
        spec,
        "echo first > /job-was-here && sync && cat /job-was-here",
    )
    .await;
    assert!(
        seen.success && seen.output.contains("first"),
        "{}",
        seen.output
    );
    exit_code(&mut w).await;
    // The write reached the overlay, not the base.
    let overlay = fx.root().join(&first).join("disk.qcow2");
    assert!(fs::metadata(&overlay).unwrap().len() > 0);
    fx.provider.destroy(&first).await.unwrap();
    assert_eq!(sha256_file(&base).unwrap(), before, "base disk changed");

    let spec = fx.spec(&fx.image(), None);
    let second = spec.job_id.resource_name();
    let (mut w, seen) = run_job(
        &fx.provider,
        spec,
        "if [ -e /job-was-here ]; then echo LEAKED; else echo clean; fi",
    )
    .await;
    assert!(seen.output.contains("clean"), "{}", seen.output);
    exit_code(&mut w).await;
    fx.provider.destroy(&second).await.unwrap();
    assert_eq!(sha256_file(&base).unwrap(), before, "base disk changed");
    fx.assert_gone(&first);
    fx.assert_gone(&second);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_time_does_not_grow_with_base_size() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    // Two images sharing kernel and initrd: a base with 200 MB of data, a 20 GB one.
    let mut images = Vec::new();
    for (label, make) in [("small", "200M-data"), ("big", "20G-sparse")] {
        let dir = fx.dir.path().join(format!("image-{label}"));
        fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinuz", "initrd.img", "cmdline"] {
            fs::copy(fx.image().join(f), dir.join(f)).unwrap();
        }
        let disk = dir.join("disk.qcow2");
        if make == "200M-data" {
            let raw = fx.dir.path().join("data.raw");
            let chunk: Vec<u8> = (0..1 << 20)
                .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            let mut f = fs::File::create(&raw).unwrap();
            for _ in 0..200 {
                std::io::Write::write_all(&mut f, &chunk).unwrap();
            }
            drop(f);
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&disk));
            fs::remove_file(&raw).unwrap();
            assert!(fs::metadata(&disk).unwrap().len() > 190 << 20);
        } else {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg("20G"));
        }
        images.push(dir);
    }
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..5 {
        for i in 0..images.len() {
            // Alternated, so a slow moment of the shared machine hits both.
            let i = if round % 2 == 0 { i } else { 1 - i };
            let image = &images[i];
            let spec = fx.spec(image, None);
            let name = spec.job_id.resource_name();
            let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
            let t = Instant::now();
            let _worker = fx.provider.provision(spec).await.unwrap();
            times[i].push(t.elapsed());
            fx.provider.destroy(&name).await.unwrap();
            fx.assert_gone(&name);
        }
    }
    let (small, big) = (median(times[0].clone()), median(times[1].clone()));
    println!("provision median: 200 MB base {small:?}, 20 GB base {big:?}");
    assert!(
        big < small * 3 + Duration::from_millis(50),
        "provisioning grows with base size: 200 MB {small:?} vs 20 GB {big:?}"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_image_never_connects_and_its_console_tells_why() {
    let boot_timeout = Duration::from_secs(25);
    let fx = Fixture::new(true, boot_timeout);
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let started = Instant::now();
    let worker = fx.provider.provision(spec).await.unwrap();
    let r = serve_one_job(listener, "true", fx.provider.config().boot_timeout).await;
    let err = r.expect_err("a broken image connected an agent");
    assert!(err.contains("boot timeout"), "{err}");
    assert!(started.elapsed() >= boot_timeout);
    let console = fs::read_to_string(&worker.console_log).unwrap();
    assert!(
        console.contains("broken image, the agent is never started"),
        "console tail missing:\n{console}"
    );
    assert!(
        worker.exited.borrow().is_none(),
        "the broken vm should still run"
    );
    fx.provider.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_lists_and_destroys_a_running_vm() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    // Wait for qemu to be up (pidfile written), as after a server crash.
    let pidfile = fx.root().join(&name).join("qemu.pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_to_string(&pidfile)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "no pidfile");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let again = QemuProvider::new(fx.root(), config(BOOT_TIMEOUT));
    assert_eq!(again.list().await.unwrap(), vec![name.clone()]);
    // The job dir alone is not what list() relies on: the process names the worker too.
    again.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || qemu_processes(&name).is_empty());
    // The first provider sees its qemu gone.
    exit_code(&mut worker).await;
    assert!(again.list().await.unwrap().is_empty());
    assert!(fx.provider.list().await.unwrap().is_empty());
    again.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn destroy_is_idempotent_and_refuses_bad_names() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    for bad in ["../x", "slate-1/..", "slate-", "slate-1a", "foo"] {
        assert!(fx.provider.destroy(bad).await.is_err(), "{bad}");
    }
    fx.provider.destroy("slate-98765").await.unwrap();
    // A half-made worker (dir only) is listed and removed.
    fs::create_dir_all(fx.root().join("slate-98766")).unwrap();
    assert_eq!(
        fx.provider.list().await.unwrap(),
        vec!["slate-98766".to_string()]
    );
    fx.provider.destroy("slate-98766").await.unwrap();
    fx.provider.destroy("slate-98766").await.unwrap();
    fx.assert_gone("slate-98766");
    // An outside directory is never touched.
    fs::create_dir_all(fx.root().join("keep-me")).unwrap();
    assert!(fx.provider.list().await.unwrap().is_empty());
    assert!(fx.root().join("keep-me").exists());
}

#[tokio::test]
async fn provisioning_a_bad_image_fails_and_leaves_nothing() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let empty = fx.dir.path().join("empty-image");
    fs::create_dir_all(&empty).unwrap();
    let spec = fx.spec(&empty, None);
    let name = spec.job_id.resource_name();
    let err = fx.provider.provision(spec).await.unwrap_err();
    assert!(err.to_string().contains("disk.qcow2"), "{err}");
    fx.assert_gone(&name);
    // No server listening: qemu cannot connect the agent port and exits.
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    let mut w = fx.provider.provision(spec).await.unwrap();
    assert_ne!(exit_code(&mut w).await, 0);
    assert!(fs::read_to_string(&w.console_log)
        .unwrap()
        .contains("agent"));
    fx.provider.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
}

/// An overlayfs mounted on the host (as slate-cache mounts a distfiles cache) in its own
/// temp dir; unmounted and removed on drop, even after a panic. Declare it before the
/// [`Fixture`] so the VMs are destroyed first.
struct HostOverlay {
    dir: TempDir,
}

impl HostOverlay {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["lower", "upper", "work", "merged"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        fs::write(dir.path().join("lower/shared.tar"), "from the mirror\n").unwrap();
        let p = |d: &str| dir.path().join(d).display().to_string();
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                p("lower"),
                p("upper"),
                p("work")
            ))
            .arg(p("merged")));
        Self { dir }
    }

    fn path(&self, d: &str) -> PathBuf {
        self.dir.path().join(d)
    }
}

impl Drop for HostOverlay {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.path("merged"))
            .status();
    }
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_mounts_reach_the_guest_read_only_and_read_write() {
    let overlay = HostOverlay::new();
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let source = fx.dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("main.c"), "int main;\n").unwrap();
    let mirror = fx.dir.path().join("mirror");
    fs::create_dir_all(mirror.join("pool")).unwrap();
    fs::write(mirror.join("pool/index"), "mirror index v1\n").unwrap();
    let plain = fx.dir.path().join("plain-cache");
    fs::create_dir_all(&plain).unwrap();
    fs::write(plain.join("old"), "old entry\n").unwrap();

    let mut spec = fx.spec(&fx.image(), Some(source.clone()));
    let name = spec.job_id.resource_name();
    spec.mounts = vec![
        WorkerMount {
            host_path: mirror.clone(),
            target: "/srv/mirror".into(),
            read_only: true,
        },
        WorkerMount {
            host_path: plain.clone(),
            target: "/var/cache/plain".into(),
            read_only: false,
        },
        // Inside the workspace: must be mounted on top of the workspace overlay.
        WorkerMount {
            host_path: overlay.path("merged"),
            target: "/workspace/distfiles".into(),
            read_only: false,
        },
    ];
    let script = "cat /srv/mirror/pool/index; \
        if echo x > /srv/mirror/guest 2>/dev/null; then echo RO-WRITTEN; else echo ro-refused; fi; \
        mount -o remount,rw /srv/mirror 2>/dev/null && echo remounted; \
        if echo x > /srv/mirror/after-remount 2>/dev/null; then echo REMOUNT-WRITTEN; else echo remount-refused; fi; \
        cat /var/cache/plain/old; \
        echo fetched > /var/cache/plain/new && mkdir -p /var/cache/plain/sub && echo deep > /var/cache/plain/sub/f && echo plain-written; \
        cat /workspace/distfiles/shared.tar; ls /workspace; \
        echo tarball > /workspace/distfiles/pkg-1.0.tar.gz && echo distfiles-written";
    let (mut worker, seen) = run_job(&fx.provider, spec, script).await;
    assert!(seen.success, "{}", seen.output);
    let out = &seen.output;
    for want in [
        "mirror index v1",
        "ro-refused",
        "remount-refused",
        "old entry",
        "plain-written",
        "from the mirror",
        "main.c",
        "distfiles-written",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert!(!out.contains("WRITTEN"), "read-only cache written:\n{out}");
    assert_eq!(exit_code(&mut worker).await, 0);

    // Read-only: nothing changed on the host.
    assert_eq!(tree(&mirror), ["pool", "pool/index"]);
    // Read-write: the guest's files are in the host directory.
    assert_eq!(fs::read_to_string(plain.join("new")).unwrap(), "fetched\n");
    assert_eq!(fs::read_to_string(plain.join("sub/f")).unwrap(), "deep\n");
    assert_eq!(
        fs::read_to_string(plain.join("old")).unwrap(),
        "old entry\n"
    );
    // Overlay: the new file is in the upper layer only; the lower layer is untouched.
    assert_eq!(
        fs::read_to_string(overlay.path("upper/pkg-1.0.tar.gz")).unwrap(),
        "tarball\n"
    );
    assert_eq!(tree(&overlay.path("upper")), ["pkg-1.0.tar.gz"]);
    assert_eq!(tree(&overlay.path("lower")), ["shared.tar"]);
    // The workspace is still the source's copy-on-write view, the source is untouched.
    assert_eq!(tree(&source), ["main.c"]);

    fx.provider.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
    // Destroying the worker leaves the host's cache directories alone.
    assert_eq!(tree(&plain), ["new", "old", "sub", "sub/f"]);
    assert!(overlay.path("merged/pkg-1.0.tar.gz").is_file());
}

#[tokio::test]
async fn bad_cache_mounts_are_refused_before_qemu_starts() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let cache = fx.dir.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let comma = fx.dir.path().join("a,b");
    fs::create_dir_all(&comma).unwrap();
    let cases = [
        (cache.clone(), "var/cache", "not an absolute path"),
        (cache.clone(), "/var/../etc", ".."),
        (cache.clone(), "/var/my cache", "whitespace"),
        (cache.clone(), "/", "root"),
        (comma, "/var/cache", "comma"),
        (
            fx.dir.path().join("missing"),
            "/var/cache",
            "not a directory",
        ),
    ];
    for (host_path, target, why) in cases {
        let mut spec = fx.spec(&fx.image(), None);
        let name = spec.job_id.resource_name();
        // A good mount first: the bad one must still stop everything.
        spec.mounts = vec![
            WorkerMount {
                host_path: cache.clone(),
                target: "/ok".into(),
                read_only: true,
            },
            WorkerMount {
                host_path,
                target: target.into(),
                read_only: false,
            },
        ];
        // Bound, so a qemu that did start would connect instead of exiting at once.
        let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
        let err = fx.provider.provision(spec).await.unwrap_err();
        assert!(
            matches!(&err, ProviderError::Spec(s) if s.contains(why)),
            "{target}: {err}"
        );
        fx.assert_gone(&name);
        assert!(fx.provider.list().await.unwrap().is_empty());
    }
    assert_eq!(tree(&cache), Vec::<String>::new());
}

// --- warm pool ---

fn warm_template(fx: &Fixture, pool: &str, mounts: &[WorkerMount]) -> WarmTemplate {
    let image = fx.image();
    WarmTemplate {
        pool: pool.into(),
        size: 1,
        image: Arc::new(move || Some(image.clone())),
        limits: fx.spec(&fx.image(), None).limits,
        mounts: mounts
            .iter()
            .map(|m| (m.target.clone(), m.read_only))
            .collect(),
        network: Network::None,
        network_allow: Vec::new(),
    }
}

async fn wait_warm(p: &QemuProvider, pool: &str, n: usize) {
    let until = Instant::now() + BOOT_TIMEOUT;
    while p.warm_ready(pool) < n {
        assert!(
            Instant::now() < until,
            "no warm vm for {pool} within {BOOT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mount points under `dir` in this process's mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(&dir))
        .collect()
}

/// Live qemu processes whose command line names a path under `root`.
fn qemu_under(root: &Path) -> Vec<String> {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let root = root.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.contains("qemu-system") && cmd.contains(&format!("{root}/")) && !zombie {
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_vm_takes_a_job_at_once_is_never_reused_and_leaves_nothing() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let source = fx.dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("hello-from-host.txt"), "hi\n").unwrap();
    let mirror = fx.dir.path().join("mirror");
    fs::create_dir_all(&mirror).unwrap();
    fs::write(mirror.join("index"), "mirror index v1\n").unwrap();
    let plain = fx.dir.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    let mounts = vec![
        WorkerMount {
            host_path: mirror.clone(),
            target: "/srv/mirror".into(),
            read_only: true,
        },
        WorkerMount {
            host_path: plain.clone(),
            target: "/var/cache/plain".into(),
            read_only: false,
        },
    ];
    let base_sum = sha256_file(&fx.image().join("disk.qcow2")).unwrap();
    fx.provider.keep_warm(warm_template(&fx, "vm", &mounts));
    wait_warm(&fx.provider, "vm", 1).await;
    // An idle warm VM is nobody's worker: recovery must not take it for a leftover.
    assert!(fx.provider.list().await.unwrap().is_empty());

    let mut spec = fx.spec(&fx.image(), Some(source.clone()));
    spec.mounts = mounts.clone();
    let first = spec.job_id.resource_name();
    let token = spec.agent_token.expose().to_string();
    let started = Instant::now();
    let (mut worker, seen) = run_job(
        &fx.provider,
        spec,
        "uname -r; cat /etc/slate-vm-image; ls /workspace; cat /srv/mirror/index; \
         if echo x > /srv/mirror/guest 2>/dev/null; then echo RO-WRITTEN; else echo ro-refused; fi; \
         echo fetched > /var/cache/plain/new && echo plain-written; \
         echo one > /job1-was-here && echo > /workspace/job1-file && echo done1",
    )
    .await;
    let warm_run = started.elapsed();
    assert_eq!(worker.name, first);
    assert!(seen.success, "{}", seen.output);
    // The server saw the job's own token, never the VM's.
    assert_eq!(seen.token, token);
    for want in [
        "amd64",
        MARKER,
        "hello-from-host.txt",
        "mirror index v1",
        "ro-refused",
        "plain-written",
        "done1",
    ] {
        assert!(
            seen.output.contains(want),
            "no {want:?} in:\n{}",
            seen.output
        );
    }
    assert_eq!(fs::read_to_string(plain.join("new")).unwrap(), "fetched\n");
    assert!(!mirror.join("guest").exists());
    assert!(
        !source.join("job1-file").exists(),
        "the guest wrote to the source tree"
    );
    assert_eq!(exit_code(&mut worker).await, 0);
    fx.provider.destroy(&first).await.unwrap();
    fx.assert_gone(&first);
    // The job's tree and caches were bound into the VM's shares: destroy unmounted them
    // and left the host directories alone.
    assert!(
        mounts_under(&fx.root()).is_empty(),
        "{:?}",
        mounts_under(&fx.root())
    );
    assert_eq!(
        fs::read_to_string(mirror.join("index")).unwrap(),
        "mirror index v1\n"
    );
    assert!(source.join("hello-from-host.txt").is_file());

    // The pool refills with a fresh clone: the second job sees nothing of the first.
    wait_warm(&fx.provider, "vm", 1).await;
    let mut spec = fx.spec(&fx.image(), Some(source.clone()));
    spec.mounts = mounts.clone();
    let second = spec.job_id.resource_name();
    let (mut worker, seen) = run_job(
        &fx.provider,
        spec,
        "cat /job1-was-here 2>/dev/null || echo fresh-root; ls /workspace",
    )
    .await;
    assert!(seen.success, "{}", seen.output);
    assert!(seen.output.contains("fresh-root"), "{}", seen.output);
    assert!(!seen.output.contains("job1-file"), "{}", seen.output);
    assert_eq!(exit_code(&mut worker).await, 0);
    fx.provider.destroy(&second).await.unwrap();

    // The same job on a pool without warm VMs, in the same run: the cold figure.
    let mut spec = fx.spec(&fx.image(), Some(source.clone()));
    spec.pool = "cold".into();
    spec.mounts = mounts.clone();
    let cold = spec.job_id.resource_name();
    let started = Instant::now();
    let (mut worker, seen) = run_job(&fx.provider, spec, "echo done1").await;
    let cold_run = started.elapsed();
    assert!(seen.success, "{}", seen.output);
    assert_eq!(exit_code(&mut worker).await, 0);
    fx.provider.destroy(&cold).await.unwrap();
    println!(
        "provision to done: warm {} ms, cold {} ms",
        warm_run.as_millis(),
        cold_run.as_millis()
    );
    assert!(
        warm_run * 3 < cold_run,
        "a warm vm should start a job far sooner than a cold boot: warm {warm_run:?}, cold {cold_run:?}"
    );

    // Stopping the pool destroys the idle VM it refilled.
    wait_warm(&fx.provider, "vm", 1).await;
    fx.provider.stop_warm().await;
    assert_eq!(fx.provider.warm_ready("vm"), 0);
    assert!(
        qemu_under(&fx.root()).is_empty(),
        "{:?}",
        qemu_under(&fx.root())
    );
    assert!(fs::read_dir(fx.root()).unwrap().next().is_none());
    assert!(mounts_under(&fx.root()).is_empty());
    assert_eq!(
        sha256_file(&fx.image().join("disk.qcow2")).unwrap(),
        base_sum
    );
}

#[test]
fn after_a_crash_warm_and_bound_vms_are_found_and_destroyed() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let source = fx.dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("f"), "x").unwrap();
    let spec = fx.spec(&fx.image(), Some(source.clone()));
    let bound = spec.job_id.resource_name();

    // A server that crashes: its runtime goes away with a warm VM idle and another VM
    // bound to a running job (a step that sleeps), and nothing is destroyed.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let p = Arc::new(QemuProvider::new(fx.root(), config(BOOT_TIMEOUT)));
        p.keep_warm(warm_template(&fx, "vm", &[]));
        wait_warm(&p, "vm", 1).await;
        let listener = UnixListener::bind(&spec.agent_socket).unwrap();
        let server =
            tokio::spawn(async move { serve_one_job(listener, "sleep 600", BOOT_TIMEOUT).await });
        let worker = p.provision(spec.clone()).await.unwrap();
        assert_eq!(worker.name, bound);
        // The job is running in the guest once its workspace is bound.
        let until = Instant::now() + Duration::from_secs(30);
        while mounts_under(&fx.root()).is_empty() {
            assert!(Instant::now() < until, "the job's tree was never bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_warm(&p, "vm", 1).await;
        server.abort();
    });
    // (The guests may power themselves off now that their agents lost the server: what
    // is left, processes or only directories and mounts, must be found either way.)
    rt.shutdown_background();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let p = QemuProvider::new(fx.root(), config(BOOT_TIMEOUT));
        let found = p.list().await.unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&bound), "{found:?}");
        assert!(found.iter().any(|n| n.starts_with("warm-")), "{found:?}");
        for name in &found {
            p.destroy(name).await.unwrap();
        }
        assert!(p.list().await.unwrap().is_empty());
    });
    assert!(
        qemu_under(&fx.root()).is_empty(),
        "{:?}",
        qemu_under(&fx.root())
    );
    assert!(
        mounts_under(&fx.root()).is_empty(),
        "{:?}",
        mounts_under(&fx.root())
    );
    assert!(fs::read_dir(fx.root()).unwrap().next().is_none());
    // The bound source tree was unmounted, not deleted.
    assert_eq!(fs::read_to_string(source.join("f")).unwrap(), "x");
}

// --- network = "egress" ---

/// A one-line HTTP server on `addr`; counts the connections it accepted.
async fn http_pong(
    addr: &str,
    body: &'static str,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let at = l.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = c.write_all(reply.as_bytes()).await;
        }
    });
    (at, hits)
}

/// The host's first non-loopback IPv4 address.
fn host_address() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_vm_reaches_its_allowed_endpoints_and_nothing_else() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let (allowed, allowed_hits) = http_pong("127.0.0.1:0", "pong-allowed").await;
    let (denied, denied_hits) = http_pong("0.0.0.0:0", "pong-denied").await;
    let host = host_address().unwrap_or_else(|| "192.0.2.1".into());
    let script = format!(
        "cat /run/slate/forwards; \
         echo GET | nc -w 5 10.0.2.100 {a} && echo; \
         echo GET | nc -w 3 10.0.2.2 {d} || echo gateway-blocked; \
         echo GET | nc -w 3 {host} {d} || echo host-blocked; \
         echo GET | nc -w 3 10.0.2.100 {d} || echo other-port-blocked",
        a = allowed.port(),
        d = denied.port(),
    );
    // A cold VM, then a warm one booted with the same network.
    for warm in [false, true] {
        let source = fx.dir.path().join("src");
        fs::create_dir_all(&source).unwrap();
        let mut spec = fx.spec(&fx.image(), Some(source));
        spec.network = Network::Egress;
        spec.network_allow = vec![allowed];
        if warm {
            let mut t = warm_template(&fx, "vm", &[]);
            t.network = Network::Egress;
            t.network_allow = vec![allowed];
            fx.provider.keep_warm(t);
            wait_warm(&fx.provider, "vm", 1).await;
        }
        let name = spec.job_id.resource_name();
        let (mut worker, seen) = run_job(&fx.provider, spec, &script).await;
        let out = &seen.output;
        assert!(seen.success, "{out}");
        assert_eq!(
            fx.root().join(&name).join("vm-name").is_file(),
            warm,
            "warm: {warm}"
        );
        assert!(
            out.contains(&format!("10.0.2.100:{} {allowed}", allowed.port())),
            "{out}"
        );
        for want in [
            "pong-allowed",
            "gateway-blocked",
            "host-blocked",
            "other-port-blocked",
        ] {
            assert!(out.contains(want), "warm: {warm}: no {want:?} in:\n{out}");
        }
        assert!(!out.contains("pong-denied"), "{out}");
        assert_eq!(exit_code(&mut worker).await, 0);
        fx.provider.destroy(&name).await.unwrap();
        fx.assert_gone(&name);
    }
    assert!(allowed_hits.load(Ordering::SeqCst) >= 2);
    assert_eq!(denied_hits.load(Ordering::SeqCst), 0);
    fx.provider.stop_warm().await;
    assert!(
        qemu_under(&fx.root()).is_empty(),
        "{:?}",
        qemu_under(&fx.root())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_image_replaces_the_idle_warm_vms() {
    let fx = Fixture::new(false, BOOT_TIMEOUT);
    let rebuilt = fx.dir.path().join("image-v2");
    run(Command::new("cp").arg("-a").arg(fx.image()).arg(&rebuilt));
    let current = Arc::new(std::sync::Mutex::new(fx.image()));
    let mut t = warm_template(&fx, "vm", &[]);
    let c = current.clone();
    t.image = Arc::new(move || Some(c.lock().unwrap().clone()));
    fx.provider.keep_warm(t);
    wait_warm(&fx.provider, "vm", 1).await;
    let warm_dirs = || -> Vec<String> {
        fs::read_dir(fx.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("warm-"))
            .collect()
    };
    let old = warm_dirs();
    assert_eq!(old.len(), 1, "{old:?}");

    // The pool's image is rebuilt: the idle VM of the old version is replaced.
    *current.lock().unwrap() = rebuilt.clone();
    let until = Instant::now() + BOOT_TIMEOUT;
    loop {
        let now = warm_dirs();
        if fx.provider.warm_ready("vm") == 1 && now.len() == 1 && now != old {
            break;
        }
        assert!(
            Instant::now() < until,
            "the stale warm vm was never replaced: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A job on the new version takes the new warm VM.
    let spec = fx.spec(&rebuilt, Some(fx.image()));
    let name = spec.job_id.resource_name();
    let (mut worker, seen) = run_job(&fx.provider, spec, "echo on-the-new-image").await;
    assert!(seen.success, "{}", seen.output);
    assert!(
        fx.root().join(&name).join("vm-name").is_file(),
        "the job did not run on a warm vm"
    );
    assert_eq!(exit_code(&mut worker).await, 0);
    fx.provider.destroy(&name).await.unwrap();
    fx.provider.stop_warm().await;
    assert!(
        qemu_under(&fx.root()).is_empty(),
        "{:?}",
        qemu_under(&fx.root())
    );
    assert!(fs::read_dir(fx.root()).unwrap().next().is_none());
}
