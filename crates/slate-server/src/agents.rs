//! Where agents dial in: every connection (per-job Unix socket, or the shared TCP
//! listener for remote machines) first says hello with its job token; the token names
//! the job (`<job id>.<secret>`), and the connection is handed to that job's runner.
//!
//! A runner registers its job with the token's hash before the worker exists and
//! deregisters when the job ends, so a token is accepted only while its job runs: a
//! reconnect of the same agent is accepted (resending from its last acknowledged chunk),
//! a token of another job, a wrong one, or one used after the job ended is refused.
//!
//! Over TCP the hello normally arrives inside TLS. A pool may allow plaintext
//! (`insecure_plaintext`); for any other job a plaintext hello is refused, and if it
//! carried the job's valid token, that token is revoked (it crossed the network in clear):
//! the job's runner gives up the attempt as an infrastructure failure and the retry gets a
//! fresh token.

use sha2::{Digest, Sha256};
use slate_core::JobId;
use slate_proto::asynch::{read_frame, write_frame};
use slate_proto::{AgentMsg, ServerMsg, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An authenticated agent connection, handed to its job's runner.
pub struct AgentLink {
    pub rd: BoxRead,
    pub wr: BoxWrite,
    /// Highest output chunk the agent says the server acknowledged before (0 at first).
    pub resume_after: u64,
    pub transport: &'static str,
}

struct Registration {
    token_hash: [u8; 32],
    links: mpsc::Sender<AgentLink>,
    /// The job's pool lets its agents speak plaintext TCP.
    plaintext_ok: bool,
}

/// Jobs waiting for (or talking to) their agents.
#[derive(Default)]
pub struct AgentRegistry {
    jobs: Mutex<HashMap<JobId, Registration>>,
    /// Why a job's token was revoked, for its runner's log.
    revoked: Mutex<HashMap<JobId, String>>,
}

/// How a connection reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Local (Unix socket, virtio-serial) or TLS: the hello cannot be read on the way.
    Private,
    /// Plaintext TCP.
    Plaintext,
}

/// A fresh job token: the job id, a dot, and 256 random bits in hex.
pub fn new_token(job: JobId) -> String {
    let mut buf = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    format!("{}.{}", job.0, hex::encode(buf))
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a hello was refused (sent to the agent, logged on the server).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("no hello in time")]
    Timeout,
    #[error("agent speaks protocol {0}, server speaks {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("invalid token")]
    BadToken,
    #[error("expected hello, got another message")]
    NotHello,
    #[error("connection failed before hello: {0}")]
    Io(String),
    #[error("plaintext tcp refused: this job's pool requires tls (set insecure_plaintext = true on the pool to allow it)")]
    PlaintextRefused,
}

impl AgentRegistry {
    /// Register a job; connections presenting `token` are sent to the returned receiver.
    /// Its agents must not use plaintext TCP.
    pub fn register(&self, job: JobId, token: &str) -> mpsc::Receiver<AgentLink> {
        self.register_with(job, token, false)
    }

    /// Like [`register`](Self::register); `plaintext_ok` lets the job's agent use plaintext TCP.
    pub fn register_with(
        &self,
        job: JobId,
        token: &str,
        plaintext_ok: bool,
    ) -> mpsc::Receiver<AgentLink> {
        let (tx, rx) = mpsc::channel(4);
        self.revoked.lock().unwrap().remove(&job);
        self.jobs.lock().unwrap().insert(
            job,
            Registration {
                token_hash: token_hash(token),
                links: tx,
                plaintext_ok,
            },
        );
        rx
    }

    pub fn deregister(&self, job: JobId) {
        self.jobs.lock().unwrap().remove(&job);
        self.revoked.lock().unwrap().remove(&job);
    }

    /// Why the job's token was revoked (its link channel then closes), if it was.
    pub fn revoked(&self, job: JobId) -> Option<String> {
        self.revoked.lock().unwrap().get(&job).cloned()
    }

    /// Read the hello of a new connection and route it to its job; refuse it otherwise.
    /// `hello_within` bounds the wait for the hello: short for TCP (the agent speaks as
    /// soon as it connects), the boot timeout for a VM's serial port (qemu connects when it
    /// starts; the guest's agent speaks once it has booted).
    pub async fn accept<R, W>(
        &self,
        rd: R,
        wr: W,
        transport: &'static str,
        hello_within: Duration,
    ) -> Result<JobId, HelloError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        self.accept_on(rd, wr, transport, Channel::Private, hello_within)
            .await
    }

    /// [`accept`](Self::accept) for a connection of the given channel.
    pub async fn accept_on<R, W>(
        &self,
        mut rd: R,
        mut wr: W,
        transport: &'static str,
        channel: Channel,
        hello_within: Duration,
    ) -> Result<JobId, HelloError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let hello =
            match tokio::time::timeout(hello_within, read_frame::<_, AgentMsg>(&mut rd)).await {
                Err(_) => return Err(HelloError::Timeout),
                Ok(Err(e)) => return Err(HelloError::Io(e.to_string())),
                Ok(Ok(m)) => m,
            };
        let routed = match hello {
            AgentMsg::Hello {
                protocol,
                token,
                resume_after,
                ..
            } => {
                if protocol != PROTOCOL_VERSION {
                    Err(HelloError::Protocol(protocol))
                } else {
                    self.route(&token, channel)
                        .map(|(job, tx)| (job, tx, resume_after))
                }
            }
            _ => Err(HelloError::NotHello),
        };
        match routed {
            Ok((job, tx, resume_after)) => {
                let link = AgentLink {
                    rd: Box::new(rd),
                    wr: Box::new(wr),
                    resume_after,
                    transport,
                };
                // The runner may have just finished: then the token is no longer good.
                tx.send(link).await.map_err(|_| HelloError::BadToken)?;
                Ok(job)
            }
            Err(e) => {
                let _ = write_frame(
                    &mut wr,
                    &ServerMsg::Reject {
                        reason: e.to_string(),
                    },
                )
                .await;
                Err(e)
            }
        }
    }

    fn route(
        &self,
        token: &str,
        channel: Channel,
    ) -> Result<(JobId, mpsc::Sender<AgentLink>), HelloError> {
        let job = token
            .split_once('.')
            .and_then(|(id, _)| id.parse::<i64>().ok())
            .map(JobId)
            .ok_or(HelloError::BadToken)?;
        let mut jobs = self.jobs.lock().unwrap();
        let reg = jobs.get(&job).ok_or(HelloError::BadToken)?;
        let valid = bool::from(reg.token_hash.ct_eq(&token_hash(token)));
        if channel == Channel::Plaintext && !reg.plaintext_ok {
            if valid {
                // Whoever was on the path has read the token: it must not be good for a
                // TLS connection either.
                jobs.remove(&job);
                self.revoked.lock().unwrap().insert(
                    job,
                    "the agent token was sent over plaintext tcp to a pool that requires tls: token revoked".into(),
                );
                tracing::warn!(
                    job.id = job.0,
                    "agent token presented over plaintext tcp: revoked"
                );
            }
            return Err(HelloError::PlaintextRefused);
        }
        if valid {
            Ok((job, reg.links.clone()))
        } else {
            Err(HelloError::BadToken)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slate_proto::asynch::write_frame as wf;

    async fn hello(reg: &AgentRegistry, token: &str) -> Result<JobId, HelloError> {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut crd, mut cwr) = tokio::io::split(client);
        let (srd, swr) = tokio::io::split(server);
        wf(
            &mut cwr,
            &AgentMsg::Hello {
                protocol: PROTOCOL_VERSION,
                token: token.into(),
                agent_version: "t".into(),
                resume_after: 0,
            },
        )
        .await
        .unwrap();
        let r = reg.accept(srd, swr, "test", Duration::from_secs(5)).await;
        if r.is_err() {
            let m: ServerMsg = read_frame(&mut crd).await.unwrap();
            assert!(matches!(m, ServerMsg::Reject { .. }));
        }
        r
    }

    #[tokio::test]
    async fn tokens_route_to_their_job_only_while_registered() {
        let reg = AgentRegistry::default();
        let t1 = new_token(JobId(1));
        let t2 = new_token(JobId(2));
        let mut rx1 = reg.register(JobId(1), &t1);
        assert_eq!(hello(&reg, &t1).await, Ok(JobId(1)));
        assert!(rx1.recv().await.is_some());
        // Job 2 is not registered; a token for job 1 with another secret is wrong.
        assert_eq!(hello(&reg, &t2).await, Err(HelloError::BadToken));
        let forged = format!("1.{}", "0".repeat(64));
        assert_eq!(hello(&reg, &forged).await, Err(HelloError::BadToken));
        assert_eq!(hello(&reg, "garbage").await, Err(HelloError::BadToken));
        // A reconnect with the same token is routed again; after the job ends it is not.
        assert_eq!(hello(&reg, &t1).await, Ok(JobId(1)));
        reg.deregister(JobId(1));
        assert_eq!(hello(&reg, &t1).await, Err(HelloError::BadToken));
    }

    async fn hello_on(
        reg: &AgentRegistry,
        token: &str,
        channel: Channel,
    ) -> Result<JobId, HelloError> {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_crd, mut cwr) = tokio::io::split(client);
        let (srd, swr) = tokio::io::split(server);
        wf(
            &mut cwr,
            &AgentMsg::Hello {
                protocol: PROTOCOL_VERSION,
                token: token.into(),
                agent_version: "t".into(),
                resume_after: 0,
            },
        )
        .await
        .unwrap();
        reg.accept_on(srd, swr, "test", channel, Duration::from_secs(5))
            .await
    }

    #[tokio::test]
    async fn plaintext_is_refused_unless_the_pool_allows_it_and_a_token_sent_in_clear_is_revoked() {
        let reg = AgentRegistry::default();
        let (t1, t2) = (new_token(JobId(1)), new_token(JobId(2)));
        let mut rx1 = reg.register(JobId(1), &t1);
        let mut rx2 = reg.register_with(JobId(2), &t2, true);
        // A wrong token over plaintext changes nothing for job 1.
        let forged = format!("1.{}", "0".repeat(64));
        assert_eq!(
            hello_on(&reg, &forged, Channel::Plaintext).await,
            Err(HelloError::PlaintextRefused)
        );
        assert_eq!(reg.revoked(JobId(1)), None);
        // The real token in clear: refused, and revoked for TLS too.
        assert_eq!(
            hello_on(&reg, &t1, Channel::Plaintext).await,
            Err(HelloError::PlaintextRefused)
        );
        assert!(reg.revoked(JobId(1)).unwrap().contains("plaintext"));
        assert_eq!(
            hello_on(&reg, &t1, Channel::Private).await,
            Err(HelloError::BadToken)
        );
        assert!(
            rx1.recv().await.is_none(),
            "the runner must see its channel close"
        );
        // A pool that opted in accepts plaintext.
        assert_eq!(hello_on(&reg, &t2, Channel::Plaintext).await, Ok(JobId(2)));
        assert!(rx2.recv().await.is_some());
    }
}
