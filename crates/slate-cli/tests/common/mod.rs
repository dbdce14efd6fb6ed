//! Drives the real `slate` binary: a config in a temp dir, a busybox image, the static
//! agent, a local git "remote" with pull request refs, and a GitHub API recorder.

#![allow(dead_code)]

use serde_json::Value;
use slate_testkit::github::{pr_payload, push_payload, sign, GithubRecorder, RecordedStatus};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const REPO: &str = "octo/hello";
pub const SECRET: &str = "It's a Secret to Everybody";

/// One busybox image shared by the tests (never written to: tests check). It lives in
/// cargo's per-target temp dir, made once and reused, so no run leaves a copy in /tmp
/// (a static's TempDir is never dropped).
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("busybox-rootfs");
        if !root.join("bin/busybox").exists() {
            // Built aside and renamed into place: a concurrent test binary either wins
            // the rename or finds the finished image.
            let tmp = root.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            slate_testkit::image::busybox_rootfs(&tmp).unwrap();
            if std::fs::rename(&tmp, &root).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        root
    })
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct Options {
    pub steps: String,
    pub max_jobs: u32,
    pub extra_pipeline: String,
    pub pool_limits: String,
    pub repo_extra: String,
    /// Extra lines in the `[[pool]]` table (may open `[[pool.cache]]` tables).
    pub pool_extra: String,
    pub provider: String,
    /// Extra lines in `[server]` (database, replica_id…).
    pub server_extra: String,
    /// How long SIGTERM lets running jobs finish.
    pub shutdown_grace: String,
    /// The pool's image; the shared busybox rootfs when `None`.
    pub image: Option<PathBuf>,
    /// Lines after the pipeline's `steps` (may open `[pipeline.plan]`).
    pub pipeline_tail: String,
    /// Top-level tables at the end of the config (`[[secret]]`…).
    pub config_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            steps: r#"
  { name = "build", run = "cat greeting.txt && echo built > out.txt" },
  { name = "deploy", run = "echo deploying", on = ["push"] },
"#
            .into(),
            max_jobs: 2,
            extra_pipeline: String::new(),
            pool_limits: r#"{ memory = "256MiB", pids = 256, timeout = "2m" }"#.into(),
            repo_extra: r#"branches = ["main"]"#.into(),
            pool_extra: String::new(),
            provider: "sandbox".into(),
            server_extra: String::new(),
            shutdown_grace: "2s".into(),
            image: None,
            pipeline_tail: String::new(),
            config_extra: String::new(),
        }
    }
}

pub struct Slate {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub config: PathBuf,
    pub github: GithubRecorder,
    pub remote: PathBuf,
    pub work: PathBuf,
    pub url: String,
    /// An API token for actions (submit, cancel).
    pub token: String,
    child: Option<Child>,
    http: reqwest::blocking::Client,
}

pub fn slate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slate"))
}

impl Slate {
    pub fn start(opts: Options) -> Slate {
        Self::start_with(opts, |_| {})
    }

    /// Like [`Slate::start`], running `before` with the data dir before the server starts.
    pub fn start_with(opts: Options, before: impl FnOnce(&Path)) -> Slate {
        let dir = tempfile::Builder::new()
            .prefix("slate-e2e-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let remote = dir.path().join("remote.git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(
            dir.path(),
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                remote.to_str().unwrap(),
            ],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("greeting.txt"), "hello from main\n").unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-qm", "initial"]);
        git(&work, &["push", "-q", remote.to_str().unwrap(), "main"]);

        let github = GithubRecorder::start();
        let secret_file = dir.path().join("webhook-secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "ghp_testtoken").unwrap();
        let config = dir.path().join("slate.toml");
        let text = format!(
            r#"[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
agent_binary = "{agent}"
shutdown_grace = "{grace}"
{server_extra}

[github]
api_url = "{api}"
webhook_secret_file = "{secret}"
token_file = "{token}"

[[repo]]
name = "{REPO}"
url = "{remote}"
pipeline = "default"
{repo_extra}

[[pool]]
name = "busybox"
provider = "{provider}"
image = "{image}"
max_jobs = {max_jobs}
limits = {limits}
{pool_extra}

[[pipeline]]
name = "default"
pools = ["busybox"]
{extra}
steps = [{steps}]
{pipeline_tail}

{config_extra}
"#,
            data = data.display(),
            agent = slate_testkit::agent_bin::static_agent().display(),
            api = github.url(),
            secret = secret_file.display(),
            token = token_file.display(),
            remote = remote.display(),
            repo_extra = opts.repo_extra,
            image = opts.image.as_deref().unwrap_or(image()).display(),
            provider = opts.provider,
            server_extra = opts.server_extra,
            grace = opts.shutdown_grace,
            max_jobs = opts.max_jobs,
            limits = opts.pool_limits,
            pool_extra = opts.pool_extra,
            extra = opts.extra_pipeline,
            steps = opts.steps,
            pipeline_tail = opts.pipeline_tail,
            config_extra = opts.config_extra,
        );
        std::fs::write(&config, text).unwrap();
        let mut s = Slate {
            dir,
            data,
            config,
            github,
            remote,
            work,
            url: String::new(),
            token: String::new(),
            child: None,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        before(&s.data);
        s.spawn();
        let out = Command::new(slate_bin())
            .args(["token", "create", "e2e", "--config"])
            .arg(&s.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        s
    }

    /// Start (or restart) the server process.
    pub fn spawn(&mut self) {
        let addr_file = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(slate_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("SLATE_LOG", "info,slate_server=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addr_file.exists() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("slate serve exited with {st}: {}", self.server_log());
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.url = format!(
            "http://{}",
            std::fs::read_to_string(&addr_file).unwrap().trim()
        );
        // Wait until it answers (recovery runs before serving).
        while self
            .http
            .get(format!("{}/healthz", self.url))
            .send()
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "server not healthy: {}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILL the server: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the server requeues its jobs and destroys its workers.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("server did not stop on SIGTERM: {}", self.server_log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn workers_root(&self) -> PathBuf {
        self.data.join("workers")
    }

    /// Everything of slate's still on the host for this server's data dir.
    pub fn leaks(&self) -> Vec<String> {
        let mut leaks = slate_testkit::leaks::slate_leaks(&self.workers_root());
        for sub in ["sources", "sockets"] {
            if let Ok(rd) = std::fs::read_dir(self.data.join(sub)) {
                for e in rd.flatten() {
                    leaks.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        leaks
    }

    /// Commit a change on a new branch and publish it as `refs/pull/N/head`.
    pub fn make_pr(
        &self,
        number: u64,
        branch: &str,
        file: &str,
        content: &str,
    ) -> (String, String) {
        let base = git(&self.work, &["rev-parse", "main"]);
        git(&self.work, &["checkout", "-q", "-B", branch, "main"]);
        std::fs::write(self.work.join(file), content).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-qm", &format!("change {file}")]);
        let head = git(&self.work, &["rev-parse", "HEAD"]);
        git(
            &self.work,
            &[
                "push",
                "-qf",
                self.remote.to_str().unwrap(),
                &format!("{branch}:refs/pull/{number}/head"),
                &format!("{branch}:{branch}"),
            ],
        );
        git(&self.work, &["checkout", "-q", "main"]);
        (base, head)
    }

    /// Add a commit on top of an existing PR branch and move `refs/pull/N/head`.
    pub fn push_pr(&self, number: u64, branch: &str, file: &str, content: &str) -> String {
        git(&self.work, &["checkout", "-q", branch]);
        std::fs::write(self.work.join(file), content).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-qm", &format!("update {file}")]);
        let head = git(&self.work, &["rev-parse", "HEAD"]);
        git(
            &self.work,
            &[
                "push",
                "-qf",
                self.remote.to_str().unwrap(),
                &format!("{branch}:refs/pull/{number}/head"),
                &format!("{branch}:{branch}"),
            ],
        );
        git(&self.work, &["checkout", "-q", "main"]);
        head
    }

    pub fn pr_event(
        &self,
        action: &str,
        number: u64,
        branch: &str,
        head: &str,
        base: &str,
    ) -> Vec<u8> {
        pr_payload(
            action,
            REPO,
            &format!("https://github.com/{REPO}.git"),
            number,
            head,
            branch,
            base,
            "main",
        )
    }

    pub fn push_event(&self, branch: &str, before: &str, after: &str) -> Vec<u8> {
        push_payload(
            REPO,
            &format!("https://github.com/{REPO}.git"),
            branch,
            before,
            after,
        )
    }

    /// POST a webhook signed with the right secret.
    pub fn webhook(&self, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
        self.webhook_raw(event, delivery, body, Some(&sign(SECRET, body)))
    }

    pub fn webhook_raw(
        &self,
        event: &str,
        delivery: &str,
        body: &[u8],
        sig: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/hooks/github", self.url))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_vec());
        if let Some(s) = sig {
            req = req.header("x-hub-signature-256", s);
        }
        let resp = req.send().unwrap();
        let code = resp.status().as_u16();
        let v = resp.json().unwrap_or(Value::Null);
        (code, v)
    }

    pub fn get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{}", self.url, path))
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().unwrap()
    }

    pub fn get_text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{}", self.url, path))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn builds(&self) -> Vec<Value> {
        self.get("/api/v1/builds").as_array().unwrap().clone()
    }

    pub fn job(&self, id: i64) -> Value {
        self.get(&format!("/api/v1/jobs/{id}"))
    }

    /// Wait until job `id` exists and satisfies `pred`.
    pub fn wait_job(
        &self,
        id: i64,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let resp = self
                .http
                .get(format!("{}/api/v1/jobs/{id}", self.url))
                .send()
                .unwrap();
            if resp.status().is_success() {
                let v: Value = resp.json().unwrap();
                if pred(&v) {
                    return v;
                }
                if Instant::now() > deadline {
                    panic!(
                        "job {id} never became {what}: {v:#}\nlog:\n{}\nserver:\n{}",
                        self.log(id),
                        self.server_log()
                    );
                }
            } else if Instant::now() > deadline {
                panic!("job {id} never appeared\nserver:\n{}", self.server_log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn wait_state(&self, id: i64, state: &str) -> Value {
        self.wait_job(id, state, Duration::from_secs(90), |v| v["state"] == state)
    }

    pub fn wait_terminal(&self, id: i64) -> Value {
        self.wait_job(id, "terminal", Duration::from_secs(90), |v| {
            matches!(
                v["state"].as_str(),
                Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
            )
        })
    }

    pub fn log(&self, id: i64) -> String {
        self.get_text(&format!("/api/v1/jobs/{id}/log"))
    }

    pub fn wait_status(&self, sha: &str, state: &str) -> RecordedStatus {
        self.github
            .wait_for_status_blocking(
                |s| s.sha == sha && s.state == state,
                Duration::from_secs(30),
            )
            .unwrap_or_else(|| {
                panic!(
                    "no {state} status for {sha}: {:#?}\nserver:\n{}",
                    self.github.statuses(),
                    self.server_log()
                )
            })
    }

    /// Run the `slate` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(slate_bin())
            .args(args)
            .env("SLATE_SERVER", &self.url)
            .env("SLATE_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    /// Assert nothing of slate's is left on the host; a job's cleanup runs just after its
    /// state turns terminal (a cancel is recorded first), so allow it a moment.
    pub fn assert_no_leaks(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leaks = self.leaks();
            if leaks.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "leaked: {leaks:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop, then assert nothing of slate's is left on the host.
    pub fn shutdown_clean(mut self) {
        self.stop();
        let leaks = self.leaks();
        assert!(leaks.is_empty(), "leaked after shutdown: {leaks:#?}");
    }
}

impl Drop for Slate {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // Whatever a failed test left mounted under its temp dir (its own workers, a
        // second replica's, cache overlays) goes before the dir is removed.
        for m in slate_testkit::leaks::mount_points().into_iter().rev() {
            if m.starts_with(self.dir.path()) {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}
