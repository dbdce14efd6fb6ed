//! The agent as PID 1 of its own PID namespace (`unshare`), as it runs in a container:
//! it reaps orphans while steps run, and the fully static build runs in a root file
//! system that has no C library at all.

mod common;

use common::*;
use slate_proto::StepOutcome;
use std::time::Duration;

/// `unshare` arguments that start the agent as PID 1 with its own `/proc`.
const PID_NS: [&str; 4] = ["--pid", "--fork", "--mount", "--mount-proc"];

#[test]
fn as_pid_1_it_reaps_orphans_and_leaves_nothing_behind() {
    let srv = Server::new();
    let sock = format!("unix:{}", srv.sock.display());
    // A marker only this test's daemon carries on its command line.
    let marker = format!("{}.{}", 900_000 + std::process::id() % 99_999, 17);
    let job = srv.job(vec![
        step("parent", "echo ppid=$PPID"),
        // The subshell exits at once: its sleep is reparented to PID 1 and dies while
        // the step still runs; an agent that reaped only between steps would show it.
        step(
            "orphan",
            "(sleep 0.2 &); sleep 0.8; cat /proc/[0-9]*/stat | grep -c ') Z ' || true",
        ),
        step(
            "daemon",
            &format!("setsid sleep {marker} >/dev/null 2>&1 </dev/null & echo ok"),
        ),
    ]);
    let mut args = PID_NS.to_vec();
    args.extend([AGENT, "--connect", &sock]);
    let child = srv.spawn("unshare", &args, &[]);
    let run = srv.run_child(child, &job);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout(0), "ppid=1\n", "the agent is not PID 1");
    assert_eq!(run.stdout(1), "0\n", "a zombie waited for the step to end");
    assert_eq!(run.finished(2).unwrap().outcome, StepOutcome::Ok);
    assert_eq!(run.done(), Some(true));
    assert!(
        no_process_with_arg(&marker, Duration::from_secs(2)),
        "the daemon outlived the job"
    );
}

#[test]
fn the_static_agent_runs_in_a_root_without_libc() {
    let srv = Server::with_socket_at("rootfs/run/slate/agent.sock");
    let rootfs = srv.path("rootfs");
    slate_testkit::image::busybox_rootfs(&rootfs).unwrap();
    std::fs::create_dir_all(rootfs.join(".slate")).unwrap();
    std::fs::copy(
        slate_testkit::agent_bin::static_agent(),
        rootfs.join(".slate/slate-agent"),
    )
    .unwrap();
    assert!(!rootfs.join("lib").exists() && !rootfs.join("lib64").exists());

    let mut job = srv.job(vec![step("inside", "cat; echo pid=$PPID; pwd; echo $PATH")]);
    job.workdir = "/work".into();
    let root = format!("--root={}", rootfs.display());
    let mut args = PID_NS.to_vec();
    args.extend([
        root.as_str(),
        "/.slate/slate-agent",
        "--connect",
        "unix:/run/slate/agent.sock",
    ]);
    let child = srv.spawn("unshare", &args, &[]);
    let run = srv.run_child(child, &job);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.finished(0).unwrap().outcome,
        StepOutcome::Ok,
        "step stderr: {}",
        run.stderr_of(0)
    );
    assert_eq!(
        run.stdout(0),
        "pid=1\n/work\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    assert_eq!(run.done(), Some(true));
}

/// Waits up to `within` until no process on the host has `arg` among its arguments.
fn no_process_with_arg(arg: &str, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        });
        if !found {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
