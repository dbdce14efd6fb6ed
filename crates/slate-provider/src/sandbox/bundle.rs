//! The OCI runtime `config.json` of a sandbox worker, generated with `oci-spec`.

use crate::{AGENT_PATH, AGENT_SOCKET_DIR, WORKSPACE_DIR};
use oci_spec::runtime::{
    get_default_maskedpaths, get_default_mounts, get_default_readonly_paths, Capability,
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};
use oci_spec::OciSpecError;
use slate_core::config::Limits;
use slate_core::Secret;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// `PATH` of the agent: the usual Debian one.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// CFS period for the CPU quota (the kernel default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;

/// What the bundle of one worker is made of (host paths).
pub struct BundleParams<'a> {
    pub name: &'a str,
    /// Cgroup directory the worker's cgroup goes under, e.g. `slate/1a2b…` (see
    /// [`super::cgroup_scope`]): one per provider root, so two servers on one host (or
    /// two test suites) never share `slate-<id>` cgroups.
    pub cgroup_parent: &'a str,
    pub rootfs: &'a Path,
    pub agent_binary: &'a Path,
    pub socket_dir: &'a Path,
    pub workspace: &'a Path,
    /// Extra binds (shared caches), mounted after the workspace.
    pub mounts: &'a [crate::WorkerMount],
    pub token: &'a Secret,
    pub limits: &'a Limits,
    /// With `network = "egress"`: the job's network namespace (see [`super::net`]), joined
    /// instead of a new, loopback-only one.
    pub netns: Option<&'a Path>,
    /// Whether the memory controller accounts swap (cgroup v1 `memsw` or v2); without it
    /// runc refuses a swap limit.
    pub swap_limit: bool,
}

/// Capabilities of the default Docker/runc set, minus NET_RAW: build code has no use for
/// raw sockets (the network is loopback only, or filtered egress that raw packets could
/// spoof around), and they are a classic attack surface.
const CAPABILITIES: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The runtime spec of a worker: agent as PID 1, network none (or the given egress
/// namespace), default runc hardening.
pub fn build_spec(p: &BundleParams<'_>) -> Result<Spec, OciSpecError> {
    let caps: HashSet<Capability> = CAPABILITIES.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        // Inheritable and ambient stay empty, as in runc since CVE-2022-29162.
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(vec![
            AGENT_PATH.to_string(),
            "--connect".to_string(),
            format!("unix:{AGENT_SOCKET_DIR}/agent.sock"),
        ])
        .env(vec![
            format!("SLATE_AGENT_TOKEN={}", p.token.expose()),
            PATH_ENV.to_string(),
        ])
        .cwd("/")
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()?;

    let mut mounts: Vec<Mount> = get_default_mounts()
        .into_iter()
        // No view of the host's cgroup tree: the agent has no use for it.
        .filter(|m| m.destination() != Path::new("/sys/fs/cgroup"))
        .collect();
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(opts(&["nosuid", "nodev", "mode=1777"]))
            .build()?,
    );
    mounts.push(bind(
        AGENT_PATH,
        p.agent_binary,
        &["bind", "ro", "nosuid", "nodev"],
    )?);
    mounts.push(bind(
        AGENT_SOCKET_DIR,
        p.socket_dir,
        &["bind", "nosuid", "nodev", "noexec"],
    )?);
    mounts.push(bind(
        WORKSPACE_DIR,
        p.workspace,
        &["rbind", "nosuid", "nodev"],
    )?);
    for m in p.mounts {
        let mut o = vec!["rbind", "nosuid", "nodev"];
        if m.read_only {
            o.push("ro");
        }
        mounts.push(bind(&m.target, &m.host_path, &o)?);
    }

    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .chain(std::iter::once(match p.netns {
        // Made and filtered by slate before the container starts: network `egress`.
        Some(path) => LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(path)
            .build(),
        // A fresh network namespace holds only loopback: network `none`.
        None => LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .build(),
    }))
    .collect::<Result<Vec<_>, _>>()?;

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        // Deny every device first: runc then allows only its default set (null, zero,
        // full, tty, random, urandom, pts); without this rule v1 inherits "allow all".
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
    ]);
    if let Some(bytes) = p.limits.memory_bytes {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let mut memory = LinuxMemoryBuilder::default().limit(bytes);
        if p.swap_limit {
            // memory+swap = memory: no swap at all.
            memory = memory.swap(bytes);
        }
        resources = resources.memory(memory.build()?);
    }
    if let Some(pids) = p.limits.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::try_from(pids).unwrap_or(i64::MAX))
                .build()?,
        );
    }
    if let Some(cpus) = p.limits.cpus {
        let quota = (cpus * CPU_PERIOD_US as f64).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(format!("/{}/{}", p.cgroup_parent, p.name)))
        .resources(resources.build()?)
        .masked_paths(get_default_maskedpaths())
        .readonly_paths(get_default_readonly_paths())
        .build()?;

    SpecBuilder::default()
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path(p.rootfs)
                .readonly(false)
                .build()?,
        )
        .hostname(p.name)
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
}

fn opts(o: &[&str]) -> Vec<String> {
    o.iter().map(|s| s.to_string()).collect()
}

fn bind(destination: &str, source: &Path, options: &[&str]) -> Result<Mount, OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(opts(options))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(limits: Limits) -> serde_json::Value {
        spec_with(limits, None)
    }

    fn spec_with(limits: Limits, netns: Option<&Path>) -> serde_json::Value {
        let token = Secret::new("tok");
        let s = build_spec(&BundleParams {
            name: "slate-9",
            cgroup_parent: "slate/abc",
            rootfs: Path::new("/jobs/slate-9/rootfs"),
            agent_binary: Path::new("/usr/lib/slate/slate-agent"),
            socket_dir: Path::new("/run/slate-server/9"),
            workspace: Path::new("/jobs/slate-9/workspace"),
            mounts: &[],
            token: &token,
            limits: &limits,
            swap_limit: true,
            netns,
        })
        .unwrap();
        serde_json::to_value(&s).unwrap()
    }

    #[test]
    fn spec_has_agent_limits_and_no_network() {
        let v = spec(Limits {
            memory_bytes: Some(512 << 20),
            pids: Some(100),
            cpus: Some(1.5),
            timeout: Duration::from_secs(60),
            disk_bytes: None,
        });
        assert_eq!(v["process"]["args"][0], AGENT_PATH);
        assert_eq!(v["process"]["env"][0], "SLATE_AGENT_TOKEN=tok");
        assert_eq!(v["process"]["env"].as_array().unwrap().len(), 2);
        assert_eq!(v["hostname"], "slate-9");
        assert_eq!(v["linux"]["cgroupsPath"], "/slate/abc/slate-9");
        let r = &v["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 512 << 20);
        assert_eq!(r["memory"]["swap"], 512 << 20);
        assert_eq!(r["pids"]["limit"], 100);
        assert_eq!(r["cpu"]["quota"], 150_000);
        assert_eq!(r["devices"][0]["allow"], false);
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid") && ns.contains(&"mount"));
        let dests: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for d in [
            "/proc",
            "/dev",
            "/tmp",
            AGENT_PATH,
            AGENT_SOCKET_DIR,
            WORKSPACE_DIR,
        ] {
            assert!(dests.contains(&d), "missing mount {d}: {dests:?}");
        }
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), 13);
        for denied in [
            "CAP_SYS_ADMIN",
            "CAP_NET_RAW",
            "CAP_SYS_MODULE",
            "CAP_SYS_PTRACE",
        ] {
            assert!(!caps.iter().any(|c| c == denied), "{denied} granted");
        }
    }

    #[test]
    fn egress_joins_the_given_network_namespace() {
        let limits = Limits {
            memory_bytes: None,
            pids: None,
            cpus: None,
            timeout: Duration::from_secs(60),
            disk_bytes: None,
        };
        let v = spec_with(limits, Some(Path::new("/jobs/slate-9/netns")));
        let net: Vec<&serde_json::Value> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] == "network")
            .collect();
        assert_eq!(net.len(), 1);
        assert_eq!(net[0]["path"], "/jobs/slate-9/netns");
    }

    #[test]
    fn spec_without_limits_has_no_resource_limits() {
        let v = spec(Limits {
            memory_bytes: None,
            pids: None,
            cpus: None,
            timeout: Duration::from_secs(60),
            disk_bytes: None,
        });
        let r = &v["linux"]["resources"];
        assert!(r.get("memory").is_none() && r.get("pids").is_none() && r.get("cpu").is_none());
    }
}
