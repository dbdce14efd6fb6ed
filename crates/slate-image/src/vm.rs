//! The `qcow2` output: a bootable VM image for qemu/libvirt pools, made from the finished
//! rootfs of a build. What the qemu provider boots (`slate_provider::qemu`):
//!
//! ```text
//! <version>/vm/disk.qcow2   ext4 (`mkfs.ext4 -d`): the rootfs + slate-agent + slate-init
//!             /vmlinuz      the image's own kernel, or the recipe's `kernel` directory's
//!             /initrd.img   uncompressed newc cpio: static busybox + the modules below
//!             /cmdline      root=/dev/vda rw quiet init=/sbin/slate-init
//! ```
//!
//! Boot: the initramfs `/init` ([`INITRD_INIT`]) loads virtio/ext4/9p/overlay/fw_cfg
//! modules in modules.dep order, mounts `/dev/vda` and `switch_root`s to the `init=` of the
//! kernel command line, `/sbin/slate-init` ([`SLATE_INIT`]): it mounts the workspace (9p
//! `workspace` under a tmpfs overlay) and the caches listed in fw_cfg `opt/slate/mounts`,
//! reads the token from fw_cfg `opt/slate/token`, runs `slate-agent --connect` on the
//! virtio-serial port `org.slate.agent`, and powers off when it exits.
//!
//! The scripts and the module list are copied from `slate_testkit::vm_image` (the test VM
//! image that defined this layout), with two changes for real images: the initramfs
//! honours `init=`, and slate-init runs on its own static busybox
//! (`/usr/local/lib/slate/busybox`), since a Debian minbase has neither `poweroff` nor
//! `rmmod` and a distribution's `/sbin/init` is left alone.

use crate::fsutil;
use crate::progress::StageBar;
use crate::ImageError;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Directory of the `qcow2` output inside a version.
pub(crate) const VM_DIR: &str = "vm";

/// Bumped whenever the way VM images are made changes (part of the input hash).
const VM_BUILD_VERSION: &str = "1";

/// The host's static busybox (Debian's `busybox-static`), for the initramfs and slate-init.
const BUSYBOX: &str = "/bin/busybox";

/// Where slate-init's busybox and its applet links go in the disk.
const DISK_BUSYBOX: &str = "/usr/local/lib/slate/busybox";
const DISK_BUSYBOX_BIN: &str = "/usr/local/lib/slate/bin";

/// The kernel command line beyond the provider's `console=ttyS0 panic=-1`.
pub(crate) const CMDLINE: &str = "root=/dev/vda rw quiet init=/sbin/slate-init";

/// Modules the guest needs, loaded with their dependencies first (as slate-testkit's).
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

/// The initramfs `/init` (from `slate_testkit::vm_image::INITRD_INIT`, plus `init=`);
/// `@MODULES@` is replaced by the ordered module list.
pub(crate) const INITRD_INIT: &str = r#"#!/bin/busybox sh
# slate VM initramfs: load drivers, mount the qcow2 disk, switch_root into it.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "slate-initrd: $*"; poweroff -f; }
init=/sbin/init
for a in $(cat /proc/cmdline); do
  case "$a" in init=*) init="${a#init=}" ;; esac
done
for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || echo "slate-initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 1000 ] && fail "no /dev/vda"
  sleep 0.01
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
[ -x "/newroot$init" ] || fail "no $init on /dev/vda"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot "$init"
"#;

/// The disk's `/sbin/slate-init` (on its own busybox): token, network, agent on
/// virtio-serial with the prepare script that mounts workspace and caches, then power off.
/// `slate_testkit::vm_image` boots the same script on its busybox at `/bin`.
pub const SLATE_INIT: &str = r#"#!/usr/local/lib/slate/busybox sh
# slate VM guest init: workspace overlay, token from fw_cfg, agent on virtio-serial.
export PATH=/usr/local/lib/slate/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q " /dev " /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname slate-vm
# Shares are mounted by /run/slate/prepare, which the agent runs once the job is known
# (a warm VM boots before its job exists). fw_cfg goes away with the token below, so
# what prepare needs of it is copied now.
mkdir -p /run/slate
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/slate
[ -r $fw/mounts/raw ] && cat $fw/mounts/raw > /run/slate/mounts
[ -e $fw/late/raw ] && : > /run/slate/late
[ -r $fw/forwards/raw ] && cat $fw/forwards/raw > /run/slate/forwards
cat > /run/slate/prepare <<'PREPARE'
#!/usr/local/lib/slate/busybox sh
export PATH=/usr/local/lib/slate/bin
# The source tree: read-only 9p below, tmpfs above, so steps can write. In a warm VM
# every share's content is bound (by slate, on the host) into its job/ subdirectory.
sub=
[ -e /run/slate/late ] && sub=/job
mkdir -p /run/ws/9p /run/ws/upper /run/ws/work /workspace
if mount -t 9p -o trans=virtio,version=9p2000.L,ro workspace /run/ws/9p 2>/dev/null; then
  mount -t overlay overlay -o lowerdir=/run/ws/9p$sub,upperdir=/run/ws/upper,workdir=/run/ws/work /workspace \
    || { echo "slate-vm: cannot mount the workspace overlay"; exit 1; }
fi
# Shared caches: "<9p tag> <target> ro|rw" lines. Missing caches would make a job's writes
# vanish silently, so a cache that cannot be mounted fails the job's worker.
[ -r /run/slate/mounts ] || exit 0
while read -r tag target mode; do
  [ -n "$tag" ] || continue
  case "$mode" in
    ro) opts=trans=virtio,version=9p2000.L,ro ;;
    rw) opts=trans=virtio,version=9p2000.L ;;
    *) echo "slate-vm: bad mode '$mode' for cache $tag"; exit 1 ;;
  esac
  if [ -z "$sub" ]; then
    mkdir -p "$target" && mount -t 9p -o "$opts" "$tag" "$target"
  else
    mkdir -p "/run/9p/$tag" "$target" && mount -t 9p -o "$opts" "$tag" "/run/9p/$tag" \
      && mount --bind "/run/9p/$tag$sub" "$target"
  fi || { echo "slate-vm: cannot mount cache $tag at $target"; exit 1; }
  echo "slate-vm: cache $tag at $target ($mode)"
done < /run/slate/mounts
PREPARE
chmod 700 /run/slate/prepare
tokfile=/sys/firmware/qemu_fw_cfg/by_name/opt/slate/token/raw
[ -r $tokfile ] || { echo "slate-vm: no token in fw_cfg"; poweroff -f; }
token=$(cat $tokfile)
# fw_cfg would keep the token readable by every step: unload it (it lives only in the
# initramfs, which is gone, so steps cannot load it back).
rmmod qemu_fw_cfg 2>/dev/null
# Network: none unless the pool has network = "egress"; then qemu's user-mode network
# (restrict=on), where only the pool's allowed endpoints answer, at the guest addresses
# /run/slate/forwards lists ("<guest ip:port> <endpoint>" lines).
ip link set lo up 2>/dev/null
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 \
    || echo "slate-vm: cannot configure eth0"
fi
port=
i=0
while [ -z "$port" ]; do
  if [ -e /dev/virtio-ports/org.slate.agent ]; then port=/dev/virtio-ports/org.slate.agent; fi
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.slate.agent ] && port=/dev/$(basename "$(dirname "$n")")
  done
  i=$((i+1)); [ $i -gt 500 ] && { echo "slate-vm: no org.slate.agent port"; poweroff -f; }
  [ -n "$port" ] || sleep 0.01
done
echo "slate-vm: starting agent on $port"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  SLATE_AGENT_TOKEN="$token" /usr/local/bin/slate-agent --connect "$port" --prepare /run/slate/prepare
echo "slate-vm: agent exited with $?"
token=
poweroff -f
"#;

/// What the `qcow2` output is made from besides the rootfs, checked before the build runs.
#[derive(Debug, Clone)]
pub(crate) struct VmInputs {
    pub agent: PathBuf,
    pub kernel_dir: Option<PathBuf>,
}

impl VmInputs {
    /// The agent (the recipe's `agent`, else `slate-agent` next to the running executable)
    /// and the host tools; fails before any stage runs.
    pub(crate) fn resolve(recipe: &crate::Recipe) -> Result<VmInputs, ImageError> {
        let agent = match &recipe.agent {
            Some(a) => a.clone(),
            None => {
                let exe = std::env::current_exe()
                    .map_err(ImageError::io("finding the running executable"))?;
                let beside = exe
                    .parent()
                    .map(|d| d.join("slate-agent"))
                    .unwrap_or_else(|| PathBuf::from("slate-agent"));
                if !beside.is_file() {
                    return Err(ImageError::Other(format!(
                        "output `qcow2` needs slate-agent: none at {} (next to {}); set \
                         `agent = \"/path/to/slate-agent\"` in the recipe",
                        beside.display(),
                        exe.display()
                    )));
                }
                beside
            }
        };
        if !agent.is_file() {
            return Err(ImageError::Other(format!(
                "output `qcow2`: agent {} is not a file",
                agent.display()
            )));
        }
        match fs::read(BUSYBOX).ok().as_deref().and_then(is_static_elf) {
            Some(true) => {}
            _ => {
                return Err(ImageError::Other(format!(
                    "output `qcow2` needs a static busybox at {BUSYBOX} for the initramfs: \
                     apt-get install busybox-static (or run scripts/vm-deps.sh)"
                )))
            }
        }
        Ok(VmInputs {
            agent,
            kernel_dir: recipe.kernel.clone(),
        })
    }

    /// Part of the version's input hash: the agent's and busybox's content, the boot
    /// scripts, and the external kernel (the image's own kernel is in the rootfs).
    pub(crate) fn identity(&self) -> Result<String, ImageError> {
        let mut h = Sha256::new();
        for text in [VM_BUILD_VERSION, INITRD_INIT, SLATE_INIT, CMDLINE] {
            h.update(text.as_bytes());
            h.update([0]);
        }
        h.update(MODULES.join(" ").as_bytes());
        let mut s = format!("agent sha256:{}", crate::build::file_sha256(&self.agent)?);
        s.push_str(&format!(
            " busybox sha256:{}",
            crate::build::file_sha256(Path::new(BUSYBOX))?
        ));
        if let Some(dir) = &self.kernel_dir {
            if let Some(k) = find_kernel(dir, false)? {
                s.push_str(&format!(
                    " kernel {} {} sha256:{} dep:{}",
                    dir.display(),
                    k.version,
                    crate::build::file_sha256(&k.vmlinuz)?,
                    crate::build::file_sha256(&k.modules.join("modules.dep"))?
                ));
            }
        }
        s.push_str(&format!(" scripts:{}", hex::encode(&h.finalize()[..8])));
        Ok(s)
    }
}

/// A kernel and its modules, as host paths.
struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    modules: PathBuf,
    /// The image's root when the kernel is the image's own: module paths are then
    /// resolved inside it, so a symlink in the image never reads a host file.
    image_root: Option<PathBuf>,
}

impl Kernel {
    fn module_file(&self, rel: &str) -> Result<PathBuf, ImageError> {
        match &self.image_root {
            Some(root) => {
                let inner = Path::new("/lib/modules").join(&self.version).join(rel);
                fsutil::path_in_root(root, &inner)
            }
            None => Ok(self.modules.join(rel)),
        }
    }
}

/// A regular file (not a symlink) at `p`.
fn plain_file(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// The newest kernel under `root` with a `lib/modules/<ver>/modules.dep`:
/// `boot/vmlinuz-<ver>`, or (a kernel directory, not an image) `vmlinuz`.
fn find_kernel(root: &Path, in_image: bool) -> Result<Option<Kernel>, ImageError> {
    let (boot, modules) = if in_image {
        let boot = fsutil::path_in_root(root, Path::new("/boot/x"))?;
        let modules = fsutil::path_in_root(root, Path::new("/lib/modules/x"))?;
        (
            boot.parent().map(Path::to_path_buf).unwrap_or_default(),
            modules.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    } else {
        (root.join("boot"), root.join("lib/modules"))
    };
    let has_dep = |v: &str| {
        !v.contains('/')
            && fs::symlink_metadata(modules.join(v)).is_ok_and(|m| m.is_dir())
            && plain_file(&modules.join(v).join("modules.dep"))
    };
    let mut found: Vec<(String, PathBuf)> = fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")?
                .to_string();
            (plain_file(&e.path()) && has_dep(&v)).then(|| (v, e.path()))
        })
        .collect();
    if found.is_empty() && !in_image && plain_file(&root.join("vmlinuz")) {
        found = fs::read_dir(&modules)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|v| has_dep(v))
            .map(|v| (v, root.join("vmlinuz")))
            .collect();
    }
    found.sort_by_key(|(v, _)| natural_key(v));
    Ok(found.pop().map(|(version, vmlinuz)| Kernel {
        modules: modules.join(&version),
        version,
        vmlinuz,
        image_root: in_image.then(|| root.to_path_buf()),
    }))
}

/// Sort key comparing digit runs as numbers, so 6.1.0-10 comes after 6.1.0-9.
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            out.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let n = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            out.push((0, rest[..n].to_string()));
            rest = &rest[n..];
        }
    }
    out
}

/// Build `<tmp>/vm` from the finished `rootfs`. With `keep_rootfs` the disk's tree is a
/// copy (the agent and slate-init never enter the rootfs output); without, the rootfs
/// itself becomes the tree and is gone afterwards. Returns the qcow2's size in bytes.
pub(crate) fn make(
    inputs: &VmInputs,
    tmp: &Path,
    rootfs: &Path,
    keep_rootfs: bool,
    log: &Path,
    bar: &StageBar,
) -> Result<u64, ImageError> {
    let mut logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ImageError::io(format!("opening {}", log.display())))?;
    let out = tmp.join(VM_DIR);
    fs::create_dir(&out).map_err(ImageError::io(format!("creating {}", out.display())))?;

    bar.message("kernel");
    let kernel = match find_kernel(rootfs, true)? {
        Some(k) => k,
        None => match &inputs.kernel_dir {
            Some(dir) => find_kernel(dir, false)?.ok_or_else(|| {
                ImageError::Other(format!(
                    "output `qcow2`: no kernel in `kernel` directory {}: expected vmlinuz or \
                     boot/vmlinuz-<version>, and lib/modules/<version>/modules.dep",
                    dir.display()
                ))
            })?,
            None => {
                return Err(ImageError::Other(
                    "output `qcow2`: the image has no kernel (/boot/vmlinuz-<version> with \
                     /lib/modules/<version>/modules.dep): add linux-image-amd64 to `packages`, \
                     or set `kernel = \"/opt/slate-vm/kernel\"` (see scripts/vm-deps.sh)"
                        .into(),
                ))
            }
        },
    };
    let _ = writeln!(
        logf,
        "kernel {} from {}",
        kernel.version,
        kernel.vmlinuz.display()
    );
    copy_mode(&kernel.vmlinuz, &out.join("vmlinuz"), 0o644)?;

    bar.message("initramfs");
    initrd(
        &kernel,
        &tmp.join("vm-initrd"),
        &out.join("initrd.img"),
        log,
        bar,
    )?;

    bar.message("disk tree");
    let tree = tmp.join("vm-tree");
    if keep_rootfs {
        fsutil::copy_tree(rootfs, &tree)?;
    } else {
        fs::rename(rootfs, &tree)
            .map_err(ImageError::io(format!("renaming {}", rootfs.display())))?;
    }
    populate(&tree, &inputs.agent)?;

    let (bytes, inodes) = usage(&tree);
    // Free space for jobs (they write to an overlay of this disk): a sparse raw file and
    // qcow2 store only what is used, so the slack costs nothing until written.
    let mib = (bytes + bytes / 4 + (1 << 30)).div_ceil(1 << 20);
    let inodes = (inodes * 2).max(65536);
    let _ = writeln!(
        logf,
        "disk tree: {bytes} bytes, {inodes} inodes reserved; filesystem {mib} MiB"
    );
    let raw = tmp.join("disk.raw");
    bar.message("mkfs.ext4 -d");
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "slate-root", "-E", "root_owner=0:0"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(&tree)
        .arg(&raw)
        .arg(format!("{mib}M"));
    dies_with_us(&mut cmd);
    crate::build::run_logged("qcow2", "mkfs.ext4 -d", cmd, log, bar)?;
    fsutil::remove_tree(&tree)?;

    bar.message("qemu-img convert");
    let disk = out.join("disk.qcow2");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk);
    dies_with_us(&mut cmd);
    crate::build::run_logged("qcow2", "qemu-img convert -O qcow2", cmd, log, bar)?;
    fs::remove_file(&raw).map_err(ImageError::io(format!("removing {}", raw.display())))?;
    fs::write(out.join("cmdline"), format!("{CMDLINE}\n"))
        .map_err(ImageError::io("writing the vm cmdline"))?;
    for f in ["disk.qcow2", "vmlinuz", "initrd.img", "cmdline"] {
        if let Ok(f) = fs::File::open(out.join(f)) {
            let _ = f.sync_all();
        }
    }
    fs::metadata(&disk)
        .map(|m| m.len())
        .map_err(ImageError::io(format!("reading {}", disk.display())))
}

/// SIGKILL `cmd` if the builder dies, so a killed build leaves no mkfs or qemu-img
/// writing into a temp dir the next build is removing.
fn dies_with_us(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Into the disk's tree: slate-init and its busybox, the agent, the mount points.
fn populate(tree: &Path, agent: &Path) -> Result<(), ImageError> {
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/tmp",
        "/workspace",
        "/root",
    ] {
        let p = fsutil::path_in_root(tree, Path::new(d))?;
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir_all(&p).map_err(ImageError::io(format!("creating {}", p.display())))?;
        }
    }
    install(tree, Path::new(BUSYBOX), DISK_BUSYBOX, 0o755)?;
    let bin = fsutil::path_in_root(tree, &Path::new(DISK_BUSYBOX_BIN).join("x"))?;
    let bin = bin.parent().unwrap_or(tree);
    fs::create_dir_all(bin).map_err(ImageError::io(format!("creating {}", bin.display())))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(ImageError::io(format!("running {BUSYBOX} --list")))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        let link = bin.join(applet);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("../busybox", &link)
            .map_err(ImageError::io(format!("linking {}", link.display())))?;
    }
    install(tree, agent, "/usr/local/bin/slate-agent", 0o755)?;
    let init = fsutil::path_in_root(tree, Path::new("/sbin/slate-init"))?;
    write_file(&init, SLATE_INIT.as_bytes(), 0o755)
}

/// Copy `src` to `dest` (absolute, inside `tree`), replacing whatever is there.
fn install(tree: &Path, src: &Path, dest: &str, mode: u32) -> Result<(), ImageError> {
    let dest = fsutil::path_in_root(tree, Path::new(dest))?;
    let bytes = fs::read(src).map_err(ImageError::io(format!("reading {}", src.display())))?;
    write_file(&dest, &bytes, mode)
}

/// Write a root-owned file, replacing (never writing through) what is there.
fn write_file(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), ImageError> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .map_err(ImageError::io(format!("creating {}", parent.display())))?;
    }
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            return Err(ImageError::Other(format!(
                "output `qcow2`: {} is a directory in the image",
                dest.display()
            )))
        }
        Ok(_) => fs::remove_file(dest)
            .map_err(ImageError::io(format!("replacing {}", dest.display())))?,
        Err(_) => {}
    }
    fs::write(dest, bytes).map_err(ImageError::io(format!("writing {}", dest.display())))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .map_err(ImageError::io(format!("chmod {}", dest.display())))?;
    std::os::unix::fs::lchown(dest, Some(0), Some(0))
        .map_err(ImageError::io(format!("chown {}", dest.display())))
}

fn copy_mode(src: &Path, dest: &Path, mode: u32) -> Result<(), ImageError> {
    fs::copy(src, dest).map_err(ImageError::io(format!(
        "copying {} to {}",
        src.display(),
        dest.display()
    )))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .map_err(ImageError::io(format!("chmod {}", dest.display())))
}

/// Apparent bytes and inode count of a tree, each inode once.
fn usage(path: &Path) -> (u64, u64) {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>, bytes: &mut u64) {
        let Ok(meta) = fs::symlink_metadata(p) else {
            return;
        };
        if seen.insert((meta.dev(), meta.ino())) {
            // Whole blocks: ext4 allocates at least one per non-empty file.
            *bytes += meta.len().div_ceil(4096) * 4096 + 256;
        }
        if meta.is_dir() {
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), seen, bytes);
            }
        }
    }
    let mut seen = HashSet::new();
    let mut bytes = 0;
    walk(path, &mut seen, &mut bytes);
    (bytes, seen.len() as u64)
}

/// The initramfs: static busybox, `MODULES` (with dependencies, decompressed) and /init.
fn initrd(
    kernel: &Kernel,
    dir: &Path,
    out: &Path,
    log: &Path,
    bar: &StageBar,
) -> Result<(), ImageError> {
    for d in ["bin", "lib/modules", "dev", "proc", "sys", "newroot"] {
        let p = dir.join(d);
        fs::create_dir_all(&p).map_err(ImageError::io(format!("creating {}", p.display())))?;
    }
    copy_mode(Path::new(BUSYBOX), &dir.join("bin/busybox"), 0o755)?;
    let dep_path = kernel.modules.join("modules.dep");
    let dep = fs::read_to_string(&dep_path)
        .map_err(ImageError::io(format!("reading {}", dep_path.display())))?;
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let order = module_order(&dep, &builtin, MODULES)?;
    let mut names = Vec::new();
    for (name, rel) in &order {
        let src = kernel.module_file(rel)?;
        if !plain_file(&src) {
            return Err(ImageError::Other(format!(
                "output `qcow2`: module {} is not a regular file",
                src.display()
            )));
        }
        let dest = dir.join("lib/modules").join(format!("{name}.ko"));
        // busybox insmod wants a plain .ko.
        let tool = [(".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")]
            .iter()
            .find(|(ext, _)| rel.ends_with(ext))
            .map(|(_, tool)| *tool);
        match tool {
            None => copy_mode(&src, &dest, 0o644)?,
            Some(tool) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#""$1" -dc -- "$2" > "$3""#)
                    .arg("sh")
                    .arg(tool)
                    .arg(&src)
                    .arg(&dest);
                crate::build::run_logged("qcow2", &format!("{tool} -dc {rel}"), cmd, log, bar)?;
            }
        }
        names.push(name.clone());
    }
    write_file(
        &dir.join("init"),
        INITRD_INIT
            .replace("@MODULES@", &names.join(" "))
            .as_bytes(),
        0o755,
    )?;
    // Uncompressed: decompressing under TCG costs more than reading a few MB.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > "$1""#)
        .arg("sh")
        .arg(out)
        .current_dir(dir);
    crate::build::run_logged("qcow2", "cpio -o -H newc (initramfs)", cmd, log, bar)?;
    fsutil::remove_tree(dir)
}

/// Modules (name, path in modules.dep) in load order, each after its dependencies;
/// modules built into the kernel (modules.builtin) are skipped. From slate-testkit.
fn module_order(
    modules_dep: &str,
    builtin: &str,
    wanted: &[&str],
) -> Result<Vec<(String, String)>, ImageError> {
    // "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko …"
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_name = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        by_name.insert(module_name(path), path.to_string());
        deps.insert(
            path.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    fn visit(path: &str, deps: &HashMap<String, Vec<String>>, out: &mut Vec<(String, String)>) {
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
        match by_name.get(*w) {
            Some(path) => visit(path, &deps, &mut out),
            None if builtin.contains(*w) => {}
            None => {
                return Err(ImageError::Other(format!(
                    "output `qcow2`: the kernel has no module {w} (not in modules.dep nor \
                     modules.builtin)"
                )))
            }
        }
    }
    Ok(out)
}

/// `kernel/fs/ext4/ext4.ko.xz` → `ext4`; module names use `_` where files may use `-`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

/// A 64-bit little-endian ELF without `PT_INTERP` (from `slate_testkit::agent_bin`).
pub(crate) fn is_static_elf(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(0..4)? != b"\x7fELF" || elf.get(4)? != &2 || elf.get(5)? != &1 {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    if phentsize < 4 {
        return None;
    }
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_their_dependencies_and_builtins_are_skipped() {
        let dep =
            "kernel/a.ko: kernel/b.ko.xz kernel/c.ko\nkernel/b.ko.xz: kernel/c.ko\nkernel/c.ko:\n";
        let order: Vec<String> = module_order(dep, "kernel/d-e.ko\n", &["a", "d_e"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["c", "b", "a"]);
        assert!(module_order(dep, "", &["nope"]).is_err());
    }

    #[test]
    fn kernel_versions_sort_naturally() {
        let mut v = vec!["6.1.0-10-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["5.10.0-30-amd64", "6.1.0-9-amd64", "6.1.0-10-amd64"]);
    }

    #[test]
    fn kernel_dir_layouts_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("lib/modules/6.1.0-9/kernel")).unwrap();
        fs::write(root.join("lib/modules/6.1.0-9/modules.dep"), "").unwrap();
        fs::write(root.join("vmlinuz"), "k").unwrap();
        let k = find_kernel(root, false).unwrap().unwrap();
        assert_eq!(k.version, "6.1.0-9");
        assert_eq!(k.vmlinuz, root.join("vmlinuz"));
        // boot/vmlinuz-<ver> wins, and an image is never searched for a bare vmlinuz.
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::write(root.join("boot/vmlinuz-6.1.0-9"), "k").unwrap();
        let k = find_kernel(root, true).unwrap().unwrap();
        assert_eq!(k.vmlinuz, root.join("boot/vmlinuz-6.1.0-9"));
        fs::remove_file(root.join("boot/vmlinuz-6.1.0-9")).unwrap();
        assert!(find_kernel(root, true).unwrap().is_none());
    }
}
