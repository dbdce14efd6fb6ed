//! Named secrets end to end: the real `slate` binary and real sandboxes. A step gets the
//! secrets it names in push and submit builds, never in pull request builds, and their
//! values are masked in the log stored on disk.

mod common;

use common::*;

/// One '-' in it, so a step can print it in two halves, in two output chunks.
const KEY: &str = "tk_Zq81vX-Pw3mK9sLr";
const HEAD: &str = "tk_Zq81vX";
const TAIL: &str = "Pw3mK9sLr";

const STEPS: &str = r##"
  { name = "uses", secrets = ["DEPLOY_KEY"], run = "echo \"len=${#DEPLOY_KEY}\"; echo \"key=$DEPLOY_KEY\"; printf '%s-' \"${DEPLOY_KEY%-*}\"; sleep 0.5; echo \"${DEPLOY_KEY#*-}\"; echo \"err=$DEPLOY_KEY\" >&2" },
  { name = "other", run = "echo \"other=[${DEPLOY_KEY:-unset}] [${OTHER_KEY:-unset}]\"" },
"##;

fn start(secret_dir: &std::path::Path) -> Slate {
    let key_file = secret_dir.join("deploy-key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let other_file = secret_dir.join("other-key");
    std::fs::write(&other_file, "never-named-anywhere").unwrap();
    Slate::start(Options {
        steps: STEPS.into(),
        max_jobs: 1,
        config_extra: format!(
            "[[secret]]\nname = \"DEPLOY_KEY\"\nfile = \"{}\"\n\n[[secret]]\nname = \"OTHER_KEY\"\nfile = \"{}\"\n",
            key_file.display(),
            other_file.display()
        ),
        ..Default::default()
    })
}

/// The log as stored on disk, and as the API serves it.
fn logs(s: &Slate, job: i64) -> (String, String) {
    let on_disk = std::fs::read_to_string(s.data.join("logs").join(format!("{job}.log")))
        .unwrap_or_else(|e| panic!("log of job {job}: {e}"));
    (on_disk, s.log(job))
}

fn assert_masked(s: &Slate, job: i64) {
    let (on_disk, served) = logs(s, job);
    for text in [&on_disk, &served] {
        // The step got the value (its length shows), and every print of it is masked,
        // including the one written in two halves.
        assert!(text.contains("len=19\n"), "{text}");
        assert!(text.contains("key=***\n"), "{text}");
        assert!(text.contains("err=***\n"), "{text}");
        assert!(text.contains("\n***\n"), "the split print: {text}");
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains(HEAD) && !text.contains(TAIL), "{text}");
        // A step that names no secret gets none.
        assert!(text.contains("other=[unset] [unset]"), "{text}");
        assert!(!text.contains("withheld"), "{text}");
    }
}

#[test]
fn steps_get_named_secrets_in_push_and_submit_builds_masked_in_the_log() {
    let secrets = tempfile::tempdir().unwrap();
    let s = start(secrets.path());

    // A push to main.
    let before = git(&s.work, &["rev-parse", "main"]);
    std::fs::write(s.work.join("greeting.txt"), "pushed\n").unwrap();
    git(&s.work, &["commit", "-qam", "push"]);
    let after = git(&s.work, &["rev-parse", "main"]);
    git(&s.work, &["push", "-q", s.remote.to_str().unwrap(), "main"]);
    let (code, body) = s.webhook("push", "d-push", &s.push_event("main", &before, &after));
    assert_eq!(code, 202, "{body}");
    let job = s.wait_terminal(1);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(1));
    assert_masked(&s, 1);

    // `slate submit` of a branch.
    let out = s.cli(&["submit", "--repo", REPO, "--ref", "main", "--wait"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let build = &s.builds()[0];
    assert_eq!(build["trigger"]["kind"], "manual", "{build:#}");
    let job = s.wait_terminal(2);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(2));
    assert_masked(&s, 2);

    // The server's own log never shows a value either.
    let server = s.server_log();
    assert!(!server.contains(KEY) && !server.contains("never-named-anywhere"));
    s.shutdown_clean();
}

#[test]
fn pull_request_builds_run_without_secrets() {
    let secrets = tempfile::tempdir().unwrap();
    let s = start(secrets.path());
    let (base, head) = s.make_pr(4, "feature", "greeting.txt", "from a PR\n");
    let (code, body) = s.webhook(
        "pull_request",
        "d-pr",
        &s.pr_event("opened", 4, "feature", &head, &base),
    );
    assert_eq!(code, 202, "{body}");
    let job = s.wait_terminal(1);
    // The step still runs, without the variable.
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", s.log(1));
    let steps = job["steps"].as_array().unwrap();
    assert_eq!(steps[0]["name"], "uses");
    assert_eq!(steps[0]["outcome"], "ok");
    let (on_disk, served) = logs(&s, 1);
    for text in [&on_disk, &served] {
        assert!(
            text.contains("step uses: secrets withheld from pull request builds (DEPLOY_KEY)"),
            "{text}"
        );
        assert!(text.contains("len=0\n"), "{text}");
        assert!(text.contains("key=\n"), "{text}");
        assert!(text.contains("other=[unset] [unset]"), "{text}");
        assert!(!text.contains("***"), "nothing to mask: {text}");
        assert!(!text.contains(HEAD) && !text.contains(TAIL), "{text}");
    }
    s.wait_status(&head, "success");
    s.shutdown_clean();
}

#[test]
fn check_config_locates_a_step_naming_an_unknown_secret() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("slate.toml");
    let text = r#"[[pool]]
name = "x"
image = "/x"

[[pipeline]]
name = "default"
pools = ["x"]
steps = [
  { name = "deploy", run = "./deploy.sh", secrets = ["DEPLOY_KEY"] },
]

[[secret]]
name = "DEPLOY_KYE"
file = "/etc/slate/deploy-key"
"#;
    std::fs::write(&p, text).unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slate.toml:9:"), "{err}");
    assert!(err.contains("pipeline[0].steps[0].secrets"), "{err}");
    assert!(err.contains("DEPLOY_KEY"), "{err}");

    // Fixed, it passes; a name unfit for a variable does not.
    std::fs::write(&p, text.replace("DEPLOY_KYE", "DEPLOY_KEY")).unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &p,
        text.replace("DEPLOY_KYE", "deploy-key")
            .replace("[\"DEPLOY_KEY\"]", "[\"deploy-key\"]"),
    )
    .unwrap();
    let out = std::process::Command::new(slate_bin())
        .args(["check-config", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("slate.toml:13:") && err.contains("secret[0].name"),
        "{err}"
    );
}
