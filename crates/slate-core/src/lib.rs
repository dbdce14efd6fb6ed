//! Domain types, the job state machine, pipeline configuration and planners: pure, no I/O.

pub mod config;
pub mod domain;
pub mod duration;
pub mod located;
pub mod macports;
pub mod planner;
pub mod secret;

pub use domain::*;
pub use secret::Secret;
