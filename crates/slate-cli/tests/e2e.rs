//! End-to-end: the real `slate` binary, real runc sandboxes, the real static agent, a
//! local git remote, signed real-shaped GitHub payloads and a recorder for the status API.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn pull_request_builds_in_a_sandbox_and_reports_statuses() {
    let s = Slate::start(Options::default());
    let (base, head) = s.make_pr(7, "feature", "greeting.txt", "hello from the PR\n");
    let (code, body) = s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 7, "feature", &head, &base),
    );
    assert_eq!(code, 202, "{body}");

    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(1));
    assert_eq!(job["pool"], "busybox");
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps[0]["name"], "build");
    assert_eq!(steps[0]["exit_code"], 0);
    // The deploy step is for pushes only.
    assert_eq!(steps[1]["name"], "deploy");
    assert_eq!(steps[1]["outcome"], "skipped");
    let log = s.log(1);
    assert!(log.contains("hello from the PR"), "{log}");
    assert!(!log.contains("deploying"), "{log}");

    let pending = s.wait_status(&head, "pending");
    let success = s.wait_status(&head, "success");
    assert_eq!(pending.context.as_deref(), Some("slate/busybox"));
    assert_eq!(success.context.as_deref(), Some("slate/busybox"));
    assert!(
        success.target_url.as_deref().unwrap().ends_with("/jobs/1"),
        "{success:?}"
    );
    let statuses = s.github.statuses();
    let first_pending = statuses.iter().position(|x| x.state == "pending").unwrap();
    let first_success = statuses.iter().position(|x| x.state == "success").unwrap();
    assert!(first_pending < first_success, "{statuses:#?}");
    // The token went to the API, never into the log.
    assert!(s.github.requests().iter().any(|r| r
        .header("authorization")
        .is_some_and(|a| a.contains("ghp_testtoken"))));
    assert!(!s.server_log().contains("ghp_testtoken"));
    assert!(!s.server_log().contains(SECRET));

    // Nothing of the job is left once it is done.
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn failing_step_reports_failure_and_stops_the_job() {
    let s = Slate::start(Options {
        steps: r#"
  { name = "lint", run = "echo lint warnings; exit 1", allow_failure = true },
  { name = "build", run = "echo compiling; exit 3" },
  { name = "test", run = "echo never runs" },
"#
        .into(),
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "broken", "greeting.txt", "broken\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "broken", &head, &base),
    );
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["attempt"], 1, "a build failure is never retried");
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps[0]["outcome"], "allowed_failure");
    assert_eq!(steps[1]["exit_code"], 3);
    assert_eq!(steps[1]["outcome"], "failed");
    assert_eq!(steps.len(), 2, "the test step must not start: {steps:#?}");
    assert!(!s.log(1).contains("never runs"));
    let st = s.wait_status(&head, "failure");
    assert!(
        st.description.unwrap().contains("build"),
        "the status names the failing step"
    );
    s.shutdown_clean();
}

#[test]
fn jobs_are_isolated_and_the_image_is_never_written() {
    let before = slate_testkit::image::manifest(image());
    let s = Slate::start(Options {
        steps: r#"
  { name = "probe", run = "test ! -e /etc/evil && test ! -e /tmp/mark && test ! -e marker && echo clean" },
  { name = "dirty", run = "echo x > /etc/evil && echo x > /tmp/mark && echo x > marker && echo x > /bin/evil && rm -f /bin/ls && echo dirtied" },
"#
        .into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "a", "a.txt", "a\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "a", &head, &base),
    );
    assert_eq!(s.wait_terminal(1)["state"], "succeeded", "{}", s.log(1));
    let (base2, head2) = s.make_pr(2, "b", "b.txt", "b\n");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("opened", 2, "b", &head2, &base2),
    );
    let j2 = s.wait_terminal(2);
    assert_eq!(
        j2["state"],
        "succeeded",
        "job 2 saw job 1's files: {}",
        s.log(2)
    );
    assert!(s.log(2).contains("clean"));
    let after = slate_testkit::image::manifest(image());
    assert_eq!(before, after, "the image changed");
    s.shutdown_clean();
}

#[test]
fn bad_webhooks_are_refused_and_nothing_is_stored() {
    let s = Slate::start(Options::default());
    let (base, head) = s.make_pr(3, "x", "x.txt", "x\n");
    let body = s.pr_event("opened", 3, "x", &head, &base);

    let (code, _) = s.webhook_raw("pull_request", "bad-1", &body, None);
    assert_eq!(code, 401, "missing signature");
    let (code, _) = s.webhook_raw(
        "pull_request",
        "bad-2",
        &body,
        Some(&slate_testkit::github::sign("wrong", &body)),
    );
    assert_eq!(code, 401, "wrong secret");
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let (code, _) = s.webhook_raw(
        "pull_request",
        "bad-3",
        &tampered,
        Some(&slate_testkit::github::sign(SECRET, &body)),
    );
    assert_eq!(code, 401, "body changed after signing");
    let (code, v) = s.webhook("pull_request", "bad-4", b"{\"action\": \"opened\", ");
    assert_eq!(code, 400, "malformed json: {v}");
    let big = vec![b' '; 30 << 20];
    let (code, _) = s.webhook_raw("pull_request", "bad-5", &big, Some("sha256=00"));
    assert_eq!(code, 413, "30 MiB body");
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.builds().is_empty(), "a refused webhook made a build");
    let metrics = s.get_text("/metrics");
    assert!(
        metrics.contains("slate_webhooks_total{result=\"bad_signature\"} 3"),
        "{metrics}"
    );

    // A good delivery builds once, however often it is redelivered.
    assert_eq!(s.webhook("pull_request", "good-1", &body).0, 202);
    assert_eq!(s.webhook("pull_request", "good-1", &body).0, 200);
    assert_eq!(s.webhook("pull_request", "good-1", &body).0, 200);
    s.wait_terminal(1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.builds().len(), 1, "redelivery made a second build");
    s.shutdown_clean();
}

#[test]
fn a_new_head_supersedes_the_running_job_and_close_cancels() {
    let s = Slate::start(Options {
        steps: r#"{ name = "slow", run = "echo started; sleep 60" },"#.into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (base, head1) = s.make_pr(5, "f", "f.txt", "1\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 5, "f", &head1, &base),
    );
    s.wait_job(1, "running with output", Duration::from_secs(60), |v| {
        v["state"] == "running"
    });
    let head2 = s.push_pr(5, "f", "f.txt", "2\n");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("synchronize", 5, "f", &head2, &base),
    );
    let j1 = s.wait_terminal(1);
    assert_eq!(j1["state"], "cancelled");
    assert!(
        j1["reason"].as_str().unwrap().contains("superseded"),
        "{j1:#}"
    );
    let st = s.wait_status(&head1, "error");
    assert!(st.description.unwrap().contains("superseded"));

    // Job 2 (new head) runs now; a third PR's job waits in the queue behind it.
    s.wait_state(2, "running");
    let (b3, h3) = s.make_pr(6, "g", "g.txt", "g\n");
    s.webhook(
        "pull_request",
        "d-3",
        &s.pr_event("opened", 6, "g", &h3, &b3),
    );
    s.wait_state(3, "queued");
    s.webhook(
        "pull_request",
        "d-4",
        &s.pr_event("closed", 6, "g", &h3, &b3),
    );
    let j3 = s.wait_terminal(3);
    assert_eq!(j3["state"], "cancelled");
    assert!(j3["reason"].as_str().unwrap().contains("closed"), "{j3:#}");
    s.webhook(
        "pull_request",
        "d-5",
        &s.pr_event("closed", 5, "f", &head2, &base),
    );
    assert_eq!(s.wait_terminal(2)["state"], "cancelled");
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn a_step_over_its_timeout_is_killed_with_its_children() {
    let s = Slate::start(Options {
        steps: r#"{ name = "hang", run = "sleep 300 & echo $! > /tmp/child; sleep 300", timeout = "2s" },"#.into(),
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "h", "h.txt", "h\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "h", &head, &base),
    );
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "timed_out", "{job:#}");
    assert_eq!(job["steps"][0]["outcome"], "timed_out");
    s.wait_status(&head, "failure");
    // No sleep of the job survives anywhere on the host.
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn kill_9_while_a_job_is_queued_then_restart_runs_it() {
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "sleep 2; echo done-$SLATE_PR" },"#.into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (b1, h1) = s.make_pr(1, "one", "1.txt", "1\n");
    let (b2, h2) = s.make_pr(2, "two", "2.txt", "2\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "one", &h1, &b1),
    );
    s.wait_state(1, "running");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("opened", 2, "two", &h2, &b2),
    );
    s.wait_state(2, "queued");
    s.kill9();
    s.spawn();
    let j1 = s.wait_terminal(1);
    let j2 = s.wait_terminal(2);
    assert_eq!(j2["state"], "succeeded", "{}", s.log(2));
    assert!(s.log(2).contains("done-2"));
    // The interrupted job was retried on a fresh worker.
    assert_eq!(j1["state"], "succeeded", "{}", s.log(1));
    assert_eq!(j1["attempt"], 2);
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn submit_of_a_branch_runs_the_deploy_step() {
    let s = Slate::start(Options::default());
    // Actions need an API token.
    let anon = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/submit", s.url))
        .json(&serde_json::json!({"repo": REPO, "branch": "main"}))
        .send()
        .unwrap();
    assert_eq!(anon.status().as_u16(), 401);
    let forged = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/submit", s.url))
        .bearer_auth("not-a-token")
        .json(&serde_json::json!({"repo": REPO, "branch": "main"}))
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    assert!(s.builds().is_empty());
    let out = s.cli(&["submit", "--repo", REPO, "--ref", "main", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    let job = s.job(1);
    assert_eq!(job["steps"][1]["name"], "deploy");
    assert_eq!(job["steps"][1]["outcome"], "ok");
    assert!(s.log(1).contains("deploying"));
    // The CLI listings.
    let out = s.cli(&["builds", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["trigger"]["kind"], "manual");
    let out = s.cli(&["jobs", "1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    let out = s.cli(&["submit", "--repo", "nope/nope", "--ref", "main"]);
    assert!(!out.status.success());
    s.shutdown_clean();
}

#[test]
fn logs_follow_streams_while_the_job_runs() {
    let s = Slate::start(Options {
        steps:
            r#"{ name = "tick", run = "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.4; done" },"#
                .into(),
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "t", "t.txt", "t\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "t", &head, &base),
    );
    s.wait_state(1, "running");
    let mut child = std::process::Command::new(slate_bin())
        .args(["logs", "1", "--follow"])
        .env("SLATE_SERVER", &s.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut got_tick1_while_running = false;
    let mut all = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("tick-1") {
            got_tick1_while_running = s.job(1)["state"] == "running";
        }
        all.push_str(&line);
        all.push('\n');
    }
    assert!(child.wait().unwrap().success());
    assert!(
        got_tick1_while_running,
        "tick-1 arrived only after the job ended"
    );
    assert!(all.contains("tick-5"), "{all}");
    assert!(
        all.contains("succeeded"),
        "follow ends with the job's end: {all}"
    );
    s.shutdown_clean();
}

#[test]
fn drafts_wait_merge_conflicts_error_and_path_filters_skip() {
    let s = Slate::start(Options {
        extra_pipeline: r#"paths = ["src/**", "greeting.txt"]"#.into(),
        ..Default::default()
    });
    // A draft waits until it is ready for review.
    let (base, head) = s.make_pr(1, "d", "greeting.txt", "draft\n");
    let mut draft: serde_json::Value =
        serde_json::from_slice(&s.pr_event("opened", 1, "d", &head, &base)).unwrap();
    draft["pull_request"]["draft"] = serde_json::json!(true);
    s.webhook("pull_request", "d-1", &serde_json::to_vec(&draft).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.builds().is_empty());
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("ready_for_review", 1, "d", &head, &base),
    );
    assert_eq!(s.wait_terminal(1)["state"], "succeeded");

    // A change outside the paths needs no build: a success status says it was skipped.
    let (b2, h2) = s.make_pr(2, "docs", "docs.md", "docs\n");
    s.webhook(
        "pull_request",
        "d-3",
        &s.pr_event("opened", 2, "docs", &h2, &b2),
    );
    let st = s.wait_status(&h2, "success");
    assert!(st.description.unwrap().contains("skipped"));
    assert_eq!(s.builds().len(), 1);

    // Main moves on and conflicts with a PR: an error status with that reason.
    let (b3, h3) = s.make_pr(3, "c", "greeting.txt", "theirs\n");
    std::fs::write(s.work.join("greeting.txt"), "ours\n").unwrap();
    git(&s.work, &["commit", "-qam", "main moves"]);
    git(&s.work, &["push", "-q", s.remote.to_str().unwrap(), "main"]);
    s.webhook(
        "pull_request",
        "d-4",
        &s.pr_event("opened", 3, "c", &h3, &b3),
    );
    let st = s.wait_status(&h3, "error");
    assert!(
        st.description.unwrap().contains("conflict"),
        "{:?}",
        s.github.statuses()
    );
    s.shutdown_clean();
}

#[test]
fn check_config_names_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("slate.toml");
    std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:8080\"\n\n[[pool]]\nname = \"x\"\nimage = \"/x\"\nmax_jbos = 2\n").unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slate.toml:7:"), "{err}");
    assert!(err.contains("max_jbos"), "{err}");
    std::fs::write(
        &p,
        "[[pool]]\nname = \"x\"\nimage = \"/x\"\nlimits = { memory = \"lots\" }\n",
    )
    .unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":4:") && err.contains("pool[0].limits.memory"),
        "{err}"
    );
    // A [github] section without a webhook secret refuses to start.
    std::fs::write(
        &p,
        format!(
            "[server]\ndata_dir = \"{}\"\n[github]\napi_url = \"http://127.0.0.1:1\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["serve", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsigned"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_worker_that_fails_is_retried_on_a_fresh_one_then_errors() {
    // A runtime that exits at once: the worker dies before its agent connects.
    let s = Slate::start(Options {
        pool_extra: "runtime = \"/bin/false\"\nattempts = 2\nboot_timeout = \"20s\"".into(),
        ..Default::default()
    });
    let (base, head) = s.make_pr(1, "r", "r.txt", "r\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "r", &head, &base),
    );
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "error", "{job:#}");
    assert_eq!(job["attempt"], 2, "one retry on a fresh worker: {job:#}");
    assert!(
        job["reason"].as_str().unwrap().contains("worker exited"),
        "{job:#}"
    );
    let log = s.log(1);
    assert!(
        log.contains("retrying on a fresh worker (attempt 2 of 2)"),
        "{log}"
    );
    let st = s.wait_status(&head, "error");
    assert!(st.description.unwrap().contains("worker exited"));
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn sigterm_lets_running_jobs_finish_then_stops() {
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "sleep 2; echo finished-in-time" },"#.into(),
        shutdown_grace: "60s".into(),
        max_jobs: 1,
        ..Default::default()
    });
    let (b1, h1) = s.make_pr(1, "one", "1.txt", "1\n");
    let (b2, h2) = s.make_pr(2, "two", "2.txt", "2\n");
    s.webhook(
        "pull_request",
        "d-1",
        &s.pr_event("opened", 1, "one", &h1, &b1),
    );
    s.wait_state(1, "running");
    s.webhook(
        "pull_request",
        "d-2",
        &s.pr_event("opened", 2, "two", &h2, &b2),
    );
    s.wait_state(2, "queued");
    // SIGTERM: job 1 finishes within the grace period; job 2 is not started.
    s.stop();
    s.spawn();
    let j1 = s.job(1);
    assert_eq!(j1["state"], "succeeded", "{j1:#}");
    assert_eq!(j1["attempt"], 1, "the running job was not interrupted");
    assert!(s.log(1).contains("finished-in-time"));
    // The next start carries on with what was queued.
    assert_eq!(s.wait_terminal(2)["state"], "succeeded");
    s.assert_no_leaks();
    s.shutdown_clean();
}
