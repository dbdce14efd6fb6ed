//! The fully static `slate-agent`, built once per test process, to put into images and VMs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The target the static agent is built for (`+crt-static` works on the gnu target).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `slate-agent` as a fully static release binary (once per process) and returns
/// its path. It goes to its own target dir, `<workspace>/target/static-agent`, so the
/// build does not wait on the lock the running `cargo test` holds on `target/`.
///
/// Panics with cargo's output if the build fails.
pub fn static_agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(build).clone()
}

fn build() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let target_dir = root.join("target/static-agent");
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("cargo"));
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "slate-agent",
            "--release",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.display()));
    if !out.status.success() {
        panic!(
            "building the static slate-agent failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bin = target_dir.join(TARGET).join("release/slate-agent");
    assert!(
        bin.is_file(),
        "cargo succeeded but {} is missing",
        bin.display()
    );
    bin
}

/// Whether `elf` is an executable that needs no dynamic loader: a 64-bit little-endian
/// ELF without a `PT_INTERP` program header. `None` if it is not such an ELF at all.
pub fn is_static_elf(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
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
    fn static_agent_needs_no_loader_and_runs() {
        let bin = static_agent();
        let bytes = std::fs::read(&bin).unwrap();
        assert_eq!(
            is_static_elf(&bytes),
            Some(true),
            "{} has a PT_INTERP",
            bin.display()
        );

        let out = Command::new(&bin).arg("--help").output().unwrap();
        assert!(out.status.success(), "--help: {}", out.status);
        assert!(String::from_utf8_lossy(&out.stdout).contains("--connect"));
    }

    #[test]
    fn a_dynamic_executable_is_recognised() {
        // The test binary itself is linked dynamically against glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(is_static_elf(&me), Some(false));
        assert_eq!(is_static_elf(b"#!/bin/sh\n"), None);
        assert_eq!(is_static_elf(b"\x7fELF"), None);
    }
}
