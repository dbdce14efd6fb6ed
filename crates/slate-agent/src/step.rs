//! Running the job: each step is `/bin/sh -c RUN` in its own process group with a clean
//! environment; its stdout and stderr are streamed as they come; a timeout, a Cancel or a
//! lost connection kills the whole group.
//!
//! Architecture invariant: the main thread alone spawns, waits for and reads the steps,
//! from one `poll` loop woken by the step's pipes and by the wake pipe (SIGCHLD, Cancel,
//! lost link). So all output of a step is queued before its `StepFinished`, and nothing
//! else ever reaps a child.

use crate::link::Link;
use crate::sys;
use slate_proto::{AgentMsg, JobSpec, StepOutcome, StepSpec, Stream, MAX_CHUNK};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `PATH` of a step whose job sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the shell exits (and the rest of its group is killed), output still flowing is
/// read until the pipes are quiet this long: a daemon that escaped the group and holds
/// the pipe open must not hold up the job.
const DRAIN_IDLE: Duration = Duration::from_millis(200);

/// …and never longer than this after the shell exited.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// How often to look again while the link is backpressured.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(50);

/// How the job ended.
#[derive(Debug, PartialEq, Eq)]
pub enum JobEnd {
    /// Every step ran, or the job stopped at a failing or cancelled one.
    Finished { success: bool },
    /// The link is gone: stop now.
    LinkLost,
}

/// Runs the job's steps in order, reporting each to `link`. Steps are numbered by their
/// 0-based index in `job.steps`.
pub fn run_job(job: &JobSpec, link: &Link) -> JobEnd {
    let workdir = if job.workdir.is_empty() {
        "/"
    } else {
        job.workdir.as_str()
    };
    if let Err(e) = std::fs::create_dir_all(workdir) {
        // The step's spawn will fail and say so in its output.
        eprintln!("slate-agent: cannot create workdir {workdir}: {e}");
    }
    let mut success = true;
    for (index, spec) in job.steps.iter().enumerate() {
        if link.lost().is_some() {
            return JobEnd::LinkLost;
        }
        if link.cancel_reason().is_some() {
            success = false;
            break;
        }
        let step = index as u32;
        link.push(&AgentMsg::StepStarted { step });
        let r = run_step(step, spec, &job.env, workdir, link);
        if r.link_lost {
            return JobEnd::LinkLost;
        }
        link.push(&AgentMsg::StepFinished {
            step,
            outcome: r.outcome,
            exit_code: r.exit_code,
            signal: r.signal,
            duration_ms: r.duration_ms,
        });
        if r.cancelled || link.cancel_reason().is_some() {
            success = false;
            break;
        }
        if r.outcome != StepOutcome::Ok && !spec.allow_failure {
            success = false;
            break;
        }
    }
    JobEnd::Finished { success }
}

/// The environment of a step: exactly the job's plus the step's, with a default `PATH`
/// and `HOME` when neither sets one.
pub fn step_env(
    job_env: &BTreeMap<String, String>,
    step_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = job_env.clone();
    env.extend(step_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.entry("HOME".into()).or_insert_with(|| "/root".into());
    env
}

struct StepResult {
    outcome: StepOutcome,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: u64,
    cancelled: bool,
    link_lost: bool,
}

fn run_step(
    step: u32,
    spec: &StepSpec,
    job_env: &BTreeMap<String, String>,
    workdir: &str,
    link: &Link,
) -> StepResult {
    let start = Instant::now();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&spec.run)
        .env_clear()
        .envs(step_env(job_env, &spec.env))
        .current_dir(workdir)
        .stdin(null_stdin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("slate-agent: cannot start /bin/sh in {workdir}: {e}\n");
            link.push_output(step, Stream::Stderr, msg.as_bytes());
            return StepResult {
                outcome: StepOutcome::SpawnError,
                exit_code: None,
                signal: None,
                duration_ms: start.elapsed().as_millis() as u64,
                cancelled: false,
                link_lost: false,
            };
        }
    };
    let pid = child.id() as libc::pid_t;
    // The pipes, `None` once at end of file. The `Child` handle itself is not needed:
    // the main loop reaps through `sys::reap`.
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| (Stream::Stdout, Box::new(p) as Box<dyn ReadFd>)),
        child
            .stderr
            .take()
            .map(|p| (Stream::Stderr, Box::new(p) as Box<dyn ReadFd>)),
    ];
    drop(child);

    let deadline = spec.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut status: Option<libc::c_int> = None;
    let mut exited_at: Option<Instant> = None;
    let mut last_data = start;
    let (mut timed_out, mut cancelled, mut link_lost) = (false, false, false);
    let mut buf = vec![0u8; MAX_CHUNK];

    loop {
        let now = Instant::now();
        if status.is_none() {
            if let Some(s) = sys::reap(Some(pid)) {
                status = Some(s);
                exited_at = Some(now);
                last_data = now;
            }
        }
        let running = status.is_none();
        if running && !cancelled && link.cancel_reason().is_some() {
            cancelled = true;
            sys::kill_group(pid);
        }
        if !link_lost && link.lost().is_some() {
            link_lost = true;
            sys::kill_group(pid);
        }
        if running && !timed_out && !cancelled && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            sys::kill_group(pid);
        }
        let backpressured = link.backpressured();
        if let Some(t) = exited_at {
            if backpressured {
                last_data = now; // Waiting for acks is not the step being quiet.
            }
            let eof = pipes.iter().all(Option::is_none);
            if eof || link_lost || now - last_data >= DRAIN_IDLE || now - t >= DRAIN_MAX {
                break;
            }
        } else if link_lost {
            break;
        }

        let mut timeout: Option<Duration> = None;
        let mut shorten = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
        if let (true, false, Some(d)) = (running, timed_out, deadline) {
            shorten(d.saturating_duration_since(now));
        }
        if let Some(t) = exited_at {
            shorten((last_data + DRAIN_IDLE).saturating_duration_since(now));
            shorten((t + DRAIN_MAX).saturating_duration_since(now));
        }
        if backpressured {
            shorten(BACKPRESSURE_POLL);
        }

        let mut fds = vec![sys::wake_fd()];
        let mut which = Vec::new();
        if !backpressured {
            for (i, p) in pipes.iter().enumerate() {
                if let Some((_, r)) = p {
                    fds.push(r.fd());
                    which.push(i);
                }
            }
        }
        let revents = sys::poll_readable(&fds, timeout);
        if revents[0] != 0 {
            sys::drain_wake();
        }
        for (k, &i) in which.iter().enumerate() {
            if revents[k + 1] == 0 {
                continue;
            }
            let Some((stream, r)) = &mut pipes[i] else {
                continue;
            };
            match r.read(&mut buf) {
                Ok(0) => pipes[i] = None,
                Ok(n) => {
                    link.push_output(step, *stream, &buf[..n]);
                    last_data = Instant::now();
                }
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                Err(_) => pipes[i] = None,
            }
        }
    }
    // Closing our ends: a daemon that kept them gets EPIPE from now on.
    drop(pipes);

    let status = match status {
        Some(s) => s,
        None => {
            // Only when the link was lost while the step ran: the group is killed.
            sys::kill_group(pid);
            sys::wait_killed(pid)
        }
    };
    sys::reap(None);
    let (exit_code, signal) = sys::decode_status(status);
    let outcome = if timed_out {
        StepOutcome::TimedOut
    } else if cancelled || exit_code != Some(0) {
        StepOutcome::Failed
    } else {
        StepOutcome::Ok
    };
    StepResult {
        outcome,
        exit_code,
        signal,
        duration_ms: start.elapsed().as_millis() as u64,
        cancelled,
        link_lost,
    }
}

/// `/dev/null`, or an empty pipe where the image has no `/dev/null`.
fn null_stdin() -> Stdio {
    match std::fs::File::open("/dev/null") {
        Ok(f) => f.into(),
        Err(_) => sys::empty_pipe().map_or_else(|_| Stdio::null(), Stdio::from),
    }
}

/// A pipe end the loop can both poll and read.
trait ReadFd: Read {
    fn fd(&self) -> std::os::fd::RawFd;
}

impl<T: Read + AsRawFd> ReadFd for T {
    fn fd(&self) -> std::os::fd::RawFd {
        self.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_job_plus_step_with_defaults() {
        let job: BTreeMap<_, _> = [("A", "1"), ("B", "job")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let step: BTreeMap<_, _> = [("B".to_string(), "step".to_string())]
            .into_iter()
            .collect();
        let env = step_env(&job, &step);
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "step");
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env.len(), 4);

        let own: BTreeMap<_, _> = [("PATH", "/x"), ("HOME", "/h")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = step_env(&own, &BTreeMap::new());
        assert_eq!(env["PATH"], "/x");
        assert_eq!(env["HOME"], "/h");
    }
}
