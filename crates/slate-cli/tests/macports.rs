//! MacPorts pull requests end to end: the `macports` planner over a fake ports tree, one
//! job per port with its own status, `{port}` templating, dynamic jobs from a plan step,
//! and artifacts kept from a failing job. Real server binary, real sandboxes.

mod common;

use common::*;
use serde_json::Value;
use slate_testkit::github::RecordedStatus;
use std::path::Path;
use std::time::Duration;

const LIBFOO: &str =
    "# -*- Portfile -*-\nPortSystem 1.0\nPortGroup github 1.0\ngithub.setup foo libfoo 1.2.3\n";
const PYBAR: &str = "PortSystem 1.0\nPortGroup python 1.0\nname py-bar\nversion 2.0\n";
const BAZ: &str = "PortSystem 1.0\nname baz\nversion 1\n";

/// Put the fake ports tree on `main`.
fn ports_tree(s: &Slate) {
    let files: &[(&str, &str)] = &[
        ("devel/libfoo/Portfile", LIBFOO),
        ("python/py-bar/Portfile", PYBAR),
        ("net/baz/Portfile", BAZ),
        ("net/baz/files/patch-x.diff", "--- a\n+++ b\n"),
        ("_resources/port1.0/group/github-1.0.tcl", "# github 1.0\n"),
        ("_resources/port1.0/group/python-1.0.tcl", "# python 1.0\n"),
    ];
    for (path, text) in files {
        let p = s.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    git(&s.work, &["add", "-A"]);
    git(&s.work, &["commit", "-qm", "ports tree"]);
    git(&s.work, &["push", "-q", s.remote.to_str().unwrap(), "main"]);
}

/// A PR from `main` changing `files` (appending a line), published as `refs/pull/N/head`.
fn port_pr(s: &Slate, number: u64, files: &[&str]) -> (String, String) {
    let branch = format!("pr-{number}");
    let base = git(&s.work, &["rev-parse", "main"]);
    git(&s.work, &["checkout", "-q", "-B", &branch, "main"]);
    for f in files {
        let p = s.work.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut text = std::fs::read_to_string(&p).unwrap_or_default();
        text.push_str(&format!("# touched by PR {number}\n"));
        std::fs::write(p, text).unwrap();
    }
    git(&s.work, &["add", "-A"]);
    git(&s.work, &["commit", "-qm", &format!("PR {number}")]);
    let head = git(&s.work, &["rev-parse", "HEAD"]);
    git(
        &s.work,
        &[
            "push",
            "-qf",
            s.remote.to_str().unwrap(),
            &format!("{branch}:refs/pull/{number}/head"),
        ],
    );
    git(&s.work, &["checkout", "-q", "main"]);
    s.webhook(
        "pull_request",
        &format!("d-{number}"),
        &s.pr_event("opened", number, &branch, &head, &base),
    );
    (base, head)
}

fn wait_context(s: &Slate, sha: &str, context: &str, state: &str) -> RecordedStatus {
    s.github
        .wait_for_status_blocking(
            |st| st.sha == sha && st.context.as_deref() == Some(context) && st.state == state,
            Duration::from_secs(90),
        )
        .unwrap_or_else(|| {
            panic!(
                "no {state} status {context} for {sha}: {:#?}\nserver:\n{}",
                s.github.statuses(),
                s.server_log()
            )
        })
}

fn build_jobs(s: &Slate, build: i64) -> Vec<Value> {
    s.get(&format!("/api/v1/builds/{build}"))["jobs"]
        .as_array()
        .unwrap()
        .clone()
}

fn macports_options(steps: &str) -> Options {
    Options {
        steps: steps.into(),
        extra_pipeline: "planner = \"macports\"\nportgroup_limit = 10".into(),
        ..Default::default()
    }
}

#[test]
fn a_pr_touching_two_ports_builds_each_with_its_own_status() {
    let s = Slate::start(macports_options(
        r#"
  { name = "install-port", run = "echo installing {port} as $SLATE_VAR_PORT for $SLATE_TARGET; echo 'left {as} is'" },
  { name = "deploy-archives", run = "echo deploying {port}", on = ["push"] },
"#,
    ));
    ports_tree(&s);
    let (_, head) = port_pr(
        &s,
        1,
        &[
            "devel/libfoo/Portfile",
            "python/py-bar/Portfile",
            "README.md",
        ],
    );

    let pending = wait_context(&s, &head, "slate/busybox/libfoo", "pending");
    assert!(
        pending.description.as_deref().unwrap().contains("2 ports"),
        "the plan note is in the description: {pending:?}"
    );
    for (id, port) in [(1, "libfoo"), (2, "py-bar")] {
        let job = s.wait_terminal(id);
        assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(id));
        assert_eq!(job["target"], port);
        assert_eq!(job["vars"]["port"], port);
        assert_eq!(job["context"], format!("slate/busybox/{port}"));
        let log = s.log(id);
        assert!(
            log.contains(&format!("installing {port} as {port} for {port}")),
            "{log}"
        );
        assert!(log.contains("left {as} is"), "unknown names stay: {log}");
        assert!(!log.contains("deploying"), "{log}");
        let steps = job["steps"].as_array().unwrap();
        assert_eq!(steps[1]["name"], "deploy-archives");
        assert_eq!(steps[1]["outcome"], "skipped");
        wait_context(&s, &head, &format!("slate/busybox/{port}"), "success");
    }
    assert_eq!(build_jobs(&s, 1).len(), 2, "README.md builds nothing");
    assert!(
        !s.github
            .statuses()
            .iter()
            .any(|st| st.context.as_deref() == Some("slate/busybox")),
        "no per-pool status for a ported build: {:#?}",
        s.github.statuses()
    );
    s.shutdown_clean();
}

#[test]
fn a_portgroup_change_selects_its_users_and_no_port_means_no_job() {
    let s = Slate::start(macports_options(
        r#"{ name = "install-port", run = "echo installing {port}" }"#,
    ));
    ports_tree(&s);
    let (_, head) = port_pr(&s, 1, &["_resources/port1.0/group/github-1.0.tcl"]);
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "succeeded", "{}", s.log(1));
    assert_eq!(job["target"], "libfoo");
    let st = wait_context(&s, &head, "slate/busybox/libfoo", "success");
    assert!(st.context.is_some());
    let pending = wait_context(&s, &head, "slate/busybox/libfoo", "pending");
    assert!(
        pending
            .description
            .as_deref()
            .unwrap()
            .contains("PortGroup github 1.0 used by 1"),
        "{pending:?}"
    );
    assert_eq!(build_jobs(&s, 1).len(), 1);

    // A patch under files/ counts for its port.
    let (_, head2) = port_pr(&s, 2, &["net/baz/files/patch-x.diff"]);
    let job = s.wait_terminal(2);
    assert_eq!(job["target"], "baz", "{job:#}");
    wait_context(&s, &head2, "slate/busybox/baz", "success");

    // Nothing port-shaped: no build, a success status per pool.
    let (_, head3) = port_pr(&s, 3, &["README.md", ".github/workflows/main.yml"]);
    let st = wait_context(&s, &head3, "slate/busybox", "success");
    assert!(
        st.description
            .as_deref()
            .unwrap()
            .contains("no port changed"),
        "{st:?}"
    );
    assert_eq!(s.builds().len(), 2, "no build for PR 3");
    s.shutdown_clean();
}

#[test]
fn a_plan_step_makes_one_job_per_printed_target() {
    let s = Slate::start(Options {
        pipeline_tail: r#"
[pipeline.plan]
name = "list-subports"
timeout = "1m"
run = '''
echo "planning for $SLATE_PORTS" >&2
for p in $SLATE_PORTS; do
  printf '{"name":"%s-sub","vars":{"port":"%s"}}\n' "$p" "$p"
done
'''
"#
        .into(),
        ..macports_options(
            r#"
  { name = "install-port", run = "echo installing {port} for $SLATE_TARGET" },
  { name = "deploy-archives", run = "echo deploying {port}", on = ["push"] },
"#,
        )
    });
    ports_tree(&s);
    let (_, head) = port_pr(&s, 1, &["devel/libfoo/Portfile", "python/py-bar/Portfile"]);

    let plan = s.wait_terminal(1);
    assert_eq!(plan["state"], "succeeded", "{plan:#}\n{}", s.log(1));
    assert_eq!(plan["target"], "plan");
    let log = s.log(1);
    assert!(log.contains("planning for libfoo py-bar"), "{log}");
    assert!(
        !log.contains("installing"),
        "the planning job runs the plan step only: {log}"
    );
    wait_context(&s, &head, "slate/busybox/plan", "success");

    for (id, target, port) in [(2, "libfoo-sub", "libfoo"), (3, "py-bar-sub", "py-bar")] {
        let job = s.wait_terminal(id);
        assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(id));
        assert_eq!(job["target"], target);
        assert_eq!(job["build_id"], 1);
        let log = s.log(id);
        assert!(
            log.contains(&format!("installing {port} for {target}")),
            "{log}"
        );
        assert!(!log.contains("deploying"), "{log}");
        wait_context(&s, &head, &format!("slate/busybox/{target}"), "pending");
        wait_context(&s, &head, &format!("slate/busybox/{target}"), "success");
    }
    assert_eq!(build_jobs(&s, 1).len(), 3);
    s.shutdown_clean();
}

#[test]
fn a_malformed_plan_line_fails_the_planning_job() {
    let s = Slate::start(Options {
        pipeline_tail: r#"
[pipeline.plan]
name = "plan"
run = '''echo '{"name":"fine"}'; echo 'this is not a target'; echo '{"name":"never"}' '''
"#
        .into(),
        ..Default::default()
    });
    let (base, head) = s.make_pr(4, "feature", "greeting.txt", "hello\n");
    s.webhook(
        "pull_request",
        "d-4",
        &s.pr_event("opened", 4, "feature", &head, &base),
    );
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "failed", "{job:#}\n{}", s.log(1));
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("line 2"), "{reason}");
    assert!(reason.contains("this is not a target"), "{reason}");
    let st = wait_context(&s, &head, "slate/busybox/plan", "failure");
    assert!(
        st.description.unwrap().contains("this is not a target"),
        "the status names the line"
    );
    assert_eq!(build_jobs(&s, 1).len(), 1, "no job from a malformed plan");
    s.shutdown_clean();
}

#[test]
fn artifacts_of_a_failing_job_are_kept_and_symlinks_are_not_followed() {
    let s = Slate::start(Options {
        steps: r#"
  { name = "build", run = "mkdir -p logs/port && echo main-log > logs/main.log && echo cfg > logs/port/config.log && echo other > other.txt && ln -s $HOST_SECRET logs/leak.log && ln -s / logs/root && exit 2", env = { HOST_SECRET = "@SECRET@" }, artifacts = ["logs/**"] },
"#
        .replace(
            "@SECRET@",
            // A path on the host: followed from the host, the link would read it.
            "/proc/self/environ",
        ),
        ..Default::default()
    });
    let (base, head) = s.make_pr(5, "feature", "greeting.txt", "hello\n");
    s.webhook(
        "pull_request",
        "d-5",
        &s.pr_event("opened", 5, "feature", &head, &base),
    );
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "failed", "{job:#}\n{}", s.log(1));
    let log = s.log(1);
    assert!(log.contains("artifacts: 2 file(s)"), "{log}");
    assert!(log.contains("logs/leak.log: symlink"), "{log}");

    let list = s.get("/api/v1/jobs/1/artifacts");
    let paths: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["logs/main.log", "logs/port/config.log"], "{list:#}");
    assert_eq!(
        s.get_text("/api/v1/jobs/1/artifacts/logs/main.log"),
        "main-log\n"
    );
    let url = list[1]["url"].as_str().unwrap();
    assert!(
        url.ends_with("/api/v1/jobs/1/artifacts/logs/port/config.log"),
        "{url}"
    );

    let http = reqwest::blocking::Client::new();
    let status = |path: &str| {
        http.get(format!("{}{path}", s.url))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status("/api/v1/jobs/1/artifacts/logs/leak.log"), 404);
    assert_eq!(status("/api/v1/jobs/1/artifacts/other.txt"), 404);
    assert_eq!(
        status("/api/v1/jobs/1/artifacts/logs/%2e%2e/%2e%2e/%2e%2e/slate.db"),
        400
    );
    assert_eq!(status("/api/v1/jobs/99/artifacts"), 404);
    // Nothing of the host came along.
    let kept = s.data.join("artifacts/1");
    assert!(!kept.join("logs/leak.log").exists());
    assert!(!kept.join("logs/root").exists());
    s.shutdown_clean();
}

#[test]
fn the_macports_example_passes_check_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/macports/slate.toml");
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&example).unwrap();
    let c = slate_core::config::Config::parse(&text, "slate.toml").unwrap();
    let p = &c.pipelines[0];
    assert!(p.plan.is_some());
    assert!(p.steps.iter().any(|s| !s.artifacts.is_empty()));
    assert!(p
        .steps
        .iter()
        .filter(|s| s.name.contains("deploy") || s.name.contains("gather"))
        .all(|s| !s.runs_for("pull_request")));
}

#[test]
fn slate_plan_prints_what_a_change_would_build() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    git(repo, &["init", "-q", "-b", "master"]);
    let write = |path: &str, text: &str| {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "devel/libfoo/Portfile",
        "PortSystem 1.0\nPortGroup github 1.0\nname libfoo\n",
    );
    write("python/py-bar/Portfile", "PortSystem 1.0\nname py-bar\n");
    write("_resources/port1.0/group/github-1.0.tcl", "# group\n");
    write("README.md", "ports\n");
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", "base"]);
    write("python/py-bar/files/patch-setup.py.diff", "--- a\n+++ b\n");
    write(
        "_resources/port1.0/group/github-1.0.tcl",
        "# group, changed\n",
    );
    write("README.md", "ports, changed\n");
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", "change"]);
    let out = std::process::Command::new(slate_bin())
        .args(["plan", "--planner", "macports", "--repo-dir"])
        .arg(repo)
        .args(["--base", "HEAD~1", "--head", "HEAD", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ports"], serde_json::json!(["libfoo", "py-bar"]), "{v}");
    assert_eq!(v["changed"], serde_json::json!(["py-bar"]), "{v}");
}
