//! Commit statuses: what to report, the sink trait, and the GitHub implementation.

use async_trait::async_trait;
use octocrab::models::{Status, StatusState};
use octocrab::service::middleware::retry::RetryConfig;
use octocrab::Octocrab;
use slate_core::{ReportState, Secret};
use std::time::Duration;

/// GitHub refuses status descriptions longer than this many characters.
pub const MAX_DESCRIPTION_CHARS: usize = 140;

/// One commit status to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    /// `owner/name`.
    pub repo: String,
    pub sha: String,
    pub state: ReportState,
    /// The status name shown on the PR, e.g. `slate/linux-x86_64`.
    pub context: String,
    /// Truncated to [`MAX_DESCRIPTION_CHARS`] when sent.
    pub description: String,
    pub target_url: Option<String>,
}

impl StatusUpdate {
    /// Statuses for the same key replace each other on GitHub, so they must stay in order.
    pub fn key(&self) -> (String, String, String) {
        (self.repo.clone(), self.sha.clone(), self.context.clone())
    }
}

/// Shortens `s` to GitHub's limit, ending with `…` when something was cut.
pub fn truncate_description(s: &str) -> String {
    if s.chars().count() <= MAX_DESCRIPTION_CHARS {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_DESCRIPTION_CHARS - 1).collect();
    out.push('…');
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("invalid github api url {url}: {reason}")]
    InvalidApiUrl { url: String, reason: String },
    #[error("invalid repository {0:?}: expected owner/name")]
    InvalidRepo(String),
    #[error("github answered {status}: {message}")]
    Api {
        status: u16,
        message: String,
        /// Server-requested wait (`Retry-After`), if any.
        retry_after: Option<Duration>,
    },
    #[error("github api unreachable: {0}")]
    Transport(String),
    #[error("github api request could not be built: {0}")]
    Request(String),
    #[error("unexpected github response body: {0}")]
    Decode(String),
}

impl ForgeError {
    /// Transient failures worth retrying: 5xx, 429, rate-limit 403s, network errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            ForgeError::Api {
                status,
                retry_after,
                ..
            } => *status >= 500 || *status == 429 || retry_after.is_some(),
            ForgeError::Transport(_) => true,
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ForgeError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Where commit statuses go.
#[async_trait]
pub trait StatusSink: Send + Sync {
    async fn post_status(&self, s: &StatusUpdate) -> Result<(), ForgeError>;
}

/// Posts commit statuses through the GitHub REST API.
pub struct GithubStatuses {
    crab: Octocrab,
}

impl std::fmt::Debug for GithubStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GithubStatuses")
    }
}

fn state_of(s: ReportState) -> StatusState {
    match s {
        ReportState::Pending => StatusState::Pending,
        ReportState::Success => StatusState::Success,
        ReportState::Failure => StatusState::Failure,
        ReportState::Error => StatusState::Error,
    }
}

/// Joins an error and its sources; octocrab's own Display adds a backtrace we don't want.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

fn classify(e: octocrab::Error) -> ForgeError {
    match e {
        octocrab::Error::Service { source, .. } => ForgeError::Transport(chain(source.as_ref())),
        octocrab::Error::Hyper { source, .. } => ForgeError::Transport(chain(&source)),
        octocrab::Error::Other { source, .. } => ForgeError::Transport(chain(source.as_ref())),
        other => {
            // Variants carry snafu backtraces in Display; keep only the first line.
            let msg = other.to_string();
            ForgeError::Request(msg.lines().next().unwrap_or_default().to_string())
        }
    }
}

fn retry_after(headers: &http::HeaderMap, status: u16) -> Option<Duration> {
    let secs = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(secs) = secs {
        return Some(Duration::from_secs(secs));
    }
    // A primary rate limit is a 403 with no requests left.
    let exhausted = headers
        .get("x-ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        == Some("0");
    (status == 403 && exhausted).then_some(Duration::from_secs(60))
}

impl GithubStatuses {
    /// `api_url` is `https://api.github.com`, or `https://ghe.example/api/v3` for
    /// GitHub Enterprise; `token` is sent as a bearer token.
    pub fn new(api_url: &str, token: Option<Secret>) -> Result<GithubStatuses, ForgeError> {
        let invalid = |reason: String| ForgeError::InvalidApiUrl {
            url: api_url.to_string(),
            reason,
        };
        let mut builder = Octocrab::builder()
            .base_uri(api_url)
            .map_err(|e| invalid(classify(e).to_string()))?
            // The Reporter owns retries (with backoff and counters), so octocrab must not.
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)))
            .set_write_timeout(Some(Duration::from_secs(30)));
        if let Some(token) = token {
            builder = builder.personal_token(token.expose().to_string());
        }
        let crab = builder
            .build()
            .map_err(|e| invalid(classify(e).to_string()))?;
        Ok(GithubStatuses { crab })
    }

    /// Posts `s` and returns GitHub's status object.
    pub async fn create(&self, s: &StatusUpdate) -> Result<Status, ForgeError> {
        let (owner, name) = s
            .repo
            .split_once('/')
            .filter(|(o, n)| valid_segment(o) && valid_segment(n))
            .ok_or_else(|| ForgeError::InvalidRepo(s.repo.clone()))?;
        if !s.sha.chars().all(|c| c.is_ascii_alphanumeric()) || s.sha.is_empty() {
            return Err(ForgeError::Request(format!(
                "invalid commit sha {:?}",
                s.sha
            )));
        }
        let repos = self.crab.repos(owner, name);
        let mut req = repos
            .create_status(s.sha.clone(), state_of(s.state))
            .context(s.context.clone())
            .description(truncate_description(&s.description));
        if let Some(url) = &s.target_url {
            req = req.target(url.clone());
        }
        // Same route and body as `req.send()`, but we read the response ourselves so an
        // error keeps its status code even when the body is not GitHub's JSON (a proxy's
        // 502 page), which decides whether to retry.
        let route = format!("/repos/{owner}/{name}/statuses/{}", s.sha);
        let resp = self
            .crab
            ._post(route.as_str(), Some(&req))
            .await
            .map_err(classify)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = self.crab.body_to_string(resp).await.map_err(classify)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(str::to_string))
                .unwrap_or_else(|| body.chars().take(200).collect());
            return Err(ForgeError::Api {
                status,
                message,
                retry_after: retry_after(&headers, status),
            });
        }
        serde_json::from_str(&body).map_err(|e| ForgeError::Decode(e.to_string()))
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[async_trait]
impl StatusSink for GithubStatuses {
    async fn post_status(&self, s: &StatusUpdate) -> Result<(), ForgeError> {
        match self.create(s).await {
            Ok(_) => Ok(()),
            // GitHub accepted it; a body we cannot read does not undo that.
            Err(ForgeError::Decode(e)) => {
                tracing::warn!(repo = %s.repo, sha = %s.sha, error = %e, "status posted but response not understood");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_descriptions_are_kept() {
        assert_eq!(truncate_description("build passed"), "build passed");
        let exact = "x".repeat(MAX_DESCRIPTION_CHARS);
        assert_eq!(truncate_description(&exact), exact);
    }

    #[test]
    fn long_descriptions_are_cut_to_140_chars_on_char_boundaries() {
        let long = "é".repeat(300);
        let cut = truncate_description(&long);
        assert_eq!(cut.chars().count(), MAX_DESCRIPTION_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn retryable_errors_are_told_apart() {
        let api = |status| ForgeError::Api {
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(api(502).is_retryable());
        assert!(api(500).is_retryable());
        assert!(api(429).is_retryable());
        assert!(!api(404).is_retryable());
        assert!(!api(422).is_retryable());
        assert!(!api(401).is_retryable());
        assert!(ForgeError::Transport("connection refused".into()).is_retryable());
        assert!(!ForgeError::InvalidRepo("x".into()).is_retryable());
    }

    #[test]
    fn rate_limited_403_is_retryable() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h, 403), None);
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        assert_eq!(retry_after(&h, 403), Some(Duration::from_secs(60)));
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h, 403), Some(Duration::from_secs(7)));
    }

    #[test]
    fn bad_api_url_is_rejected() {
        let err = GithubStatuses::new("not a url", None).unwrap_err();
        assert!(matches!(err, ForgeError::InvalidApiUrl { .. }), "{err:?}");
    }
}
