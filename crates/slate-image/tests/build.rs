//! Builds from a busybox tarball: stages, failures, versions, resolution and GC.

mod common;

use common::{entries_starting, mounts_under, processes_rooted_under, Fixture};
use slate_image::{gc, list, resolve, versions, ImageBuilder, ImageError, Progress, Recipe};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

const BB: &str = r#"name = "bb"
base = { tarball = "busybox.tar" }
files = [
  { src = "files/hello.txt", dest = "/etc/hello", mode = 0o640 },
  { src = "files/hello.txt", dest = "/etc2/through-link" },
]
run = [
  "cat /etc/hello > /made-by-run",
  "test -r /proc/self/status && test -c /dev/null",
]
tools = { run = ["mkdir -p /opt/tools && echo tools > /opt/tools/stamp"] }
package_manager = { run = ["mkdir -p /opt/local && test -e /opt/tools/stamp"] }
"#;

fn bb(fx: &Fixture) -> Recipe {
    fx.write("files/hello.txt", "hello from the recipe\n");
    Recipe::load(&fx.recipe("bb", BB)).unwrap()
}

#[test]
fn tarball_recipe_with_files_and_run_builds() {
    let fx = Fixture::new();
    let recipe = bb(&fx);
    let t = Instant::now();
    let v = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap();
    let took = t.elapsed();
    eprintln!("busybox tarball build: {took:?}");
    assert!(took.as_secs() < 20, "a busybox build took {took:?}");

    let hello = v.rootfs.join("etc/hello");
    assert_eq!(
        fs::read_to_string(&hello).unwrap(),
        "hello from the recipe\n"
    );
    assert_eq!(
        fs::metadata(&hello).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // Copied through the image's absolute symlink /etc2 -> /etc, so into the image.
    assert!(v.rootfs.join("etc/through-link").is_file());
    assert_eq!(
        fs::read_to_string(v.rootfs.join("made-by-run")).unwrap(),
        "hello from the recipe\n"
    );
    assert!(v.rootfs.join("opt/tools/stamp").is_file());
    assert!(v.rootfs.join("opt/local").is_dir());
    for log in ["base", "files", "run", "tools", "package_manager"] {
        assert!(v.dir.join(format!("logs/{log}.log")).is_file(), "{log}.log");
    }
    let stages: Vec<&str> = v.meta.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["base", "files", "run", "tools", "package_manager"]);
    assert!(v.meta.size_bytes > 500_000, "{}", v.meta.size_bytes);
    assert!(v.version.ends_with(&v.meta.input_hash[..8]));

    let listed = list(&fx.images()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, v.version);
    assert!(listed[0].newest);
    assert!(entries_starting(&fx.images().join("bb"), ".tmp-").is_empty());
    assert!(mounts_under(fx.dir.path()).is_empty());
}

#[test]
fn failing_command_stops_with_its_output_and_leaves_nothing() {
    let fx = Fixture::new();
    let recipe = fx.recipe(
        "bad",
        r#"name = "bad"
base = { tarball = "busybox.tar" }
run = [
  "echo first-ok",
  "echo some-output; sleep 0.2; echo the-error-line >&2; exit 3",
  "touch /never",
]
"#,
    );
    let recipe = Recipe::load(&recipe).unwrap();
    let err = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap_err();
    let shown = err.to_string();
    match &err {
        ImageError::CommandFailed {
            stage,
            command,
            tail,
            log,
            ..
        } => {
            assert_eq!(stage, "run");
            assert!(command.contains("exit 3"), "{command}");
            assert!(
                tail.contains("some-output") && tail.contains("the-error-line"),
                "{tail}"
            );
            assert!(
                !tail.contains("first-ok"),
                "the tail is this command's: {tail}"
            );
            // The log outlives the temp dir, under .failed-*.
            let failed = entries_starting(&fx.images().join("bad"), ".failed-");
            assert_eq!(failed.len(), 1);
            assert!(log.starts_with(&failed[0]), "{}", log.display());
            assert!(fs::read_to_string(log).unwrap().contains("the-error-line"));
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    assert!(
        shown.contains("exit 3") && shown.contains("the-error-line"),
        "{shown}"
    );
    assert!(versions(&fx.images(), "bad").unwrap().is_empty());
    assert!(entries_starting(&fx.images().join("bad"), ".tmp-").is_empty());
    assert!(
        mounts_under(fx.dir.path()).is_empty(),
        "{:?}",
        mounts_under(fx.dir.path())
    );
    assert!(processes_rooted_under(fx.dir.path()).is_empty());
}

#[test]
fn two_builds_two_versions_gc_keeps_newest_and_in_use() {
    let fx = Fixture::new();
    let recipe = bb(&fx);
    let builder = ImageBuilder::new(fx.images());
    let v1 = builder.build(&recipe, &Progress::hidden()).unwrap();
    let v2 = builder.build(&recipe, &Progress::hidden()).unwrap();
    assert!(v1.version < v2.version, "{} < {}", v1.version, v2.version);
    // Same inputs, same input hash: that is what "unchanged" means.
    assert_eq!(v1.meta.input_hash, v2.meta.input_hash);

    let r = resolve(&fx.images(), "bb").unwrap();
    assert_eq!(
        (r.version.as_str(), &r.rootfs),
        (v2.version.as_str(), &v2.rootfs)
    );
    // A path is used as is.
    let p = resolve(&fx.images(), v1.rootfs.to_str().unwrap()).unwrap();
    assert_eq!(p.rootfs, v1.rootfs);
    assert!(matches!(
        resolve(&fx.images(), "nope"),
        Err(ImageError::NotFound(..))
    ));

    // A job pinned v1: kept.
    let report = gc(&fx.images(), std::slice::from_ref(&v1.rootfs)).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(versions(&fx.images(), "bb").unwrap().len(), 2);

    // Nobody uses v1: removed, and only v1.
    let report = gc(&fx.images(), &[]).unwrap();
    let removed: Vec<&str> = report.removed.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(removed, [v1.version.as_str()]);
    assert!(!v1.dir.exists());
    assert!(v2.rootfs.join("etc/hello").is_file());

    // Never the newest, even when nothing uses it.
    let report = gc(&fx.images(), &[]).unwrap();
    assert!(report.removed.is_empty());
    assert_eq!(resolve(&fx.images(), "bb").unwrap().version, v2.version);
}

#[test]
fn child_image_starts_from_its_parent() {
    let fx = Fixture::new();
    let parent = ImageBuilder::new(fx.images())
        .build(&bb(&fx), &Progress::hidden())
        .unwrap();
    let child = Recipe::load(&fx.recipe(
        "child",
        "name = \"child\"\nbase = { image = \"bb\" }\nrun = [\"echo child > /etc/hello\"]\n",
    ))
    .unwrap();
    let v = ImageBuilder::new(fx.images())
        .build(&child, &Progress::hidden())
        .unwrap();
    assert_eq!(
        fs::read_to_string(v.rootfs.join("etc/hello")).unwrap(),
        "child\n"
    );
    assert!(v.rootfs.join("made-by-run").is_file());
    // The parent version is untouched by its child's build.
    assert_eq!(
        fs::read_to_string(parent.rootfs.join("etc/hello")).unwrap(),
        "hello from the recipe\n"
    );
    assert!(v.meta.base.contains(&parent.version), "{}", v.meta.base);
}
