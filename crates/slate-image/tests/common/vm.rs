//! Booting a built VM image with the qemu provider against a fake agent server (the
//! server side as in slate-provider's tests/qemu.rs).

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_proto::{AgentMsg, JobSpec, ServerMsg, StepSpec};
use slate_provider::qemu::Accel;
use slate_provider::{Provider, QemuConfig, QemuProvider, WorkerSpec};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

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

// --- a fake server speaking the agent protocol (as in slate-provider's tests/qemu.rs) ---

async fn read_msg(s: &mut UnixStream) -> Result<AgentMsg, String> {
    let mut frame = vec![0u8; 4];
    s.read_exact(&mut frame).await.map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    frame.resize(4 + len, 0);
    s.read_exact(&mut frame[4..])
        .await
        .map_err(|e| e.to_string())?;
    slate_proto::read_frame(&mut &frame[..]).map_err(|e| e.to_string())
}

async fn write_msg(s: &mut UnixStream, m: &ServerMsg) -> Result<(), String> {
    let frame = slate_proto::encode(m).map_err(|e| e.to_string())?;
    s.write_all(&frame).await.map_err(|e| e.to_string())
}

/// Accepts qemu's connection, waits for the agent's hello, runs `script` as one step and
/// returns (token, output, success).
async fn serve_one_job(
    listener: UnixListener,
    script: &str,
) -> Result<(String, String, bool), String> {
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    let (mut s, _) = tokio::time::timeout_at(deadline, listener.accept())
        .await
        .map_err(|_| "qemu never connected".to_string())?
        .map_err(|e| e.to_string())?;
    let hello = tokio::time::timeout_at(deadline, read_msg(&mut s))
        .await
        .map_err(|_| "boot timeout: no hello".to_string())??;
    let AgentMsg::Hello { token, .. } = hello else {
        return Err(format!("expected hello, got {hello:?}"));
    };
    let job = JobSpec {
        job_id: 1,
        workdir: "/workspace".into(),
        env: BTreeMap::from([("PATH".into(), "/usr/local/bin:/bin:/sbin".into())]),
        steps: vec![StepSpec {
            name: "main".into(),
            run: script.into(),
            timeout_ms: None,
            allow_failure: false,
            env: BTreeMap::new(),
        }],
    };
    write_msg(&mut s, &ServerMsg::Welcome { job }).await?;
    let mut output = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), read_msg(&mut s))
            .await
            .map_err(|_| "no message for 60 s".to_string())??;
        match m {
            AgentMsg::Output { seq, data, .. } => {
                output.extend(data);
                write_msg(&mut s, &ServerMsg::Ack { seq }).await?;
            }
            AgentMsg::Done { success } => {
                return Ok((
                    token,
                    String::from_utf8_lossy(&output).into_owned(),
                    success,
                ))
            }
            _ => {}
        }
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
        runtime: String::new(),
        mounts: Vec::new(),
    };
    let name = job_id.resource_name();
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let script = script.to_string();
    let server = tokio::spawn(async move { serve_one_job(listener, &script).await });
    let started = Instant::now();
    let mut worker = provider.provision(spec).await.unwrap();
    let console =
        |w: &slate_provider::Worker| fs::read_to_string(&w.console_log).unwrap_or_default();
    let (seen_token, output, success) = server
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console(&worker)));
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
