//! Test support shared by every crate's tests: a local GitHub API recorder, signed
//! fixture payloads, a tiny busybox image, the static agent binary, leak checks.

pub mod agent_bin;
pub mod fake_agent;
pub mod github;
pub mod image;
pub mod leaks;
pub mod vm_image;
