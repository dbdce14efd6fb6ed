//! The repo's images/debian-bookworm-vm.toml, built for real (debootstrap + the Debian
//! kernel package) with the static agent, then booted under qemu by the qemu provider: the
//! image's own kernel, slate-init on the disk, the agent running a step.

mod common;

use common::vm::{boot_and_run, Workers};
use slate_image::{list, ImageBuilder, Output, Progress, Recipe};
use std::fs;
use std::path::Path;
use std::time::Instant;

#[test]
fn debian_vm_image_with_its_own_kernel_boots_and_runs_a_step() {
    // Under target/ (not /tmp): a Debian rootfs with a kernel is ~400 MB.
    let tmp = tempfile::Builder::new()
        .prefix("slate-image-debian-vm-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let _workers = Workers {
        root: tmp.path().join("vm-workers"),
    };
    let images = tmp.path().join("images");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/debian-bookworm-vm.toml");
    // The repo's recipe as is, plus the agent this test built.
    let text = format!(
        "{}\nagent = \"{}\"\n",
        fs::read_to_string(&path).unwrap(),
        slate_testkit::agent_bin::static_agent().display()
    );
    let recipe = Recipe::parse(&text, &path).unwrap();
    assert_eq!(recipe.outputs, vec![Output::Qcow2]);
    assert_eq!(recipe.kernel, None, "the kernel comes from the image");

    let t = Instant::now();
    let v = ImageBuilder::new(&images)
        .build(&recipe, &Progress::hidden())
        .unwrap();
    eprintln!(
        "debian-bookworm-vm build {:.1}s, disk {} MB, stages {:?}",
        t.elapsed().as_secs_f64(),
        v.meta.vm_disk_bytes.unwrap_or(0) / 1_000_000,
        v.meta
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), (s.seconds * 10.0).round() / 10.0))
            .collect::<Vec<_>>(),
    );
    let vm = v.vm.clone().unwrap();
    assert!(!v.rootfs.exists(), "outputs = [\"qcow2\"] keeps no rootfs");
    assert_eq!(list(&images).unwrap()[0].vm.as_deref(), Some(vm.as_path()));

    let (seen_token, output, success, token) = boot_and_run(
        &vm,
        tmp.path(),
        "uname -r; cat /etc/slate-image; make --version | head -1; cat /etc/debian_version",
    );
    assert_eq!(seen_token, token);
    assert!(success, "{output}");
    assert!(output.contains("amd64"), "{output}");
    assert!(
        output.contains("slate image debian-bookworm-vm"),
        "{output}"
    );
    assert!(output.contains("GNU Make"), "{output}");
    assert!(common::mounts_under(tmp.path()).is_empty());
}
