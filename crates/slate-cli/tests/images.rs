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
