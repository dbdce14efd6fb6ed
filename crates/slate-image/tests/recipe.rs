//! Recipe errors are located (file:line:column and key); good recipes parse.

mod common;

use slate_image::{Base, ImageError, Output, Recipe, RecipeErrors};
use std::time::Duration;

fn errors(fx: &common::Fixture, text: &str) -> RecipeErrors {
    let path = fx.recipe("r", text);
    match Recipe::load(&path) {
        Err(ImageError::Recipe(e)) => e,
        other => panic!("expected recipe errors, got {other:?}"),
    }
}

#[test]
fn unknown_key_is_located() {
    let fx = common::Fixture::new();
    let e = errors(
        &fx,
        "name = \"bb\"\nbase = { tarball = \"busybox.tar\" }\npakages = [\"make\"]\n",
    );
    let first = &e.0[0];
    assert_eq!((first.line, first.key.as_str()), (3, "pakages"), "{e}");
    let shown = e.to_string();
    assert!(shown.contains("r.toml:3:1: key `pakages`"), "{shown}");
    assert!(shown.contains("unknown field"), "{shown}");
}

#[test]
fn unknown_key_in_a_nested_table_is_located() {
    let fx = common::Fixture::new();
    let e = errors(
        &fx,
        "name = \"deb\"\n\n[base.debootstrap]\nsuite = \"bookworm\"\nflavour = \"minbase\"\n",
    );
    assert_eq!(e.0[0].line, 5, "{e}");
    assert_eq!(e.0[0].key, "base.debootstrap.flavour", "{e}");
}

#[test]
fn bad_values_are_located_and_all_reported() {
    let fx = common::Fixture::new();
    fx.write("f.txt", "x");
    let e = errors(
        &fx,
        r#"name = "bb"
base = { tarball = "busybox.tar" }
files = [
  { src = "f.txt", dest = "/etc/f", mode = "99" },
  { src = "missing.txt", dest = "relative/path" },
]
outputs = ["rootfs", "iso"]
rebuild_every = "7 fortnights"
"#,
    );
    let found: Vec<(usize, &str)> = e.0.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        found,
        vec![
            (4, "files[0].mode"),
            (5, "files[1].src"),
            (5, "files[1].dest"),
            (7, "outputs[1]"),
            (8, "rebuild_every"),
        ],
        "{e}"
    );
    assert!(e.to_string().contains("missing.txt does not exist"), "{e}");
}

#[test]
fn wrong_type_is_located() {
    let fx = common::Fixture::new();
    let e = errors(
        &fx,
        "name = \"bb\"\nbase = { tarball = \"busybox.tar\" }\nrun = \"make\"\n",
    );
    assert_eq!((e.0[0].line, e.0[0].key.as_str()), (3, "run"), "{e}");
}

#[test]
fn missing_or_ambiguous_base_is_reported() {
    let fx = common::Fixture::new();
    let e = errors(&fx, "name = \"bb\"\npackages = [\"make\"]\n");
    assert_eq!(e.0[0].key, "base", "{e}");
    assert!(
        e.to_string().contains("r.toml:1:1: key `base`: missing"),
        "{e}"
    );

    let e = errors(
        &fx,
        "name = \"bb\"\nbase = { tarball = \"busybox.tar\", image = \"x\" }\n",
    );
    assert_eq!((e.0[0].line, e.0[0].key.as_str()), (2, "base"), "{e}");
    assert!(e.to_string().contains("exactly one"), "{e}");
}

#[test]
fn repo_recipe_parses() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/debian-bookworm.toml");
    let r = Recipe::load(&path).unwrap();
    assert_eq!(r.name, "debian-bookworm");
    assert!(matches!(
        &r.base,
        Base::Debootstrap { suite, variant, .. } if suite == "bookworm" && variant == "minbase"
    ));
    assert!(r.packages.iter().any(|p| p == "make"));
    assert_eq!(r.outputs, vec![Output::Rootfs]);
    assert_eq!(r.rebuild_every, Some(Duration::from_secs(7 * 86400)));
}

#[test]
fn full_recipe_parses() {
    let fx = common::Fixture::new();
    fx.write("conf/agent.conf", "x");
    let path = fx.recipe(
        "full",
        r#"name = "full"
base = { image = "parent" }
packages = ["make", "g++"]
files = [{ src = "conf/agent.conf", dest = "/etc/slate/agent.conf", mode = 0o600 }]
run = ["true"]
tools = { run = ["mkdir -p /opt/tools"] }
package_manager = { run = ["mkdir -p /opt/local"] }
outputs = ["rootfs", "qcow2"]
rebuild_every = "1d"
"#,
    );
    let r = Recipe::load(&path).unwrap();
    assert_eq!(r.base, Base::Image("parent".into()));
    assert_eq!(r.files[0].mode, Some(0o600));
    assert!(r.files[0].src.is_absolute());
    assert_eq!(r.tools, vec!["mkdir -p /opt/tools"]);
    assert_eq!(r.package_manager, vec!["mkdir -p /opt/local"]);
    assert_eq!(r.outputs, vec![Output::Rootfs, Output::Qcow2]);
    assert_eq!(r.rebuild_every, Some(Duration::from_secs(86400)));
}
