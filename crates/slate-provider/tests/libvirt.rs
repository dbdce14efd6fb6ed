//! End-to-end tests of the libvirt provider: a real libvirtd (Debian's, started by
//! `scripts/libvirt-deps.sh`), qemu under TCG, qcow2 volumes made through libvirt's
//! storage API, the static agent in the guest speaking to a fake server over the
//! virtio-serial channel. Each test uses its own transient storage pool over a temp dir
//! and its own worker root, so tests running side by side never see each other's workers.

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::libvirt::VirtType;
use slate_provider::{LibvirtConfig, LibvirtProvider, Provider, Worker, WorkerSpec};
use slate_testkit::vm_image::{sha256_file, vm_image, MARKER};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::UnixListener;

/// Generous for TCG on 2 shared cores (a boot to the agent takes ~6 s alone).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const URI: &str = "qemu:///system";
/// A libvirt URI nothing answers on.
const DEAD_URI: &str = "qemu+unix:///system?socket=/nonexistent/slate-test-libvirt-sock";

fn unique_job_id() -> JobId {
    static NEXT: AtomicI64 = AtomicI64::new(0);
    // Apart from the qemu tests' ids (pid * 1000 + n), which may run at the same time.
    JobId(std::process::id() as i64 * 1000 + 500 + NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `virsh -q -c URI ARGS…`: success and stdout + stderr.
fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .env("LC_ALL", "C")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh (scripts/libvirt-deps.sh installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn domains() -> Vec<String> {
    let (ok, out) = virsh(&["list", "--all", "--name"]);
    assert!(ok, "virsh list: {out}");
    out.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// A temp dir with an image, a worker root, sockets and a transient storage pool; on
/// drop (even after a panic) destroys every worker a fresh provider finds and the pool,
/// so no domain or volume outlives the test.
struct Fixture {
    dir: TempDir,
    pool: String,
    provider: LibvirtProvider,
}

impl Fixture {
    fn new(uris: &[&str]) -> Self {
        static NEXT: AtomicI64 = AtomicI64::new(0);
        let dir = tempfile::tempdir().unwrap();
        vm_image(&dir.path().join("image")).unwrap();
        let pool = format!(
            "slate-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let target = dir.path().join("pool");
        fs::create_dir_all(&target).unwrap();
        let (ok, out) = virsh(&[
            "pool-create-as",
            &pool,
            "dir",
            "--target",
            &target.to_string_lossy(),
        ]);
        assert!(
            ok,
            "cannot create a storage pool (run scripts/libvirt-deps.sh): {out}"
        );
        let cfg = config(&pool, uris);
        let provider = LibvirtProvider::new(dir.path().join("workers"), cfg);
        Self {
            dir,
            pool,
            provider,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("workers")
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("image")
    }

    fn spec(&self, image: &Path, source: Option<PathBuf>) -> WorkerSpec {
        let job_id = unique_job_id();
        WorkerSpec {
            job_id,
            pool: "libvirt".into(),
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

    fn volumes(&self) -> Vec<String> {
        let (ok, out) = virsh(&["vol-list", &self.pool]);
        assert!(ok, "virsh vol-list: {out}");
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// Nothing of `name` is left: no domain, no volume, no job dir.
    fn assert_gone(&self, name: &str) {
        let dir = self.root().join(name);
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(
            !domains().contains(&name.to_string()),
            "domain {name} still exists"
        );
        let vols = self.volumes();
        assert!(
            !vols.contains(&format!("{name}.qcow2")),
            "volume of {name} still exists: {vols:?}"
        );
    }
}

fn config(pool: &str, uris: &[&str]) -> LibvirtConfig {
    LibvirtConfig {
        uris: uris.iter().map(|u| u.to_string()).collect(),
        storage_pool: pool.to_string(),
        memory_mb: 256,
        cpus: 1,
        virt_type: VirtType::Qemu,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.root();
        let pool = self.pool.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let p = LibvirtProvider::new(root, config(&pool, &[URI]));
                for name in p.list().await.unwrap_or_default() {
                    if let Err(e) = p.destroy(&name).await {
                        eprintln!("cleanup of {name} failed: {e}");
                    }
                }
            });
            // Transient pool: destroying it forgets it (the directory goes with the temp dir).
            let (ok, out) = virsh(&["pool-destroy", &pool]);
            if !ok {
                eprintln!("cleanup of pool {pool} failed: {out}");
            }
        })
        .join()
        .ok();
    }
}

/// Live processes whose command line names the domain (`-name guest=<name>,…`).
fn qemu_processes(name: &str) -> Vec<String> {
    let needle = format!("guest={name},");
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(&needle) {
            out.push(line);
        }
    }
    out
}

// --- a fake server speaking the agent protocol with slate_proto's types ---

use slate_testkit::fake_agent::{serve_one_job, Seen};

/// Provisions `spec` and runs `script` as its one step; panics with the console on failure.
async fn run_job(p: &LibvirtProvider, spec: WorkerSpec, script: &str) -> (Worker, Seen) {
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
async fn a_job_boots_under_tcg_via_libvirt_then_destroy_leaves_nothing() {
    let fx = Fixture::new(&[URI]);
    let source = fx.dir.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("hello-from-host.txt"), "hi\n").unwrap();
    let spec = fx.spec(&fx.image(), Some(source.clone()));
    let name = spec.job_id.resource_name();
    let token = spec.agent_token.expose().to_string();

    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let server = tokio::spawn(async move {
        serve_one_job(
            listener,
            "uname -r; cat /etc/slate-vm-image; ls /workspace; echo w > /workspace/new && echo wrote; \
             ls /sys/class/net | grep -v '^lo$' | wc -l",
            BOOT_TIMEOUT,
        )
        .await
    });
    let started = Instant::now();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    let provisioned = started.elapsed();
    assert_eq!(worker.name, name);
    assert_eq!(fx.provider.list().await.unwrap(), vec![name.clone()]);
    assert!(domains().contains(&name));
    // The disk is a volume of the pool, backed by the image's base disk.
    let (ok, vol) = virsh(&["vol-dumpxml", "--pool", &fx.pool, &format!("{name}.qcow2")]);
    assert!(ok, "{vol}");
    let base = fx.image().canonicalize().unwrap().join("disk.qcow2");
    assert!(
        vol.contains(&format!("<path>{}</path>", base.display())) && vol.contains("<backingStore>"),
        "volume not backed by the base: {vol}"
    );
    // The token is handed over by fw_cfg file: never in the domain XML or on qemu's
    // command line.
    let (ok, dom) = virsh(&["dumpxml", &name]);
    assert!(ok, "{dom}");
    assert!(!dom.contains(&token), "token in the domain xml");
    assert!(dom.contains("opt/slate/token"), "{dom}");
    let procs = qemu_processes(&name);
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert!(!procs[0].contains(&token), "token on the process list");

    let seen = server.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "{e}; console:\n{}",
            fs::read_to_string(&worker.console_log).unwrap_or_default()
        )
    });
    println!(
        "libvirt: provision {} ms, provision to done {} ms",
        provisioned.as_millis(),
        started.elapsed().as_millis()
    );
    assert_eq!(seen.token, token);
    assert!(seen.success, "{}", seen.output);
    let lines: Vec<&str> = seen.output.lines().collect();
    assert!(lines[0].contains("amd64"), "uname -r: {}", seen.output);
    assert!(seen.output.contains(MARKER), "{}", seen.output);
    assert!(
        seen.output.contains("hello-from-host.txt"),
        "source not visible: {}",
        seen.output
    );
    assert!(seen.output.contains("wrote"), "{}", seen.output);
    assert_eq!(
        lines.last().map(|l| l.trim()),
        Some("0"),
        "the guest has a network interface: {}",
        seen.output
    );
    assert!(
        !source.join("new").exists(),
        "the guest wrote to the host source tree"
    );

    // The guest powers off when the agent is done; the transient domain is then gone.
    assert_eq!(exit_code(&mut worker).await, 0);
    assert!(!domains().contains(&name));
    let console = fs::read_to_string(&worker.console_log).unwrap();
    assert!(console.contains("slate-vm: starting agent"), "{console}");

    let t = Instant::now();
    fx.provider.destroy(&name).await.unwrap();
    println!("libvirt: destroy {} ms", t.elapsed().as_millis());
    fx.assert_gone(&name);
    fx.provider.destroy(&name).await.unwrap();
    assert!(fx.provider.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_unchanged_and_a_second_job_does_not_see_the_first() {
    // An unreachable host first: provisioning skips it and uses the live one.
    let fx = Fixture::new(&[DEAD_URI, URI]);
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
    assert_eq!(
        fs::read_to_string(fx.root().join(&first).join("uri")).unwrap(),
        URI
    );
    assert_eq!(exit_code(&mut w).await, 0);
    // The write reached the job's volume, not the base.
    let (ok, info) = virsh(&[
        "vol-info",
        "--bytes",
        "--pool",
        &fx.pool,
        &format!("{first}.qcow2"),
    ]);
    assert!(ok, "{info}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_provider_lists_and_destroys_a_running_domain() {
    let fx = Fixture::new(&[URI]);
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    // The agent connects but is never answered: the VM keeps running.
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let mut worker = fx.provider.provision(spec).await.unwrap();
    assert!(domains().contains(&name));

    // Another slate server (another root) sharing this libvirtd neither lists nor
    // destroys it.
    let other_root = fx.dir.path().join("other-workers");
    let other = LibvirtProvider::new(other_root, config(&fx.pool, &[URI]));
    assert_ne!(other.owner_id(), fx.provider.owner_id());
    other.destroy(&name).await.unwrap();
    assert!(
        domains().contains(&name),
        "another server destroyed our domain"
    );

    // As after a crash: a new provider on the same root finds the domain by its owner
    // mark and its volume by name, even with the job directory gone.
    fs::remove_dir_all(fx.root().join(&name)).unwrap();
    let again = LibvirtProvider::new(fx.root(), config(&fx.pool, &[URI]));
    assert_eq!(again.list().await.unwrap(), vec![name.clone()]);
    again.destroy(&name).await.unwrap();
    fx.assert_gone(&name);
    assert!(qemu_processes(&name).is_empty());
    // The first provider sees its domain killed.
    assert_eq!(exit_code(&mut worker).await, 137);
    assert!(again.list().await.unwrap().is_empty());
    assert!(fx.provider.list().await.unwrap().is_empty());
    again.destroy(&name).await.unwrap();
}

#[tokio::test]
async fn destroy_is_idempotent_and_refuses_bad_names() {
    let fx = Fixture::new(&[URI]);
    for bad in ["../x", "slate-1/..", "slate-", "slate-1a", "foo", ""] {
        assert!(fx.provider.destroy(bad).await.is_err(), "{bad}");
    }
    fx.provider.destroy("slate-98765").await.unwrap();
    fx.provider.destroy("slate-98765").await.unwrap();
    // A half-made worker (dir only) is listed and removed.
    fs::create_dir_all(fx.root().join("slate-98766")).unwrap();
    // A leftover volume (no dir, no domain) is listed and removed.
    let (ok, out) = virsh(&[
        "vol-create-as",
        &fx.pool,
        "slate-98767.qcow2",
        "1M",
        "--format",
        "qcow2",
    ]);
    assert!(ok, "{out}");
    // Neither a volume nor a directory of another name is touched.
    let (ok, out) = virsh(&[
        "vol-create-as",
        &fx.pool,
        "keep.qcow2",
        "1M",
        "--format",
        "qcow2",
    ]);
    assert!(ok, "{out}");
    fs::create_dir_all(fx.root().join("keep-me")).unwrap();
    assert_eq!(
        fx.provider.list().await.unwrap(),
        vec!["slate-98766".to_string(), "slate-98767".to_string()]
    );
    for name in ["slate-98766", "slate-98767"] {
        fx.provider.destroy(name).await.unwrap();
        fx.provider.destroy(name).await.unwrap();
        fx.assert_gone(name);
    }
    assert!(fx.provider.list().await.unwrap().is_empty());
    assert!(fx.root().join("keep-me").exists());
    assert_eq!(fx.volumes(), vec!["keep.qcow2".to_string()]);
}

#[tokio::test]
async fn failed_provisions_leave_nothing() {
    let fx = Fixture::new(&[URI]);
    let empty = fx.dir.path().join("empty-image");
    fs::create_dir_all(&empty).unwrap();
    let spec = fx.spec(&empty, None);
    let name = spec.job_id.resource_name();
    let err = fx.provider.provision(spec).await.unwrap_err();
    assert!(err.to_string().contains("disk.qcow2"), "{err}");
    fx.assert_gone(&name);

    // No server on the agent socket: libvirt cannot connect the channel and refuses to
    // start the domain; the volume made just before is rolled back.
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    let err = fx.provider.provision(spec).await.unwrap_err();
    assert!(err.to_string().contains("create"), "{err}");
    fx.assert_gone(&name);

    // No reachable host at all.
    let dead = LibvirtProvider::new(fx.root(), config(&fx.pool, &[DEAD_URI, DEAD_URI]));
    let spec = fx.spec(&fx.image(), None);
    let name = spec.job_id.resource_name();
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let err = dead.provision(spec).await.unwrap_err();
    assert!(
        err.to_string().contains("no libvirt host reachable"),
        "{err}"
    );
    fx.assert_gone(&name);
    assert!(fx.provider.list().await.unwrap().is_empty());
}
