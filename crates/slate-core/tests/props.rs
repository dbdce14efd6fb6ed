//! Property tests of the config boundary (issue #8, "bad input at every boundary"):
//! `Config::parse` never panics on arbitrary text, on TOML-shaped text made of slate's own
//! tables and keys, nor on real configs with lines dropped, duplicated or cut; every
//! error it returns points at a line ≥ 1 (and a column ≥ 1) and names a key or says
//! something. `parse_duration` and `parse_size` never panic, and round-trip what they
//! print. The same inputs drive `fuzz/fuzz_targets/config_parse.rs`.

use proptest::collection::vec;
use proptest::prelude::*;
use slate_core::config::{Config, ConfigErrors};
use slate_core::duration::{parse_duration, parse_size};
use std::time::Duration;

/// Cases per property (proptest's default is 256).
const CASES: u32 = 1024;

/// A complete, valid configuration (the e2e tests' shape) to cut and mutate.
const VALID: &str = r#"[server]
listen = "127.0.0.1:0"
data_dir = "/var/lib/slate"
agent_binary = "/usr/lib/slate/slate-agent"
agent_listen = "127.0.0.1:9000"

[github]
api_url = "https://api.github.com"
webhook_secret_file = "/etc/slate/webhook-secret"
token_file = "/etc/slate/token"

[[repo]]
name = "octo/hello"
url = "https://github.com/octo/hello.git"
pipeline = "default"
branches = ["main"]

[[pool]]
name = "busybox"
provider = "sandbox"
image = "/var/lib/slate/images/busybox"
max_jobs = 2
attempts = 2
network = "none"
limits = { memory = "256MiB", pids = 256, timeout = "2m", disk = "1GiB" }

[[pipeline]]
name = "default"
pools = ["busybox"]
steps = [
  { name = "build", run = "make" },
  { name = "deploy", run = "make deploy", on = ["push"] },
]
"#;

/// The operator's example config shipped in the repository.
const EXAMPLE: &str = include_str!("../../../examples/macports/slate.toml");

fn check_errors(text: &str, errs: &ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!errs.0.is_empty(), "an Err with no error");
    let lines = text.split('\n').count();
    for e in &errs.0 {
        prop_assert!(e.line >= 1, "line 0: {e}");
        prop_assert!(
            e.line <= lines.max(1),
            "line {} past the end ({lines}): {e}",
            e.line
        );
        prop_assert!(e.column >= 1, "column 0: {e}");
        prop_assert!(
            !e.key.trim().is_empty() || !e.message.trim().is_empty(),
            "neither a key nor a message: {e:?}"
        );
        prop_assert_eq!(&e.file, "slate.toml");
        // Display never panics either.
        let _ = e.to_string();
    }
    Ok(())
}

fn parse_checked(text: &str) -> Result<(), TestCaseError> {
    match Config::parse(text, "slate.toml") {
        Ok(_) => Ok(()),
        Err(errs) => check_errors(text, &errs),
    }
}

/// One TOML line built from slate's own vocabulary, so the validator (not only the TOML
/// parser) sees it.
fn toml_line() -> impl Strategy<Value = String> {
    let table = prop::sample::select(vec![
        "[server]",
        "[github]",
        "[ui]",
        "[[repo]]",
        "[[pool]]",
        "[[pipeline]]",
        "[[secret]]",
        "[[image]]",
        "[pool.exec]",
        "[[pool.cache]]",
        "[pool.libvirt]",
        "[pipeline.plan]",
        "[bogus]",
    ]);
    let key = prop::sample::select(vec![
        "listen",
        "data_dir",
        "database",
        "agent_binary",
        "public_url",
        "agent_listen",
        "replica_id",
        "lease",
        "shutdown_grace",
        "api_url",
        "webhook_secret_file",
        "token_file",
        "name",
        "url",
        "pipeline",
        "checkout",
        "branches",
        "trusted_branches",
        "provider",
        "image",
        "max_jobs",
        "limits",
        "network",
        "runtime",
        "attempts",
        "boot_timeout",
        "warm",
        "workdir",
        "pools",
        "steps",
        "run",
        "on",
        "timeout",
        "memory",
        "pids",
        "disk",
        "cpus",
        "file",
        "env",
        "recipe",
        "require_login",
        "create",
        "destroy",
        "mode",
        "bogus",
    ]);
    let value = prop_oneof![
        "\"[ -~&&[^\"\\\\]]{0,20}\"",
        "\"[0-9]{1,25}(ms|s|m|h|d|B|KiB|MiB|GiB|TiB|x|)\"",
        "-?[0-9]{1,22}",
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[\"busybox\"]".to_string()),
        Just("[{ name = \"a\", run = \"b\" }]".to_string()),
        Just(
            "{ memory = \"1GiB\", pids = 0, timeout = \"0s\", disk = \"99999999999TiB\" }"
                .to_string()
        ),
        Just("\"sandbox\"".to_string()),
        Just("\"exec\"".to_string()),
        Just("\"qemu\"".to_string()),
        Just("\"none\"".to_string()),
        Just("\"egress\"".to_string()),
        Just("1e400".to_string()),
    ];
    prop_oneof![
        1 => table.prop_map(str::to_string),
        4 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "[ -~]{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn config_parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        parse_checked(&text)?;
    }

    #[test]
    fn config_parse_never_panics_on_slate_shaped_toml(lines in vec(toml_line(), 0..40)) {
        parse_checked(&lines.join("\n"))?;
    }

    #[test]
    fn config_parse_never_panics_on_edited_real_configs(
        which in any::<bool>(),
        edits in vec((any::<prop::sample::Index>(), 0u8..4, toml_line()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let base = if which { VALID } else { EXAMPLE };
        let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
        for (at, op, line) in edits {
            let i = at.index(lines.len());
            match op {
                0 => { lines.remove(i); }
                1 => { let l = lines[i].clone(); lines.insert(i, l); }
                2 => lines[i] = line,
                _ => lines.insert(i, line),
            }
            if lines.is_empty() { break; }
        }
        let text = lines.join("\n");
        // Cut at a char boundary at or before the chosen byte.
        let mut cut = cut.index(text.len() + 1);
        while !text.is_char_boundary(cut) { cut -= 1; }
        parse_checked(&text)?;
        parse_checked(&text[..cut])?;
    }

    #[test]
    fn parse_duration_never_panics(text in prop_oneof![
        any::<String>(),
        "([0-9]{1,25}(ms|s|m|h|d|µs|)){1,4}",
        " *[0-9]{0,3}[a-z]{0,3} *",
    ]) {
        let _ = parse_duration(&text);
    }

    #[test]
    fn parse_size_never_panics(text in prop_oneof![
        any::<String>(),
        "[0-9]{1,25} ?(B|K|KB|KiB|M|MB|MiB|G|GB|GiB|T|TB|TiB|PiB|)",
        " *[0-9]{0,3}[A-Za-z]{0,3} *",
    ]) {
        let _ = parse_size(&text);
    }

    #[test]
    fn durations_round_trip(n in 0u64..1 << 32, unit in prop::sample::select(vec![
        ("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000),
    ])) {
        let d = parse_duration(&format!("{n}{}", unit.0)).unwrap();
        prop_assert_eq!(d, Duration::from_millis(n * unit.1));
    }

    #[test]
    fn sizes_round_trip(n in any::<u64>(), unit in prop::sample::select(vec![
        ("", 1u64), ("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
        ("TiB", 1 << 40), ("K", 1000), ("M", 1_000_000), ("G", 1_000_000_000),
    ])) {
        let r = parse_size(&format!("{n}{}", unit.0));
        match n.checked_mul(unit.1) {
            Some(bytes) => prop_assert_eq!(r, Ok(bytes)),
            None => prop_assert!(r.is_err()),
        }
    }
}

#[test]
fn the_base_configs_are_valid() {
    Config::parse(VALID, "slate.toml").unwrap();
    Config::parse(EXAMPLE, "slate.toml").unwrap();
}
