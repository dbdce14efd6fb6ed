//! `slate bench --only claims` end to end, small: two replicas drain a scratch database,
//! every job is claimed exactly once and the database is dropped afterwards; without a
//! reachable PostgreSQL the section is reported skipped, not failed.

mod common;

use common::slate_bin;
use std::process::Command;

const DEFAULT_ADMIN_URL: &str = "postgres://slate:slate@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("SLATE_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

fn bench(args: &[&str]) -> (serde_json::Value, u32) {
    let child = Command::new(slate_bin())
        .args(["bench", "--json", "--only", "claims"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "slate bench: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench json ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, pid)
}

#[test]
fn claims_bench_claims_every_job_once_and_drops_its_database() {
    let admin = admin_url();
    let (report, pid) = bench(&[
        "--database",
        &admin,
        "--claim-jobs",
        "300",
        "--claim-pools",
        "3",
        "--claimers",
        "3",
        "--claim-rounds",
        "2",
    ]);
    let c = &report["claims"];
    assert!(
        c.get("skipped").is_none(),
        "postgresql is needed (scripts/postgres.sh): {c}"
    );
    assert_eq!(c["jobs"], 300, "{c}");
    assert_eq!(c["double_claims"], 0, "{c}");
    assert_eq!(c["unclaimed"], 0, "{c}");
    assert_eq!(c["db_verified"], true, "{c}");
    let rounds = c["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        let split: Vec<u64> = r["per_replica"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        assert_eq!(split.iter().sum::<u64>(), 300, "{r}");
        // Both replicas claim: their claimers start together.
        assert!(split.iter().all(|n| *n > 0), "{r}");
        assert!(r["claims_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(c["claim_ms"]["n"].as_u64().unwrap() == 600, "{c}");

    // The scratch databases are gone.
    let out = Command::new("psql")
        .args([
            &admin,
            "-qAt",
            "-c",
            &format!("SELECT datname FROM pg_database WHERE datname LIKE 'slate_bench_{pid}_%'"),
        ])
        .output()
        .expect("psql (run scripts/postgres.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

#[test]
fn claims_bench_without_postgresql_is_skipped_with_the_reason() {
    // Port 1 on loopback: nothing listens there.
    let (report, _) = bench(&["--database", "postgres://slate:secret@127.0.0.1:1/none"]);
    let skipped = report["claims"]["skipped"].as_str().unwrap_or_else(|| {
        panic!("expected a skipped claims section: {report}");
    });
    assert!(skipped.contains("no postgresql"), "{skipped}");
    assert!(
        !skipped.contains("secret"),
        "the password leaked: {skipped}"
    );
}
