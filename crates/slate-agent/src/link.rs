//! The link to the server: the handshake, a journal of outgoing messages kept until the
//! server acknowledges them, one writer thread (the only one that writes frames), one
//! reader thread (acks and cancels), heartbeats, and reconnection for TCP.
//!
//! Architecture invariant: output sequence numbers are assigned under the journal's lock
//! in the order messages are queued, and the writer sends the journal strictly in order,
//! so the server sees `seq` 1, 2, 3… with no gap and no duplicate on one connection. After
//! a reconnect the writer resends everything the server has not acknowledged.

use crate::sys;
use crate::transport::{Addr, Transport};
use slate_proto::{
    encode, read_frame, write_frame, AgentMsg, JobSpec, ProtoError, ServerMsg, Stream,
    PROTOCOL_VERSION,
};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Unacknowledged output kept for a resend; past this the agent stops reading the step's
/// pipes (so the step blocks on its writes) until acks free room.
pub const UNACKED_LIMIT: usize = 64 << 20;

/// How long the handshake may wait for the server's answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a lost TCP connection is retried before the agent gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Frames written with one `write` call at most (roughly).
const BATCH: usize = 1 << 20;

/// The server's answer to `Hello`.
#[derive(Debug)]
pub enum Handshake {
    Welcome(JobSpec),
    Rejected(String),
}

/// Why the link is gone for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    Connection,
    Rejected(String),
}

/// Sends `Hello` and reads the answer.
pub fn handshake(
    t: &mut Transport,
    token: &str,
    resume_after: u64,
) -> Result<Handshake, ProtoError> {
    t.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let hello = AgentMsg::Hello {
        protocol: PROTOCOL_VERSION,
        token: token.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        resume_after,
    };
    write_frame(t, &hello)?;
    let answer = loop {
        match read_frame::<_, ServerMsg>(t)? {
            ServerMsg::Welcome { job } => break Handshake::Welcome(job),
            ServerMsg::Reject { reason } => break Handshake::Rejected(reason),
            other => eprintln!("slate-agent: ignoring {} before Welcome", msg_name(&other)),
        }
    };
    t.set_read_timeout(None);
    Ok(answer)
}

fn msg_name(m: &ServerMsg) -> &'static str {
    match m {
        ServerMsg::Welcome { .. } => "Welcome",
        ServerMsg::Reject { .. } => "Reject",
        ServerMsg::Ack { .. } => "Ack",
        ServerMsg::Cancel { .. } => "Cancel",
    }
}

/// One queued message, encoded once.
struct Entry {
    /// `Some` for output chunks.
    seq: Option<u64>,
    /// For other messages: the last output seq queued before it.
    watermark: u64,
    frame: Vec<u8>,
}

struct State {
    /// Messages not yet known to be received, oldest first.
    journal: VecDeque<Entry>,
    /// Absolute index of `journal[0]`; the indexes below count from the job's start.
    base: u64,
    /// Entries below this were handed to the writer on the current connection.
    taken: u64,
    /// Entries below this were written on the current connection.
    written: u64,
    last_seq: u64,
    acked: u64,
    unacked_bytes: usize,
    /// Connection generation, bumped on reconnect so a stale reader cannot report.
    gen: u64,
    /// The connection failed; the writer must reconnect.
    broken: bool,
    lost: Option<Lost>,
    cancel: Option<String>,
}

impl State {
    fn end(&self) -> u64 {
        self.base + self.journal.len() as u64
    }
}

struct Inner {
    st: Mutex<State>,
    cv: Condvar,
    addr: Addr,
    token: String,
    heartbeat: Duration,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lose(&self, why: Lost) {
        let mut st = self.lock();
        if st.lost.is_none() {
            st.lost = Some(why);
        }
        drop(st);
        self.cv.notify_all();
        sys::wake();
    }

    /// The connection of generation `gen` failed.
    fn broken(&self, gen: u64, why: &dyn std::fmt::Display) {
        let mut st = self.lock();
        if st.gen != gen || st.lost.is_some() || st.broken {
            return;
        }
        eprintln!("slate-agent: connection to {} lost: {why}", self.addr);
        if self.addr.reconnects() {
            st.broken = true;
            drop(st);
            self.cv.notify_all();
        } else {
            drop(st);
            self.lose(Lost::Connection);
        }
    }

    fn ack(&self, seq: u64) {
        let mut st = self.lock();
        let was_full = st.unacked_bytes > UNACKED_LIMIT;
        st.acked = st.acked.max(seq.min(st.last_seq));
        let acked = st.acked;
        while st.base < st.taken {
            let Some(front) = st.journal.front() else {
                break;
            };
            let received = match front.seq {
                Some(s) => s <= acked,
                None => front.watermark < acked,
            };
            if !received {
                break;
            }
            let e = st.journal.pop_front().expect("front exists");
            if e.seq.is_some() {
                st.unacked_bytes -= e.frame.len();
            }
            st.base += 1;
        }
        let now_full = st.unacked_bytes > UNACKED_LIMIT;
        drop(st);
        self.cv.notify_all();
        if was_full && !now_full {
            sys::wake();
        }
    }
}

/// The running link. Cheap to share by reference; the threads hold their own handle.
pub struct Link {
    inner: Arc<Inner>,
}

impl Link {
    /// Starts the writer and reader threads on an authenticated connection.
    pub fn start(t: Transport, addr: Addr, token: String, heartbeat: Duration) -> io::Result<Link> {
        let inner = Arc::new(Inner {
            st: Mutex::new(State {
                journal: VecDeque::new(),
                base: 0,
                taken: 0,
                written: 0,
                last_seq: 0,
                acked: 0,
                unacked_bytes: 0,
                gen: 0,
                broken: false,
                lost: None,
                cancel: None,
            }),
            cv: Condvar::new(),
            addr,
            token,
            heartbeat,
        });
        let r = t.try_clone()?;
        spawn_reader(inner.clone(), r, 0)?;
        let w = inner.clone();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer(w, t))?;
        Ok(Link { inner })
    }

    /// Queues a message other than `Output`.
    pub fn push(&self, msg: &AgentMsg) {
        let frame = match encode(msg) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("slate-agent: cannot encode a message: {e}");
                return;
            }
        };
        let mut st = self.inner.lock();
        let watermark = st.last_seq;
        st.journal.push_back(Entry {
            seq: None,
            watermark,
            frame,
        });
        drop(st);
        self.inner.cv.notify_all();
    }

    /// Queues one output chunk (at most `MAX_CHUNK` bytes) with the next sequence number.
    pub fn push_output(&self, step: u32, stream: Stream, data: &[u8]) {
        self.push_numbered(|seq| AgentMsg::Output {
            seq,
            step,
            stream,
            data: data.to_vec(),
        })
    }

    /// Queues a message of the output sequence (output, collected files) made by `make`
    /// from the next sequence number: it is acknowledged and resent like output.
    pub fn push_numbered(&self, make: impl FnOnce(u64) -> AgentMsg) {
        let mut st = self.inner.lock();
        let seq = st.last_seq + 1;
        let msg = make(seq);
        let frame = match encode(&msg) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("slate-agent: cannot encode output: {e}");
                return;
            }
        };
        st.last_seq = seq;
        st.unacked_bytes += frame.len();
        st.journal.push_back(Entry {
            seq: Some(seq),
            watermark: seq,
            frame,
        });
        drop(st);
        self.inner.cv.notify_all();
    }

    /// Too much output is waiting for acks: stop reading the step's pipes for now.
    pub fn backpressured(&self) -> bool {
        self.inner.lock().unacked_bytes > UNACKED_LIMIT
    }

    pub fn cancel_reason(&self) -> Option<String> {
        self.inner.lock().cancel.clone()
    }

    pub fn lost(&self) -> Option<Lost> {
        self.inner.lock().lost.clone()
    }

    /// Waits until everything queued is written and all output acknowledged, the link is
    /// lost, or `within` has passed. Returns whether everything queued was written.
    pub fn finish(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut st = self.inner.lock();
        loop {
            let all_written = st.written == st.end();
            if (all_written && st.acked >= st.last_seq) || st.lost.is_some() {
                return all_written;
            }
            let now = Instant::now();
            if now >= deadline {
                return all_written;
            }
            st = self
                .inner
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn spawn_reader(inner: Arc<Inner>, t: Transport, gen: u64) -> io::Result<()> {
    std::thread::Builder::new()
        .name("reader".into())
        .spawn(move || reader(inner, t, gen))?;
    Ok(())
}

fn reader(inner: Arc<Inner>, mut t: Transport, gen: u64) {
    loop {
        match read_frame::<_, ServerMsg>(&mut t) {
            Ok(ServerMsg::Ack { seq }) => inner.ack(seq),
            Ok(ServerMsg::Cancel { reason }) => {
                eprintln!("slate-agent: cancelled by the server: {reason}");
                let mut st = inner.lock();
                st.cancel.get_or_insert(reason);
                drop(st);
                sys::wake();
            }
            Ok(other) => eprintln!("slate-agent: ignoring unexpected {}", msg_name(&other)),
            // The frame was read whole, so the stream is still in step: skip it.
            Err(ProtoError::Malformed(e)) => {
                eprintln!("slate-agent: ignoring a malformed message: {e}")
            }
            Err(e) => return inner.broken(gen, &e),
        }
    }
}

enum Work {
    Frames(Vec<u8>, u64),
    Beat,
    Reconnect,
}

fn writer(inner: Arc<Inner>, mut t: Transport) {
    let beat = encode(&AgentMsg::Heartbeat).expect("heartbeat encodes");
    let mut next_beat = Instant::now() + inner.heartbeat;
    loop {
        let work = {
            let mut st = inner.lock();
            loop {
                if st.lost.is_some() {
                    return;
                }
                if st.broken {
                    break Work::Reconnect;
                }
                if st.taken < st.end() {
                    let mut buf = Vec::new();
                    let mut i = st.taken;
                    while i < st.end() && buf.len() < BATCH {
                        buf.extend_from_slice(&st.journal[(i - st.base) as usize].frame);
                        i += 1;
                    }
                    st.taken = i;
                    break Work::Frames(buf, i);
                }
                let now = Instant::now();
                if now >= next_beat {
                    break Work::Beat;
                }
                st = inner
                    .cv
                    .wait_timeout(st, next_beat - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        let result = match work {
            Work::Frames(buf, upto) => t.write_all(&buf).and_then(|()| t.flush()).map(|()| {
                let mut st = inner.lock();
                st.written = st.written.max(upto);
                drop(st);
                inner.cv.notify_all();
            }),
            Work::Beat => {
                next_beat = Instant::now() + inner.heartbeat;
                t.write_all(&beat).and_then(|()| t.flush())
            }
            Work::Reconnect => Err(io::Error::other("the reader saw the connection end")),
        };
        if let Err(e) = result {
            let gen = inner.lock().gen;
            inner.broken(gen, &e);
            if !inner.addr.reconnects() || !reconnect(&inner, &mut t) {
                return;
            }
            next_beat = Instant::now() + inner.heartbeat;
        }
    }
}

/// Re-establishes a TCP connection: Hello with `resume_after` = the last acked seq, then
/// everything still in the journal is sent again. Returns false when giving up.
fn reconnect(inner: &Arc<Inner>, t: &mut Transport) -> bool {
    let gen = {
        let mut st = inner.lock();
        st.gen += 1;
        st.broken = false;
        st.gen
    };
    t.shutdown();
    let deadline = Instant::now() + RECONNECT_FOR;
    let mut pause = Duration::from_millis(50);
    loop {
        let attempt = Transport::connect(&inner.addr)
            .map_err(ProtoError::from)
            .and_then(|mut nt| {
                let acked = inner.lock().acked;
                handshake(&mut nt, &inner.token, acked).map(|h| (nt, h, acked))
            });
        match attempt {
            Ok((nt, Handshake::Welcome(_), acked)) => {
                let Ok(r) = nt.try_clone() else { continue };
                {
                    let mut st = inner.lock();
                    st.taken = st.base;
                    st.written = st.base;
                }
                if spawn_reader(inner.clone(), r, gen).is_err() {
                    inner.lose(Lost::Connection);
                    return false;
                }
                eprintln!(
                    "slate-agent: reconnected to {}, resuming after seq {acked}",
                    inner.addr
                );
                *t = nt;
                return true;
            }
            Ok((_, Handshake::Rejected(reason), _)) => {
                eprintln!("slate-agent: rejected on reconnect: {reason}");
                inner.lose(Lost::Rejected(reason));
                return false;
            }
            Err(e) => {
                if Instant::now() + pause > deadline {
                    eprintln!("slate-agent: giving up reconnecting to {}: {e}", inner.addr);
                    inner.lose(Lost::Connection);
                    return false;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}
