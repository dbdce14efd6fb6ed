//! Reliability: an agent that loses its TCP connection mid-job reconnects and the log has
//! no gap and no duplicate; wrong and used tokens are refused; `kill -9` of the server
//! mid-job and mid-provisioning leaves nothing of the old worker and the job runs again;
//! a worker that dies mid-step is retried on a fresh one. The real server binary, real
//! runc sandboxes and the real static agent throughout.

mod common;

use common::*;
use slate_proto::{AgentMsg, ServerMsg, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A port nobody listens on now (the server binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP proxy in front of the server's agent listener that cuts its first connection
/// (both directions, mid-frame) once `cut_after` bytes went from the agent to the server.
/// Later connections are passed through untouched.
struct CuttingProxy {
    port: u16,
    connections: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: u16, cut_after: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (conns, cut_count, stopping) = (connections.clone(), cuts.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let first = conns.fetch_add(1, Ordering::SeqCst) == 0;
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(s2, c2, None, None));
                let cuts = cut_count.clone();
                std::thread::spawn(move || {
                    pump(client, server, first.then_some(cut_after), Some(cuts))
                });
            }
        });
        CuttingProxy {
            port,
            connections,
            cuts,
            stop,
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies `from` to `to`; with `cut`, stops after that many bytes (possibly mid-frame)
/// and closes both sockets.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    cut: Option<usize>,
    cuts: Option<Arc<AtomicUsize>>,
) {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(limit) = cut {
            if total + n >= limit {
                let _ = to.write_all(&buf[..limit - total]);
                if let Some(c) = &cuts {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Says hello over raw TCP with `token` and returns the server's answer.
fn hello(port: u16, token: &str) -> ServerMsg {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    slate_proto::write_frame(
        &mut s,
        &AgentMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: token.into(),
            agent_version: "reliability-test".into(),
            resume_after: 0,
        },
    )
    .unwrap();
    slate_proto::read_frame(&mut s).unwrap()
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Opens a PR whose tree holds `file`, and returns the id of its (first) job.
fn open_pr(s: &Slate, pr: u64, file: &str, content: &str) -> i64 {
    let branch = format!("b{pr}");
    let (base, head) = s.make_pr(pr, &branch, file, content);
    let (code, body) = s.webhook(
        "pull_request",
        &format!("d-{pr}"),
        &s.pr_event("opened", pr, &branch, &head, &base),
    );
    assert_eq!(code, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let builds = s.get(&format!("/api/v1/builds?pr={pr}"));
        if let Some(id) = builds[0]["jobs"][0]["id"].as_i64() {
            return id;
        }
        assert!(Instant::now() < deadline, "no job for PR {pr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tcp_agent_reconnects_mid_job_and_the_log_has_no_gap_or_duplicate() {
    let agent_port = free_port();
    // The hello and the first few hundred lines get through, then the link is cut.
    let proxy = CuttingProxy::start(agent_port, 6000);
    let hooks = tempfile::Builder::new()
        .prefix("slate-rel-hooks-")
        .tempdir()
        .unwrap();
    let h = hooks.path();
    let (tokens, workdir) = (h.join("tokens"), h.join("work"));
    std::fs::create_dir_all(&tokens).unwrap();
    let agent = slate_testkit::agent_bin::static_agent();
    // The "machine" is the real agent on this host; its process group is the machine.
    write_script(
        &h.join("create.sh"),
        &format!(
            r#"#!/bin/sh
set -e
printf '%s\n' "$SLATE_AGENT_TOKEN" > "{tokens}/$SLATE_WORKER.token"
setsid "{agent}" --connect tcp:127.0.0.1:{proxy} --heartbeat-ms 500 \
  </dev/null >>"$SLATE_WORKER_DIR/agent.log" 2>&1 &
echo $! > "$SLATE_WORKER_DIR/agent.pid"
"#,
            tokens = tokens.display(),
            agent = agent.display(),
            proxy = proxy.port,
        ),
    );
    write_script(
        &h.join("destroy.sh"),
        r#"#!/bin/sh
pid=$(cat "$SLATE_WORKER_DIR/agent.pid" 2>/dev/null) || exit 0
kill -9 -- "-$pid" 2>/dev/null
for i in $(seq 1 100); do
  grep -q '^State:.*[^Z] ' /proc/$pid/status 2>/dev/null || exit 0
  sleep 0.05
done
echo "agent $pid still runs"; exit 1
"#,
    );
    write_script(
        &h.join("list.sh"),
        "#!/bin/sh\nfor d in slate-*; do [ -f \"$d/agent.pid\" ] && echo \"$d\"; done; exit 0\n",
    );
    let s = Slate::start(Options {
        provider: "exec".into(),
        server_extra: format!("agent_listen = \"127.0.0.1:{agent_port}\""),
        steps: r#"{ name = "count", run = "for i in $(seq 1 2000); do echo \"line $i\"; case $i in *00|*50) sleep 0.05;; esac; done" },"#.into(),
        pool_limits: r#"{ timeout = "2m" }"#.into(),
        pool_extra: format!(
            r#"workdir = "{work}"
attempts = 1
[pool.exec]
insecure_plaintext = true
create = ["/bin/sh", "{h}/create.sh"]
destroy = ["/bin/sh", "{h}/destroy.sh"]
list = ["/bin/sh", "{h}/list.sh"]
"#,
            work = workdir.display(),
            h = h.display()
        ),
        ..Default::default()
    });

    let id = open_pr(&s, 1, "greeting.txt", "over tcp\n");
    // While the job runs, a token naming it with another secret is refused.
    s.wait_job(id, "running", Duration::from_secs(60), |j| {
        j["state"] == "running"
    });
    let forged = format!("{id}.{}", "ab".repeat(32));
    assert!(
        matches!(hello(agent_port, &forged), ServerMsg::Reject { .. }),
        "a forged token for the running job was accepted"
    );
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(
        job["state"],
        "succeeded",
        "{job:#}\n{log}\n{}",
        s.server_log()
    );
    assert_eq!(job["attempt"], 1, "the reconnect must not cost an attempt");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "the proxy never cut");
    assert!(proxy.connections.load(Ordering::SeqCst) >= 2);
    assert!(log.contains("agent reconnected"), "{log}");

    let lines: Vec<u32> = log
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("mangled line {n:?}\n{log}"))
        })
        .collect();
    let expected: Vec<u32> = (1..=2000).collect();
    if lines != expected {
        let dup = lines.windows(2).find(|w| w[1] <= w[0]);
        let gap = lines.windows(2).find(|w| w[1] > w[0] + 1);
        panic!(
            "{} lines; first duplicate/reorder {dup:?}, first gap {gap:?}\n{log}",
            lines.len()
        );
    }

    // The finished job's token, and made-up ones, are refused.
    let used = std::fs::read_to_string(tokens.join(format!("slate-{id}.token"))).unwrap();
    for token in [used.trim(), "1.deadbeef", "not a token", ""] {
        match hello(agent_port, token) {
            ServerMsg::Reject { reason } => assert!(reason.contains("token"), "{reason}"),
            other => panic!("token {token:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(s.get_text("/healthz").trim(), "ok");
    // The exec worker is gone: its directory and its agent.
    let left: Vec<_> = std::fs::read_dir(s.data.join("exec-workers"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|pool| {
            std::fs::read_dir(pool.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "exec workers left: {left:?}");
    s.shutdown_clean();
}

/// Pids of the processes the leak checker attributes to the server's workers.
fn leaked_pids(leaks: &[String]) -> Vec<i32> {
    leaks
        .iter()
        .filter_map(|l| l.strip_prefix("process "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// `kill -9` the server, restart it, and check that the old worker's processes are gone;
/// then the job runs again (attempt 2), succeeds, and nothing is left.
fn crash_restart_and_check(s: &mut Slate, id: i64, with_disk: bool) {
    let before = s.leaks();
    assert!(
        before.iter().any(|l| l.contains(&format!("slate-{id}"))),
        "the worker should exist before the crash: {before:#?}"
    );
    s.kill9();
    // The agent may exit once its socket closes; its mounts, cgroups and directories stay
    // for recovery to find.
    let stale = s.leaks();
    assert!(
        stale.iter().any(|l| l.starts_with("mount")),
        "the worker's mounts should outlive the server: {stale:#?}"
    );
    if with_disk {
        assert!(
            stale.iter().any(|l| l.starts_with("loop device")),
            "the job's disk should outlive the server: {stale:#?}"
        );
    }
    let mut pids = leaked_pids(&before);
    pids.extend(leaked_pids(&stale));
    assert!(!pids.is_empty(), "no worker process seen: {before:#?}");
    s.spawn();
    // Recovery ran before the server answered: the old worker's processes are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "processes of the old worker survived the restart: {:?}\n{}",
            pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>(),
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = s.server_log();
    assert!(
        server
            .lines()
            .any(|l| l.contains("destroyed leftover worker") && l.contains(&format!("slate-{id}"))),
        "{server}"
    );
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{log}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert!(log.contains("(attempt 2)"), "{log}");
    s.assert_no_leaks();
}

#[test]
fn kill_9_mid_job_leaves_nothing_and_the_job_runs_again() {
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "echo started; sleep 3; echo finished" },"#.into(),
        pool_limits: r#"{ memory = "128MiB", pids = 64, timeout = "2m", disk = "256MiB" }"#.into(),
        ..Default::default()
    });
    let id = open_pr(&s, 1, "greeting.txt", "crash me\n");
    s.wait_job(id, "mid-step", Duration::from_secs(60), |j| {
        j["state"] == "running" && s.log(id).contains("started")
    });
    crash_restart_and_check(&mut s, id, true);
    let log = s.log(id);
    assert_eq!(log.lines().filter(|l| *l == "finished").count(), 1, "{log}");
    s.shutdown_clean();
}

#[test]
fn kill_9_mid_egress_job_leaves_no_netns_veth_or_chain_and_the_job_runs_again() {
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "echo started; sleep 3; echo finished" },"#.into(),
        pool_limits: r#"{ memory = "128MiB", pids = 64, timeout = "2m" }"#.into(),
        pool_extra: r#"network = "egress""#.into(),
        ..Default::default()
    });
    let id = open_pr(&s, 1, "greeting.txt", "crash me\n");
    s.wait_job(id, "mid-step", Duration::from_secs(60), |j| {
        j["state"] == "running" && s.log(id).contains("started")
    });
    // The network is there for recovery to find: namespace mount, veth, chains.
    let live = s.leaks().join("\n");
    for kind in [
        "/netns",
        "veth slv",
        "nft chain inet slate in_",
        "nft chain inet slate fwd_",
    ] {
        assert!(live.contains(kind), "no {kind} before the crash: {live}");
    }
    crash_restart_and_check(&mut s, id, false);
    s.shutdown_clean();
}

#[test]
fn kill_9_while_provisioning_leaves_nothing_and_the_job_runs_again() {
    let dir = tempfile::Builder::new()
        .prefix("slate-rel-rt-")
        .tempdir()
        .unwrap();
    let marker = dir.path().join("provisioning");
    let wrapper = dir.path().join("slow-runc");
    // A runtime whose `run` takes a while to start the container: the job sits in
    // provisioning, its overlay mounted and its runtime process waiting.
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\ncase \" $* \" in *\" run \"*) touch {m}; sleep 3;; esac\nexec runc \"$@\"\n",
            m = marker.display()
        ),
    );
    let mut s = Slate::start(Options {
        steps: r#"{ name = "work", run = "echo ran" },"#.into(),
        pool_extra: format!(
            "runtime = \"{}\"\nboot_timeout = \"60s\"",
            wrapper.display()
        ),
        ..Default::default()
    });
    let id = open_pr(&s, 1, "greeting.txt", "crash while provisioning\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "never provisioned: {}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.job(id)["state"], "provisioning");
    crash_restart_and_check(&mut s, id, false);
    s.shutdown_clean();
}

/// Pids in the cgroup of the sandbox worker `name` (cgroup v1 `pids` hierarchy or v2).
fn worker_pids(root: &Path, name: &str) -> Vec<i32> {
    let scope = slate_testkit::leaks::cgroup_scope(root);
    let candidates: [PathBuf; 2] = [
        Path::new("/sys/fs/cgroup/pids").join(&scope).join(name),
        Path::new("/sys/fs/cgroup").join(&scope).join(name),
    ];
    candidates
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

#[test]
fn a_worker_that_dies_mid_step_is_retried_on_a_fresh_one() {
    let s = Slate::start(Options {
        steps: r#"{ name = "work", run = "echo step-begins; sleep 3; echo step-ends" },"#.into(),
        pool_extra: "attempts = 2".into(),
        ..Default::default()
    });
    let id = open_pr(&s, 1, "greeting.txt", "die mid step\n");
    s.wait_job(id, "mid-step", Duration::from_secs(60), |j| {
        j["state"] == "running" && s.log(id).contains("step-begins")
    });
    // The container's init is the agent: killing it from the host kills the worker.
    let name = format!("slate-{id}");
    let agent = worker_pids(&s.workers_root(), &name)
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c.starts_with(b"/.slate/slate-agent"))
                .unwrap_or(false)
        })
        .expect("the worker's agent process");
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(agent, libc::SIGKILL) }, 0);

    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{log}");
    assert_eq!(job["attempt"], 2, "one retry on a fresh worker: {job:#}");
    assert_eq!(job["steps"][0]["outcome"], "ok", "{job:#}");
    // Both attempts are in the log: the first one's output and why it ended.
    assert!(
        log.contains("(attempt 1)") && log.contains("(attempt 2)"),
        "{log}"
    );
    assert!(
        log.contains("retrying on a fresh worker (attempt 2 of 2)"),
        "{log}"
    );
    let count = |line: &str| log.lines().filter(|l| *l == line).count();
    assert_eq!(count("step-begins"), 2, "{log}");
    assert_eq!(count("step-ends"), 1, "{log}");
    s.assert_no_leaks();
    s.shutdown_clean();
}

#[test]
fn a_hanging_exec_create_hook_is_killed_retried_once_then_errors() {
    let hooks = tempfile::Builder::new()
        .prefix("slate-rel-hang-")
        .tempdir()
        .unwrap();
    let h = hooks.path();
    // The hook's child would outlive a kill of the hook alone: it must go with the group.
    write_script(
        &h.join("create.sh"),
        "#!/bin/sh\necho started >> \"$SLATE_WORKER_DIR/../creates\"\nsleep 1000 &\necho $! > \"$SLATE_WORKER_DIR/../sleeper.$$\"\nwait\n",
    );
    write_script(&h.join("destroy.sh"), "#!/bin/sh\nexit 0\n");
    write_script(&h.join("list.sh"), "#!/bin/sh\nexit 0\n");
    let s = Slate::start(Options {
        provider: "exec".into(),
        server_extra: format!("agent_listen = \"127.0.0.1:{}\"", free_port()),
        pool_limits: r#"{ timeout = "2m" }"#.into(),
        pool_extra: format!(
            r#"workdir = "/tmp"
attempts = 2
[pool.exec]
create = ["/bin/sh", "{h}/create.sh"]
destroy = ["/bin/sh", "{h}/destroy.sh"]
list = ["/bin/sh", "{h}/list.sh"]
hook_timeout = "2s"
"#,
            h = h.display()
        ),
        ..Default::default()
    });
    let id = open_pr(&s, 1, "greeting.txt", "hang\n");
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(job["state"], "error", "{job:#}\n{log}");
    assert_eq!(
        job["attempt"], 2,
        "retried once on a fresh machine: {job:#}"
    );
    assert!(log.contains("retrying on a fresh worker"), "{log}");
    // Both hook runs, and every process they started, are gone.
    let root = s.data.join("exec-workers").join("busybox");
    let creates = std::fs::read_to_string(root.join("creates")).unwrap_or_default();
    assert_eq!(creates.lines().count(), 2, "{creates}");
    for e in std::fs::read_dir(&root).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(_hook_pid) = name.strip_prefix("sleeper.") {
            let pid = std::fs::read_to_string(e.path()).unwrap();
            // SIGKILL is delivered asynchronously, and a dead orphan is a zombie until
            // init reaps it: alive means a state other than zombie after a moment.
            let status = format!("/proc/{}/status", pid.trim());
            let deadline = Instant::now() + Duration::from_secs(5);
            let alive = loop {
                let st = std::fs::read_to_string(&status).unwrap_or_default();
                let running = st
                    .lines()
                    .any(|l| l.starts_with("State:") && !l.contains('Z'));
                if !running || Instant::now() > deadline {
                    break running;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if alive {
                eprintln!("{}", std::fs::read_to_string(&status).unwrap_or_default());
            }
            assert!(
                !alive,
                "the hook's child {} outlived the timeout",
                pid.trim()
            );
        }
    }
    s.shutdown_clean();
}
