//! The real agent binary against a fake server on a Unix socket (and TCP, and a pty
//! standing in for a virtio-serial port).

mod common;

use common::*;
use slate_proto::{
    read_frame, write_frame, AgentMsg, ServerMsg, StepOutcome, Stream, MAX_CHUNK, PROTOCOL_VERSION,
};
use std::time::{Duration, Instant};

#[test]
fn two_steps_stream_in_order_and_succeed() {
    let srv = Server::new();
    let job = srv.job(vec![
        step("first", "echo hello; pwd"),
        step(
            "second",
            "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2",
        ),
    ]);
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0, "agent stderr: {}", run.stderr);

    match &run.hello {
        AgentMsg::Hello {
            protocol,
            token,
            agent_version,
            resume_after,
        } => {
            assert_eq!(*protocol, PROTOCOL_VERSION);
            assert_eq!(token, TOKEN);
            assert!(!agent_version.is_empty());
            assert_eq!(*resume_after, 0);
        }
        other => panic!("first message is not Hello: {other:?}"),
    }
    assert_eq!(run.started(), [0, 1]);
    let workdir = srv.workdir().canonicalize().unwrap();
    assert_eq!(run.stdout(0), format!("hello\n{}\n", workdir.display()));
    assert_eq!(run.stdout(1), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    assert_eq!(run.stderr_of(1), "oops\n");
    for s in 0..2 {
        let f = run.finished(s).unwrap();
        assert_eq!(
            (f.outcome, f.exit_code, f.signal),
            (StepOutcome::Ok, Some(0), None)
        );
    }
    assert_eq!(run.done(), Some(true));
    assert!(matches!(run.msgs.last(), Some((_, AgentMsg::Done { .. }))));
    assert!(run.assert_seqs_contiguous() >= 3);
    run.assert_framed();
}

#[test]
fn a_failing_step_stops_the_job() {
    let srv = Server::new();
    let job = srv.job(vec![
        step("ok", "true"),
        step("fails", "echo before; exit 3"),
        step("never", "echo third"),
    ]);
    let run = srv.run(&job, &[]);
    assert_eq!(
        run.code, 0,
        "a job whose step failed still ran: {}",
        run.stderr
    );
    assert_eq!(run.started(), [0, 1], "the third step must not start");
    let f = run.finished(1).unwrap();
    assert_eq!(
        (f.outcome, f.exit_code, f.signal),
        (StepOutcome::Failed, Some(3), None)
    );
    assert_eq!(run.stdout(1), "before\n");
    assert_eq!(run.done(), Some(false));
    run.assert_seqs_contiguous();
}

#[test]
fn allow_failure_continues_and_a_signal_is_reported() {
    let srv = Server::new();
    let mut tolerated = step("tolerated", "kill -9 $$");
    tolerated.allow_failure = true;
    let job = srv.job(vec![tolerated, step("after", "echo after")]);
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0);
    assert_eq!(run.started(), [0, 1]);
    let f = run.finished(0).unwrap();
    assert_eq!(
        (f.outcome, f.exit_code, f.signal),
        (StepOutcome::Failed, None, Some(9))
    );
    assert_eq!(run.finished(1).unwrap().outcome, StepOutcome::Ok);
    assert_eq!(run.stdout(1), "after\n");
    assert_eq!(
        run.done(),
        Some(true),
        "a tolerated failure does not fail the job"
    );
}

#[test]
fn steps_get_a_clean_environment_and_never_the_token() {
    let srv = Server::new();
    let mut job = srv.job(vec![]);
    job.env = map(&[("JOB_VAR", "from-job"), ("SHARED", "job")]);
    let mut s = step("env", "env; echo ---; tr '\\0' '\\n' < /proc/$PPID/environ");
    s.env = map(&[("STEP_VAR", "from-step"), ("SHARED", "step")]);
    job.steps.push(s);
    let run = srv.run(&job, &[("SECRET_FROM_HOST", "x")]);
    assert_eq!(run.code, 0, "{}", run.stderr);

    let out = run.stdout(0);
    assert!(!out.contains(TOKEN), "the token leaked to a step:\n{out}");
    let (env, agent_environ) = out.split_once("---\n").unwrap();
    let mut vars: Vec<&str> = env
        .lines()
        .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
        .collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "HOME=/root",
            "JOB_VAR=from-job",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "SHARED=step",
            "STEP_VAR=from-step",
        ]
    );
    // The agent's own environment block, as /proc shows it to whoever may read it (root
    // here): the token's bytes were overwritten, the rest is intact.
    assert!(
        agent_environ.contains("SECRET_FROM_HOST=x"),
        "could not read: {agent_environ}"
    );
    assert!(!agent_environ.contains(TOKEN));
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let srv = Server::new();
    let pidfile = srv.path("bg.pid");
    let mut s = step(
        "slow",
        &format!(
            "sleep 100 & echo $! > {}; sleep 100; echo never",
            pidfile.display()
        ),
    );
    s.timeout_ms = Some(500);
    let job = srv.job(vec![s, step("next", "echo next")]);
    let t0 = Instant::now();
    let run = srv.run(&job, &[]);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(run.code, 0);
    let f = run.finished(0).unwrap();
    assert_eq!(f.outcome, StepOutcome::TimedOut);
    assert_eq!(f.signal, Some(9));
    assert!(
        (500..3000).contains(&f.duration_ms),
        "duration {}",
        f.duration_ms
    );
    assert!(!run.stdout(0).contains("never"));
    assert_eq!(run.started(), [0]);
    assert_eq!(run.done(), Some(false));
    let bg = read_pid(&pidfile);
    assert!(
        gone_within(bg, Duration::from_secs(2)),
        "background sleep {bg} survived"
    );
}

#[test]
fn daemons_left_by_a_step_do_not_hang_the_job() {
    let srv = Server::new();
    let (a, b, c) = (srv.path("a.pid"), srv.path("b.pid"), srv.path("c.pid"));
    let job = srv.job(vec![
        // Detached from the pipes.
        step(
            "quiet",
            &format!(
                "sleep 1000 >/dev/null 2>&1 & echo $! > {}; echo started",
                a.display()
            ),
        ),
        // Holding stdout and stderr open, same process group.
        step(
            "holder",
            &format!("sleep 1000 & echo $! > {}; echo started", b.display()),
        ),
        // Holding stdout open from another session: out of the group's reach.
        // (The pid is written once setsid is done, or the group kill could still catch it.)
        step(
            "escaped",
            &format!(
                "setsid sh -c 'echo $$ > {0}; exec sleep 1000' & \
                 while [ ! -s {0} ]; do sleep 0.01; done; echo started",
                c.display()
            ),
        ),
        // A daemon that escaped the group lives until the job ends (a service).
        step(
            "uses it",
            &format!("kill -0 $(cat {}) && echo alive", c.display()),
        ),
    ]);
    let t0 = Instant::now();
    let run = srv.run(&job, &[]);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "job took {:?}",
        t0.elapsed()
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for s in 0..3 {
        let f = run.finished(s).unwrap();
        assert_eq!(f.outcome, StepOutcome::Ok, "step {s}");
        assert!(f.duration_ms < 2000, "step {s} took {} ms", f.duration_ms);
        assert_eq!(run.stdout(s), "started\n");
    }
    assert_eq!(run.stdout(3), "alive\n");
    assert_eq!(run.done(), Some(true));
    for p in [a, b, c] {
        let pid = read_pid(&p);
        assert!(
            gone_within(pid, Duration::from_secs(2)),
            "{} ({pid}) survived the job",
            p.display()
        );
    }
}

#[test]
fn cancel_kills_the_running_step() {
    let srv = Server::new();
    let pidfile = srv.path("sleep.pid");
    let job = srv.job(vec![
        step(
            "long",
            &format!(
                "sleep 100 & echo $! > {}; echo started; wait",
                pidfile.display()
            ),
        ),
        step("never", "echo never"),
    ]);
    let t0 = Instant::now();
    let run = srv.run_reacting(srv.spawn_agent(&[]), &job, |m| match m {
        AgentMsg::Output { data, .. } if data.starts_with(b"started") => Some(ServerMsg::Cancel {
            reason: "superseded".into(),
        }),
        _ => None,
    });
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(run.code, 0);
    assert_eq!(run.started(), [0]);
    let f = run.finished(0).unwrap();
    assert_eq!((f.outcome, f.signal), (StepOutcome::Failed, Some(9)));
    assert_eq!(run.done(), Some(false));
    let pid = read_pid(&pidfile);
    assert!(
        gone_within(pid, Duration::from_secs(2)),
        "the step's sleep survived the cancel"
    );
}

#[test]
fn a_rejected_agent_exits_2() {
    let srv = Server::new();
    let mut child = srv.spawn_agent(&[]);
    let mut conn = srv.accept();
    assert!(matches!(conn.recv(), AgentMsg::Hello { .. }));
    conn.send(&ServerMsg::Reject {
        reason: "unknown token".into(),
    });
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 2);
    assert!(srv.agent_stderr().contains("unknown token"));
}

#[test]
fn usage_errors_exit_4() {
    let out = std::process::Command::new(AGENT)
        .env("SLATE_AGENT_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let out = std::process::Command::new(AGENT)
        .args(["--connect", "unix:/nonexistent"])
        .env_remove("SLATE_AGENT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "no token is a usage error");
    let out = std::process::Command::new(AGENT)
        .args(["--connect", "ftp:x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let out = std::process::Command::new(AGENT)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--connect"));
}

#[test]
fn binary_output_round_trips() {
    let srv = Server::new();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(256 * 4).collect();
    let file = srv.path("bytes.bin");
    std::fs::write(&file, &bytes).unwrap();
    let job = srv.job(vec![step(
        "bin",
        &format!("cat {0}; cat {0} >&2", file.display()),
    )]);
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0);
    assert_eq!(run.output(0, Stream::Stdout), bytes);
    assert_eq!(run.output(0, Stream::Stderr), bytes);
}

#[test]
fn five_megabytes_arrive_complete_and_in_order() {
    let srv = Server::new();
    // Deterministic, incompressible-looking data (xorshift).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..5_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let file = srv.path("big.bin");
    std::fs::write(&file, &data).unwrap();
    let job = srv.job(vec![step("big", &format!("cat {}", file.display()))]);
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0);
    let got = run.output(0, Stream::Stdout);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the 5 MB came back altered");
    let n = run.assert_seqs_contiguous();
    assert!(n >= (data.len() / MAX_CHUNK) as u64);
    for m in run.messages() {
        if let AgentMsg::Output { data, .. } = m {
            assert!(data.len() <= MAX_CHUNK && !data.is_empty());
        }
    }
}

#[test]
fn output_arrives_while_the_step_runs() {
    let srv = Server::new();
    let job = srv.job(vec![step("slow", "echo first; sleep 1; echo second")]);
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0);
    let at = |want: &[u8]| {
        run.msgs
            .iter()
            .find_map(|(t, m)| match m {
                AgentMsg::Output { data, .. } if data.starts_with(want) => Some(*t),
                _ => None,
            })
            .unwrap()
    };
    let started = run
        .msgs
        .iter()
        .find_map(|(t, m)| matches!(m, AgentMsg::StepStarted { .. }).then_some(*t))
        .unwrap();
    let (first, second) = (at(b"first"), at(b"second"));
    assert!(
        first - started < Duration::from_millis(300),
        "first line after {:?}",
        first - started
    );
    assert!(second - first >= Duration::from_millis(900));
}

#[test]
fn heartbeats_flow_while_a_step_runs() {
    let srv = Server::new();
    let job = srv.job(vec![step("wait", "sleep 0.6")]);
    let sock = format!("unix:{}", srv.sock.display());
    let mut child = srv.spawn_agent_args(&["--connect", &sock, "--heartbeat-ms", "100"], &[]);
    let mut conn = srv.accept();
    conn.recv();
    conn.send(&ServerMsg::Welcome { job });
    let msgs = conn.until_done(Instant::now(), |_| None);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
    let beats = msgs
        .iter()
        .filter(|(_, m)| matches!(m, AgentMsg::Heartbeat))
        .count();
    assert!(beats >= 3, "{beats} heartbeats in 0.6 s at 100 ms");
}

#[test]
fn a_step_that_cannot_start_is_a_spawn_error() {
    let srv = Server::new();
    let mut job = srv.job(vec![step("nowhere", "true")]);
    job.workdir = "/proc/self/no/such/dir".into();
    let run = srv.run(&job, &[]);
    assert_eq!(run.code, 0);
    let f = run.finished(0).unwrap();
    assert_eq!((f.outcome, f.exit_code), (StepOutcome::SpawnError, None));
    assert!(
        run.stderr_of(0).contains("cannot start"),
        "{}",
        run.stderr_of(0)
    );
    assert_eq!(run.done(), Some(false));
}

#[test]
fn the_agent_waits_for_the_last_ack_before_exiting() {
    let srv = Server::new();
    let job = srv.job(vec![step("out", "echo one; echo two")]);
    let mut child = srv.spawn_agent(&[]);
    let mut conn = srv.accept();
    conn.recv();
    conn.send(&ServerMsg::Welcome { job });
    let mut last = 0;
    loop {
        match conn.recv() {
            AgentMsg::Output { seq, .. } => last = seq,
            AgentMsg::Done { .. } => break,
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before its output was acked"
    );
    conn.send(&ServerMsg::Ack { seq: last });
    let t0 = Instant::now();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 0);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "slow to exit after the ack"
    );
}

#[test]
fn a_lost_unix_connection_kills_the_step_and_exits_3() {
    let srv = Server::new();
    let (shell, bg) = (srv.path("sh.pid"), srv.path("bg.pid"));
    let job = srv.job(vec![step(
        "long",
        &format!(
            "echo $$ > {}; sleep 100 & echo $! > {}; echo started; wait",
            shell.display(),
            bg.display()
        ),
    )]);
    let mut child = srv.spawn_agent(&[]);
    let mut conn = srv.accept();
    conn.recv();
    conn.send(&ServerMsg::Welcome { job });
    loop {
        if let AgentMsg::Output { data, .. } = conn.recv() {
            if data.starts_with(b"started") {
                break;
            }
        }
    }
    drop(conn);
    let t0 = Instant::now();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 3);
    assert!(t0.elapsed() < Duration::from_secs(2));
    for p in [shell, bg] {
        let pid = read_pid(&p);
        assert!(
            gone_within(pid, Duration::from_secs(2)),
            "{} ({pid}) survived",
            p.display()
        );
    }
}

#[test]
fn tcp_reconnects_and_resends_what_was_not_acked() {
    use std::net::TcpListener;
    let srv = Server::new(); // for the workdir
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let job = srv.job(vec![step(
        "three",
        "echo a; sleep 0.3; echo b; sleep 0.3; echo c",
    )]);
    let mut child = srv.spawn_agent_args(&["--connect", &format!("tcp:127.0.0.1:{port}")], &[]);

    // First connection: ack "a" only, drop after "b" arrived.
    let (mut s1, _) = listener.accept().unwrap();
    s1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(
        read_frame(&mut s1).unwrap(),
        AgentMsg::Hello {
            resume_after: 0,
            ..
        }
    ));
    write_frame(&mut s1, &ServerMsg::Welcome { job: job.clone() }).unwrap();
    let mut first = Vec::new();
    loop {
        let m: AgentMsg = read_frame(&mut s1).unwrap();
        if let AgentMsg::Output { seq, data, .. } = &m {
            if data == b"a\n" {
                write_frame(&mut s1, &ServerMsg::Ack { seq: *seq }).unwrap();
            } else {
                first.push(m);
                break;
            }
        }
        first.push(m);
    }
    let seen: Vec<u64> = first
        .iter()
        .filter_map(|m| match m {
            AgentMsg::Output { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seen, [1, 2]);
    drop(s1);

    // Second connection: Hello says what was acked; the rest comes again.
    let (mut s2, _) = listener.accept().unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match read_frame(&mut s2).unwrap() {
        AgentMsg::Hello {
            resume_after,
            token,
            ..
        } => {
            assert_eq!(resume_after, 1);
            assert_eq!(token, TOKEN);
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    write_frame(&mut s2, &ServerMsg::Welcome { job }).unwrap();
    let mut second = Vec::new();
    loop {
        let m: AgentMsg = read_frame(&mut s2).unwrap();
        if let AgentMsg::Output { seq, .. } = &m {
            write_frame(&mut s2, &ServerMsg::Ack { seq: *seq }).unwrap();
        }
        let done = matches!(m, AgentMsg::Done { .. });
        second.push(m);
        if done {
            break;
        }
    }
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)),
        0,
        "{}",
        srv.agent_stderr()
    );

    let outputs: Vec<(u64, Vec<u8>)> = second
        .iter()
        .filter_map(|m| match m {
            AgentMsg::Output { seq, data, .. } => Some((*seq, data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        outputs,
        [(2, b"b\n".to_vec()), (3, b"c\n".to_vec())],
        "resent after seq 1"
    );
    assert!(second.iter().any(|m| matches!(
        m,
        AgentMsg::StepFinished {
            step: 0,
            outcome: StepOutcome::Ok,
            ..
        }
    )));
    assert!(matches!(
        second.last(),
        Some(AgentMsg::Done { success: true })
    ));
}

#[test]
fn a_character_device_works_as_transport() {
    // A pty in raw mode stands in for a virtio-serial port.
    let (master, slave_path, _slave) = raw_pty();
    let srv = Server::new();
    let job = srv.job(vec![step("hi", "echo over the port")]);
    let mut child = srv.spawn_agent_args(&["--connect", &slave_path], &[]);
    let mut port = master;
    assert!(matches!(
        read_frame(&mut port).unwrap(),
        AgentMsg::Hello { .. }
    ));
    write_frame(&mut port, &ServerMsg::Welcome { job }).unwrap();
    let mut out = Vec::new();
    loop {
        let m: AgentMsg = read_frame(&mut port).unwrap();
        if let AgentMsg::Output { seq, data, .. } = &m {
            out.extend_from_slice(data);
            write_frame(&mut port, &ServerMsg::Ack { seq: *seq }).unwrap();
        }
        if matches!(m, AgentMsg::Done { success: true }) {
            break;
        }
    }
    assert_eq!(out, b"over the port\n");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)),
        0,
        "{}",
        srv.agent_stderr()
    );
}

/// Opens a pty pair in raw mode: (master, slave path, slave kept open).
fn raw_pty() -> (std::fs::File, String, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty fills two descriptors and a name buffer of sufficient size; the
    // termios calls get a valid struct.
    unsafe {
        assert_eq!(
            libc::openpty(
                &mut m,
                &mut s,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null()
            ),
            0
        );
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(s, &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(s, libc::TCSANOW, &t), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        (
            std::fs::File::from_raw_fd(m),
            path,
            std::fs::File::from_raw_fd(s),
        )
    }
}

#[test]
fn prepare_runs_after_welcome_and_before_the_first_step() {
    let srv = Server::new();
    let marker = srv.path("prepared");
    let script = srv.path("prepare.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho prepared > {}\n", marker.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let job = srv.job(vec![step("s", &format!("cat {}", marker.display()))]);
    let connect = format!("unix:{}", srv.sock.display());
    let args = ["--connect", &connect, "--prepare", script.to_str().unwrap()];
    let mut child = srv.spawn_agent_args(&args, &[]);
    let mut conn = srv.accept();
    assert!(matches!(conn.recv(), AgentMsg::Hello { .. }));
    // Not before the job is known: a warm VM's tree is bound only then.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "prepare ran before Welcome");
    conn.send(&ServerMsg::Welcome { job });
    let msgs = conn.until_done(Instant::now(), |_| None);
    let run = Run {
        hello: AgentMsg::Heartbeat,
        msgs,
        code: wait_exit(&mut child, Duration::from_secs(15)),
        stderr: srv.agent_stderr(),
    };
    assert_eq!(run.code, 0, "agent stderr: {}", run.stderr);
    assert_eq!(run.stdout(0), "prepared\n");
    assert_eq!(run.done(), Some(true));
}

#[test]
fn a_failing_prepare_runs_no_step_and_exits_3() {
    let srv = Server::new();
    let marker = srv.path("ran");
    let job = srv.job(vec![step("s", &format!("touch {}", marker.display()))]);
    let connect = format!("unix:{}", srv.sock.display());
    let mut child = srv.spawn_agent_args(&["--connect", &connect, "--prepare", "/bin/false"], &[]);
    let mut conn = srv.accept();
    assert!(matches!(conn.recv(), AgentMsg::Hello { .. }));
    conn.send(&ServerMsg::Welcome { job });
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), 3);
    assert!(!marker.exists(), "a step ran after a failed prepare");
    assert!(
        srv.agent_stderr().contains("/bin/false failed"),
        "{}",
        srv.agent_stderr()
    );
}
