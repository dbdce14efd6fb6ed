//! Test support for the web UI: an `App` on a temporary data dir served on port 0, with
//! builds, jobs and logs put in directly (no scheduler, no sandbox), and a minimal W3C
//! WebDriver client for Debian's chromedriver.

#![allow(dead_code)]

use serde_json::{json, Value};
use slate_core::config::Config;
use slate_core::{BuildId, Change, JobId, JobState, StepRecord, Trigger};
use slate_server::ui::UiConfig;
use slate_server::{App, AppOptions};
use slate_store::NewBuild;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const REPO: &str = "octo/hello";
pub const OTHER_REPO: &str = "octo/other";

pub struct Server {
    pub app: Arc<App>,
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    // Last: removed after the server stopped using it.
    pub dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(ui: UiConfig) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("slate-ui-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("image");
        std::fs::create_dir_all(&image).unwrap();
        // The app checks that an agent binary exists; nothing runs it here.
        let agent = dir.path().join("slate-agent");
        std::fs::write(&agent, b"").unwrap();
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
agent_binary = "{agent}"

[[repo]]
name = "{REPO}"
url = "/nonexistent/hello.git"
pipeline = "default"

[[repo]]
name = "{OTHER_REPO}"
url = "/nonexistent/other.git"
pipeline = "default"

[[pool]]
name = "busybox"
provider = "sandbox"
image = "{image}"
max_jobs = 2
limits = {{ memory = "256MiB", pids = 256, timeout = "2m" }}

[[pipeline]]
name = "default"
pools = ["busybox"]
steps = [{{ name = "build", run = "make" }}, {{ name = "test", run = "make test" }}]
"#,
            data = dir.path().join("data").display(),
            agent = agent.display(),
            image = image.display(),
        );
        let config = Config::parse(&text, "slate.toml").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = App::build(
            config,
            AppOptions {
                bound_addr: Some(addr),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let router = slate_server::router_with_ui(app.clone(), ui);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Server {
            app,
            url: format!("http://{addr}"),
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            // Open SSE streams would hold a graceful shutdown; they are the test's own.
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// A build of a pull request with one job per pool, returned with its job ids.
    pub async fn pr_build(
        &self,
        repo: &str,
        pr: u64,
        title: &str,
        branch: &str,
    ) -> (BuildId, Vec<JobId>) {
        self.app
            .store
            .create_build(NewBuild {
                change: Change {
                    repo: repo.into(),
                    trigger: Trigger::PullRequest {
                        number: pr,
                        title: title.into(),
                        from_fork: false,
                    },
                    head_sha: format!("{:040x}", pr),
                    head_ref: branch.into(),
                    base_sha: Some("b".repeat(40)),
                    base_ref: Some("main".into()),
                    author: "octocat".into(),
                },
                pipeline: "default".into(),
                event_id: None,
                checkout_sha: None,
                jobs: vec![slate_store::NewJob::pool("busybox")],
            })
            .await
            .unwrap()
    }

    pub async fn set_state(&self, job: JobId, path: &[JobState]) {
        let mut from = self.app.store.get_job(job).await.unwrap().state;
        for to in path {
            assert!(
                self.app
                    .store
                    .transition_job(job, &[from], *to, None)
                    .await
                    .unwrap(),
                "{from} -> {to}"
            );
            from = *to;
        }
    }

    pub async fn step(&self, job: JobId, index: u32, name: &str, exit: Option<i32>) {
        let now = chrono::Utc::now();
        self.app
            .store
            .upsert_step(&StepRecord {
                job_id: job,
                index,
                name: name.into(),
                started_at: Some(now - chrono::Duration::milliseconds(1500)),
                finished_at: exit.map(|_| now),
                exit_code: exit,
                outcome: exit.map(|c| if c == 0 { "ok".into() } else { "failed".into() }),
            })
            .await
            .unwrap();
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, String) {
        let r = self
            .http()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let s = r.status();
        (s, r.text().await.unwrap())
    }
}

/// The value of `name="NAME" value="…"` in a page (hidden form fields).
pub fn hidden(page: &str, name: &str) -> Option<String> {
    let at = page.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &page[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_string())
}

/// `NAME=value` from Set-Cookie headers.
pub fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<(String, String)> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v[name.len() + 1..].split(';').next().unwrap().to_string();
            (value, v.to_string())
        })
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Where screenshots go: `<target dir>/ui-screenshots`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free port, killed on drop; one Chromium session through it.
pub struct Browser {
    driver: std::process::Child,
    base: String,
    session: Option<String>,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    pub async fn start() -> Browser {
        for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: run scripts/ui-deps.sh"
            );
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let profile = tempfile::Builder::new()
            .prefix("slate-ui-chromium-")
            .tempdir()
            .unwrap();
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b
            .http
            .get(format!("{}/status", b.base))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", b._profile.path().display()),
        ];
        let v = b
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
                }}}),
            )
            .await;
        b.session = Some(v["sessionId"].as_str().unwrap().to_string());
        b
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "webdriver {path}: {status} {v}");
        v["value"].clone()
    }

    fn s(&self) -> String {
        format!("/session/{}", self.session.as_ref().unwrap())
    }

    pub async fn goto(&self, url: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("{}/url", self.s()),
            json!({"url": url}),
        )
        .await;
    }

    pub async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("{}/element", self.s()),
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("{}/element/{e}/text", self.s()),
                Value::Null,
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("{}/element/{e}/click", self.s()),
            json!({}),
        )
        .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("{}/element/{e}/value", self.s()),
            json!({"text": text}),
        )
        .await;
    }

    pub async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            &format!("{}/execute/sync", self.s()),
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Poll `script` until it returns true.
    pub async fn wait_for(&self, what: &str, script: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.script(script).await == Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("{}/screenshot", self.s()),
                Value::Null,
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        let path = screenshot_dir().join(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    /// End the session (Chromium exits) and chromedriver.
    pub async fn quit(mut self) {
        if let Some(s) = self.session.take() {
            let _ = self
                .http
                .delete(format!("{}/session/{s}", self.base))
                .send()
                .await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test still stops chromedriver, which takes its Chromium with it.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
