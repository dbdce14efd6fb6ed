//! The `qcow2` output: a busybox-tarball recipe built into a VM image, then really booted
//! under qemu (TCG here) by the qemu provider, with the image's own slate-init starting
//! the agent on virtio-serial and a fake server on the other end.

mod common;

use common::vm::{boot_and_run, Workers};
use common::{entries_starting, mounts_under, Fixture};
use slate_image::{list, resolve, ImageBuilder, Output, Progress, Recipe};
use std::fs;
use std::time::Instant;

/// Where `scripts/vm-deps.sh` unpacks Debian's kernel.
const KERNEL: &str = "/opt/slate-vm/kernel";

fn vm_recipe(fx: &Fixture, name: &str, keys: &str) -> Recipe {
    let text = format!(
        "name = \"{name}\"\nbase = {{ tarball = \"busybox.tar\" }}\n\
         run = [\"echo made-by-run-$((6 * 7)) > /etc/vm-marker\"]\n{keys}"
    );
    Recipe::load(&fx.recipe(name, &text)).unwrap()
}

#[test]
fn qcow2_output_boots_and_the_agent_runs_a_step() {
    let fx = Fixture::new();
    let _workers = Workers {
        root: fx.dir.path().join("vm-workers"),
    };
    let agent = slate_testkit::agent_bin::static_agent();
    let recipe = vm_recipe(
        &fx,
        "vm",
        &format!(
            "outputs = [\"rootfs\", \"qcow2\"]\nkernel = \"{KERNEL}\"\nagent = \"{}\"\n",
            agent.display()
        ),
    );
    let t = Instant::now();
    let v = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap();
    eprintln!("busybox + qcow2 build: {:?}", t.elapsed());

    let vm = v.vm.clone().expect("a vm dir");
    assert_eq!(vm, v.dir.join("vm"));
    let disk = fs::read(vm.join("disk.qcow2")).unwrap();
    assert_eq!(&disk[..4], b"QFI\xfb", "disk.qcow2 is not qcow2");
    assert_eq!(&fs::read(vm.join("initrd.img")).unwrap()[..6], b"070701");
    assert!(fs::metadata(vm.join("vmlinuz")).unwrap().len() > 1 << 20);
    assert!(fs::read_to_string(vm.join("cmdline"))
        .unwrap()
        .contains("init=/sbin/slate-init"));
    assert_eq!(v.meta.vm_disk_bytes, Some(disk.len() as u64));
    // The rootfs output is the image as the recipe made it: no agent, no slate-init.
    assert!(v.rootfs.join("etc/vm-marker").is_file());
    assert!(!v.rootfs.join("usr/local/bin/slate-agent").exists());
    assert!(!v.rootfs.join("sbin/slate-init").exists());
    // Only the outputs are left in the version: no build trees, no raw disk.
    let mut entries: Vec<String> = fs::read_dir(&v.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["logs", "meta.json", "rootfs", "vm"]);
    assert!(v.dir.join("logs/qcow2.log").is_file());
    assert!(v.meta.stages.iter().any(|s| s.stage == "qcow2"));

    let listed = list(&fx.images()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].outputs, vec![Output::Rootfs, Output::Qcow2]);
    assert_eq!(listed[0].vm.as_deref(), Some(vm.as_path()));
    assert_eq!(resolve(&fx.images(), "vm").unwrap().vm, Some(vm.clone()));
    assert!(entries_starting(&fx.images().join("vm"), ".tmp-").is_empty());
    assert!(mounts_under(fx.dir.path()).is_empty());

    let (seen_token, output, success, token) = boot_and_run(
        &vm,
        fx.dir.path(),
        "cat /etc/vm-marker; cat /proc/cmdline; test -x /usr/local/bin/slate-agent && echo agent-ok",
    );
    assert_eq!(seen_token, token);
    assert!(success, "{output}");
    assert!(output.contains("made-by-run-42"), "{output}");
    assert!(output.contains("init=/sbin/slate-init"), "{output}");
    assert!(output.contains("agent-ok"), "{output}");
}

#[test]
fn qcow2_without_a_kernel_fails_clearly_and_leaves_nothing() {
    let fx = Fixture::new();
    let agent = slate_testkit::agent_bin::static_agent();
    let recipe = vm_recipe(
        &fx,
        "nokernel",
        &format!(
            "outputs = [\"rootfs\", \"qcow2\"]\nagent = \"{}\"\n",
            agent.display()
        ),
    );
    let err = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the image has no kernel") && err.contains("kernel = "),
        "{err}"
    );
    let dir = fx.images().join("nokernel");
    assert!(list(&fx.images()).unwrap().is_empty());
    assert!(entries_starting(&dir, ".tmp-").is_empty());
    assert_eq!(entries_starting(&dir, ".failed-").len(), 1);
    assert!(mounts_under(fx.dir.path()).is_empty());
}

#[test]
fn qcow2_without_an_agent_fails_before_any_stage() {
    let fx = Fixture::new();
    // No `agent`, and no slate-agent next to the test binary.
    let recipe = vm_recipe(
        &fx,
        "noagent",
        &format!("outputs = [\"qcow2\"]\nkernel = \"{KERNEL}\"\n"),
    );
    let err = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs slate-agent") && err.contains("agent = "),
        "{err}"
    );
    assert!(entries_starting(&fx.images().join("noagent"), ".").is_empty());
}

#[test]
fn vm_keys_without_the_qcow2_output_are_refused() {
    let fx = Fixture::new();
    let path = fx.recipe(
        "keys",
        &format!(
            "name = \"keys\"\nbase = {{ tarball = \"busybox.tar\" }}\nkernel = \"{KERNEL}\"\n"
        ),
    );
    let err = Recipe::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("key `kernel`") && err.contains("qcow2"),
        "{err}"
    );
}

#[test]
fn only_the_qcow2_output_leaves_no_rootfs() {
    let fx = Fixture::new();
    let agent = slate_testkit::agent_bin::static_agent();
    let recipe = vm_recipe(
        &fx,
        "vmonly",
        &format!(
            "outputs = [\"qcow2\"]\nkernel = \"{KERNEL}\"\nagent = \"{}\"\n",
            agent.display()
        ),
    );
    let v = ImageBuilder::new(fx.images())
        .build(&recipe, &Progress::hidden())
        .unwrap();
    assert!(!v.rootfs.exists());
    assert!(v.dir.join("vm/disk.qcow2").is_file());
    assert!(v.meta.size_bytes > 500_000, "{}", v.meta.size_bytes);
    assert_eq!(list(&fx.images()).unwrap()[0].outputs, vec![Output::Qcow2]);
}
