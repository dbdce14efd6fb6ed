//! The web UI end to end: pages over HTTP, escaping, pagination and timing with 10,000
//! builds, a 1 GB log's tail, live logs over SSE, auth and CSRF, and a real headless
//! Chromium driven through chromedriver (screenshots in `target/ui-screenshots/`).

#[path = "ui/support.rs"]
mod support;

use futures::{FutureExt, StreamExt};
use slate_core::JobState;
use slate_server::ui::auth::create_token;
use slate_server::ui::UiConfig;
use std::time::{Duration, Instant};
use support::{hidden, median, set_cookie, Server, OTHER_REPO, REPO};

const XSS: &str = "<script>alert('x')</script>";

#[tokio::test]
async fn pages_render_and_escape_user_strings() {
    let s = Server::start(UiConfig::default()).await;
    let (b, jobs) = s
        .pr_build(
            REPO,
            7,
            &format!("fix {XSS} \"quoted\""),
            "evil<script>branch</script>",
        )
        .await;
    let job = jobs[0];
    s.set_state(job, &[JobState::Provisioning, JobState::Running])
        .await;
    let mut w = s.app.logs.writer(job).await.unwrap();
    w.note("step build: make").await.unwrap();
    w.append(b"\x1b[1;31merror:\x1b[0m <script>alert(\"log\")</script> & more\n")
        .await
        .unwrap();
    w.note("step build: failed with exit code 2 in 1.50s")
        .await
        .unwrap();
    w.finish().await.unwrap();
    s.step(job, 0, "build", Some(2)).await;
    s.set_state(job, &[JobState::Failed]).await;

    for path in [
        "/",
        &format!("/builds/{}", b.0),
        &format!("/jobs/{}", job.0),
        "/pools",
        "/images",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        // The only script element anywhere is the UI's own, on job pages.
        let scripts = body.matches("<script").count();
        let own = body.matches("<script src=\"/assets/live.js\"").count();
        assert_eq!(
            scripts, own,
            "{path} has an injected script element:\n{body}"
        );
        assert!(!body.contains("alert('x')</script>"), "{path}");
    }
    let (_, builds) = s.get("/").await;
    assert!(
        builds.contains("fix &lt;script&gt;alert('x')&lt;/script&gt; &quot;quoted&quot;"),
        "{builds}"
    );
    assert!(builds.contains("evil&lt;script&gt;branch&lt;/script&gt;"));
    assert!(
        builds.contains("busybox failed"),
        "one badge per job with its state"
    );

    let (_, page) = s.get(&format!("/jobs/{}", job.0)).await;
    assert!(
        page.contains("&lt;script&gt;alert(&quot;log&quot;)&lt;/script&gt; &amp; more"),
        "{page}"
    );
    assert!(
        page.contains("<span class=\"b f1\">error:</span>"),
        "ansi colours as spans"
    );
    assert!(page.contains("id=\"L1\""), "line anchors");
    assert!(
        page.contains("href=\"#step-0\"") && page.contains("id=\"jump-failure\""),
        "jump to the failing step"
    );
    assert!(page.contains("exit 2"));
    // Security headers on every page.
    let r = s.http().get(format!("{}/", s.url)).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");

    // Raw log, whole.
    let (status, raw) = s.get(&format!("/jobs/{}/log.txt", job.0)).await;
    assert_eq!(status, 200);
    assert!(raw.contains("<script>alert(\"log\")</script>"));
    let r = s
        .http()
        .get(format!("{}/jobs/{}/log.txt", s.url, job.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    s.stop().await;
}

#[tokio::test]
async fn successful_steps_are_collapsed() {
    let s = Server::start(UiConfig::default()).await;
    let (_, jobs) = s.pr_build(REPO, 1, "t", "b").await;
    let job = jobs[0];
    s.set_state(job, &[JobState::Provisioning, JobState::Running])
        .await;
    let mut w = s.app.logs.writer(job).await.unwrap();
    w.note("step build: make").await.unwrap();
    w.append(b"compiling\n").await.unwrap();
    w.note("step build: ok in 1.00s").await.unwrap();
    w.note("step test: make test").await.unwrap();
    w.append(b"FAIL\n").await.unwrap();
    w.note("step test: failed with exit code 1 in 0.50s")
        .await
        .unwrap();
    w.finish().await.unwrap();
    s.step(job, 0, "build", Some(0)).await;
    s.step(job, 1, "test", Some(1)).await;
    s.set_state(job, &[JobState::Failed]).await;
    let (_, page) = s.get(&format!("/jobs/{}", job.0)).await;
    assert!(
        page.contains("<details class=\"sec step ok\" id=\"step-0\" data-name=\"build\"><summary>"),
        "{page}"
    );
    assert!(
        page.contains("<details class=\"sec step failed\" id=\"step-1\" data-name=\"test\" open>"),
        "{page}"
    );
    s.stop().await;
}

#[tokio::test]
async fn builds_are_paginated_and_filtered() {
    let s = Server::start(UiConfig::default()).await;
    for i in 1..=120u64 {
        let repo = if i % 2 == 0 { REPO } else { OTHER_REPO };
        let (_, jobs) = s
            .pr_build(repo, i, &format!("pr title {i}"), &format!("branch-{i}"))
            .await;
        if i % 10 == 0 {
            s.set_state(
                jobs[0],
                &[JobState::Provisioning, JobState::Running, JobState::Failed],
            )
            .await;
        }
    }
    let rows = |body: &str| body.matches("<td class=\"subject\">").count();
    let (_, p1) = s.get("/").await;
    assert_eq!(rows(&p1), 50);
    assert!(
        p1.contains("pr title 120") && !p1.contains("pr title 70<"),
        "newest first"
    );
    assert!(p1.contains("href=\"/?page=2\""));
    let (_, p3) = s.get("/?page=3").await;
    assert_eq!(rows(&p3), 20);
    assert!(!p3.contains("rel=\"next\""));
    assert!(p3.contains("pr title 1<"));
    let (_, repo) = s.get(&format!("/?repo={}", REPO.replace('/', "%2F"))).await;
    assert_eq!(rows(&repo), 50);
    assert!(
        !repo.contains(OTHER_REPO.to_string().as_str()) || repo.matches(OTHER_REPO).count() <= 2
    );
    let (_, failed) = s.get("/?state=failed").await;
    assert_eq!(rows(&failed), 12, "{failed}");
    let (_, failed_repo) = s.get(&format!("/?state=failed&repo={}", REPO)).await;
    assert_eq!(rows(&failed_repo), 12, "every tenth build is even");
    let (_, pr) = s.get("/?pr=77").await;
    assert_eq!(rows(&pr), 1);
    assert!(pr.contains("pr title 77"));
    let (status, bad) = s.get("/?pr=abc").await;
    assert_eq!(status, 200);
    assert!(bad.contains("not a pull request number"));
    s.stop().await;
}

#[tokio::test]
async fn builds_page_with_10000_builds_is_fast_and_indexed() {
    let s = Server::start(UiConfig::default()).await;
    let t = Instant::now();
    for i in 1..=10_000u64 {
        let repo = if i % 4 == 0 { OTHER_REPO } else { REPO };
        let (_, jobs) = s.pr_build(repo, i, &format!("title {i}"), "b").await;
        if i % 100 == 0 {
            s.set_state(
                jobs[0],
                &[JobState::Provisioning, JobState::Running, JobState::Failed],
            )
            .await;
        }
    }
    eprintln!("inserted 10,000 builds in {:?}", t.elapsed());
    let http = s.http();
    let mut report = Vec::new();
    for path in [
        "/",
        "/?page=100",
        "/?page=199",
        "/?repo=octo%2Fother",
        "/?state=failed",
        "/?state=queued",
        "/?repo=octo%2Fhello&pr=5001",
        "/?pr=5000",
    ] {
        let mut times = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            let r = http.get(format!("{}{path}", s.url)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.text().await.unwrap();
            times.push(t.elapsed());
            assert!(body.contains("<table class=\"builds\">"), "{path}");
        }
        let m = median(times);
        report.push(format!("{path}: median {m:?}"));
        assert!(m < Duration::from_millis(50), "{path}: median {m:?}");
    }
    eprintln!(
        "builds page with 10,000 builds (request to last byte, 21 runs):\n  {}",
        report.join("\n  ")
    );

    // The listing's query is served by an index, read backwards, with no sort.
    use sqlx::Connection;
    let mut db = sqlx::SqliteConnection::connect(&format!(
        "sqlite:{}",
        s.dir.path().join("data/slate.db").display()
    ))
    .await
    .unwrap();
    for (sql, index) in [
        ("SELECT id FROM builds ORDER BY created_at DESC, id DESC LIMIT 51 OFFSET 0", "builds_created"),
        ("SELECT id FROM builds WHERE repo = 'octo/other' ORDER BY created_at DESC, id DESC LIMIT 51 OFFSET 0", "builds_repo_created"),
        ("SELECT id FROM jobs WHERE build_id = 5 ORDER BY id", "jobs_build"),
    ] {
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}")).fetch_all(&mut db).await.unwrap();
        let text: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
        eprintln!("{sql}\n  -> {text:?}");
        assert!(text.iter().any(|l| l.contains(index)), "{sql}: {text:?}");
        assert!(!text.iter().any(|l| l.contains("TEMP B-TREE")), "{sql}: {text:?}");
    }
    // The state filter finds the state's jobs by index, then their builds by id, and sorts
    // only those (cheap for rare states; the timing above covers the common one).
    let sql =
        "SELECT id FROM builds WHERE id IN (SELECT build_id FROM jobs WHERE state = 'failed') \
               ORDER BY created_at DESC, id DESC LIMIT 51 OFFSET 0";
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
        .fetch_all(&mut db)
        .await
        .unwrap();
    let text: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
    eprintln!("{sql}\n  -> {text:?}");
    assert!(
        text.iter().any(|l| l.contains("jobs_state_build")),
        "{text:?}"
    );
    assert!(!text.iter().any(|l| l.starts_with("SCAN")), "{text:?}");
    db.close().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_1gb_log_opens_at_its_tail() {
    let s = Server::start(UiConfig::default()).await;
    let (_, jobs) = s.pr_build(REPO, 1, "big", "b").await;
    let job = jobs[0];
    s.set_state(
        job,
        &[
            JobState::Provisioning,
            JobState::Running,
            JobState::Succeeded,
        ],
    )
    .await;
    // 1 GiB: a sparse start (no disk used) and 256 KiB of real lines at the end.
    let path = s.app.logs.path(job);
    let mut tail = String::new();
    let mut i = 0;
    while tail.len() < 256 << 10 {
        tail.push_str(&format!("output line {i:07} \x1b[32mok\x1b[0m\n"));
        i += 1;
    }
    tail.push_str("the very last line\n");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&path).unwrap();
        let size = 1u64 << 30;
        f.seek(SeekFrom::Start(size - tail.len() as u64)).unwrap();
        f.write_all(tail.as_bytes()).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
    }
    let http = s.http();
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = http
            .get(format!("{}/jobs/{}", s.url, job.0))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        body = r.text().await.unwrap();
        times.push(t.elapsed());
    }
    let m = median(times.clone());
    eprintln!(
        "1 GiB log, job page with its tail: median {m:?} of {times:?}, page {} bytes",
        body.len()
    );
    assert!(m < Duration::from_secs(1));
    assert!(body.contains("the very last line"));
    assert!(
        body.len() < 1 << 20,
        "never the whole log: {} bytes",
        body.len()
    );
    assert!(
        body.contains("1 GiB shown") || body.contains("of 1024 MiB") || body.contains("of 1 GiB"),
        "size shown"
    );
    // Far into the file, lines are anchored by byte offset; "load earlier" goes back a window.
    assert!(body.contains("id=\"O1073"), "offset anchors");
    let earlier = hidden_href(&body, "load-earlier").expect("a load earlier link");
    let (status, prev) = s.get(&earlier).await;
    assert_eq!(status, 200);
    assert!(prev.contains("output line") && !prev.contains("the very last line"));
    s.stop().await;
}

fn hidden_href(page: &str, id: &str) -> Option<String> {
    let at = page.find(&format!("id=\"{id}\" href=\""))?;
    let rest = &page[at + id.len() + 12..];
    Some(rest[..rest.find('"')?].replace("&amp;", "&"))
}

/// Read SSE events until `pred` holds for the collected ones.
async fn read_events(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    until: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !buf.contains(until) {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {until:?} in {buf}"))
            .expect("stream ended")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    std::mem::take(buf)
}

#[tokio::test]
async fn live_log_resumes_from_the_last_event_id() {
    let s = Server::start(UiConfig::default()).await;
    let (_, jobs) = s.pr_build(REPO, 1, "live", "b").await;
    let job = jobs[0];
    s.set_state(job, &[JobState::Provisioning, JobState::Running])
        .await;
    let mut w = s.app.logs.writer(job).await.unwrap();
    w.append(b"first\n").await.unwrap();
    let (_, page) = s.get(&format!("/jobs/{}", job.0)).await;
    assert!(page.contains("data-follow=\"1\""));
    assert!(page.contains(">first<"));
    let http = s.http();
    let r = http
        .get(format!("{}/jobs/{}/events?offset=6", s.url, job.0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut st = r.bytes_stream();
    let mut buf = String::new();
    w.append(b"second <b>\npartial").await.unwrap();
    let got = read_events(&mut st, &mut buf, "\n\n").await;
    assert!(
        got.contains("event: log") && got.contains("id: 17"),
        "{got}"
    );
    assert!(
        got.contains("second &lt;b&gt;") && !got.contains("partial"),
        "{got}"
    );
    drop(st);
    // Reconnect as a browser does: the last event id is the byte offset to resume at.
    let r = http
        .get(format!("{}/jobs/{}/events", s.url, job.0))
        .header("Last-Event-ID", "17")
        .send()
        .await
        .unwrap();
    let mut st = r.bytes_stream();
    w.append(b" line\nthird\n").await.unwrap();
    let got = read_events(&mut st, &mut buf, "third").await;
    assert!(
        got.contains("partial line") && !got.contains("second"),
        "{got}"
    );
    w.note("job done").await.unwrap();
    w.finish().await.unwrap();
    s.set_state(job, &[JobState::Succeeded]).await;
    let got = read_events(&mut st, &mut buf, "event: done").await;
    assert!(got.contains("\"state\":\"succeeded\""), "{got}");
    s.stop().await;
}

#[tokio::test]
async fn api_actions_need_a_bearer_token() {
    let s = Server::start(UiConfig::default()).await;
    let (b, jobs) = s.pr_build(REPO, 1, "t", "b").await;
    let http = s.http();
    let cancel = format!("{}/api/v1/jobs/{}/cancel", s.url, jobs[0].0);
    let r = http.post(&cancel).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http
        .post(&cancel)
        .bearer_auth("slate_nottoken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/api/v1/submit", s.url))
        .json(&serde_json::json!({"repo": REPO, "branch": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let (_, token) = create_token(s.app.store.as_ref(), "ci-bot").await.unwrap();
    assert_eq!(
        s.app.store.list_api_tokens().await.unwrap()[0].name,
        "ci-bot"
    );
    // Only the hash is stored.
    let db = std::fs::read(s.dir.path().join("data/slate.db")).unwrap();
    let wal = std::fs::read(s.dir.path().join("data/slate.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()));
    }
    let r = http.post(&cancel).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["cancelled"], true);
    assert_eq!(
        s.app.store.get_job(jobs[0]).await.unwrap().state,
        JobState::Cancelled
    );
    let reason = s.app.store.get_job(jobs[0]).await.unwrap().reason.unwrap();
    assert!(reason.contains("ci-bot"), "{reason}");

    // Rebuild: a new build of the same checkout with fresh, queued jobs.
    let rebuild = format!("{}/api/v1/builds/{}/rebuild", s.url, b.0);
    assert_eq!(http.post(&rebuild).send().await.unwrap().status(), 401);
    let r = http
        .post(&rebuild)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "nothing to rebuild without a checkout");
    s.app
        .store
        .set_build_checkout(b, &"c".repeat(40))
        .await
        .unwrap();
    let r = http
        .post(&rebuild)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    let new = slate_core::BuildId(v["build_id"].as_i64().unwrap());
    let nb = s.app.store.get_build(new).await.unwrap();
    let ob = s.app.store.get_build(b).await.unwrap();
    assert_ne!(new, b);
    assert_eq!(nb.checkout_sha, ob.checkout_sha);
    assert_eq!(nb.change, ob.change);
    let nj = s.app.store.jobs_of_build(new).await.unwrap();
    assert_eq!(nj.len(), 1);
    assert_eq!(nj[0].state, JobState::Queued);

    let r = http
        .post(format!("{}/api/v1/builds/{}/cancel", s.url, new.0))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.app.store.get_job(nj[0].id).await.unwrap().state,
        JobState::Cancelled
    );
    s.stop().await;
}

/// Log in through the form; returns the session cookie.
async fn login(s: &Server, token: &str) -> String {
    let http = s.http();
    let r = http
        .get(format!("{}/login?next=/", s.url))
        .send()
        .await
        .unwrap();
    let (login_cookie, _) = set_cookie(&r, "slate_login").unwrap();
    let page = r.text().await.unwrap();
    let csrf = hidden(&page, "csrf").unwrap();
    // Without the form's CSRF token the login is refused.
    let r = http
        .post(format!("{}/login", s.url))
        .header("cookie", format!("slate_login={login_cookie}"))
        .form(&[("token", token), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{}/login", s.url))
        .header("cookie", format!("slate_login={login_cookie}"))
        .form(&[("token", "wrong"), ("next", "/"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/login", s.url))
        .header("cookie", format!("slate_login={login_cookie}"))
        .form(&[("token", token), ("next", "/"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let (session, header) = set_cookie(&r, "slate_session").unwrap();
    assert!(
        header.contains("HttpOnly") && header.contains("SameSite=Strict"),
        "{header}"
    );
    session
}

#[tokio::test]
async fn forms_need_a_session_and_its_csrf_token() {
    let s = Server::start(UiConfig::default()).await;
    let (_, jobs) = s.pr_build(REPO, 1, "t", "b").await;
    let job = jobs[0];
    let (_, token) = create_token(s.app.store.as_ref(), "alice").await.unwrap();
    let http = s.http();
    let cancel = format!("{}/jobs/{}/cancel", s.url, job.0);

    // No session: sent to the login page, nothing changes.
    let r = http
        .post(&cancel)
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/login?next="));

    let session = login(&s, &token).await;
    let cookie = format!("slate_session={session}");
    let page = http
        .get(format!("{}/jobs/{}", s.url, job.0))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("alice"));
    let csrf = hidden(&page, "csrf").expect("the cancel form carries the csrf token");

    // A session without the token (a cross-site post), or with a wrong one: 403.
    let r = http
        .post(&cancel)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(&cancel)
        .header("cookie", &cookie)
        .form(&[("csrf", "0".repeat(64))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        s.app.store.get_job(job).await.unwrap().state,
        JobState::Queued
    );

    let r = http
        .post(&cancel)
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        s.app.store.get_job(job).await.unwrap().state,
        JobState::Cancelled
    );
    s.stop().await;
}

#[tokio::test]
async fn require_login_closes_the_read_only_pages() {
    let s = Server::start(UiConfig {
        require_login: true,
    })
    .await;
    let (_, jobs) = s.pr_build(REPO, 1, "t", "b").await;
    let http = s.http();
    let r = http
        .get(format!("{}/jobs/{}", s.url, jobs[0].0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("/login?next=/jobs/{}", jobs[0].0)
    );
    assert_eq!(s.get("/api/v1/builds").await.0, 401);
    assert_eq!(s.get("/healthz").await.0, 200);
    assert_eq!(s.get("/login").await.0, 200);
    assert_eq!(s.get("/assets/style.css").await.0, 200);
    let (_, token) = create_token(s.app.store.as_ref(), "bob").await.unwrap();
    let r = http
        .get(format!("{}/api/v1/builds", s.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = login(&s, &token).await;
    let r = http
        .get(format!("{}/", s.url))
        .header("cookie", format!("slate_session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn browser_follows_a_running_job_and_cancels_one_after_login() {
    let s = Server::start(UiConfig::default()).await;
    let (_, running) = s
        .pr_build(REPO, 1, "live log in a browser", "feature/live")
        .await;
    let (_, to_cancel) = s
        .pr_build(REPO, 2, "to be cancelled", "feature/cancel")
        .await;
    let job = running[0];
    s.set_state(job, &[JobState::Provisioning, JobState::Running])
        .await;
    s.set_state(to_cancel[0], &[JobState::Provisioning, JobState::Running])
        .await;
    let mut w = s.app.logs.writer(job).await.unwrap();
    w.note("step build: make").await.unwrap();
    s.step(job, 0, "build", None).await;
    w.append(b"\x1b[32mcompiling\x1b[0m 1 of 3\n")
        .await
        .unwrap();

    let browser = support::Browser::start().await;
    let result = std::panic::AssertUnwindSafe(async {
        browser.goto(&format!("{}/", s.url)).await;
        let title = browser.text("table.builds tbody tr td.subject").await;
        assert!(title.contains("to be cancelled"), "{title}");
        browser.screenshot("builds.png").await;

        browser.goto(&format!("{}/jobs/{}", s.url, job.0)).await;
        assert_eq!(browser.text("#job-state").await, "running");
        browser
            .wait_for("the live stream", "return document.getElementById('live-status').textContent.indexOf('live') >= 0", Duration::from_secs(10))
            .await;
        // A marker that a reload would erase.
        browser.script("window.__noReload = 42; return true;").await;
        for i in 2..=3 {
            w.append(format!("compiling {i} of 3\n").as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        browser
            .wait_for("new lines", "return document.getElementById('log').innerText.indexOf('compiling 3 of 3') >= 0", Duration::from_secs(10))
            .await;
        // Numbered after the lines the page came with.
        assert_eq!(browser.text("#L4").await.trim_start_matches('4').trim(), "compiling 3 of 3");
        browser.screenshot("job-live.png").await;

        w.note("step build: ok in 1.00s").await.unwrap();
        s.step(job, 0, "build", Some(0)).await;
        w.note(&format!("job {}: succeeded (ok) after 2.0s", job.0)).await.unwrap();
        s.set_state(job, &[JobState::Succeeded]).await;
        w.finish().await.unwrap();
        browser
            .wait_for("the final state", "return document.getElementById('job-state').textContent === 'succeeded'", Duration::from_secs(10))
            .await;
        browser
            .wait_for("the steps table", "return document.getElementById('steps').innerText.indexOf('ok') >= 0", Duration::from_secs(10))
            .await;
        assert_eq!(browser.script("return window.__noReload;").await, serde_json::json!(42), "the page was reloaded");
        assert!(browser.text("#live-status").await.contains("succeeded"));
        assert_eq!(
            browser.script("var d = document.querySelector('#log details'); return [d.open, d.querySelector('.outcome').textContent];").await,
            serde_json::json!([false, "ok in 1.00s"]),
            "the finished step collapsed, with its outcome"
        );
        browser.screenshot("job-finished.png").await;

        // Log in with a token and cancel the other job.
        let (_, token) = create_token(s.app.store.as_ref(), "browser-user").await.unwrap();
        browser.goto(&format!("{}/jobs/{}", s.url, to_cancel[0].0)).await;
        browser.click(".actions a").await;
        browser.type_into("input[name=token]", &token).await;
        browser.click("form.login button").await;
        browser
            .wait_for("the job page after login", "return !!document.getElementById('cancel')", Duration::from_secs(10))
            .await;
        assert!(browser.text("header.top .who").await.contains("browser-user"));
        browser.click("#cancel").await;
        browser
            .wait_for("the cancelled state", "return document.getElementById('job-state') && document.getElementById('job-state').textContent === 'cancelled'", Duration::from_secs(10))
            .await;
        browser.screenshot("job-cancelled.png").await;
        assert_eq!(s.app.store.get_job(to_cancel[0]).await.unwrap().state, JobState::Cancelled);

        browser.goto(&format!("{}/pools", s.url)).await;
        browser.screenshot("pools.png").await;
    })
    .catch_unwind()
    .await;
    // Chromium is stopped whether or not the checks passed.
    browser.quit().await;
    eprintln!("screenshots in {}", support::screenshot_dir().display());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    s.stop().await;
}
