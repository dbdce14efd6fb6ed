//! The agent channel over TLS: a PR built on an exec pool whose agent runs in its own
//! network namespace and dials the server's agent listener across a veth pair; what
//! crosses the wire is recorded and must not contain the token or the job; hostile
//! clients (wrong pin, a machine in the middle, TLS 1.2, garbage, a replayed session,
//! an expired token, a plaintext downgrade) are dropped, nothing is recorded for the job,
//! and the job is retried as an infrastructure failure.

use crate::common::*;
use slate_proto::{AgentMsg, ServerMsg, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A TCP relay in front of the agent listener that keeps every byte it passes, per
/// direction (client→server, server→client), and cuts its first connection once
/// `cut_after` bytes went up (the agent then reconnects, with a new TLS session).
struct Recorder {
    port: u16,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start(upstream: u16, cut_after: usize) -> Recorder {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, down) = (Arc::default(), Arc::default());
        let (u, d) = (Arc::clone(&up), Arc::clone(&down));
        std::thread::spawn(move || {
            let mut first = true;
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let cut = std::mem::take(&mut first).then_some(cut_after);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (u, d) = (Arc::clone(&u), Arc::clone(&d));
                std::thread::spawn(move || copy(client, server, u, cut));
                std::thread::spawn(move || copy(s2, c2, d, None));
            }
        });
        Recorder { port, up, down }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream, keep: Arc<Mutex<Vec<u8>>>, cut: Option<usize>) {
    let mut buf = [0u8; 16384];
    let mut passed = 0;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let n = match cut {
                    Some(c) => n.min(c - passed),
                    None => n,
                };
                keep.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                passed += n;
                if cut == Some(passed) {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The hooks: the "machine" is the real static agent in a network namespace of its own
/// (`slrw<job>`) with a veth to the host, its workdir a private bind mount of a copy of
/// the job's source. While `<hooks>/hold` exists, create records the token and starts
/// nothing (the test plays the hostile clients instead).
pub(crate) struct Hooks {
    tag: u32,
    dir: tempfile::TempDir,
    workdir: PathBuf,
}

impl Hooks {
    pub(crate) fn new(dial_port: u16) -> Hooks {
        // Tests of this binary run at once, each with its own job ids from 1: the
        // namespaces, veths and subnets carry the test's tag too.
        static TAGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = TAGS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::Builder::new()
            .prefix("slate-rw-hooks-")
            .tempdir()
            .unwrap();
        let h = dir.path();
        let workdir = h.join("workdir");
        std::fs::create_dir_all(h.join("tokens")).unwrap();
        std::fs::create_dir_all(&workdir).unwrap();
        let agent = slate_testkit::agent_bin::static_agent();
        write_script(
            &h.join("create.sh"),
            &format!(
                r#"#!/bin/sh
set -e
id=$SLATE_JOB_ID
printf '%s\n' "$SLATE_AGENT_TOKEN" > "{h}/tokens/$SLATE_WORKER.token"
printf '%s\n' "$SLATE_AGENT_FINGERPRINT" > "{h}/fingerprint"
printf '%s\n' "$SLATE_AGENT_URL" > "{h}/url"
[ -e "{h}/hold" ] && exit 0
net=$((id % 60 * 4))
ns=slrw{tag}x$id
ip netns add $ns
echo $ns > "$SLATE_WORKER_DIR/netns"
ip link add vh{tag}x$id type veth peer name vg{tag}x$id
ip link set vg{tag}x$id netns $ns
ip addr add 10.{subnet}.$net.1/30 dev vh{tag}x$id
ip link set vh{tag}x$id up
ip -n $ns addr add 10.{subnet}.$net.2/30 dev vg{tag}x$id
ip -n $ns link set vg{tag}x$id up
ip -n $ns link set lo up
mkdir -p "$SLATE_WORKER_DIR/work"
cp -a "$SLATE_SOURCE/." "$SLATE_WORKER_DIR/work/"
# The agent is told the listener's url; it dials the recorder on the host side of the
# veth instead (same scheme), which relays to the listener.
scheme=${{SLATE_AGENT_URL%%:*}}
inside="$SLATE_WORKER_DIR/inside.sh"
echo "set -e" > "$inside"
echo "mount --bind '$SLATE_WORKER_DIR/work' '{work}'" >> "$inside"
# Each cache: a writable copy of its mirror at its target, private to this machine.
tab=$(printf '\t')
printf '%s\n' "${{SLATE_CACHES:-}}" | while IFS=$tab read -r name mode source target; do
  [ -n "$name" ] || continue
  mkdir -p "$SLATE_WORKER_DIR/cache-$name"
  cp -a "$source/." "$SLATE_WORKER_DIR/cache-$name/"
  echo "mount --bind '$SLATE_WORKER_DIR/cache-$name' '$target'" >> "$inside"
done
echo "exec '{agent}' --connect $scheme:10.{subnet}.$net.1:{port} --heartbeat-ms 500" >> "$inside"
setsid ip netns exec $ns unshare -m sh "$inside" \
  </dev/null >>"$SLATE_WORKER_DIR/agent.log" 2>&1 &
echo $! > "$SLATE_WORKER_DIR/agent.pid"
"#,
                h = h.display(),
                work = workdir.display(),
                agent = agent.display(),
                port = dial_port,
                subnet = 200 + tag,
            ),
        );
        write_script(
            &h.join("destroy.sh"),
            r#"#!/bin/sh
if pid=$(cat "$SLATE_WORKER_DIR/agent.pid" 2>/dev/null); then
  kill -9 -- "-$pid" 2>/dev/null
  for i in $(seq 1 100); do
    [ -d /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null || break
    sleep 0.05
  done
fi
ns=$(cat "$SLATE_WORKER_DIR/netns" 2>/dev/null) && ip netns del "$ns" 2>/dev/null
exit 0
"#,
        );
        write_script(
            &h.join("list.sh"),
            "#!/bin/sh\nfor d in slate-*; do [ -e \"$d\" ] && echo \"$d\"; done; exit 0\n",
        );
        Hooks { tag, dir, workdir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn pool(&self, extra: &str) -> String {
        format!(
            r#"workdir = "{work}"
{extra}
[pool.exec]
create = ["/bin/sh", "{h}/create.sh"]
destroy = ["/bin/sh", "{h}/destroy.sh"]
list = ["/bin/sh", "{h}/list.sh"]
"#,
            work = self.workdir.display(),
            h = self.path().display()
        )
    }

    /// The token the create hook of job `id` was given (waits for it).
    fn token(&self, id: i64) -> String {
        let f = self.path().join(format!("tokens/slate-{id}.token"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = std::fs::read_to_string(&f) {
                if !t.trim().is_empty() {
                    return t.trim().to_string();
                }
            }
            assert!(Instant::now() < deadline, "no create hook ran for job {id}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Opens PR `pr` and returns its first job's id.
pub(crate) fn open_pr(s: &Slate, pr: u64, file: &str, content: &str) -> (i64, String) {
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
            return (id, head);
        }
        assert!(Instant::now() < deadline, "no job for PR {pr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the real agent with `token` against `url` pinning `fingerprint`; returns its exit
/// code and stderr.
fn run_agent(url: &str, token: &str, fingerprint: &str) -> (Option<i32>, String) {
    let out = Command::new(slate_testkit::agent_bin::static_agent())
        .args(["--connect", url, "--fingerprint", fingerprint])
        .env_clear()
        .env("SLATE_AGENT_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until the server's log has a line containing all of `parts`.
fn wait_log_line(s: &Slate, parts: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = s.server_log();
        if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no server log line with {parts:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Hooks {
    /// Namespaces of this test's machines that still exist.
    pub(crate) fn netns_left(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let prefix = format!("slrw{}x", self.tag);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }
}

fn start(hooks: &Hooks, agent_port: u16, pool_extra: &str) -> Slate {
    Slate::start(Options {
        provider: "exec".into(),
        server_extra: format!("agent_listen = \"0.0.0.0:{agent_port}\""),
        steps: r#"{ name = "build", run = "cat greeting.txt && for i in $(seq 1 1500); do echo \"line $i\"; case $i in *00) sleep 0.05;; esac; done && echo \"$((6 * 7)) in plain sight\"" },"#
            .into(),
        pool_limits: r#"{ timeout = "2m" }"#.into(),
        pool_extra: hooks.pool(pool_extra),
        ..Default::default()
    })
}

#[test]
fn a_pr_builds_on_an_exec_pool_whose_agent_dials_back_over_tls_across_a_network() {
    let agent_port = free_port();
    // The first connection is cut mid-output: the agent reconnects with a new session.
    let recorder = Recorder::start(agent_port, 6000);
    let hooks = Hooks::new(recorder.port);
    let s = start(&hooks, agent_port, "");

    let (id, head) = open_pr(&s, 1, "greeting.txt", "hello over tls\n");
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(
        job["state"],
        "succeeded",
        "{job:#}\n{log}\n{}",
        s.server_log()
    );
    assert_eq!(job["attempt"], 1);
    assert!(log.contains("agent connected over tls"), "{log}");
    assert!(
        log.contains("hello over tls"),
        "the source did not arrive: {log}"
    );
    assert!(log.contains("42 in plain sight"), "{log}");
    assert!(
        log.contains("agent reconnected"),
        "the relay never cut: {log}"
    );
    let lines: Vec<u32> = log
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("mangled line {n:?}\n{log}"))
        })
        .collect();
    assert_eq!(
        lines,
        (1..=1500).collect::<Vec<u32>>(),
        "gap or duplicate after the reconnect"
    );
    s.wait_status(&head, "success");

    // The hook was told to dial tls: and to pin the certificate the server keeps in its
    // data dir; `slate agent-fingerprint` prints the same.
    assert!(
        hooks.read("url").starts_with("tls:"),
        "{}",
        hooks.read("url")
    );
    let fingerprint = hooks.read("fingerprint");
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    let out = Command::new(slate_bin())
        .args(["agent-fingerprint", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        fingerprint,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything crossed the recorder, encrypted: neither the token nor the job's steps
    // nor its output are readable on the wire.
    let token = hooks.token(id);
    let (up, down) = (
        recorder.up.lock().unwrap().clone(),
        recorder.down.lock().unwrap().clone(),
    );
    assert!(up.len() > 500 && down.len() > 500, "nothing was recorded");
    assert!(
        !contains(&up, token.as_bytes()),
        "the token crossed in clear"
    );
    assert!(!contains(&up, b"\"hello\""), "the hello crossed in clear");
    assert!(
        !contains(&down, b"cat greeting.txt"),
        "the job crossed in clear"
    );
    assert!(
        up[0] == 0x16,
        "the agent did not start with a tls handshake"
    );

    // Replaying the recorded session to the listener gets nowhere: TLS 1.3 keys are fresh
    // per connection, so the replayed Finished fails and the connection is dropped.
    let mut replay = TcpStream::connect(("127.0.0.1", agent_port)).unwrap();
    replay
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = replay.write_all(&up);
    let mut sink = Vec::new();
    let _ = replay.read_to_end(&mut sink);
    wait_log_line(&s, &["agent connection dropped", "tls handshake failed"]);

    // The finished job's token is expired: over TLS with the right pin it is refused.
    let (code, err) = run_agent(&format!("tls:127.0.0.1:{agent_port}"), &token, &fingerprint);
    assert_eq!(code, Some(2), "an expired token was not rejected: {err}");
    assert!(err.contains("invalid token"), "{err}");
    let job = s.job(id);
    assert_eq!(
        job["attempt"], 1,
        "a refused client changed the job: {job:#}"
    );
    assert_eq!(s.builds().len(), 1);

    s.assert_no_leaks();
    assert!(
        hooks.netns_left().is_empty(),
        "namespaces left: {:?}",
        hooks.netns_left()
    );
    s.shutdown_clean();
}

#[test]
fn hostile_tls_clients_are_dropped_and_the_job_is_retried_as_an_infrastructure_failure() {
    let agent_port = free_port();
    let hooks = Hooks::new(agent_port);
    let s = start(&hooks, agent_port, "attempts = 2\nboot_timeout = \"15s\"");
    let listener = format!("tls:127.0.0.1:{agent_port}");

    // Job 1: its create hook starts no agent; hostile clients try their luck.
    std::fs::write(hooks.path().join("hold"), "").unwrap();
    let (id, _) = open_pr(&s, 1, "greeting.txt", "hello\n");
    let token = hooks.token(id);
    let fingerprint = hooks.read("fingerprint");
    std::fs::remove_file(hooks.path().join("hold")).unwrap();
    let t0 = Instant::now();

    // 1. An agent pinning another certificate refuses the real server: it never sends
    //    the token, and the server drops the aborted handshake.
    let wrong = format!("sha256:{}", "00".repeat(32));
    let (code, err) = run_agent(&listener, &token, &wrong);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("does not match the pinned"), "{err}");

    // 2. A machine in the middle with its own certificate: the agent (pinning the real
    //    one) hangs up before sending anything, so the middle learns no token.
    let mitm = tempfile::tempdir().unwrap();
    let (cert, key) = (mitm.path().join("c.pem"), mitm.path().join("k.pem"));
    let gen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=mitm", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let mitm_port = free_port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-tls1_3", "-accept"])
        .arg(mitm_port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = Instant::now();
    while TcpStream::connect(("127.0.0.1", mitm_port)).is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(10),
            "s_server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, err) = run_agent(&format!("tls:127.0.0.1:{mitm_port}"), &token, &fingerprint);
    let _ = server.kill();
    let seen = server.wait_with_output().unwrap();
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("does not match the pinned"), "{err}");
    assert!(
        !contains(&seen.stdout, token.as_bytes()),
        "the machine in the middle got the token"
    );

    // 3. A client that only speaks TLS 1.2 (a downgrade) is refused by the listener.
    let old = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect"])
        .arg(format!("127.0.0.1:{agent_port}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!old.status.success(), "a tls 1.2 handshake succeeded");
    wait_log_line(&s, &["agent connection dropped", "tls handshake failed"]);

    eprintln!("hostile clients 1-3 took {:?}", t0.elapsed());
    // 4. Garbage: an HTTP request, and a whole TLS record that holds no ClientHello.
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0x16, 0x03, 0x03, 0x00, 0x05, 0xff, 0x00, 0x00, 0x01, 0x00][..],
    ] {
        let mut c = TcpStream::connect(("127.0.0.1", agent_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        c.write_all(junk).unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    }
    wait_log_line(
        &s,
        &["agent connection dropped", "not tls and not an agent frame"],
    );

    eprintln!("hostile clients 1-4 took {:?}", t0.elapsed());
    // None of it reached the job: still waiting for its agent, no step, nothing logged.
    let job = s.job(id);
    assert_eq!(job["state"], "provisioning", "{job:#}");
    assert!(
        t0.elapsed() < Duration::from_secs(14),
        "the hostile clients took too long to test before the boot timeout"
    );
    // No honest agent came: at the boot timeout the attempt is an infrastructure
    // failure, retried on a fresh worker whose agent is honest.
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(
        job["state"],
        "succeeded",
        "{job:#}\n{log}\n{}",
        s.server_log()
    );
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert!(log.contains("agent did not connect within"), "{log}");
    assert!(
        !log.contains("does not match"),
        "a refused client reached the log: {log}"
    );

    // Job 2: a plaintext hello with the job's valid token (TLS stripped on the way) is
    // refused, the token is revoked at once, and the job retried with a fresh one.
    std::fs::write(hooks.path().join("hold"), "").unwrap();
    let (id2, head2) = open_pr(&s, 2, "greeting.txt", "second\n");
    let token2 = hooks.token(id2);
    std::fs::remove_file(hooks.path().join("hold")).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", agent_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    slate_proto::write_frame(
        &mut c,
        &AgentMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: token2.clone(),
            agent_version: "downgrade".into(),
            resume_after: 0,
        },
    )
    .unwrap();
    match slate_proto::read_frame::<_, ServerMsg>(&mut c).unwrap() {
        ServerMsg::Reject { reason } => assert!(reason.contains("requires tls"), "{reason}"),
        other => panic!("a plaintext hello was not refused: {other:?}"),
    }
    let job = s.wait_terminal(id2);
    let log = s.log(id2);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{log}");
    assert_eq!(job["attempt"], 2, "{job:#}");
    assert!(log.contains("token revoked"), "{log}");
    assert_ne!(
        hooks.token(id2),
        token2,
        "the retry reused the revoked token"
    );
    s.wait_status(&head2, "success");

    s.assert_no_leaks();
    assert!(
        hooks.netns_left().is_empty(),
        "namespaces left: {:?}",
        hooks.netns_left()
    );
    s.shutdown_clean();
}
