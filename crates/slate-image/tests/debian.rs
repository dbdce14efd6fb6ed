//! The repo's images/debian-bookworm.toml, built for real: one cold debootstrap, then an
//! unchanged rebuild that reuses the cached base. Prints both durations.

mod common;

use slate_image::{list, resolve, ImageBuilder, Progress, Recipe};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn debian_bookworm_cold_build_then_cached_rebuild() {
    // Under target/ (not /tmp): a Debian rootfs is ~200 MB and the workspace disk is big.
    let tmp = tempfile::Builder::new()
        .prefix("slate-image-debian-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let images = tmp.path().join("images");
    let recipe_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/debian-bookworm.toml");
    let recipe = Recipe::load(&recipe_path).unwrap();
    let builder = ImageBuilder::new(&images);

    let t = Instant::now();
    let cold = builder.build(&recipe, &Progress::hidden()).unwrap();
    let cold_time = t.elapsed();
    let t = Instant::now();
    let warm = builder.build(&recipe, &Progress::hidden()).unwrap();
    let warm_time = t.elapsed();
    eprintln!(
        "debian-bookworm: cold build {:.1}s ({} MB), unchanged rebuild {:.1}s; stages cold {:?}, rebuild {:?}",
        cold_time.as_secs_f64(),
        cold.meta.size_bytes / 1_000_000,
        warm_time.as_secs_f64(),
        cold.meta.stages.iter().map(|s| (s.stage.as_str(), (s.seconds * 10.0).round() / 10.0)).collect::<Vec<_>>(),
        warm.meta.stages.iter().map(|s| (s.stage.as_str(), (s.seconds * 10.0).round() / 10.0, s.reused)).collect::<Vec<_>>(),
    );

    assert!(!cold.meta.base_reused);
    assert!(warm.meta.base_reused);
    assert_eq!(
        cold.meta.input_hash, warm.meta.input_hash,
        "unchanged inputs"
    );
    assert!(
        warm_time * 2 < cold_time,
        "rebuild {warm_time:?} not much faster than cold {cold_time:?}"
    );

    // The package is installed and runs in the image; the run stage left its mark.
    for v in [&cold, &warm] {
        let out = Command::new("chroot")
            .arg(&v.rootfs)
            .args(["make", "--version"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("GNU Make"));
        assert!(v.rootfs.join("etc/slate-image").is_file());
        // apt's caches were cleaned and no service policy was left behind.
        assert!(!v.rootfs.join("usr/sbin/policy-rc.d").exists());
    }
    assert_eq!(
        resolve(&images, "debian-bookworm").unwrap().version,
        warm.version
    );
    assert_eq!(list(&images).unwrap().len(), 2);
    assert!(common::mounts_under(tmp.path()).is_empty());
}
