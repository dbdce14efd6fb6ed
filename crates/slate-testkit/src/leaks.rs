//! Leak checks for sandbox workers: mounts, loop devices, cgroups, runc containers, processes, directories, egress veths and nftables chains.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Describes everything a sandbox provider rooted at `root` left behind: mounts under
/// `root`, loop devices (`losetup -a`) backed by a file under `root`, cgroups `/sys/fs/cgroup/*/<cgroup_scope(root)>/slate-*`, containers in `<root>/.runc`,
/// processes in such a cgroup or whose command line mentions `root`, and
/// `slate-*` entries in `root`, egress veths `slv*` marked with the root's scope (and, for
/// the given names, any `slv<id>`), and chains or map entries of that scope in nftables'
/// `inet slate` (its namespaces are mounts under `root`, covered above). Empty means clean.
///
/// The cgroup and process checks are host-wide: another test suite running sandboxes at
/// the same time shows up here. Tests that can run next to others use [`slate_leaks_of`].
pub fn slate_leaks(root: &Path) -> Vec<String> {
    leaks(root, None)
}

/// Like [`slate_leaks`], but the host-wide checks (cgroups, processes in cgroups) only
/// look for the workers `names`; the checks scoped to `root` stay complete.
pub fn slate_leaks_of(root: &Path, names: &[String]) -> Vec<String> {
    leaks(root, Some(names))
}

fn leaks(root: &Path, names: Option<&[String]>) -> Vec<String> {
    let mut out = Vec::new();
    let roots = root_forms(root);
    let wanted = |name: &str| -> bool {
        name.starts_with("slate-") && names.is_none_or(|n| n.iter().any(|w| w == name))
    };

    for mount_point in mount_points() {
        if roots.iter().any(|r| mount_point.starts_with(r)) {
            out.push(format!("mount at {}", mount_point.display()));
        }
    }

    for (device, backing) in loop_devices() {
        if roots.iter().any(|r| backing.starts_with(r)) {
            out.push(format!("loop device {device} on {}", backing.display()));
        }
    }

    let scope = cgroup_scope(root);
    if let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") {
        for controller in controllers.flatten() {
            let Ok(groups) = fs::read_dir(controller.path().join(&scope)) else {
                continue;
            };
            // With every worker gone, the scope itself must be gone too.
            if names.is_none() {
                out.push(format!(
                    "cgroup scope {}",
                    controller.path().join(&scope).display()
                ));
            }
            for group in groups.flatten() {
                let name = group.file_name().to_string_lossy().into_owned();
                if group.path().is_dir() && wanted(&name) {
                    out.push(format!("cgroup {}", group.path().display()));
                }
            }
        }
    }

    let runc_root = root.join(".runc");
    if runc_root.exists() {
        match Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
        {
            Ok(o) if o.status.success() => {
                for name in String::from_utf8_lossy(&o.stdout).lines() {
                    if !name.trim().is_empty() {
                        out.push(format!(
                            "runc container {} in {}",
                            name.trim(),
                            runc_root.display()
                        ));
                    }
                }
            }
            Ok(o) => out.push(format!(
                "runc list in {} failed: {}",
                runc_root.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => out.push(format!("runc list in {} failed: {e}", runc_root.display())),
        }
    }

    let me = std::process::id().to_string();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let cmdline = fs::read(p.path().join("cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            let cgroup = fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
            let in_slate_cgroup = cgroup.lines().any(|line| {
                let path = line.splitn(3, ':').nth(2).unwrap_or("");
                path.split(&format!("/{scope}/"))
                    .skip(1)
                    .any(|rest| wanted(rest.split('/').next().unwrap_or("")))
            });
            let mentions_root = roots
                .iter()
                .any(|r| cmdline.contains(r.to_string_lossy().as_ref()));
            if in_slate_cgroup || mentions_root {
                out.push(format!("process {pid} `{cmdline}`"));
            }
        }
    }

    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("slate-") {
                out.push(format!("entry {}", e.path().display()));
            }
        }
    }
    out.extend(net_leaks(&scope, names));
    out
}

/// Egress leftovers of the scope `slate/<hash>`: veths and nftables chains and elements.
fn net_leaks(scope: &str, names: Option<&[String]>) -> Vec<String> {
    let mut out = Vec::new();
    let wanted = |name: &str| -> bool {
        name.starts_with("slate-") && names.is_none_or(|n| n.iter().any(|w| w == name))
    };
    // With names given, a wanted id's veth or element is reported whoever marked it:
    // the tests' ids are unique on the host.
    let named = |worker: &str| names.is_some_and(|n| n.iter().any(|w| w == worker));
    let owner_prefix = format!("{scope}/");
    // `slv<id>` ↔ `slate-<id>`.
    let worker_of = |veth: &str| veth.strip_prefix("slv").map(|id| format!("slate-{id}"));
    if let Ok(links) = fs::read_dir("/sys/class/net") {
        for l in links.flatten() {
            let ifname = l.file_name().to_string_lossy().into_owned();
            let Some(worker) = worker_of(&ifname) else {
                continue;
            };
            let alias = fs::read_to_string(l.path().join("ifalias")).unwrap_or_default();
            let alias = alias.trim();
            let ours = alias.starts_with(&owner_prefix);
            if (ours && wanted(alias.rsplit('/').next().unwrap_or(""))) || named(&worker) {
                out.push(format!("veth {ifname} (alias {alias:?})"));
            }
        }
    }
    let hash = scope.rsplit('/').next().unwrap_or(scope);
    let Ok(o) = Command::new("nft")
        .args(["-j", "list", "table", "inet", "slate"])
        .output()
    else {
        return out;
    };
    if !o.status.success() {
        return out;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let ours = |chain: &str| -> bool {
        ["in_", "fwd_"].iter().any(|k| {
            chain
                .strip_prefix(k)
                .and_then(|rest| rest.strip_prefix(hash))
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|id| wanted(&format!("slate-{id}")))
        })
    };
    let mut job_chains = 0;
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(chain) = item["chain"]["name"].as_str() {
            if chain.starts_with("in_") || chain.starts_with("fwd_") {
                job_chains += 1;
            }
            if ours(chain) {
                out.push(format!("nft chain inet slate {chain}"));
            }
        }
        let map = &item["map"];
        for el in map["elem"].as_array().into_iter().flatten() {
            let key = el[0].as_str().unwrap_or_default();
            let target = el[1]["jump"]["target"].as_str().unwrap_or_default();
            if ours(target) || worker_of(key).is_some_and(|w| named(&w)) {
                out.push(format!(
                    "nft element {key} -> {target} in inet slate {}",
                    map["name"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    // The last job of every slate on the host takes the table with it.
    if job_chains == 0 {
        out.push("nft table inet slate with no job left".to_string());
    }
    out
}

/// Attached loop devices and their backing files, as `losetup -a` reports them
/// (`/dev/loop0: [2049]:1234 (/path/to/file)`); sysfs when losetup is missing.
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    if let Ok(o) = Command::new("losetup").arg("-a").output() {
        if o.status.success() {
            return String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| {
                    let (dev, rest) = l.split_once(':')?;
                    let open = rest.find('(')?;
                    let close = rest.rfind(')')?;
                    let file = rest.get(open + 1..close)?;
                    let file = file.strip_suffix(" (deleted)").unwrap_or(file);
                    Some((dev.to_string(), PathBuf::from(file)))
                })
                .collect();
        }
    }
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some((
                format!("/dev/{}", e.file_name().to_string_lossy()),
                PathBuf::from(backing.trim_end()),
            ))
        })
        .collect()
}

/// `root` as given and canonicalized: mountinfo shows resolved paths.
fn root_forms(root: &Path) -> Vec<PathBuf> {
    let mut forms = vec![root.to_path_buf()];
    if let Ok(c) = root.canonicalize() {
        if c != root {
            forms.push(c);
        }
    }
    forms
}

/// Mount points of this process's mount namespace, unescaped.
pub fn mount_points() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup directory of the workers under `root`; must match
/// `slate_provider::sandbox::cgroup_scope` (copied: testkit cannot depend on the provider,
/// which dev-depends on testkit).
pub fn cgroup_scope(root: &Path) -> String {
    let resolved = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in resolved.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("slate/{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_octal(r"/a\040b"), "/a b");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/end\"), r"/end\");
    }

    #[test]
    fn empty_root_is_clean_and_leftover_dir_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(slate_leaks_of(dir.path(), &[]).is_empty());
        fs::create_dir(dir.path().join("slate-7")).unwrap();
        let found = slate_leaks_of(dir.path(), &[]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("slate-7"));
    }
}
