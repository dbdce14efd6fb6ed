//! A build killed halfway (SIGKILL, in a child process) leaves no version, no mount and no
//! process; the next build removes its temp dir.
//!
//! `harness = false`: this binary is both the test and, with `child DIR`, the build it kills.

#[path = "common/mod.rs"]
mod common;

use common::{entries_starting, mounts_under, processes_rooted_under, Fixture};
use slate_image::{list, ImageBuilder, Progress, Recipe};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SLOW: &str = r#"name = "bb"
base = { tarball = "busybox.tar" }
run = ["touch /started && sleep 60"]
"#;

const QUICK: &str = r#"name = "bb"
base = { tarball = "busybox.tar" }
run = ["touch /finished"]
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let dir = Path::new(&args[2]);
        let recipe = Recipe::load(&dir.join("slow.toml")).unwrap();
        let r = ImageBuilder::new(dir.join("images")).build(&recipe, &Progress::hidden());
        panic!("the child build was meant to be killed, but returned {r:?}");
    }
    // `cargo test -- --list` and filters: this binary has one test.
    if args.iter().any(|a| a == "--list") {
        println!("killed_build_leaves_nothing: test");
        return;
    }
    killed_build_leaves_nothing();
    println!("test killed_build_leaves_nothing ... ok");
}

fn killed_build_leaves_nothing() {
    let fx = Fixture::new();
    fx.recipe("slow", SLOW);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .arg(fx.dir.path())
        .spawn()
        .unwrap();
    let name_dir = fx.images().join("bb");
    let deadline = Instant::now() + Duration::from_secs(60);
    let tmp = loop {
        let started = entries_starting(&name_dir, ".tmp-")
            .into_iter()
            .find(|t| t.join("rootfs/started").exists());
        if let Some(t) = started {
            break t;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("child build ended early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the child build never reached its run stage"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Halfway: in the middle of a chrooted command with /proc, /dev, /sys mounted.
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(
        list(&fx.images()).unwrap().is_empty(),
        "a killed build listed a version"
    );
    assert!(tmp.exists(), "the temp dir is the killed build's leftover");
    assert!(
        mounts_under(fx.dir.path()).is_empty(),
        "{:?}",
        mounts_under(fx.dir.path())
    );
    // The chrooted `sleep 60` dies with the builder (PDEATHSIG + the PID namespace).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_rooted_under(fx.dir.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes survived the builder: {:?}",
            processes_rooted_under(fx.dir.path())
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let quick = Recipe::load(&fx.recipe("quick", QUICK)).unwrap();
    let v = ImageBuilder::new(fx.images())
        .build(&quick, &Progress::hidden())
        .unwrap();
    assert!(
        !tmp.exists(),
        "the next build removes the leftover temp dir"
    );
    assert!(entries_starting(&name_dir, ".tmp-").is_empty());
    assert!(v.rootfs.join("finished").is_file());
    assert_eq!(list(&fx.images()).unwrap().len(), 1);
}
