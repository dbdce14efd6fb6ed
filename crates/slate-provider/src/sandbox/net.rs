//! Host side of `network = "egress"`: a job's network namespace, veth pair, address, NAT and nftables filter.
//!
//! Per job `slate-<id>` (worker root `<root>`, scope `slate/<hash>`, see
//! [`super::cgroup_scope`]):
//!
//! ```text
//! <root>/slate-<id>/netns    the namespace: an nsfs bind mount (a mount under the job
//!                            dir, so list() and unmount_all_under() see it like the
//!                            overlays); gone, the kernel deletes the veth pair with it
//! slv<id>                    host end of the veth, ifalias "slate/<hash>/slate-<id>"
//!                            (who owns it: two servers on one host never touch each
//!                            other's); the job end is `eth0` in the namespace
//! 100.127.<slot>/30          .1 on slv<id>, .2 on eth0, default route via .1; the
//!                            slot is the first free one from id mod 16384, taken
//!                            under a host-wide lock
//! table inet slate           shared by every slate on the host; per job the chains
//!                            in_<hash>_<id> and fwd_<hash>_<id>, reached through
//!                            the verdict maps in_jobs / fwd_jobs keyed by veth name
//! ```
//!
//! The namespace is made by slate rather than `ip netns add`: `/run/netns` is flat and
//! host-wide, while the job directory is already this provider's and already cleaned.
//!
//! Filter (from a job's veth): everything to the host itself is dropped (input hook),
//! forwarded traffic to loopback, private, link-local, CGNAT, multicast, reserved and the
//! host's own addresses is dropped, IPv6 is dropped (the job has no IPv6 route), and so
//! is traffic to another job's veth and traffic not from the job's own address. The
//! `network_allow` endpoints (tcp and udp to exactly that ip:port) pass before all of it.
//! The rest leaves masqueraded. Setup and teardown are each one `nft -f -` transaction.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The nftables table every slate on the host shares.
pub const TABLE: &str = "slate";
/// Prefix of the host end of a job's veth (`slv<id>`, at most 15 bytes).
pub const VETH_PREFIX: &str = "slv";
/// Job ids of more digits do not fit an interface name after [`VETH_PREFIX`].
const MAX_ID_DIGITS: usize = 15 - VETH_PREFIX.len();
/// The pool the per-job /30s come from: `100.127.0.0/16`, 16384 jobs at once.
const POOL: Ipv4Addr = Ipv4Addr::new(100, 127, 0, 0);
const POOL_PREFIX: u8 = 16;
const SLOTS: u32 = 1 << (32 - POOL_PREFIX - 2);
/// Host-wide: addresses and the shared table are host-wide.
const LOCK_FILE: &str = "/run/slate-egress.lock";

/// Forwarded destinations a job never reaches unless allowed (IPv4).
const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];
/// Same for IPv6; all IPv6 is dropped after these, they stay for when it is not.
const BLOCKED_V6: &[&str] = &[
    "::1/128",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{tool}` not found: network = \"egress\" needs {package} installed")]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("job id {0} has more than {MAX_ID_DIGITS} digits, too long for an interface name")]
    IdTooLong(i64),
    #[error("no free /30 left in {POOL}/{POOL_PREFIX}")]
    PoolExhausted,
    #[error("interface {0} exists already and is not this server's")]
    Foreign(String),
}

impl From<NetError> for crate::ProviderError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Command { command, detail } => Self::Command { command, detail },
            NetError::Io { what, source } => Self::Io { what, source },
            NetError::IdTooLong(_) => Self::Spec(e.to_string()),
            other => Self::Other(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, NetError>;

/// What one job's network is made of.
pub struct JobNet<'a> {
    pub id: i64,
    /// `slate/<hash>`: marks the veth and names the chains.
    pub scope: &'a str,
    /// The job directory; the namespace is `<job>/netns`.
    pub job: &'a Path,
    pub allow: &'a [SocketAddr],
}

/// Host end of job `id`'s veth.
pub fn veth_name(id: i64) -> String {
    format!("{VETH_PREFIX}{id}")
}

/// The namespace file of the job directory `job`.
pub fn netns_path(job: &Path) -> PathBuf {
    job.join("netns")
}

fn hash_of(scope: &str) -> &str {
    scope.rsplit('/').next().unwrap_or(scope)
}

fn chain(kind: &str, scope: &str, id: i64) -> String {
    format!("{kind}_{}_{id}", hash_of(scope))
}

fn alias(scope: &str, id: i64) -> String {
    format!("{scope}/slate-{id}")
}

/// Makes the job's namespace, veth, address and filter; returns the namespace path for
/// the OCI spec. On error, what was made stays for [`teardown`] (the caller rolls back).
pub fn setup(j: &JobNet<'_>) -> Result<PathBuf> {
    let started = Instant::now();
    if j.id < 0 || j.id.to_string().len() > MAX_ID_DIGITS {
        return Err(NetError::IdTooLong(j.id));
    }
    let veth = veth_name(j.id);
    let _lock = HostLock::take()?;
    let ns = netns_path(j.job);
    make_netns(&ns)?;

    let addrs = host_addresses()?;
    // Never ours at this point (the job dir is new), but told apart from a plain
    // "File exists" for whoever reads the error.
    if Path::new("/sys/class/net").join(&veth).exists() {
        return Err(NetError::Foreign(veth));
    }
    let slot = free_slot(j.id, &addrs)?;
    let base = u32::from(POOL) + slot * 4;
    let (host, guest) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));

    // The link is up before its filter exists, but nothing runs in the namespace yet: the
    // container starts after setup returns.
    ip_batch(
        None,
        &format!(
            "link add {veth} type veth peer name eth0 netns {ns}\n\
             link set dev {veth} alias {alias}\n\
             addr add {host}/30 dev {veth}\n\
             link set dev {veth} up\n",
            ns = ns.display(),
            alias = alias(j.scope, j.id),
        ),
    )?;
    // The pool and link-local are dropped as ranges already.
    let locals: Vec<IpAddr> = addrs
        .iter()
        .map(|(_, a)| *a)
        .filter(|a| match a {
            IpAddr::V4(v) => {
                u32::from(*v) >> (32 - POOL_PREFIX) != u32::from(POOL) >> (32 - POOL_PREFIX)
            }
            IpAddr::V6(v) => (v.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    nft(&rules_for(j, &veth, guest, &locals))?;
    ip_batch(
        Some(&ns),
        &format!(
            "link set dev lo up\n\
             addr add {guest}/30 dev eth0\n\
             link set dev eth0 up\n\
             route add default via {host} dev eth0\n"
        ),
    )?;
    enable_forwarding()?;
    tracing::debug!(
        job.id = j.id,
        veth = %veth,
        address = %guest,
        duration_ms = started.elapsed().as_millis() as u64,
        "egress network set up"
    );
    Ok(ns)
}

/// Removes the job's filter and veth (its namespace is a mount of the job dir, which the
/// caller unmounts). Only what carries this scope is touched; what is gone is fine.
pub fn teardown(scope: &str, id: i64, job: &Path) -> Result<()> {
    let started = Instant::now();
    let veth = veth_name(id);
    let _lock = HostLock::take()?;
    if nft_available() {
        let table = list_table()?;
        let (in_c, fwd_c) = (chain("in", scope, id), chain("fwd", scope, id));
        let mut batch = String::new();
        for (map, target) in &table.elements {
            if target == &in_c || target == &fwd_c {
                let (m, key) = map;
                let _ = writeln!(batch, "delete element inet {TABLE} {m} {{ \"{key}\" }}");
            }
        }
        let ours: Vec<&String> = table
            .chains
            .iter()
            .filter(|c| **c == in_c || **c == fwd_c)
            .collect();
        for c in &ours {
            let _ = writeln!(batch, "flush chain inet {TABLE} {c}");
            let _ = writeln!(batch, "delete chain inet {TABLE} {c}");
        }
        // The last job of every slate on the host gone: the table goes too.
        let others = table.job_chains().filter(|c| !ours.contains(c)).count();
        if table.exists && others == 0 {
            batch = format!("delete table inet {TABLE}\n");
        }
        if !batch.is_empty() {
            nft(&batch)?;
        }
    }
    if owner_of(&veth).is_some_and(|o| o == alias(scope, id)) {
        match ip_batch(None, &format!("link del dev {veth}\n")) {
            Ok(()) => {}
            // Deleted meanwhile with its namespace.
            Err(_) if !Path::new("/sys/class/net").join(&veth).exists() => {}
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(
        job.id = id,
        netns = %netns_path(job).display(),
        duration_ms = started.elapsed().as_millis() as u64,
        "egress network removed"
    );
    Ok(())
}

/// Job ids of this scope that still have a veth or a chain (half-made or half-removed).
pub fn leftovers(scope: &str) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    let prefix = format!("{scope}/slate-");
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(VETH_PREFIX) {
                continue;
            }
            if let Some(id) = owner_of(&name)
                .and_then(|o| o.strip_prefix(&prefix).map(str::to_string))
                .and_then(|id| id.parse().ok())
            {
                ids.insert(id);
            }
        }
    }
    if nft_available() {
        if let Ok(table) = list_table() {
            let hash = format!("_{}_", hash_of(scope));
            for c in table.job_chains() {
                if let Some((_, id)) = c.split_once(&hash) {
                    if let Ok(id) = id.parse() {
                        ids.insert(id);
                    }
                }
            }
        }
    }
    ids
}

/// Whether job `id`'s veth exists and is this scope's.
pub fn has_veth(scope: &str, id: i64) -> bool {
    owner_of(&veth_name(id)).is_some_and(|o| o == alias(scope, id))
}

/// The ifalias of interface `name`, when it exists and has one.
fn owner_of(name: &str) -> Option<String> {
    fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifalias"))
        .ok()
        .map(|s| s.trim_end().to_string())
        .filter(|s| !s.is_empty())
}

/// The rules of one job, plus the shared base (re-asserted each time: flushing and
/// refilling the base chains in the same transaction is atomic and heals an edited table).
fn rules_for(j: &JobNet<'_>, veth: &str, guest: Ipv4Addr, locals: &[IpAddr]) -> String {
    let (in_c, fwd_c) = (chain("in", j.scope, j.id), chain("fwd", j.scope, j.id));
    let mut allow = String::new();
    for a in j.allow {
        let fam = if a.is_ipv4() { "ip" } else { "ip6" };
        for proto in ["tcp", "udp"] {
            let _ = writeln!(
                allow,
                "        {fam} daddr {} {proto} dport {} accept",
                a.ip(),
                a.port()
            );
        }
    }
    let mut own4: Vec<String> = Vec::new();
    let mut own6: Vec<String> = Vec::new();
    for a in locals {
        match a {
            IpAddr::V4(v) => own4.push(v.to_string()),
            IpAddr::V6(v) => own6.push(v.to_string()),
        }
    }
    let own = |fam: &str, list: &[String]| {
        if list.is_empty() {
            String::new()
        } else {
            format!("        {fam} daddr {{ {} }} drop\n", list.join(", "))
        }
    };
    format!(
        r#"add table inet {TABLE}
add map inet {TABLE} in_jobs {{ type ifname : verdict; }}
add map inet {TABLE} fwd_jobs {{ type ifname : verdict; }}
add chain inet {TABLE} input {{ type filter hook input priority filter - 10; policy accept; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter - 10; policy accept; }}
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain inet {TABLE} input
flush chain inet {TABLE} forward
flush chain inet {TABLE} postrouting
table inet {TABLE} {{
    chain input {{
        iifname vmap @in_jobs
        iifname "{VETH_PREFIX}*" drop
    }}
    chain forward {{
        iifname vmap @fwd_jobs
        iifname "{VETH_PREFIX}*" drop
        oifname "{VETH_PREFIX}*" ct state established,related accept
        oifname "{VETH_PREFIX}*" drop
    }}
    chain postrouting {{
        ip saddr {POOL}/{POOL_PREFIX} oifname != "{VETH_PREFIX}*" masquerade
    }}
    chain {in_c} {{
        ip saddr != {guest} drop
{allow}        drop
    }}
    chain {fwd_c} {{
        ip saddr != {guest} drop
        oifname "{VETH_PREFIX}*" drop
{allow}        ip daddr {{ {v4} }} drop
        ip6 daddr {{ {v6} }} drop
{own4}{own6}        meta nfproto ipv6 drop
        accept
    }}
}}
add element inet {TABLE} in_jobs {{ "{veth}" : jump {in_c} }}
add element inet {TABLE} fwd_jobs {{ "{veth}" : jump {fwd_c} }}
"#,
        v4 = BLOCKED_V4.join(", "),
        v6 = BLOCKED_V6.join(", "),
        own4 = own("ip", &own4),
        own6 = own("ip6", &own6),
    )
}

/// What `nft -j list table inet slate` shows of slate's.
#[derive(Default)]
struct Table {
    exists: bool,
    chains: Vec<String>,
    /// ((map, key), target chain) of the verdict maps.
    elements: Vec<((String, String), String)>,
}

impl Table {
    fn job_chains(&self) -> impl Iterator<Item = &String> {
        self.chains
            .iter()
            .filter(|c| c.starts_with("in_") || c.starts_with("fwd_"))
    }
}

fn list_table() -> Result<Table> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_err("nft", "nftables", e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(Table::default());
        }
        return Err(NetError::Command {
            command: format!("nft list table inet {TABLE}"),
            detail: err.trim().to_string(),
        });
    }
    Ok(parse_table(&out.stdout))
}

fn parse_table(json: &[u8]) -> Table {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let mut t = Table {
        exists: true,
        ..Table::default()
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(name) = item["chain"]["name"].as_str() {
            t.chains.push(name.to_string());
        }
        let map = &item["map"];
        if let Some(name) = map["name"].as_str() {
            for el in map["elem"].as_array().into_iter().flatten() {
                let key = el[0].as_str().unwrap_or_default().to_string();
                if let Some(target) = el[1]["jump"]["target"].as_str() {
                    t.elements
                        .push(((name.to_string(), key), target.to_string()));
                }
            }
        }
    }
    t
}

fn nft_available() -> bool {
    which("nft")
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn tool_err(tool: &'static str, package: &'static str, e: io::Error) -> NetError {
    if e.kind() == io::ErrorKind::NotFound {
        NetError::Missing { tool, package }
    } else {
        NetError::Io {
            what: format!("run {tool}"),
            source: e,
        }
    }
}

/// `nft -f -`: the whole batch is one transaction, applied entirely or not at all.
fn nft(batch: &str) -> Result<()> {
    feed(
        Command::new("nft").args(["-f", "-"]),
        batch,
        "nft",
        "nftables",
    )
}

/// `ip -batch -`, in the namespace `ns` when given (entered between fork and exec).
fn ip_batch(ns: Option<&Path>, batch: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-batch", "-"]);
    let _ns_file;
    if let Some(ns) = ns {
        let f = fs::File::open(ns).map_err(|e| NetError::Io {
            what: format!("open {}", ns.display()),
            source: e,
        })?;
        let fd = f.as_raw_fd();
        _ns_file = f;
        // SAFETY: only setns(2), async-signal-safe, runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    feed(&mut cmd, batch, "ip", "iproute2")
}

fn feed(cmd: &mut Command, input: &str, tool: &'static str, package: &'static str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_err(tool, package, e))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let wrote = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| NetError::Io {
        what: format!("wait for {tool}"),
        source: e,
    })?;
    if out.status.success() && wrote.is_ok() {
        return Ok(());
    }
    let first = input.lines().next().unwrap_or_default();
    Err(NetError::Command {
        command: format!("{tool} ({first}…)"),
        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// A new network namespace kept alive by a bind mount at `path` (created, must not exist).
fn make_netns(path: &Path) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| NetError::Io {
            what: format!("create {}", path.display()),
            source: e,
        })?;
    let target = path.to_path_buf();
    // Its own thread: unshare(CLONE_NEWNET) moves only the calling thread, which then
    // ends; the mount keeps the namespace.
    std::thread::spawn(move || -> io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| NetError::Io {
        what: "netns thread".into(),
        source: io::Error::other("panicked"),
    })?
    .map_err(|e| NetError::Io {
        what: format!("make network namespace {}", path.display()),
        source: e,
    })
}

/// Every address on the host's interfaces, with its interface (`ip -j addr`).
fn host_addresses() -> Result<Vec<(String, IpAddr)>> {
    let out = Command::new("ip")
        .args(["-j", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_err("ip", "iproute2", e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: "ip -j addr show".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_addresses(&out.stdout))
}

fn parse_addresses(json: &[u8]) -> Vec<(String, IpAddr)> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                out.push((name.to_string(), ip));
            }
        }
    }
    out
}

/// The first /30 of the pool no interface uses, probing from `id mod SLOTS`.
fn free_slot(id: i64, addrs: &[(String, IpAddr)]) -> Result<u32> {
    let pool = u32::from(POOL);
    let mask = u32::MAX << (32 - POOL_PREFIX);
    let used: BTreeSet<u32> = addrs
        .iter()
        .filter_map(|(_, a)| match a {
            IpAddr::V4(v) if u32::from(*v) & mask == pool => Some((u32::from(*v) - pool) / 4),
            _ => None,
        })
        .collect();
    let start = (id.rem_euclid(i64::from(SLOTS))) as u32;
    (0..SLOTS)
        .map(|i| (start + i) % SLOTS)
        .find(|s| !used.contains(s))
        .ok_or(NetError::PoolExhausted)
}

/// IPv4 forwarding, host-wide: NAT of the jobs' traffic needs it.
fn enable_forwarding() -> Result<()> {
    const KNOB: &str = "/proc/sys/net/ipv4/ip_forward";
    let io = |source| NetError::Io {
        what: format!("enable forwarding ({KNOB})"),
        source,
    };
    if fs::read_to_string(KNOB).map_err(io)?.trim() != "1" {
        fs::write(KNOB, "1").map_err(io)?;
        tracing::warn!("enabled IPv4 forwarding on the host for egress jobs");
    }
    Ok(())
}

/// `flock` on [`LOCK_FILE`]: address allocation and the shared table are host-wide.
struct HostLock(fs::File);

impl HostLock {
    fn take() -> Result<Self> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(LOCK_FILE)
            .map_err(|e| NetError::Io {
                what: format!("open {LOCK_FILE}"),
                source: e,
            })?;
        // SAFETY: flock on a descriptor we own; released when it is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(NetError::Io {
                what: format!("lock {LOCK_FILE}"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self(f))
    }
}

impl Drop for HostLock {
    fn drop(&mut self) {
        // SAFETY: as above; closing would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_skip_used_addresses_and_wrap() {
        let a = |s: &str| ("x".to_string(), s.parse::<IpAddr>().unwrap());
        assert_eq!(free_slot(5, &[]).unwrap(), 5);
        assert_eq!(
            free_slot(5, &[a("100.127.0.21"), a("10.0.0.1")]).unwrap(),
            6
        );
        assert_eq!(free_slot(i64::from(SLOTS) + 1, &[]).unwrap(), 1);
        let last = format!("100.127.{}.{}", 255, 253);
        assert_eq!(free_slot(i64::from(SLOTS) - 1, &[a(&last)]).unwrap(), 0);
    }

    #[test]
    fn rules_name_the_job_and_allow_exact_endpoints() {
        let allow = ["10.1.2.3:8080".parse().unwrap()];
        let j = JobNet {
            id: 42,
            scope: "slate/00ff",
            job: Path::new("/w/slate-42"),
            allow: &allow,
        };
        let r = rules_for(&j, "slv42", Ipv4Addr::new(100, 127, 0, 170), &[]);
        assert!(r.contains("chain in_00ff_42 {"), "{r}");
        assert!(r.contains("ip daddr 10.1.2.3 tcp dport 8080 accept"), "{r}");
        assert!(r.contains("ip daddr 10.1.2.3 udp dport 8080 accept"), "{r}");
        assert!(r.contains("\"slv42\" : jump fwd_00ff_42"), "{r}");
        // Allowed endpoints come before the private-range drop.
        assert!(r.find("dport 8080").unwrap() < r.find("10.0.0.0/8").unwrap());
    }

    #[test]
    fn a_missing_tool_says_what_to_install() {
        let e = tool_err("nft", "nftables", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(
            e.to_string(),
            "`nft` not found: network = \"egress\" needs nftables installed"
        );
    }

    #[test]
    fn table_listing_is_parsed() {
        let json = br#"{"nftables": [{"metainfo": {}}, {"table": {"name": "slate"}},
            {"map": {"name": "in_jobs", "elem": [["slv9", {"jump": {"target": "in_ab_9"}}]]}},
            {"chain": {"name": "input"}}, {"chain": {"name": "in_ab_9"}}]}"#;
        let t = parse_table(json);
        assert!(t.exists);
        assert_eq!(t.job_chains().collect::<Vec<_>>(), ["in_ab_9"]);
        assert_eq!(
            t.elements,
            [(("in_jobs".into(), "slv9".into()), "in_ab_9".into())]
        );
    }
}
