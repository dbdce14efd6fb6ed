//! Measures the qemu provider: overlay creation over a 200 MB vs a 20 GB base, and the
//! provider's provision→agent-hello time against qemu-img + qemu run by hand.
//!
//! `cargo run --release -p slate-provider --example qemu_bench [-- RUNS]` (default 5).

use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::qemu::Accel;
use slate_provider::{Provider, QemuConfig, QemuProvider, WorkerSpec};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Accepts one connection and waits for the first frame (the agent's hello).
async fn wait_hello(listener: &UnixListener) -> Instant {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("hello"));
    Instant::now()
}

/// The same VM as the provider's, started by hand.
fn hand_run(image: &Path, dir: &Path, sock: &Path, token: &str) -> std::process::Child {
    fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image.join("disk.qcow2"))
        .arg(&disk));
    fs::write(dir.join("token"), token).unwrap();
    let cmdline = fs::read_to_string(image.join("cmdline")).unwrap();
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-M", "pc", "-m", "256", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {}", cmdline.trim()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=virtio,cache=unsafe",
            disk.display()
        ))
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!("socket,id=agent,path={}", sock.display()))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.slate.agent",
        ])
        .arg("-fw_cfg")
        .arg(format!(
            "name=opt/slate/token,file={}",
            dir.join("token").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // 1. Overlay creation over a base with 200 MB of data vs an empty 20 GB one.
    let small = t.join("small.qcow2");
    let raw = t.join("data.raw");
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut data = Vec::with_capacity(200 << 20);
    for _ in 0..200 {
        data.extend_from_slice(&chunk);
    }
    fs::write(&raw, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&small));
    fs::remove_file(&raw).unwrap();
    let big = t.join("big.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&big)
        .arg("20G"));
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..15 {
        for (k, base) in [&small, &big].into_iter().enumerate() {
            let o = t.join(format!("o-{k}-{i}.qcow2"));
            let s = Instant::now();
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(base)
                .arg(&o));
            times[k].push(s.elapsed());
            fs::remove_file(&o).unwrap();
        }
        let s = Instant::now();
        fs::copy(&small, t.join("copy.qcow2")).unwrap();
        times[2].push(s.elapsed());
        fs::remove_file(t.join("copy.qcow2")).unwrap();
    }
    println!(
        "overlay create median: 200 MB base {:?}, 20 GB base {:?} (cp of the 200 MB base: {:?})",
        median(times[0].clone()),
        median(times[1].clone()),
        median(times[2].clone())
    );

    // 2. Provider vs hand-run, to the agent's hello.
    let image = t.join("image");
    slate_testkit::vm_image::vm_image(&image).unwrap();
    let provider = QemuProvider::new(
        t.join("vm-workers"),
        QemuConfig {
            memory_mb: 256,
            cpus: 1,
            accel: Accel::Tcg,
            ..QemuConfig::default()
        },
    );
    let accel = provider.accel(&image).await;
    let (mut ours, mut hand) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Provider.
        let job_id = JobId(900_000 + i as i64);
        let sock = t.join(format!("p-{i}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let spec = WorkerSpec {
            job_id,
            pool: "bench".into(),
            image: image.clone(),
            source: None,
            agent_binary: PathBuf::new(),
            agent_socket: sock,
            agent_token: Secret::new("bench-token"),
            limits: Limits {
                memory_bytes: None,
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
        let s = Instant::now();
        let (_worker, hello) = tokio::join!(
            async { provider.provision(spec).await.unwrap() },
            wait_hello(&listener)
        );
        ours.push(hello - s);
        provider.destroy(&job_id.resource_name()).await.unwrap();

        // By hand.
        let sock = t.join(format!("h-{i}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let s = Instant::now();
        let mut child = hand_run(&image, &t.join(format!("hand-{i}")), &sock, "bench-token");
        let hello = wait_hello(&listener).await;
        hand.push(hello - s);
        let _ = child.kill();
        let _ = child.wait();
        println!("run {i}: provider {:?}, hand-run {:?}", ours[i], hand[i]);
    }
    let (o, h) = (median(ours), median(hand));
    println!(
        "provision->hello median ({accel:?}): provider {o:?}, hand-run {h:?}, ratio {:.3}",
        o.as_secs_f64() / h.as_secs_f64()
    );
}
