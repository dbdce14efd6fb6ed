//! Shared caches and VM pools through the real server: a read-only package mirror and a
//! distfiles overlay with per-PR promotion; a job on a fresh QEMU VM (TCG here).

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    out
}

#[test]
fn caches_are_read_only_or_layered_per_pr_and_promoted_only_where_safe() {
    let mirrors = tempfile::tempdir().unwrap();
    let packages = mirrors.path().join("packages");
    let distfiles = mirrors.path().join("distfiles");
    std::fs::create_dir_all(&packages).unwrap();
    std::fs::create_dir_all(&distfiles).unwrap();
    std::fs::write(packages.join("zlib-1.3.tbz2"), "prebuilt zlib\n").unwrap();
    std::fs::write(distfiles.join("zlib-1.3.tar.gz"), "zlib source\n").unwrap();
    let script = r#"
set -e
cat /opt/packages/zlib-1.3.tbz2
if echo x > /opt/packages/evil 2>/dev/null; then echo "WROTE TO RO MIRROR"; exit 1; fi
if rm /opt/packages/zlib-1.3.tbz2 2>/dev/null; then echo "DELETED FROM RO MIRROR"; exit 1; fi
cat /opt/distfiles/zlib-1.3.tar.gz
ls /opt/distfiles
echo "fetched by $SLATE_PR" > /opt/distfiles/new-$SLATE_PR.tar.gz
echo tampered > /opt/distfiles/zlib-1.3.tar.gz
"#;
    let s = Slate::start(Options {
        steps: r#"{ name = "fetch", run = "sh fetch.sh" },"#.into(),
        max_jobs: 1,
        pool_extra: format!(
            r#"
[[pool.cache]]
name = "packages"
source = "{}"
target = "/opt/packages"
mode = "ro"

[[pool.cache]]
name = "distfiles"
source = "{}"
target = "/opt/distfiles"
mode = "overlay"
promote = "trusted"
"#,
            packages.display(),
            distfiles.display()
        ),
        ..Default::default()
    });
    std::fs::write(s.work.join("fetch.sh"), script).unwrap();
    git(&s.work, &["add", "-A"]);
    git(&s.work, &["commit", "-qm", "fetch script"]);
    git(&s.work, &["push", "-q", s.remote.to_str().unwrap(), "main"]);

    // PR 1, first push: adds new-1; the mirror is untouched.
    let (base, head) = s.make_pr(1, "p1", "a.txt", "a\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "p1", &head, &base),
    );
    let j = s.wait_terminal(1);
    assert_eq!(j["state"], "succeeded", "{}", s.log(1));
    assert!(s.log(1).contains("prebuilt zlib"));
    assert_eq!(tree(&distfiles), vec!["zlib-1.3.tar.gz"]);
    assert_eq!(
        std::fs::read_to_string(distfiles.join("zlib-1.3.tar.gz")).unwrap(),
        "zlib source\n"
    );
    assert_eq!(tree(&packages), vec!["zlib-1.3.tbz2"]);

    // PR 1, second push: sees its own earlier file (warm), and the original mirror file.
    let head2 = s.push_pr(1, "p1", "a.txt", "a2\n");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("synchronize", 1, "p1", &head2, &base),
    );
    assert_eq!(s.wait_terminal(2)["state"], "succeeded", "{}", s.log(2));
    let log2 = s.log(2);
    assert!(
        log2.contains("new-1.tar.gz"),
        "the PR's own layer is visible: {log2}"
    );
    assert!(
        log2.contains("zlib source"),
        "a tampered file was never promoted: {log2}"
    );

    // PR 2 does not see PR 1's file.
    let (b3, h3) = s.make_pr(2, "p2", "b.txt", "b\n");
    s.webhook(
        "pull_request",
        "d-3",
        &s.pr_event("opened", 2, "p2", &h3, &b3),
    );
    assert_eq!(s.wait_terminal(3)["state"], "succeeded", "{}", s.log(3));
    assert!(!s.log(3).contains("new-1.tar.gz"), "{}", s.log(3));

    // A trusted build (push to main) promotes its new file into the shared mirror.
    let out = s.cli(&["submit", "--repo", REPO, "--ref", "main", "--wait"]);
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log(4)
    );
    let names = tree(&distfiles);
    assert!(
        names.iter().any(|n| n.starts_with("new-")),
        "trusted build promoted nothing: {names:?}"
    );
    assert!(
        !names.contains(&"new-1.tar.gz".to_string()),
        "a PR's file reached the mirror: {names:?}"
    );
    assert_eq!(
        std::fs::read_to_string(distfiles.join("zlib-1.3.tar.gz")).unwrap(),
        "zlib source\n"
    );

    s.assert_no_leaks();
    let mounts: Vec<_> = slate_testkit::leaks::mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&s.data))
        .collect();
    assert!(mounts.is_empty(), "cache mounts left: {mounts:?}");
    s.shutdown_clean();
}

#[test]
fn a_pull_request_runs_on_a_fresh_qemu_vm() {
    let images = tempfile::tempdir().unwrap();
    let vm = images.path().join("vm");
    slate_testkit::vm_image::vm_image(&vm).unwrap();
    let base_sum = slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap();
    let s = Slate::start(Options {
        steps: r#"{ name = "probe", run = "uname -r; cat /etc/slate-vm-image; cat greeting.txt; test ! -e /first-job && touch /first-job && echo wrote-marker" },"#.into(),
        provider: "qemu".into(),
        image: Some(vm.clone()),
        pool_limits: r#"{ memory = "512MiB", timeout = "5m" }"#.into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "vm", "greeting.txt", "hello from the VM PR\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "vm", &head, &base),
    );
    let j = s.wait_job(1, "terminal", Duration::from_secs(240), |v| {
        matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
        )
    });
    let log = s.log(1);
    assert_eq!(j["state"], "succeeded", "{log}");
    assert!(log.contains("hello from the VM PR"), "{log}");
    assert!(log.contains("wrote-marker"), "{log}");
    let guest_kernel = std::fs::read_dir("/opt/slate-vm/kernel/lib/modules")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    if let Some(k) = guest_kernel {
        assert!(log.contains(&k), "the guest kernel {k} ran the step: {log}");
    }
    s.wait_status(&head, "success");

    // A second job gets a fresh clone: the first job's marker is gone.
    let (b2, h2) = s.make_pr(2, "vm2", "greeting.txt", "second\n");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("opened", 2, "vm2", &h2, &b2),
    );
    let j2 = s.wait_job(2, "terminal", Duration::from_secs(240), |v| {
        matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
        )
    });
    assert_eq!(j2["state"], "succeeded", "{}", s.log(2));
    assert!(s.log(2).contains("wrote-marker"));
    assert_eq!(
        slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap(),
        base_sum,
        "the base image changed"
    );
    let left: Vec<_> = std::fs::read_dir(s.data.join("vm-workers"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "vm workers left: {left:?}");
    s.shutdown_clean();
}

#[test]
fn a_pull_request_runs_on_a_libvirt_domain() {
    let images = tempfile::tempdir().unwrap();
    let vm = images.path().join("vm");
    slate_testkit::vm_image::vm_image(&vm).unwrap();
    let base_sum = slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap();
    let s = Slate::start(Options {
        steps: r#"{ name = "probe", run = "cat /etc/slate-vm-image; cat greeting.txt" },"#.into(),
        provider: "libvirt".into(),
        image: Some(vm.clone()),
        pool_limits: r#"{ memory = "512MiB", timeout = "5m" }"#.into(),
        pool_extra: "[pool.libvirt]\nuris = [\"qemu:///system\"]\nvirt_type = \"qemu\"".into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "lv", "greeting.txt", "hello from libvirt\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "lv", &head, &base),
    );
    let j = s.wait_job(1, "terminal", Duration::from_secs(240), |v| {
        matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
        )
    });
    let log = s.log(1);
    assert_eq!(j["state"], "succeeded", "{log}");
    assert!(log.contains("hello from libvirt"), "{log}");
    s.wait_status(&head, "success");
    assert_eq!(
        slate_testkit::vm_image::sha256_file(&vm.join("disk.qcow2")).unwrap(),
        base_sum
    );
    // The job's domain and volume are gone with its worker directory.
    let root = s.data.join("libvirt-workers").join("busybox");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&root).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "libvirt worker left in {}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.shutdown_clean();
}
