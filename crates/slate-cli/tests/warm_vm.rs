//! Warm VM pools through the real server: with `warm = 1` a job starts on a VM that booted
//! before it was queued, every job still gets a fresh clone, and a `kill -9` of the server
//! leaves no warm VM behind once it restarts.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Live qemu processes whose command line names a path under `dir`.
fn qemu_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let dir = format!("{}/", dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.contains("qemu-system") && cmd.contains(&dir) && !zombie {
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

fn vm_dirs(s: &Slate) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.data.join("vm-workers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits until the server reports `n` idle warm VMs for the pool.
fn wait_warm(s: &Slate, n: usize) {
    let want = format!("slate_warm_vms{{pool=\"busybox\"}} {n}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if s.get_text("/metrics").lines().any(|l| l == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {want} within 180 s: {}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn terminal(s: &Slate, id: i64) -> serde_json::Value {
    s.wait_job(id, "terminal", Duration::from_secs(240), |v| {
        matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
        )
    })
}

/// Queued (job created) to its first step running, from the job's own record.
fn start_latency(job: &serde_json::Value) -> Duration {
    let t = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("{job}"))).unwrap()
    };
    let d = t(&job["steps"][0]["started_at"]) - t(&job["created_at"]);
    d.to_std().unwrap()
}

#[test]
fn warm_vms_start_jobs_at_once_are_fresh_each_time_and_survive_no_crash() {
    let images = tempfile::tempdir().unwrap();
    let vm = images.path().join("vm");
    slate_testkit::vm_image::vm_image(&vm).unwrap();
    let base_sum = slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap();
    let mut s = Slate::start(Options {
        steps: r#"{ name = "probe", run = "cat /etc/slate-vm-image; cat greeting.txt; cat /first-job 2>/dev/null || echo fresh-vm; echo mine > /first-job" },"#.into(),
        provider: "qemu".into(),
        image: Some(vm.clone()),
        pool_limits: r#"{ memory = "512MiB", timeout = "5m" }"#.into(),
        pool_extra: "warm = 1".into(),
        max_jobs: 1,
        ..Default::default()
    });
    wait_warm(&s, 1);
    // An idle warm VM is no job's: no job was queued, none is running.
    assert!(s.builds().is_empty());

    let mut latencies = Vec::new();
    for (n, branch) in [(1u64, "w1"), (2, "w2")] {
        wait_warm(&s, 1);
        let (base, head) = s.make_pr(n, branch, "greeting.txt", &format!("hello {branch}\n"));
        s.webhook(
            "pull_request",
            &format!("d-{n}"),
            &s.pr_event("opened", n, branch, &head, &base),
        );
        let j = terminal(&s, n as i64);
        let log = s.log(n as i64);
        assert_eq!(j["state"], "succeeded", "{log}");
        assert!(log.contains(slate_testkit::vm_image::MARKER), "{log}");
        assert!(log.contains(&format!("hello {branch}")), "{log}");
        // Each job on a fresh clone: the first job's file is not on the second's disk.
        assert!(log.contains("fresh-vm"), "{log}");
        assert!(!log.lines().any(|l| l == "mine"), "{log}");
        s.wait_status(&head, "success");
        latencies.push(start_latency(&j));
    }
    println!("queued to first step with a warm vm: {latencies:?}");
    for l in &latencies {
        assert!(
            *l < Duration::from_secs(1),
            "a job on a warm vm took {l:?} to start: {}",
            s.server_log()
        );
    }
    assert_eq!(
        slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap(),
        base_sum,
        "the base image changed"
    );

    // kill -9 with a warm VM idle: the restarted server destroys it and boots its own.
    wait_warm(&s, 1);
    let before = vm_dirs(&s);
    assert_eq!(before.len(), 1, "{before:?}");
    s.kill9();
    s.spawn();
    wait_warm(&s, 1);
    let after = vm_dirs(&s);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(before, after, "the old warm vm was kept");
    assert_eq!(qemu_under(&s.data).len(), 1, "{:?}", qemu_under(&s.data));
    assert!(s.server_log().contains("destroyed leftover warm vm"));

    // SIGTERM: the idle warm VM goes with the server.
    s.stop();
    assert!(s.leaks().is_empty(), "{:?}", s.leaks());
    assert!(qemu_under(&s.data).is_empty(), "{:?}", qemu_under(&s.data));
    assert!(vm_dirs(&s).is_empty(), "vm workers left: {:?}", vm_dirs(&s));
}
