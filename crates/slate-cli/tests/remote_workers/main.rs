//! Remote workers: pull requests end to end on machines slate does not run itself,
//! reached over a network. `tls`: an exec pool whose agent dials back over TLS from a
//! network namespace, and the hostile clients of the TLS listener. `caches`: artifacts
//! and new distfiles sent back by the agent, and poisoning attempts from a PR.

#[path = "../common/mod.rs"]
mod common;

mod caches;
mod tls;
