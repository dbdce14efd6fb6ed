//! Hostile builds: a job's code tries to harm the host, the server or other jobs. The
//! host and a concurrent normal job must be unaffected, and the server keeps serving.

mod common;

use common::*;
use std::time::Duration;

/// A pipeline whose single step is `script`; returns the finished job.
fn run_hostile(s: &Slate, pr: u64, script: &str) -> serde_json::Value {
    std::fs::write(s.work.join("hostile.sh"), script).unwrap();
    let (base, head) = s.make_pr(pr, &format!("h{pr}"), "hostile.sh", script);
    s.webhook(
        "pull_request",
        &format!("d-{pr}"),
        &s.pr_event("opened", pr, &format!("h{pr}"), &head, &base),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let id = loop {
        let builds = s.get(&format!("/api/v1/builds?pr={pr}"));
        if let Some(id) = builds[0]["jobs"][0]["id"].as_i64() {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no build for PR {pr}: {}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    s.wait_terminal(id)
}

fn hostile_slate() -> Slate {
    Slate::start(Options {
        steps: r#"{ name = "hostile", run = "sh hostile.sh", timeout = "60s" },"#.into(),
        pool_limits: r#"{ memory = "128MiB", pids = 64, timeout = "90s", log = "1MiB" }"#.into(),
        max_jobs: 2,
        ..Default::default()
    })
}

#[test]
fn fork_bomb_is_contained_and_a_concurrent_job_is_unaffected() {
    let s = hostile_slate();
    // A normal job runs alongside the bomb.
    std::fs::write(s.work.join("hostile.sh"), "echo normal-ok\n").unwrap();
    let (b0, h0) = s.make_pr(1, "normal", "hostile.sh", "sleep 3; echo normal-ok\n");
    s.webhook(
        "pull_request",
        "d-normal",
        &s.pr_event("opened", 1, "normal", &h0, &b0),
    );
    let bomb = "bomb() { bomb | bomb & }; bomb; sleep 5; echo survived\n";
    let (b1, h1) = s.make_pr(2, "bomb", "hostile.sh", bomb);
    s.webhook(
        "pull_request",
        "d-bomb",
        &s.pr_event("opened", 2, "bomb", &h1, &b1),
    );
    let normal = s.wait_terminal(1);
    assert_eq!(normal["state"], "succeeded", "{}", s.log(1));
    assert!(s.log(1).contains("normal-ok"));
    let j = s.wait_terminal(2);
    // Whatever the bomb's step did, it is over and nothing of it is left.
    assert!(j["state"].is_string());
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn memory_bomb_is_killed_by_the_memory_limit() {
    let s = hostile_slate();
    // Grow a shell variable far beyond 128 MiB.
    let j = run_hostile(&s, 1, "x=0123456789abcdef; while true; do x=$x$x; done\n");
    assert_eq!(
        j["state"],
        "failed",
        "{j:#}\n{}",
        s.log(j["id"].as_i64().unwrap())
    );
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    s.shutdown_clean();
}

#[test]
fn privileged_operations_are_refused() {
    let s = hostile_slate();
    let script = r#"
fail=0
# Patterns are written so they never match the checking command's own argv.
check() { if eval "$2" >/dev/null 2>&1; then echo "ALLOWED: $1"; fail=1; else echo "refused: $1"; fi; }
check mount 'mount -t tmpfs none /mnt'
check remount-root 'mount -o remount,rw /proc/sys'
check sysrq 'echo h > /proc/sysrq-trigger'
cap=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
check cap-sys-module '[ $(( 0x$cap >> 16 & 1 )) = 1 ]'
check cap-sys-admin '[ $(( 0x$cap >> 21 & 1 )) = 1 ]'
check cap-sys-ptrace '[ $(( 0x$cap >> 19 & 1 )) = 1 ]'
check cap-net-raw '[ $(( 0x$cap >> 13 & 1 )) = 1 ]'
check module 'insmod /lib/modules/x.ko'
check new-privileges '[ "$(sed -n "s/^NoNewPrivs:[[:space:]]*//p" /proc/self/status)" != 1 ]'
check kernel-write 'echo 1 > /proc/sys/kernel/panic'
check raw-socket 'ping -c1 -W1 127.0.0.1'
check mknod 'mknod /tmp/sda b 8 0 && head -c1 /tmp/sda'
check see-host-processes 'cat /proc/[0-9]*/cmdline | tr "\\0" " " | grep -q "slate[ ]serve"'
check ptrace-pid1 '[ -r /proc/1/mem ] && head -c1 /proc/1/mem'
exit $fail
"#;
    let j = run_hostile(&s, 1, script);
    let log = s.log(j["id"].as_i64().unwrap());
    assert!(!log.contains("ALLOWED"), "{log}");
    assert_eq!(j["state"], "succeeded", "{log}");
    s.shutdown_clean();
}

#[test]
fn the_network_is_none_the_server_and_host_are_unreachable() {
    let s = hostile_slate();
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let host_ip = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("10.0.0.1")
                .to_string()
        })
        .unwrap_or_else(|_| "10.0.0.1".into());
    let script = format!(
        r#"
fail=0
try() {{ if wget -q -T 2 -O /tmp/out "$2" 2>/dev/null; then echo "REACHED: $1"; fail=1; else echo "unreachable: $1"; fi; }}
try server-loopback http://127.0.0.1:{port}/healthz
try server-host-ip http://{host_ip}:{port}/healthz
try private-range http://10.0.2.2/
try metadata http://169.254.169.254/
cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /tmp/ifs
[ "$(cat /tmp/ifs)" = "lo" ] || {{ echo "interfaces: $(cat /tmp/ifs)"; fail=1; }}
exit $fail
"#
    );
    let j = run_hostile(&s, 1, &script);
    let log = s.log(j["id"].as_i64().unwrap());
    assert!(!log.contains("REACHED"), "{log}");
    assert_eq!(j["state"], "succeeded", "{log}");
    s.shutdown_clean();
}

#[test]
fn writes_to_image_other_jobs_and_host_paths_do_not_land() {
    let before = slate_testkit::image::manifest(image());
    let s = hostile_slate();
    let data = s.data.display().to_string();
    let script = format!(
        r#"
echo evil > /bin/evil; rm -rf /etc; echo x > /workspace/../escape
ls {data} 2>/dev/null && echo "SEES DATA DIR"
ln -s / /workspace/hostroot; ln -s {data} /workspace/datadir; ln -s /etc/passwd /workspace/passwd-link
mkdir -p /workspace/deep && ln -s / /workspace/deep/up
true
"#
    );
    let j = run_hostile(&s, 1, &script);
    let log = s.log(j["id"].as_i64().unwrap());
    assert!(!log.contains("SEES DATA DIR"), "{log}");
    assert_eq!(
        before,
        slate_testkit::image::manifest(image()),
        "the image changed"
    );
    // Symlinks planted in the workspace did not make cleanup delete host files.
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(s.data.join("slate.db").exists());
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn flooding_output_is_capped_and_closing_stdout_does_not_hang() {
    let s = hostile_slate();
    let j = run_hostile(
        &s,
        1,
        "yes 'flood flood flood flood' | head -c 20000000; echo after-flood\n",
    );
    let id = j["id"].as_i64().unwrap();
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let log = s.log(id);
    assert!(log.len() < (1 << 20) + 4096, "log is {} bytes", log.len());
    assert!(log.contains("log truncated"), "no truncation marker");
    assert!(
        log.contains("succeeded"),
        "the end of job note survives the cap"
    );

    let j = run_hostile(&s, 2, "exec >&- 2>&-; sleep 2; touch /tmp/still-running\n");
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    let _ = Duration::from_secs(0);
    s.shutdown_clean();
}

/// Bytes allocated on disk by everything under `dir` (sparse files count their blocks),
/// without following symlinks: the jobs' own footprint, whatever else writes to the disk.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        total += m.blocks() * 512;
        if m.is_dir() {
            // Mount points (the jobs' merged views) would count the same blocks twice.
            if m.dev() == dir.symlink_metadata().map(|d| d.dev()).unwrap_or(0) {
                total += allocated_bytes(&e.path());
            }
        }
    }
    total
}

#[test]
fn filling_the_disk_stops_at_the_quota() {
    const MIB: u64 = 1 << 20;
    let s = Slate::start(Options {
        steps: r#"{ name = "hostile", run = "sh hostile.sh", timeout = "60s" },"#.into(),
        pool_limits:
            r#"{ memory = "128MiB", pids = 64, timeout = "90s", log = "1MiB", disk = "64MiB" }"#
                .into(),
        max_jobs: 2,
        ..Default::default()
    });
    // A normal job writes within its own quota alongside the filler.
    let (b0, h0) = s.make_pr(
        1,
        "normal",
        "hostile.sh",
        "sleep 2; dd if=/dev/zero of=/workspace/ok bs=1M count=16 && echo normal-ok\n",
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (workers, done) = (s.data.join("workers"), done.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(allocated_bytes(&workers));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        })
    };
    s.webhook(
        "pull_request",
        "d-normal",
        &s.pr_event("opened", 1, "normal", &h0, &b0),
    );
    // The filler holds its full disk for a while so the sampler sees the worst case.
    let j = run_hostile(
        &s,
        2,
        "dd if=/dev/zero of=/workspace/big bs=1M count=200; rc=$?; ls -l /workspace/big; sleep 2; exit $rc\n",
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let largest = sampler.join().unwrap();
    let id = j["id"].as_i64().unwrap();
    let log = s.log(id);
    assert_eq!(j["state"], "failed", "{j:#}\n{log}");
    assert_eq!(
        j["attempt"], 1,
        "a full disk is the build's failure, not retried"
    );
    assert!(log.contains("No space left on device"), "{log}");
    let normal = s.wait_terminal(1);
    assert_eq!(normal["state"], "succeeded", "{}", s.log(1));
    assert!(s.log(1).contains("normal-ok"));

    // 200 MiB asked for; at most 64 MiB (the filler's quota) + 16 MiB (the normal job)
    // ever sat in the workers' directory, however much else the host wrote meanwhile.
    eprintln!("workers' footprint: at most {} MiB", largest / MIB);
    assert!(
        largest < 100 * MIB,
        "the jobs took {} MiB of the host's disk",
        largest / MIB
    );
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    // Unmounting detached the loop devices by itself (autoclear), nothing was left over.
    assert!(!s.server_log().contains("leftover loop device"));
    s.assert_no_leaks();
    s.shutdown_clean();
}

/// Runs `ip <args>`; panics with its stderr on failure.
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

/// "The internet": netns `slate-hostile-inet-<pid>` behind a veth from the host,
/// 198.51.100.29/30 on the host, .30 inside, answering `public-ok` on port 8080 (busybox
/// nc run in the namespace). Removed on drop, even when the test fails.
struct Internet {
    netns: String,
    veth: String,
    server: std::process::Child,
}

impl Internet {
    const PUBLIC: &'static str = "198.51.100.30";

    fn new() -> Self {
        let pid = std::process::id();
        let (netns, veth) = (format!("slate-hostile-inet-{pid}"), format!("sth{pid}"));
        ip(&["netns", "add", &netns]);
        let mut inet = Internet {
            server: std::process::Command::new("true").spawn().unwrap(),
            netns,
            veth,
        };
        let (n, v) = (inet.netns.clone(), inet.veth.clone());
        ip(&[
            "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &n,
        ]);
        ip(&["addr", "add", "198.51.100.29/30", "dev", &v]);
        ip(&["link", "set", &v, "up"]);
        ip(&["-n", &n, "addr", "add", "198.51.100.30/30", "dev", "eth0"]);
        ip(&["-n", &n, "link", "set", "eth0", "up"]);
        ip(&["-n", &n, "route", "add", "default", "via", "198.51.100.29"]);
        let _ = inet.server.wait();
        inet.server = std::process::Command::new("ip")
            .args([
                "netns", "exec", &n, "busybox", "nc", "-ll", "-p", "8080", "-e",
            ])
            .args(["busybox", "echo", "public-ok"])
            .spawn()
            .unwrap();
        inet
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for args in [
            vec!["link", "del", self.veth.as_str()],
            vec!["netns", "del", self.netns.as_str()],
        ] {
            let _ = std::process::Command::new("ip").args(&args).output();
        }
    }
}

/// With `network = "egress"`, through the server: the job reaches a public address, and
/// not the server, a service on every host address, the host end of its own veth,
/// private and metadata addresses, or a concurrent egress job; it cannot re-address or
/// re-route itself.
#[test]
fn egress_reaches_the_internet_but_not_the_host_private_ranges_or_another_job() {
    let inet = Internet::new();
    // A service on every address of the host, loopback included.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let hp = host_service.local_addr().unwrap().port();
    let s = Slate::start(Options {
        steps: r#"{ name = "hostile", run = "sh hostile.sh", timeout = "60s" },"#.into(),
        pool_limits: r#"{ memory = "128MiB", pids = 64, timeout = "90s", log = "1MiB" }"#.into(),
        pool_extra: r#"network = "egress""#.into(),
        max_jobs: 2,
        ..Default::default()
    });
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let primary = {
        let out = ip(&["-j", "route", "get", "203.0.113.1"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["prefsrc"].as_str().unwrap().to_string()
    };

    // Job 1 listens on its own address for the second to try.
    let listener = "printf '#!/bin/sh\\necho other-job\\n' > /tmp/srv; chmod +x /tmp/srv\n\
                    nc -ll -p 9000 -e /tmp/srv & sleep 0.3\n\
                    nc -w 2 127.0.0.1 9000 </dev/null | grep -q other-job && echo self-ok\n\
                    sleep 15\n";
    let (b0, h0) = s.make_pr(1, "listener", "hostile.sh", listener);
    s.webhook(
        "pull_request",
        "d-listener",
        &s.pr_event("opened", 1, "listener", &h0, &b0),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let other = loop {
        let first = s.get("/api/v1/builds?pr=1")[0]["jobs"][0]["id"].as_i64();
        let veth = first.map(|id| format!("slv{id}")).unwrap_or_default();
        if !veth.is_empty() && std::path::Path::new("/sys/class/net").join(&veth).exists() {
            let out = ip(&["-j", "-4", "addr", "show", "dev", &veth]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            if let Some(host) = v[0]["addr_info"][0]["local"].as_str() {
                let host: std::net::Ipv4Addr = host.parse().unwrap();
                break std::net::Ipv4Addr::from(u32::from(host) + 1).to_string();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job 1 got no veth: {}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let public = Internet::PUBLIC;
    let script = format!(
        r#"
fail=0
try() {{ if timeout 5 nc -w 2 $2 $3 </dev/null 2>/dev/null | grep -q .; then echo "REACHED: $1"; fail=1; else echo "unreachable: $1"; fi; }}
check() {{ if eval "$2" >/dev/null 2>&1; then echo "ALLOWED: $1"; fail=1; else echo "refused: $1"; fi; }}
gw=$(ip route | awk '/^default/ {{print $3}}')
echo "gateway $gw"
try other-job {other} 9000
try server-loopback 127.0.0.1 {port}
try host-service-primary {primary} {hp}
try host-service-gateway $gw {hp}
try private-range 10.0.2.2 80
try metadata 169.254.169.254 80
check re-address 'ip addr add 100.127.255.250/30 dev eth0'
check re-route 'ip route add 10.0.0.0/8 via $gw'
check raw-socket 'ping -c1 -W1 $gw'
if timeout 5 nc -w 2 {public} 8080 </dev/null | grep -q public-ok; then echo "reached: public"; else echo "PUBLIC UNREACHABLE"; fail=1; fi
exit $fail
"#
    );
    let j = run_hostile(&s, 2, &script);
    let log = s.log(j["id"].as_i64().unwrap());
    eprintln!("{log}");
    assert!(
        !log.contains("REACHED") && !log.contains("ALLOWED"),
        "{log}"
    );
    assert!(log.contains("reached: public"), "{log}");
    assert_eq!(j["state"], "succeeded", "{log}");
    assert!(
        host_service.accept().is_err(),
        "a job connected to the host service"
    );
    // Job 1's listener was there to be reached: it answered job 1 itself.
    let first = s.get("/api/v1/builds?pr=1")[0]["jobs"][0]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(s.wait_terminal(first)["state"], "succeeded");
    assert!(s.log(first).contains("self-ok"), "{}", s.log(first));
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    s.assert_no_leaks();
    drop(inet);
    s.shutdown_clean();
}
