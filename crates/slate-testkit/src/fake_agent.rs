//! A fake slate server for provider tests: accepts one agent on a Unix socket (a VM's
//! virtio-serial port connects there), hands it one step and collects its output.

use slate_proto::asynch::{read_frame, write_frame};
use slate_proto::{AgentMsg, JobSpec, ServerMsg, StepSpec};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::net::UnixListener;

/// What the fake server saw of one job.
#[derive(Debug)]
pub struct Seen {
    pub token: String,
    pub output: String,
    pub success: bool,
}

/// Accepts the connection, waits up to `boot_timeout` for the agent's hello, hands it one
/// step running `script` in /workspace, and collects its output until `Done`.
pub async fn serve_one_job(
    listener: UnixListener,
    script: &str,
    boot_timeout: Duration,
) -> Result<Seen, String> {
    let deadline = tokio::time::Instant::now() + boot_timeout;
    let (s, _) = tokio::time::timeout_at(deadline, listener.accept())
        .await
        .map_err(|_| "the vm never connected".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = s.into_split();
    let hello: AgentMsg = tokio::time::timeout_at(deadline, read_frame(&mut rd))
        .await
        .map_err(|_| "boot timeout: no hello".to_string())?
        .map_err(|e| e.to_string())?;
    let AgentMsg::Hello { token, .. } = hello else {
        return Err(format!("expected hello, got {hello:?}"));
    };
    let job = JobSpec {
        collect: Vec::new(),
        job_id: 1,
        workdir: "/workspace".into(),
        env: BTreeMap::from([("PATH".into(), "/usr/local/bin:/bin:/sbin".into())]),
        steps: vec![StepSpec {
            name: "main".into(),
            run: script.into(),
            timeout_ms: None,
            allow_failure: false,
            env: BTreeMap::new(),
        }],
    };
    write_frame(&mut wr, &ServerMsg::Welcome { job })
        .await
        .map_err(|e| e.to_string())?;
    let mut output = Vec::new();
    loop {
        let m: AgentMsg = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut rd))
            .await
            .map_err(|_| "no message for 60 s".to_string())?
            .map_err(|e| e.to_string())?;
        match m {
            AgentMsg::Output { seq, data, .. } => {
                output.extend(data);
                write_frame(&mut wr, &ServerMsg::Ack { seq })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            AgentMsg::Done { success } => {
                return Ok(Seen {
                    token,
                    output: String::from_utf8_lossy(&output).into_owned(),
                    success,
                })
            }
            _ => {}
        }
    }
}
