//! A fake server for the agent's integration tests: a Unix socket in a temp dir speaking
//! the protocol with slate-proto's blocking helpers, and the real agent binary.
#![allow(dead_code)]

use slate_proto::{read_frame, write_frame, AgentMsg, JobSpec, ServerMsg, StepOutcome, StepSpec};
use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "tok-3f9a7c1e5b";
pub const AGENT: &str = env!("CARGO_BIN_EXE_slate-agent");

pub fn step(name: &str, run: &str) -> StepSpec {
    StepSpec {
        name: name.into(),
        run: run.into(),
        timeout_ms: None,
        allow_failure: false,
        env: BTreeMap::new(),
    }
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A listening socket in a fresh temp dir, which is also where jobs run.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    listener: UnixListener,
}

impl Server {
    pub fn new() -> Server {
        Server::with_socket_at("agent.sock")
    }

    /// A server whose socket is at `rel` inside the temp dir (parents created).
    pub fn with_socket_at(rel: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(rel);
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        let listener = UnixListener::bind(&sock).unwrap();
        listener.set_nonblocking(true).unwrap();
        Server {
            dir,
            sock,
            listener,
        }
    }

    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn job(&self, steps: Vec<StepSpec>) -> JobSpec {
        JobSpec {
            collect: Vec::new(),
            job_id: 42,
            workdir: self.workdir().to_string_lossy().into_owned(),
            env: BTreeMap::new(),
            steps,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent with the token and `env` on top of the test's environment; its
    /// stderr goes to `agent.err` in the temp dir.
    pub fn spawn_agent(&self, env: &[(&str, &str)]) -> Child {
        self.spawn_agent_args(
            &["--connect", &format!("unix:{}", self.sock.display())],
            env,
        )
    }

    pub fn spawn_agent_args(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        self.spawn(AGENT, args, env)
    }

    /// Starts `program` (the agent, or a wrapper that runs it) with the agent's token.
    pub fn spawn(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
        Command::new(program)
            .args(args)
            .env("SLATE_AGENT_TOKEN", TOKEN)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("agent.err")).unwrap())
            .spawn()
            .unwrap()
    }

    pub fn agent_stderr(&self) -> String {
        std::fs::read_to_string(self.path("agent.err")).unwrap_or_default()
    }

    /// Accepts the agent's connection (10 s at most).
    pub fn accept(&self) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return Conn { s };
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the agent never connected");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// The whole exchange for `job`: accept, check Hello, Welcome, then read until `Done`
    /// (acking every output at once) and wait for the agent to exit.
    pub fn run(&self, job: &JobSpec, env: &[(&str, &str)]) -> Run {
        self.run_child(self.spawn_agent(env), job)
    }

    /// [`Server::run`] for an agent already started.
    pub fn run_child(&self, child: Child, job: &JobSpec) -> Run {
        self.run_reacting(child, job, |_| None)
    }

    /// [`Server::run_child`] where `react` may answer any message (see [`Conn::until_done`]).
    pub fn run_reacting(
        &self,
        mut child: Child,
        job: &JobSpec,
        react: impl FnMut(&AgentMsg) -> Option<ServerMsg>,
    ) -> Run {
        let mut conn = self.accept();
        let hello = conn.recv();
        conn.send(&ServerMsg::Welcome { job: job.clone() });
        let start = Instant::now();
        let msgs = conn.until_done(start, react);
        let code = wait_exit(&mut child, Duration::from_secs(15));
        Run {
            hello,
            msgs,
            code,
            stderr: self.agent_stderr(),
        }
    }
}

pub struct Conn {
    pub s: UnixStream,
}

impl Conn {
    pub fn recv(&mut self) -> AgentMsg {
        read_frame(&mut self.s).expect("a message from the agent")
    }

    pub fn send(&mut self, msg: &ServerMsg) {
        write_frame(&mut self.s, msg).unwrap();
    }

    /// Reads until `Done`, acking each output; `react` may answer any message with one of
    /// its own (e.g. a Cancel). Returns the messages with their arrival time after `start`.
    pub fn until_done(
        &mut self,
        start: Instant,
        mut react: impl FnMut(&AgentMsg) -> Option<ServerMsg>,
    ) -> Vec<(Duration, AgentMsg)> {
        let mut msgs = Vec::new();
        loop {
            let m = self.recv();
            let at = start.elapsed();
            if let AgentMsg::Output { seq, .. } = &m {
                self.send(&ServerMsg::Ack { seq: *seq });
            }
            if let Some(reply) = react(&m) {
                self.send(&reply);
            }
            let done = matches!(m, AgentMsg::Done { .. });
            msgs.push((at, m));
            if done {
                return msgs;
            }
        }
    }
}

/// Waits for the agent to exit; kills it and panics after `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or_else(|| panic!("agent killed: {st:?}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process exists (a zombie counts: it is not reaped yet).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits up to `within` for `pid` to be gone.
pub fn gone_within(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while pid_exists(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

pub fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One finished step as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub outcome: StepOutcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
}

/// What the server saw of one job.
pub struct Run {
    pub hello: AgentMsg,
    pub msgs: Vec<(Duration, AgentMsg)>,
    pub code: i32,
    pub stderr: String,
}

impl Run {
    pub fn messages(&self) -> impl Iterator<Item = &AgentMsg> {
        self.msgs.iter().map(|(_, m)| m)
    }

    pub fn started(&self) -> Vec<u32> {
        self.messages()
            .filter_map(|m| match m {
                AgentMsg::StepStarted { step } => Some(*step),
                _ => None,
            })
            .collect()
    }

    pub fn finished(&self, want: u32) -> Option<Finished> {
        self.messages().find_map(|m| match *m {
            AgentMsg::StepFinished {
                step,
                outcome,
                exit_code,
                signal,
                duration_ms,
            } if step == want => Some(Finished {
                outcome,
                exit_code,
                signal,
                duration_ms,
            }),
            _ => None,
        })
    }

    pub fn done(&self) -> Option<bool> {
        self.messages().find_map(|m| match m {
            AgentMsg::Done { success } => Some(*success),
            _ => None,
        })
    }

    /// Concatenated output of `want` on `stream`.
    pub fn output(&self, want: u32, stream: slate_proto::Stream) -> Vec<u8> {
        let mut out = Vec::new();
        for m in self.messages() {
            if let AgentMsg::Output {
                step,
                stream: s,
                data,
                ..
            } = m
            {
                if *step == want && *s == stream {
                    out.extend_from_slice(data);
                }
            }
        }
        out
    }

    pub fn stdout(&self, step: u32) -> String {
        String::from_utf8_lossy(&self.output(step, slate_proto::Stream::Stdout)).into_owned()
    }

    pub fn stderr_of(&self, step: u32) -> String {
        String::from_utf8_lossy(&self.output(step, slate_proto::Stream::Stderr)).into_owned()
    }

    /// Asserts the output seqs are exactly 1..=n in arrival order; returns n.
    pub fn assert_seqs_contiguous(&self) -> u64 {
        let seqs: Vec<u64> = self
            .messages()
            .filter_map(|m| match m {
                AgentMsg::Output { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "output seqs are not 1..=n in order");
        seqs.len() as u64
    }

    /// Asserts that every step's output lies between its StepStarted and StepFinished.
    pub fn assert_framed(&self) {
        let mut current: Option<u32> = None;
        for m in self.messages() {
            match m {
                AgentMsg::StepStarted { step } => {
                    assert_eq!(current, None, "step {step} started inside another");
                    current = Some(*step);
                }
                AgentMsg::Output { step, .. } => assert_eq!(current, Some(*step)),
                AgentMsg::StepFinished { step, .. } => {
                    assert_eq!(current, Some(*step));
                    current = None;
                }
                _ => {}
            }
        }
    }
}
