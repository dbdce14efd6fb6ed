//! `slate image build|list|gc`: base images under `<data_dir>/images`, thin over slate-image.

use anyhow::{Context, Result};
use slate_image::{ImageBuilder, ImageInfo, Progress, Recipe};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DataDirArg {
    /// The server's data directory; images live in its `images/` subdirectory.
    #[arg(long, env = "SLATE_DATA_DIR", default_value = "/var/lib/slate")]
    data_dir: PathBuf,
}

impl DataDirArg {
    fn images(&self) -> PathBuf {
        self.data_dir.join("images")
    }
}

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build a recipe (e.g. images/debian-bookworm.toml) into a new version (as root).
    Build {
        recipe: PathBuf,
        #[command(flatten)]
        data: DataDirArg,
        /// Rerun debootstrap and packages instead of reusing the cached base.
        #[arg(long)]
        refresh: bool,
    },
    /// List image versions, oldest first per image.
    List {
        #[command(flatten)]
        data: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove versions that are not the newest and that no job uses, and build leftovers.
    Gc {
        #[command(flatten)]
        data: DataDirArg,
        /// A rootfs or version path a job still runs on (repeatable); kept.
        #[arg(long = "in-use")]
        in_use: Vec<PathBuf>,
    },
}

pub async fn run(cmd: ImageCommand) -> Result<i32> {
    // Builds and directory walks block; keep them off the async workers.
    tokio::task::spawn_blocking(move || run_blocking(cmd)).await?
}

fn run_blocking(cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Build {
            recipe,
            data,
            refresh,
        } => {
            let recipe = Recipe::load(&recipe)?;
            let v = ImageBuilder::new(data.images())
                .refresh(refresh)
                .build(&recipe, &Progress::stderr())?;
            let stages: Vec<String> = v
                .meta
                .stages
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.1}s{}",
                        s.stage,
                        s.seconds,
                        if s.reused { " (cached)" } else { "" }
                    )
                })
                .collect();
            println!(
                "{} {}: {} in {:.1}s [{}]",
                v.name,
                v.version,
                human_size(v.meta.size_bytes),
                v.meta.build_seconds,
                stages.join(", ")
            );
            println!("{}", v.rootfs.display());
            Ok(0)
        }
        ImageCommand::List { data, json } => {
            let images = slate_image::list(&data.images())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                print_table(&images);
            }
            Ok(0)
        }
        ImageCommand::Gc { data, in_use } => {
            let report = slate_image::gc(&data.images(), &in_use)
                .with_context(|| format!("collecting {}", data.images().display()))?;
            for v in &report.removed {
                println!(
                    "removed {} {} ({})",
                    v.name,
                    v.version,
                    human_size(v.size_bytes)
                );
            }
            for p in report.removed_temp.iter().chain(&report.removed_cache) {
                println!("removed {}", p.display());
            }
            if report.removed.is_empty()
                && report.removed_temp.is_empty()
                && report.removed_cache.is_empty()
            {
                println!("nothing to remove");
            }
            Ok(0)
        }
    }
}

fn print_table(images: &[ImageInfo]) {
    println!(
        "{:<24} {:<32} {:<20} {:>9} {:<12} IN USE",
        "NAME", "VERSION", "CREATED", "SIZE", "OUTPUTS"
    );
    for i in images {
        let outputs: Vec<String> = i.outputs.iter().map(|o| o.to_string()).collect();
        println!(
            "{:<24} {:<32} {:<20} {:>9} {:<12} {}{}",
            i.name,
            i.version,
            i.created.format("%Y-%m-%d %H:%M:%S"),
            human_size(i.size_bytes),
            outputs.join(","),
            // Filled in from the server's pinned versions once it reports them.
            i.in_use_by
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            if i.newest { " (newest)" } else { "" }
        );
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
