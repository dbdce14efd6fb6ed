//! A minimal VM image for qemu provider tests: a Debian kernel, a busybox initramfs that
//! mounts the qcow2 disk, and a busybox + `slate-agent` root filesystem on that disk.
//!
//! Image directory layout (what the qemu provider expects of `spec.image`):
//!
//! ```text
//! vmlinuz      the kernel
//! initrd.img   uncompressed newc cpio: busybox, modules, /init (see INITRD_INIT)
//! disk.qcow2   ext4 root filesystem (never written: jobs run on overlays of it)
//! cmdline      extra kernel arguments (root=/dev/vda …)
//! ```
//!
//! Boot sequence, for whoever builds production images (issue "images"):
//! 1. initramfs `/init` ([`INITRD_INIT`]): mounts proc/sys/devtmpfs, `insmod`s virtio_pci,
//!    virtio_blk, virtio_console, ext4 (+crc32c), 9p/9pnet_virtio, overlay, qemu_fw_cfg in
//!    dependency order (from modules.dep), mounts `/dev/vda` and `switch_root`s into it.
//! 2. disk `/sbin/init` ([`guest_init`], slate-image's `slate-init` on this image's
//!    busybox): copies fw_cfg's mounts/forwards/late entries to `/run/slate`, reads the
//!    job token from fw_cfg `opt/slate/token` then unloads qemu_fw_cfg (steps cannot read
//!    it again), configures `eth0` if the VM has a NIC, finds the virtio-serial port
//!    named `org.slate.agent` and runs `slate-agent --connect /dev/vportNpM --prepare
//!    /run/slate/prepare` with `SLATE_AGENT_TOKEN`; `prepare`, run once the job is known,
//!    mounts the 9p share `workspace` read-only under a tmpfs overlay at `/workspace` and
//!    the caches (a cache that cannot be mounted fails the worker); when the agent exits
//!    the guest powers off (`poweroff -f`), which ends qemu (`-no-reboot`). See
//!    `docs/images.md` for the whole guest contract.
//!
//! The kernel comes from `/opt/slate-vm/kernel` (a Debian linux-image package unpacked by
//! `scripts/vm-deps.sh`) or else from the host's `/boot` + `/lib/modules`.

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Bumped whenever the way images are built changes, to invalidate the disk cache.
const BUILD_VERSION: &str = "7";

/// Where `scripts/vm-deps.sh` unpacks the Debian kernel package.
pub const KERNEL_ROOT: &str = "/opt/slate-vm/kernel";

/// Content of `/etc/slate-vm-image` in the test image.
pub const MARKER: &str = "slate test vm image";

/// Modules the guest needs, loaded with their dependencies first.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "overlay",
    "qemu_fw_cfg",
];

/// The initramfs `/init`; `@MODULES@` is replaced by the ordered module list.
pub const INITRD_INIT: &str = r#"#!/bin/busybox sh
# slate VM initramfs: load drivers, mount the qcow2 disk, switch_root into it.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "slate-initrd: $*"; poweroff -f; }
for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || echo "slate-initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 1000 ] && fail "no /dev/vda"
  sleep 0.01
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
[ -x /newroot/sbin/init ] || fail "no /sbin/init on /dev/vda"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"#;

/// The disk's `/sbin/init`: slate-image's production `slate-init`, on the busybox at
/// `/bin` (this image has no `/usr/local/lib/slate`), so VM tests boot what images ship.
pub fn guest_init() -> String {
    slate_image::SLATE_INIT
        .replace("#!/usr/local/lib/slate/busybox sh", "#!/bin/sh")
        .replace(
            "export PATH=/usr/local/lib/slate/bin",
            "export PATH=/usr/local/bin:/bin:/sbin",
        )
}

/// `/sbin/init` of the broken image: boots, says so, never starts the agent.
pub const BROKEN_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "slate-vm: broken image, the agent is never started"
while :; do sleep 3600; done
"#;

/// The kernel command line the image needs beyond the provider's `console=ttyS0`.
pub const CMDLINE: &str = "root=/dev/vda rw quiet";

/// Builds (or takes from the cache) the test VM image and puts it into `dir` (created if
/// missing): `vmlinuz`, `initrd.img`, `disk.qcow2`, `cmdline`.
///
/// Built once per process and cached across processes in `target/vm-image-cache/<hash of
/// the inputs>`; `dir` gets its own copies, so a test cannot damage the cache.
pub fn vm_image(dir: &Path) -> io::Result<()> {
    install(&cached(Variant::Good)?, dir)
}

/// Like [`vm_image`], but the guest boots and never starts the agent.
pub fn broken_vm_image(dir: &Path) -> io::Result<()> {
    install(&cached(Variant::Broken)?, dir)
}

/// Hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Good,
    Broken,
}

fn install(src: &Path, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for f in ["vmlinuz", "initrd.img", "disk.qcow2", "cmdline"] {
        fs::copy(src.join(f), dir.join(f))?;
    }
    Ok(())
}

fn cached(variant: Variant) -> io::Result<PathBuf> {
    static GOOD: OnceLock<PathBuf> = OnceLock::new();
    static BROKEN: OnceLock<PathBuf> = OnceLock::new();
    // OnceLock::get_or_try_init is unstable: serialize builds with a mutex instead.
    static BUILD: Mutex<()> = Mutex::new(());
    let cell = match variant {
        Variant::Good => &GOOD,
        Variant::Broken => &BROKEN,
    };
    if let Some(p) = cell.get() {
        return Ok(p.clone());
    }
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cell.get() {
        return Ok(p.clone());
    }
    let path = build_cached(variant)?;
    Ok(cell.get_or_init(|| path).clone())
}

struct Kernel {
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The newest kernel with a modules.dep under [`KERNEL_ROOT`], else under `/`.
fn find_kernel() -> io::Result<Kernel> {
    for root in [Path::new(KERNEL_ROOT), Path::new("/")] {
        let Ok(entries) = fs::read_dir(root.join("boot")) else {
            continue;
        };
        let mut versions: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_string)
            })
            .filter(|v| {
                root.join("lib/modules")
                    .join(v)
                    .join("modules.dep")
                    .is_file()
            })
            .collect();
        versions.sort();
        if let Some(v) = versions.pop() {
            return Ok(Kernel {
                vmlinuz: root.join("boot").join(format!("vmlinuz-{v}")),
                modules: root.join("lib/modules").join(&v),
            });
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no kernel with modules under {KERNEL_ROOT} or /boot: run scripts/vm-deps.sh"),
    ))
}

fn cache_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize()
        .unwrap_or(root)
        .join("target/vm-image-cache")
}

fn stamp(h: &mut Sha256, path: &Path) -> io::Result<()> {
    let m = fs::metadata(path)?;
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(m.len().to_le_bytes());
    h.update(m.mtime().to_le_bytes());
    h.update(m.mtime_nsec().to_le_bytes());
    Ok(())
}

fn build_cached(variant: Variant) -> io::Result<PathBuf> {
    let kernel = find_kernel()?;
    let agent = crate::agent_bin::static_agent();
    let mut h = Sha256::new();
    h.update(BUILD_VERSION);
    h.update(format!("{variant:?}"));
    for text in [INITRD_INIT, &guest_init(), BROKEN_INIT, CMDLINE, MARKER] {
        h.update(text);
        h.update([0]);
    }
    stamp(&mut h, &kernel.vmlinuz)?;
    stamp(&mut h, &kernel.modules.join("modules.dep"))?;
    stamp(&mut h, Path::new(crate::image::BUSYBOX))?;
    // The agent changes with the code: hash its content, not its mtime.
    h.update(fs::read(&agent)?);
    let key = hex::encode(&h.finalize()[..12]);
    let dir = cache_root().join(format!("{}-{key}", variant_name(variant)));
    if dir.join("disk.qcow2").is_file() {
        return Ok(dir);
    }

    fs::create_dir_all(cache_root())?;
    // Built beside, renamed into place: another process may be building the same key.
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(cache_root())?;
    build(variant, &kernel, &agent, tmp.path())?;
    let staged = tmp.path().join("image");
    match fs::rename(&staged, &dir) {
        Ok(()) => {}
        Err(_) if dir.join("disk.qcow2").is_file() => {}
        Err(e) => return Err(e),
    }
    Ok(dir)
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Good => "good",
        Variant::Broken => "broken",
    }
}

fn build(variant: Variant, kernel: &Kernel, agent: &Path, work: &Path) -> io::Result<()> {
    let out = work.join("image");
    fs::create_dir_all(&out)?;
    fs::copy(&kernel.vmlinuz, out.join("vmlinuz"))?;
    fs::write(out.join("cmdline"), format!("{CMDLINE}\n"))?;
    build_initrd(kernel, &work.join("initrd"), &out.join("initrd.img"))?;

    let rootfs = work.join("rootfs");
    crate::image::busybox_rootfs(&rootfs)?;
    for d in ["sbin", "usr/local/bin", "workspace", "mnt"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy(agent, rootfs.join("usr/local/bin/slate-agent"))?;
    chmod(&rootfs.join("usr/local/bin/slate-agent"), 0o755)?;
    fs::write(rootfs.join("etc/slate-vm-image"), format!("{MARKER}\n"))?;
    let init = match variant {
        Variant::Good => guest_init(),
        Variant::Broken => BROKEN_INIT.to_string(),
    };
    fs::write(rootfs.join("sbin/init"), init)?;
    chmod(&rootfs.join("sbin/init"), 0o755)?;

    let raw = work.join("disk.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "slate-root", "-E", "root_owner=0:0", "-d"])
        .arg(&rootfs)
        .arg(&raw)
        .arg("256M"))?;
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(out.join("disk.qcow2")))?;
    fs::remove_file(&raw)?;
    Ok(())
}

/// Module names (without `.ko`) in load order, each after its dependencies.
fn module_order(modules_dep: &str, wanted: &[&str]) -> io::Result<Vec<(String, String)>> {
    // "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko …"
    let mut deps = std::collections::HashMap::new();
    let mut by_name = std::collections::HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(path);
        by_name.insert(name.clone(), path.to_string());
        deps.insert(
            path.to_string(),
            rest.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>(),
        );
    }
    fn visit(
        path: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        out: &mut Vec<(String, String)>,
    ) {
        if out.iter().any(|(_, p)| p == path) {
            return;
        }
        for d in deps.get(path).into_iter().flatten() {
            visit(d, deps, out);
        }
        out.push((module_name(path), path.to_string()));
    }
    let mut out = Vec::new();
    for w in wanted {
        let path = by_name.get(*w).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("module {w} not in modules.dep (built into the kernel?)"),
            )
        })?;
        visit(path, &deps, &mut out);
    }
    Ok(out)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.strip_suffix(".ko").unwrap_or(file).to_string()
}

fn build_initrd(kernel: &Kernel, dir: &Path, out: &Path) -> io::Result<()> {
    for d in ["bin", "lib/modules", "dev", "proc", "sys", "newroot"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy(crate::image::BUSYBOX, dir.join("bin/busybox"))?;
    chmod(&dir.join("bin/busybox"), 0o755)?;
    let dep = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let order = module_order(&dep, MODULES)?;
    let mut names = String::new();
    for (name, path) in &order {
        if !path.ends_with(".ko") {
            return Err(io::Error::other(format!(
                "compressed module {path}: busybox insmod needs plain .ko"
            )));
        }
        fs::copy(
            kernel.modules.join(path),
            dir.join("lib/modules").join(format!("{name}.ko")),
        )?;
        let _ = write!(names, "{}{name}", if names.is_empty() { "" } else { " " });
    }
    fs::write(dir.join("init"), INITRD_INIT.replace("@MODULES@", &names))?;
    chmod(&dir.join("init"), 0o755)?;
    // Uncompressed: decompressing under TCG costs more than reading a few MB.
    let cpio = fs::File::create(out)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
        .current_dir(dir)
        .stdout(cpio)
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "cpio failed ({status}): is cpio installed? run scripts/vm-deps.sh"
        )));
    }
    Ok(())
}

fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output().map_err(|e| {
        io::Error::new(e.kind(), format!("cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies() {
        let dep = "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n";
        let order: Vec<String> = module_order(dep, &["a"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["c", "b", "a"]);
        assert!(module_order(dep, &["nope"]).is_err());
    }

    #[test]
    fn image_has_kernel_initrd_and_qcow2_disk() {
        let dir = tempfile::tempdir().unwrap();
        vm_image(dir.path()).unwrap();
        let disk = fs::read(dir.path().join("disk.qcow2")).unwrap();
        assert_eq!(&disk[..4], b"QFI\xfb", "disk.qcow2 is not qcow2");
        let initrd = fs::read(dir.path().join("initrd.img")).unwrap();
        assert_eq!(&initrd[..6], b"070701", "initrd is not a newc cpio");
        assert!(fs::metadata(dir.path().join("vmlinuz")).unwrap().len() > 1 << 20);
    }
}
