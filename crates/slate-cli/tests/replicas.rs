//! Two `slate serve` replicas on one PostgreSQL database: every job runs exactly once,
//! a replica killed mid-run loses its jobs to the other (lease expiry), and cleans its
//! leftovers when it comes back.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_URL: &str = "postgres://slate:slate@127.0.0.1:5432/postgres";

/// A fresh database for this test, dropped at the end (even on failure).
struct Database {
    name: String,
}

impl Database {
    fn create() -> Database {
        let name = format!(
            "slate_e2e_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let out = Command::new("psql")
            .args([ADMIN_URL, "-q", "-c", &format!("CREATE DATABASE {name}")])
            .output()
            .expect("psql (run scripts/postgres.sh)");
        assert!(
            out.status.success(),
            "create database (run scripts/postgres.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Database { name }
    }

    fn url(&self) -> String {
        format!("postgres://slate:slate@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                ADMIN_URL,
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// A second server process: the first one's config with its own data dir and name.
struct Replica {
    child: Option<Child>,
    url: String,
    log: std::path::PathBuf,
    data: std::path::PathBuf,
}

impl Replica {
    fn start(first: &Slate, name: &str) -> Replica {
        let data = first.dir.path().join(format!("data-{name}"));
        let config = first.dir.path().join(format!("slate-{name}.toml"));
        let text = std::fs::read_to_string(&first.config)
            .unwrap()
            .replace(
                &format!("data_dir = \"{}\"", first.data.display()),
                &format!("data_dir = \"{}\"", data.display()),
            )
            .replace("replica_id = \"a\"", &format!("replica_id = \"{name}\""));
        std::fs::write(&config, text).unwrap();
        let addr = first.dir.path().join(format!("addr-{name}"));
        let _ = std::fs::remove_file(&addr);
        let log = first.dir.path().join(format!("server-{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(slate_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--addr-file")
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addr.exists() {
            assert!(Instant::now() < deadline, "replica {name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("http://{}", std::fs::read_to_string(&addr).unwrap().trim());
        Replica {
            child: Some(child),
            url,
            log,
            data,
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    fn leaks(&self) -> Vec<String> {
        let mut l = slate_testkit::leaks::slate_leaks(&self.data.join("workers"));
        for sub in ["sources", "sockets"] {
            if let Ok(rd) = std::fs::read_dir(self.data.join(sub)) {
                for e in rd.flatten() {
                    l.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        l
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

fn submit(url: &str, token: &str) -> i64 {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{url}/api/v1/submit"))
        .bearer_auth(token)
        .json(&serde_json::json!({"repo": REPO, "branch": "main"}))
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "submit: {}", resp.status());
    let v: serde_json::Value = resp.json().unwrap();
    v["build_id"].as_i64().unwrap_or(-1)
}

#[test]
fn two_replicas_run_each_job_once_and_survive_a_kill_9() {
    let db = Database::create();
    let s = Slate::start(Options {
        steps: r#"{ name = "work", run = "sleep 0.3; echo ran-$SLATE_JOB_ID" },"#.into(),
        max_jobs: 2,
        server_extra: format!(
            "database = \"{}\"\nreplica_id = \"a\"\nlease = \"3s\"",
            db.url()
        ),
        ..Default::default()
    });
    let mut b = Replica::start(&s, "b");
    const BUILDS: usize = 200;
    // Any replica accepts submits; half go to each.
    for i in 0..BUILDS {
        let url = if i % 2 == 0 { &s.url } else { &b.url };
        submit(url, &s.token);
    }
    // Let both work, then kill B without warning.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = s
            .get("/api/v1/builds?limit=500")
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["jobs"][0]["state"] == "succeeded")
            .count();
        if done >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs are not running:\n{}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.kill9();

    // Everything finishes on A, including B's interrupted jobs (after their leases expire).
    let deadline = Instant::now() + Duration::from_secs(300);
    let builds = loop {
        let builds = s
            .get("/api/v1/builds?limit=500")
            .as_array()
            .unwrap()
            .clone();
        let terminal = builds.iter().filter(|b| {
            matches!(
                b["jobs"][0]["state"].as_str(),
                Some("succeeded" | "failed" | "error" | "cancelled" | "timed_out")
            )
        });
        if builds.len() == BUILDS && terminal.count() == BUILDS {
            break builds;
        }
        assert!(
            Instant::now() < deadline,
            "not all jobs finished:\n{}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let logs = format!(
        "{}{}",
        s.server_log(),
        std::fs::read_to_string(&b.log).unwrap()
    );
    let mut retried = 0;
    for build in &builds {
        let job = &build["jobs"][0];
        let id = job["id"].as_i64().unwrap();
        assert_eq!(job["state"], "succeeded", "job {id}: {job:#}");
        // Exactly one replica finished it: no job ran to its end twice.
        let finished = logs.matches(&format!("job finished job.id={id} ")).count()
            + logs
                .matches(&format!(
                    "job finished \u{1b}[3mjob.id\u{1b}[0m\u{1b}[2m=\u{1b}[0m{id} "
                ))
                .count();
        assert_eq!(finished, 1, "job {id} finished {finished} times");
        if job["attempt"].as_i64().unwrap() > 1 {
            retried += 1;
        }
    }
    // Only what B was running when it died was retried.
    assert!(
        retried <= 2,
        "{retried} jobs retried; B ran at most 2 at a time"
    );

    // B comes back under the same name and cleans what it left behind.
    let mut b2 = Replica::start(&s, "b");
    std::thread::sleep(Duration::from_millis(500));
    let leaks = b2.leaks();
    assert!(leaks.is_empty(), "B's leftovers after restart: {leaks:#?}");
    b2.stop();
    let leaks = s.leaks();
    assert!(leaks.is_empty(), "A leaked: {leaks:#?}");
    s.shutdown_clean();
}
