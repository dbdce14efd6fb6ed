//! Base images: recipes, builds into immutable versions, resolution for pools, and GC.
//!
//! Layout under the images directory (`<data_dir>/images`):
//!
//! ```text
//! <name>/<version>/rootfs      the image (never written once visible)
//! <name>/<version>/vm/         the `qcow2` output: disk.qcow2, vmlinuz, initrd.img, cmdline
//! <name>/<version>/meta.json   hashes, created, size, outputs, stage durations
//! <name>/<version>/logs/*.log  one log per build stage
//! <name>/.tmp-<version>/       a build in progress (renamed to <version> when done)
//! <name>/.failed-<version>/    the logs of the newest failed build
//! <name>/.lock                 flock held by the build of <name>
//! .cache/base-<key>/rootfs     debootstrap + packages, keyed by suite/variant/mirror/packages
//! ```

mod build;
mod fsutil;
mod progress;
pub mod recipe;
mod store;
mod vm;

pub use build::{ImageBuilder, ImageVersion};
pub use progress::Progress;
pub use recipe::{Base, FileSpec, Output, Recipe, RecipeError, RecipeErrors};
pub use store::{
    gc, list, resolve, versions, GcReport, ImageInfo, ImageMeta, ResolvedImage, StageTiming,
};
pub use vm::SLATE_INIT;

use std::path::PathBuf;

/// Everything that can go wrong building, listing, resolving or collecting images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Recipe(#[from] RecipeErrors),
    // The cause is in the message, not `#[source]`: `{:#}` would print it twice.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error(
        "stage `{stage}`: command `{command}` failed ({status}); log {log}; output tail:\n{tail}"
    )]
    CommandFailed {
        stage: String,
        command: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("image `{0}` has no version under {1}")]
    NotFound(String, PathBuf),
    #[error("another build of image `{0}` is running")]
    Busy(String),
    #[error("{path} still has mounts under it ({mounts}); refusing to delete it")]
    Mounted { path: PathBuf, mounts: String },
    #[error("{0}")]
    Other(String),
}

impl ImageError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let what = what.into();
        move |error| ImageError::Io { what, error }
    }
}
