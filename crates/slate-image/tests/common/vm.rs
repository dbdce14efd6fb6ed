//! Booting a built VM image with the qemu provider against a fake agent server (the
//! server side as in slate-provider's tests/qemu.rs).

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::qemu::Accel;
use slate_provider::{Provider, QemuConfig, QemuProvider, WorkerSpec};
use slate_testkit::fake_agent::serve_one_job;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;

/// Generous for TCG on 2 shared cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Destroys every worker under `root` on drop (even after a panic): no qemu outlives a test.
pub struct Workers {
    pub root: PathBuf,
}

impl Drop for Workers {
    fn drop(&mut self) {
        let root = self.root.clone();
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

/// Boots `image` with the qemu provider, runs `script` in it; returns what the server saw
/// and the expected token. Panics with the console on failure.
pub fn boot_and_run(image: &Path, dir: &Path, script: &str) -> (String, String, bool, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(boot_and_run_async(image, dir, script))
}

async fn boot_and_run_async(
    image: &Path,
    dir: &Path,
    script: &str,
) -> (String, String, bool, String) {
    let provider = QemuProvider::new(
        dir.join("vm-workers"),
        QemuConfig {
            memory_mb: 256,
            cpus: 1,
            boot_timeout: BOOT_TIMEOUT,
            qemu_binary: "qemu-system-x86_64".into(),
            accel: Accel::Auto,
        },
    );
    let job_id = JobId(std::process::id() as i64 * 1000 + 1);
    let token = format!("tok-{}-{}", job_id.0, std::process::id());
    let spec = WorkerSpec {
        job_id,
        pool: "vm".into(),
        image: image.to_path_buf(),
        source: None,
        agent_binary: PathBuf::from("/nonexistent/not-used-by-vms"),
        agent_socket: dir.join("agent.sock"),
        agent_token: Secret::new(token.clone()),
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
    };
    let name = job_id.resource_name();
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let script = script.to_string();
    let server = tokio::spawn(async move { serve_one_job(listener, &script, BOOT_TIMEOUT).await });
    let started = Instant::now();
    let mut worker = provider.provision(spec).await.unwrap();
    let console =
        |w: &slate_provider::Worker| fs::read_to_string(&w.console_log).unwrap_or_default();
    let seen = server
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console(&worker)));
    let (seen_token, output, success) = (seen.token, seen.output, seen.success);
    eprintln!("boot to done: {} ms", started.elapsed().as_millis());
    // slate-init powers the VM off when the agent exits.
    let console_log = worker.console_log.clone();
    let code = tokio::time::timeout(
        Duration::from_secs(60),
        worker.exited.wait_for(|c| c.is_some()),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "vm did not power off; console:\n{}",
            fs::read_to_string(&console_log).unwrap_or_default()
        )
    })
    .unwrap()
    .unwrap();
    assert_eq!(code, 0, "console:\n{}", console(&worker));
    let log = console(&worker);
    assert!(log.contains("slate-vm: starting agent"), "{log}");
    provider.destroy(&name).await.unwrap();
    assert!(!dir.join("vm-workers").join(&name).exists());
    (seen_token, output, success, token)
}
