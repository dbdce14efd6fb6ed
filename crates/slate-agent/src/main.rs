//! `slate-agent`: the static binary inside a worker. It dials the server, proves it speaks
//! for one job with the job's one-time token, runs the job's steps and streams their
//! output. It runs as PID 1 of a container or inside a VM; it uses std threads only, so it
//! builds as a fully static binary.
//!
//! Exit codes: 0 the job ran (even if steps failed), 2 rejected by the server,
//! 3 connection lost, 4 usage error.

mod collect;
mod link;
mod step;
mod sys;
mod tls;
mod transport;

use link::{Handshake, Link, Lost};
use slate_proto::AgentMsg;
use std::process::ExitCode;
use std::time::Duration;
use step::JobEnd;
use transport::{Addr, Transport};

const EXIT_OK: u8 = 0;
const EXIT_REJECTED: u8 = 2;
const EXIT_LOST: u8 = 3;
const EXIT_USAGE: u8 = 4;

/// The environment variable that carries the job's one-time token.
const TOKEN_VAR: &str = "SLATE_AGENT_TOKEN";

/// The environment variable that carries the server certificate's fingerprint (`tls:`).
const FINGERPRINT_VAR: &str = "SLATE_AGENT_FINGERPRINT";

/// How long the first connection is retried (the socket may not exist yet).
const CONNECT_FOR: Duration = Duration::from_secs(10);

/// How long to wait, after `Done`, for the server to acknowledge the last output.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(5);

const USAGE: &str = "\
usage: slate-agent --connect ADDR [--fingerprint FP] [--heartbeat-ms N] [--prepare PATH]

Dials the slate server, authenticates with the job token in $SLATE_AGENT_TOKEN,
runs the job's steps and streams their output.

  --connect ADDR     unix:PATH | tls:HOST:PORT | tcp:HOST:PORT (plaintext, only
                     where the pool allows it) | /dev/PATH (a character device,
                     e.g. a virtio-serial port)
  --fingerprint FP   the server certificate's sha256:HEX fingerprint, which a
                     tls: address pins (default $SLATE_AGENT_FINGERPRINT)
  --heartbeat-ms N   interval of heartbeats (default 5000)
  --prepare PATH     run PATH once the job is known, before its first step (a VM
                     mounts the job's source and caches there: a warm VM boots
                     before its job exists); if it fails, the agent exits with 3
  -h, --help         this text
  -V, --version      the agent's version

exit codes: 0 job ran, 2 rejected, 3 connection lost, 4 usage error
";

struct Args {
    connect: Addr,
    heartbeat: Duration,
    prepare: Option<std::path::PathBuf>,
}

enum Parsed {
    Run(Args),
    Help,
    Version,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut connect = None;
    let mut heartbeat = Duration::from_secs(5);
    let mut prepare = None;
    let mut fingerprint = None;
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--connect" => connect = Some(Addr::parse(&value("--connect")?)?),
            "--heartbeat-ms" => {
                let v = value("--heartbeat-ms")?;
                let ms: u64 = v.parse().map_err(|_| format!("bad --heartbeat-ms {v:?}"))?;
                heartbeat = Duration::from_millis(ms.max(1));
            }
            "--prepare" => prepare = Some(value("--prepare")?.into()),
            "--fingerprint" => fingerprint = Some(value("--fingerprint")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mut connect: Addr = connect.ok_or("--connect is required")?;
    if let Some(fp) = fingerprint.or_else(|| std::env::var(FINGERPRINT_VAR).ok()) {
        connect.pin(tls::Fingerprint::parse(fp.trim())?);
    }
    connect.check()?;
    Ok(Parsed::Run(Args {
        connect,
        heartbeat,
        prepare,
    }))
}

fn main() -> ExitCode {
    // First of all, before any thread exists: steps must not find the token anywhere.
    let token = sys::take_env_secret(TOKEN_VAR);
    ExitCode::from(run(token))
}

fn run(token: Option<String>) -> u8 {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return EXIT_OK;
        }
        Ok(Parsed::Version) => {
            println!("slate-agent {}", env!("CARGO_PKG_VERSION"));
            return EXIT_OK;
        }
        Err(e) => {
            eprintln!("slate-agent: {e}\n{USAGE}");
            return EXIT_USAGE;
        }
    };
    let Some(token) = token else {
        eprintln!("slate-agent: ${TOKEN_VAR} is not set");
        return EXIT_USAGE;
    };
    if let Err(e) = sys::init() {
        eprintln!("slate-agent: setup failed: {e}");
        return EXIT_LOST;
    }

    let mut conn = match Transport::connect_retry(&args.connect, CONNECT_FOR) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("slate-agent: cannot connect to {}: {e}", args.connect);
            return EXIT_LOST;
        }
    };
    let job = match link::handshake(&mut conn, &token, 0) {
        Ok(Handshake::Welcome(job)) => job,
        Ok(Handshake::Rejected(reason)) => {
            eprintln!("slate-agent: rejected by the server: {reason}");
            return EXIT_REJECTED;
        }
        Err(e) => {
            eprintln!("slate-agent: handshake with {} failed: {e}", args.connect);
            return EXIT_LOST;
        }
    };
    if let Some(prepare) = &args.prepare {
        // Its output goes where the agent's stderr goes (a VM's console), which the server
        // shows when the worker fails; a failed prepare leaves the job without its tree.
        match std::process::Command::new(prepare)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("slate-agent: {} failed: {s}", prepare.display());
                return EXIT_LOST;
            }
            Err(e) => {
                eprintln!("slate-agent: cannot run {}: {e}", prepare.display());
                return EXIT_LOST;
            }
        }
    }
    let link = match Link::start(conn, args.connect, token, args.heartbeat) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("slate-agent: cannot start: {e}");
            return EXIT_LOST;
        }
    };

    // The caches as they were before any step: only what the job adds is sent back.
    let before = collect::before(&job.collect);
    let code = match step::run_job(&job, &link) {
        JobEnd::Finished { success } => {
            if !job.collect.is_empty() && link.cancel_reason().is_none() {
                let (files, bytes) = collect::send(&job.collect, &before, &link);
                eprintln!("slate-agent: sent back {files} files ({bytes} bytes)");
            }
            link.push(&AgentMsg::Done { success });
            if link.finish(FINAL_ACK_WAIT) {
                EXIT_OK
            } else {
                lost_code(&link)
            }
        }
        JobEnd::LinkLost => lost_code(&link),
    };
    // Daemons the steps started end with the job (in a container, the agent's exit as
    // PID 1 would kill them anyway).
    sys::sweep_children();
    code
}

fn lost_code(link: &Link) -> u8 {
    match link.lost() {
        Some(Lost::Rejected(_)) => EXIT_REJECTED,
        _ => EXIT_LOST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Parsed, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let Ok(Parsed::Run(a)) = parse(&["--connect", "unix:/s", "--heartbeat-ms=100"]) else {
            panic!()
        };
        assert_eq!(a.connect, Addr::Unix("/s".into()));
        assert_eq!(a.heartbeat, Duration::from_millis(100));
        assert_eq!(a.prepare, None);
        let Ok(Parsed::Run(a)) = parse(&["--connect", "unix:/s", "--prepare", "/run/p"]) else {
            panic!()
        };
        assert_eq!(a.prepare, Some("/run/p".into()));
        assert!(matches!(
            parse(&["--connect=tcp:1.2.3.4:5"]),
            Ok(Parsed::Run(_))
        ));
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
        assert!(parse(&[]).is_err());
        assert!(parse(&["--connect"]).is_err());
        assert!(parse(&["--connect", "unix:/s", "--bogus"]).is_err());
        let fp = tls::Fingerprint::of(b"c").to_string();
        let Ok(Parsed::Run(a)) = parse(&["--connect", "tls:1.2.3.4:5", "--fingerprint", &fp])
        else {
            panic!()
        };
        assert_eq!(a.connect.to_string(), "tls:1.2.3.4:5");
        assert!(parse(&["--connect", "tls:1.2.3.4:5", "--fingerprint", "sha256:12"]).is_err());
    }
}
