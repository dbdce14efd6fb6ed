//! The HTTP client side of the CLI: submit, logs, builds, jobs, cancel.

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;
use slate_server::api::{BuildView, JobView};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub struct ServerArgs {
    /// Base URL of the slate server.
    #[arg(long, env = "SLATE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token (from `slate token create`) for actions: submit, cancel.
    #[arg(long, env = "SLATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.server.trim_end_matches('/'), path)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let req = reqwest::Client::new().post(self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(s: &ServerArgs, path: &str) -> Result<T> {
    let resp = reqwest::get(s.url(path))
        .await
        .with_context(|| format!("connecting to {}", s.server))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("{path}: {status}: {body}");
    }
    Ok(resp.json().await?)
}

pub async fn submit(s: &ServerArgs, repo: &str, branch: &str, wait: bool) -> Result<i32> {
    let resp = s
        .post("/api/v1/submit")
        .json(&serde_json::json!({"repo": repo, "branch": branch}))
        .send()
        .await
        .with_context(|| format!("connecting to {}", s.server))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "submit refused ({status}): {}",
            body.get("error").and_then(Value::as_str).unwrap_or("")
        );
    }
    let Some(build) = body.get("build_id").and_then(Value::as_i64) else {
        println!("nothing to build (path filters matched no file)");
        return Ok(0);
    };
    println!("build {build}");
    if !wait {
        return Ok(0);
    }
    loop {
        let b: BuildView = get_json(s, &format!("/api/v1/builds/{build}")).await?;
        if b.jobs.iter().all(|j| j.state.is_terminal()) {
            print_jobs(&b.jobs);
            let ok = b
                .jobs
                .iter()
                .all(|j| j.state == slate_core::JobState::Succeeded);
            return Ok(if ok { 0 } else { 1 });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn logs(s: &ServerArgs, job: i64, follow: bool) -> Result<i32> {
    let path = format!(
        "/api/v1/jobs/{job}/log{}",
        if follow { "?follow=1" } else { "" }
    );
    let resp = reqwest::get(s.url(&path))
        .await
        .with_context(|| format!("connecting to {}", s.server))?;
    if !resp.status().is_success() {
        bail!("{path}: {}", resp.status());
    }
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    Ok(0)
}

fn dur(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms >= 60_000 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

fn print_jobs(jobs: &[JobView]) {
    println!(
        "{:<6} {:<14} {:<12} {:<8} {:<3} REASON",
        "JOB", "POOL", "STATE", "TIME", "TRY"
    );
    for j in jobs {
        println!(
            "{:<6} {:<14} {:<12} {:<8} {:<3} {}",
            j.id,
            j.pool,
            j.state.as_str(),
            dur(j.duration_ms),
            j.attempt,
            j.reason.clone().unwrap_or_default()
        );
    }
}

pub async fn builds(
    s: &ServerArgs,
    repo: Option<String>,
    pr: Option<u64>,
    limit: u32,
    json: bool,
) -> Result<i32> {
    let mut q = vec![format!("limit={limit}")];
    if let Some(r) = repo {
        q.push(format!("repo={r}"));
    }
    if let Some(p) = pr {
        q.push(format!("pr={p}"));
    }
    let builds: Vec<BuildView> = get_json(s, &format!("/api/v1/builds?{}", q.join("&"))).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&builds)?);
        return Ok(0);
    }
    println!(
        "{:<6} {:<24} {:<14} {:<9} {:<20} JOBS",
        "BUILD", "REPO", "CHANGE", "HEAD", "CREATED"
    );
    for b in builds {
        let change = match &b.trigger {
            slate_core::Trigger::PullRequest { number, .. } => format!("PR #{number}"),
            slate_core::Trigger::Push { branch } => format!("push {branch}"),
            slate_core::Trigger::Manual { branch } => format!("submit {branch}"),
        };
        let jobs: Vec<String> = b
            .jobs
            .iter()
            .map(|j| format!("{}:{}", j.pool, j.state.as_str()))
            .collect();
        println!(
            "{:<6} {:<24} {:<14} {:<9} {:<20} {}",
            b.id,
            b.repo,
            change,
            b.head_sha.chars().take(8).collect::<String>(),
            b.created_at.format("%Y-%m-%d %H:%M:%S"),
            jobs.join(" ")
        );
    }
    Ok(0)
}

pub async fn jobs(s: &ServerArgs, build: i64, json: bool) -> Result<i32> {
    let b: BuildView = get_json(s, &format!("/api/v1/builds/{build}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&b.jobs)?);
    } else {
        print_jobs(&b.jobs);
    }
    Ok(0)
}

pub async fn cancel(s: &ServerArgs, job: i64) -> Result<i32> {
    let resp = s
        .post(&format!("/api/v1/jobs/{job}/cancel"))
        .send()
        .await
        .with_context(|| format!("connecting to {}", s.server))?;
    if !resp.status().is_success() {
        bail!("cancel refused: {}", resp.status());
    }
    let v: Value = resp.json().await?;
    if v.get("cancelled").and_then(Value::as_bool) == Some(true) {
        println!("job {job} cancelled");
    } else {
        println!("job {job} had already finished");
    }
    Ok(0)
}
