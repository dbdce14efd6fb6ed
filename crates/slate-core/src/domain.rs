//! Domain types shared by every part: builds, jobs, their states and what triggered them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Identifier of a build (one change, one pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BuildId(pub i64);

/// Identifier of a job (one build × one pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl JobId {
    /// The name of every resource a provider makes for this job (`slate-<id>`).
    pub fn resource_name(&self) -> String {
        format!("slate-{}", self.0)
    }

    /// Inverse of [`JobId::resource_name`].
    pub fn from_resource_name(name: &str) -> Option<JobId> {
        name.strip_prefix("slate-")?.parse().ok().map(JobId)
    }
}

/// The life of a job. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Provisioning,
    Running,
    Succeeded,
    Failed,
    Error,
    Cancelled,
    TimedOut,
}

impl Job {
    /// The commit status context: `slate/<pool>`, or `slate/<pool>/<target>`.
    pub fn context(&self) -> String {
        match &self.target {
            Some(t) => format!("slate/{}/{t}", self.pool),
            None => format!("slate/{}", self.pool),
        }
    }
}

/// The target name of a build's planning jobs (one per pool).
pub const PLAN_TARGET: &str = "plan";

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Provisioning,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Error,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Provisioning => "provisioning",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Error => "error",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Error
                | JobState::Cancelled
                | JobState::TimedOut
        )
    }

    /// Whether the state machine allows `self -> next`.
    pub fn can_become(&self, next: JobState) -> bool {
        use JobState::*;
        match (self, next) {
            (Queued, Provisioning) => true,
            // A worker lost before the build started goes back to the queue (infrastructure retry).
            (Provisioning, Queued) | (Running, Queued) => true,
            (Provisioning, Running) => true,
            (Queued | Provisioning | Running, Cancelled | Error) => true,
            (Running, Succeeded | Failed | TimedOut) => true,
            (Provisioning, TimedOut) => true,
            _ => false,
        }
    }

    /// States a job can be in while it still needs the scheduler's attention.
    pub fn active() -> &'static [JobState] {
        &[JobState::Queued, JobState::Provisioning, JobState::Running]
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a forge shows for a job: GitHub's commit status states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    Pending,
    Success,
    Failure,
    Error,
}

impl ReportState {
    pub fn for_job(state: JobState) -> ReportState {
        match state {
            JobState::Queued | JobState::Provisioning | JobState::Running => ReportState::Pending,
            JobState::Succeeded => ReportState::Success,
            JobState::Failed | JobState::TimedOut => ReportState::Failure,
            JobState::Error | JobState::Cancelled => ReportState::Error,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            ReportState::Pending => "pending",
            ReportState::Success => "success",
            ReportState::Failure => "failure",
            ReportState::Error => "error",
        }
    }
}

/// What caused a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// A pull request was opened or its head moved.
    PullRequest {
        number: u64,
        title: String,
        /// The head comes from a fork: it never gets secrets.
        from_fork: bool,
    },
    /// A push to a configured branch (a trusted build).
    Push { branch: String },
    /// `slate submit`: a branch head built through the same path.
    Manual { branch: String },
}

impl Trigger {
    /// The event name steps filter on with `on = [...]`.
    pub fn event_name(&self) -> &'static str {
        match self {
            Trigger::PullRequest { .. } => "pull_request",
            Trigger::Push { .. } => "push",
            Trigger::Manual { .. } => "manual",
        }
    }

    pub fn pr_number(&self) -> Option<u64> {
        match self {
            Trigger::PullRequest { number, .. } => Some(*number),
            _ => None,
        }
    }
}

/// A change to build: a repository, what triggered it, and the commits involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `owner/name` as the forge spells it.
    pub repo: String,
    pub trigger: Trigger,
    /// The commit statuses are reported on.
    pub head_sha: String,
    /// Head branch (PR) or pushed branch.
    pub head_ref: String,
    /// Base commit and branch of a pull request.
    pub base_sha: Option<String>,
    pub base_ref: Option<String>,
    pub author: String,
}

/// A stored build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub id: BuildId,
    pub change: Change,
    pub pipeline: String,
    /// The commit the jobs check out (the merge commit, or the head).
    pub checkout_sha: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub build_id: BuildId,
    pub pool: String,
    /// What the job builds within its pool (a port, a printed plan target, or `plan` for
    /// a planning job); `None` for a plain one-job-per-pool build.
    pub target: Option<String>,
    /// The target's variables, substituted as `{name}` into the steps' commands.
    pub vars: BTreeMap<String, String>,
    pub state: JobState,
    /// Why the job is in its state (shown in statuses: "superseded by abc123", "merge conflict").
    pub reason: Option<String>,
    /// 1 for the first try; an infrastructure retry increments it.
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One step of a job as it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub job_id: JobId,
    pub index: u32,
    pub name: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    /// "ok", "failed", "timed_out", "skipped", "allowed_failure".
    pub outcome: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn normal_path_is_allowed() {
        assert!(JobState::Queued.can_become(JobState::Provisioning));
        assert!(JobState::Provisioning.can_become(JobState::Running));
        assert!(JobState::Running.can_become(JobState::Succeeded));
        assert!(!JobState::Queued.can_become(JobState::Succeeded));
    }

    #[test]
    fn resource_names_round_trip() {
        let id = JobId(42);
        assert_eq!(id.resource_name(), "slate-42");
        assert_eq!(JobId::from_resource_name("slate-42"), Some(id));
        assert_eq!(JobId::from_resource_name("other-42"), None);
        assert_eq!(JobId::from_resource_name("slate-x"), None);
    }

    #[test]
    fn state_strings_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
    }
}
