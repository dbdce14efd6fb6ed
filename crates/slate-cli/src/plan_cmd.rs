//! `slate plan`: what a change would build, computed locally from a git checkout, so an
//! admin can ask "what would this PR build?" without a server.

use anyhow::{bail, Context, Result};
use slate_core::macports;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every `category/port/Portfile` of `rev`, with its text (one `git cat-file --batch`).
fn portfiles(dir: &Path, rev: &str) -> Result<Vec<(String, String)>> {
    let listing = git(dir, &["ls-tree", "-r", "--name-only", rev])?;
    let paths: Vec<&str> = listing
        .lines()
        .filter(|p| p.split('/').count() == 3 && p.ends_with("/Portfile"))
        .collect();
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let requests: String = paths.iter().map(|p| format!("{rev}:{p}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(requests.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("writer thread")?;
    let mut files = Vec::new();
    let mut rest: &[u8] = &out.stdout;
    for p in paths {
        let nl = rest
            .iter()
            .position(|b| *b == b'\n')
            .context("truncated cat-file output")?;
        let header = String::from_utf8_lossy(&rest[..nl]).into_owned();
        rest = &rest[nl + 1..];
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected cat-file header {header:?}"))?;
        files.push((
            p.to_string(),
            String::from_utf8_lossy(&rest[..size]).into_owned(),
        ));
        rest = &rest[size + 1..];
    }
    Ok(files)
}

pub fn run(repo_dir: &Path, base: &str, head: &str, limit: usize, json: bool) -> Result<i32> {
    let text = git(
        repo_dir,
        &["diff", "--name-status", "-M", &format!("{base}...{head}")],
    )?;
    let changes = macports::parse_name_status(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files = if macports::changed_portgroups(&changes).is_empty() {
        Vec::new()
    } else {
        portfiles(repo_dir, head)?
    };
    let plan = macports::plan(&changes, files, limit);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ports": plan.ports,
                "changed": plan.changed,
                "truncated_by_limit": plan.truncated_by_limit,
                "refused": plan.refused,
                "note": plan.note,
            })
        );
    } else {
        for p in &plan.ports {
            println!("{p}");
        }
        eprintln!("{}", plan.note);
    }
    Ok(0)
}
