//! The few syscalls the agent needs: a wake-up pipe fed by SIGCHLD, reaping, killing
//! process groups, sweeping leftover children, scrubbing the token from the environment.
//!
//! Everything here is called from the main thread except [`wake`], which any thread (and
//! the SIGCHLD handler) may call.

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

static WAKE_R: AtomicI32 = AtomicI32::new(-1);
static WAKE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Takes `name` out of the process environment and returns its value. The bytes of the
/// value are overwritten in place first, so the token cannot be read back later through
/// `/proc/<agent>/environ` (which shows the original environment block). Must run before
/// any thread is started.
pub fn take_env_secret(name: &str) -> Option<String> {
    let value = std::env::var_os(name)?;
    // SAFETY: single-threaded at this point; `environ` is a NULL-terminated array of
    // NUL-terminated strings that stay valid and writable (initial stack or heap).
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = CStr::from_ptr(*p).to_bytes();
            if entry.len() > name.len()
                && entry.starts_with(name.as_bytes())
                && entry[name.len()] == b'='
            {
                let value_len = entry.len() - name.len() - 1;
                std::ptr::write_bytes((*p).add(name.len() + 1), 0, value_len);
            }
            p = p.add(1);
        }
    }
    std::env::remove_var(name);
    Some(value.to_string_lossy().into_owned())
}

/// Process-wide setup: become a child subreaper (orphaned descendants are reparented to
/// the agent, as they are to PID 1 in a container), refuse ptrace/`/proc` access to the
/// agent's memory from same-uid steps, and create the wake pipe with its SIGCHLD handler.
pub fn init() -> io::Result<()> {
    // SAFETY: plain prctl/pipe2/sigaction calls with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let mut fds = [0; 2];
        if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        WAKE_R.store(fds[0], Ordering::SeqCst);
        WAKE_W.store(fds[1], Ordering::SeqCst);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_sigchld(_: libc::c_int) {
    // SAFETY: write(2) is async-signal-safe; errno is saved and restored.
    unsafe {
        let errno = *libc::__errno_location();
        wake();
        *libc::__errno_location() = errno;
    }
}

/// Wakes the main loop (a child exited, a Cancel arrived, the connection was lost).
pub fn wake() {
    let fd = WAKE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: writing one byte from a valid buffer; a full pipe (EAGAIN) is fine, a
        // wake-up is already pending then.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// The read end of the wake pipe, for `poll`.
pub fn wake_fd() -> RawFd {
    WAKE_R.load(Ordering::Relaxed)
}

/// Empties the wake pipe.
pub fn drain_wake() {
    let fd = wake_fd();
    let mut buf = [0u8; 64];
    // SAFETY: reading into a valid buffer from a non-blocking pipe.
    while unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) } > 0 {}
}

/// `poll(2)` for readability on `fds`; `None` waits forever. Returns the `revents`.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> Vec<i16> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        // Round up so a deadline is never polled for 0 ms in a busy loop.
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: `pfds` is a valid array of `pfds.len()` entries.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        // Timeout or EINTR (a SIGCHLD): the caller re-checks everything anyway.
        return vec![0; fds.len()];
    }
    pfds.iter().map(|p| p.revents).collect()
}

/// The read end of a pipe whose write end is already closed: reads give end of file at
/// once, like `/dev/null`, in a root file system that has no `/dev`.
pub fn empty_pipe() -> io::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        drop(OwnedFd::from_raw_fd(fds[1]));
        Ok(OwnedFd::from_raw_fd(fds[0]))
    }
}

/// SIGKILL to every process of the group `pgid`.
pub fn kill_group(pgid: libc::pid_t) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid targets the process group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Reaps every exited child without blocking. If `step` (the running step's shell, leader
/// of its own process group) has exited, the rest of its group is killed *before* the
/// shell is reaped (so the group id cannot be reused in between) and its wait status is
/// returned. Orphans reparented to the agent (it is PID 1 or a subreaper) are just reaped.
pub fn reap(step: Option<libc::pid_t>) -> Option<libc::c_int> {
    let mut step_status = None;
    loop {
        // SAFETY: waitid with a zeroed siginfo; WNOWAIT leaves the zombie in place.
        let pid = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            if r != 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break; // ECHILD: no children at all.
            }
            info.si_pid()
        };
        if pid == 0 {
            break; // Children exist, none has exited.
        }
        if Some(pid) == step {
            kill_group(pid);
        }
        let mut status = 0;
        // SAFETY: reaping a child known to have exited.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid && Some(pid) == step {
            step_status = Some(status);
        }
    }
    step_status
}

/// Blocks until `pid` (already SIGKILLed) has exited; returns its wait status.
pub fn wait_killed(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return libc::SIGKILL; // Already reaped elsewhere: report the kill.
        }
    }
}

/// `(exit_code, signal)` of a wait status.
pub fn decode_status(status: libc::c_int) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// Kills every process left below the agent (daemons started by steps), then reaps them.
///
/// In a container the agent is PID 1 and its exit kills the namespace anyway; outside one
/// (tests, a bare VM) this is what keeps a job from leaving processes behind. Because the
/// agent is a subreaper, every leftover descendant becomes its child once its parent dies,
/// so killing children repeatedly reaches all of them. Skipped when `/proc` belongs to
/// another PID namespace: the pids read there would not be ours.
pub fn sweep_children() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    match std::fs::read_link("/proc/self") {
        Ok(p) if p.to_str() == Some(&me.to_string()) => {}
        _ => {
            reap(None);
            return;
        }
    }
    for _ in 0..200 {
        reap(None);
        let kids = children_of(me);
        if kids.is_empty() {
            return;
        }
        for kid in kids {
            // SAFETY: kill(2) on our own children and on the group each may lead.
            unsafe {
                libc::kill(-kid, libc::SIGKILL);
                libc::kill(kid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("slate-agent: some leftover processes could not be killed");
}

/// Live (non-zombie) children of `parent`, read from `/proc/<pid>/stat`.
fn children_of(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|s| s.parse::<libc::pid_t>().ok());
        if ppid == Some(parent) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}
