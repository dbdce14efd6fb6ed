//! GitHub webhook deliveries: signature verification and parsing into domain events.

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::Sha256;
use slate_core::{Change, Secret, Trigger};

/// Why a delivery's `X-Hub-Signature-256` was refused. No variant carries the secret
/// or the expected digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no webhook secret configured: refusing to accept unsigned deliveries")]
    NoSecret,
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("signature header does not start with sha256= (only sha256 signatures are accepted)")]
    UnsupportedAlgorithm,
    #[error("signature is not 64 hex digits")]
    BadHex,
    #[error("signature does not match the body")]
    Mismatch,
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against an HMAC-SHA256 of the raw body,
/// in constant time.
pub fn verify_signature(
    secret: &Secret,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    // An empty key would make any sender able to sign: treat it as misconfiguration.
    if secret.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let digest = header
        .strip_prefix("sha256=")
        .ok_or(SignatureError::UnsupportedAlgorithm)?;
    let digest = hex::decode(digest).map_err(|_| SignatureError::BadHex)?;
    if digest.len() != 32 {
        return Err(SignatureError::BadHex);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("hmac accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&digest)
        .map_err(|_| SignatureError::Mismatch)
}

/// A payload that could not be read as the event it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("invalid {event} payload at `{path}`: {source}")]
    Json {
        event: String,
        /// Where in the document it failed, e.g. `pull_request.head`.
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid {event} payload: {reason}")]
    Invalid { event: String, reason: String },
}

/// A webhook delivery, reduced to what the server acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    Ping {
        zen: Option<String>,
    },
    PullRequest(PullRequestEvent),
    Push(PushEvent),
    /// A delivery the server does not act on (unknown event type, tag push…).
    Ignored {
        event: String,
        reason: String,
    },
}

/// `pull_request` actions; the ones the server does not act on are kept as `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrAction {
    Opened,
    Reopened,
    Synchronize,
    ReadyForReview,
    Closed,
    Other(String),
}

impl PrAction {
    pub fn parse(action: &str) -> PrAction {
        match action {
            "opened" => PrAction::Opened,
            "reopened" => PrAction::Reopened,
            "synchronize" => PrAction::Synchronize,
            "ready_for_review" => PrAction::ReadyForReview,
            "closed" => PrAction::Closed,
            other => PrAction::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            PrAction::Opened => "opened",
            PrAction::Reopened => "reopened",
            PrAction::Synchronize => "synchronize",
            PrAction::ReadyForReview => "ready_for_review",
            PrAction::Closed => "closed",
            PrAction::Other(s) => s,
        }
    }

    /// Whether this action starts a build. Drafts are built only once marked ready.
    pub fn builds(&self, draft: bool) -> bool {
        match self {
            PrAction::Opened | PrAction::Reopened | PrAction::Synchronize => !draft,
            PrAction::ReadyForReview => true,
            PrAction::Closed | PrAction::Other(_) => false,
        }
    }

    /// Whether this action cancels the PR's running builds.
    pub fn cancels(&self) -> bool {
        matches!(self, PrAction::Closed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestEvent {
    pub action: PrAction,
    pub number: u64,
    pub title: String,
    pub draft: bool,
    pub merged: bool,
    /// Base repository `owner/name`: where statuses go.
    pub repo: String,
    /// Clone URL of the base repository.
    pub clone_url: String,
    pub head_sha: String,
    pub head_ref: String,
    /// Head repository `owner/name`; `None` when the fork was deleted.
    pub head_repo: Option<String>,
    pub base_sha: String,
    pub base_ref: String,
    /// Login of the PR author.
    pub author: String,
    /// The head lives in another repository (or a deleted one): no secrets for it.
    pub from_fork: bool,
}

impl PullRequestEvent {
    pub fn change(&self) -> Change {
        Change {
            repo: self.repo.clone(),
            trigger: Trigger::PullRequest {
                number: self.number,
                title: self.title.clone(),
                from_fork: self.from_fork,
            },
            head_sha: self.head_sha.clone(),
            head_ref: self.head_ref.clone(),
            base_sha: Some(self.base_sha.clone()),
            base_ref: Some(self.base_ref.clone()),
            author: self.author.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    pub repo: String,
    pub clone_url: String,
    /// Branch name without `refs/heads/`.
    pub branch: String,
    pub before: String,
    pub after: String,
    /// The branch was deleted (`after` is all zeros).
    pub deleted: bool,
    /// `pusher.name`, or `sender.login` when absent.
    pub author: String,
}

impl PushEvent {
    pub fn change(&self) -> Change {
        Change {
            repo: self.repo.clone(),
            trigger: Trigger::Push {
                branch: self.branch.clone(),
            },
            head_sha: self.after.clone(),
            head_ref: self.branch.clone(),
            base_sha: None,
            base_ref: None,
            author: self.author.clone(),
        }
    }
}

// Only the fields the server uses: real payloads carry hundreds more.

#[derive(Deserialize)]
struct RawRepo {
    full_name: String,
    clone_url: String,
}

#[derive(Deserialize)]
struct RawRepoName {
    full_name: String,
}

#[derive(Deserialize)]
struct RawUser {
    login: String,
}

#[derive(Deserialize)]
struct RawHead {
    sha: String,
    #[serde(rename = "ref")]
    ref_: String,
    // `null` when the fork was deleted.
    repo: Option<RawRepoName>,
}

#[derive(Deserialize)]
struct RawBase {
    sha: String,
    #[serde(rename = "ref")]
    ref_: String,
    repo: RawRepo,
}

#[derive(Deserialize)]
struct RawPull {
    title: String,
    #[serde(default)]
    draft: Option<bool>,
    #[serde(default)]
    merged: Option<bool>,
    user: RawUser,
    head: RawHead,
    base: RawBase,
}

#[derive(Deserialize)]
struct RawPullRequestEvent {
    action: String,
    number: u64,
    pull_request: RawPull,
}

#[derive(Deserialize)]
struct RawPusher {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawPushEvent {
    #[serde(rename = "ref")]
    ref_: String,
    before: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: RawRepo,
    #[serde(default)]
    pusher: Option<RawPusher>,
    #[serde(default)]
    sender: Option<RawUser>,
}

#[derive(Deserialize)]
struct RawPing {
    #[serde(default)]
    zen: Option<String>,
}

fn decode<T: DeserializeOwned>(event: &str, body: &[u8]) -> Result<T, ParseError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| ParseError::Json {
        event: event.to_string(),
        path: e.path().to_string(),
        source: e.into_inner(),
    })
}

/// Parses a delivery whose `X-GitHub-Event` header is `event`. Verify the signature first.
pub fn parse_event(event: &str, body: &[u8]) -> Result<WebhookEvent, ParseError> {
    match event {
        "ping" => {
            let ping: RawPing = decode(event, body)?;
            Ok(WebhookEvent::Ping { zen: ping.zen })
        }
        "pull_request" => parse_pull_request(body).map(WebhookEvent::PullRequest),
        "push" => parse_push(body),
        other => Ok(WebhookEvent::Ignored {
            event: other.to_string(),
            reason: format!("event type {other} is not handled"),
        }),
    }
}

fn parse_pull_request(body: &[u8]) -> Result<PullRequestEvent, ParseError> {
    let raw: RawPullRequestEvent = decode("pull_request", body)?;
    let pr = raw.pull_request;
    let head_repo = pr.head.repo.map(|r| r.full_name);
    // GitHub names are case-insensitive, so compare that way.
    let from_fork = head_repo
        .as_deref()
        .is_none_or(|h| !h.eq_ignore_ascii_case(&pr.base.repo.full_name));
    Ok(PullRequestEvent {
        action: PrAction::parse(&raw.action),
        number: raw.number,
        title: pr.title,
        draft: pr.draft.unwrap_or(false),
        merged: pr.merged.unwrap_or(false),
        repo: pr.base.repo.full_name,
        clone_url: pr.base.repo.clone_url,
        head_sha: pr.head.sha,
        head_ref: pr.head.ref_,
        head_repo,
        base_sha: pr.base.sha,
        base_ref: pr.base.ref_,
        author: pr.user.login,
        from_fork,
    })
}

fn parse_push(body: &[u8]) -> Result<WebhookEvent, ParseError> {
    let raw: RawPushEvent = decode("push", body)?;
    let Some(branch) = raw.ref_.strip_prefix("refs/heads/") else {
        let reason = if raw.ref_.starts_with("refs/tags/") {
            format!("tag push {}", raw.ref_)
        } else {
            format!("push to {} is not a branch", raw.ref_)
        };
        return Ok(WebhookEvent::Ignored {
            event: "push".into(),
            reason,
        });
    };
    let author = raw
        .pusher
        .and_then(|p| p.name)
        .or(raw.sender.map(|s| s.login))
        .ok_or_else(|| ParseError::Invalid {
            event: "push".into(),
            reason: "neither pusher.name nor sender.login is present".into(),
        })?;
    Ok(WebhookEvent::Push(PushEvent {
        repo: raw.repository.full_name,
        clone_url: raw.repository.clone_url,
        branch: branch.to_string(),
        before: raw.before,
        after: raw.after,
        deleted: raw.deleted,
        author,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use slate_testkit::github::{
        fixture, fixture_bytes, fixture_names, pr_payload, push_payload, sign,
    };

    const SECRET: &str = "It's a Secret to Everybody";

    fn secret() -> Secret {
        Secret::new(SECRET)
    }

    #[test]
    fn good_signature_is_accepted() {
        let body = br#"{"zen":"hi"}"#;
        let header = sign(SECRET, body);
        assert_eq!(verify_signature(&secret(), body, Some(&header)), Ok(()));
    }

    #[test]
    fn githubs_documented_example_verifies() {
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            verify_signature(&secret(), b"Hello, World!", Some(header)),
            Ok(())
        );
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let body = b"payload";
        let header = sign(SECRET, body);
        let upper = format!("sha256={}", header["sha256=".len()..].to_ascii_uppercase());
        assert_eq!(verify_signature(&secret(), body, Some(&upper)), Ok(()));
    }

    #[test]
    fn tampered_body_or_wrong_secret_is_a_mismatch() {
        let header = sign(SECRET, b"original");
        assert_eq!(
            verify_signature(&secret(), b"tampered", Some(&header)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(&Secret::new("other"), b"original", Some(&header)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_header_is_refused() {
        assert_eq!(
            verify_signature(&secret(), b"x", None),
            Err(SignatureError::Missing)
        );
    }

    #[test]
    fn sha1_only_header_is_refused() {
        let header = "sha1=0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            verify_signature(&secret(), b"x", Some(header)),
            Err(SignatureError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn bad_hex_is_refused() {
        for header in ["sha256=zz", "sha256=abc", "sha256=abcd"] {
            assert_eq!(
                verify_signature(&secret(), b"x", Some(header)),
                Err(SignatureError::BadHex),
                "{header}"
            );
        }
    }

    #[test]
    fn empty_secret_refuses_everything() {
        let header = sign("", b"x");
        assert_eq!(
            verify_signature(&Secret::new(""), b"x", Some(&header)),
            Err(SignatureError::NoSecret)
        );
    }

    #[test]
    fn signature_errors_never_echo_the_secret() {
        let header = sign(SECRET, b"a");
        for err in [
            verify_signature(&secret(), b"b", Some(&header)).unwrap_err(),
            verify_signature(&secret(), b"b", Some("sha1=00")).unwrap_err(),
            verify_signature(&secret(), b"b", Some("sha256=q")).unwrap_err(),
        ] {
            assert!(!err.to_string().contains(SECRET));
            assert!(!format!("{err:?}").contains(SECRET));
        }
    }

    fn pr(body: &[u8]) -> PullRequestEvent {
        match parse_event("pull_request", body).unwrap() {
            WebhookEvent::PullRequest(pr) => pr,
            other => panic!("expected a pull request, got {other:?}"),
        }
    }

    /// The event type of a fixture is its directory name, as GitHub's header would say.
    fn parse_fixture(name: &str) -> WebhookEvent {
        let event = name.split('/').next().unwrap();
        parse_event(event, &fixture_bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn every_fixture_parses() {
        let names = fixture_names();
        for expected in [
            "pull_request/opened.payload.json",
            "pull_request/closed.payload.json",
            "push/payload.json",
            "ping/payload.json",
            "issue_comment/created.payload.json",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "missing fixture {expected}"
            );
        }
        for name in &names {
            let parsed = parse_fixture(name);
            match name.split('/').next().unwrap() {
                "pull_request" => assert!(matches!(parsed, WebhookEvent::PullRequest(_)), "{name}"),
                "ping" => assert!(matches!(parsed, WebhookEvent::Ping { .. }), "{name}"),
                // The push fixture deletes a tag.
                "push" => assert!(matches!(parsed, WebhookEvent::Ignored { .. }), "{name}"),
                _ => assert!(matches!(parsed, WebhookEvent::Ignored { .. }), "{name}"),
            }
        }
    }

    #[test]
    fn opened_fixture_has_every_field() {
        let pr = pr(&fixture_bytes("pull_request/opened.payload.json"));
        assert_eq!(
            pr,
            PullRequestEvent {
                action: PrAction::Opened,
                number: 2,
                title: "Update the README with new information.".into(),
                draft: false,
                merged: false,
                repo: "Codertocat/Hello-World".into(),
                clone_url: "https://github.com/Codertocat/Hello-World.git".into(),
                head_sha: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
                head_ref: "changes".into(),
                head_repo: Some("Codertocat/Hello-World".into()),
                base_sha: "f95f852bd8fca8fcc58a9a2d6c842781e32a215e".into(),
                base_ref: "master".into(),
                author: "Codertocat".into(),
                from_fork: false,
            }
        );
        assert!(pr.action.builds(pr.draft));
        let change = pr.change();
        assert_eq!(
            change.trigger,
            Trigger::PullRequest {
                number: 2,
                title: "Update the README with new information.".into(),
                from_fork: false
            }
        );
        assert_eq!(change.head_sha, pr.head_sha);
        assert_eq!(change.base_ref.as_deref(), Some("master"));
    }

    #[test]
    fn fixture_actions_map_to_what_the_server_does() {
        let cases = [
            ("reopened", PrAction::Reopened, true, false),
            ("synchronize", PrAction::Synchronize, true, false),
            ("closed", PrAction::Closed, false, true),
            ("labeled", PrAction::Other("labeled".into()), false, false),
        ];
        for (file, action, builds, cancels) in cases {
            let pr = pr(&fixture_bytes(&format!("pull_request/{file}.payload.json")));
            assert_eq!(pr.action, action, "{file}");
            assert_eq!(pr.action.builds(pr.draft), builds, "{file}");
            assert_eq!(pr.action.cancels(), cancels, "{file}");
        }
    }

    #[test]
    fn ping_keeps_zen() {
        assert_eq!(
            parse_fixture("ping/payload.json"),
            WebhookEvent::Ping {
                zen: Some("Anything added dilutes everything else.".into())
            }
        );
    }

    #[test]
    fn tag_push_and_unknown_events_are_ignored() {
        let WebhookEvent::Ignored { event, reason } = parse_fixture("push/payload.json") else {
            panic!("tag push must be ignored");
        };
        assert_eq!(event, "push");
        assert!(reason.contains("refs/tags/simple-tag"), "{reason}");

        for name in [
            "issue_comment/created.payload.json",
            "check_run/rerequested.payload.json",
        ] {
            let event = name.split('/').next().unwrap();
            assert_eq!(
                parse_event(event, &fixture_bytes(name)).unwrap(),
                WebhookEvent::Ignored {
                    event: event.into(),
                    reason: format!("event type {event} is not handled"),
                }
            );
        }
    }

    #[test]
    fn branch_push_parses_and_builds_a_change() {
        let body = push_payload(
            "acme/widgets",
            "https://git.example/acme/widgets.git",
            "main",
            "aaa",
            "bbb",
        );
        let WebhookEvent::Push(push) = parse_event("push", &body).unwrap() else {
            panic!("expected a push");
        };
        assert_eq!(push.repo, "acme/widgets");
        assert_eq!(push.clone_url, "https://git.example/acme/widgets.git");
        assert_eq!(push.branch, "main");
        assert_eq!((push.before.as_str(), push.after.as_str()), ("aaa", "bbb"));
        assert!(!push.deleted);
        assert_eq!(push.author, "Codertocat");
        let change = push.change();
        assert_eq!(
            change.trigger,
            Trigger::Push {
                branch: "main".into()
            }
        );
        assert_eq!(change.head_sha, "bbb");
        assert_eq!(change.base_sha, None);
    }

    #[test]
    fn push_author_falls_back_to_sender() {
        let mut v: Value =
            serde_json::from_slice(&push_payload("a/b", "u", "dev", "1", "2")).unwrap();
        v.as_object_mut().unwrap().remove("pusher");
        v["sender"]["login"] = json!("octo-sender");
        let WebhookEvent::Push(push) =
            parse_event("push", &serde_json::to_vec(&v).unwrap()).unwrap()
        else {
            panic!("expected a push");
        };
        assert_eq!(push.author, "octo-sender");
    }

    #[test]
    fn branch_deletion_is_flagged() {
        let mut v: Value = serde_json::from_slice(&push_payload(
            "a/b",
            "u",
            "gone",
            "1",
            "0000000000000000000000000000000000000000",
        ))
        .unwrap();
        v["deleted"] = json!(true);
        let WebhookEvent::Push(push) =
            parse_event("push", &serde_json::to_vec(&v).unwrap()).unwrap()
        else {
            panic!("expected a push");
        };
        assert!(push.deleted);
    }

    #[test]
    fn malformed_json_is_an_error() {
        let err = parse_event("pull_request", b"{not json").unwrap_err();
        assert!(matches!(err, ParseError::Json { .. }), "{err:?}");
        assert!(err.to_string().contains("pull_request"), "{err}");
    }

    #[test]
    fn missing_head_sha_names_the_field() {
        let mut v = fixture("pull_request/opened.payload.json");
        v["pull_request"]["head"]
            .as_object_mut()
            .unwrap()
            .remove("sha");
        let err = parse_event("pull_request", &serde_json::to_vec(&v).unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pull_request.head"), "{msg}");
        assert!(msg.contains("`sha`"), "{msg}");
    }

    #[test]
    fn pr_from_a_fork_is_detected() {
        let mut v = fixture("pull_request/opened.payload.json");
        v["pull_request"]["head"]["repo"]["full_name"] = json!("mallory/Hello-World");
        let pr = pr(&serde_json::to_vec(&v).unwrap());
        assert!(pr.from_fork);
        assert_eq!(pr.head_repo.as_deref(), Some("mallory/Hello-World"));
        assert_eq!(
            pr.repo, "Codertocat/Hello-World",
            "statuses go to the base repo"
        );
        assert_eq!(
            pr.change().trigger,
            Trigger::PullRequest {
                number: 2,
                title: pr.title.clone(),
                from_fork: true
            }
        );
    }

    #[test]
    fn pr_from_a_deleted_fork_counts_as_fork() {
        let mut v = fixture("pull_request/opened.payload.json");
        v["pull_request"]["head"]["repo"] = Value::Null;
        let pr = pr(&serde_json::to_vec(&v).unwrap());
        assert!(pr.from_fork);
        assert_eq!(pr.head_repo, None);
    }

    #[test]
    fn same_repo_pr_differing_only_in_case_is_not_a_fork() {
        let mut v = fixture("pull_request/opened.payload.json");
        v["pull_request"]["head"]["repo"]["full_name"] = json!("codertocat/hello-world");
        assert!(!pr(&serde_json::to_vec(&v).unwrap()).from_fork);
    }

    #[test]
    fn drafts_build_only_when_ready() {
        let mut v = fixture("pull_request/opened.payload.json");
        v["pull_request"]["draft"] = json!(true);
        let draft = pr(&serde_json::to_vec(&v).unwrap());
        assert!(draft.draft);
        assert!(!draft.action.builds(draft.draft));
        assert!(!PrAction::Synchronize.builds(true));

        let ready = pr(&pr_payload(
            "ready_for_review",
            "a/b",
            "u",
            3,
            "h",
            "f",
            "b",
            "main",
        ));
        assert_eq!(ready.action, PrAction::ReadyForReview);
        assert!(ready.action.builds(true));
        assert!(!ready.action.cancels());
    }

    #[test]
    fn pr_payload_round_trips_through_the_parser() {
        let body = pr_payload(
            "synchronize",
            "acme/widgets",
            "https://git.example/acme/widgets.git",
            42,
            "h42",
            "feature",
            "b42",
            "main",
        );
        let pr = pr(&body);
        assert_eq!(pr.number, 42);
        assert_eq!(pr.repo, "acme/widgets");
        assert_eq!(pr.clone_url, "https://git.example/acme/widgets.git");
        assert_eq!(
            (pr.head_sha.as_str(), pr.head_ref.as_str()),
            ("h42", "feature")
        );
        assert_eq!(
            (pr.base_sha.as_str(), pr.base_ref.as_str()),
            ("b42", "main")
        );
        assert!(!pr.from_fork);
    }

    #[test]
    fn closed_and_merged_is_reported() {
        let mut v = fixture("pull_request/closed.payload.json");
        v["pull_request"]["merged"] = json!(true);
        let pr = pr(&serde_json::to_vec(&v).unwrap());
        assert!(pr.merged);
        assert!(pr.action.cancels());
    }
}
