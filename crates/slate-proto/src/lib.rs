//! The agent wire protocol: versioned, length-prefixed JSON frames over any byte stream.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. The agent
//! speaks first with [`AgentMsg::Hello`]; the server answers [`ServerMsg::Welcome`] with the
//! job, or [`ServerMsg::Reject`]. Output chunks carry a sequence number per job; the server
//! acknowledges them, and an agent that reconnects resends everything after the last ack.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frames larger than this are refused (a corrupt or hostile peer).
pub const MAX_FRAME: usize = 4 << 20;

/// Largest output chunk an agent sends in one frame.
pub const MAX_CHUNK: usize = 64 << 10;

/// What a job needs to run, sent to the agent once it is authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: i64,
    /// Directory inside the worker the steps run in.
    pub workdir: String,
    /// The whole environment of every step (the agent's own is not inherited).
    pub env: BTreeMap<String, String>,
    pub steps: Vec<StepSpec>,
    /// Files the agent sends back after the steps, for workers whose files the server
    /// cannot read itself (machines elsewhere): artifacts, and new files of caches.
    #[serde(default)]
    pub collect: Vec<CollectSpec>,
}

/// One set of files to send back after the steps, as [`AgentMsg::File`] chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectSpec {
    /// Absolute directory in the worker the paths are relative to.
    pub root: String,
    /// Relative globs (`*` within a directory, `**` across them) of the files to send;
    /// empty means every regular file that was not there before the first step (the new
    /// files of a cache).
    pub globs: Vec<String>,
    /// Bytes sent at most; files that would pass it are not sent.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub name: String,
    /// Run with `/bin/sh -c`.
    pub run: String,
    /// Per-step limit; the whole process group is killed when it is exceeded.
    pub timeout_ms: Option<u64>,
    pub allow_failure: bool,
    /// Added on top of the job's environment.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Exit code 0.
    Ok,
    /// Non-zero exit or killed by a signal.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Could not be started at all (e.g. no /bin/sh).
    SpawnError,
}

/// Messages from the agent to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Hello {
        protocol: u32,
        /// The job's one-time token.
        token: String,
        agent_version: String,
        /// Highest output sequence number the server acknowledged on an earlier
        /// connection, if this is a reconnect; 0 otherwise.
        resume_after: u64,
    },
    StepStarted {
        step: u32,
    },
    Output {
        /// 1-based, increasing by one per chunk within a job.
        seq: u64,
        step: u32,
        stream: Stream,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    StepFinished {
        step: u32,
        outcome: StepOutcome,
        exit_code: Option<i32>,
        signal: Option<i32>,
        duration_ms: u64,
    },
    /// A piece of a collected file (regular files only, never through a symlink), in the
    /// output sequence (so acknowledged and resent like output). A file is its chunks in
    /// order, `offset` 0 first; `last` marks its end (an empty file is one such chunk).
    File {
        seq: u64,
        /// Index into the job's `collect`.
        collect: u32,
        /// Relative to the collect's root, `/`-separated.
        path: String,
        offset: u64,
        #[serde(with = "b64")]
        data: Vec<u8>,
        last: bool,
    },
    /// All steps done (or the job stopped at a failing one).
    Done {
        success: bool,
    },
    Heartbeat,
}

/// Messages from the server to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        job: JobSpec,
    },
    Reject {
        reason: String,
    },
    /// Output up to and including `seq` is durable on the server.
    Ack {
        seq: u64,
    },
    /// Stop the running step (kill its process group) and finish.
    Cancel {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("connection closed")]
    Closed,
}

/// Encode one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Write one frame to a blocking writer.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Read one frame from a blocking reader; `Closed` on a clean end of stream.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(feature = "tokio")]
pub mod asynch {
    //! The same framing over tokio streams.
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
        w: &mut W,
        msg: &T,
    ) -> Result<(), ProtoError> {
        w.write_all(&encode(msg)?).await?;
        w.flush().await?;
        Ok(())
    }

    pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
        r: &mut R,
    ) -> Result<T, ProtoError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtoError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok(serde_json::from_slice(&body)?)
    }
}

mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_binary_output() {
        let msg = AgentMsg::Output {
            seq: 7,
            step: 0,
            stream: Stream::Stderr,
            data: vec![0, 255, b'\n', 0x1b],
        };
        let bytes = encode(&msg).unwrap();
        let back: AgentMsg = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let r: Result<AgentMsg, _> = read_frame(&mut &bytes[..]);
        assert!(matches!(r, Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn clean_eof_is_closed() {
        let r: Result<AgentMsg, _> = read_frame(&mut &b""[..]);
        assert!(matches!(r, Err(ProtoError::Closed)));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{x}");
        let r: Result<AgentMsg, _> = read_frame(&mut &bytes[..]);
        assert!(matches!(r, Err(ProtoError::Malformed(_))));
    }
}
