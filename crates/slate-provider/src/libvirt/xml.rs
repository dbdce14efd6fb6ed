//! The libvirt XML slate writes: a worker's volume and its transient domain.

use std::fmt::Write as _;
use std::path::Path;

/// Namespace of slate's domain metadata (`virsh metadata NAME NS`).
pub const METADATA_NS: &str = "https://slate.invalid/xmlns/libvirt-worker/1";

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// A stable 64-bit FNV-1a hash, hex: the owner mark of a provider's domains (std's
/// hashers are not stable across Rust versions).
pub fn owner_id(owner: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Whether the output of `virsh metadata NAME METADATA_NS` names `owner_id`.
pub fn owned_by(metadata: &str, owner_id: &str) -> bool {
    metadata.contains(&format!(">{owner_id}<"))
}

/// A qcow2 volume whose backing store is `base` (a qcow2 file on the libvirt host). With
/// capacity 0 the volume takes the base's virtual size.
pub fn volume(name: &str, base: &Path) -> String {
    format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>0</capacity>\n  \
         <target><format type='qcow2'/><compat>1.1</compat></target>\n  \
         <backingStore><path>{}</path><format type='qcow2'/></backingStore>\n</volume>\n",
        escape(name),
        path(base)
    )
}

/// Everything a worker's domain is made of.
pub struct Domain<'a> {
    pub name: &'a str,
    /// `qemu` (TCG) or `kvm`.
    pub virt_type: &'a str,
    pub owner_id: &'a str,
    /// Human-readable owner (host and worker root), for whoever reads `virsh dumpxml`.
    pub owner: &'a str,
    pub memory_mb: u64,
    pub cpus: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub pool: &'a str,
    pub volume: &'a str,
    pub console_log: &'a Path,
    pub agent_socket: &'a Path,
    pub agent_port: &'a str,
    pub token_file: &'a Path,
    pub token_fw_cfg: &'a str,
    pub source: Option<&'a Path>,
    pub workspace_tag: &'a str,
}

impl Domain<'_> {
    /// The domain XML for `virsh create`.
    pub fn to_xml(&self) -> String {
        let mut x = String::new();
        let _ = writeln!(x, "<domain type='{}'>", escape(self.virt_type));
        let _ = writeln!(x, "  <name>{}</name>", escape(self.name));
        let _ = writeln!(x, "  <title>slate worker {}</title>", escape(self.name));
        let _ = writeln!(
            x,
            "  <metadata><slate:worker xmlns:slate='{METADATA_NS}'>\
             <slate:owner>{}</slate:owner><slate:of>{}</slate:of>\
             </slate:worker></metadata>",
            escape(self.owner_id),
            escape(self.owner)
        );
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mb);
        let _ = writeln!(x, "  <vcpu>{}</vcpu>", self.cpus);
        x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        let _ = writeln!(x, "    <kernel>{}</kernel>", path(self.kernel));
        let _ = writeln!(x, "    <initrd>{}</initrd>", path(self.initrd));
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", escape(self.cmdline));
        x.push_str("  </os>\n");
        // ACPI: the guest finds fw_cfg (QEMU0002) through it, and `poweroff` ends qemu.
        x.push_str("  <features><acpi/><apic/></features>\n");
        if self.virt_type == "kvm" {
            x.push_str("  <cpu mode='host-passthrough'/>\n");
        }
        // The token goes to qemu as `-fw_cfg name=…,file=…`: a path, never the value.
        let _ = writeln!(
            x,
            "  <sysinfo type='fwcfg'><entry name='{}' file='{}'/></sysinfo>",
            escape(self.token_fw_cfg),
            path(self.token_file)
        );
        // Any stop ends the domain (transient: it is then gone), like qemu's -no-reboot.
        x.push_str(
            "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  \
             <on_crash>destroy</on_crash>\n",
        );
        x.push_str("  <devices>\n");
        // cache=unsafe: the volume is thrown away with the worker, flushes buy nothing.
        let _ = writeln!(
            x,
            "    <disk type='volume' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>\
             <source pool='{}' volume='{}'/><target dev='vda' bus='virtio'/></disk>",
            escape(self.pool),
            escape(self.volume)
        );
        if let Some(source) = self.source {
            let _ = writeln!(
                x,
                "    <filesystem type='mount' accessmode='mapped'><source dir='{}'/>\
                 <target dir='{}'/><readonly/></filesystem>",
                path(source),
                escape(self.workspace_tag)
            );
        }
        let _ = writeln!(
            x,
            "    <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>",
            path(self.console_log)
        );
        let _ = writeln!(
            x,
            "    <channel type='unix'><source mode='connect' path='{}'/>\
             <target type='virtio' name='{}'/></channel>",
            path(self.agent_socket),
            escape(self.agent_port)
        );
        // No <interface>: no network (qemu's -nic none). No USB, no balloon, no display.
        x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
        x.push_str("  </devices>\n");
        // qemu runs as root:root for this domain only and libvirt relabels nothing: the
        // job's files stay slate's (see the module docs).
        x.push_str(
            "  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n",
        );
        x.push_str("</domain>\n");
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_xml_cares_about() {
        assert_eq!(escape(r#"a&b<c>'d"e"#), "a&amp;b&lt;c&gt;&apos;d&quot;e");
    }

    #[test]
    fn owner_ids_are_stable_and_distinct() {
        assert_eq!(owner_id(""), "cbf29ce484222325");
        assert_eq!(owner_id("a"), "af63dc4c8601ec8c");
        assert_ne!(owner_id("host\0/data/a"), owner_id("host\0/data/b"));
        assert!(owned_by(
            "<worker>\n  <owner>af63dc4c8601ec8c</owner>\n</worker>",
            "af63dc4c8601ec8c"
        ));
        assert!(!owned_by(
            "<worker><owner>x</owner></worker>",
            "af63dc4c8601ec8c"
        ));
    }

    #[test]
    fn domain_xml_has_no_network_and_passes_the_token_by_file() {
        let d = Domain {
            name: "slate-5",
            virt_type: "qemu",
            owner_id: "0123",
            owner: "host:/w",
            memory_mb: 256,
            cpus: 1,
            kernel: Path::new("/img/vmlinuz"),
            initrd: Path::new("/img/initrd.img"),
            cmdline: "console=ttyS0 root=/dev/vda",
            pool: "default",
            volume: "slate-5.qcow2",
            console_log: Path::new("/w/slate-5/console.log"),
            agent_socket: Path::new("/s/a&b.sock"),
            agent_port: "org.slate.agent",
            token_file: Path::new("/w/slate-5/token"),
            token_fw_cfg: "opt/slate/token",
            source: Some(Path::new("/src")),
            workspace_tag: "workspace",
        };
        let x = d.to_xml();
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(!x.contains("<interface"));
        assert!(x.contains("<acpi/>"));
        assert!(!x.contains("host-passthrough"));
        assert!(x.contains("<entry name='opt/slate/token' file='/w/slate-5/token'/>"));
        assert!(x.contains("path='/s/a&amp;b.sock'"));
        assert!(x.contains("<readonly/>"));
        assert!(x.contains("<source pool='default' volume='slate-5.qcow2'/>"));
        let kvm = Domain {
            virt_type: "kvm",
            source: None,
            ..d
        }
        .to_xml();
        assert!(kvm.contains("host-passthrough") && !kvm.contains("<filesystem"));
        let v = volume("slate-5.qcow2", Path::new("/img/disk.qcow2"));
        assert!(v.contains("<backingStore><path>/img/disk.qcow2</path><format type='qcow2'/>"));
    }
}
