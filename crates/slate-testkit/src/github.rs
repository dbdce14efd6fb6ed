//! A local stand-in for the GitHub API that records calls, plus signed webhook fixtures.

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Headers kept on every recorded request (lower case).
const RECORDED_HEADERS: &[&str] = &["authorization", "user-agent", "content-type", "accept"];

/// GitHub rejects longer status descriptions with a 422; the recorder does too.
const MAX_DESCRIPTION_CHARS: usize = 140;

/// One HTTP request the recorder received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path as received, including any base path prefix (e.g. `/api/v3/repos/...`).
    pub path: String,
    /// The headers of [`RECORDED_HEADERS`] that were present, by lower-case name.
    pub headers: BTreeMap<String, String>,
    /// The JSON body, or `Value::Null` when there was none or it was not JSON.
    pub body: Value,
    /// The HTTP status the recorder answered with.
    pub answered: u16,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A commit status the recorder accepted (answered 201).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedStatus {
    /// `owner/name`.
    pub repo: String,
    pub sha: String,
    pub state: String,
    pub context: Option<String>,
    pub description: Option<String>,
    pub target_url: Option<String>,
}

#[derive(Default)]
struct State {
    requests: Vec<RecordedRequest>,
    statuses: Vec<RecordedStatus>,
    /// Remaining injected failures and the status code they answer with.
    faults: Option<(usize, u16)>,
    next_id: u64,
}

/// A GitHub API stand-in on `127.0.0.1:<random port>`, served from its own thread and
/// runtime so sync and async tests can both use it. Dropping it stops the server.
pub struct GithubRecorder {
    url: String,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GithubRecorder {
    pub fn start() -> GithubRecorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();

        let app_state = state.clone();
        let app_url = url.clone();
        let thread = std::thread::Builder::new()
            .name("github-recorder".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("recorder runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = axum::Router::new().fallback(
                        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                            let state = app_state.clone();
                            let url = app_url.clone();
                            async move { handle(&state, &url, method, uri, headers, body) }
                        },
                    );
                    // Not graceful: clients keep pooled connections open, and dropping the
                    // runtime afterwards closes them.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = rx => {}
                    }
                });
            })
            .expect("spawn recorder thread");

        GithubRecorder {
            url,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Base URL to give an API client, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Statuses accepted so far, in arrival order.
    pub fn statuses(&self) -> Vec<RecordedStatus> {
        self.state.lock().unwrap().statuses.clone()
    }

    /// Answer the next `n` requests (any path) with `status_code` and a GitHub-style
    /// error body instead of handling them.
    pub fn fail_next(&self, n: usize, status_code: u16) {
        self.state.lock().unwrap().faults = (n > 0).then_some((n, status_code));
    }

    /// Polls (from async code) until an accepted status matches `pred`.
    pub async fn wait_for_status(
        &self,
        pred: impl Fn(&RecordedStatus) -> bool,
        timeout: Duration,
    ) -> Option<RecordedStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.statuses().into_iter().find(|s| pred(s)) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`GithubRecorder::wait_for_status`] for sync tests (sleeps the thread).
    pub fn wait_for_status_blocking(
        &self,
        pred: impl Fn(&RecordedStatus) -> bool,
        timeout: Duration,
    ) -> Option<RecordedStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.statuses().into_iter().find(|s| pred(s)) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Default for GithubRecorder {
    fn default() -> Self {
        Self::start()
    }
}

impl Drop for GithubRecorder {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(
    state: &Mutex<State>,
    base_url: &str,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let recorded_headers = RECORDED_HEADERS
        .iter()
        .filter_map(|name| {
            let v = headers.get(*name)?.to_str().ok()?;
            Some((name.to_string(), v.to_string()))
        })
        .collect();

    let mut st = state.lock().unwrap();
    let (code, reply) = if let Some((n, code)) = st.faults {
        st.faults = (n > 1).then_some((n - 1, code));
        (
            code,
            json!({ "message": format!("injected failure {code}") }),
        )
    } else {
        route(&mut st, base_url, &method, &path, &json_body)
    };
    st.requests.push(RecordedRequest {
        method: method.to_string(),
        path,
        headers: recorded_headers,
        body: json_body,
        answered: code,
    });
    drop(st);

    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(reply)).into_response()
}

fn route(
    st: &mut State,
    base_url: &str,
    method: &Method,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    // GitHub Enterprise serves the API under /api/v3.
    let api_path = path.strip_prefix("/api/v3").unwrap_or(path);
    let parts: Vec<&str> = api_path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["repos", owner, repo, "statuses", sha]) if !sha.is_empty() => {
            create_status(st, base_url, &format!("{owner}/{repo}"), sha, body)
        }
        _ => (404, not_found()),
    }
}

fn not_found() -> Value {
    json!({
        "message": "Not Found",
        "documentation_url": "https://docs.github.com/rest"
    })
}

fn validation_failed(field: &str, code: &str) -> Value {
    json!({
        "message": "Validation Failed",
        "errors": [{ "resource": "Status", "field": field, "code": code }],
        "documentation_url": "https://docs.github.com/rest/commits/statuses#create-a-commit-status"
    })
}

fn create_status(
    st: &mut State,
    base_url: &str,
    repo: &str,
    sha: &str,
    body: &Value,
) -> (u16, Value) {
    let state = body.get("state").and_then(Value::as_str).unwrap_or("");
    if !matches!(state, "pending" | "success" | "failure" | "error") {
        return (422, validation_failed("state", "invalid"));
    }
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    let description = text("description");
    if description
        .as_deref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_CHARS)
    {
        return (422, validation_failed("description", "custom"));
    }
    let context = text("context");
    let target_url = text("target_url");

    st.next_id += 1;
    let id = st.next_id;
    st.statuses.push(RecordedStatus {
        repo: repo.to_string(),
        sha: sha.to_string(),
        state: state.to_string(),
        context: context.clone(),
        description: description.clone(),
        target_url: target_url.clone(),
    });

    let now = "2024-01-01T00:00:00Z";
    let user = "slate-bot";
    let u = format!("{base_url}/users/{user}");
    let reply = json!({
        "url": format!("{base_url}/repos/{repo}/statuses/{sha}"),
        "avatar_url": "https://avatars.githubusercontent.com/u/1?v=4",
        "id": id,
        "node_id": format!("SC_kwDO{id}"),
        "state": state,
        "description": description,
        "target_url": target_url,
        "context": context.unwrap_or_else(|| "default".into()),
        "created_at": now,
        "updated_at": now,
        "creator": {
            "login": user,
            "id": 1,
            "node_id": "MDQ6VXNlcjE=",
            "avatar_url": "https://avatars.githubusercontent.com/u/1?v=4",
            "gravatar_id": "",
            "url": u,
            "html_url": format!("https://github.com/{user}"),
            "followers_url": format!("{u}/followers"),
            "following_url": format!("{u}/following{{/other_user}}"),
            "gists_url": format!("{u}/gists{{/gist_id}}"),
            "starred_url": format!("{u}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{u}/subscriptions"),
            "organizations_url": format!("{u}/orgs"),
            "repos_url": format!("{u}/repos"),
            "events_url": format!("{u}/events{{/privacy}}"),
            "received_events_url": format!("{u}/received_events"),
            "type": "Bot",
            "site_admin": false
        }
    });
    (201, reply)
}

/// The `X-Hub-Signature-256` header value GitHub would send for `body`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Directories searched for fixtures, in order: the repo's own copy, then the shared one
/// next to the repo root.
fn fixture_dirs() -> [PathBuf; 2] {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        manifest.join("../../tests/fixtures/github-webhooks"),
        manifest.join("../../../shared/fixtures/github-webhooks"),
    ]
}

/// The first fixture directory that exists.
pub fn fixture_dir() -> PathBuf {
    fixture_dirs()
        .into_iter()
        .find(|d| d.is_dir())
        .expect("no github-webhooks fixture directory (tests/fixtures/github-webhooks)")
}

/// Every fixture file as a relative name (`pull_request/opened.payload.json`), sorted.
pub fn fixture_names() -> Vec<String> {
    let dir = fixture_dir();
    let mut names = Vec::new();
    for event in std::fs::read_dir(&dir).expect("read fixture dir").flatten() {
        if !event.path().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(event.path())
            .expect("read fixture subdir")
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                names.push(format!("{}/{name}", event.file_name().to_string_lossy()));
            }
        }
    }
    names.sort();
    names
}

/// Raw bytes of a fixture, e.g. `fixture_bytes("push/payload.json")`.
pub fn fixture_bytes(name: &str) -> Vec<u8> {
    for dir in fixture_dirs() {
        let path = dir.join(name);
        if path.is_file() {
            return std::fs::read(&path)
                .unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()));
        }
    }
    panic!("no fixture named {name} in tests/fixtures/github-webhooks or shared fixtures");
}

/// A fixture parsed as JSON, e.g. `fixture("pull_request/opened.payload.json")`.
pub fn fixture(name: &str) -> Value {
    serde_json::from_slice(&fixture_bytes(name))
        .unwrap_or_else(|e| panic!("fixture {name} is not JSON: {e}"))
}

fn set_repo(repo: &mut Value, full_name: &str, clone_url: &str) {
    repo["full_name"] = json!(full_name);
    repo["clone_url"] = json!(clone_url);
    if let Some((owner, name)) = full_name.split_once('/') {
        repo["name"] = json!(name);
        repo["owner"]["login"] = json!(owner);
    }
}

/// A real `pull_request` payload for `action` with the fields the parser reads replaced.
/// Actions without a fixture of their own start from `opened`.
#[allow(clippy::too_many_arguments)]
pub fn pr_payload(
    action: &str,
    repo_full_name: &str,
    clone_url: &str,
    number: u64,
    head_sha: &str,
    head_ref: &str,
    base_sha: &str,
    base_ref: &str,
) -> Vec<u8> {
    let own = format!("pull_request/{action}.payload.json");
    let has_own = fixture_dirs().iter().any(|d| d.join(&own).is_file());
    let mut v = fixture(if has_own {
        &own
    } else {
        "pull_request/opened.payload.json"
    });
    let owner = repo_full_name.split('/').next().unwrap_or(repo_full_name);

    v["action"] = json!(action);
    v["number"] = json!(number);
    set_repo(&mut v["repository"], repo_full_name, clone_url);
    let pr = &mut v["pull_request"];
    pr["number"] = json!(number);
    pr["head"]["sha"] = json!(head_sha);
    pr["head"]["ref"] = json!(head_ref);
    pr["head"]["label"] = json!(format!("{owner}:{head_ref}"));
    set_repo(&mut pr["head"]["repo"], repo_full_name, clone_url);
    pr["base"]["sha"] = json!(base_sha);
    pr["base"]["ref"] = json!(base_ref);
    pr["base"]["label"] = json!(format!("{owner}:{base_ref}"));
    set_repo(&mut pr["base"]["repo"], repo_full_name, clone_url);
    serde_json::to_vec(&v).expect("serialize payload")
}

/// A real `push` payload for a branch push with the fields the parser reads replaced.
pub fn push_payload(
    repo_full_name: &str,
    clone_url: &str,
    branch: &str,
    before: &str,
    after: &str,
) -> Vec<u8> {
    let mut v = fixture("push/payload.json");
    v["ref"] = json!(format!("refs/heads/{branch}"));
    v["before"] = json!(before);
    v["after"] = json!(after);
    // The fixture is a tag deletion; a branch push is neither created nor deleted.
    v["created"] = json!(false);
    v["deleted"] = json!(false);
    set_repo(&mut v["repository"], repo_full_name, clone_url);
    serde_json::to_vec(&v).expect("serialize payload")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_githubs_documented_example() {
        // From GitHub's "Validating webhook deliveries" docs.
        assert_eq!(
            sign("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn pr_payload_rewrites_parser_fields_and_keeps_the_rest() {
        let body = pr_payload(
            "ready_for_review",
            "acme/widgets",
            "https://x/acme/widgets.git",
            7,
            "h1",
            "feat",
            "b1",
            "main",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["action"], "ready_for_review");
        assert_eq!(v["pull_request"]["number"], 7);
        assert_eq!(
            v["pull_request"]["head"]["repo"]["full_name"],
            "acme/widgets"
        );
        assert_eq!(v["pull_request"]["base"]["sha"], "b1");
        assert_eq!(v["repository"]["clone_url"], "https://x/acme/widgets.git");
        assert!(v["pull_request"]["_links"].is_object(), "real shape kept");
    }

    #[test]
    fn recorder_accepts_statuses_and_injects_faults() {
        let rec = GithubRecorder::start();
        let post = |body: &str| {
            let addr = rec.url().trim_start_matches("http://").to_string();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            use std::io::{Read, Write};
            write!(
                s,
                "POST /repos/o/r/statuses/abc HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        rec.fail_next(1, 502);
        assert!(post(r#"{"state":"pending"}"#).starts_with("HTTP/1.1 502"));
        assert!(post(r#"{"state":"pending","context":"ci"}"#).starts_with("HTTP/1.1 201"));
        assert!(post(r#"{"state":"bogus"}"#).starts_with("HTTP/1.1 422"));
        let statuses = rec.statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].context.as_deref(), Some("ci"));
        assert_eq!(rec.requests().len(), 3);
    }
}
