//! Bad input at the API and agent boundaries (issue #8): path traversal, absurd ids and
//! query values, malformed submits, and oversized or malformed agent frames are answered
//! with a clear 4xx (or a clamped answer) or refused with an error — never a 500, never a
//! panic — and nothing in the store or the data directory changes.
//!
//! The HTTP requests are written by hand over TCP so that `..` and odd bytes reach the
//! server exactly as sent (an HTTP client would normalise them away).

#[path = "ui/support.rs"]
mod support;

use slate_core::{JobId, JobState};
use slate_proto::{AgentMsg, ServerMsg, MAX_FRAME, PROTOCOL_VERSION};
use slate_server::agents::{new_token, AgentRegistry, HelloError};
use slate_server::ui::auth::create_token;
use slate_server::ui::UiConfig;
use slate_store::BuildFilter;
use std::path::Path;
use std::time::Duration;
use support::{Server, REPO};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one raw HTTP/1.1 request and returns the status code and the whole response.
async fn raw(
    s: &Server,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    raw_declared(s, method, target, headers, body.len(), body).await
}

/// [`raw`] with a `Content-Length` that may promise more than `body` (the server must
/// refuse an oversized body from its header, before reading it).
async fn raw_declared(
    s: &Server,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    declared: usize,
    body: &[u8],
) -> (u16, String) {
    let addr = s.url.trim_start_matches("http://");
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {declared}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let (mut rd, mut wr) = sock.into_split();
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // Written while the answer is read: a server that refuses an oversized body answers
    // before it was all sent, and may close its end then.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 8192];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .unwrap_or_else(|_| panic!("{method} {target}: no answer in 30 s"));
    writer.abort();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: not an HTTP response: {text:?}"));
    (code, text)
}

/// Everything a request could have changed: builds, jobs, steps, events, tokens,
/// workers, and the files under the data dir (but the database's own files).
async fn snapshot(s: &Server) -> String {
    let store = s.app.store.as_ref();
    let builds = store
        .list_builds(&BuildFilter {
            repo: None,
            pr: None,
            limit: 10_000,
            offset: 0,
        })
        .await
        .unwrap();
    let mut out = format!("{builds:?}\n");
    for b in &builds {
        for j in store.jobs_of_build(b.id).await.unwrap() {
            let steps = store.steps_of_job(j.id).await.unwrap();
            out.push_str(&format!("{j:?}\n{steps:?}\n"));
        }
    }
    out.push_str(&format!(
        "events {}\ntokens {}\nworkers {:?}\n",
        store.count_events().await.unwrap(),
        store.list_api_tokens().await.unwrap().len(),
        store.list_workers().await.unwrap(),
    ));
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("slate.db") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            out.push(format!("{} {}", p.display(), m.len()));
            if m.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut files = Vec::new();
    walk(&s.dir.path().join("data"), &mut files);
    files.sort();
    out.push_str(&files.join("\n"));
    out
}

const ABSURD_IDS: &[&str] = &[
    "-1",
    "0",
    "99999999999999999999",
    "9223372036854775807",
    "-9223372036854775808",
    "abc",
    "1e3",
    "0x10",
    "1.5",
    "%00",
    "1%00",
    "%27%20OR%201=1%20--",
    "..",
    "%2e%2e",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
];

#[tokio::test]
async fn api_paths_ids_and_queries_get_clear_errors_and_change_nothing() {
    let s = Server::start(UiConfig::default()).await;
    let (_b, jobs) = s.pr_build(REPO, 7, "seven", "feature").await;
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
    let mut w = s.app.logs.writer(job).await.unwrap();
    w.append(b"line\n").await.unwrap();
    w.finish().await.unwrap();
    // A job that is still queued: a cancel must not reach it.
    let (_b2, queued) = s.pr_build(REPO, 8, "eight", "other").await;
    let queued = queued[0];
    let (_, token) = create_token(s.app.store.as_ref(), "bad-input")
        .await
        .unwrap();
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let j = job.0;

    let before = snapshot(&s).await;
    let mut tried = 0;
    let mut answered = std::collections::BTreeMap::<u16, usize>::new();
    // Every violation is collected, so one run lists them all.
    let mut wrong: Vec<String> = Vec::new();
    let mut check = |method: &str, target: String, code: u16, resp: &str, ok_2xx: bool| {
        tried += 1;
        *answered.entry(code).or_default() += 1;
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        if code >= 500 {
            wrong.push(format!("{method} {target}: server error {code}: {body}"));
        }
        if resp.contains("root:x:0:0") || resp.contains("root:*:0:0") {
            wrong.push(format!("{method} {target}: served a host file"));
        }
        if !ok_2xx && !(400..500).contains(&code) {
            wrong.push(format!(
                "{method} {target}: expected a 4xx, got {code}: {body}"
            ));
        }
    };

    // Traversal in every path that takes one.
    let traversal = [
        "/api/v1/jobs/../../etc/passwd".to_string(),
        "/api/v1/builds/../../../etc/passwd".into(),
        "/api/v1/jobs/..%2f..%2f..%2fetc%2fpasswd".into(),
        "/api/v1/jobs/%2e%2e/%2e%2e/etc/passwd".into(),
        format!("/api/v1/jobs/{j}/log/../../../../etc/passwd"),
        format!("/api/v1/jobs/{j}/artifacts/../../../../../../etc/passwd"),
        format!("/api/v1/jobs/{j}/artifacts/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd"),
        format!("/api/v1/jobs/{j}/artifacts/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        format!("/api/v1/jobs/{j}/artifacts/%2Fetc%2Fpasswd"),
        format!("/api/v1/jobs/{j}/artifacts//etc/passwd"),
        format!("/api/v1/jobs/{j}/artifacts/a/./../../../etc/passwd"),
        format!("/api/v1/jobs/{j}/artifacts/x%00/../../etc/passwd"),
        "/jobs/../../etc/passwd".into(),
        format!("/jobs/{j}/log.txt/../../../etc/passwd"),
        "/assets/..%2f..%2f..%2f..%2fetc%2fpasswd".into(),
        "/assets/../../../../etc/passwd".into(),
    ];
    for t in &traversal {
        let (code, resp) = raw(&s, "GET", t, &[], b"").await;
        check("GET", t.clone(), code, &resp, false);
    }

    // Absurd ids on every route that takes one.
    for id in ABSURD_IDS {
        for path in [
            format!("/api/v1/builds/{id}"),
            format!("/api/v1/jobs/{id}"),
            format!("/api/v1/jobs/{id}/log"),
            format!("/api/v1/jobs/{id}/artifacts"),
            format!("/api/v1/jobs/{id}/artifacts/out.txt"),
            format!("/builds/{id}"),
            format!("/jobs/{id}"),
            format!("/jobs/{id}/log.txt"),
            format!("/jobs/{id}/events"),
        ] {
            let (code, resp) = raw(&s, "GET", &path, &[], b"").await;
            check("GET", path, code, &resp, false);
        }
        for path in [
            format!("/api/v1/jobs/{id}/cancel"),
            format!("/api/v1/builds/{id}/cancel"),
            format!("/api/v1/builds/{id}/rebuild"),
        ] {
            let (code, resp) = raw(&s, "POST", &path, &auth, b"").await;
            check("POST", path, code, &resp, false);
        }
    }

    // Absurd query values: refused, or clamped to something sane.
    for q in [
        "limit=-5",
        "limit=abc",
        "limit=99999999999999999999",
        "offset=-1",
        "offset=99999999999999999999",
        "offset=abc",
        "pr=abc",
        "pr=-1",
        "pr=99999999999999999999",
        "pr=1e3",
        "limit=%00",
    ] {
        let path = format!("/api/v1/builds?{q}");
        let (code, resp) = raw(&s, "GET", &path, &[], b"").await;
        check("GET", path, code, &resp, false);
    }
    for q in [
        "limit=100000000",
        "limit=0",
        "limit=4294967295",
        "offset=4294967295",
        "offset=100000000&limit=100000000",
        "pr=18446744073709551615",
        "pr=9223372036854775808",
        "pr=0",
        "repo=%27%20OR%201%3D1%20--",
        "repo=../../etc/passwd",
        "repo=%00",
        "limit=1&limit=2",
        "unknown=1",
    ] {
        let path = format!("/api/v1/builds?{q}");
        let (code, resp) = raw(&s, "GET", &path, &[], b"").await;
        check("GET", path.clone(), code, &resp, true);
        if code == 200 {
            // Clamped: never more than the most a page may hold, and only what exists.
            let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
            let v: serde_json::Value = serde_json::from_str(body.trim())
                .or_else(|_| serde_json::from_str(dechunk(body).trim()))
                .unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
            let n = v.as_array().unwrap().len();
            assert!(n <= 2, "{path}: {n} builds");
        }
    }
    for q in [
        "offset=18446744073709551615",
        "offset=99999999999999999999",
        "offset=-1",
        "offset=abc",
        "follow=1&offset=18446744073709551615",
        "follow=%00",
    ] {
        let path = format!("/api/v1/jobs/{j}/log?{q}");
        let (code, resp) = raw(&s, "GET", &path, &[], b"").await;
        check("GET", path, code, &resp, true);
    }
    for q in [
        "page=-1",
        "page=99999999999999999999",
        "page=abc",
        "pr=abc",
        "state=%00",
    ] {
        let path = format!("/?{q}");
        let (code, resp) = raw(&s, "GET", &path, &[], b"").await;
        check("GET", path, code, &resp, true);
    }

    // Malformed submits, and actions without a token on a job that exists.
    for body in [
        &b""[..],
        b"{",
        b"null",
        b"[]",
        br#"{"repo":"octo/hello"}"#,
        br#"{"repo":"octo/hello","branch":"../../etc"}"#,
        br#"{"repo":"octo/hello","branch":"-x"}"#,
        br#"{"repo":"octo/hello","branch":""}"#,
        br#"{"repo":"nobody/else","branch":"main"}"#,
        br#"{"repo":"octo/hello","branch":["main"]}"#,
    ] {
        let (code, resp) = raw(&s, "POST", "/api/v1/submit", &auth, body).await;
        check(
            "POST",
            format!("/api/v1/submit {}", String::from_utf8_lossy(body)),
            code,
            &resp,
            false,
        );
    }
    for (path, size) in [
        ("/api/v1/submit", 3usize << 20),
        ("/hooks/github", 26 << 20),
    ] {
        let huge = vec![b'x'; size];
        let (code, resp) = raw(&s, "POST", path, &auth, &huge).await;
        check(
            "POST",
            format!("{path} ({} MiB)", size >> 20),
            code,
            &resp,
            false,
        );
        assert_eq!(code, 413, "{path}: {resp}");
    }
    for path in [
        format!("/api/v1/jobs/{}/cancel", queued.0),
        "/api/v1/submit".into(),
    ] {
        let (code, resp) = raw(
            &s,
            "POST",
            &path,
            &[],
            br#"{"repo":"octo/hello","branch":"main"}"#,
        )
        .await;
        check("POST", path.clone(), code, &resp, false);
        assert_eq!(code, 401, "{path}: {resp}");
        let (code, resp) = raw(
            &s,
            "POST",
            &path,
            &[("Authorization", "Bearer slate_forged")],
            b"{}",
        )
        .await;
        check("POST", path.clone(), code, &resp, false);
        assert_eq!(code, 401, "{path}: {resp}");
    }
    assert!(
        wrong.is_empty(),
        "{} of {tried} requests answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let after = snapshot(&s).await;
    assert_eq!(
        s.app.store.get_job(queued).await.unwrap().state,
        JobState::Queued
    );
    assert!(
        before == after,
        "the store or data dir changed:\n--- before\n{before}\n--- after\n{after}"
    );
    eprintln!("api bad input: {tried} requests, answers by status {answered:?}, 0 server errors, store unchanged");
    s.stop().await;
}

/// The body of a chunked response, joined.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Feeds `bytes` (then end of stream, unless `hold_open`) to `accept` and returns its
/// verdict with whatever the server wrote back.
async fn offer(
    reg: &AgentRegistry,
    bytes: Vec<u8>,
    hold_open: bool,
) -> (Result<JobId, HelloError>, Vec<u8>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let (mut crd, mut cwr) = tokio::io::split(client);
    let (srd, swr) = tokio::io::split(server);
    let writer = tokio::spawn(async move {
        let _ = cwr.write_all(&bytes).await;
        if hold_open {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        drop(cwr);
    });
    let r = reg
        .accept(srd, swr, "test", Duration::from_millis(500))
        .await;
    writer.abort();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(200), crd.read_to_end(&mut back)).await;
    (r, back)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn hello(token: &str, protocol: u32) -> Vec<u8> {
    slate_proto::encode(&AgentMsg::Hello {
        protocol,
        token: token.into(),
        agent_version: "bad-input".into(),
        resume_after: 0,
    })
    .unwrap()
}

#[tokio::test]
async fn oversized_and_malformed_agent_frames_are_refused_without_a_panic() {
    let reg = AgentRegistry::default();
    let t1 = new_token(JobId(1));
    let mut rx1 = reg.register(JobId(1), &t1);
    let t2 = new_token(JobId(2));
    let used = new_token(JobId(3));
    let rx3 = reg.register(JobId(3), &used);
    reg.deregister(JobId(3));
    drop(rx3);

    let mut oversized_declared = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    oversized_declared.extend_from_slice(b"{\"type\":\"hello\"");
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"{\"type\":\"hel");
    // A real oversized hello: a token of 5 MiB.
    let big_token = format!("1.{}", "a".repeat(5 << 20));
    let mut oversized_real = ((big_token.len() + 80) as u32).to_be_bytes().to_vec();
    oversized_real.extend_from_slice(
        format!(r#"{{"type":"hello","protocol":1,"token":"{big_token}","agent_version":"x","resume_after":0}}"#)
            .as_bytes(),
    );
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("empty stream", vec![], false),
        ("3 bytes of a length", vec![0, 0, 1], false),
        ("declared length over MAX_FRAME", oversized_declared, false),
        ("declared length u32::MAX", u32::MAX.to_be_bytes().to_vec(), false),
        ("oversized hello (5 MiB token)", oversized_real, false),
        ("truncated frame", truncated, false),
        ("zero-length frame", frame(b""), false),
        ("not JSON", frame(b"\xff\xfe\x00garbage"), false),
        ("JSON, not a message", frame(b"[1,2,3]"), false),
        ("unknown message type", frame(br#"{"type":"sudo"}"#), false),
        ("hello missing fields", frame(br#"{"type":"hello","token":"1.x"}"#), false),
        ("hello with wrong types", frame(br#"{"type":"hello","protocol":"1","token":1,"agent_version":null,"resume_after":-1}"#), false),
        ("output before hello", slate_proto::encode(&AgentMsg::Output { seq: 1, step: 0, stream: slate_proto::Stream::Stdout, data: b"x".to_vec() }).unwrap(), false),
        ("heartbeat before hello", slate_proto::encode(&AgentMsg::Heartbeat).unwrap(), false),
        ("a server message", slate_proto::encode(&ServerMsg::Ack { seq: 1 }).unwrap(), false),
        ("wrong protocol", hello(&t1, PROTOCOL_VERSION + 1), false),
        ("another job's token", hello(&t2, PROTOCOL_VERSION), false),
        ("a used token (job ended)", hello(&used, PROTOCOL_VERSION), false),
        ("forged secret", hello(&format!("1.{}", "0".repeat(64)), PROTOCOL_VERSION), false),
        ("job 1's secret under id 2", hello(&format!("2.{}", t1.split_once('.').unwrap().1), PROTOCOL_VERSION), false),
        ("empty token", hello("", PROTOCOL_VERSION), false),
        ("token id overflows", hello("99999999999999999999.abc", PROTOCOL_VERSION), false),
        ("token id negative", hello("-1.abc", PROTOCOL_VERSION), false),
        ("token with NUL", hello("1.\u{0}", PROTOCOL_VERSION), false),
        ("silence (no hello in time)", vec![], true),
        ("half a frame, then silence", vec![0, 0, 0, 50, b'{'], true),
    ];
    let n = cases.len();
    for (what, bytes, hold) in cases {
        let (r, back) = offer(&reg, bytes, hold).await;
        let err = r.expect_err(what);
        assert!(!err.to_string().is_empty(), "{what}");
        // Nothing reached job 1's runner.
        assert!(rx1.try_recv().is_err(), "{what} was routed to job 1");
        // A refused hello is answered with a reason when it could be read at all.
        if matches!(
            err,
            HelloError::BadToken | HelloError::Protocol(_) | HelloError::NotHello
        ) {
            let m: ServerMsg = slate_proto::read_frame(&mut &back[..])
                .unwrap_or_else(|e| panic!("{what}: no reject frame: {e}"));
            assert!(matches!(m, ServerMsg::Reject { .. }), "{what}: {m:?}");
        }
        if what.contains("oversized")
            || what.contains("over MAX_FRAME")
            || what.contains("u32::MAX")
        {
            assert!(
                err.to_string().contains("exceeds the limit"),
                "{what}: {err}"
            );
        }
        if what.starts_with("silence") || what.starts_with("half") {
            assert_eq!(err, HelloError::Timeout, "{what}");
        }
        eprintln!("agent frame: {what}: refused: {err}");
    }
    // The registry is unchanged: job 1's own token still routes to it.
    let (r, _) = offer(&reg, hello(&t1, PROTOCOL_VERSION), false).await;
    assert_eq!(r, Ok(JobId(1)));
    assert!(rx1.recv().await.is_some());
    eprintln!("agent frames: {n} malformed or hostile hellos refused, 0 panics, the good token still routes");
}
