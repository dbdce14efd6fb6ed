//! What comes back from a remote worker: artifacts, and the new distfiles of a cache,
//! sent by the agent over its TLS link. A trusted push promotes its new distfile into
//! the shared mirror (with its checksum in the object store); a PR's new distfile goes to
//! that PR's layer only; a PR's attempts to replace a mirror file, to plant a symlink or
//! to change a file it found are not kept.

use crate::common::*;
use crate::tls::{free_port, open_pr, Hooks};
use std::path::Path;
use std::time::Duration;

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(&e.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    walk(dir, "", &mut out);
    out.sort();
    out
}

#[test]
fn artifacts_and_new_distfiles_come_back_from_an_exec_worker_and_a_pr_cannot_poison_the_mirror() {
    let agent_port = free_port();
    let hooks = Hooks::new(agent_port);
    let mirror = hooks.path().join("mirror");
    let target = hooks.path().join("distfiles");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(mirror.join("old.tar.gz"), "from the mirror\n").unwrap();
    let d = target.display();
    let steps = format!(
        r#"{{ name = "fetch", run = "echo \"$SLATE_EVENT $SLATE_HEAD_SHA\" > {d}/new-$SLATE_EVENT.tar.gz && mkdir -p {d}/sub && echo nested > {d}/sub/n-$SLATE_EVENT.tar.gz && if [ $SLATE_EVENT = pull_request ]; then echo poisoned > {d}/old.tar.gz; ln -s /etc/passwd {d}/link.tar.gz; fi; mkdir -p out && echo report-$SLATE_EVENT > out/report.txt && echo not-declared > out/other.log", artifacts = ["out/*.txt"] }},"#
    );
    let s = Slate::start(Options {
        provider: "exec".into(),
        server_extra: format!("agent_listen = \"0.0.0.0:{agent_port}\""),
        repo_extra: "branches = [\"main\"]\ntrusted_branches = [\"main\"]".into(),
        steps,
        pool_limits: r#"{ timeout = "2m" }"#.into(),
        pool_extra: hooks.pool(&format!(
            r#"
[[pool.cache]]
name = "distfiles"
source = "{m}"
target = "{d}"
mode = "overlay"
promote = "trusted"
"#,
            m = mirror.display()
        )),
        ..Default::default()
    });

    // A trusted push to main.
    let before = git(&s.work, &["rev-parse", "main"]);
    std::fs::write(s.work.join("greeting.txt"), "pushed\n").unwrap();
    git(&s.work, &["commit", "-qam", "push"]);
    let after = git(&s.work, &["rev-parse", "main"]);
    git(&s.work, &["push", "-q", s.remote.to_str().unwrap(), "main"]);
    let (code, body) = s.webhook("push", "d-push", &s.push_event("main", &before, &after));
    assert_eq!(code, 202, "{body}");
    let job = s.wait_terminal(1);
    let log = s.log(1);
    assert_eq!(
        job["state"],
        "succeeded",
        "{job:#}\n{log}\n{}",
        s.server_log()
    );
    assert!(log.contains("artifacts: 1 files"), "{log}");
    assert!(log.contains("cache distfiles: 2 files"), "{log}");
    assert_eq!(
        s.get_text("/api/v1/jobs/1/artifacts/out/report.txt"),
        "report-push\n"
    );
    let list = s.get("/api/v1/jobs/1/artifacts");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");

    // Harvested into the mirror once the worker is gone, as files of the object store.
    let wait_for = |p: &Path| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !p.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} never appeared\n{}",
                p.display(),
                s.log(1)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&mirror.join("new-push.tar.gz"));
    assert_eq!(
        std::fs::read_to_string(mirror.join("new-push.tar.gz")).unwrap(),
        format!("push {after}\n")
    );
    assert_eq!(
        files_under(&mirror),
        ["new-push.tar.gz", "old.tar.gz", "sub/n-push.tar.gz"]
    );
    use std::os::unix::fs::MetadataExt;
    let promoted = std::fs::metadata(mirror.join("new-push.tar.gz")).unwrap();
    assert!(promoted.nlink() >= 2, "not linked from the object store");

    // A pull request: its new files go to its own layer; what it changed or planted in
    // the mirror's files is not kept, and the mirror stays as it was.
    let (id, _) = open_pr(&s, 7, "greeting.txt", "from a fork\n");
    let job = s.wait_terminal(id);
    let log = s.log(id);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{log}");
    assert!(log.contains("cache distfiles: 2 files"), "{log}");
    assert_eq!(
        s.get_text(&format!("/api/v1/jobs/{id}/artifacts/out/report.txt")),
        "report-pull_request\n"
    );
    let layer = s
        .data
        .join("caches/pr")
        .join(slate_cache_escape(REPO))
        .join("7/distfiles");
    wait_for(&layer.join("new-pull_request.tar.gz"));
    assert_eq!(
        files_under(&layer),
        ["new-pull_request.tar.gz", "sub/n-pull_request.tar.gz"]
    );
    assert_eq!(
        files_under(&mirror),
        ["new-push.tar.gz", "old.tar.gz", "sub/n-push.tar.gz"],
        "a pull request changed the mirror"
    );
    assert_eq!(
        std::fs::read_to_string(mirror.join("old.tar.gz")).unwrap(),
        "from the mirror\n"
    );

    s.assert_no_leaks();
    assert!(
        hooks.netns_left().is_empty(),
        "namespaces left: {:?}",
        hooks.netns_left()
    );
    s.shutdown_clean();
}

/// The cache manager's directory name for a repository (`owner/name` → `owner%2Fname`).
fn slate_cache_escape(repo: &str) -> String {
    repo.replace('/', "%2F")
}
