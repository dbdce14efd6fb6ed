//! Bare git mirrors per repository: fetch a change, build the merge commit, list changed
//! files (every file, no page limit), and export a commit's tree for a job.

use slate_core::config::{Checkout, RepoConfig};
use slate_core::{Change, Trigger};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git {args}: {stderr}")]
    Command { args: String, stderr: String },
    #[error("could not run git: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("merge conflict between {head} and {base}: {files}")]
    MergeConflict {
        head: String,
        base: String,
        files: String,
    },
    #[error("commit {0} was not found in the repository after fetching")]
    MissingCommit(String),
}

/// What a change resolves to once fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The head commit (resolved for branch submits).
    pub head_sha: String,
    /// The commit jobs check out: the merge of head into base, or the head.
    pub checkout_sha: String,
    /// `git diff --name-only base...head`; `None` when there is no base to compare with.
    pub changed_files: Option<Vec<String>>,
    /// The base `changed_files` was computed against, if any.
    pub base_sha: Option<String>,
}

/// All mirrors, one bare repository per configured repo under `dir`.
#[derive(Clone)]
pub struct GitMirrors {
    dir: PathBuf,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

impl GitMirrors {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            locks: Arc::default(),
        })
    }

    pub fn mirror_path(&self, repo: &str) -> PathBuf {
        self.dir.join(format!("{}.git", repo.replace('/', "__")))
    }

    fn lock(&self, repo: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(repo.to_string())
            .or_default()
            .clone()
    }

    async fn ensure(&self, repo: &RepoConfig) -> Result<PathBuf, GitError> {
        let path = self.mirror_path(&repo.name);
        if !path.join("HEAD").exists() {
            let tmp = path.with_extension("git.tmp");
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            git(None, &["init", "-q", "--bare", &tmp.to_string_lossy()]).await?;
            git(Some(&tmp), &["remote", "add", "origin", &repo.url]).await?;
            // Objects are only ever added by fetch; no gc races with running exports.
            git(Some(&tmp), &["config", "gc.auto", "0"]).await?;
            tokio::fs::rename(&tmp, &path).await?;
        } else {
            // The URL may have changed in the config.
            git(Some(&path), &["remote", "set-url", "origin", &repo.url]).await?;
        }
        Ok(path)
    }

    /// Make sure this server's mirror has a build's checkout commit: a build planned by
    /// another replica (or before a mirror was lost) is fetched again, and its merge
    /// commit reproduced from the recorded base and head (merge commits are
    /// deterministic, see `merge_commit`).
    pub async fn ensure_checkout(
        &self,
        repo: &RepoConfig,
        build: &slate_core::Build,
    ) -> Result<(), GitError> {
        let Some(sha) = build.checkout_sha.clone() else {
            return Ok(());
        };
        {
            let lock = self.lock(&repo.name);
            let _guard = lock.lock().await;
            let m = self.ensure(repo).await?;
            if has_commit(&m, &sha).await {
                return Ok(());
            }
        }
        let mut change = build.change.clone();
        let recorded_base = change.base_sha.clone();
        if let Trigger::Manual { .. } = change.trigger {
            change.head_sha = sha.clone();
        }
        let prepared = self.prepare(repo, &change).await?;
        if prepared.checkout_sha == sha {
            return Ok(());
        }
        // The base branch moved since: merge the recorded base, as the build did.
        if let (Trigger::PullRequest { number, .. }, Some(base)) = (&change.trigger, recorded_base)
        {
            let lock = self.lock(&repo.name);
            let _guard = lock.lock().await;
            let m = self.mirror_path(&repo.name);
            if !has_commit(&m, &base).await {
                let _ = git(Some(&m), &["fetch", "-q", "--no-tags", "origin", &base]).await;
            }
            if has_commit(&m, &base).await {
                let merged = merge_commit(&m, &base, &change.head_sha, *number).await?;
                git(
                    Some(&m),
                    &[
                        "update-ref",
                        &format!("refs/slate/checkout/{merged}"),
                        &merged,
                    ],
                )
                .await?;
                if merged == sha {
                    return Ok(());
                }
            }
        }
        Err(GitError::MissingCommit(sha))
    }

    /// Fetch what the change needs and compute what to check out.
    pub async fn prepare(&self, repo: &RepoConfig, change: &Change) -> Result<Prepared, GitError> {
        let lock = self.lock(&repo.name);
        let _guard = lock.lock().await;
        let m = self.ensure(repo).await?;
        match &change.trigger {
            Trigger::PullRequest { number, .. } => {
                let base_ref = change.base_ref.clone().unwrap_or_else(|| "main".into());
                let head_local = format!("refs/remotes/pull/{number}/head");
                let base_local = format!("refs/remotes/origin/{base_ref}");
                let specs = [
                    format!("+refs/pull/{number}/head:{head_local}"),
                    format!("+refs/heads/{base_ref}:{base_local}"),
                ];
                let mut args = vec!["fetch", "-q", "--no-tags", "origin"];
                args.extend(specs.iter().map(String::as_str));
                git(Some(&m), &args).await?;
                let head = change.head_sha.clone();
                if !has_commit(&m, &head).await {
                    // The PR moved on since the event; the old head may still be fetchable.
                    let _ = git(Some(&m), &["fetch", "-q", "--no-tags", "origin", &head]).await;
                    if !has_commit(&m, &head).await {
                        return Err(GitError::MissingCommit(head));
                    }
                }
                // The base branch's current tip: what GitHub would merge into.
                let base = rev_parse(&m, &base_local).await?;
                let changed = diff_names(&m, &base, &head).await?;
                let checkout_sha = match repo.checkout {
                    Checkout::Head => head.clone(),
                    Checkout::Merge => merge_commit(&m, &base, &head, *number).await?,
                };
                // Keep the commit reachable while jobs use it.
                git(
                    Some(&m),
                    &[
                        "update-ref",
                        &format!("refs/slate/checkout/{checkout_sha}"),
                        &checkout_sha,
                    ],
                )
                .await?;
                Ok(Prepared {
                    head_sha: head,
                    checkout_sha,
                    changed_files: Some(changed),
                    base_sha: Some(base),
                })
            }
            Trigger::Push { branch } | Trigger::Manual { branch } => {
                let local = format!("refs/remotes/origin/{branch}");
                git(
                    Some(&m),
                    &[
                        "fetch",
                        "-q",
                        "--no-tags",
                        "origin",
                        &format!("+refs/heads/{branch}:{local}"),
                    ],
                )
                .await?;
                let head = if change.head_sha.is_empty() {
                    rev_parse(&m, &local).await?
                } else {
                    change.head_sha.clone()
                };
                if !has_commit(&m, &head).await {
                    return Err(GitError::MissingCommit(head));
                }
                let (changed, base_sha) = match &change.base_sha {
                    Some(b) if b != ZERO_SHA && has_commit(&m, b).await => {
                        (Some(diff_names(&m, b, &head).await?), Some(b.clone()))
                    }
                    _ => (None, None),
                };
                Ok(Prepared {
                    head_sha: head.clone(),
                    checkout_sha: head,
                    changed_files: changed,
                    base_sha,
                })
            }
        }
    }

    /// `git diff --name-status -M base...head` in the mirror (not `-z`; paths git has to
    /// quote come C-quoted, as `slate_core::macports::parse_name_status` expects).
    pub async fn name_status(
        &self,
        repo: &str,
        base: &str,
        head: &str,
    ) -> Result<String, GitError> {
        let m = self.mirror_path(repo);
        git(
            Some(&m),
            &[
                "-c",
                "core.quotePath=true",
                "diff",
                "--name-status",
                "-M",
                &format!("{base}...{head}"),
            ],
        )
        .await
    }

    /// Every `CATEGORY/PORT/Portfile` of commit `sha` with its text: one `ls-tree`, then
    /// one `cat-file --batch` for all of them.
    pub async fn portfiles(
        &self,
        repo: &str,
        sha: &str,
    ) -> Result<Vec<(String, String)>, GitError> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let m = self.mirror_path(repo);
        let listing = git(Some(&m), &["ls-tree", "-r", "-z", sha]).await?;
        // `<mode> blob <oid>\t<path>`, NUL-terminated.
        let mut wanted: Vec<(String, String)> = Vec::new();
        for entry in listing.split('\0') {
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split_whitespace();
            let (_mode, kind, oid) = (parts.next(), parts.next(), parts.next());
            if kind != Some("blob") || path.split('/').count() != 3 || !path.ends_with("/Portfile")
            {
                continue;
            }
            if let Some(oid) = oid {
                wanted.push((path.to_string(), oid.to_string()));
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut child = Command::new("git")
            .arg("--git-dir")
            .arg(&m)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let request: String = wanted.iter().map(|(_, oid)| format!("{oid}\n")).collect();
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(request.as_bytes()).await;
        });
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut result = Vec::with_capacity(wanted.len());
        for (path, oid) in wanted {
            let mut header = String::new();
            out.read_line(&mut header).await?;
            let size: usize = header
                .split_whitespace()
                .nth(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| GitError::Command {
                    args: format!("cat-file --batch ({oid})"),
                    stderr: format!("unexpected header {:?}", header.trim()),
                })?;
            let mut body = vec![0u8; size + 1];
            out.read_exact(&mut body).await?;
            body.pop();
            result.push((path, String::from_utf8_lossy(&body).into_owned()));
        }
        let _ = writer.await;
        let _ = child.wait().await;
        Ok(result)
    }

    /// Write the tree of `sha` into `dest` (which must not exist yet).
    pub async fn export(&self, repo: &str, sha: &str, dest: &Path) -> Result<(), GitError> {
        let m = self.mirror_path(repo);
        tokio::fs::create_dir_all(dest).await?;
        let mut archive = Command::new("git")
            .arg("--git-dir")
            .arg(&m)
            .args(["archive", "--format=tar", sha])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout: Stdio = archive
            .stdout
            .take()
            .expect("piped stdout")
            .try_into()
            .map_err(GitError::Spawn)?;
        let tar = Command::new("tar")
            .args(["-x", "--no-same-owner", "-C"])
            .arg(dest)
            .stdin(stdout)
            .stderr(Stdio::piped())
            .output()
            .await?;
        let a = archive.wait_with_output().await?;
        if !a.status.success() {
            return Err(GitError::Command {
                args: format!("archive {sha}"),
                stderr: String::from_utf8_lossy(&a.stderr).trim().to_string(),
            });
        }
        if !tar.status.success() {
            return Err(GitError::Command {
                args: format!("archive {sha} | tar -x"),
                stderr: String::from_utf8_lossy(&tar.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

async fn git(dir: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.arg("--git-dir").arg(d);
    }
    // Never ask for credentials on a terminal; fail instead.
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "slate")
        .env("GIT_AUTHOR_EMAIL", "slate@localhost")
        .env("GIT_COMMITTER_NAME", "slate")
        .env("GIT_COMMITTER_EMAIL", "slate@localhost")
        .args(args)
        .stdin(Stdio::null());
    let out = cmd.output().await?;
    if !out.status.success() {
        return Err(GitError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn has_commit(m: &Path, sha: &str) -> bool {
    git(Some(m), &["cat-file", "-e", &format!("{sha}^{{commit}}")])
        .await
        .is_ok()
}

async fn rev_parse(m: &Path, rev: &str) -> Result<String, GitError> {
    Ok(git(
        Some(m),
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .await?
    .trim()
    .to_string())
}

async fn diff_names(m: &Path, base: &str, head: &str) -> Result<Vec<String>, GitError> {
    let out = git(
        Some(m),
        &[
            "diff",
            "--name-only",
            "--no-renames",
            "-z",
            &format!("{base}...{head}"),
        ],
    )
    .await?;
    Ok(out
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

/// Merge `head` into `base` without a work tree; a conflict is an error naming the files.
async fn merge_commit(m: &Path, base: &str, head: &str, pr: u64) -> Result<String, GitError> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(m)
        .args([
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            base,
            head,
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {
            let tree = stdout.lines().next().unwrap_or("").trim().to_string();
            let msg = format!("Merge pull request #{pr} ({head}) into {base}");
            // Dated by the head commit, so the merge commit's id depends only on its
            // inputs: every replica that merges the same base and head gets the same id.
            let date = git(Some(m), &["show", "-s", "--format=%ct", head]).await?;
            let date = format!("{} +0000", date.trim());
            let out = Command::new("git")
                .arg("--git-dir")
                .arg(m)
                .args(["commit-tree", &tree, "-p", base, "-p", head, "-m", &msg])
                .env("GIT_AUTHOR_NAME", "slate")
                .env("GIT_AUTHOR_EMAIL", "slate@localhost")
                .env("GIT_COMMITTER_NAME", "slate")
                .env("GIT_COMMITTER_EMAIL", "slate@localhost")
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date)
                .stdin(Stdio::null())
                .output()
                .await?;
            if !out.status.success() {
                return Err(GitError::Command {
                    args: "commit-tree".into(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Some(1) => {
            let files: Vec<&str> = stdout.lines().skip(1).filter(|l| !l.is_empty()).collect();
            Err(GitError::MergeConflict {
                head: head.chars().take(12).collect(),
                base: base.chars().take(12).collect(),
                files: files.join(", "),
            })
        }
        _ => Err(GitError::Command {
            args: "merge-tree".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}
