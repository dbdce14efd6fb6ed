//! Measures sandbox provision+destroy against a hand-made floor (overlay + `runc run true`),
//! and on a 200 MB versus a 2 GB image, to show provisioning does not grow with image size.
//!
//! Run as root: `cargo run --release -p slate-provider --example provision_bench [cycles] [big_mb]`.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use slate_core::config::{Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::{Provider, SandboxProvider, WorkerSpec};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEMORY: u64 = 512 << 20;
const PIDS: u64 = 256;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let cycles: usize = args
        .next()
        .map(|a| a.parse().expect("cycles"))
        .unwrap_or(20);
    let big_mb: u64 = args
        .next()
        .map(|a| a.parse().expect("big_mb"))
        .unwrap_or(2048);

    let tmp = tempfile::tempdir().expect("tempdir");
    let small = tmp.path().join("image-200m");
    let big = tmp.path().join("image-big");
    let t = Instant::now();
    make_image(&small, 200);
    make_image(&big, big_mb);
    println!("images built in {:?} (200 MB and {big_mb} MB)", t.elapsed());

    let agent = tmp.path().join("agent.sh");
    fs::write(&agent, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
    let sock = tmp.path().join("sock");
    fs::create_dir(&sock).unwrap();
    let template = runc_template(tmp.path());

    let provider = SandboxProvider::new(tmp.path().join("workers"));
    let floor_root = tmp.path().join("floor");
    fs::create_dir(&floor_root).unwrap();

    let sleeper = tmp.path().join("sleeper.sh");
    fs::write(
        &sleeper,
        "#!/bin/sh\necho ready > /run/slate/ready\nexec sleep 1000\n",
    )
    .unwrap();
    fs::set_permissions(&sleeper, fs::Permissions::from_mode(0o755)).unwrap();

    let (mut floor, mut prov_small, mut prov_big) = (Vec::new(), Vec::new(), Vec::new());
    let mut kill_running = Vec::new();
    // Warm-up once each (page cache, binaries), then interleave so drift hits all alike.
    floor_cycle(&floor_root, &small, &template, 0);
    provider_cycle(&provider, &small, &agent, &sock, 1_000_000).await;
    for i in 0..cycles {
        floor.push(floor_cycle(&floor_root, &small, &template, i + 1));
        prov_small.push(provider_cycle(&provider, &small, &agent, &sock, 2 * i as i64).await);
        prov_big.push(provider_cycle(&provider, &big, &agent, &sock, 2 * i as i64 + 1).await);
        kill_running
            .push(destroy_running(&provider, &small, &sleeper, &sock, 500_000 + i as i64).await);
    }
    // runc removed each floor cgroup on exit; the parent it made is left to remove.
    for h in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = fs::remove_dir(h.path().join("slate-floor"));
    }
    let (f, s, b) = (
        median(&mut floor),
        median(&mut prov_small),
        median(&mut prov_big),
    );
    println!("cycles per series: {cycles}");
    println!("floor (overlay + runc run true + umount), 200 MB image: median {f:.1} ms");
    println!("provider provision+destroy, 200 MB image:           median {s:.1} ms");
    println!("provider provision+destroy, {big_mb} MB image:          median {b:.1} ms");
    println!(
        "destroy of a running worker (runc kill + wait + cleanup): median {:.1} ms",
        median(&mut kill_running)
    );
    println!("ratio provider/floor: {:.2}", s / f);
    println!("ratio big/small image: {:.2}", b / s);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn make_image(dir: &Path, total_mb: u64) {
    slate_testkit::image::busybox_rootfs(dir).expect("busybox rootfs");
    let data = dir.join("data");
    fs::create_dir(&data).unwrap();
    let mut out = fs::File::create(data.join("random.bin")).unwrap();
    let mut urandom = fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; 4 << 20];
    for _ in 0..(total_mb / 4) {
        urandom.read_exact(&mut buf).unwrap();
        out.write_all(&buf).unwrap();
    }
    out.sync_all().unwrap();
}

/// `runc spec`, made non-interactive, with the same cgroup limits as the provider's runs.
fn runc_template(dir: &Path) -> serde_json::Value {
    let d = dir.join("template");
    fs::create_dir(&d).unwrap();
    let ok = Command::new("runc")
        .arg("spec")
        .current_dir(&d)
        .status()
        .unwrap();
    assert!(ok.success(), "runc spec failed");
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("config.json")).unwrap()).unwrap();
    v["process"]["terminal"] = false.into();
    v["process"]["args"] = serde_json::json!(["/bin/true"]);
    v["root"]["readonly"] = false.into();
    // A floor, not a twin: drop what the provider does not do either (the cgroup mount
    // binds every v1 hierarchy, a cost of its own).
    v["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/sys/fs/cgroup");
    v["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "cgroup");
    v["linux"]["resources"]["memory"] = serde_json::json!({"limit": MEMORY, "swap": MEMORY});
    v["linux"]["resources"]["pids"] = serde_json::json!({"limit": PIDS});
    v
}

/// The minimal hand-made cycle: overlay mount, `runc run`, umount, remove.
fn floor_cycle(root: &Path, image: &Path, template: &serde_json::Value, i: usize) -> f64 {
    let t = Instant::now();
    let job = root.join(format!("f{i}"));
    let (upper, work, merged) = (job.join("u"), job.join("w"), job.join("m"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap();
    let mut spec = template.clone();
    spec["root"]["path"] = merged.display().to_string().into();
    spec["linux"]["cgroupsPath"] = format!("/slate-floor/f{i}").into();
    fs::write(job.join("config.json"), spec.to_string()).unwrap();
    let status = Command::new("runc")
        .arg("--root")
        .arg(root.join(".runc"))
        .args(["run", "--bundle"])
        .arg(&job)
        .arg(format!("floor-{i}"))
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "floor runc run failed");
    umount2(&merged, MntFlags::empty()).unwrap();
    fs::remove_dir_all(&job).unwrap();
    t.elapsed().as_secs_f64() * 1000.0
}

fn bench_spec(image: &Path, agent: &Path, sock: &Path, n: i64) -> WorkerSpec {
    WorkerSpec {
        job_id: JobId(std::process::id() as i64 * 10_000_000 + n),
        pool: "bench".into(),
        image: image.to_path_buf(),
        source: None,
        agent_binary: agent.to_path_buf(),
        agent_socket: PathBuf::from(sock).join("agent.sock"),
        agent_token: Secret::new("bench"),
        limits: Limits {
            memory_bytes: Some(MEMORY),
            pids: Some(PIDS),
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

/// Time of `destroy` alone, for a worker whose agent is up and running.
async fn destroy_running(
    provider: &SandboxProvider,
    image: &Path,
    agent: &Path,
    sock: &Path,
    n: i64,
) -> f64 {
    let ready = sock.join("ready");
    let _ = fs::remove_file(&ready);
    let worker = provider
        .provision(bench_spec(image, agent, sock, n))
        .await
        .expect("provision");
    while !ready.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    provider.destroy(&worker.name).await.expect("destroy");
    t.elapsed().as_secs_f64() * 1000.0
}

async fn provider_cycle(
    provider: &SandboxProvider,
    image: &Path,
    agent: &Path,
    sock: &Path,
    n: i64,
) -> f64 {
    let spec = bench_spec(image, agent, sock, n);
    let t = Instant::now();
    let mut worker = provider.provision(spec).await.expect("provision");
    let code = *worker.exited.wait_for(|c| c.is_some()).await.unwrap();
    assert_eq!(
        code,
        Some(0),
        "agent failed: {}",
        fs::read_to_string(&worker.console_log).unwrap_or_default()
    );
    provider.destroy(&worker.name).await.expect("destroy");
    t.elapsed().as_secs_f64() * 1000.0
}
