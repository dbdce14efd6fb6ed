//! Host-side helpers of the qemu provider: finding slate's qemu processes in /proc,
//! KVM probing, QMP.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;

/// The NUL-separated command line of `pid`, or `None` if it is gone (or a kernel thread).
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The worker a qemu command line runs: the value after `-name` if the command line also
/// names a path under `job_root` (the provider's resolved root) for that worker, so a
/// qemu of another slate server, or an unrelated process, is never taken for ours.
pub fn worker_of(args: &[String], job_root: &Path) -> Option<String> {
    let pos = args.iter().position(|a| a == "-name")?;
    let name = args.get(pos + 1)?;
    if !super::is_vm_name(name) {
        return None;
    }
    let dir = job_root.join(name);
    let dir = dir.to_string_lossy();
    let mentions = args
        .iter()
        .any(|a| a.contains(&format!("{dir}/")) || a.ends_with(dir.as_ref()));
    mentions.then(|| name.clone())
}

/// Every live (not zombie) process whose command line makes it a worker under `job_root`.
pub fn scan(job_root: &Path) -> Vec<(i32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let name = worker_of(&cmdline(pid)?, job_root)?;
            alive(pid).then_some((pid, name))
        })
        .collect()
}

/// Whether `pid` exists and is not a zombie (a zombie has released its resources and is
/// only waiting for its parent to reap it).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S …": comm may hold spaces and parens, so look after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pid in a qemu `-pidfile`, if that process is still the worker `name` under
/// `job_root` (a recycled pid belongs to someone else and must never be signalled).
pub fn verified_pid(pidfile: &Path, name: &str, job_root: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (pid > 0 && worker_of(&cmdline(pid)?, job_root).as_deref() == Some(name)).then_some(pid)
}

/// Whether `/dev/kvm` can be opened read/write at all.
pub fn kvm_openable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boots `kernel` (no disk, no initrd) with `accel` and reports whether it printed its
/// first console line within `within`. A KVM that merely opens (nested PVM here) never
/// runs a real kernel, so only a kernel that speaks proves the accelerator works.
pub async fn kernel_speaks(qemu: &str, accel: &str, kernel: &Path, within: Duration) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", accel, "-M", "pc", "-m", "128", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    let Some(mut out) = child.stdout.take() else {
        return false;
    };
    let read = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(13).any(|w| w == b"Linux version") {
                        return true;
                    }
                }
            }
        }
    };
    let spoke = tokio::time::timeout(within, read).await.unwrap_or(false);
    let _ = child.start_kill();
    let _ = child.wait().await;
    spoke
}

type QmpLines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next_line(lines: &mut QmpLines) -> io::Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| io::Error::other("qmp closed"))
}

/// Sends `quit` over QMP. Errors mean qemu is gone or not answering; the caller kills.
pub async fn qmp_quit(socket: &Path) -> io::Result<()> {
    let stream = UnixStream::connect(socket).await?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = next_line(&mut lines).await?;
    if !greeting.contains("\"QMP\"") {
        return Err(io::Error::other("not a qmp greeting"));
    }
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
    loop {
        let line = next_line(&mut lines).await?;
        if line.contains("\"return\"") {
            break;
        }
        if line.contains("\"error\"") {
            return Err(io::Error::other(format!("qmp: {line}")));
        }
    }
    w.write_all(b"{\"execute\":\"quit\"}\n").await?;
    // qemu may close before answering; either way it is on its way out.
    let _ = next_line(&mut lines).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_workers_under_our_root_are_ours() {
        let root = Path::new("/data/vm-workers");
        let ours = args(&[
            "qemu-system-x86_64",
            "-name",
            "slate-7",
            "-pidfile",
            "/data/vm-workers/slate-7/qemu.pid",
        ]);
        assert_eq!(worker_of(&ours, root).as_deref(), Some("slate-7"));
        // Same name, another server's root.
        let theirs = args(&[
            "qemu",
            "-name",
            "slate-7",
            "-pidfile",
            "/x/slate-7/qemu.pid",
        ]);
        assert_eq!(worker_of(&theirs, root), None);
        // Our root, but the path is another worker's: not slate-7.
        let mixed = args(&["qemu", "-name", "slate-7", "/data/vm-workers/slate-70/d"]);
        assert_eq!(worker_of(&mixed, root), None);
        let bad = args(&["qemu", "-name", "slate-x", "/data/vm-workers/slate-x/d"]);
        assert_eq!(worker_of(&bad, root), None);
    }

    #[test]
    fn this_process_is_alive_and_a_bogus_pid_is_not() {
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
    }
}
