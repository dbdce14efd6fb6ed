//! Planners: from a change and its changed files to the jobs a build needs.

use crate::config::PipelineConfig;
use globset::{Glob, GlobSetBuilder};

/// What the planner decided for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// One job per listed pool, in pipeline order.
    Jobs(Vec<String>),
    /// The path filters matched no changed file: nothing to build.
    Skip { reason: String },
}

/// The default planner: one job per pool of the pipeline, unless the pipeline's `paths`
/// filters match none of the changed files. `changed` of `None` means the file list is
/// unknown (e.g. a branch with no base): always build.
pub fn plan_pools(pipeline: &PipelineConfig, changed: Option<&[String]>) -> Plan {
    if let (false, Some(files)) = (pipeline.paths.is_empty(), changed) {
        let mut b = GlobSetBuilder::new();
        for p in &pipeline.paths {
            // Validated at config load; an invalid glob here matches nothing.
            if let Ok(g) = Glob::new(p) {
                b.add(g);
            }
        }
        let set = b
            .build()
            .unwrap_or_else(|_| GlobSetBuilder::new().build().unwrap());
        if !files.iter().any(|f| set.is_match(f)) {
            return Plan::Skip {
                reason: format!(
                    "no changed file matches paths {:?} ({} files changed)",
                    pipeline.paths,
                    files.len()
                ),
            };
        }
    }
    Plan::Jobs(pipeline.pools.clone())
}

/// One target printed by a pipeline's plan step: a job per pool is made for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanTarget {
    pub name: String,
    #[serde(default)]
    pub vars: std::collections::BTreeMap<String, String>,
}

/// A line of plan output that is not a usable target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan output line {line} is malformed ({reason}): {text}")]
pub struct PlanOutputError {
    pub line: usize,
    pub reason: String,
    /// The offending line (cut at 200 characters).
    pub text: String,
}

/// Most targets one plan step may print.
pub const MAX_PLAN_TARGETS: usize = 1000;

/// Parses a plan step's stdout: one JSON object a line, `{"name": "...", "vars": {...}}`,
/// blank lines ignored. Target names and variable values come from the change under test
/// (e.g. subports of a PR's Portfile) and are substituted into step commands, so both must
/// be plain words (`[A-Za-z0-9._+-]`, plus `/:=@,%~` in values, not starting with `-`);
/// variable names are `[A-Za-z0-9_]+`. `plan` is the planning jobs' own target name.
pub fn parse_plan_output(text: &str) -> Result<Vec<PlanTarget>, PlanOutputError> {
    let mut out: Vec<PlanTarget> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let fail = |reason: String| {
            let mut text: String = line.chars().take(200).collect();
            if line.chars().count() > 200 {
                text.push_str("...");
            }
            PlanOutputError {
                line: i + 1,
                reason,
                text,
            }
        };
        let t: PlanTarget = serde_json::from_str(line).map_err(|e| fail(e.to_string()))?;
        if !plain_word(&t.name, false) || t.name.len() > 128 || t.name.starts_with('.') {
            return Err(fail(format!(
                "target name {:?} is not a plain name",
                t.name
            )));
        }
        if t.name == crate::domain::PLAN_TARGET {
            return Err(fail("the target name \"plan\" is reserved".into()));
        }
        for (k, v) in &t.vars {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(fail(format!("variable name {k:?} is not [A-Za-z0-9_]+")));
            }
            if !plain_word(v, true) || v.len() > 1024 {
                return Err(fail(format!("value of {k} ({v:?}) is not a plain word")));
            }
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(fail(format!("target {:?} is printed twice", t.name)));
        }
        if out.len() == MAX_PLAN_TARGETS {
            return Err(fail(format!("more than {MAX_PLAN_TARGETS} targets")));
        }
        out.push(t);
    }
    Ok(out)
}

fn plain_word(s: &str, value: bool) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'.' | b'_' | b'+' | b'-')
                || (value && matches!(b, b'/' | b':' | b'=' | b'@' | b',' | b'%' | b'~'))
        })
}

/// Replaces `{name}` in `text` by `vars[name]` for names of `[A-Za-z0-9_]+`; anything
/// else, unknown names included, is left as it is.
pub fn substitute(text: &str, vars: &std::collections::BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let name = &after[..name_len];
        match (after[name_len..].starts_with('}'), vars.get(name)) {
            (true, Some(v)) if name_len > 0 => {
                out.push_str(v);
                rest = &after[name_len + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pipeline(paths: &[&str]) -> PipelineConfig {
        PipelineConfig {
            name: "p".into(),
            pools: vec!["a".into(), "b".into()],
            paths: paths.iter().map(|s| s.to_string()).collect(),
            steps: vec![],
            env: BTreeMap::new(),
            planner: crate::config::PlannerKind::Pools,
            portgroup_limit: 50,
            plan: None,
        }
    }

    fn files(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn table() {
        // (paths filter, changed files, whether a build is needed)
        type Case<'a> = (&'a [&'a str], Option<&'a [&'a str]>, bool);
        let cases: &[Case] = &[
            (&[], Some(&["README.md"]), true),
            (&["src/**"], Some(&["src/main.rs"]), true),
            (&["src/**"], Some(&["docs/x.md"]), false),
            (&["src/**"], Some(&[]), false),
            (&["src/**", "Cargo.toml"], Some(&["Cargo.toml"]), true),
            (&["src/**"], None, true),
            (&["*.md"], Some(&["a/b.md"]), true),
        ];
        for (paths, changed, builds) in cases {
            let f = changed.map(files);
            let plan = plan_pools(&pipeline(paths), f.as_deref());
            assert_eq!(
                matches!(plan, Plan::Jobs(_)),
                *builds,
                "{paths:?} {changed:?}"
            );
        }
    }

    #[test]
    fn jobs_in_pipeline_order() {
        assert_eq!(
            plan_pools(&pipeline(&[]), None),
            Plan::Jobs(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn substitution_table() {
        let vars: BTreeMap<String, String> = [("port", "py-bar"), ("v_2", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (input, want) in [
            ("mpbb install-port {port}", "mpbb install-port py-bar"),
            ("{port}{port}", "py-barpy-bar"),
            ("{v_2}/{port}", "x/py-bar"),
            ("{unknown} {port", "{unknown} {port"),
            ("awk '{print $1}' {}", "awk '{print $1}' {}"),
            ("{{port}}", "{py-bar}"),
            ("${port}", "$py-bar"),
            ("no braces", "no braces"),
            ("{ port}", "{ port}"),
        ] {
            assert_eq!(substitute(input, &vars), want, "{input}");
        }
    }

    #[test]
    fn plan_output_table() {
        let ok = parse_plan_output(
            "{\"name\": \"py312-bar\", \"vars\": {\"port\": \"py312-bar\"}}\n\n{\"name\":\"b\"}\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].name, "py312-bar");
        assert_eq!(ok[0].vars["port"], "py312-bar");
        assert!(ok[1].vars.is_empty());
        assert_eq!(parse_plan_output("").unwrap(), vec![]);
        // (output, line reported, reason contains)
        let bad: &[(&str, usize, &str)] = &[
            ("not json", 1, "expected"),
            ("{\"name\":\"a\"}\n{\"nam\":\"b\"}", 2, "unknown field"),
            ("{\"name\":\"$(rm -rf /)\"}", 1, "plain name"),
            ("{\"name\":\"-rf\"}", 1, "plain name"),
            ("{\"name\":\"plan\"}", 1, "reserved"),
            (
                "{\"name\":\"a\",\"vars\":{\"p-x\":\"1\"}}",
                1,
                "variable name",
            ),
            ("{\"name\":\"a\",\"vars\":{\"p\":\"a b\"}}", 1, "plain word"),
            (
                "{\"name\":\"a\",\"vars\":{\"p\":\"`id`\"}}",
                1,
                "plain word",
            ),
            ("{\"name\":\"a\"}\n{\"name\":\"a\"}", 2, "twice"),
            ("{\"name\":\"a\",\"vars\":{\"p\":1}}", 1, "invalid type"),
        ];
        for (text, line, reason) in bad {
            let e = parse_plan_output(text).unwrap_err();
            assert_eq!(e.line, *line, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
            assert!(
                e.to_string().contains(text.lines().nth(line - 1).unwrap()),
                "{e}"
            );
        }
    }
}
