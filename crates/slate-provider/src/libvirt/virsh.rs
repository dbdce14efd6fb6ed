//! Running `virsh -c URI …` and reading its answers.
//!
//! virsh is run with `LC_ALL=C` so its messages can be matched, with a timeout so a hung
//! libvirtd cannot hang a provision, and killed when the caller's future is dropped.
//! Nothing secret is ever on a virsh command line: the job token travels as a file path.

use crate::sandbox::valid_name;
use crate::ProviderError;
use std::io;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// The virsh binary (Debian's `libvirt-clients`).
const VIRSH: &str = "virsh";
/// How long one virsh call may take. Creating a domain takes well under a second once
/// libvirtd has cached qemu's capabilities; the first call after a qemu upgrade probes
/// them, which can take a few seconds.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("run virsh: {0}")]
    Spawn(#[source] io::Error),
    #[error("virsh {args} on {uri} timed out after {} s", VIRSH_TIMEOUT.as_secs())]
    Timeout { uri: String, args: String },
    #[error("virsh {args} on {uri} failed: {detail}")]
    Failed {
        uri: String,
        args: String,
        detail: String,
    },
}

impl VirshError {
    /// Whether virsh said the domain, volume or pool it was asked about does not exist.
    pub fn not_found(&self) -> bool {
        match self {
            VirshError::Failed { detail, .. } => [
                "failed to get domain",
                "Domain not found",
                "no domain with matching",
                "Storage volume not found",
                "no storage vol with matching",
            ]
            .iter()
            .any(|m| detail.contains(m)),
            _ => false,
        }
    }

    /// Whether virsh refused because the domain is not running (a transient domain that
    /// is stopping: it is gone a moment later).
    pub fn not_running(&self) -> bool {
        matches!(self, VirshError::Failed { detail, .. } if detail.contains("domain is not running"))
    }
}

impl From<VirshError> for ProviderError {
    fn from(e: VirshError) -> Self {
        match e {
            VirshError::Spawn(source) => ProviderError::Io {
                what: "run virsh".into(),
                source,
            },
            VirshError::Timeout { uri, args } => ProviderError::Command {
                command: format!("virsh -c {uri} {args}"),
                detail: format!("timed out after {} s", VIRSH_TIMEOUT.as_secs()),
            },
            VirshError::Failed { uri, args, detail } => ProviderError::Command {
                command: format!("virsh -c {uri} {args}"),
                detail,
            },
        }
    }
}

/// The base command `virsh -q -c URI` with a C locale; for callers that stream output.
pub fn command(uri: &str) -> Command {
    let mut cmd = Command::new(VIRSH);
    cmd.env("LC_ALL", "C")
        .args(["-q", "-c", uri])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `virsh -q -c URI ARGS…` and returns its stdout.
pub async fn run(uri: &str, args: &[&str]) -> Result<String, VirshError> {
    let shown = args.join(" ");
    let out = command(uri)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = match tokio::time::timeout(VIRSH_TIMEOUT, out).await {
        Ok(r) => r.map_err(VirshError::Spawn)?,
        Err(_) => {
            return Err(VirshError::Timeout {
                uri: uri.into(),
                args: shown,
            })
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let detail = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(VirshError::Failed {
            uri: uri.into(),
            args: shown,
            detail,
        })
    }
}

/// Worker names in the output of `virsh list --all --name`.
pub fn worker_domains(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|n| valid_name(n))
        .map(str::to_string)
        .collect()
}

/// Volume name of the worker `name`.
pub fn volume_name(name: &str) -> String {
    format!("{name}.qcow2")
}

/// Worker names whose volume (`slate-<id>.qcow2`) is in the output of `virsh -q vol-list`
/// (rows of name and path).
pub fn worker_volumes(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|v| v.strip_suffix(".qcow2"))
        .filter(|n| valid_name(n))
        .map(str::to_string)
        .collect()
}

/// The exit code a worker reports for a `Stopped <reason>` lifecycle event line of
/// `virsh event`, or `None` for any other line.
pub fn stopped_code(line: &str) -> Option<i32> {
    let (_, event) = line.rsplit_once("': ")?;
    let reason = event.trim().strip_prefix("Stopped")?.trim();
    Some(match reason {
        // The guest powered off (or rebooted, which on_reboot=destroy turns into a stop).
        "Shutdown" => 0,
        // `virsh destroy`: killed, reported as SIGKILL like the other providers.
        "Destroyed" => 128 + 9,
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_picked_from_listings() {
        let domains = "slate-1\nother\nslate-x\n slate-22 \n\n";
        assert_eq!(worker_domains(domains), vec!["slate-1", "slate-22"]);
        let vols = " slate-7.qcow2   /var/lib/libvirt/images/slate-7.qcow2\n \
                    base.qcow2 /p/base.qcow2\n slate-8.img /p/slate-8.img\n \
                    slate-.qcow2 /p\n";
        assert_eq!(worker_volumes(vols), vec!["slate-7"]);
        assert_eq!(volume_name("slate-7"), "slate-7.qcow2");
    }

    #[test]
    fn lifecycle_lines_map_to_exit_codes() {
        let l = |e: &str| format!("event 'lifecycle' for domain 'slate-1': {e}");
        assert_eq!(stopped_code(&l("Stopped Shutdown")), Some(0));
        assert_eq!(stopped_code(&l("Stopped Destroyed")), Some(137));
        assert_eq!(stopped_code(&l("Stopped Crashed")), Some(1));
        assert_eq!(stopped_code(&l("Started Booted")), None);
        assert_eq!(
            stopped_code(&l("Shutdown Finished after guest request")),
            None
        );
        assert_eq!(stopped_code("garbage"), None);
    }

    #[test]
    fn missing_things_are_told_apart_from_failures() {
        let failed = |d: &str| VirshError::Failed {
            uri: "qemu:///system".into(),
            args: "destroy slate-1".into(),
            detail: d.into(),
        };
        assert!(failed("failed to get domain 'slate-1'").not_found());
        assert!(failed(
            "failed to get vol 'slate-1.qcow2'; Storage volume not found: no storage vol with matching path"
        )
        .not_found());
        assert!(!failed("failed to connect to the hypervisor").not_found());
        assert!(failed("Requested operation is not valid: domain is not running").not_running());
    }
}
