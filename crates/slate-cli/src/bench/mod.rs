//! `slate bench`: sandbox cost against a hand-made floor, image-size independence,
//! webhook-to-status latency, webhook ingest throughput, and (on PostgreSQL) claim
//! throughput of two replicas and jobs per minute of one versus two, measured on this host.
//!
//! Everything runs in this process (the servers too, on 127.0.0.1:0) under a scratch
//! directory that is unmounted and removed at the end, and a scratch database that is
//! dropped. Needs root, `runc`, `git` and a static busybox, like the sandbox provider
//! itself (the claims section needs only PostgreSQL).

mod claims;
mod replicas;
mod scratch_db;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use slate_core::config::{Config, Limits, Network};
use slate_core::{JobId, Secret};
use slate_provider::{Provider, SandboxProvider, WorkerSpec};
use slate_store::Store;
use slate_testkit::github::{pr_payload, push_payload, sign, GithubRecorder};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MEMORY: u64 = 512 << 20;
const PIDS: u64 = 256;
const SECRET: &str = "slate-bench-secret";
const REPO: &str = "bench/trivial";

/// Targets from the design brief; a miss is reported, not an error.
const TARGET_PROVIDER_RATIO: f64 = 1.5;
const TARGET_IMAGE_RATIO_DEVIATION: f64 = 0.10;
const TARGET_STATUS_MEDIAN_MS: f64 = 250.0;
const TARGET_INGEST_RATE: f64 = 1000.0;
const TARGET_INGEST_P99_MS: f64 = 25.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    /// Sandbox provision+destroy against overlay + `runc run true` by hand.
    Provision,
    /// Provision+destroy on a small versus a big image.
    ImageSize,
    /// Webhook to final commit status for a trivial job.
    Status,
    /// Signed webhook deliveries per second and their ack latency.
    Ingest,
    /// PostgreSQL job claims per second across two replicas (no double claim).
    Claims,
    /// Jobs per minute of one versus two in-process servers sharing PostgreSQL.
    Replicas,
}

impl Section {
    /// Sections that mount overlays and run runc.
    fn needs_root(self) -> bool {
        matches!(
            self,
            Section::Provision | Section::ImageSize | Section::Status | Section::Replicas
        )
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Measured cycles per series (sandbox and webhook-to-status), after one warm-up.
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// The static `slate-agent` (built by scripts/build-agent.sh); default: next to `slate`.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Run only these sections (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Size of the small image in MB (busybox plus random data).
    #[arg(long, default_value_t = 200)]
    small_mb: u64,
    /// Size of the big image in MB.
    #[arg(long, default_value_t = 2048)]
    big_mb: u64,
    /// Scheduled webhook deliveries per second (open loop). Above the 1,000/s target
    /// because the achieved rate counts until the last response, so offering exactly
    /// 1,000/s always measures a hair under it.
    #[arg(long, default_value_t = 1100)]
    ingest_rate: u64,
    /// How long to sustain the ingest rate, in seconds.
    #[arg(long, default_value_t = 5)]
    ingest_secs: u64,
    /// Concurrent keep-alive HTTP clients driving the ingest.
    #[arg(long, default_value_t = 16)]
    ingest_clients: usize,
    /// Write each ingest request as a CSV line (index, scheduled offset, latency from
    /// schedule, latency from send, HTTP status; milliseconds) to find stalls in time.
    #[arg(long)]
    ingest_trace: Option<PathBuf>,
    /// Exit with status 2 when a target is missed.
    #[arg(long)]
    check: bool,
    /// PostgreSQL to make scratch databases in (claims section), as an admin URL whose
    /// role has CREATEDB; default: `SLATE_BENCH_DATABASE`, else scripts/postgres.sh's URL.
    #[arg(long)]
    database: Option<String>,
    /// Jobs pre-inserted per claims round.
    #[arg(long, default_value_t = 5000)]
    claim_jobs: usize,
    /// Pools the claims round's jobs are spread across.
    #[arg(long, default_value_t = 4)]
    claim_pools: usize,
    /// Concurrent claimers per replica (the claims section runs two replicas).
    #[arg(long, default_value_t = 4)]
    claimers: usize,
    /// Claims rounds, each on a fresh database; the median is reported.
    #[arg(long, default_value_t = 3)]
    claim_rounds: usize,
    /// Jobs submitted per replicas run (one, then two servers), after a warm-up.
    #[arg(long, default_value_t = 60)]
    replica_jobs: usize,
    /// `max_jobs` of each replica's sandbox pool in the replicas section.
    #[arg(long, default_value_t = 2)]
    replica_max_jobs: u32,
}

/// Distribution of one series, in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    n: usize,
    min: f64,
    median: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Summary {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            median: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Serialize)]
struct Machine {
    nproc: usize,
    kernel: String,
    cpu: String,
    os: String,
    date: String,
}

#[derive(Debug, Serialize)]
struct ProvisionReport {
    /// Overlay mount + `runc run` of `/bin/true` + umount + rmdir, by hand.
    floor_ms: Summary,
    /// `SandboxProvider::provision` (agent exits at once) + wait for exit + `destroy`.
    provider_ms: Summary,
    ratio: f64,
    target_max_ratio: f64,
    met: bool,
}

#[derive(Debug, Serialize)]
struct ImageReport {
    small_mb: u64,
    big_mb: u64,
    small_ms: Summary,
    big_ms: Summary,
    ratio: f64,
    target_max_deviation: f64,
    met: bool,
    build_seconds: f64,
}

#[derive(Debug, Serialize)]
struct StatusReport {
    /// From sending the webhook to the recorder holding the `success` status.
    total_ms: Summary,
    /// The webhook's own round trip (the 202).
    ack_ms: Summary,
    target_median_ms: f64,
    met: bool,
}

#[derive(Debug, Serialize)]
struct IngestReport {
    clients: usize,
    scheduled_rate: f64,
    scheduled: usize,
    duration_s: f64,
    achieved_rate: f64,
    accepted: usize,
    refused: usize,
    /// Latency from each request's scheduled send time to its response.
    latency_ms: Summary,
    /// Latency from the actual send to the response (no queueing in the client).
    service_ms: Summary,
    /// Events in the SQLite file after the server stopped.
    stored: u64,
    all_stored: bool,
    target_rate: f64,
    target_p99_ms: f64,
    met: bool,
}

/// A section that needs something the host may lack (PostgreSQL) is skipped, not failed.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Outcome<T> {
    Ran(T),
    Skipped { skipped: String },
}

impl<T> Outcome<T> {
    fn met(&self, f: impl Fn(&T) -> bool) -> bool {
        match self {
            Outcome::Ran(r) => f(r),
            Outcome::Skipped { .. } => true,
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    iterations: usize,
    provision: Option<ProvisionReport>,
    image_size: Option<ImageReport>,
    webhook_to_status: Option<StatusReport>,
    ingest: Option<IngestReport>,
    claims: Option<Outcome<claims::ClaimsReport>>,
    replicas: Option<Outcome<replicas::ReplicasReport>>,
}

impl Report {
    fn all_met(&self) -> bool {
        self.provision.as_ref().is_none_or(|r| r.met)
            && self.image_size.as_ref().is_none_or(|r| r.met)
            && self.webhook_to_status.as_ref().is_none_or(|r| r.met)
            && self.ingest.as_ref().is_none_or(|r| r.met)
            && self.claims.as_ref().is_none_or(|o| o.met(|r| r.met))
            && self
                .replicas
                .as_ref()
                .is_none_or(|o| o.met(|r| r.runs.iter().all(|x| x.all_once)))
    }
}

pub async fn run(args: BenchArgs) -> Result<i32> {
    ensure!(args.iterations > 0, "--iterations must be at least 1");
    ensure!(
        args.ingest_rate > 0 && args.ingest_secs > 0 && args.ingest_clients > 0,
        "--ingest-rate, --ingest-secs and --ingest-clients must be positive"
    );
    let wants = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let euid = std::fs::metadata("/proc/self")
        .context("reading /proc/self")?
        .uid();
    let all = <Section as clap::ValueEnum>::value_variants();
    if euid != 0 && all.iter().any(|s| s.needs_root() && wants(*s)) {
        bail!(
            "slate bench mounts overlays and runs runc: run it as root \
             (or use --only ingest,claims)"
        );
    }
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating the slate executable")?
            .with_file_name("slate-agent"),
    };
    if (wants(Section::Status) || wants(Section::Replicas)) && !agent.is_file() {
        bail!(
            "agent binary {} not found: run scripts/build-agent.sh or pass --agent",
            agent.display()
        );
    }

    let scratch = Scratch::new()?;
    let mut report = Report {
        machine: machine(),
        iterations: args.iterations,
        provision: None,
        image_size: None,
        webhook_to_status: None,
        ingest: None,
        claims: None,
        replicas: None,
    };

    // Every section but the claims one runs a sandbox or a server, which need an image.
    let small = scratch.path.join("image-small");
    let t = Instant::now();
    if all.iter().any(|s| *s != Section::Claims && wants(*s)) {
        progress(&format!("building the {} MB image", args.small_mb));
        make_image(&small, args.small_mb)?;
    }
    let small_build = t.elapsed();

    if wants(Section::Provision) || wants(Section::ImageSize) {
        let (prov, img) = bench_sandbox(&args, &scratch, &small, small_build, wants).await?;
        report.provision = prov;
        report.image_size = img;
    }
    if wants(Section::Status) {
        report.webhook_to_status = Some(bench_status(&args, &scratch, &small, &agent).await?);
    }
    if wants(Section::Ingest) {
        // The server insists on an agent and an image even when no job will run.
        let agent = if agent.is_file() {
            agent.clone()
        } else {
            let fake = scratch.path.join("no-agent");
            std::fs::write(&fake, "#!/bin/sh\nexit 1\n")?;
            fake
        };
        report.ingest = Some(bench_ingest(&args, &scratch, &small, &agent).await?);
    }
    let admin = scratch_db::admin_url(args.database.as_deref());
    if wants(Section::Claims) {
        report.claims = Some(match scratch_db::unreachable(&admin).await {
            Some(reason) => {
                progress(&format!("claims: skipped: {reason}"));
                Outcome::Skipped { skipped: reason }
            }
            None => {
                let p = claims::ClaimsParams {
                    jobs: args.claim_jobs,
                    pools: args.claim_pools,
                    claimers: args.claimers,
                    rounds: args.claim_rounds,
                };
                Outcome::Ran(claims::bench_claims(&admin, &p).await?)
            }
        });
    }
    if wants(Section::Replicas) {
        report.replicas = Some(match scratch_db::unreachable(&admin).await {
            Some(reason) => {
                progress(&format!("replicas: skipped: {reason}"));
                Outcome::Skipped { skipped: reason }
            }
            None => {
                let p = replicas::ReplicasParams {
                    jobs: args.replica_jobs,
                    max_jobs: args.replica_max_jobs,
                };
                let dir = scratch.path.join("replicas");
                Outcome::Ran(replicas::bench_replicas(&admin, &p, &dir, &small, &agent).await?)
            }
        });
    }
    drop(scratch);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if args.check && !report.all_met() {
        2
    } else {
        0
    })
}

pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu,
        os,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
    }
}

/// The bench's working directory; on drop, anything still mounted under it is detached
/// (a failed run must not leave overlays behind) and the tree is removed.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("slate-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        // mountinfo shows resolved paths.
        let path = path.canonicalize()?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut mounts: Vec<PathBuf> = slate_testkit::leaks::mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&self.path))
            .collect();
        mounts.sort();
        for m in mounts.iter().rev() {
            let _ = sys::umount(m, true);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("bench: could not remove {}: {e}", self.path.display());
        }
    }
}

/// The two mount calls the floor needs. Declared by hand against the C library `std`
/// already links, so the CLI crate needs no extra dependency for them.
mod sys {
    use std::ffi::{c_char, c_int, c_ulong, c_void, CString};
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    extern "C" {
        fn mount(
            source: *const c_char,
            target: *const c_char,
            fstype: *const c_char,
            flags: c_ulong,
            data: *const c_void,
        ) -> c_int;
        fn umount2(target: *const c_char, flags: c_int) -> c_int;
    }

    const MNT_DETACH: c_int = 2;

    fn cstr(p: &Path) -> io::Result<CString> {
        CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
    }

    pub fn mount_overlay(target: &Path, options: &str) -> io::Result<()> {
        let overlay = c"overlay";
        let target = cstr(target)?;
        let data = CString::new(options).map_err(io::Error::other)?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            mount(
                overlay.as_ptr(),
                target.as_ptr(),
                overlay.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn umount(target: &Path, detach: bool) -> io::Result<()> {
        let target = cstr(target)?;
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        let rc = unsafe { umount2(target.as_ptr(), if detach { MNT_DETACH } else { 0 }) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A busybox rootfs plus one file of random data (incompressible, so no filesystem can
/// make it cheap), to `total_mb` in all.
fn make_image(dir: &Path, total_mb: u64) -> Result<()> {
    slate_testkit::image::busybox_rootfs(dir).context("busybox rootfs")?;
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let mut out = std::fs::File::create(data.join("random.bin"))?;
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; 4 << 20];
    let busybox_mb = std::fs::metadata(dir.join("bin/busybox"))?.len() >> 20;
    for _ in 0..(total_mb.saturating_sub(busybox_mb) / 4) {
        urandom.read_exact(&mut buf)?;
        out.write_all(&buf)?;
    }
    out.sync_all()?;
    Ok(())
}

async fn bench_sandbox(
    args: &BenchArgs,
    scratch: &Scratch,
    small: &Path,
    small_build: Duration,
    wants: impl Fn(Section) -> bool,
) -> Result<(Option<ProvisionReport>, Option<ImageReport>)> {
    let (do_floor, do_big) = (wants(Section::Provision), wants(Section::ImageSize));
    let dir = &scratch.path;
    let big = dir.join("image-big");
    let mut build = small_build;
    if do_big {
        progress(&format!("building the {} MB image", args.big_mb));
        let t = Instant::now();
        make_image(&big, args.big_mb)?;
        build += t.elapsed();
    }

    let agent = dir.join("exit-agent.sh");
    std::fs::write(&agent, "#!/bin/sh\nexit 0\n")?;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
    let sock = dir.join("sock");
    std::fs::create_dir_all(&sock)?;
    let template = runc_template(dir)?;
    let workers = dir.join("workers");
    let provider = SandboxProvider::new(workers.clone());
    let floor_root = dir.join("floor");
    std::fs::create_dir_all(&floor_root)?;
    let cgroup = format!("slate-bench-floor-{}", std::process::id());

    let result = async {
        let (mut floor, mut prov_small, mut prov_big) = (Vec::new(), Vec::new(), Vec::new());
        // Warm up once each (page cache, binaries), then interleave the series so any
        // drift in the shared machine's load hits all of them alike.
        progress("sandbox warm-up");
        if do_floor {
            floor_cycle(&floor_root, small, &template, &cgroup, 0).await?;
        }
        provider_cycle(&provider, small, &agent, &sock, 0).await?;
        if do_big {
            provider_cycle(&provider, &big, &agent, &sock, 1).await?;
        }
        progress(&format!("sandbox: {} cycles per series", args.iterations));
        for i in 1..=args.iterations {
            if do_floor {
                floor.push(floor_cycle(&floor_root, small, &template, &cgroup, i).await?);
            }
            prov_small.push(provider_cycle(&provider, small, &agent, &sock, 2 * i as i64).await?);
            if do_big {
                prov_big
                    .push(provider_cycle(&provider, &big, &agent, &sock, 2 * i as i64 + 1).await?);
            }
        }
        anyhow::Ok((floor, prov_small, prov_big))
    }
    .await;
    // runc removes each floor container's cgroup on exit; the parent it made is ours to
    // remove, as is the provider's per-root parent.
    let scope = slate_testkit::leaks::cgroup_scope(&workers);
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in rd.flatten() {
            let _ = std::fs::remove_dir(h.path().join(&cgroup));
            let _ = std::fs::remove_dir(h.path().join(&scope));
        }
    }
    let (floor, prov_small, prov_big) = result?;

    let small_s = Summary::of(&prov_small);
    let provision = do_floor.then(|| {
        let floor_s = Summary::of(&floor);
        let ratio = small_s.median / floor_s.median;
        ProvisionReport {
            floor_ms: floor_s,
            provider_ms: small_s.clone(),
            ratio,
            target_max_ratio: TARGET_PROVIDER_RATIO,
            met: ratio <= TARGET_PROVIDER_RATIO,
        }
    });
    let image = do_big.then(|| {
        let big_s = Summary::of(&prov_big);
        let ratio = big_s.median / small_s.median;
        ImageReport {
            small_mb: args.small_mb,
            big_mb: args.big_mb,
            small_ms: small_s.clone(),
            big_ms: big_s,
            ratio,
            target_max_deviation: TARGET_IMAGE_RATIO_DEVIATION,
            met: (ratio - 1.0).abs() <= TARGET_IMAGE_RATIO_DEVIATION,
            build_seconds: build.as_secs_f64(),
        }
    });
    Ok((provision, image))
}

/// `runc spec`, made non-interactive, with the same cgroup limits as the provider's runs.
fn runc_template(dir: &Path) -> Result<serde_json::Value> {
    let d = dir.join("template");
    std::fs::create_dir_all(&d)?;
    let ok = std::process::Command::new("runc")
        .arg("spec")
        .current_dir(&d)
        .status()
        .context("running runc spec")?;
    ensure!(ok.success(), "runc spec failed");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("config.json"))?)?;
    v["process"]["terminal"] = false.into();
    v["process"]["args"] = serde_json::json!(["/bin/true"]);
    v["root"]["readonly"] = false.into();
    // A floor, not a twin: drop what the provider does not do either (the cgroup mount
    // binds every v1 hierarchy, a cost of its own).
    if let Some(m) = v["mounts"].as_array_mut() {
        m.retain(|m| m["destination"] != "/sys/fs/cgroup");
    }
    if let Some(n) = v["linux"]["namespaces"].as_array_mut() {
        n.retain(|n| n["type"] != "cgroup");
    }
    v["linux"]["resources"]["memory"] = serde_json::json!({"limit": MEMORY, "swap": MEMORY});
    v["linux"]["resources"]["pids"] = serde_json::json!({"limit": PIDS});
    Ok(v)
}

/// The minimal hand-made cycle: overlay mount, `runc run`, umount, remove.
async fn floor_cycle(
    root: &Path,
    image: &Path,
    template: &serde_json::Value,
    cgroup: &str,
    i: usize,
) -> Result<f64> {
    let t = Instant::now();
    let job = root.join(format!("f{i}"));
    let (upper, work, merged) = (job.join("u"), job.join("w"), job.join("m"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        upper.display(),
        work.display()
    );
    sys::mount_overlay(&merged, &data).context("floor overlay mount")?;
    let mut spec = template.clone();
    spec["root"]["path"] = merged.display().to_string().into();
    spec["linux"]["cgroupsPath"] = format!("/{cgroup}/f{i}").into();
    std::fs::write(job.join("config.json"), spec.to_string())?;
    let status = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(root.join(".runc"))
        .args(["run", "--bundle"])
        .arg(&job)
        .arg(format!("slate-bench-floor-{}-{i}", std::process::id()))
        .stdin(Stdio::null())
        .status()
        .await
        .context("running runc")?;
    let unmounted = sys::umount(&merged, false);
    ensure!(status.success(), "floor runc run failed: {status}");
    unmounted.context("floor umount")?;
    std::fs::remove_dir_all(&job)?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn bench_spec(image: &Path, agent: &Path, sock: &Path, n: i64) -> WorkerSpec {
    WorkerSpec {
        // Unlikely to meet a real job's id, should a server share the host.
        job_id: JobId(std::process::id() as i64 * 10_000_000 + n),
        pool: "bench".into(),
        image: image.to_path_buf(),
        source: None,
        agent_binary: agent.to_path_buf(),
        agent_socket: sock.join("agent.sock"),
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

async fn provider_cycle(
    provider: &SandboxProvider,
    image: &Path,
    agent: &Path,
    sock: &Path,
    n: i64,
) -> Result<f64> {
    let spec = bench_spec(image, agent, sock, n);
    let t = Instant::now();
    let mut worker = provider.provision(spec).await.context("provision")?;
    let code = *worker
        .exited
        .wait_for(|c| c.is_some())
        .await
        .context("waiting for the worker to exit")?;
    let destroyed = provider.destroy(&worker.name).await;
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        code == Some(0),
        "the worker's agent failed ({code:?}): {}",
        std::fs::read_to_string(&worker.console_log).unwrap_or_default()
    );
    destroyed.context("destroy")?;
    Ok(elapsed)
}

async fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "slate bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.com")
        .env("GIT_COMMITTER_NAME", "slate bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.com")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A local git "remote" with a `main` branch, and a working copy to make PRs from.
struct Remote {
    bare: PathBuf,
    work: PathBuf,
}

impl Remote {
    async fn create(dir: &Path) -> Result<Remote> {
        let bare = dir.join("remote.git");
        let work = dir.join("work");
        std::fs::create_dir_all(&work)?;
        let bare_s = bare.to_str().context("non-UTF-8 scratch path")?;
        git(dir, &["init", "-q", "--bare", "-b", "main", bare_s]).await?;
        git(&work, &["init", "-q", "-b", "main"]).await?;
        std::fs::write(work.join("README"), "slate bench\n")?;
        git(&work, &["add", "-A"]).await?;
        git(&work, &["commit", "-qm", "initial"]).await?;
        git(&work, &["push", "-q", bare_s, "main"]).await?;
        Ok(Remote { bare, work })
    }

    /// Commit on a new branch and publish it as `refs/pull/N/head`; returns (base, head).
    async fn make_pr(&self, number: u64) -> Result<(String, String)> {
        let w = &self.work;
        let base = git(w, &["rev-parse", "main"]).await?;
        let branch = format!("pr-{number}");
        git(w, &["checkout", "-q", "-B", &branch, "main"]).await?;
        std::fs::write(w.join("change.txt"), format!("change {number}\n"))?;
        git(w, &["add", "-A"]).await?;
        git(w, &["commit", "-qm", &format!("change {number}")]).await?;
        let head = git(w, &["rev-parse", "HEAD"]).await?;
        let bare = self.bare.to_str().context("non-UTF-8 scratch path")?;
        git(
            w,
            &[
                "push",
                "-qf",
                bare,
                &format!("{branch}:refs/pull/{number}/head"),
            ],
        )
        .await?;
        git(w, &["checkout", "-q", "main"]).await?;
        Ok((base, head))
    }
}

/// A slate server in this process on 127.0.0.1:0, with its own data directory.
struct Server {
    app: Arc<slate_server::App>,
    url: String,
    data: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(
        dir: &Path,
        image: &Path,
        agent: &Path,
        remote: &Path,
        github_api: &str,
    ) -> Result<Server> {
        Self::start_with(dir, image, agent, remote, github_api, "", 2).await
    }

    /// [`Server::start`] with more `[server]` lines (`server_extra`: database, replica
    /// id) and the sandbox pool's `max_jobs`.
    async fn start_with(
        dir: &Path,
        image: &Path,
        agent: &Path,
        remote: &Path,
        github_api: &str,
        server_extra: &str,
        max_jobs: u32,
    ) -> Result<Server> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let secret = dir.join("webhook-secret");
        std::fs::write(&secret, SECRET)?;
        let token = dir.join("token");
        std::fs::write(&token, "ghp_benchtoken")?;
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
{server_extra}
[github]
api_url = "{github_api}"
webhook_secret_file = "{secret}"
token_file = "{token}"

[[repo]]
name = "{REPO}"
url = "{remote}"
pipeline = "trivial"
branches = ["main"]

[[pool]]
name = "busybox"
provider = "sandbox"
image = "{image}"
max_jobs = {max_jobs}
limits = {{ memory = "256MiB", pids = 256, timeout = "2m" }}

[[pipeline]]
name = "trivial"
pools = ["busybox"]
steps = [{{ name = "true", run = "true" }}]
"#,
            data = data.display(),
            secret = secret.display(),
            token = token.display(),
            remote = remote.display(),
            image = image.display(),
        );
        let config = Config::parse(&text, "bench.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = slate_server::App::build(
            config,
            slate_server::AppOptions {
                agent_binary: Some(agent.to_path_buf()),
                bound_addr: Some(addr),
                ..Default::default()
            },
        )
        .await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(slate_server::start(app.clone(), listener, async move {
            let _ = stopped.await;
        }));
        let url = format!("http://{addr}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Recovery runs before the listener serves.
        while http.get(format!("{url}/healthz")).send().await.is_err() {
            ensure!(Instant::now() < deadline, "the bench server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Server {
            app,
            url,
            data,
            stop,
            task,
        })
    }

    /// Stop the server and wait for its shutdown (workers destroyed, statuses flushed).
    async fn stop(self) -> Result<PathBuf> {
        let _ = self.stop.send(());
        self.task.await??;
        let workers = self.data.join("workers");
        drop(self.app);
        let scope = slate_testkit::leaks::cgroup_scope(&workers);
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&scope));
            }
        }
        Ok(self.data)
    }
}

fn signed_post(
    http: &reqwest::Client,
    url: &str,
    event: &str,
    delivery: &str,
    body: &'static [u8],
    signature: &str,
) -> reqwest::RequestBuilder {
    http.post(format!("{url}/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", signature)
        .body(body)
}

async fn bench_status(
    args: &BenchArgs,
    scratch: &Scratch,
    image: &Path,
    agent: &Path,
) -> Result<StatusReport> {
    let dir = scratch.path.join("status");
    std::fs::create_dir_all(&dir)?;
    let remote = Remote::create(&dir).await?;
    let github = GithubRecorder::start();
    let server = Server::start(&dir, image, agent, &remote.bare, &github.url()).await?;
    let result = status_iterations(args, &server, &remote, &github).await;
    server.stop().await?;
    let (total, ack) = result?;
    let total_ms = Summary::of(&total);
    Ok(StatusReport {
        met: total_ms.median < TARGET_STATUS_MEDIAN_MS,
        total_ms,
        ack_ms: Summary::of(&ack),
        target_median_ms: TARGET_STATUS_MEDIAN_MS,
    })
}

async fn status_iterations(
    args: &BenchArgs,
    server: &Server,
    remote: &Remote,
    github: &GithubRecorder,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let (mut total, mut ack) = (Vec::new(), Vec::new());
    progress(&format!(
        "webhook to status: 1 warm-up + {} pull requests",
        args.iterations
    ));
    // The first one also clones the server's git mirror: a warm-up, not counted.
    for n in 0..=args.iterations as u64 {
        let number = n + 1;
        let (base, head) = remote.make_pr(number).await?;
        let body: &'static [u8] = Box::leak(
            pr_payload(
                "opened",
                REPO,
                &format!("https://github.com/{REPO}.git"),
                number,
                &head,
                &format!("pr-{number}"),
                &base,
                "main",
            )
            .into_boxed_slice(),
        );
        let sig = sign(SECRET, body);
        let t = Instant::now();
        let resp = signed_post(
            &http,
            &server.url,
            "pull_request",
            &format!("bench-pr-{number}"),
            body,
            &sig,
        )
        .send()
        .await?;
        let acked = t.elapsed();
        ensure!(
            resp.status() == reqwest::StatusCode::ACCEPTED,
            "webhook answered {}",
            resp.status()
        );
        let deadline = t + Duration::from_secs(60);
        loop {
            let statuses = github.statuses();
            let mine = statuses.iter().filter(|s| s.sha == head);
            if let Some(s) = mine
                .clone()
                .find(|s| s.state == "failure" || s.state == "error")
            {
                bail!("PR {number} ended {}: {:?}", s.state, s.description);
            }
            if mine.clone().any(|s| s.state == "success") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no success status for PR {number} within 60 s: {statuses:?}"
            );
            // Polling at 1 ms bounds the measurement error well below the figure.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = t.elapsed();
        if n > 0 {
            total.push(elapsed.as_secs_f64() * 1000.0);
            ack.push(acked.as_secs_f64() * 1000.0);
        }
        // Iterations stay independent: the runner has finished before the next webhook.
        while !server.app.running.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((total, ack))
}

/// One ingest request's outcome.
struct Sent {
    index: usize,
    status: u16,
    /// From the scheduled send time to the response.
    latency_ms: f64,
    /// From the actual send to the response.
    service_ms: f64,
    done: Instant,
}

async fn bench_ingest(
    args: &BenchArgs,
    scratch: &Scratch,
    image: &Path,
    agent: &Path,
) -> Result<IngestReport> {
    let dir = scratch.path.join("ingest");
    std::fs::create_dir_all(&dir)?;
    let remote = Remote::create(&dir).await?;
    let github = GithubRecorder::start();
    let server = Server::start(&dir, image, agent, &remote.bare, &github.url()).await?;
    let url = server.url.clone();

    // A push to a branch the repo does not build: stored and processed like any event,
    // but no job starts, so only ingest is measured. The body is the same each time;
    // GitHub's delivery id (a header) is what makes each delivery unique.
    let body: &'static [u8] = Box::leak(
        push_payload(
            REPO,
            &format!("https://github.com/{REPO}.git"),
            "feature/not-built",
            "0123456789abcdef0123456789abcdef01234567",
            "89abcdef0123456789abcdef0123456789abcdef",
        )
        .into_boxed_slice(),
    );
    let sig: Arc<str> = sign(SECRET, body).into();
    let total = (args.ingest_rate * args.ingest_secs) as usize;
    let clients = args.ingest_clients;
    let interval_ns = 1e9 / args.ingest_rate as f64;
    progress(&format!(
        "ingest: {total} deliveries at {}/s over {clients} keep-alive clients",
        args.ingest_rate
    ));

    let mut https = Vec::new();
    for _ in 0..clients {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(30))
            .build()?;
        // Open the keep-alive connection before the clock starts.
        http.get(format!("{url}/healthz"))
            .send()
            .await?
            .bytes()
            .await?;
        https.push(http);
    }
    let run_id = format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for (k, http) in https.into_iter().enumerate() {
        let (url, sig, run_id) = (url.clone(), sig.clone(), run_id.clone());
        // Client k owns deliveries k, k+clients, …: each waits for its scheduled time,
        // or sends at once when behind, and latency counts from the schedule, so a slow
        // server shows as latency instead of silently lowering the offered rate.
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(total / clients + 1);
            for i in (k..total).step_by(clients) {
                let scheduled = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                tokio::time::sleep_until(scheduled.into()).await;
                let sent = Instant::now();
                let delivery = format!("bench-{run_id}-{i}");
                let status = match signed_post(&http, &url, "push", &delivery, body, &sig)
                    .send()
                    .await
                {
                    Ok(resp) => {
                        let s = resp.status().as_u16();
                        // Read the body so the connection goes back to the pool.
                        let _ = resp.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                let done = Instant::now();
                out.push(Sent {
                    index: i,
                    status,
                    latency_ms: done.saturating_duration_since(scheduled).as_secs_f64() * 1e3,
                    service_ms: (done - sent).as_secs_f64() * 1e3,
                    done,
                });
            }
            out
        }));
    }
    let mut sent = Vec::with_capacity(total);
    for t in tasks {
        sent.extend(t.await?);
    }
    let data = server.stop().await?;
    if let Some(path) = &args.ingest_trace {
        sent.sort_by_key(|s| s.index);
        let mut csv = String::from("index,scheduled_ms,latency_ms,service_ms,status\n");
        for s in &sent {
            csv.push_str(&format!(
                "{},{:.3},{:.3},{:.3},{}\n",
                s.index,
                s.index as f64 * interval_ns / 1e6,
                s.latency_ms,
                s.service_ms,
                s.status
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }

    let accepted = sent.iter().filter(|s| s.status == 202).count();
    let refused = sent.len() - accepted;
    let last = sent.iter().map(|s| s.done).max().unwrap_or(start);
    let duration_s = (last - start).as_secs_f64();
    let achieved_rate = accepted as f64 / duration_s;
    let latency: Vec<f64> = sent.iter().map(|s| s.latency_ms).collect();
    let service: Vec<f64> = sent.iter().map(|s| s.service_ms).collect();
    let latency_ms = Summary::of(&latency);

    // Durable before acknowledged: every 202 must be a row in the file.
    let store = slate_store::SqliteStore::open(&data.join("slate.db")).await?;
    let stored = store.count_events().await?;
    store.close().await;
    let all_stored = stored == accepted as u64 && refused == 0;

    Ok(IngestReport {
        clients,
        scheduled_rate: args.ingest_rate as f64,
        scheduled: total,
        duration_s,
        achieved_rate,
        accepted,
        refused,
        met: achieved_rate >= TARGET_INGEST_RATE
            && latency_ms.p99 < TARGET_INGEST_P99_MS
            && all_stored,
        latency_ms,
        service_ms: Summary::of(&service),
        stored,
        all_stored,
        target_rate: TARGET_INGEST_RATE,
        target_p99_ms: TARGET_INGEST_P99_MS,
    })
}

fn print_table(r: &Report) {
    let m = &r.machine;
    println!(
        "slate bench: {} CPUs ({}), Linux {}, {}, {}",
        m.nproc, m.cpu, m.kernel, m.os, m.date
    );
    println!(
        "{} measured iterations per series; nearest-rank percentiles\n",
        r.iterations
    );
    let mut rows: Vec<[String; 4]> = Vec::new();
    let met = |ok: bool| if ok { "met" } else { "MISSED" }.to_string();
    let ms = |s: &Summary| format!("median {:.1} ms, p90 {:.1} ms", s.median, s.p90);
    if let Some(p) = &r.provision {
        rows.push([
            "floor: overlay + runc run true + umount".into(),
            ms(&p.floor_ms),
            String::new(),
            String::new(),
        ]);
        rows.push([
            "provider provision + destroy".into(),
            ms(&p.provider_ms),
            String::new(),
            String::new(),
        ]);
        rows.push([
            "  ratio provider / floor (medians)".into(),
            format!("{:.2}", p.ratio),
            format!("<= {:.2}", p.target_max_ratio),
            met(p.met),
        ]);
    }
    if let Some(i) = &r.image_size {
        rows.push([
            format!("provision + destroy, {} MB image", i.small_mb),
            ms(&i.small_ms),
            String::new(),
            String::new(),
        ]);
        rows.push([
            format!("provision + destroy, {} MB image", i.big_mb),
            ms(&i.big_ms),
            String::new(),
            String::new(),
        ]);
        rows.push([
            "  ratio big / small (medians)".into(),
            format!("{:.2}", i.ratio),
            format!("1 +/- {:.2}", i.target_max_deviation),
            met(i.met),
        ]);
    }
    if let Some(s) = &r.webhook_to_status {
        rows.push([
            "webhook ack (202)".into(),
            ms(&s.ack_ms),
            String::new(),
            String::new(),
        ]);
        rows.push([
            "webhook -> success status, `true` job".into(),
            ms(&s.total_ms),
            format!("median < {:.0} ms", s.target_median_ms),
            met(s.met),
        ]);
    }
    if let Some(g) = &r.ingest {
        rows.push([
            format!(
                "ingest: {} scheduled at {:.0}/s, {} clients",
                g.scheduled, g.scheduled_rate, g.clients
            ),
            format!(
                "{:.0}/s achieved over {:.2} s",
                g.achieved_rate, g.duration_s
            ),
            format!(">= {:.0}/s", g.target_rate),
            met(g.achieved_rate >= g.target_rate),
        ]);
        rows.push([
            "  ack latency from scheduled time".into(),
            format!(
                "p50 {:.2} / p99 {:.2} / max {:.2} ms",
                g.latency_ms.median, g.latency_ms.p99, g.latency_ms.max
            ),
            format!("p99 < {:.0} ms", g.target_p99_ms),
            met(g.latency_ms.p99 < g.target_p99_ms),
        ]);
        rows.push([
            "  ack latency from actual send".into(),
            format!(
                "p50 {:.2} / p99 {:.2} / max {:.2} ms",
                g.service_ms.median, g.service_ms.p99, g.service_ms.max
            ),
            String::new(),
            String::new(),
        ]);
        rows.push([
            "  202s / stored rows after stop".into(),
            format!("{} / {} ({} refused)", g.accepted, g.stored, g.refused),
            "all stored".into(),
            met(g.all_stored),
        ]);
    }
    match &r.claims {
        Some(Outcome::Skipped { skipped }) => {
            rows.push([
                "claims: skipped".into(),
                skipped.clone(),
                String::new(),
                String::new(),
            ]);
        }
        Some(Outcome::Ran(c)) => {
            let each: Vec<String> = c
                .rounds
                .iter()
                .map(|r| format!("{:.0}", r.claims_per_s))
                .collect();
            rows.push([
                format!(
                    "claims: {} jobs, {} pools, 2 replicas x {} claimers",
                    c.jobs, c.pools, c.claimers_per_replica
                ),
                format!(
                    "median {:.0}/s (rounds {}/s), split {} / {}",
                    c.claims_per_s,
                    each.join(", "),
                    c.per_replica[0],
                    c.per_replica[1]
                ),
                format!(">= {:.0}/s", c.target_claims_per_s),
                met(c.claims_per_s >= c.target_claims_per_s),
            ]);
            rows.push([
                "  one claim's latency".into(),
                ms(&c.claim_ms),
                String::new(),
                String::new(),
            ]);
            rows.push([
                "  double claims / unclaimed / db agrees".into(),
                format!("{} / {} / {}", c.double_claims, c.unclaimed, c.db_verified),
                "0 / 0 / true".into(),
                met(c.double_claims == 0 && c.unclaimed == 0 && c.db_verified),
            ]);
        }
        None => {}
    }
    match &r.replicas {
        Some(Outcome::Skipped { skipped }) => {
            rows.push([
                "replicas: skipped".into(),
                skipped.clone(),
                String::new(),
                String::new(),
            ]);
        }
        Some(Outcome::Ran(x)) => {
            for run in &x.runs {
                let split: Vec<String> = run.per_replica.iter().map(|n| n.to_string()).collect();
                rows.push([
                    format!(
                        "{} replica(s) x max_jobs {}, {} `true` jobs",
                        run.replicas, x.max_jobs_per_replica, run.jobs
                    ),
                    format!(
                        "{:.0} jobs/min ({:.1} s), split {}",
                        run.jobs_per_min,
                        run.seconds,
                        split.join(" / ")
                    ),
                    "each once".into(),
                    met(run.all_once),
                ]);
                rows.push([
                    "  host CPU busy / CPU s per job (slate, children, postgres)".into(),
                    format!(
                        "{:.0} % / {:.3}, {:.3}, {:.3} s; load {:.1}",
                        run.host_cpu_busy * 100.0,
                        run.cpu_s_per_job_self,
                        run.cpu_s_per_job_children,
                        run.cpu_s_per_job_postgres,
                        run.loadavg_1m
                    ),
                    String::new(),
                    String::new(),
                ]);
                rows.push([
                    "  submits: mean round trip / last one back".into(),
                    format!("{:.1} ms / {:.2} s", run.submit_ms_mean, run.submits_done_s),
                    String::new(),
                    String::new(),
                ]);
                rows.push([
                    "  mean created -> running (db)".into(),
                    format!("{:.1} ms", run.created_to_running_ms_mean),
                    String::new(),
                    String::new(),
                ]);
                rows.push([
                    "  mean provision / job (metrics) / running (db)".into(),
                    format!(
                        "{:.1} ms / {:.1} ms / {:.1} ms",
                        run.provision_ms_mean, run.job_ms_mean, run.running_ms_mean
                    ),
                    String::new(),
                    String::new(),
                ]);
            }
            rows.push([
                "  two replicas over one".into(),
                format!("{:.2}x", x.speedup),
                String::new(),
                String::new(),
            ]);
        }
        None => {}
    }
    let header = [
        "figure".to_string(),
        "value".into(),
        "target".into(),
        "".into(),
    ];
    let widths: Vec<usize> = (0..4)
        .map(|c| {
            rows.iter()
                .chain(std::iter::once(&header))
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
