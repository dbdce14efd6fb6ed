//! `slate image build` makes an image a sandbox pool runs jobs on by name; a rebuild is a
//! new version that new jobs use, and `gc` keeps the newest.

mod common;

use common::*;
use std::process::Command;

#[test]
fn a_pool_runs_on_the_newest_version_of_a_built_image() {
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    slate_testkit::image::busybox_rootfs(&rootfs).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf"])
        .arg(work.path().join("busybox.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(
        work.path().join("tool.sh"),
        "#!/bin/sh\necho tool-from-the-image\n",
    )
    .unwrap();
    let recipe = work.path().join("tiny.toml");
    let write_recipe = |version: &str| {
        std::fs::write(
            &recipe,
            format!(
                r#"name = "tiny"
base = {{ tarball = "busybox.tar" }}
files = [{{ src = "tool.sh", dest = "/usr/bin/tool", mode = "0755" }}]
run = ["echo {version} > /etc/tiny-version"]
outputs = ["rootfs"]
"#
            ),
        )
        .unwrap();
    };

    let build = |data_dir: &std::path::Path| {
        let out = Command::new(slate_bin())
            .args(["image", "build"])
            .arg(&recipe)
            .arg("--data-dir")
            .arg(data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "image build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut opts = Options {
        steps: r#"{ name = "probe", run = "tool; cat /etc/tiny-version" },"#.into(),
        ..Default::default()
    };
    opts.image = Some("tiny".into());
    // The pool names the image, so it is built into the server's data dir first.
    let s = Slate::start_with(opts, |data_dir| {
        write_recipe("v1");
        build(data_dir);
    });
    let (base, head) = s.make_pr(1, "a", "a.txt", "a\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "a", &head, &base),
    );
    let j = s.wait_terminal(1);
    let log = s.log(1);
    assert_eq!(j["state"], "succeeded", "{log}");
    assert!(log.contains("tool-from-the-image"), "{log}");
    assert!(log.contains("v1"), "{log}");

    // A rebuild is a new version; the next job runs on it.
    write_recipe("v2");
    build(&s.data);
    let (b2, h2) = s.make_pr(2, "b", "b.txt", "b\n");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("opened", 2, "b", &h2, &b2),
    );
    assert_eq!(s.wait_terminal(2)["state"], "succeeded", "{}", s.log(2));
    assert!(s.log(2).contains("v2"), "{}", s.log(2));

    let out = Command::new(slate_bin())
        .args(["image", "list", "--json", "--data-dir"])
        .arg(&s.data)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list:#}");
    let out = Command::new(slate_bin())
        .args(["image", "gc", "--data-dir"])
        .arg(&s.data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(slate_bin())
        .args(["image", "list", "--json", "--data-dir"])
        .arg(&s.data)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "gc keeps only the newest: {list:#}"
    );
    s.shutdown_clean();
}

#[test]
fn configured_images_are_rebuilt_in_the_background_and_failures_are_visible() {
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    slate_testkit::image::busybox_rootfs(&rootfs).unwrap();
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf"])
        .arg(work.path().join("busybox.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let good = work.path().join("good.toml");
    std::fs::write(
        &good,
        "name = \"good\"\nbase = { tarball = \"busybox.tar\" }\nrun = [\"echo built > /etc/built\"]\noutputs = [\"rootfs\"]\nrebuild_every = \"7d\"\n",
    )
    .unwrap();
    let broken = work.path().join("broken.toml");
    std::fs::write(
        &broken,
        "name = \"broken\"\nbase = { tarball = \"busybox.tar\" }\nrun = [\"echo failing on purpose; exit 3\"]\noutputs = [\"rootfs\"]\nrebuild_every = \"1d\"\n",
    )
    .unwrap();
    let s = Slate::start(Options {
        config_extra: format!(
            "[[image]]\nrecipe = \"{}\"\n\n[[image]]\nrecipe = \"{}\"\n",
            good.display(),
            broken.display()
        ),
        ..Default::default()
    });
    // Neither has a version yet, so both are due at start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let images = loop {
        let v = s.get("/api/v1/images");
        let done = |n: &str| v["rebuilds"][n]["last_result"].is_string();
        if done("good") && done("broken") {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rebuild results: {v:#}\n{}",
            s.server_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        images["rebuilds"]["good"]["last_result"], "ok",
        "{images:#}"
    );
    assert!(images["rebuilds"]["good"]["newest_version"].is_string());
    let err = images["rebuilds"]["broken"]["last_result"]
        .as_str()
        .unwrap();
    assert!(err.contains("exit") || err.contains("3"), "{err}");
    assert_eq!(images["rebuilds"]["broken"]["failures"], 1);
    let versions = images["versions"].as_array().unwrap();
    assert!(versions.iter().any(|v| v["name"] == "good"), "{images:#}");
    assert!(
        !versions.iter().any(|v| v["name"] == "broken"),
        "a failed build left a version"
    );
    let metrics = s.get_text("/metrics");
    assert!(
        metrics.contains("slate_image_rebuilds_total{image=\"broken\",result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("slate_image_rebuilds_total{image=\"good\",result=\"ok\"} 1"));
    s.shutdown_clean();
}
