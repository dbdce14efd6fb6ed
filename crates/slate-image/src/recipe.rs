//! Image recipes (`images/*.toml`): typed, validated, with file:line:column errors.
//!
//! A recipe names a base (debootstrap, a rootfs tarball or another slate image), packages,
//! files to copy, commands to run, the optional tools and package-manager stages and the
//! outputs to produce. Paths in a recipe are relative to the recipe file.

use serde::Deserialize;
use serde_spanned::Spanned;
use sha2::{Digest, Sha256};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Debian's mirror, the default for a debootstrap base.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// One recipe problem, located in the file (the same shape as `slate.toml`'s errors).
pub use slate_core::config::ConfigError as RecipeError;
/// Every problem found in a recipe.
pub use slate_core::config::ConfigErrors as RecipeErrors;
use slate_core::located::{key_at, line_col};

/// Where the image's root filesystem starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `debootstrap --variant=VARIANT SUITE DIR MIRROR`.
    Debootstrap {
        suite: String,
        variant: String,
        mirror: String,
    },
    /// A rootfs tarball (any compression GNU tar detects), absolute path.
    Tarball(PathBuf),
    /// The newest version of another slate image.
    Image(String),
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base::Debootstrap {
                suite,
                variant,
                mirror,
            } => write!(f, "debootstrap {suite} ({variant}) from {mirror}"),
            Base::Tarball(p) => write!(f, "tarball {}", p.display()),
            Base::Image(n) => write!(f, "image {n}"),
        }
    }
}

/// A file copied from the recipe's directory into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Absolute path on the host (resolved against the recipe's directory).
    pub src: PathBuf,
    /// Absolute path inside the image.
    pub dest: PathBuf,
    /// Permission bits; `None` keeps the source's.
    pub mode: Option<u32>,
}

/// What a build produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// A root filesystem directory, the lower layer of sandbox workers.
    Rootfs,
    /// A bootable VM image for qemu/libvirt pools: `<version>/vm/{disk.qcow2,vmlinuz,
    /// initrd.img,cmdline}`, with `slate-agent` started at boot.
    Qcow2,
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Output::Rootfs => "rootfs",
            Output::Qcow2 => "qcow2",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub name: String,
    /// The recipe file, as given.
    pub path: PathBuf,
    /// SHA-256 of the recipe file's text.
    pub text_hash: String,
    pub base: Base,
    pub packages: Vec<String>,
    pub files: Vec<FileSpec>,
    pub run: Vec<String>,
    /// The tools prefix stage (the proposal's step 2).
    pub tools: Vec<String>,
    /// The package manager's own prefix stage (the proposal's step 5).
    pub package_manager: Vec<String>,
    pub outputs: Vec<Output>,
    /// How often the server rebuilds the image; also the longest a cached base is reused.
    pub rebuild_every: Option<Duration>,
    /// `agent = "path"`: the `slate-agent` put into the `qcow2` disk (absolute). `None`:
    /// `slate-agent` next to the running executable.
    pub agent: Option<PathBuf>,
    /// `kernel = "dir"`: where the `qcow2` output's kernel comes from when the image has
    /// none of its own (absolute): `vmlinuz` or `boot/vmlinuz-<ver>`, and
    /// `lib/modules/<ver>` with a `modules.dep`.
    pub kernel: Option<PathBuf>,
}

impl Recipe {
    /// Read and parse the recipe at `path`.
    pub fn load(path: &Path) -> Result<Recipe, crate::ImageError> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::ImageError::Io {
            what: format!("reading recipe {}", path.display()),
            error: e,
        })?;
        Ok(Recipe::parse(&text, path)?)
    }

    /// Parse and validate `text`, read from `path`; relative paths in it are resolved
    /// against `path`'s directory and must exist.
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeErrors> {
        let file = path.display().to_string();
        let raw: RawRecipe = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let (line, column) = line_col(text, span.start);
                return Err(RecipeErrors(vec![RecipeError {
                    file,
                    line,
                    column,
                    key: key_at(text, &span),
                    message: e.message().trim().to_string(),
                }]));
            }
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let mut v = Validator {
            text,
            file: &file,
            dir: &dir,
            errors: Vec::new(),
        };
        let recipe = v.recipe(raw, path, text);
        match recipe {
            Some(r) if v.errors.is_empty() => Ok(r),
            _ => Err(RecipeErrors(v.errors)),
        }
    }
}

// ---- raw shapes, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<Spanned<String>>,
    // Not `Spanned`: toml cannot span a table written as `[base.debootstrap]`.
    base: Option<RawBase>,
    #[serde(default)]
    packages: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<RawFile>>,
    #[serde(default)]
    run: Vec<String>,
    tools: Option<RawStage>,
    package_manager: Option<RawStage>,
    outputs: Option<Spanned<Vec<Spanned<String>>>>,
    rebuild_every: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
    kernel: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    debootstrap: Option<RawDebootstrap>,
    tarball: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebootstrap {
    suite: Spanned<String>,
    variant: Option<Spanned<String>>,
    mirror: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: Spanned<String>,
    dest: Spanned<String>,
    mode: Option<Spanned<RawMode>>,
}

/// `mode = 0o755` (a TOML octal integer) or `mode = "0755"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawMode {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    run: Vec<String>,
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
    dir: &'a Path,
    errors: Vec<RecipeError>,
}

const VARIANTS: [&str; 4] = ["minbase", "buildd", "fakechroot", "-"];

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(RecipeError {
            file: self.file.to_string(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    /// A host path named in the recipe: relative to the recipe's directory, must exist.
    fn host_path(&mut self, s: &Spanned<String>, key: &str, want_file: bool) -> PathBuf {
        let p = self.dir.join(s.get_ref());
        let ok = if want_file { p.is_file() } else { p.exists() };
        if !ok {
            self.err(
                s.span(),
                key,
                format!("{} does not exist or is not a regular file", p.display()),
            );
        }
        p
    }

    /// A host directory named in the recipe (relative to the recipe's directory).
    fn host_dir(&mut self, s: &Spanned<String>, key: &str) -> PathBuf {
        let p = self.dir.join(s.get_ref());
        if !p.is_dir() {
            self.err(
                s.span(),
                key,
                format!("{} does not exist or is not a directory", p.display()),
            );
        }
        p
    }

    fn recipe(&mut self, raw: RawRecipe, path: &Path, text: &str) -> Option<Recipe> {
        let name = match raw.name {
            Some(n) => {
                if !valid_name(n.get_ref()) {
                    self.err(
                        n.span(),
                        "name",
                        format!(
                            "expected lowercase letters, digits, '.', '_' or '-' (not starting with '.'), found {:?}",
                            n.get_ref()
                        ),
                    );
                }
                n.into_inner()
            }
            None => {
                self.err(0..0, "name", "missing: every recipe needs a `name`");
                String::new()
            }
        };

        let base = match raw.base {
            None => {
                self.err(
                    0..0,
                    "base",
                    "missing: expected `base = { debootstrap = { suite = \"bookworm\" } }`, `{ tarball = \"path\" }` or `{ image = \"name\" }`",
                );
                None
            }
            Some(b) => {
                let span = key_span(self.text, "base");
                let count = b.debootstrap.is_some() as u8
                    + b.tarball.is_some() as u8
                    + b.image.is_some() as u8;
                if count != 1 {
                    self.err(
                        span,
                        "base",
                        "expected exactly one of `debootstrap`, `tarball` or `image`",
                    );
                    None
                } else if let Some(d) = b.debootstrap {
                    let variant = match d.variant {
                        Some(v) => {
                            if !VARIANTS.contains(&v.get_ref().as_str()) {
                                self.err(
                                    v.span(),
                                    "base.debootstrap.variant",
                                    format!(
                                        "expected one of {}, found {:?}",
                                        VARIANTS.join(", "),
                                        v.get_ref()
                                    ),
                                );
                            }
                            v.into_inner()
                        }
                        None => "minbase".to_string(),
                    };
                    let mirror = match d.mirror {
                        Some(m) => {
                            let s = m.get_ref();
                            if !(s.starts_with("http://") || s.starts_with("https://")) {
                                self.err(
                                    m.span(),
                                    "base.debootstrap.mirror",
                                    format!("expected an http(s) URL, found {s:?}"),
                                );
                            }
                            m.into_inner().trim_end_matches('/').to_string()
                        }
                        None => DEFAULT_MIRROR.to_string(),
                    };
                    if !valid_word(d.suite.get_ref()) {
                        self.err(
                            d.suite.span(),
                            "base.debootstrap.suite",
                            format!(
                                "expected a suite name like \"bookworm\", found {:?}",
                                d.suite.get_ref()
                            ),
                        );
                    }
                    Some(Base::Debootstrap {
                        suite: d.suite.into_inner(),
                        variant,
                        mirror,
                    })
                } else if let Some(t) = b.tarball {
                    Some(Base::Tarball(self.host_path(&t, "base.tarball", true)))
                } else if let Some(i) = b.image {
                    if !valid_name(i.get_ref()) {
                        self.err(
                            i.span(),
                            "base.image",
                            format!("expected an image name, found {:?}", i.get_ref()),
                        );
                    } else if *i.get_ref() == name {
                        self.err(i.span(), "base.image", "an image cannot be its own parent");
                    }
                    Some(Base::Image(i.into_inner()))
                } else {
                    None
                }
            }
        };

        let mut packages = Vec::new();
        for (i, p) in raw.packages.into_iter().enumerate() {
            if !valid_word(p.get_ref()) || p.get_ref().starts_with('-') {
                self.err(
                    p.span(),
                    format!("packages[{i}]"),
                    format!("expected a Debian package name, found {:?}", p.get_ref()),
                );
            }
            packages.push(p.into_inner());
        }

        let mut files = Vec::new();
        for (i, f) in raw.files.into_iter().enumerate() {
            let f = f.into_inner();
            let src = self.host_path(&f.src, &format!("files[{i}].src"), true);
            let dest = PathBuf::from(f.dest.get_ref());
            if !dest.is_absolute()
                || dest
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                self.err(
                    f.dest.span(),
                    format!("files[{i}].dest"),
                    format!(
                        "expected an absolute path inside the image without `..`, found {:?}",
                        f.dest.get_ref()
                    ),
                );
            }
            let mode = f.mode.and_then(|m| {
                let span = m.span();
                let parsed = match m.into_inner() {
                    RawMode::Int(n) => u32::try_from(n).ok(),
                    RawMode::Text(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
                };
                match parsed {
                    Some(n) if n <= 0o7777 => Some(n),
                    _ => {
                        self.err(
                            span,
                            format!("files[{i}].mode"),
                            "expected permission bits like 0o755 or \"0644\"",
                        );
                        None
                    }
                }
            });
            files.push(FileSpec { src, dest, mode });
        }

        let outputs = match raw.outputs {
            None => vec![Output::Rootfs],
            Some(list) => {
                let span = list.span();
                let list = list.into_inner();
                if list.is_empty() {
                    self.err(
                        span,
                        "outputs",
                        "expected at least one of \"rootfs\", \"qcow2\"",
                    );
                }
                let mut out = Vec::new();
                for (i, o) in list.into_iter().enumerate() {
                    match o.get_ref().as_str() {
                        "rootfs" => out.push(Output::Rootfs),
                        "qcow2" => out.push(Output::Qcow2),
                        other => self.err(
                            o.span(),
                            format!("outputs[{i}]"),
                            format!("expected \"rootfs\" or \"qcow2\", found {other:?}"),
                        ),
                    }
                }
                out.dedup();
                out
            }
        };

        let rebuild_every = raw.rebuild_every.and_then(|r| {
            match slate_core::duration::parse_duration(r.get_ref()) {
                Ok(d) if d >= Duration::from_secs(60) => Some(d),
                Ok(_) => {
                    self.err(r.span(), "rebuild_every", "expected at least \"1m\"");
                    None
                }
                Err(e) => {
                    self.err(r.span(), "rebuild_every", e);
                    None
                }
            }
        });

        let qcow2 = outputs.contains(&Output::Qcow2);
        let vm_path = |v: &mut Self, raw: Option<Spanned<String>>, key: &str| {
            let raw = raw?;
            if !qcow2 {
                v.err(
                    raw.span(),
                    key,
                    "only used by the \"qcow2\" output: add it to `outputs` or remove this key",
                );
            }
            Some(if key == "agent" {
                v.host_path(&raw, key, true)
            } else {
                v.host_dir(&raw, key)
            })
        };
        let agent = vm_path(self, raw.agent, "agent");
        let kernel = vm_path(self, raw.kernel, "kernel");

        Some(Recipe {
            name,
            path: path.to_path_buf(),
            text_hash: hex::encode(Sha256::digest(text.as_bytes())),
            base: base?,
            packages,
            files,
            run: raw.run,
            tools: raw.tools.map(|s| s.run).unwrap_or_default(),
            package_manager: raw.package_manager.map(|s| s.run).unwrap_or_default(),
            outputs,
            rebuild_every,
            agent,
            kernel,
        })
    }
}

/// Image names become directory names: keep them boring.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// Suites and package names: go on a command line, so no spaces or shell characters.
fn valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-:=~".contains(c))
}

/// Where top-level `key` is first written (`key = …`, `key.x = …` or `[key…]`).
fn key_span(text: &str, key: &str) -> Range<usize> {
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let rest = t.strip_prefix('[').unwrap_or(t).trim_start_matches('[');
        if let Some(after) = rest.strip_prefix(key) {
            if after.starts_with(|c: char| c == '=' || c == '.' || c == ']' || c.is_whitespace()) {
                let start = pos + (line.len() - t.len());
                return start..start + key.len();
            }
        }
        pos += line.len();
    }
    0..0
}
