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
}
