//! The `macports` planner: which ports of a macports-ports change need a build. Pure.
//!
//! The base rule is MacPorts' own PR CI (`.github/workflows/main.yml` in macports-ports):
//!
//! ```text
//! git diff --name-only --diff-filter=AM base...head \
//!   | grep -E '^[^._/][^/]*/[^/]+/(Portfile$|files/)' | cut -d/ -f2 | sort -u
//! ```
//!
//! i.e. the directory name of every port whose `Portfile`, or anything under its `files/`,
//! was added or modified. Differences, all deliberate:
//! - renames and copies count for their new path (with rename detection on, git reports a
//!   moved port as `R`, which `--diff-filter=AM` silently drops); a type change (`T`, e.g.
//!   a patch replaced by a symlink) counts like a modification;
//! - a change to a PortGroup (`_resources/port1.0/group/NAME-VERSION.tcl`) selects the
//!   ports whose Portfile says `PortGroup NAME VERSION`, up to a limit;
//! - [`plan`] drops port names that are not plain MacPorts names (`[A-Za-z0-9._+-]`), since
//!   the name is substituted into the operator's step commands.
//!
//! Like MacPorts' CI, the port name is the directory name (`cut -d/ -f2`), not the
//! `name` in the Portfile; subports are expanded later, on a worker (`mpbb list-subports`).

use std::collections::BTreeSet;

/// How a file changed between base and head (`git diff --name-status -M`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeStatus {
    Added,
    Modified,
    Deleted,
    /// `R<score>`: moved from `from` (the change's `path` is the new path).
    Renamed {
        from: String,
    },
    /// `C<score>`: copied from `from`, which still exists.
    Copied {
        from: String,
    },
    /// `T`: the kind of file changed (regular file, symlink, submodule).
    TypeChanged,
}

/// One line of `git diff --name-status` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub status: ChangeStatus,
    /// Repository-relative path after the change (for a rename or copy, the new path).
    pub path: String,
}

impl FileChange {
    /// Whether the file exists at head with new content: what MacPorts' `--diff-filter=AM`
    /// means, extended to renames, copies and type changes.
    pub fn is_present_at_head(&self) -> bool {
        !matches!(self.status, ChangeStatus::Deleted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameStatusError {
    #[error("line {line}: unknown change status {status:?}")]
    UnknownStatus { line: usize, status: String },
    #[error("line {line}: status {status} needs {expected} path(s), found {found}")]
    Fields {
        line: usize,
        status: String,
        expected: usize,
        found: usize,
    },
    #[error("line {line}: malformed quoted path: {reason}")]
    Quoting { line: usize, reason: String },
}

/// Parses the output of `git diff --name-status -M base...head` (not `-z`): one change a
/// line, `STATUS<TAB>PATH` or, for renames and copies, `R100<TAB>OLD<TAB>NEW`. Paths git
/// had to quote (`"caf\303\251/Portfile"`, with `core.quotePath`) are unquoted; bytes that
/// are not UTF-8 become U+FFFD. Empty lines are skipped.
pub fn parse_name_status(text: &str) -> Result<Vec<FileChange>, NameStatusError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let mut fields = raw.split('\t');
        let status = fields.next().unwrap_or_default().trim();
        let paths: Vec<String> = fields
            .map(|f| unquote(f).map_err(|reason| NameStatusError::Quoting { line, reason }))
            .collect::<Result<_, _>>()?;
        let letter = status.chars().next().unwrap_or(' ');
        // R and C always carry a similarity score; M may carry one (with -B).
        let score = &status[letter.len_utf8().min(status.len())..];
        let score_ok = score.bytes().all(|b| b.is_ascii_digit())
            && match letter {
                'R' | 'C' => !score.is_empty(),
                'M' => true,
                _ => score.is_empty(),
            };
        let unknown = || NameStatusError::UnknownStatus {
            line,
            status: status.to_string(),
        };
        if !score_ok {
            return Err(unknown());
        }
        let expected = if matches!(letter, 'R' | 'C') { 2 } else { 1 };
        if paths.len() != expected {
            return Err(NameStatusError::Fields {
                line,
                status: status.to_string(),
                expected,
                found: paths.len(),
            });
        }
        let mut paths = paths.into_iter();
        let first = paths.next().unwrap_or_default();
        let (status, path) = match letter {
            'A' => (ChangeStatus::Added, first),
            'M' => (ChangeStatus::Modified, first),
            'D' => (ChangeStatus::Deleted, first),
            'T' => (ChangeStatus::TypeChanged, first),
            'R' => (
                ChangeStatus::Renamed { from: first },
                paths.next().unwrap_or_default(),
            ),
            'C' => (
                ChangeStatus::Copied { from: first },
                paths.next().unwrap_or_default(),
            ),
            // U (unmerged) and X (unknown) never appear in a diff of two commits.
            _ => return Err(unknown()),
        };
        out.push(FileChange { status, path });
    }
    Ok(out)
}

/// Undoes git's C-style quoting (`quote_c_style`): a field that starts with `"` has
/// `\a \b \t \n \v \f \r \" \\` and three-digit octal escapes of raw bytes.
fn unquote(field: &str) -> Result<String, String> {
    let Some(body) = field.strip_prefix('"') else {
        return Ok(field.to_string());
    };
    let body = body
        .strip_suffix('"')
        .ok_or_else(|| format!("no closing quote in {field:?}"))?;
    let mut bytes = Vec::with_capacity(body.len());
    let mut it = body.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        let e = it
            .next()
            .ok_or_else(|| format!("trailing backslash in {field:?}"))?;
        bytes.push(match e {
            b'a' => 0x07,
            b'b' => 0x08,
            b't' => b'\t',
            b'n' => b'\n',
            b'v' => 0x0b,
            b'f' => 0x0c,
            b'r' => b'\r',
            b'"' => b'"',
            b'\\' => b'\\',
            b'0'..=b'3' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match it.next() {
                        Some(d @ b'0'..=b'7') => v = v * 8 + u32::from(d - b'0'),
                        _ => return Err(format!("short octal escape in {field:?}")),
                    }
                }
                v as u8
            }
            other => {
                return Err(format!(
                    "unknown escape \\{} in {field:?}",
                    char::from(other)
                ))
            }
        });
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The port directory name of `path` under MacPorts' rule
/// `^[^._/][^/]*/[^/]+/(Portfile$|files/)`: `Some("libuv")` for `devel/libuv/Portfile`
/// or `net/curl/files/patches/x.diff`; `None` for anything else (`_resources/…`,
/// `.github/…`, `README.md`, `devel/libuv/sub/Portfile`).
pub fn port_of_path(path: &str) -> Option<&str> {
    let mut parts = path.splitn(3, '/');
    let category = parts.next()?;
    let port = parts.next()?;
    let rest = parts.next()?;
    let first = category.bytes().next()?;
    if matches!(first, b'.' | b'_') || port.is_empty() {
        return None;
    }
    (rest == "Portfile" || rest.starts_with("files/")).then_some(port)
}

/// MacPorts CI's changed ports: directory names of ports whose Portfile or `files/` was
/// added, modified, renamed or copied into place, or changed type. Deletions are skipped.
/// Sorted, unique.
pub fn changed_ports(changes: &[FileChange]) -> Vec<String> {
    changes
        .iter()
        .filter(|c| c.is_present_at_head())
        .filter_map(|c| port_of_path(&c.path))
        .map(str::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Where MacPorts keeps PortGroups.
pub const PORTGROUP_DIR: &str = "_resources/port1.0/group/";

/// `(name, version)` of a PortGroup file path (`_resources/port1.0/group/NAME-VERSION.tcl`,
/// e.g. `("active_variants", "1.1")`); `None` for other paths. The version is the part
/// after the last `-`, digits and dots.
pub fn portgroup_of_path(path: &str) -> Option<(String, String)> {
    let file = path.strip_prefix(PORTGROUP_DIR)?.strip_suffix(".tcl")?;
    if file.contains('/') {
        return None;
    }
    let (name, version) = file.rsplit_once('-')?;
    let version_ok = !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && version.bytes().next().is_some_and(|b| b.is_ascii_digit());
    (version_ok && !name.is_empty()).then(|| (name.to_string(), version.to_string()))
}

/// The PortGroups a change touches, sorted and unique. Unlike ports, every side of a
/// change counts: a deleted or renamed-away PortGroup breaks exactly the ports that still
/// use it, so those are the ones to build.
pub fn changed_portgroups(changes: &[FileChange]) -> Vec<(String, String)> {
    let mut groups = BTreeSet::new();
    for c in changes {
        let from = match &c.status {
            ChangeStatus::Renamed { from } => Some(from.as_str()),
            _ => None,
        };
        for p in std::iter::once(c.path.as_str()).chain(from) {
            if let Some(g) = portgroup_of_path(p) {
                groups.insert(g);
            }
        }
    }
    groups.into_iter().collect()
}

/// The `PortGroup NAME VERSION` commands of a Portfile, in order. Tolerates any
/// whitespace, indentation (groups inside `if {…} {…}` blocks count), `;`-separated
/// commands, trailing `# comments` and backslash-continued lines; comment lines are
/// ignored.
pub fn portgroups_used(portfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut logical = String::new();
    for line in portfile.lines() {
        if let Some(cont) = line.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        for command in logical.split(';') {
            let mut words = command.split_whitespace();
            if words.next() != Some("PortGroup") {
                continue;
            }
            let strip = |w: &str| w.trim_matches(|c| matches!(c, '"' | '{' | '}')).to_string();
            if let (Some(name), Some(version)) = (words.next(), words.next()) {
                if !name.starts_with('#') && !version.starts_with('#') {
                    out.push((strip(name), strip(version)));
                }
            }
        }
        logical.clear();
    }
    out
}

/// Ports selected through changed PortGroups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortgroupSelection {
    /// Sorted, unique, at most `limit`.
    pub ports: Vec<String>,
    /// More ports use the changed groups than `limit`; `ports` is the first `limit` by name.
    pub truncated: bool,
    /// How many ports use the changed groups in all (before the limit).
    pub total: usize,
    /// The changed groups, `(name, version)`.
    pub groups: Vec<(String, String)>,
}

/// Selects the ports whose Portfile uses a PortGroup the change touches. `portfiles`
/// yields `(port path, Portfile text)` for the head tree; the port path is
/// `category/port` or `category/port/Portfile` (anything else is ignored). It is not
/// consumed at all when no PortGroup changed, so a caller may read Portfiles lazily.
pub fn portgroup_users<I, P, T>(
    changes: &[FileChange],
    portfiles: I,
    limit: usize,
) -> PortgroupSelection
where
    I: IntoIterator<Item = (P, T)>,
    P: AsRef<str>,
    T: AsRef<str>,
{
    let groups = changed_portgroups(changes);
    if groups.is_empty() {
        return PortgroupSelection::default();
    }
    let mut users = BTreeSet::new();
    for (path, text) in portfiles {
        let Some(port) = port_of_dir(path.as_ref()) else {
            continue;
        };
        if portgroups_used(text.as_ref())
            .iter()
            .any(|g| groups.contains(g))
        {
            users.insert(port.to_string());
        }
    }
    let total = users.len();
    PortgroupSelection {
        ports: users.into_iter().take(limit).collect(),
        truncated: total > limit,
        total,
        groups,
    }
}

/// `category/port` or `category/port/Portfile` → `port`, with the same category rule as
/// [`port_of_path`].
fn port_of_dir(path: &str) -> Option<&str> {
    let dir = path.strip_suffix("/Portfile").unwrap_or(path);
    let dir = dir.strip_suffix('/').unwrap_or(dir);
    let (category, port) = dir.split_once('/')?;
    let first = category.bytes().next()?;
    let ok = !matches!(first, b'.' | b'_') && !port.is_empty() && !port.contains('/');
    ok.then_some(port)
}

/// Whether `name` is a plain MacPorts port name, safe to substitute into a command:
/// ASCII letters, digits, `.`, `_`, `+`, `-`, not starting with `-` or `.`.
pub fn is_plain_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// What the `macports` planner decided for a change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MacportsPlan {
    /// Ports to build, sorted and unique: the changed ports plus PortGroup users.
    pub ports: Vec<String>,
    /// The PortGroup limit cut the list of users.
    pub truncated_by_limit: bool,
    /// One line for a commit status / check description (kept under 140 characters).
    pub note: String,
    /// Ports whose own files changed.
    pub changed: Vec<String>,
    /// The PortGroup part of the plan.
    pub portgroups: PortgroupSelection,
    /// Directory names refused because they are not plain port names.
    pub refused: Vec<String>,
}

/// The whole planner: [`changed_ports`] plus [`portgroup_users`] (at most `limit` of
/// them; the changed ports themselves are never cut), minus names that are not plain.
pub fn plan<I, P, T>(changes: &[FileChange], portfiles: I, limit: usize) -> MacportsPlan
where
    I: IntoIterator<Item = (P, T)>,
    P: AsRef<str>,
    T: AsRef<str>,
{
    let changed = changed_ports(changes);
    let portgroups = portgroup_users(changes, portfiles, limit);
    let mut ports = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for p in changed.iter().chain(&portgroups.ports) {
        if is_plain_port_name(p) {
            ports.insert(p.clone());
        } else {
            refused.insert(p.clone());
        }
    }
    let ports: Vec<String> = ports.into_iter().collect();
    let refused: Vec<String> = refused.into_iter().collect();

    let mut parts = Vec::new();
    if ports.is_empty() {
        parts.push("no port changed".to_string());
    } else {
        parts.push(format!(
            "{} port{}",
            ports.len(),
            if ports.len() == 1 { "" } else { "s" }
        ));
    }
    if !portgroups.groups.is_empty() {
        let names: Vec<String> = portgroups
            .groups
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        let mut s = format!(
            "PortGroup {} used by {}",
            names.join(", "),
            portgroups.total
        );
        if portgroups.truncated {
            s.push_str(&format!(", limit {limit}: building the first {limit}"));
        }
        parts.push(s);
    }
    if !refused.is_empty() {
        parts.push(format!("{} odd port name(s) skipped", refused.len()));
    }
    let mut note = parts.join("; ");
    if note.len() > 140 {
        let mut cut = 137;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }

    MacportsPlan {
        ports,
        truncated_by_limit: portgroups.truncated,
        note,
        changed,
        portgroups,
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(status: ChangeStatus, path: &str) -> FileChange {
        FileChange {
            status,
            path: path.to_string(),
        }
    }
    fn a(p: &str) -> FileChange {
        ch(ChangeStatus::Added, p)
    }
    fn m(p: &str) -> FileChange {
        ch(ChangeStatus::Modified, p)
    }
    fn d(p: &str) -> FileChange {
        ch(ChangeStatus::Deleted, p)
    }
    fn r(from: &str, to: &str) -> FileChange {
        ch(
            ChangeStatus::Renamed {
                from: from.to_string(),
            },
            to,
        )
    }

    #[test]
    fn name_status_parsing() {
        let text = "M\tdevel/libuv/Portfile\n\
                    A\tpython/py-numpy/files/patch-setup.py.diff\n\
                    D\tgraphics/gimp2/Portfile\n\
                    R100\tdevel/foo/Portfile\tdevel/foo2/Portfile\n\
                    R087\tnet/curl/files/a.diff\tnet/curl/files/patches/b.diff\n\
                    C075\tdevel/foo/files/x\tdevel/bar/files/x\n\
                    T\tlang/ruby/files/link\n\
                    M072\t_resources/port1.0/group/python-1.0.tcl\n\
                    \n\
                    M\t\"devel/caf\\303\\251/Portfile\"\n\
                    A\t\"sysutils/tab\\there/files/q\\\"uote\\\\d\"\n\
                    A\tpath with spaces/p/Portfile\r\n";
        let got = parse_name_status(text).unwrap();
        let want = vec![
            m("devel/libuv/Portfile"),
            a("python/py-numpy/files/patch-setup.py.diff"),
            d("graphics/gimp2/Portfile"),
            r("devel/foo/Portfile", "devel/foo2/Portfile"),
            r("net/curl/files/a.diff", "net/curl/files/patches/b.diff"),
            ch(
                ChangeStatus::Copied {
                    from: "devel/foo/files/x".into(),
                },
                "devel/bar/files/x",
            ),
            ch(ChangeStatus::TypeChanged, "lang/ruby/files/link"),
            m("_resources/port1.0/group/python-1.0.tcl"),
            m("devel/café/Portfile"),
            a("sysutils/tab\there/files/q\"uote\\d"),
            a("path with spaces/p/Portfile"),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn name_status_errors() {
        let cases: &[(&str, &str)] = &[
            ("Q\tfoo", "line 1: unknown change status \"Q\""),
            ("A\tok\nR\ta\tb", "line 2: unknown change status \"R\""),
            (
                "R100\tonly-one",
                "line 1: status R100 needs 2 path(s), found 1",
            ),
            ("M\ta\tb", "line 1: status M needs 1 path(s), found 2"),
            ("A1\tx", "line 1: unknown change status \"A1\""),
            ("U\tx", "line 1: unknown change status \"U\""),
            (
                "A\t\"open",
                "line 1: malformed quoted path: no closing quote in \"\\\"open\"",
            ),
            (
                "A\t\"bad\\q\"",
                "line 1: malformed quoted path: unknown escape \\q in \"\\\"bad\\\\q\\\"\"",
            ),
            (
                "A\t\"\\30\"",
                "line 1: malformed quoted path: short octal escape in \"\\\"\\\\30\\\"\"",
            ),
        ];
        for (text, want) in cases {
            let e = parse_name_status(text).unwrap_err();
            assert_eq!(e.to_string(), *want, "{text:?}");
        }
    }

    #[test]
    fn port_paths_follow_macports_ci() {
        let cases: &[(&str, Option<&str>)] = &[
            ("devel/libuv/Portfile", Some("libuv")),
            (
                "python/py-numpy/files/patch-setup.py.diff",
                Some("py-numpy"),
            ),
            ("net/curl/files/patches/x/y.diff", Some("curl")),
            ("x/p/Portfile", Some("p")),
            ("devel/libuv/Portfile.orig", None),
            ("devel/libuv/files", None),
            ("devel/libuv/filesystem/x", None),
            ("devel/libuv/sub/Portfile", None),
            ("devel/libuv", None),
            ("devel/Portfile", None),
            ("devel//Portfile", None),
            ("/devel/libuv/Portfile", None),
            ("_resources/port1.0/group/python-1.0.tcl", None),
            ("_ci/bootstrap.sh", None),
            ("_ci/x/Portfile", None),
            (".github/workflows/main.yml", None),
            (".github/x/Portfile", None),
            ("README.md", None),
            ("LICENSE", None),
        ];
        for (path, want) in cases {
            assert_eq!(port_of_path(path), *want, "{path}");
        }
    }

    #[test]
    fn changed_ports_table() {
        type Case<'a> = (&'a str, Vec<FileChange>, &'a [&'a str]);
        let cases: Vec<Case> = vec![
            ("one Portfile", vec![m("devel/libuv/Portfile")], &["libuv"]),
            (
                "patch only",
                vec![a("python/py-numpy/files/patch-setup.py.diff")],
                &["py-numpy"],
            ),
            (
                "nested files",
                vec![m("net/curl/files/patches/x/y.diff")],
                &["curl"],
            ),
            ("deleted port", vec![d("graphics/gimp2/Portfile")], &[]),
            (
                "deleted patch of a kept port is skipped like MacPorts CI",
                vec![d("devel/libuv/files/old.patch")],
                &[],
            ),
            (
                "rename counts for the new path only",
                vec![r("devel/foo/Portfile", "devel/foo2/Portfile")],
                &["foo2"],
            ),
            (
                "rename out of a port dir",
                vec![r("devel/foo/Portfile", "attic/foo.Portfile")],
                &[],
            ),
            (
                "copy and type change count",
                vec![
                    ch(
                        ChangeStatus::Copied {
                            from: "devel/a/Portfile".into(),
                        },
                        "devel/b/Portfile",
                    ),
                    ch(ChangeStatus::TypeChanged, "lang/ruby/files/link"),
                ],
                &["b", "ruby"],
            ),
            (
                "infrastructure only",
                vec![
                    m("_resources/port1.0/group/python-1.0.tcl"),
                    m(".github/workflows/main.yml"),
                    m("_ci/bootstrap.sh"),
                    m("README.md"),
                ],
                &[],
            ),
            (
                "sorted, unique; same name in two categories is one port",
                vec![
                    m("www/nginx/Portfile"),
                    a("www/nginx/files/nginx.conf"),
                    m("devel/libuv/Portfile"),
                    m("python/py-six/Portfile"),
                    m("python-legacy/py-six/Portfile"),
                ],
                &["libuv", "nginx", "py-six"],
            ),
            (
                "deep non-port paths",
                vec![m("devel/libuv/extra/Portfile"), a("Portfile")],
                &[],
            ),
        ];
        for (what, changes, want) in cases {
            assert_eq!(changed_ports(&changes), *want, "{what}");
        }
    }

    #[test]
    fn portgroup_paths() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                "_resources/port1.0/group/python-1.0.tcl",
                Some(("python", "1.0")),
            ),
            (
                "_resources/port1.0/group/active_variants-1.1.tcl",
                Some(("active_variants", "1.1")),
            ),
            (
                "_resources/port1.0/group/compiler_blacklist_versions-1.0.tcl",
                Some(("compiler_blacklist_versions", "1.0")),
            ),
            (
                "_resources/port1.0/group/foo-bar-2.tcl",
                Some(("foo-bar", "2")),
            ),
            ("_resources/port1.0/group/python-1.0.tcl.orig", None),
            ("_resources/port1.0/group/README", None),
            ("_resources/port1.0/group/qt5-x.tcl", None),
            ("_resources/port1.0/group/sub/python-1.0.tcl", None),
            ("_resources/port1.0/group/-1.0.tcl", None),
            ("_resources/port1.0/fetch/x-1.0.tcl", None),
            ("devel/python-1.0.tcl", None),
        ];
        for (path, want) in cases {
            let want = want.map(|(n, v)| (n.to_string(), v.to_string()));
            assert_eq!(portgroup_of_path(path), want, "{path}");
        }
    }

    #[test]
    fn portgroup_lines() {
        let portfile = "\
# -*- coding: utf-8; mode: tcl -*-
PortSystem          1.0
PortGroup           github 1.0
PortGroup\tcmake    1.1 ;# build system
#PortGroup          python 1.0
    # PortGroup     qt5 1.0
if {${os.platform} eq \"darwin\"} {
    PortGroup       legacysupport 1.1
}
PortGroup muniversal 1.0; PortGroup xcodeversion 1.0
PortGroup \\
    app 1.0
name                foo
portgroup           lower 1.0
PortGroupx          bad 1.0
PortGroup           lonely
";
        let want: Vec<(String, String)> = [
            ("github", "1.0"),
            ("cmake", "1.1"),
            ("legacysupport", "1.1"),
            ("muniversal", "1.0"),
            ("xcodeversion", "1.0"),
            ("app", "1.0"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(portgroups_used(portfile), want);
    }

    fn tree() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "python/py-numpy",
                "PortSystem 1.0\nPortGroup python 1.0\nname py-numpy\n",
            ),
            ("python/py-six/Portfile", "PortGroup   python  1.0\n"),
            ("python/py-old", "PortGroup python 0.1\n"),
            (
                "devel/libuv/Portfile",
                "PortGroup github 1.0\nPortGroup cmake 1.1\n",
            ),
            (
                "devel/foo2",
                "# PortGroup python 1.0\nPortGroup github 1.0\n",
            ),
            (
                "science/gnuradio",
                "PortGroup cmake 1.1\nPortGroup python 1.0\n",
            ),
            ("_resources/fake", "PortGroup python 1.0\n"),
            ("lonely", "PortGroup python 1.0\n"),
        ]
    }

    #[test]
    fn portgroup_users_table() {
        type Case<'a> = (&'a str, Vec<FileChange>, usize, &'a [&'a str], bool, usize);
        let cases: Vec<Case> = vec![
            (
                "python group",
                vec![m("_resources/port1.0/group/python-1.0.tcl")],
                10,
                &["gnuradio", "py-numpy", "py-six"],
                false,
                3,
            ),
            (
                "limit keeps the first by name",
                vec![m("_resources/port1.0/group/python-1.0.tcl")],
                2,
                &["gnuradio", "py-numpy"],
                true,
                3,
            ),
            (
                "exactly at the limit is not truncated",
                vec![m("_resources/port1.0/group/python-1.0.tcl")],
                3,
                &["gnuradio", "py-numpy", "py-six"],
                false,
                3,
            ),
            (
                "two groups, union",
                vec![
                    m("_resources/port1.0/group/cmake-1.1.tcl"),
                    m("_resources/port1.0/group/github-1.0.tcl"),
                ],
                10,
                &["foo2", "gnuradio", "libuv"],
                false,
                3,
            ),
            (
                "deleted group selects its remaining users",
                vec![d("_resources/port1.0/group/github-1.0.tcl")],
                10,
                &["foo2", "libuv"],
                false,
                2,
            ),
            (
                "renamed-away group counts its old name",
                vec![r(
                    "_resources/port1.0/group/cmake-1.1.tcl",
                    "_resources/port1.0/group/cmake-1.2.tcl",
                )],
                10,
                &["gnuradio", "libuv"],
                false,
                2,
            ),
            (
                "other version of a group",
                vec![m("_resources/port1.0/group/python-0.1.tcl")],
                10,
                &["py-old"],
                false,
                1,
            ),
            (
                "no group changed",
                vec![m("devel/libuv/Portfile")],
                10,
                &[],
                false,
                0,
            ),
            (
                "limit 0 selects nothing but says so",
                vec![m("_resources/port1.0/group/python-1.0.tcl")],
                0,
                &[],
                true,
                3,
            ),
        ];
        for (what, changes, limit, want, truncated, total) in cases {
            let sel = portgroup_users(&changes, tree(), limit);
            assert_eq!(sel.ports, *want, "{what}");
            assert_eq!(sel.truncated, truncated, "{what}");
            assert_eq!(sel.total, total, "{what}");
        }
    }

    #[test]
    fn portfiles_are_not_read_without_a_group_change() {
        let portfiles = std::iter::from_fn(|| -> Option<(&str, &str)> {
            panic!("read a Portfile although no PortGroup changed")
        });
        let sel = portgroup_users(&[m("devel/libuv/Portfile")], portfiles, 10);
        assert_eq!(sel, PortgroupSelection::default());
    }

    #[test]
    fn plan_merges_and_notes() {
        let changes = parse_name_status(
            "M\tdevel/libuv/Portfile\n\
             A\tpython/py-numpy/files/patch-setup.py.diff\n\
             D\tgraphics/gimp2/Portfile\n\
             R100\tdevel/foo/Portfile\tdevel/foo2/Portfile\n\
             M\t_resources/port1.0/group/python-1.0.tcl\n\
             M\t.github/workflows/main.yml\n\
             M\tREADME.md\n",
        )
        .unwrap();
        let p = plan(&changes, tree(), 2);
        assert_eq!(p.changed, ["foo2", "libuv", "py-numpy"]);
        assert_eq!(p.portgroups.ports, ["gnuradio", "py-numpy"]);
        assert_eq!(p.ports, ["foo2", "gnuradio", "libuv", "py-numpy"]);
        assert!(p.truncated_by_limit);
        assert_eq!(
            p.note,
            "4 ports; PortGroup python 1.0 used by 3, limit 2: building the first 2"
        );

        let p = plan(&[m("README.md")], tree(), 10);
        assert!(p.ports.is_empty());
        assert_eq!(p.note, "no port changed");

        let p = plan(&[m("devel/libuv/Portfile")], tree(), 10);
        assert_eq!(
            (p.ports.as_slice(), p.note.as_str()),
            (&["libuv".to_string()][..], "1 port")
        );
    }

    #[test]
    fn plan_refuses_names_unsafe_for_commands() {
        let changes = vec![
            a("devel/$(touch pwned)/Portfile"),
            a("devel/-rf/Portfile"),
            a("devel/ok+name_1.2/Portfile"),
            a("devel/a b/files/x"),
        ];
        let p = plan(&changes, tree(), 10);
        assert_eq!(p.ports, ["ok+name_1.2"]);
        assert_eq!(p.refused, ["$(touch pwned)", "-rf", "a b"]);
        assert_eq!(p.note, "1 port; 3 odd port name(s) skipped");
    }

    #[test]
    fn long_notes_are_cut() {
        let changes: Vec<FileChange> = (0..40)
            .map(|i| m(&format!("_resources/port1.0/group/group{i}-1.0.tcl")))
            .collect();
        let p = plan(&changes, tree(), 10);
        assert!(p.note.len() <= 140, "{}", p.note);
        assert!(p.note.ends_with("..."));
    }
}
