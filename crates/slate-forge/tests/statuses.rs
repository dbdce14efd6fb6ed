//! `GithubStatuses` and `Reporter` against a local recorder standing in for the GitHub API.

use slate_core::{ReportState, Secret};
use slate_forge::{ForgeError, GithubStatuses, Reporter, ReporterConfig, StatusSink, StatusUpdate};
use slate_testkit::github::GithubRecorder;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

fn update(context: &str, state: ReportState, description: &str) -> StatusUpdate {
    StatusUpdate {
        repo: "acme/widgets".into(),
        sha: SHA.into(),
        state,
        context: context.into(),
        description: description.into(),
        target_url: Some("https://ci.example/builds/7".into()),
    }
}

fn sink(rec: &GithubRecorder) -> Arc<GithubStatuses> {
    Arc::new(GithubStatuses::new(&rec.url(), Some(Secret::new("ghp_test_token"))).unwrap())
}

/// Short waits so retry tests take milliseconds, with the default attempt count.
fn fast() -> ReporterConfig {
    ReporterConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..ReporterConfig::default()
    }
}

#[tokio::test]
async fn status_arrives_with_every_field_and_the_token() {
    let rec = GithubRecorder::start();
    let gh = sink(&rec);
    let status = gh
        .create(&update("slate/linux", ReportState::Pending, "queued"))
        .await
        .unwrap();
    // GitHub's reply decodes into octocrab's model.
    assert_eq!(status.context.as_deref(), Some("slate/linux"));

    let reqs = rec.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, format!("/repos/acme/widgets/statuses/{SHA}"));
    assert_eq!(
        reqs[0].header("authorization"),
        Some("Bearer ghp_test_token")
    );
    assert_eq!(
        reqs[0].body,
        serde_json::json!({
            "state": "pending",
            "context": "slate/linux",
            "description": "queued",
            "target_url": "https://ci.example/builds/7",
        })
    );

    let s = &rec.statuses()[0];
    assert_eq!(s.repo, "acme/widgets");
    assert_eq!(s.sha, SHA);
    assert_eq!(s.state, "pending");
    assert_eq!(s.context.as_deref(), Some("slate/linux"));
    assert_eq!(s.description.as_deref(), Some("queued"));
    assert_eq!(s.target_url.as_deref(), Some("https://ci.example/builds/7"));
}

#[tokio::test]
async fn enterprise_base_path_is_kept() {
    let rec = GithubRecorder::start();
    let gh = GithubStatuses::new(&format!("{}/api/v3/", rec.url()), None).unwrap();
    gh.post_status(&update("ci", ReportState::Success, "ok"))
        .await
        .unwrap();
    let reqs = rec.requests();
    assert_eq!(
        reqs[0].path,
        format!("/api/v3/repos/acme/widgets/statuses/{SHA}")
    );
    assert_eq!(reqs[0].header("authorization"), None, "no token, no header");
}

#[tokio::test]
async fn long_description_is_truncated_so_github_accepts_it() {
    let rec = GithubRecorder::start();
    let long = "step `make test` failed: ".repeat(20);
    sink(&rec)
        .post_status(&update("ci", ReportState::Failure, &long))
        .await
        .unwrap();
    let d = rec.statuses()[0].description.clone().unwrap();
    assert_eq!(d.chars().count(), 140);
    assert!(long.starts_with(d.trim_end_matches('…')));
}

#[tokio::test]
async fn errors_say_whether_to_retry() {
    let rec = GithubRecorder::start();
    let gh = sink(&rec);
    let up = update("ci", ReportState::Pending, "");

    rec.fail_next(1, 502);
    let e = gh.post_status(&up).await.unwrap_err();
    assert!(matches!(e, ForgeError::Api { status: 502, .. }), "{e:?}");
    assert!(e.is_retryable());

    rec.fail_next(1, 422);
    let e = gh.post_status(&up).await.unwrap_err();
    assert!(matches!(e, ForgeError::Api { status: 422, .. }), "{e:?}");
    assert!(!e.is_retryable());

    let unknown = GithubStatuses::new(&format!("{}/nowhere", rec.url()), None).unwrap();
    let e = unknown.post_status(&up).await.unwrap_err();
    assert!(matches!(e, ForgeError::Api { status: 404, .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("Not Found"), "{e}");
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gh = GithubStatuses::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let e = gh
        .post_status(&update("ci", ReportState::Pending, ""))
        .await
        .unwrap_err();
    assert!(matches!(e, ForgeError::Transport(_)), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn bad_gateway_twice_is_delivered_after_retries() {
    let rec = GithubRecorder::start();
    rec.fail_next(2, 502);
    let reporter = Reporter::spawn_with(sink(&rec), fast());
    reporter.report(update("ci", ReportState::Success, "passed"));

    let got = rec
        .wait_for_status(|s| s.state == "success", Duration::from_secs(10))
        .await
        .expect("status delivered");
    assert_eq!(got.context.as_deref(), Some("ci"));
    assert!(reporter.flush(Duration::from_secs(5)).await);
    let stats = reporter.stats();
    assert_eq!((stats.delivered, stats.retried, stats.failed), (1, 2, 0));
    let answered: Vec<u16> = rec.requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, vec![502, 502, 201]);
}

#[tokio::test]
async fn unprocessable_is_not_retried() {
    let rec = GithubRecorder::start();
    rec.fail_next(1, 422);
    let reporter = Reporter::spawn_with(sink(&rec), fast());
    reporter.report(update("ci", ReportState::Success, "passed"));
    assert!(reporter.flush(Duration::from_secs(5)).await);
    assert_eq!(rec.requests().len(), 1);
    assert!(rec.statuses().is_empty());
    let stats = reporter.stats();
    assert_eq!((stats.delivered, stats.retried, stats.failed), (0, 0, 1));
}

#[tokio::test]
async fn updates_for_one_context_arrive_in_order() {
    let rec = GithubRecorder::start();
    let reporter = Reporter::spawn_with(sink(&rec), fast());
    for ctx in ["linux", "macos", "freebsd"] {
        reporter.report(update(ctx, ReportState::Pending, "queued"));
        reporter.report(update(ctx, ReportState::Pending, "running"));
        reporter.report(update(ctx, ReportState::Success, "passed"));
    }
    assert!(reporter.flush(Duration::from_secs(10)).await);
    for ctx in ["linux", "macos", "freebsd"] {
        let seen: Vec<String> = rec
            .statuses()
            .into_iter()
            .filter(|s| s.context.as_deref() == Some(ctx))
            .map(|s| format!("{}:{}", s.state, s.description.unwrap_or_default()))
            .collect();
        assert_eq!(
            seen,
            ["pending:queued", "pending:running", "success:passed"],
            "{ctx}"
        );
    }
    assert_eq!(reporter.stats().delivered, 9);
}

#[tokio::test]
async fn failing_github_never_blocks_the_caller_or_other_contexts() {
    const N: usize = 200;
    let rec = GithubRecorder::start();
    rec.fail_next(3, 503);
    let backoff = Duration::from_secs(2);
    let reporter = Reporter::spawn_with(
        sink(&rec),
        ReporterConfig {
            initial_backoff: backoff,
            max_backoff: backoff,
            ..ReporterConfig::default()
        },
    );
    let started = Instant::now();
    for i in 0..N {
        reporter.report(update(&format!("ctx-{i}"), ReportState::Pending, "queued"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "report blocked: {:?}",
        started.elapsed()
    );

    // Everything but the three failed updates gets through while those wait to retry.
    let settled = || {
        let st = reporter.stats();
        rec.statuses().len() == N - 3 && st.pending == 3 && st.retried == 3
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !settled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        settled(),
        "{:?}, {} statuses",
        reporter.stats(),
        rec.statuses().len()
    );
    assert!(
        started.elapsed() < backoff,
        "others were delivered only after the retry wait: {:?}",
        started.elapsed()
    );

    assert!(reporter.flush(Duration::from_secs(20)).await);
    let stats = reporter.stats();
    assert_eq!(
        (stats.delivered, stats.retried, stats.failed),
        (N as u64, 3, 0)
    );
}
