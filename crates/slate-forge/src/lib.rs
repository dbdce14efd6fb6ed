//! Forge integration: GitHub webhook verification and parsing, and commit statuses.
//!
//! Nothing here knows about SQL or providers: the server feeds webhook bodies in and
//! gets [`slate_core::Change`]s out, and hands [`StatusUpdate`]s to a [`Reporter`].

pub mod reporter;
pub mod status;
pub mod webhook;

pub use reporter::{Reporter, ReporterConfig, ReporterStats};
pub use status::{truncate_description, ForgeError, GithubStatuses, StatusSink, StatusUpdate};
pub use webhook::{
    parse_event, verify_signature, ParseError, PrAction, PullRequestEvent, PushEvent,
    SignatureError, WebhookEvent,
};
